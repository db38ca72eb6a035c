//! The SEP/1 exporter facing hostile and careless peers on loopback:
//! malformed, over-long and slow request lines, paths that try to leave
//! `exported/`, sockets it must not serve, the connection cap and the allow
//! list; and WATCH spoken over a raw TCP connection. While each hostile
//! connection is held open, a well-behaved client (dcat through a sorter)
//! must still be served.

mod common;

use common::service::{assert_error, assert_success, dcat, listen_at, start_exporter, stop, wait_for_socket};
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

const SORTER: &str = "exported/text/plain/sorter.hosta..0";

/// A tree for host `hosta` with an exported sorter, any mode for "other".
fn sorter_root() -> TestRoot {
    let root = TestRoot::new().with_host("hosta");
    export(&root, "LC_ALL=C sort", "sorter/text/plain", SORTER);
    root
}

/// Starts `dipus-export-pipe --mode 0666 COMMAND SPEC` and waits for its
/// socket at `relative`; returns the server's pid.
fn export(root: &TestRoot, command: &str, spec: &str, relative: &str) -> u32 {
    let pid = root.spawn(root.cmd("dipus-export-pipe").args(["--mode", "0666", command, spec]));
    wait_for_socket(root, pid, &root.tree().join(relative));
    pid
}

/// The well-behaved client: dcat through the exported sorter.
fn assert_sorter_works(root: &TestRoot, uri: &str) {
    let out = dcat(root, &[uri], Some(b"pear\napple\nfig\n"));
    assert_success(&out, &format!("dcat {uri}"));
    assert_eq!(
        (String::from_utf8_lossy(&out.stdout).as_ref(), String::from_utf8_lossy(&out.stderr).as_ref()),
        ("apple\nfig\npear\n", ""),
        "dcat {uri}"
    );
}

fn sorter_uri(port: u16) -> String {
    format!("sep://127.0.0.1:{port}/sorter")
}

/// A raw TCP client of the exporter.
struct Raw(TcpStream);

impl Raw {
    fn connect(port: u16) -> Raw {
        Raw(TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect to port {port}: {e}")))
    }

    /// Connects and sends `request` (which is not finished by a half-close).
    fn request(port: u16, request: &[u8]) -> Raw {
        let mut raw = Raw::connect(port);
        raw.send(request);
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap_or_else(|e| panic!("send: {e}"));
    }

    /// One line with its LF, read byte by byte; panics at the end of the
    /// stream or after `timeout`.
    fn line(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut line = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            self.0.set_read_timeout(Some(left)).unwrap();
            let mut byte = [0u8];
            match self.0.read(&mut byte) {
                Ok(0) => panic!("end of stream after {:?}", String::from_utf8_lossy(&line)),
                Ok(_) => {
                    line.push(byte[0]);
                    if byte[0] == b'\n' {
                        return String::from_utf8(line).expect("utf-8 line");
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("no complete line within {timeout:?} ({e}); got {:?}", String::from_utf8_lossy(&line)),
            }
        }
    }

    /// Everything until the server closes; panics on a reset or if the
    /// connection is still open after `timeout`.
    fn rest(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut text = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            self.0.set_read_timeout(Some(left)).unwrap();
            match self.0.read(&mut chunk) {
                Ok(0) => return String::from_utf8(text).expect("utf-8 reply"),
                Ok(n) => text.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    panic!("not closed cleanly within {timeout:?} ({e}); got {:?}", String::from_utf8_lossy(&text))
                }
            }
        }
    }
}

/// `request` sent (with the write side shut if `end`) and the whole answer,
/// retried while it is that all connection slots are taken.
fn answered_once_a_slot_is_free(port: u16, request: &[u8], end: bool) -> (Raw, String) {
    let mut answered = None;
    wait_until(DEFAULT_TIMEOUT, "a free connection slot", || {
        let mut raw = Raw::request(port, request);
        if end {
            raw.0.shutdown(Shutdown::Write).unwrap();
        }
        let reply = raw.rest(DEFAULT_TIMEOUT);
        let busy = reply == "SEP/1 503 service unavailable: too many connections\n";
        answered = Some((raw, reply));
        !busy
    });
    answered.unwrap()
}

