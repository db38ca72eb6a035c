//! A service whose listen backlog is full is busy, not gone: a client
//! connecting to it directly waits for room, and so must one coming
//! through the exporter (it used to be answered `503 busy` at once) or
//! through a local proxy (it used to be closed at once and see an empty
//! reply, with dcat exiting 0). The service here has a backlog of one and
//! answers one connection at a time, after a late start, while twenty
//! clients come at once.

mod common;

use common::service::{assert_success, dcat, start_exporter, wait_for_socket};
use common::*;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

const CLIENTS: usize = 20;

/// A listening socket at `path` with a backlog of one (std's listeners
/// ask for a large one), open to everyone.
fn listen_with_backlog_of_one(path: &Path) -> UnixListener {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let address = nix::sys::socket::UnixAddr::new(path).unwrap();
    let fd = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    nix::sys::socket::bind(fd.as_raw_fd(), &address).unwrap();
    // SAFETY: listen(2) on a socket this function owns.
    assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 1) }, 0);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
    // SAFETY: the descriptor is moved, not shared.
    UnixListener::from(unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) })
}

/// Serves `count` connections one at a time after a pause (so the backlog
/// fills first): each gets back what it sent, once it has half-closed.
fn serve_slowly(listener: UnixListener, count: usize) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let mut served = 0;
        while served < count {
            let Ok((mut stream, _)) = listener.accept() else { break };
            let mut request = Vec::new();
            if stream.read_to_end(&mut request).is_ok() {
                let _ = stream.write_all(&request);
                served += 1;
            }
        }
        served
    })
}

/// Runs CLIENTS clients at once (`ask` runs one with its input); each
/// must exit 0 with `prefix` and its own words back.
fn assert_every_client_is_answered(what: &str, prefix: &str, ask: impl Fn(&[u8]) -> Output + Sync) {
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|n| {
                let ask = &ask;
                scope.spawn(move || {
                    let words = format!("client {n}\n");
                    (words.clone(), ask(words.as_bytes()))
                })
            })
            .collect();
        for client in clients {
            let (words, out) = client.join().unwrap();
            assert_success(&out, &format!("{what} ({})", words.trim_end()));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{prefix}{words}"), "stderr: {stderr}");
        }
    });
}

#[test]
fn clients_through_the_exporter_wait_for_room_in_a_full_backlog() {
    let root = TestRoot::new().with_host("hosta");
    let listener = listen_with_backlog_of_one(&root.tree().join("exported/text/plain/slow.hosta..0"));
    let port = start_exporter(&root, &[]);
    let server = serve_slowly(listener, CLIENTS);
    let target = format!("sep://127.0.0.1:{port}/slow");
    assert_every_client_is_answered(&target, "", |words| dcat(&root, &[&target], Some(words)));
    assert_eq!(server.join().unwrap(), CLIENTS);
}

#[test]
fn clients_through_a_local_proxy_wait_for_room_in_a_full_backlog() {
    let root = TestRoot::new().with_host("hosta");
    let target = root.path().join("slow.sock");
    let listener = listen_with_backlog_of_one(&target);
    let pid = root.spawn(root.cmd("dipus-local-proxy").args([target.to_str().unwrap(), "slow/text/plain"]));
    wait_for_socket(&root, pid, &root.tree().join("local/text/plain/slow.hosta..0"));
    let server = serve_slowly(listener, CLIENTS);
    assert_every_client_is_answered("dcat slow", "", |words| dcat(&root, &["slow"], Some(words)));
    assert_eq!(server.join().unwrap(), CLIENTS);
}

/// `dipus serve --stdio` (what ssh runs on the far side) waits likewise.
#[test]
fn clients_through_serve_stdio_wait_for_room_in_a_full_backlog() {
    let root = TestRoot::new().with_host("hosta");
    let listener = listen_with_backlog_of_one(&root.tree().join("exported/text/plain/slow.hosta..0"));
    let server = serve_slowly(listener, CLIENTS);
    assert_every_client_is_answered("dipus serve --stdio", "SEP/1 200 OK\n", |words| {
        let input = [&b"SEP/1 CONNECT exported/text/plain/slow.hosta..0\n"[..], words].concat();
        run_with_timeout(root.cmd("dipus").args(["serve", "--stdio"]), Some(&input), DEFAULT_TIMEOUT)
    });
    assert_eq!(server.join().unwrap(), CLIENTS);
}

/// A service that never takes its connections: the client is told `503
/// busy` after the exporter's patience (8 s), within dcat's 10 s for a
/// status line, and the exporter goes on serving.
#[test]
fn a_service_busy_past_the_patience_is_answered_503_busy() {
    let root = TestRoot::new().with_host("hosta");
    let path = root.tree().join("exported/text/plain/stuck.hosta..0");
    let _listener = listen_with_backlog_of_one(&path);
    // Its backlog (one, and one more that Linux allows) filled for good.
    let _held: Vec<_> = (0..2).map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap()).collect();
    let port = start_exporter(&root, &[]);
    let started = std::time::Instant::now();
    let out = dcat(&root, &[&format!("sep://127.0.0.1:{port}/stuck")], Some(b"hello\n"));
    let waited = started.elapsed();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SEP/1 503 service unavailable: busy: text/plain/stuck.hosta..0"), "{stderr}");
    assert!(waited >= Duration::from_secs(7), "answered after {waited:?}, before the patience ran out");
    let out = run_with_timeout(root.cmd("dls").arg(format!("sep://127.0.0.1:{port}")), None, DEFAULT_TIMEOUT);
    assert_success(&out, "dls of the exporter afterwards");
}
