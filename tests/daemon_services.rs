//! dipusd's default services on loopback (`dipusd --no-discovery`): the
//! services file's services are listed and work; SIGHUP starts the added
//! ones, stops the removed ones and leaves the unchanged ones (and their
//! open connections) alone; a bad file is refused at start naming file and
//! line, and ignored at SIGHUP; `-c N` caps a service's children, and a
//! SIGHUP that only changes the cap keeps the socket; `--max-conns 0` is
//! refused; `--pidfile`; SIGTERM exits 0 at once and takes every socket
//! dipusd made along, and nothing else.

mod common;

use common::service::{
    assert_error, assert_success, dcat, is_socket, listen_at, sockets, start_exporter, stop, wait_for_socket,
};
use common::*;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a reload may take to show in the tree.
const RELOAD: Duration = Duration::from_secs(2);

const SORTER: &str = "local/text/plain/sorter.testhost..0";
const UPPER: &str = "exported/text/plain/upper.testhost..0";
const ECHO: &str = "local/text/plain/echo.testhost..0";

/// A running dipusd: its pid (a child of the root), its pidfile and its
/// stderr, line by line.
struct Dipusd {
    pid: u32,
    pidfile: PathBuf,
    stderr: LineReader,
}

/// `dipusd --no-discovery --bind 127.0.0.1 --port P --services FILE
/// --pidfile F ARGS…` in `root`: the command for a free port P, on
/// loopback only.
fn dipusd_cmd(root: &TestRoot, services: &Path, pidfile: &Path, args: &[&str]) -> Command {
    let mut cmd = root.cmd("dipusd");
    cmd.args(["--no-discovery", "--bind", "127.0.0.1", "--port", &free_port().to_string()])
        .arg("--services")
        .arg(services)
        .arg("--pidfile")
        .arg(pidfile)
        .args(args);
    cmd
}

/// Starts dipusd with the services file `services` and waits for its
/// pidfile, written once its services are made. A port taken meanwhile
/// makes dipusd exit: then another one is tried.
fn start_dipusd(root: &TestRoot, services: &Path, args: &[&str]) -> Dipusd {
    start_dipusd_as(root, services, args, |cmd| cmd)
}

/// [`start_dipusd`], its command changed by `wrap` (which must keep its
/// process id: an `exec` chain).
fn start_dipusd_as(root: &TestRoot, services: &Path, args: &[&str], wrap: impl Fn(Command) -> Command) -> Dipusd {
    let pidfile = root.path().join("dipusd.pid");
    for _ in 0..5 {
        let mut guard = ChildGuard::spawn(
            wrap(dipusd_cmd(root, services, &pidfile, args)).stdin(Stdio::null()).stderr(Stdio::piped()),
        );
        let stderr = LineReader::new(guard.0.stderr.take().expect("stderr was piped"));
        let pid = root.adopt(guard);
        let mut up = false;
        wait_until(DEFAULT_TIMEOUT, "dipusd writes its pidfile", || {
            let running = root.with_child(pid, |c| c.is_running());
            up = running && std::fs::read_to_string(&pidfile).is_ok_and(|text| text == format!("{pid}\n"));
            up || !running
        });
        if up {
            return Dipusd { pid, pidfile, stderr };
        }
    }
    panic!("dipusd did not start on any of 5 free ports");
}

fn write_services(root: &TestRoot, text: &str) -> PathBuf {
    let path = root.path().join("services");
    std::fs::write(&path, text).unwrap();
    path
}

fn dls(root: &TestRoot) -> String {
    let out = run_with_timeout(root.cmd("dls").arg("-1"), None, DEFAULT_TIMEOUT);
    assert_success(&out, "dls -1");
    assert!(out.stderr.is_empty(), "dls -1: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 listing")
}

/// Asserts that `selector` answers `input` with `expected`, quietly.
fn assert_answers(root: &TestRoot, selector: &str, input: &str, expected: &str) {
    let out = dcat(root, &[selector], Some(input.as_bytes()));
    assert_success(&out, &format!("dcat {selector}"));
    assert_eq!(
        (String::from_utf8_lossy(&out.stdout).as_ref(), String::from_utf8_lossy(&out.stderr).as_ref()),
        (expected, ""),
        "dcat {selector}"
    );
}

fn inode(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).ino()
}

