//! dcat: FILEs or stdin through a service and the reply to stdout, with
//! half-close, bulk data, failover past dead sockets, exit statuses and
//! every kind of stdin and stdout.

mod common;

use common::data::{Digest, Random};
use common::service::{assert_error, assert_success, dcat, listen_at, make_dirs, serve, stale_at, wait_for_socket};
use common::*;
use std::fs::File;
use std::io::{BufWriter, ErrorKind, Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

/// Bulk transfers get longer than single commands (debug builds, 2 cores).
const BULK_TIMEOUT: Duration = Duration::from_secs(120);

fn sorter(root: &TestRoot) {
    serve(root, "LC_ALL=C sort", "sorter/text/plain", "local/text/plain/sorter.testhost..0");
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("utf-8 output")
}

#[test]
fn sort_service_answers_after_the_half_close() {
    let root = TestRoot::new();
    sorter(&root);
    // sort answers only once it has seen EOF: dcat must shut down its
    // write side and still read the reply.
    let out = dcat(&root, &["sorter"], Some(b"pear\napple\nfig\n"));
    assert_success(&out, "dcat sorter");
    assert_eq!(text(&out.stdout), "apple\nfig\npear\n");
    assert!(out.stderr.is_empty());
}

/// Writes `size` random bytes to `path`; returns their digest.
fn random_file(path: &Path, size: usize, seed: u64) -> (u64, u64) {
    let mut random = Random(seed);
    let mut digest = Digest::new();
    let mut out = BufWriter::new(File::create(path).expect("create input"));
    let mut buffer = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buffer.len());
        random.fill(&mut buffer[..n]);
        digest.update(&buffer[..n]);
        out.write_all(&buffer[..n]).expect("write input");
        left -= n;
    }
    out.flush().expect("flush input");
    digest.finish()
}

