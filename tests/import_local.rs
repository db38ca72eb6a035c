//! dipus-import on loopback: two trees, one exporting on a free port, one
//! importing. When the import command returns, what it mirrors is there;
//! in the foreground it stops on SIGTERM and takes exactly its proxies
//! along; a second import of the same exporter, an unreachable or refusing
//! exporter fail with a message; `--mode` and a selector shape what is
//! made. Also `dipus serve --stdio`, the same protocol on stdin/stdout.

mod common;

use common::proc;
use common::proc::Background;
use common::service::{assert_error, assert_success, dcat, listen_at, sockets, start_exporter, stop, wait_for_socket};
use common::*;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The exporting host: a tree for `hosta` with an exported sorter.
fn exporting_root() -> TestRoot {
    let root = TestRoot::new().with_host("hosta");
    export(&root, "LC_ALL=C sort", "sorter/text/plain");
    root
}

/// Starts `dipus-export-pipe --mode 0666 COMMAND NAME/PROTO` and waits for
/// its socket; returns the server's pid.
fn export(root: &TestRoot, command: &str, spec: &str) -> u32 {
    let (name, protocol) = spec.split_once('/').unwrap();
    let pid = root.spawn(root.cmd("dipus-export-pipe").args(["--mode", "0666", command, spec]));
    wait_for_socket(root, pid, &root.tree().join(format!("exported/{protocol}/{name}.{}..0", root.host)));
    pid
}

/// Runs `dipus-import ARGS…` as a shell script would: done the moment the
/// command exits, whatever it left running in the background (its output
/// goes to files, so nothing waits for a pipe the background child holds).
fn import_cmd(root: &TestRoot, args: &[&str]) -> Output {
    let (stdout, stderr) = (root.path().join("import.out"), root.path().join("import.err"));
    let mut child = root
        .cmd("dipus-import")
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn dipus-import");
    let pid = child.id();
    // A blocking wait (no polling delay) on a thread, bounded here.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait()));
    let status = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(status) => status.expect("wait for dipus-import"),
        Err(_) => {
            // Not reaped yet (the thread still waits), so the pid is its own.
            proc::signal(&[pid], "KILL");
            panic!("dipus-import {args:?} did not return within 20 s");
        }
    };
    Output { status, stdout: std::fs::read(&stdout).unwrap(), stderr: std::fs::read(&stderr).unwrap() }
}

/// `dipus-import --pidfile … URI`, asserted to succeed quietly; returns
/// the importer now running in the background.
fn import(root: &TestRoot, extra: &[&str], uri: &str) -> Background {
    let pidfile = root.path().join(format!("import-{}.pid", next_id()));
    let out = import_cmd(root, &[&["--pidfile", pidfile.to_str().unwrap()], extra, &[uri]].concat());
    assert_success(&out, &format!("dipus-import {uri}"));
    assert_eq!((out.stdout.as_slice(), String::from_utf8_lossy(&out.stderr).as_ref()), (&b""[..], ""));
    Background::from_pidfile(&pidfile)
}

fn imported(root: &TestRoot) -> Vec<String> {
    sockets(&root.tree().join("imported"))
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).mode() & 0o7777
}

/// What `selector` answers to unsorted fruit on `root` (a sorter).
fn assert_sorts(root: &TestRoot, selector: &str) {
    let out = dcat(root, &[selector], Some(b"pear\napple\nfig\n"));
    assert_success(&out, &format!("dcat {selector}"));
    assert_eq!(
        (String::from_utf8_lossy(&out.stdout).as_ref(), String::from_utf8_lossy(&out.stderr).as_ref()),
        ("apple\nfig\npear\n", ""),
        "dcat {selector}"
    );
}

fn uri(port: u16) -> String {
    format!("sep://127.0.0.1:{port}")
}