/// Sends SIGHUP to dipusd.
fn hangup(root: &TestRoot, daemon: &Dipusd) {
    assert!(root.with_child(daemon.pid, |c| c.signal("HUP")), "cannot send SIGHUP to dipusd");
}

#[test]
fn the_services_of_the_file_are_listed_and_work() {
    let root = TestRoot::new();
    let services = write_services(
        &root,
        "# default services\n\
         \n\
         sorter/text/plain  local     LC_ALL=C sort\n\
         upper/text/plain   exported  tr a-z A-Z\n",
    );
    start_dipusd(&root, &services, &[]);
    assert_eq!(dls(&root), "text/plain/sorter.testhost..0\ntext/plain/upper.testhost..0\n");
    for relative in [SORTER, UPPER] {
        let mode = std::fs::symlink_metadata(root.tree().join(relative)).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o666, "mode of {relative}");
    }
    assert_answers(&root, "sorter", "pear\napple\nfig\n", "apple\nfig\npear\n");
    assert_answers(&root, "upper", "shout\n", "SHOUT\n");
}

#[test]
fn sighup_starts_added_services_stops_removed_ones_and_keeps_the_rest_with_their_connections() {
    let root = TestRoot::new();
    let services = write_services(&root, "echo/text/plain local cat\nsorter/text/plain local LC_ALL=C sort\n");
    let daemon = start_dipusd(&root, &services, &[]);
    let echo = root.tree().join(ECHO);
    let echo_inode = inode(&echo);
    let mut connection = UnixStream::connect(&echo).unwrap();
    connection.set_read_timeout(Some(DEFAULT_TIMEOUT)).unwrap();
    let mut reply = [0u8; 7];
    connection.write_all(b"before\n").unwrap();
    connection.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"before\n");

    write_services(&root, "upper/text/plain exported tr a-z A-Z\necho/text/plain local cat\n");
    hangup(&root, &daemon);
    let sent = Instant::now();
    wait_until(RELOAD, "sorter gone and upper there", || {
        !root.tree().join(SORTER).exists() && is_socket(&root.tree().join(UPPER))
    });
    eprintln!("reloaded {:?} after SIGHUP", sent.elapsed());
    assert_eq!(dls(&root), "text/plain/echo.testhost..0\ntext/plain/upper.testhost..0\n");
    assert_eq!(inode(&echo), echo_inode, "the unchanged service's socket was replaced");

    // The connection opened before the reload still echoes, and ends.
    let mut reply = [0u8; 6];
    connection.write_all(b"after\n").unwrap();
    connection.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"after\n");
    connection.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    connection.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"");

    assert_answers(&root, "upper", "shout\n", "SHOUT\n");
    assert_answers(&root, "echo", "ping\n", "ping\n");
    let out = dcat(&root, &["sorter"], Some(b"x\n"));
    assert_error(&out, 69, "dcat", &["sorter"]);
}

/// Opens a connection to `path` and sends `line`; the reply is read later.
fn ask(path: &Path, line: &str) -> UnixStream {
    let mut connection = UnixStream::connect(path).unwrap();
    connection.set_read_timeout(Some(DEFAULT_TIMEOUT)).unwrap();
    connection.write_all(line.as_bytes()).unwrap();
    connection
}

/// True if `connection` has something to read within `wait`.
fn answered_within(connection: &UnixStream, wait: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut poll = libc::pollfd { fd: connection.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut poll, 1, wait.as_millis() as libc::c_int) };
    assert!(ready >= 0, "poll: {}", std::io::Error::last_os_error());
    ready == 1
}