fn digest_of(mut reader: impl Read) -> (u64, u64) {
    let mut digest = Digest::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => return digest.finish(),
            Ok(n) => digest.update(&buffer[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn digest_sees_chunk_boundaries_as_one_stream() {
    let data: Vec<u8> = (0..100u8).collect();
    let mut whole = Digest::new();
    whole.update(&data);
    let mut pieces = Digest::new();
    for piece in [&data[..3], &data[3..4], &data[4..50], &data[50..]] {
        pieces.update(piece);
    }
    assert_eq!(whole.finish(), pieces.finish());
}

const BIG: usize = 256 << 20;

#[test]
fn big_random_data_comes_back_identical() {
    let root = TestRoot::new();
    serve(&root, "cat", "echo/application/octet-stream", "local/application/octet-stream/echo.testhost..0");
    let input = root.path().join("input");
    let expected = random_file(&input, BIG, 0x9e37_79b9_7f4a_7c15);
    assert_eq!(expected.0, BIG as u64);

    // From a FILE, to a regular file.
    let output = root.path().join("output");
    let mut child = ChildGuard::spawn(
        root.cmd("dcat")
            .args(["echo", input.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(File::create(&output).unwrap())
            .stderr(Stdio::inherit()),
    );
    let status = child.wait_timeout(BULK_TIMEOUT).expect("dcat FILE finishes");
    assert!(status.success(), "dcat FILE: {status}");
    assert_eq!(digest_of(File::open(&output).unwrap()), expected, "through a FILE");
    std::fs::remove_file(&output).unwrap();

    // From a stdin pipe, to a stdout pipe.
    let mut child = ChildGuard::spawn(
        root.cmd("dcat").arg("echo").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()),
    );
    let mut stdin = child.0.stdin.take().unwrap();
    let mut source = File::open(&input).unwrap();
    let writer = std::thread::spawn(move || std::io::copy(&mut source, &mut stdin).map(|_| ()));
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(digest_of(stdout)));
    // On timeout the guard kills dcat, which ends the reader thread.
    let got = rx.recv_timeout(BULK_TIMEOUT).expect("dcat through pipes finishes in time");
    writer.join().unwrap().expect("stdin fully written");
    let status = child.wait_timeout(DEFAULT_TIMEOUT).expect("dcat exits after its stdout ends");
    assert!(status.success(), "dcat stdin: {status}");
    assert_eq!(got, expected, "through stdin");
}

#[test]
fn files_and_stdin_are_sent_in_order() {
    let root = TestRoot::new();
    serve(&root, "cat", "echo/text/plain", "local/text/plain/echo.testhost..0");
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    std::fs::write(&a, "first\n").unwrap();
    std::fs::write(&b, "third\n").unwrap();
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let out = dcat(&root, &["echo", a, "-", b, a], Some(b"second\n"));
    assert_success(&out, "dcat echo a - b a");
    assert_eq!(text(&out.stdout), "first\nsecond\nthird\nfirst\n");
    // `-` right after SERVICE too (argh alone would take it for an option).
    let out = dcat(&root, &["echo", "-", b], Some(b"second\n"));
    assert_success(&out, "dcat echo - b");
    assert_eq!(text(&out.stdout), "second\nthird\n");
    let out = dcat(&root, &["echo", "-"], Some(b"alone\n"));
    assert_success(&out, "dcat echo -");
    assert_eq!(text(&out.stdout), "alone\n");
}

#[test]
fn a_dead_socket_ordered_first_is_skipped_for_a_live_one() {
    let root = TestRoot::new();
    // Host "zhost" sorts after "testhost": the stale socket comes first.
    let (_, live) = serve_live_on(&root, "zhost");
    let stale = stale_at(&root, "local/x/svc.testhost..0");
    let out = run_with_timeout(root.cmd("dcat").args(["-v", "svc"]), None, DEFAULT_TIMEOUT);
    assert_success(&out, "dcat -v svc");
    assert_eq!(text(&out.stdout), "live\n");
    assert_eq!(text(&out.stderr), format!("dcat: connected to {}\n", live.display()));
    // The stale socket alone: nothing accepts.
    let out = dcat(&root, &[stale.to_str().unwrap()], None);
    assert_error(&out, 69, "dcat", &[stale.to_str().unwrap()]);
}

fn serve_live_on(root: &TestRoot, host: &str) -> (u32, std::path::PathBuf) {
    common::service::serve_with(
        root,
        root.cmd("dipus-local-pipe").env("DIPUS_HOSTNAME", host).args(["echo live", "svc/x"]),
        &format!("local/x/svc.{host}..0"),
    )
}

#[test]
fn no_such_service_is_69() {
    let root = TestRoot::new();
    sorter(&root);
    assert_error(&dcat(&root, &["nosuch"], None), 69, "dcat", &["nosuch"]);
    assert_error(&dcat(&root, &["sorter.otherhost"], None), 69, "dcat", &["sorter.otherhost"]);
    assert_error(&dcat(&root, &["text/html"], None), 69, "dcat", &["text/html"]);
    // In a tree that does not exist yet, too.
    let empty = TestRoot::new();
    assert_error(&dcat(&empty, &["sorter"], None), 69, "dcat", &["sorter"]);
}

/// A file that fails while being read (EIO: a bad disk; dcat's own
/// /proc/self/mem at address 0 fails the same way) must not reach the
/// service as a shorter input: `wc -c` would count what got through and
/// dcat would exit 0. The error names the input, whether it is read
/// (/proc/self/mem), sent with sendfile (a sysfs attribute) or is stdin.
/// (EIO by its number: glibc calls it "Input/output error", musl, in the
/// static binary, "I/O error".)
#[test]
fn a_file_that_fails_while_read_is_an_error_not_a_short_input() {
    let root = TestRoot::new();
    serve(&root, "wc -c", "count/text/plain", "local/text/plain/count.testhost..0");
    let good = root.path().join("good");
    std::fs::write(&good, "data\n").unwrap();
    let out = dcat(&root, &["count", good.to_str().unwrap(), "/proc/self/mem"], None);
    assert_error(&out, 74, "dcat", &["cannot read /proc/self/mem: ", "error (os error 5)"]);

    // A file sent with sendfile(2), which fails the same way: a sysfs
    // attribute that answers EIO (lo has no runtime power management).
    let sysfs = "/sys/devices/virtual/net/lo/power/autosuspend_delay_ms";
    let gives_eio = std::fs::read(sysfs).map_err(|e| e.raw_os_error()) == Err(Some(libc::EIO));
    if require(gives_eio, &format!("reading {sysfs} fails with EIO")) {
        let out = dcat(&root, &["count", good.to_str().unwrap(), sysfs], None);
        assert_error(&out, 74, "dcat", &[&format!("cannot read {sysfs}: "), "error (os error 5)"]);
    }

    // The same as stdin: this process's memory, which outlives dcat's read.
    let memory = File::open("/proc/self/mem").unwrap();
    let mut child = ChildGuard::spawn(
        root.cmd("dcat").arg("count").stdin(Stdio::from(memory)).stdout(Stdio::piped()).stderr(Stdio::piped()),
    );
    let status = child.wait_timeout(DEFAULT_TIMEOUT).expect("dcat exits on a failing stdin");
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child.0.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(74), "stdout {stdout:?}, stderr {stderr:?}");
    assert!(stdout.is_empty(), "stdout {stdout:?}");
    assert!(
        stderr.starts_with("dcat: cannot read stdin: ") && stderr.contains("error (os error 5)"),
        "stderr {stderr:?}"
    );
}

#[test]
fn an_unreadable_file_fails_with_74_before_anything_is_sent() {
    let root = TestRoot::new();
    let (listener, _) = listen_at(&root, "local/t/sink.testhost..0");
    listener.set_nonblocking(true).unwrap();
    let good = root.path().join("good");
    std::fs::write(&good, "data\n").unwrap();
    let missing = root.path().join("missing");
    // A directory opens, and fails only when read.
    let mut unreadable = vec![missing.clone(), root.path().to_path_buf()];
    if !have_root() {
        // Root reads anything, whatever its mode.
        let locked = root.path().join("locked");
        std::fs::write(&locked, "secret\n").unwrap();
        std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
        unreadable.push(locked);
    }
    for bad in &unreadable {
        let bad = bad.to_str().unwrap();
        let out = dcat(&root, &["sink", good.to_str().unwrap(), bad], Some(b"stdin\n"));
        assert_error(&out, 74, "dcat", &[bad]);
        // A connection, even one closed at once, would be waiting here.
        match listener.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("dcat connected although {bad} cannot be read: {other:?}"),
        }
    }
}

#[test]
fn a_bad_selector_is_a_usage_error() {
    let root = TestRoot::new();
    for bad in ["a b", "x/../y", "bad..name", "ftp://host/x", "x//y"] {
        assert_error(&dcat(&root, &[bad], None), 64, "dcat", &[bad]);
    }
    // No SERVICE at all.
    let out = dcat(&root, &[], None);
    assert_eq!(out.status.code(), Some(64));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    assert!(!root.tree().exists(), "a usage error created the tree");
}

#[test]
fn a_closed_stdout_ends_dcat_quietly() {
    let root = TestRoot::new();
    serve(&root, "yes 2>/dev/null", "yes/text/plain", "local/text/plain/yes.testhost..0");
    // `dcat yes | head -c1`: one byte read, then the reader goes away while
    // the service keeps writing.
    let mut child = ChildGuard::spawn(
        root.cmd("dcat").arg("yes").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()),
    );
    let mut stdout = child.0.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    stdout.read_exact(&mut byte).expect("one byte of the reply");
    assert_eq!(&byte, b"y");
    drop(stdout);
    let status = child.wait_timeout(Duration::from_secs(5)).expect("dcat exits once its stdout is closed");
    let mut stderr = String::new();
    child.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!((status.code(), stderr.as_str()), (Some(0), ""));
}