/// Asserts that a listener the test holds was never connected to.
fn assert_untouched(listener: &UnixListener, what: &str) {
    listener.set_nonblocking(true).unwrap();
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the exporter connected to {what}: {other:?}"),
    }
}

#[test]
fn malformed_request_lines_get_400_and_a_close() {
    let root = sorter_root();
    let port = start_exporter(&root, &[]);
    let cases: [(&[u8], &str); 5] = [
        (
            b"garbage\n",
            "SEP/1 400 bad request: not a SEP line: expected it to start with \"SEP/1\", got \"garbage\" \
             (is something other than dipus on the other end?)\n",
        ),
        (
            b"SEP/1 BOGUS\n",
            "SEP/1 400 bad request: unknown verb \"BOGUS\"; expected LIST, CONNECT, WATCH, PING or FORWARD \
             (upper case)\n",
        ),
        (
            b"SEP/1 CONNECT\n",
            "SEP/1 400 bad request: CONNECT needs a service path, e.g. \"SEP/1 CONNECT text/plain/sorter.hosta..0\"\n",
        ),
        (
            b"SEP/1  PING\n",
            "SEP/1 400 bad request: fields must be separated by exactly one space, with none leading or trailing: \
             \"SEP/1  PING\"\n",
        ),
        (
            b"SEP/1 PING\0\n",
            "SEP/1 400 bad request: NUL byte at position 10 in \"SEP/1 PING\\x00\"; SEP lines are printable text\n",
        ),
    ];
    // All of them held open (no half-close) while a good client is served.
    let mut hostile: Vec<Raw> = cases.iter().map(|(request, _)| Raw::request(port, request)).collect();
    assert_sorter_works(&root, &sorter_uri(port));
    for ((request, expected), raw) in cases.iter().zip(&mut hostile) {
        assert_eq!(raw.rest(DEFAULT_TIMEOUT), *expected, "reply to {:?}", String::from_utf8_lossy(request));
    }
}