#[test]
fn the_proxies_are_in_place_when_the_import_returns() {
    let a = exporting_root();
    export(&a, "cat", "echo/text/plain");
    let port = start_exporter(&a, &[]);
    let b = TestRoot::new().with_host("hostb");
    let importer = import(&b, &[], &uri(port));
    // No waiting: the command returned after the first sync.
    assert_eq!(imported(&b), ["text/plain/echo.hosta..0", "text/plain/sorter.hosta..0"]);
    assert_eq!(mode(&b.tree().join("imported/text/plain/sorter.hosta..0")), 0o666);
    assert_sorts(&b, "sorter.hosta");

    // Stopped, the background importer takes its pidfile along, while
    // that still names it.
    let pidfiles = || {
        let mut names: Vec<_> = std::fs::read_dir(b.path())
            .unwrap()
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".pid"))
            .collect();
        names.sort();
        names
    };
    assert_eq!(pidfiles().len(), 1);
    assert!(importer.terminate(DEFAULT_TIMEOUT), "the importer exits on SIGTERM");
    assert_eq!(pidfiles(), Vec::<String>::new(), "the pidfile outlived the importer");
    assert_eq!(imported(&b), Vec::<String>::new());
}

#[test]
fn a_foreground_import_removes_exactly_its_proxies_on_sigterm() {
    let a = exporting_root();
    export(&a, "cat", "echo/text/plain");
    let port = start_exporter(&a, &[]);
    let b = TestRoot::new().with_host("hostb");
    // Someone else's sockets, in imported/ and in local/.
    let (_other, _) = listen_at(&b, "imported/text/plain/other.hostc..0");
    let (_mine, _) = listen_at(&b, "local/text/plain/mine.hostb..0");
    let pidfile = b.path().join("import.pid");
    let mut importer = ChildGuard::spawn(
        b.cmd("dipus-import")
            .args(["-f", "--pidfile", pidfile.to_str().unwrap(), &uri(port)])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    // In the foreground, the pidfile is written once the first sync is done.
    wait_until(DEFAULT_TIMEOUT, "the pidfile", || pidfile.exists());
    assert_eq!(std::fs::read_to_string(&pidfile).unwrap(), format!("{}\n", importer.pid()));
    assert_eq!(imported(&b), ["text/plain/echo.hosta..0", "text/plain/other.hostc..0", "text/plain/sorter.hosta..0"]);
    assert_sorts(&b, "sorter.hosta");

    let status = importer.terminate(DEFAULT_TIMEOUT).expect("the importer exits on SIGTERM");
    let mut output = (String::new(), String::new());
    importer.0.stdout.take().unwrap().read_to_string(&mut output.0).unwrap();
    importer.0.stderr.take().unwrap().read_to_string(&mut output.1).unwrap();
    assert_eq!((status.code(), output.0.as_str(), output.1.as_str()), (Some(0), "", ""));
    assert_eq!(imported(&b), ["text/plain/other.hostc..0"]);
    assert!(!pidfile.exists(), "the pidfile outlived the importer");
    assert_eq!(sockets(&b.tree().join("local")), ["text/plain/mine.hostb..0"]);
    // The exporter's own services are of course untouched.
    assert_eq!(sockets(&a.tree().join("exported")), ["text/plain/echo.hosta..0", "text/plain/sorter.hosta..0"]);
}

#[test]
fn importing_the_same_exporter_twice_is_refused() {
    let a = exporting_root();
    let port = start_exporter(&a, &[]);
    let b = TestRoot::new().with_host("hostb");
    let first = import(&b, &[], &uri(port));
    let lock = b.tree().join(format!("imported/.import-127.0.0.1_3a{port}.lock"));
    for extra in [&[][..], &["-f"][..]] {
        let out = import_cmd(&b, &[extra, &[&uri(port)]].concat());
        let stderr = assert_error(&out, 1, "dipus-import", &[]);
        assert_eq!(
            stderr,
            format!(
                "dipus-import: sep://127.0.0.1:{port} is already being imported (lock {} is held)\n",
                lock.display()
            )
        );
    }
    // The same exporter by another name: localhost is 127.0.0.1 too.
    let out = import_cmd(&b, &["-f", &format!("sep://localhost:{port}")]);
    let stderr = assert_error(&out, 1, "dipus-import", &[]);
    assert_eq!(
        stderr,
        format!("dipus-import: sep://localhost:{port} is already being imported (lock {} is held)\n", lock.display())
    );
    // The first import goes on unharmed.
    assert!(first.is_alive());
    assert_eq!(imported(&b), ["text/plain/sorter.hosta..0"]);
    assert_sorts(&b, "sorter.hosta");
}

#[test]
fn an_unreachable_exporter_fails_at_once_naming_it() {
    let b = TestRoot::new().with_host("hostb");
    // Nothing listens there (a free port a moment ago).
    let port = free_port();
    let started = Instant::now();
    let out = import_cmd(&b, &[&uri(port)]);
    let elapsed = started.elapsed();
    let stderr = assert_error(&out, 74, "dipus-import", &[]);
    assert_eq!(
        stderr,
        format!("dipus-import: cannot import: cannot connect to sep://127.0.0.1:{port}: Connection refused (os error 111)\n")
    );
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    assert_eq!(imported(&b), Vec::<String>::new());
}

#[test]
fn an_exporter_that_refuses_fails_the_import() {
    let a = exporting_root();
    let port = start_exporter(&a, &["--allow", "10.0.0.0/8"]);
    let b = TestRoot::new().with_host("hostb");
    let out = import_cmd(&b, &[&uri(port)]);
    let stderr = assert_error(&out, 74, "dipus-import", &[]);
    assert_eq!(
        stderr,
        format!(
            "dipus-import: cannot import: sep://127.0.0.1:{port} refused the import: SEP/1 403 forbidden: address \
             not allowed\n"
        )
    );
    assert_eq!(imported(&b), Vec::<String>::new());
}

/// Importing this very host (its own exporter, on loopback) is refused,
/// naming the reason: its exported services would be mirrored back into
/// it, and `dls` would show each twice.
#[test]
fn importing_this_very_host_is_refused() {
    let a = exporting_root();
    let port = start_exporter(&a, &[]);
    for spelling in [uri(port), format!("sep://localhost:{port}")] {
        let out = import_cmd(&a, &[&spelling]);
        let stderr = assert_error(&out, 1, "dipus-import", &[]);
        assert_eq!(
            stderr,
            format!("dipus-import: {spelling} is this host (hosta): importing it would mirror its own services\n")
        );
        assert_eq!(imported(&a), Vec::<String>::new());
    }
    // Another host of the same machine is another host.
    let b = TestRoot::new().with_host("hostb");
    let _importer = import(&b, &[], &uri(port));
    assert_eq!(imported(&b), ["text/plain/sorter.hosta..0"]);
}

#[test]
fn proxies_take_the_mode_asked_for() {
    let a = exporting_root();
    let port = start_exporter(&a, &[]);
    let b = TestRoot::new().with_host("hostb");
    let _importer = import(&b, &["--mode", "0600"], &uri(port));
    assert_eq!(mode(&b.tree().join("imported/text/plain/sorter.hosta..0")), 0o600);
    assert_sorts(&b, "sorter.hosta");
}

#[test]
fn a_selector_imports_only_the_services_it_matches() {
    let a = exporting_root();
    export(&a, "LC_ALL=C sort", "sorter/application/x-lines");
    export(&a, "cat", "echo/text/plain");
    let port = start_exporter(&a, &[]);
    let b = TestRoot::new().with_host("hostb");
    let _importer = import(&b, &[], &format!("{}/sorter", uri(port)));
    assert_eq!(imported(&b), ["application/x-lines/sorter.hosta..0", "text/plain/sorter.hosta..0"]);

    // Kept in sync through the same filter: a new echo is not mirrored,
    // a new sorter is. Changes arrive in order, so once the sorter is
    // here, the echo would be too.
    let echo = a.spawn(a.cmd("dipus-export-pipe").args(["--mode", "0666", "cat", "echo/application/x-lines"]));
    wait_for_socket(&a, echo, &a.tree().join("exported/application/x-lines/echo.hosta..0"));
    let sorter = a.spawn(a.cmd("dipus-export-pipe").args(["--mode", "0666", "LC_ALL=C sort", "sorter/text/plain"]));
    wait_for_socket(&a, sorter, &a.tree().join("exported/text/plain/sorter.hosta..1"));
    let second = b.tree().join("imported/text/plain/sorter.hosta..1");
    wait_until(Duration::from_millis(1500), "the second sorter is imported", || {
        std::fs::symlink_metadata(&second).is_ok()
    });
    assert_eq!(
        imported(&b),
        ["application/x-lines/sorter.hosta..0", "text/plain/sorter.hosta..0", "text/plain/sorter.hosta..1"]
    );
    assert_sorts(&b, "sorter.hosta..1");
    stop(&a, sorter, "TERM");
    wait_until(Duration::from_millis(1500), "the second sorter is gone", || {
        std::fs::symlink_metadata(&second).is_err()
    });
}

/// `dipus serve --stdio` with `input` on stdin; returns stdout.
fn serve_stdio(root: &TestRoot, input: &[u8]) -> String {
    let out = run_with_timeout(root.cmd("dipus").args(["serve", "--stdio"]), Some(input), DEFAULT_TIMEOUT);
    assert_success(&out, &format!("dipus serve --stdio <{:?}", String::from_utf8_lossy(input)));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn serve_stdio_answers_list_connect_and_ping() {
    let root = exporting_root();
    let local =
        root.spawn(root.cmd("dipus-local-pipe").args(["--mode", "0600", "LC_ALL=C sort -r", "rsorter/text/plain"]));
    wait_for_socket(&root, local, &root.tree().join("local/text/plain/rsorter.hosta..0"));
    // Over stdio the user's own permissions apply, not the "other" rule.
    let private = root.spawn(root.cmd("dipus-export-pipe").args(["--mode", "0600", "cat", "private/text/plain"]));
    wait_for_socket(&root, private, &root.tree().join("exported/text/plain/private.hosta..0"));

    assert_eq!(serve_stdio(&root, b"SEP/1 PING\n"), "SEP/1 200 OK\n");
    assert_eq!(
        serve_stdio(&root, b"SEP/1 LIST\n"),
        "SEP/1 200 OK\nlocal/text/plain/rsorter.hosta..0\nexported/text/plain/private.hosta..0\n\
         exported/text/plain/sorter.hosta..0\n"
    );
    assert_eq!(serve_stdio(&root, b"SEP/1 LIST rsorter\n"), "SEP/1 200 OK\nlocal/text/plain/rsorter.hosta..0\n");
    // The payload follows the request line; the end of stdin is the
    // half-close the sorter waits for.
    assert_eq!(
        serve_stdio(&root, b"SEP/1 CONNECT exported/text/plain/sorter.hosta..0\npear\napple\nfig\n"),
        "SEP/1 200 OK\napple\nfig\npear\n"
    );
    assert_eq!(
        serve_stdio(&root, b"SEP/1 CONNECT local/text/plain/rsorter.hosta..0\npear\napple\nfig\n"),
        "SEP/1 200 OK\npear\nfig\napple\n"
    );
    assert_eq!(
        serve_stdio(&root, b"SEP/1 CONNECT local/text/plain/nothing.hosta..0\n"),
        "SEP/1 404 no such service: local/text/plain/nothing.hosta..0\n"
    );
    assert_eq!(
        serve_stdio(&root, b"SEP/1 CONNECT exported/../local/text/plain/rsorter.hosta..0\n"),
        "SEP/1 400 bad request: invalid service path \"exported/../local/text/plain/rsorter.hosta..0\": it has a \
         \"..\" component, which would leave the served directory\n"
    );
}

#[test]
fn an_exporter_flooding_one_endless_line_is_given_up_without_hoarding_it() {
    // A fake exporter: a WATCH accepted, then bytes without a newline,
    // as fast as the importer takes them, for at most 10 s.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let flood = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("the importer connects");
        let mut request = [0u8; 64];
        let _ = stream.read(&mut request);
        let mut written = 0usize;
        let chunk = vec![b'x'; 1 << 20];
        let deadline = Instant::now() + Duration::from_secs(10);
        if stream.write_all(b"SEP/1 200 OK\n").is_ok() {
            while Instant::now() < deadline {
                match stream.write(&chunk) {
                    Ok(n) => written += n,
                    Err(_) => break,
                }
            }
        }
        written
    });
    let b = TestRoot::new().with_host("hostb");
    let out = import_cmd(&b, &["-f", &uri(port)]);
    let written = flood.join().unwrap();
    let stderr = assert_error(&out, 74, "dipus-import", &[]);
    let expected =
        format!("dipus-import: cannot import: sep://127.0.0.1:{port}: line is longer than the 4096-byte limit");
    assert!(stderr.starts_with(&expected), "{stderr}");
    // What the sockets' buffers hold, not all the flood could send.
    assert!(written < 64 << 20, "the importer took {} MiB of one line", written >> 20);
}