/// `sh -c 'exec dcat ARGS… REDIRECTIONS'`: dcat started with descriptors
/// closed, as a shell's `>&-` leaves them; exit status and stderr.
fn dcat_closed(root: &TestRoot, args: &str, redirections: &str) -> (Option<i32>, String) {
    let mut shell = shell_around(&[], &root.cmd("dcat"), &format!("exec \"$0\" {args} {redirections}"));
    let out = run_with_timeout(&mut shell, None, DEFAULT_TIMEOUT);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A stdout closed from the start (`dcat x >&-`) is an error once there is
/// a reply to write, as for cat, not a reply silently dropped; with no
/// reply there is nothing to fail. A closed stdin fails the read.
#[test]
fn descriptors_closed_at_start_fail_as_closed_ones_do() {
    let root = TestRoot::new();
    serve(&root, "cat", "echo/text/plain", "local/text/plain/echo.testhost..0");
    let closed = (Some(74), "dcat: cannot write to stdout: Bad file descriptor (os error 9)\n".to_string());
    assert_eq!(dcat_closed(&root, "echo /etc/hostname", ">&-"), closed);
    assert_eq!(dcat_closed(&root, "echo /dev/null", ">&-"), (Some(0), String::new()));
    let closed = (Some(74), "dcat: cannot read stdin: Bad file descriptor (os error 9)\n".to_string());
    assert_eq!(dcat_closed(&root, "echo", "<&- >/dev/null"), closed);
}

/// stdout's reader gone while the service says nothing: dcat waits for
/// the service, as cat waits for its input, without spinning on the
/// hang-up (it used to take a whole core until the service spoke).
#[test]
fn a_reader_gone_while_the_service_is_silent_costs_no_cpu() {
    let root = TestRoot::new();
    serve(&root, "sleep 30", "silent/text/plain", "local/text/plain/silent.testhost..0");
    let mut child = ChildGuard::spawn(root.cmd("dcat").arg("silent").stdin(Stdio::null()).stdout(Stdio::piped()));
    // Past its start and into its wait; then the reader goes.
    std::thread::sleep(Duration::from_millis(300));
    drop(child.0.stdout.take());
    std::thread::sleep(Duration::from_millis(100));
    let before = proc::cpu_time(child.pid()).expect("dcat runs");
    std::thread::sleep(Duration::from_secs(1));
    let used = proc::cpu_time(child.pid()).expect("dcat still waits for the service") - before;
    // A spinning loop takes the whole second (half of it on a busy machine).
    assert!(used < Duration::from_millis(250), "dcat used {used:?} of CPU in one idle second");
}

#[test]
fn a_service_that_answers_without_reading() {
    let root = TestRoot::new();
    serve(&root, "echo hi", "hi/text/plain", "local/text/plain/hi.testhost..0");
    // stdin stays open and silent: the reply alone ends dcat.
    let mut child = ChildGuard::spawn(
        root.cmd("dcat").arg("hi").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()),
    );
    let stdin = child.0.stdin.take().unwrap();
    let mut lines = LineReader::new(child.0.stdout.take().unwrap());
    lines.expect_line("hi", DEFAULT_TIMEOUT);
    assert_eq!(lines.rest(DEFAULT_TIMEOUT), (vec![], true));
    let status = child.wait_timeout(DEFAULT_TIMEOUT).expect("dcat exits when the reply ends, stdin still open");
    let mut stderr = String::new();
    child.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!((status.code(), stderr.as_str()), (Some(0), ""));
    drop(stdin);

    // Plenty of input the service never reads.
    let input = vec![b'x'; 8 << 20];
    let out = dcat(&root, &["hi"], Some(&input));
    assert_success(&out, "dcat hi <8 MiB");
    assert_eq!((text(&out.stdout), text(&out.stderr)), ("hi\n", ""));
}