#[test]
fn an_over_long_line_gets_400_as_soon_as_4096_bytes_are_in() {
    let root = sorter_root();
    let port = start_exporter(&root, &[]);
    let started = Instant::now();
    let mut raw = Raw::request(port, &[b'x'; 5000]);
    assert_sorter_works(&root, &sorter_uri(port));
    assert_eq!(raw.rest(DEFAULT_TIMEOUT), "SEP/1 400 bad request: request line too long\n");
    // Judged on its length, not by the 10 s request timeout.
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[test]
fn a_request_line_unfinished_after_10_s_gets_400_and_a_close() {
    let root = sorter_root();
    let port = start_exporter(&root, &[]);
    let started = Instant::now();
    let mut raw = Raw::request(port, b"SEP/1 LI");
    assert_sorter_works(&root, &sorter_uri(port));
    let reply = raw.rest(Duration::from_secs(15));
    let elapsed = started.elapsed();
    assert_eq!(reply, "SEP/1 400 bad request: request timeout\n");
    assert!((Duration::from_millis(9500)..Duration::from_secs(12)).contains(&elapsed), "after {elapsed:?}");
}

#[test]
fn a_request_cut_off_by_the_end_of_data_gets_400_at_once_and_a_lingering_peer_is_let_go() {
    let root = sorter_root();
    let port = start_exporter(&root, &["--max-conns", "1"]);
    // The probe that saw the exporter start frees the one slot only once
    // the exporter has read its close; a connection made before that is
    // turned away, so the first request waits for the slot.
    let (cut, reply) = answered_once_a_slot_is_free(port, b"SEP/1 PI", true);
    assert_eq!(reply, "SEP/1 400 bad request: the request line ends without a line feed\n");
    drop(cut);
    // A peer that has its answer but keeps the connection open holds the
    // only slot for the 5 s linger, not for the 30 s stall timer.
    let (held, answer) = answered_once_a_slot_is_free(port, b"SEP/1 PING\n", false);
    assert_eq!(answer, "SEP/1 200 OK\n");
    let answered = Instant::now();
    assert_eq!(
        Raw::request(port, b"SEP/1 PING\n").rest(DEFAULT_TIMEOUT),
        "SEP/1 503 service unavailable: too many connections\n"
    );
    wait_until(Duration::from_secs(15), "the lingering peer's slot is free", || {
        Raw::request(port, b"SEP/1 PING\n").rest(DEFAULT_TIMEOUT) == "SEP/1 200 OK\n"
    });
    eprintln!("slot free {:?} after the answer", answered.elapsed());
    drop(held);
}

#[test]
fn paths_leaving_exported_are_refused_before_the_filesystem_is_asked() {
    let root = sorter_root();
    // A live socket in local/ that anyone may connect to, at a path the
    // escapes below aim for.
    let (secret, path) = listen_at(&root, "local/text/plain/secret.hosta..0");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let port = start_exporter(&root, &[]);
    let cases = [
        (
            "../local/text/plain/secret.hosta..0",
            "SEP/1 400 bad request: invalid service path \"../local/text/plain/secret.hosta..0\": it has a \"..\" \
             component, which would leave the served directory\n",
        ),
        (
            "/etc/passwd",
            "SEP/1 400 bad request: invalid service path \"/etc/passwd\": it is absolute; service paths are \
             relative to the served directory\n",
        ),
        (
            path.to_str().unwrap(),
            &format!(
                "SEP/1 400 bad request: invalid service path \"{}\": it is absolute; service paths are relative \
                 to the served directory\n",
                path.display()
            ),
        ),
        (
            "text/../../local/text/plain/secret.hosta..0",
            "SEP/1 400 bad request: invalid service path \"text/../../local/text/plain/secret.hosta..0\": it has \
             a \"..\" component, which would leave the served directory\n",
        ),
        (
            "text/./plain/sorter.hosta..0",
            "SEP/1 400 bad request: invalid service path \"text/./plain/sorter.hosta..0\": it has a \".\" \
             component\n",
        ),
        // Asked as a path of its own scope: looked for inside exported/.
        ("local/text/plain/secret.hosta..0", "SEP/1 404 no such service: local/text/plain/secret.hosta..0\n"),
    ];
    let mut hostile: Vec<Raw> =
        cases.iter().map(|(path, _)| Raw::request(port, format!("SEP/1 CONNECT {path}\n").as_bytes())).collect();
    assert_sorter_works(&root, &sorter_uri(port));
    for ((path, expected), raw) in cases.iter().zip(&mut hostile) {
        assert_eq!(raw.rest(DEFAULT_TIMEOUT), *expected, "CONNECT {path}");
    }
    assert_untouched(&secret, "local/text/plain/secret.hosta..0");
}

#[test]
fn sockets_in_exported_that_must_not_be_served_are_refused_and_not_listed() {
    let root = sorter_root();
    // Only the owner may connect: the exporter (root, often) must not
    // lend its permissions.
    let (private, path) = listen_at(&root, "exported/text/plain/private.hosta..0");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    // A symlink to a socket outside the tree.
    let outside_path = root.path().join("outside.sock");
    let outside = UnixListener::bind(&outside_path).unwrap();
    std::fs::set_permissions(&outside_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink(&outside_path, root.tree().join("exported/text/plain/link.hosta..0")).unwrap();
    // A symlinked protocol directory leading into local/.
    let (secret, secret_path) = listen_at(&root, "local/text/plain/secret.hosta..0");
    std::fs::set_permissions(&secret_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::symlink(root.tree().join("local/text"), root.tree().join("exported/evil")).unwrap();
    // Not a socket at all.
    std::fs::write(root.tree().join("exported/text/plain/file.hosta..0"), "data\n").unwrap();
    let port = start_exporter(&root, &[]);

    let cases = [
        ("text/plain/file.hosta..0", "SEP/1 403 forbidden: not a socket: text/plain/file.hosta..0\n"),
        (
            "text/plain/private.hosta..0",
            "SEP/1 403 forbidden: the socket's mode does not let others connect: text/plain/private.hosta..0\n",
        ),
        ("text/plain/link.hosta..0", "SEP/1 403 forbidden: symlinks are not followed: text/plain/link.hosta..0\n"),
        ("evil/plain/secret.hosta..0", "SEP/1 403 forbidden: symlinks are not followed: evil/plain/secret.hosta..0\n"),
    ];
    let mut hostile: Vec<Raw> =
        cases.iter().map(|(path, _)| Raw::request(port, format!("SEP/1 CONNECT {path}\n").as_bytes())).collect();
    assert_sorter_works(&root, &sorter_uri(port));
    for ((path, expected), raw) in cases.iter().zip(&mut hostile) {
        assert_eq!(raw.rest(DEFAULT_TIMEOUT), *expected, "CONNECT {path}");
    }
    assert_eq!(Raw::request(port, b"SEP/1 LIST\n").rest(DEFAULT_TIMEOUT), "SEP/1 200 OK\ntext/plain/sorter.hosta..0\n");
    let mut watch = Raw::request(port, b"SEP/1 WATCH\n");
    for expected in ["SEP/1 200 OK\n", "+ text/plain/sorter.hosta..0\n", "= synced\n"] {
        assert_eq!(watch.line(DEFAULT_TIMEOUT), expected);
    }
    assert_untouched(&private, "the 0700 socket");
    assert_untouched(&outside, "the socket outside the tree");
    assert_untouched(&secret, "the socket behind the symlinked directory");
}

/// The exporter checks a socket, then connects to it: a name that turns
/// from a public socket into a symlink to a private one in between must
/// not get a client into the private one. A thread swaps the name back
/// and forth while CONNECTs for it come one after another.
#[test]
fn a_name_swapped_for_a_symlink_while_it_is_checked_never_reaches_the_private_socket() {
    let root = sorter_root();
    let dir = root.tree().join("exported/text/plain");
    let (private, private_path) = listen_at(&root, "exported/text/plain/private.hosta..0");
    std::fs::set_permissions(&private_path, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (public, public_path) = listen_at(&root, "exported/text/plain/public.hosta..0");
    std::fs::set_permissions(&public_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    public.set_nonblocking(true).unwrap();
    private.set_nonblocking(true).unwrap();
    let port = start_exporter(&root, &[]);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (dir, stop) = (dir.clone(), stop.clone());
        std::thread::spawn(move || {
            let (bait, real, link) = (dir.join("bait.hosta..0"), dir.join(".real"), dir.join(".link"));
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::hard_link(dir.join("public.hosta..0"), &real);
                let _ = std::fs::rename(&real, &bait);
                let _ = std::os::unix::fs::symlink("private.hosta..0", &link);
                let _ = std::fs::rename(&link, &bait);
                swaps += 1;
            }
            swaps
        })
    };
    let (mut answers, mut reached_public) = (std::collections::BTreeMap::<String, u32>::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        let mut raw = Raw::request(port, b"SEP/1 CONNECT text/plain/bait.hosta..0\n");
        raw.0.shutdown(Shutdown::Write).unwrap();
        let status = raw.line(DEFAULT_TIMEOUT);
        // Connected: to which socket? (Dropping it ends the relay.)
        let connected_by = Instant::now() + DEFAULT_TIMEOUT;
        while status == "SEP/1 200 OK\n" && Instant::now() < connected_by {
            if private.accept().is_ok() {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                swapper.join().unwrap();
                panic!("the exporter connected a client to the 0700 socket; answers so far: {answers:?}");
            }
            if public.accept().is_ok() {
                reached_public += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        *answers.entry(status + &raw.rest(DEFAULT_TIMEOUT)).or_default() += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    // The race was run: both states of the name were seen.
    assert!(swaps > 1000 && reached_public > 0, "swaps {swaps}, public reached {reached_public}, {answers:?}");
    let symlinked = "SEP/1 403 forbidden: symlinks are not followed: text/plain/bait.hosta..0\n";
    assert!(answers.contains_key(symlinked), "{answers:?}");
    assert_untouched(&private, "the 0700 socket");
}

#[test]
fn a_hard_link_to_a_socket_bound_outside_exported_is_refused() {
    let root = sorter_root();
    // The same inode as a socket of local/: it passes every check on the
    // file, but its listener was bound elsewhere.
    let (_bound, bound_path) = listen_at(&root, "local/text/plain/bound.hosta..0");
    std::fs::set_permissions(&bound_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::hard_link(&bound_path, root.tree().join("exported/text/plain/hard.hosta..0")).unwrap();
    let port = start_exporter(&root, &[]);
    let mut hostile = Raw::request(port, b"SEP/1 CONNECT text/plain/hard.hosta..0\n");
    assert_sorter_works(&root, &sorter_uri(port));
    assert_eq!(
        hostile.rest(DEFAULT_TIMEOUT),
        "SEP/1 403 forbidden: the socket is bound elsewhere: text/plain/hard.hosta..0\n"
    );
}

#[test]
fn the_connection_cap_answers_503_and_the_held_slots_still_work() {
    let root = sorter_root();
    export(&root, "cat", "echo/text/plain", "exported/text/plain/echo.hosta..0");
    let port = start_exporter(&root, &["--max-conns", "3"]);

    // A good client in the middle of its exchange holds one slot...
    let mut client = ChildGuard::spawn(
        root.cmd("dcat")
            .arg(format!("sep://127.0.0.1:{port}/echo"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut stdin = client.0.stdin.take().unwrap();
    let mut lines = LineReader::new(client.0.stdout.take().unwrap());
    stdin.write_all(b"first\n").unwrap();
    lines.expect_line("first", DEFAULT_TIMEOUT);
    // ...two idle peers the others.
    let mut idle: Vec<Raw> = (0..2).map(|_| Raw::connect(port)).collect();
    assert_eq!(
        Raw::request(port, b"SEP/1 PING\n").rest(DEFAULT_TIMEOUT),
        "SEP/1 503 service unavailable: too many connections\n"
    );
    // The good client goes on undisturbed.
    stdin.write_all(b"second\n").unwrap();
    drop(stdin);
    assert_eq!(lines.rest(DEFAULT_TIMEOUT), (vec!["second".to_string()], true));
    let status = client.wait_timeout(DEFAULT_TIMEOUT).expect("dcat exits");
    let mut stderr = String::new();
    client.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!((status.code(), stderr.as_str()), (Some(0), ""));

    // Three idle peers: a fourth is refused, and served once one leaves.
    idle.push(Raw::connect(port));
    assert_eq!(
        Raw::request(port, b"SEP/1 PING\n").rest(DEFAULT_TIMEOUT),
        "SEP/1 503 service unavailable: too many connections\n"
    );
    let gone = idle.pop().unwrap();
    gone.0.shutdown(Shutdown::Both).unwrap();
    drop(gone);
    wait_until(DEFAULT_TIMEOUT, "a slot is free again", || {
        Raw::request(port, b"SEP/1 PING\n").rest(DEFAULT_TIMEOUT) == "SEP/1 200 OK\n"
    });
    // The idle ones were never answered: their request time is not over.
    for raw in &mut idle {
        raw.0.set_nonblocking(true).unwrap();
        let mut byte = [0u8];
        assert!(matches!(raw.0.read(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock));
    }
}

/// Closes `stream` with a reset (SO_LINGER 0), as a crashed or killed
/// peer's kernel would.
fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt reads one linger struct from a live local.
    let set = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "SO_LINGER");
}

#[test]
fn peers_that_reset_free_their_slots_though_the_service_never_answers() {
    let root = TestRoot::new().with_host("hosta");
    // A service that accepts and never reads, writes or closes.
    let (listener, _path) = listen_at(&root, "exported/text/plain/silent.hosta..0");
    std::fs::set_permissions(root.tree().join("exported/text/plain/silent.hosta..0"), PermissionsExt::from_mode(0o666))
        .unwrap();
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept() {
            held.push(stream);
            if held.len() == 3 {
                return held;
            }
        }
        held
    });
    let port = start_exporter(&root, &["--max-conns", "3"]);
    for _ in 0..3 {
        let mut raw = Raw::request(port, b"SEP/1 CONNECT text/plain/silent.hosta..0\n");
        assert_eq!(raw.line(DEFAULT_TIMEOUT), "SEP/1 200 OK\n");
        raw.send(b"a request the service never reads\n");
        reset(raw.0);
    }
    let held = holder.join().unwrap();
    assert_eq!(held.len(), 3, "the service was not connected to three times");
    // Each slot is freed by the reset, not when the service speaks.
    wait_until(DEFAULT_TIMEOUT, "the reset connections' slots are free", || {
        Raw::request(port, b"SEP/1 PING\n").rest(DEFAULT_TIMEOUT) == "SEP/1 200 OK\n"
    });
    // And the service's side was ended with them: it sees the end of data.
    for mut stream in held {
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT)).unwrap();
        let mut got = Vec::new();
        let ended = stream.read_to_end(&mut got);
        assert!(ended.is_ok(), "the service's connection was not ended: {ended:?}");
        assert!(b"a request the service never reads\n".starts_with(&got), "{:?}", String::from_utf8_lossy(&got));
    }
}

#[test]
fn peers_outside_the_allow_list_get_403() {
    // IPv6 loopback is the allowed peer, IPv4 loopback the refused one.
    if !require(std::net::TcpListener::bind("[::1]:0").is_ok(), "needs IPv6 loopback (::1)") {
        return;
    }
    let root = sorter_root();
    let port = start_exporter(&root, &["--bind", "::1", "--allow", "10.0.0.0/8", "--allow", "::1/128"]);
    let mut refused = Raw::request(port, b"SEP/1 LIST\n");
    assert_sorter_works(&root, &format!("sep://[::1]:{port}/sorter"));
    assert_eq!(refused.rest(DEFAULT_TIMEOUT), "SEP/1 403 forbidden: address not allowed\n");
    let out = dcat(&root, &[&sorter_uri(port)], Some(b"x\n"));
    assert_error(&out, 74, "dcat", &[&format!("127.0.0.1:{port}"), "SEP/1 403 forbidden: address not allowed"]);
}

#[test]
fn watch_over_raw_tcp_lists_syncs_keeps_alive_and_follows_changes() {
    let root = sorter_root();
    // Only "other"-connectable sockets are announced; this one is not.
    let private = root.spawn(root.cmd("dipus-export-pipe").args(["--mode", "0600", "cat", "private/text/plain"]));
    wait_for_socket(&root, private, &root.tree().join("exported/text/plain/private.hosta..0"));
    let port = start_exporter(&root, &[]);
    let mut watch = Raw::request(port, b"SEP/1 WATCH\n");
    for expected in ["SEP/1 200 OK\n", "+ text/plain/sorter.hosta..0\n", "= synced\n"] {
        assert_eq!(watch.line(DEFAULT_TIMEOUT), expected);
    }
    let synced = Instant::now();
    assert_sorter_works(&root, &sorter_uri(port));
    assert_eq!(watch.line(Duration::from_millis(6500)), ".\n");
    let quiet = synced.elapsed();
    assert!(quiet >= Duration::from_secs(4), "keepalive after only {quiet:?}");

    // Changes, with keepalives possibly in between.
    let next_change = |watch: &mut Raw| loop {
        let line = watch.line(Duration::from_secs(7));
        if line != ".\n" {
            return line;
        }
    };
    let late = root.spawn(root.cmd("dipus-export-pipe").args(["--mode", "0600", "cat", "late/text/plain"]));
    wait_for_socket(&root, late, &root.tree().join("exported/text/plain/late.hosta..0"));
    let echo = export(&root, "cat", "echo/text/plain", "exported/text/plain/echo.hosta..0");
    assert_eq!(next_change(&mut watch), "+ text/plain/echo.hosta..0\n");
    // Services never announced are not announced gone either, nor is a
    // namesake in local/ (not offered) taken for the exported one.
    let namesake = root.spawn(root.cmd("dipus-local-pipe").args(["cat", "echo/text/plain"]));
    wait_for_socket(&root, namesake, &root.tree().join("local/text/plain/echo.hosta..0"));
    stop(&root, private, "TERM");
    stop(&root, late, "TERM");
    stop(&root, namesake, "TERM");
    let marker = export(&root, "cat", "marker/text/plain", "exported/text/plain/marker.hosta..0");
    assert_eq!(next_change(&mut watch), "+ text/plain/marker.hosta..0\n");
    stop(&root, echo, "TERM");
    assert_eq!(next_change(&mut watch), "- text/plain/echo.hosta..0\n");
    stop(&root, marker, "TERM");
    assert_eq!(next_change(&mut watch), "- text/plain/marker.hosta..0\n");

    // A socket whose mode is set after it appears (socat's mode=) is
    // announced once others may connect, and gone once they may not.
    let (chmod, path) = listen_at(&root, "exported/text/plain/chmod.hosta..0");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(next_change(&mut watch), "+ text/plain/chmod.hosta..0\n");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(next_change(&mut watch), "- text/plain/chmod.hosta..0\n");
    drop(chmod);
}

/// The pid of the exporter serving `port`, from /proc.
fn exporter_pid(port: u16) -> Option<u32> {
    let wanted = port.to_string();
    std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_exporter = args.first().is_some_and(|a| a.ends_with(b"dipus-exporter"));
        (is_exporter && args.contains(&wanted.as_bytes())).then_some(pid)
    })
}

#[test]
fn the_exporter_runs_as_the_user_it_is_told_once_it_has_bound_and_still_serves() {
    if !require(have_root(), "needs root to drop privileges") {
        return;
    }
    let root = sorter_root();
    let port = start_exporter(&root, &["--user", "nobody"]);
    let pid = exporter_pid(port).expect("the exporter's pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = |key: &str| -> Vec<String> {
        let line = status.lines().find(|line| line.starts_with(key)).unwrap();
        line.split_whitespace().skip(1).map(String::from).collect()
    };
    let nobody = std::process::Command::new("id").args(["-u", "nobody"]).output().unwrap();
    let nobody = String::from_utf8(nobody.stdout).unwrap().trim().to_string();
    assert_eq!(ids("Uid:"), vec![nobody.clone(); 4], "real, effective, saved and fs uid");
    assert!(!ids("Gid:").contains(&"0".to_string()), "no root group left: {:?}", ids("Gid:"));
    assert_eq!(ids("Groups:").iter().filter(|g| *g == "0").count(), 0, "no supplementary root group");
    assert_sorter_works(&root, &sorter_uri(port));
}

#[test]
fn the_exporter_exits_0_on_sigterm_sigint_and_sighup() {
    // As the other servers do: a supervisor or a closed terminal is no
    // failure of the exporter's.
    for signal in ["TERM", "INT", "HUP"] {
        let root = sorter_root();
        let (pid, _) = common::service::spawn_exporter(&root, &[]);
        let status = stop(&root, pid, signal);
        assert_eq!(status.code(), Some(0), "SIG{signal}: {status}");
    }
}