fn read_line(connection: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while connection.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

#[test]
fn dash_c_caps_the_children_and_a_sighup_changing_only_the_cap_keeps_the_socket() {
    let root = TestRoot::new();
    // `head -n 1` answers one line and exits: each child ends when asked.
    let services = write_services(&root, "echo/text/plain local -c 1 head -n 1\n");
    let daemon = start_dipusd(&root, &services, &[]);
    let echo = root.tree().join(ECHO);
    let echo_inode = inode(&echo);

    // The first connection's child runs; the second waits in the backlog
    // until it has exited.
    let mut first = UnixStream::connect(&echo).unwrap();
    first.set_read_timeout(Some(DEFAULT_TIMEOUT)).unwrap();
    let mut second = ask(&echo, "second\n");
    assert!(!answered_within(&second, Duration::from_millis(700)), "a second child ran beside the first (-c 1)");
    first.write_all(b"first\n").unwrap();
    assert_eq!(read_line(&mut first), "first");
    assert_eq!(read_line(&mut second), "second");

    // Raised to 2 by SIGHUP: two children at once, on the same socket.
    write_services(&root, "echo/text/plain local -c 2 head -n 1\n");
    hangup(&root, &daemon);
    let busy = UnixStream::connect(&echo).unwrap();
    let mut beside = ask(&echo, "beside\n");
    let waited = Instant::now();
    assert!(answered_within(&beside, RELOAD), "no second child after raising -c to 2");
    eprintln!("a second child answered {:?} after the reload", waited.elapsed());
    assert_eq!(read_line(&mut beside), "beside");
    assert_eq!(inode(&echo), echo_inode, "changing only -c replaced the socket");
    drop(busy);
}

#[test]
fn a_bad_services_file_at_start_is_refused_naming_file_and_line() {
    let root = TestRoot::new();
    let services =
        write_services(&root, "# fine so far\nsorter/text/plain local sort\nupper/text/plain remote tr a-z A-Z\n");
    let pidfile = root.path().join("dipusd.pid");
    let out = run_with_timeout(&mut dipusd_cmd(&root, &services, &pidfile, &[]), None, DEFAULT_TIMEOUT);
    let line = assert_error(&out, 1, "dipusd", &[&format!("{}:3: ", services.display()), "remote"]);
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(!root.tree().exists(), "the tree was created");
    assert!(!pidfile.exists(), "the pidfile was written");
}

#[test]
fn a_connection_cap_of_0_is_refused_as_by_the_exporter() {
    let root = TestRoot::new();
    let services = write_services(&root, "");
    let pidfile = root.path().join("dipusd.pid");
    let mut cmd = dipusd_cmd(&root, &services, &pidfile, &["--max-conns", "0"]);
    let out = run_with_timeout(&mut cmd, None, DEFAULT_TIMEOUT);
    let line = assert_error(&out, 64, "dipusd", &["--max-conns must be at least 1"]);
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(!pidfile.exists(), "the pidfile was written");
}

#[test]
fn a_bad_services_file_at_sighup_leaves_the_running_services_alone() {
    let root = TestRoot::new();
    let services =
        write_services(&root, "sorter/text/plain local LC_ALL=C sort\nupper/text/plain exported tr a-z A-Z\n");
    let mut daemon = start_dipusd(&root, &services, &[]);
    let before = [inode(&root.tree().join(SORTER)), inode(&root.tree().join(UPPER))];

    write_services(&root, "sorter/text/plain local LC_ALL=C sort\nno-protocol local cat\n");
    hangup(&root, &daemon);
    let warning = daemon.stderr.next_line(DEFAULT_TIMEOUT).expect("a warning about the file");
    assert!(
        warning.contains(&format!("SIGHUP: {}:2: ", services.display()))
            && warning.ends_with("; keeping the services as they are"),
        "{warning}"
    );
    assert_eq!(dls(&root), "text/plain/sorter.testhost..0\ntext/plain/upper.testhost..0\n");
    assert_eq!([inode(&root.tree().join(SORTER)), inode(&root.tree().join(UPPER))], before);
    assert_answers(&root, "sorter", "pear\napple\n", "apple\npear\n");
    assert_answers(&root, "upper", "shout\n", "SHOUT\n");

    // Mended, the next SIGHUP applies it.
    write_services(&root, "sorter/text/plain local LC_ALL=C sort\n");
    hangup(&root, &daemon);
    wait_until(RELOAD, "upper stopped", || !root.tree().join(UPPER).exists());
    assert_eq!(dls(&root), "text/plain/sorter.testhost..0\n");
}

/// A second host, `hostb`, exporting `remote/text/plain` with
/// dipus-exporter on a free loopback port; returns the port.
fn exporting_host(other: &TestRoot) -> u16 {
    let pid = other.spawn(other.cmd("dipus-export-pipe").args(["--mode", "0666", "cat", "remote/text/plain"]));
    wait_for_socket(other, pid, &other.tree().join("exported/text/plain/remote.hostb..0"));
    start_exporter(other, &[])
}

#[test]
fn sigterm_exits_0_within_a_second_taking_its_sockets_and_pidfile_and_nothing_else() {
    let other = TestRoot::new().with_host("hostb");
    let port = exporting_host(&other);
    let root = TestRoot::new();
    let services =
        write_services(&root, "sorter/text/plain local LC_ALL=C sort\nupper/text/plain exported tr a-z A-Z\n");
    let (_foreign, _) = listen_at(&root, "local/text/plain/foreign.testhost..0");
    let host = format!("sep://127.0.0.1:{port}");
    let daemon = start_dipusd(&root, &services, &["--host", &host]);
    wait_until(DEFAULT_TIMEOUT, "the import of hostb", || {
        is_socket(&root.tree().join("imported/text/plain/remote.hostb..0"))
    });
    assert_eq!(
        sockets(&root.tree()),
        [
            "exported/text/plain/upper.testhost..0",
            "imported/text/plain/remote.hostb..0",
            "local/text/plain/foreign.testhost..0",
            "local/text/plain/sorter.testhost..0",
        ]
    );
    assert_answers(&root, "remote", "through the import\n", "through the import\n");

    let sent = Instant::now();
    let status = root.with_child(daemon.pid, |c| c.terminate(Duration::from_secs(1)));
    let status = status.unwrap_or_else(|| panic!("dipusd still runs 1 s after SIGTERM"));
    eprintln!("dipusd exited {:?} after SIGTERM", sent.elapsed());
    assert_eq!(status.code(), Some(0));
    assert_eq!(sockets(&root.tree()), ["local/text/plain/foreign.testhost..0"]);
    assert!(!daemon.pidfile.exists(), "the pidfile stayed");
    // The other host is untouched.
    assert_eq!(sockets(&other.tree()), ["exported/text/plain/remote.hostb..0"]);
}

/// A second dipusd given the same pidfile takes it over; the first one,
/// stopped, leaves it alone (it names the one still running).
#[test]
fn a_stopped_dipusd_removes_its_pidfile_only_while_it_names_it() {
    let root = TestRoot::new();
    let services = write_services(&root, "");
    let first = start_dipusd(&root, &services, &[]);
    let second = start_dipusd(&root, &services, &[]);
    assert_eq!(first.pidfile, second.pidfile);
    assert_eq!(std::fs::read_to_string(&second.pidfile).unwrap(), format!("{}\n", second.pid));
    assert_eq!(stop(&root, first.pid, "TERM").code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&second.pidfile).ok(),
        Some(format!("{}\n", second.pid)),
        "the first dipusd removed the pidfile of the second"
    );
    assert_eq!(stop(&root, second.pid, "TERM").code(), Some(0));
    assert!(!second.pidfile.exists(), "the second dipusd left its pidfile");
}