#[test]
fn a_service_that_reads_everything_before_answering() {
    let root = TestRoot::new();
    sorter(&root);
    // Several MiB: more than every socket and pipe buffer on the way, so
    // dcat must keep sending while nothing comes back.
    let mut lines: Vec<String> =
        (0..300_000u64).map(|i| format!("{:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15))).collect();
    let input = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    lines.sort();
    let expected = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    let out = run_with_timeout(root.cmd("dcat").arg("sorter"), Some(input.as_bytes()), BULK_TIMEOUT);
    assert_success(&out, "dcat sorter <5 MiB");
    assert!(text(&out.stdout) == expected, "sorted output differs ({} bytes)", out.stdout.len());
}

#[test]
fn stdin_from_dev_null() {
    let root = TestRoot::new();
    sorter(&root);
    serve(&root, "echo hi", "hi/text/plain", "local/text/plain/hi.testhost..0");
    // run_with_timeout's stdin is /dev/null when none is given.
    let out = dcat(&root, &["sorter"], None);
    assert_success(&out, "dcat sorter </dev/null");
    assert_eq!((text(&out.stdout), text(&out.stderr)), ("", ""));
    let out = dcat(&root, &["hi"], None);
    assert_success(&out, "dcat hi </dev/null");
    assert_eq!((text(&out.stdout), text(&out.stderr)), ("hi\n", ""));
}

/// Nothing but the service's answer can wake dcat here: stdin is
/// /dev/null (epoll refuses it) and stdout a file (always writable).
#[test]
fn stdin_from_dev_null_and_stdout_to_a_file() {
    let root = TestRoot::new();
    sorter(&root);
    let output = root.path().join("output");
    let mut cmd = root.cmd("dcat");
    cmd.arg("sorter").stdin(Stdio::null()).stdout(File::create(&output).unwrap()).stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd);
    let status = child.wait_timeout(DEFAULT_TIMEOUT).expect("dcat sorter </dev/null >file hangs");
    assert!(status.success(), "dcat sorter </dev/null >file: {status}");
    assert_eq!(std::fs::read(&output).unwrap(), b"");
}

#[test]
fn stdout_to_a_regular_file_and_to_dev_null() {
    let root = TestRoot::new();
    sorter(&root);
    let input = root.path().join("input");
    std::fs::write(&input, "b\nc\na\n").unwrap();
    let output = root.path().join("output");
    for (stdout, what) in [(Stdio::from(File::create(&output).unwrap()), "a file"), (Stdio::null(), "/dev/null")] {
        let mut cmd = root.cmd("dcat");
        cmd.args(["sorter", input.to_str().unwrap()]).stdin(Stdio::null()).stdout(stdout).stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd);
        let status = child.wait_timeout(DEFAULT_TIMEOUT).unwrap_or_else(|| panic!("dcat >{what} hangs"));
        let mut stderr = String::new();
        child.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        assert_eq!((status.code(), stderr.as_str()), (Some(0), ""), "dcat >{what}");
    }
    assert_eq!(std::fs::read_to_string(&output).unwrap(), "a\nb\nc\n");
}