/// A fake exporter that syncs and then sends keepalives without a pause:
/// every read of the session has more, so an importer that reads until
/// EAGAIN never comes back to its loop (its signals, its clients) and
/// hoards the lines. It must stay small and stop on SIGTERM, taking its
/// proxy along.
#[test]
fn an_exporter_flooding_keepalives_neither_holds_the_importer_nor_fills_its_memory() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, written) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let flood = {
        let (stop, written) = (stop.clone(), written.clone());
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("the importer connects");
            let mut request = [0u8; 64];
            let _ = stream.read(&mut request);
            let chunk = b".\n".repeat(1 << 19);
            let deadline = Instant::now() + Duration::from_secs(30);
            if stream.write_all(b"SEP/1 200 OK\n+ text/plain/flood.hosta..0\n= synced\n").is_ok() {
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    match stream.write(&chunk) {
                        Ok(n) => written.fetch_add(n, Ordering::Relaxed),
                        Err(_) => break,
                    };
                }
            }
        })
    };
    let b = TestRoot::new().with_host("hostb");
    let importer = import(&b, &[], &uri(port));
    assert_eq!(imported(&b), ["text/plain/flood.hosta..0"]);
    // 8 Mi lines taken: held as they came, they would need some 300 MiB.
    wait_until(Duration::from_secs(20), "the importer to take 16 MiB of keepalives", || {
        written.load(Ordering::Relaxed) >= 16 << 20
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", importer.pid())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    let stopped_in_time = importer.terminate(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    assert!(rss_kib < 32 * 1024, "the importer grew to {} MiB under the flood", rss_kib >> 10);
    assert!(stopped_in_time, "the importer did not stop on SIGTERM within 5 s under the flood");
    assert_eq!(imported(&b), Vec::<String>::new(), "the proxy was left behind");
}

/// A fake exporter on loopback: takes one importer's request, answers it
/// with `answer` (status line first) and keeps the session open until
/// told (or 30 s); its port, the telling, and the thread.
fn exporter_answering(answer: String) -> (u16, mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (done, finished) = mpsc::channel::<()>();
    let exporter = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("the importer connects");
        let mut request = [0u8; 64];
        let _ = stream.read(&mut request);
        stream.write_all(answer.as_bytes()).unwrap();
        let _ = finished.recv_timeout(Duration::from_secs(30));
    });
    (port, done, exporter)
}