/// A pidfile in a directory others may write to (/tmp) may be anything
/// they put there: a symlink to a file root must not overwrite, a FIFO
/// that would hang dipusd, a hard link to another file. Each is refused
/// (status 74, naming the file) and left as it was. dipusd used to write
/// its pid through the symlink and into the hard link, and to wait on
/// the FIFO forever.
#[test]
fn a_pidfile_that_is_a_symlink_or_no_regular_file_is_refused_and_left_alone() {
    let root = TestRoot::new();
    let services = write_services(&root, "");
    let important = root.path().join("important");
    std::fs::write(&important, "important\n").unwrap();
    let symlink = root.path().join("symlink.pid");
    std::os::unix::fs::symlink(&important, &symlink).unwrap();
    let fifo = root.path().join("fifo.pid");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let hard_link = root.path().join("hard-link.pid");
    std::fs::hard_link(&important, &hard_link).unwrap();
    for (pidfile, why) in
        [(&symlink, "it is a symlink"), (&fifo, "not a regular file"), (&hard_link, "other hard links")]
    {
        let out = run_with_timeout(&mut dipusd_cmd(&root, &services, pidfile, &[]), None, DEFAULT_TIMEOUT);
        assert_error(&out, 74, "dipusd", &[&pidfile.display().to_string(), why]);
    }
    assert_eq!(std::fs::read_to_string(&important).unwrap(), "important\n");
    assert_eq!(std::fs::read_link(&symlink).unwrap(), important);
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
}