/// An exporter that accepts and never answers: after the 10 s reply
/// deadline dcat says so (not "Resource temporarily unavailable").
#[test]
fn a_sep_server_that_never_answers_is_named_as_such() {
    let root = TestRoot::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let holder = std::thread::spawn(move || listener.accept().map(|(stream, _)| stream));
    let out = run_with_timeout(
        root.cmd("dcat").arg(format!("sep://127.0.0.1:{port}/echo")),
        Some(b"hello\n"),
        Duration::from_secs(30),
    );
    assert_error(&out, 74, "dcat", &["no status line within 10 s"]);
    drop(holder.join().unwrap());
}

#[test]
fn a_service_or_file_called_help_is_used_not_taken_for_help() {
    let root = TestRoot::new();
    serve(&root, "echo I am help", "help/text/plain", "local/text/plain/help.testhost..0");
    let out = dcat(&root, &["help"], None);
    assert_success(&out, "dcat help");
    assert_eq!(text(&out.stdout), "I am help\n");
    serve(&root, "cat", "echo/text/plain", "local/text/plain/echo.testhost..0");
    std::fs::write(root.path().join("help"), "the file help\n").expect("write the FILE help");
    let out = run_with_timeout(root.cmd("dcat").current_dir(root.path()).args(["echo", "help"]), None, DEFAULT_TIMEOUT);
    assert_success(&out, "dcat echo help");
    assert_eq!(text(&out.stdout), "the file help\n");
}

#[test]
fn the_first_double_dash_ends_options_also_after_a_file() {
    let root = TestRoot::new();
    serve(&root, "cat", "echo/text/plain", "local/text/plain/echo.testhost..0");
    for (file, content) in [("a", "A\n"), ("-v", "dashv\n"), ("--", "dashdash\n")] {
        std::fs::write(root.path().join(file), content).expect("write a FILE");
    }
    // As cat: the first `--` is no FILE, wherever it comes; a later one is.
    for (args, reply) in [
        (&["echo", "a", "--", "-v"][..], "A\ndashv\n"),
        (&["echo", "a", "--", "--", "-v"], "A\ndashdash\ndashv\n"),
        (&["echo", "--", "-v", "--"], "dashv\ndashdash\n"),
        (&["-v", "echo", "a", "--", "-v"], "A\ndashv\n"),
    ] {
        let out = run_with_timeout(root.cmd("dcat").current_dir(root.path()).args(args), None, DEFAULT_TIMEOUT);
        assert_success(&out, &format!("dcat {args:?}"));
        assert_eq!(text(&out.stdout), reply, "dcat {args:?}");
    }
}