/// An exporter announcing more services than the importer has descriptors
/// for: the importer stops at three quarters of its limit, says so once,
/// and keeps the rest for connections (it used to bind until EMFILE and
/// warn for every service after).
#[test]
fn an_exporter_announcing_without_end_is_cut_off_before_the_descriptors_run_out() {
    let mut answer = String::from("SEP/1 200 OK\n");
    for n in 0..1000 {
        answer.push_str(&format!("+ text/plain/s{n}.hosta..0\n"));
    }
    answer.push_str("= synced\n");
    let (port, done, exporter) = exporter_answering(answer);
    let b = TestRoot::new().with_host("hostb");
    let stderr_path = b.path().join("import.err");
    let mut command = std::process::Command::new("sh");
    command
        .args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\""])
        .arg(applet_bin("dipus-import"))
        .args(["-f", &uri(port)])
        .env("DIPUS_ROOT", b.tree())
        .env("DIPUS_HOSTNAME", "hostb")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(File::create(&stderr_path).unwrap());
    let mut importer = ChildGuard::spawn(&mut command);
    let said = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    wait_until(Duration::from_secs(15), "the importer to say it stops importing", || said().contains("not importing"));
    let made = imported(&b).len();
    let descriptors = std::fs::read_dir(format!("/proc/{}/fd", importer.pid())).unwrap().count();
    assert!(importer.terminate(Duration::from_secs(5)).is_some(), "the importer did not stop");
    let _ = done.send(());
    exporter.join().unwrap();
    let stderr = said();
    assert_eq!(made, 192, "proxies made under a limit of 256 descriptors; {stderr}");
    assert!(descriptors < 224, "{descriptors} descriptors in use");
    assert_eq!(stderr.matches("not importing").count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "sep://127.0.0.1:{port}: this process's imported services hold three quarters of its descriptor \
             limit (ulimit -n); not importing text/plain/s"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("Too many open files"), "{stderr}");
    assert_eq!(imported(&b), Vec::<String>::new(), "proxies left behind");
}