/// A pidfile replaced by a symlink while dipusd runs (to a file that holds
/// its pid, even) is not its own any more: left at exit, not removed.
#[test]
fn a_pidfile_replaced_by_a_symlink_is_left_at_exit() {
    let root = TestRoot::new();
    let services = write_services(&root, "");
    let daemon = start_dipusd(&root, &services, &[]);
    let moved = root.path().join("moved.pid");
    std::fs::rename(&daemon.pidfile, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &daemon.pidfile).unwrap();
    assert_eq!(stop(&root, daemon.pid, "TERM").code(), Some(0));
    assert_eq!(std::fs::read_link(&daemon.pidfile).ok(), Some(moved.clone()), "the symlink was removed");
    assert_eq!(std::fs::read_to_string(&moved).unwrap(), format!("{}\n", daemon.pid));
}

/// A `--host` that a dipus-import already imports is not imported twice;
/// once that importer stops, dipusd takes over within its 10 s retry.
#[test]
fn a_host_imported_by_another_process_is_taken_over_when_that_one_stops() {
    let other = TestRoot::new().with_host("hostb");
    let port = exporting_host(&other);
    let root = TestRoot::new();
    let host = format!("sep://127.0.0.1:{port}");
    let proxy = root.tree().join("imported/text/plain/remote.hostb..0");
    let mut importer =
        ChildGuard::spawn(root.cmd("dipus-import").args(["-f", &host]).stdin(Stdio::null()).stderr(Stdio::null()));
    wait_until(DEFAULT_TIMEOUT, "dipus-import's proxy", || is_socket(&proxy));
    let services = write_services(&root, "");
    let mut daemon = start_dipusd(&root, &services, &["--host", &host]);
    let warning = daemon.stderr.next_line(DEFAULT_TIMEOUT).expect("a warning about the lock");
    assert!(
        warning.contains(&format!("{host} is already being imported (lock "))
            && warning.ends_with("trying again every 10 s"),
        "{warning}"
    );
    assert_eq!(importer.terminate(DEFAULT_TIMEOUT).and_then(|s| s.code()), Some(0));
    assert!(!proxy.exists(), "dipus-import left its proxy");
    wait_until(Duration::from_secs(15), "dipusd to import the host", || is_socket(&proxy));
    assert_answers(&root, "remote", "through the import\n", "through the import\n");
}

/// An exporter that refuses the import (dipusd is not on its allow list)
/// is warned of once, and asked again 5 s later (then less and less
/// often), quietly: it used to be logged at info, and asked again at once
/// (0.5 s, doubling, and at every announcement of the host).
#[test]
fn an_exporter_that_refuses_is_warned_of_once_and_asked_again_slowly() {
    // An exporter that refuses everyone, and says when it was asked (the
    // retries themselves are logged at debug, which the static build
    // leaves out).
    let refuser = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = refuser.local_addr().unwrap().port();
    let (asked_tx, asked) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in refuser.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.write_all(b"SEP/1 403 forbidden: address not allowed\n");
            if asked_tx.send(Instant::now()).is_err() {
                return;
            }
        }
    });
    let root = TestRoot::new();
    let services = write_services(&root, "");
    let host = format!("sep://127.0.0.1:{port}");
    let mut daemon = start_dipusd_as(&root, &services, &["--host", &host], |mut cmd| {
        cmd.env("RUST_LOG", "dipus::import=info,dipus::import_set=warn");
        cmd
    });
    let refused = format!("{host} refused the import: SEP/1 403 forbidden: address not allowed");
    let first = daemon.stderr.lines_until(|line| line.contains(&refused), DEFAULT_TIMEOUT);
    assert_eq!(
        first.last().unwrap(),
        &format!("[WARN  dipus::import] {refused}; trying again in 5s, then less and less often")
    );
    let first_asked = asked.recv_timeout(DEFAULT_TIMEOUT).expect("the exporter was asked");
    let second_asked = asked.recv_timeout(Duration::from_secs(10)).expect("asked again within 10 s");
    let between = second_asked - first_asked;
    assert!(between > Duration::from_millis(4500), "asked again after {between:?}");
    // Not warned of again, and not asked a third time before its 10 s.
    assert_eq!(asked.recv_timeout(Duration::from_secs(8)).ok().map(|at| at - second_asked), None);
    assert_eq!(daemon.stderr.next_line(Duration::from_millis(100)), None, "a second warning");
}