/// `count` FILEs `0`, `1`, … in `dir`, each holding its own name and a
/// newline; returns their names and what they send in order.
fn numbered_files(dir: &Path, count: usize) -> (Vec<String>, String) {
    let names: Vec<String> = (0..count).map(|n| n.to_string()).collect();
    for name in &names {
        std::fs::write(dir.join(name), format!("{name}\n")).expect("write a FILE");
    }
    let sent = names.iter().map(|name| format!("{name}\n")).collect();
    (names, sent)
}

#[test]
fn more_files_than_the_soft_descriptor_limit_are_all_sent() {
    let root = TestRoot::new();
    serve(&root, "cat", "echo/text/plain", "local/text/plain/echo.testhost..0");
    let (names, sent) = numbered_files(root.path(), 200);
    let mut cmd = root.cmd("dcat");
    cmd.arg("echo").args(&names);
    // The hard limit is left as it is: only the soft one is below the
    // count of FILEs.
    let mut shell = shell_around(&[], &cmd, r#"ulimit -Sn 64 && exec "$0" "$@""#);
    shell.current_dir(root.path());
    let hard = run_with_timeout(std::process::Command::new("sh").args(["-c", "ulimit -Hn"]), None, DEFAULT_TIMEOUT);
    // "unlimited" is no number, and plenty.
    let hard: u64 = text(&hard.stdout).trim().parse().unwrap_or(u64::MAX);
    if !require(hard >= 300, "a hard descriptor limit of 300 or more") {
        return;
    }
    let out = run_with_timeout(&mut shell, None, DEFAULT_TIMEOUT);
    assert_success(&out, "dcat echo 0…199 under ulimit -Sn 64");
    assert_eq!(text(&out.stdout), sent);
}

#[test]
fn more_files_than_the_hard_descriptor_limit_are_refused_before_sending() {
    let root = TestRoot::new();
    // Were it connected to, the service would say so on stdout.
    serve(&root, "echo contacted", "echo/text/plain", "local/text/plain/echo.testhost..0");
    let (names, _) = numbered_files(root.path(), 200);
    let mut cmd = root.cmd("dcat");
    cmd.arg("echo").args(&names);
    let mut shell = shell_around(&[], &cmd, r#"ulimit -n 64 && exec "$0" "$@""#);
    shell.current_dir(root.path());
    let out = run_with_timeout(&mut shell, None, DEFAULT_TIMEOUT);
    assert_error(&out, 74, "dcat", &["200 FILEs", "64 files", "cat FILE… | dcat SERVICE"]);
}

#[test]
fn a_match_whose_path_is_too_long_to_connect_to_falls_over_to_the_next() {
    let root = TestRoot::new();
    serve(&root, "echo ok", "longname/text/plain", "local/text/plain/longname.testhost..0");
    // A protocol that sorts first, deep enough that the socket's path
    // does not fit a socket address: bound by its name from inside.
    let protocol = ["p".repeat(60), "p".repeat(60)].join("/");
    let dir = make_dirs(&root, &format!("local/{protocol}"));
    let long = dir.join("longname.testhost..0");
    assert!(long.as_os_str().len() > 107, "{} is short enough to connect to", long.display());
    let mut listener = root.cmd("dipus");
    listener.args(["bench", "echo", "--listen", "longname.testhost..0"]).current_dir(&dir);
    let pid = root.spawn(&mut listener);
    wait_for_socket(&root, pid, &long);
    let out = dcat(&root, &["-v", "longname"], None);
    assert_success(&out, "dcat -v longname");
    assert_eq!(text(&out.stdout), "ok\n");
    assert!(text(&out.stderr).contains("text/plain/longname.testhost..0"), "{}", text(&out.stderr));
    // With nothing else to try, none accepted, and the message says why.
    let out = dcat(&root, &[&format!("{protocol}/longname")], None);
    assert_error(&out, 69, "dcat", &["accepted", "more than the 107"]);
}

#[test]
fn a_bad_selector_in_a_uri_is_called_a_bad_selector_of_that_uri() {
    let root = TestRoot::new();
    let out = dcat(&root, &["sep://h:1/x.*"], None);
    let stderr = assert_error(&out, 64, "dcat", &["invalid selector \"x.*\" in \"sep://h:1/x.*\""]);
    assert!(!stderr.contains("URI"), "{stderr}");
    // Outside a URI, a URI is one of the things expected.
    let out = dcat(&root, &["x.*"], None);
    assert_error(&out, 64, "dcat", &["invalid selector \"x.*\"", "sep:// or ssh:// URI"]);
}