/// The user's own scope is trusted only while it is theirs alone (0700):
/// open to others, `dipus serve` refuses to connect into it, as it
/// refuses to list it, and the exporter, which never offers it, still
/// lists what it does offer.
#[test]
fn a_private_scope_open_to_others_is_refused_by_serve_and_no_concern_of_the_exporter() {
    use std::os::unix::fs::PermissionsExt;
    let root = exporting_root();
    let uid = common::service::euid();
    let user = common::service::user_name(uid).unwrap_or_else(|| format!("uid{uid}"));
    let wire = format!("{user}/text/plain/mine.hosta..0");
    let (mine, _path) = listen_at(&root, &wire);
    std::fs::set_permissions(root.tree().join(&user), std::fs::Permissions::from_mode(0o777)).unwrap();

    let answer = serve_stdio(&root, format!("SEP/1 CONNECT {wire}\nhello\n").as_bytes());
    assert!(answer.starts_with("SEP/1 403 forbidden: ") && answer.ends_with(&format!(": {wire}\n")), "{answer:?}");
    // No probe socket in such a scope: FORWARD is not offered, and the
    // client falls back to CONNECT, refused as above.
    let answer = serve_stdio(&root, b"SEP/1 FORWARD mine\n");
    assert!(
        answer.starts_with("SEP/1 400 bad request: forwarding unavailable: ") && answer.lines().count() == 1,
        "{answer:?}"
    );
    mine.set_nonblocking(true).unwrap();
    assert!(mine.accept().is_err(), "serve connected into a scope open to others");

    let port = start_exporter(&root, &[]);
    let out = run_with_timeout(root.cmd("dls").arg(format!("sep://127.0.0.1:{port}")), None, DEFAULT_TIMEOUT);
    assert_success(&out, "dls of the exporter");
    let listed = String::from_utf8_lossy(&out.stdout).lines().any(|line| {
        line.split_whitespace().eq(["sorter", "hosta", "0", "text/plain", &format!("sep://127.0.0.1:{port}")])
    });
    assert!(listed, "{out:?}");
}