/// A `--host` that is this very host (dipusd's own port on loopback) is
/// refused with a warning naming the reason: its exported services are
/// not mirrored into `imported/` (where `dls` showed each twice).
#[test]
fn a_host_uri_of_this_very_host_is_refused_not_mirrored() {
    let root = TestRoot::new();
    let services = write_services(&root, "upper/text/plain exported tr a-z A-Z\n");
    let own_uri = std::cell::RefCell::new(String::new());
    let mut daemon = start_dipusd_as(&root, &services, &[], |mut cmd| {
        // dipusd's own port, whichever the rig picked.
        let port = cmd.get_args().skip_while(|arg| *arg != "--port").nth(1).unwrap().to_str().unwrap().to_owned();
        own_uri.replace(format!("sep://127.0.0.1:{port}"));
        cmd.args(["--host", own_uri.borrow().as_str()]);
        cmd
    });
    let warning = daemon.stderr.next_line(DEFAULT_TIMEOUT).expect("a warning about importing this host");
    assert_eq!(
        warning,
        format!(
            "[WARN  dipus::import] {} is this host (testhost): importing it would mirror its own services; trying \
             again in 5s, then less and less often",
            own_uri.borrow()
        )
    );
    assert_eq!(sockets(&root.tree()), [UPPER]);
    assert_eq!(dls(&root), "text/plain/upper.testhost..0\n");
}

/// `cmd` in a mount namespace of its own where /etc/resolv.conf is
/// `resolv_conf` (unshare's mounts are private: nothing shows outside).
fn with_resolv_conf(cmd: Command, resolv_conf: &Path) -> Command {
    let script = format!(r#"mount --bind '{}' /etc/resolv.conf && exec "$0" "$@""#, resolv_conf.display());
    shell_around(&["unshare", "--mount"], &cmd, &script)
}

/// A host name whose nameserver never answers stalls nothing: dipusd
/// looks it up in a child process, imports the host it was given by
/// address meanwhile, and answers SIGTERM at once, taking the child along.
#[test]
fn a_host_name_whose_lookup_hangs_stalls_nothing() {
    if !require(have_root() && have_command("unshare"), "root and unshare (for a resolv.conf of the test's own)") {
        return;
    }
    // The nameserver: a socket that takes the questions and never answers,
    // on a loopback address no other test uses.
    let nameserver = std::net::UdpSocket::bind("127.83.0.53:53").expect("a silent nameserver on 127.83.0.53:53");
    let root = TestRoot::new();
    let resolv_conf = root.path().join("resolv.conf");
    std::fs::write(&resolv_conf, "nameserver 127.83.0.53\noptions timeout:8 attempts:1\n").unwrap();
    let other = TestRoot::new().with_host("hostb");
    let port = exporting_host(&other);
    let services = write_services(&root, "");
    let (slow, quick) = (format!("sep://slow.dipus-test.example:{port}"), format!("sep://127.0.0.1:{port}"));
    let daemon = start_dipusd_as(&root, &services, &["--host", &slow, "--host", &quick], |cmd| {
        with_resolv_conf(cmd, &resolv_conf)
    });
    // Well before the 8 s the lookup waits for its answer.
    wait_until(Duration::from_secs(4), "the import by address", || {
        is_socket(&root.tree().join("imported/text/plain/remote.hostb..0"))
    });
    let mut question = [0u8; 512];
    nameserver.set_read_timeout(Some(DEFAULT_TIMEOUT)).unwrap();
    nameserver.recv(&mut question).expect("the name asked of the nameserver");
    let lookups = proc::descendants(daemon.pid);
    assert!(!lookups.is_empty(), "no child looks the name up");
    let asked = Instant::now();
    assert!(root.with_child(daemon.pid, |c| c.signal("TERM")));
    let status = root.with_child(daemon.pid, |c| c.wait_timeout(Duration::from_secs(3)));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "dipusd did not end within 3 s of SIGTERM");
    assert!(asked.elapsed() < Duration::from_secs(3));
    for lookup in lookups {
        assert_ne!(proc::proc_id(lookup.pid), Some(lookup), "a lookup child outlived dipusd");
    }
}