/// `dipus serve --stdio` keeps SEP's 10 s request deadline: a client that
/// sends half a line and then nothing gets 400 and the session ends.
#[test]
fn serve_stdio_answers_a_request_unfinished_after_10_s_with_400() {
    let root = exporting_root();
    let mut serve = ChildGuard::spawn(
        root.cmd("dipus")
            .args(["serve", "--stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut stdin = serve.0.stdin.take().unwrap();
    stdin.write_all(b"SEP/1 PI").unwrap();
    let mut lines = LineReader::new(serve.0.stdout.take().unwrap());
    lines.expect_line("SEP/1 400 bad request: request timeout", Duration::from_secs(15));
    let status = serve.wait_timeout(DEFAULT_TIMEOUT).expect("serve exits after its answer");
    let mut stderr = String::new();
    serve.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!((status.code(), stderr.as_str()), (Some(1), "serve: request timeout\n"));
    drop(stdin);
}

/// An importer stopped (SIGSTOP, as a suspend stops it) for longer than
/// its 15 s silence limit while the exporter stays healthy: on SIGCONT the
/// exporter's keepalives are already waiting, so the session is alive and
/// its proxies stay in place throughout (it used to judge the silence
/// before reading them, drop the session and reset waiting clients).
#[test]
fn an_importer_continued_after_a_long_stop_keeps_its_healthy_session() {
    let a = exporting_root();
    let port = start_exporter(&a, &[]);
    let b = TestRoot::new().with_host("hostb");
    let importer = import(&b, &[], &uri(port));
    let proxy = b.tree().join("imported/text/plain/sorter.hosta..0");
    let before = std::fs::symlink_metadata(&proxy).unwrap().ino();
    assert!(proc::signal(&[importer.pid()], "STOP"));
    std::thread::sleep(Duration::from_secs(18));
    assert!(proc::signal(&[importer.pid()], "CONT"));
    let resumed = Instant::now();
    while resumed.elapsed() < Duration::from_secs(3) {
        let now = std::fs::symlink_metadata(&proxy).map(|meta| meta.ino()).ok();
        assert_eq!(now, Some(before), "the proxy was removed or replaced after SIGCONT");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_sorts(&b, "sorter.hosta");
}

/// An exporter announcing a path whose protocol part has the shape of a
/// service's file name (`text/plain/sorter.hosta..0/x.evil..0`) is told
/// no: its directory would take the place of the service of that name,
/// which is then imported as usual.
#[test]
fn a_protocol_shaped_like_a_service_cannot_take_its_place() {
    let answer = "SEP/1 200 OK\n+ text/plain/sorter.hosta..0/x.evil..0\n+ text/plain/sorter.hosta..0\n= synced\n";
    let (port, done, exporter) = exporter_answering(answer.to_string());
    let b = TestRoot::new().with_host("hostb");
    let stderr_path = b.path().join("import.err");
    let mut importer = ChildGuard::spawn(
        b.cmd("dipus-import").args(["-f", &uri(port)]).stdin(Stdio::null()).stderr(File::create(&stderr_path).unwrap()),
    );
    let proxy = b.tree().join("imported/text/plain/sorter.hosta..0");
    wait_until(DEFAULT_TIMEOUT, "the sorter's proxy", || common::service::is_socket(&proxy));
    assert!(importer.terminate(Duration::from_secs(5)).is_some(), "the importer did not stop");
    let _ = done.send(());
    exporter.join().unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(stderr.contains("ignoring invalid service path \"text/plain/sorter.hosta..0/x.evil..0\""), "{stderr}");
}