/// Two `--host` URIs of one host: the second is refused for good (it
/// would wait for a lock dipusd itself holds).
#[test]
fn a_second_host_uri_of_a_host_dipusd_imports_is_refused_not_retried() {
    let other = TestRoot::new().with_host("hostb");
    let port = exporting_host(&other);
    let root = TestRoot::new();
    let services = write_services(&root, "");
    let (first, second) = (format!("sep://127.0.0.1:{port}"), format!("sep://localhost:{port}/remote"));
    let mut daemon = start_dipusd(&root, &services, &["--host", &first, "--host", &second]);
    let warning = daemon.stderr.next_line(DEFAULT_TIMEOUT).expect("a warning about the second URI");
    assert!(
        warning.ends_with(&format!("{second}: this host is imported here already; not importing it twice")),
        "{warning}"
    );
    wait_until(DEFAULT_TIMEOUT, "the import of hostb", || {
        is_socket(&root.tree().join("imported/text/plain/remote.hostb..0"))
    });
}

/// What `request` (LIST or WATCH) on 127.0.0.1:`port` first hears, on a
/// connection made as soon as the port takes one: the LIST lines, or the
/// WATCH's `+` lines before `= synced`, sorted. None if the port never
/// took one while dipusd `pid` ran.
fn first_answer(root: &TestRoot, pid: u32, port: u16, request: &str) -> Option<Vec<String>> {
    use std::io::BufRead;
    // Tried without pause: the point is to be there the moment it listens.
    let deadline = Instant::now() + DEFAULT_TIMEOUT;
    let mut stream = loop {
        if let Ok(stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            break stream;
        }
        if !root.with_child(pid, |c| c.is_running()) {
            return None;
        }
        assert!(Instant::now() < deadline, "dipusd's port took no connection within {DEFAULT_TIMEOUT:?}");
        std::thread::yield_now();
    };
    stream.set_read_timeout(Some(DEFAULT_TIMEOUT)).unwrap();
    stream.write_all(format!("SEP/1 {request}\n").as_bytes()).unwrap();
    let mut reader = std::io::BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert_eq!(status, "SEP/1 200 OK\n", "{request}");
    let mut lines = Vec::new();
    for line in reader.lines() {
        let line = line.unwrap_or_else(|e| panic!("{request}: {e} after {lines:?}"));
        if line == "= synced" {
            break;
        }
        lines.push(line);
    }
    lines.sort();
    Some(lines)
}

/// A WATCH (or a LIST) answered the moment dipusd's port takes
/// connections already has its default services: "synced" means every
/// service there was has been sent. The exporter used to answer a WATCH
/// from a view that had not yet read the inotify events of the services
/// bound after its port listened, and to send their `+` lines only after
/// `= synced`.
#[test]
fn a_watch_right_after_start_lists_the_default_services_before_synced() {
    let root = TestRoot::new();
    let services = write_services(
        &root,
        "sorter/text/plain exported LC_ALL=C sort\nupper/text/plain exported tr a-z A-Z\n\
         lower/text/plain local tr A-Z a-z\n",
    );
    let pidfile = root.path().join("dipusd.pid");
    let exported = ["text/plain/sorter.testhost..0", "text/plain/upper.testhost..0"];
    let mut rounds = 0;
    let mut attempts = 0;
    while rounds < 20 {
        attempts += 1;
        assert!(attempts < 80, "dipusd could not take a free port in {attempts} attempts");
        let port = free_port();
        let mut cmd = root.cmd("dipusd");
        cmd.args(["--no-discovery", "--bind", "127.0.0.1", "--port", &port.to_string()])
            .arg("--services")
            .arg(&services)
            .arg("--pidfile")
            .arg(&pidfile);
        let pid = root.spawn(cmd.stderr(Stdio::null()));
        // Mostly WATCH, the subject; a LIST now and then.
        let (request, expected): (&str, Vec<String>) = match rounds % 3 {
            2 => ("LIST", exported.iter().map(|path| path.to_string()).collect()),
            _ => ("WATCH", exported.iter().map(|path| format!("+ {path}")).collect()),
        };
        // None: the port was taken meanwhile and dipusd exited; another one.
        if let Some(lines) = first_answer(&root, pid, port, request) {
            assert_eq!(lines, expected, "round {rounds}: {request} right after start");
            rounds += 1;
            assert_eq!(stop(&root, pid, "TERM").code(), Some(0));
        }
    }
}
