//! Issue 10, "survive the field": the faults users of socket forwarders
//! actually report, each with real processes and byte checks.
//!
//! On loopback (always run): an exiting importer or dipusd never removes
//! its successor's socket; every applet refuses a socket path too long for
//! sun_path up front, naming path, length and limit; ssh's ControlPath is
//! the short hashed `%C` form; `--mode`/`--group` shape import proxies.
//!
//! On network namespaces (root and ip(8), skipped loudly otherwise): a
//! 3 s cable pull changes nothing, not even a transfer in progress; a 20 s
//! one removes the proxies within the keepalive window and they come back;
//! an importer suspended while its session died reconnects and resyncs
//! when resumed; an exporter sheds 100 WATCH sessions of a host that
//! vanished without a FIN and serves others throughout; a host unplugged
//! without BYE leaves within its ttl and is back within 2 s of its return;
//! an address added after dipusd started is announced within 2 s.
//!
//! The timings asserted come from the code: the exporter's keepalive every
//! 5 s and the importer's 15 s of silence (src/import.rs), the 20 s TCP
//! user timeout and, on relayed streams, the 20 s of unanswered data seen
//! at looks 5 s apart (src/net.rs), the 0.5 s-to-30 s backoff, announcements at
//! start, +1 s, +2 s, then every ttl/3.

mod common;

use common::lan::Lan;
use common::netns::Host;
use common::service::{
    assert_error, assert_success, egid, euid, group_name, sockets, start_exporter, text, user_name, wait_for_socket,
};
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The exporter's WATCH keepalive interval.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// No byte for this long and the importer drops the session.
const SILENCE: Duration = Duration::from_secs(15);
/// Grace for timers and a loaded machine (two cores shared by the suite).
const SLACK: Duration = Duration::from_secs(1);

const FRUIT: &[u8] = b"pear\napple\nfig\n";
const SORTED: &str = "apple\nfig\npear\n";

/// Starts `dipus-export-pipe --mode 0666 COMMAND NAME/PROTO` with `cmd`
/// (made by the caller for its host) and waits for its socket.
fn export_with(root: &TestRoot, cmd: &mut Command, spec: &str) -> u32 {
    let (name, protocol) = spec.split_once('/').unwrap();
    let pid = root.spawn(cmd);
    wait_for_socket(root, pid, &root.tree().join(format!("exported/{protocol}/{name}.{}..0", root.host)));
    pid
}

// ---------------------------------------------------------------------
// Loopback: successors, long paths, ssh's ControlPath, modes and groups.
// ---------------------------------------------------------------------

/// `hosta`'s tree with an exported sorter and an exporter on 127.0.0.1
/// and 127.0.0.2 (two addresses: two importers of one exporter); returns
/// the tree and the port.
fn loopback_exporter() -> (TestRoot, u16) {
    let root = TestRoot::new().with_host("hosta");
    export_with(
        &root,
        root.cmd("dipus-export-pipe").args(["--mode", "0666", "LC_ALL=C sort", "sorter/text/plain"]),
        "sorter/text/plain",
    );
    let port = start_exporter(&root, &["--bind", "127.0.0.2"]);
    (root, port)
}

/// `dipus-import -f ARGS…` in `root`, waited for until `proxy` (relative
/// to the tree) is a socket; returns its pid.
fn import_foreground(root: &TestRoot, args: &[&str], proxy: &str) -> u32 {
    let pid = root.spawn(root.cmd("dipus-import").arg("-f").args(args));
    wait_for_socket(root, pid, &root.tree().join(proxy));
    pid
}

fn mode_and_group(path: &Path) -> (u32, u32) {
    let meta = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.permissions().mode() & 0o7777, meta.gid())
}

/// Asserts that `dcat SELECTOR` in `root` sorts, quietly.
fn assert_sorts(root: &TestRoot, selector: &str) {
    let out = run_with_timeout(root.cmd("dcat").arg(selector), Some(FRUIT), DEFAULT_TIMEOUT);
    assert_success(&out, &format!("dcat {selector}"));
    assert_eq!(text(&out), (SORTED.to_string(), String::new()), "dcat {selector}");
}

const PROXY: &str = "imported/text/plain/sorter.hosta..0";

/// Issue 10's successor check for the processes that remove sockets on
/// their way out besides the pipe servers (tests/local_pipe.rs has those):
/// an importer's proxy and a dipusd default service.
#[test]
fn an_exiting_importer_or_daemon_never_removes_its_successors_socket() {
    let (_a, port) = loopback_exporter();
    let b = TestRoot::new().with_host("hostb");
    let first = import_foreground(&b, &[&format!("sep://127.0.0.1:{port}")], PROXY);
    let proxy = b.tree().join(PROXY);
    // Someone removes the proxy; a second importer (the same exporter by
    // another address) takes the name.
    std::fs::remove_file(&proxy).unwrap();
    import_foreground(&b, &[&format!("sep://127.0.0.2:{port}")], PROXY);
    let successor = std::fs::symlink_metadata(&proxy).unwrap().ino();
    let status = common::service::stop(&b, first, "TERM");
    assert_eq!(status.code(), Some(0), "the first importer after SIGTERM");
    assert_eq!(std::fs::symlink_metadata(&proxy).map(|m| m.ino()).ok(), Some(successor), "the successor's proxy");
    assert_sorts(&b, "sorter.hosta");

    // dipusd dropping a default service at SIGHUP, then exiting.
    let c = TestRoot::new();
    let services = c.path().join("services");
    std::fs::write(&services, "who/text/plain local echo daemon\nmark/text/plain local true\n").unwrap();
    let pidfile = c.path().join("dipusd.pid");
    let mut daemon = None;
    for _ in 0..5 {
        let _ = std::fs::remove_file(&pidfile);
        let pid = c.spawn(c.cmd("dipusd").args(["--no-discovery", "--port", &free_port().to_string()]).args([
            "--services".as_ref(),
            services.as_os_str(),
            "--pidfile".as_ref(),
            pidfile.as_os_str(),
        ]));
        wait_until(DEFAULT_TIMEOUT, "dipusd writes its pidfile", || {
            !c.with_child(pid, |child| child.is_running()) || pidfile.exists()
        });
        if c.with_child(pid, |child| child.is_running()) {
            daemon = Some(pid);
            break;
        }
    }
    let daemon = daemon.expect("dipusd started on one of 5 free ports");
    let who = c.tree().join("local/text/plain/who.testhost..0");
    assert!(common::service::is_socket(&who), "dipusd's service is there once its pidfile is");
    std::fs::remove_file(&who).unwrap();
    let (_, path) = common::service::serve(&c, "echo successor", "who/text/plain", "local/text/plain/who.testhost..0");
    std::fs::write(&services, "").unwrap();
    c.with_child(daemon, |child| assert!(child.signal("HUP"), "SIGHUP dipusd"));
    // The reload is done when the other service it drops is gone.
    let mark = c.tree().join("local/text/plain/mark.testhost..0");
    wait_until(DEFAULT_TIMEOUT, "dipusd drops its services at SIGHUP", || !mark.exists());
    assert!(common::service::is_socket(&path), "dipusd's reload removed its successor's socket");
    assert_eq!(common::service::stop(&c, daemon, "TERM").code(), Some(0), "dipusd after SIGTERM");
    assert!(common::service::is_socket(&path), "dipusd removed its successor's socket");
    assert_eq!(common::service::ask(&c, "who", b""), "successor\n");
}

/// A path that no UNIX socket address can hold: 120 bytes.
fn over_long(root: &TestRoot) -> String {
    let dir = root.path().display().to_string();
    let file = "/x.testhost..0";
    let path = format!("{dir}/{}{file}", "d".repeat(120 - dir.len() - 1 - file.len()));
    assert_eq!(path.len(), 120);
    path
}

#[test]
fn every_applet_taking_a_path_or_name_refuses_one_too_long_for_sun_path_up_front() {
    let root = TestRoot::new();
    let path = over_long(&root);
    let needles = [path.as_str(), "120 bytes", "107"];
    for applet in ["dcat", "dls", "dipus-service-monitor"] {
        let out = run_with_timeout(root.cmd(applet).arg(&path), None, DEFAULT_TIMEOUT);
        assert_error(&out, 64, applet, &needles);
    }
    // A name whose socket would be too long: 60 + 60 bytes of protocol.
    let protocol = format!("{}/{}", "p".repeat(60), "q".repeat(60));
    for (applet, scope) in [("dipus-local-pipe", "local"), ("dipus-export-pipe", "exported")] {
        let socket = format!("{}/{scope}/{protocol}/svc.testhost..0", root.tree().display());
        let out = run_with_timeout(root.cmd(applet).args(["cat", &format!("svc/{protocol}")]), None, DEFAULT_TIMEOUT);
        assert_error(&out, 64, applet, &[&socket, &format!("{} bytes", socket.len()), "107"]);
    }
    assert!(!root.tree().exists(), "a refused name created the tree");

    // An import into a root where no service could ever fit: refused
    // before any connection is tried (nothing listens on port 1).
    let deep = root.path().join("r".repeat(100 - root.path().as_os_str().len()));
    let shortest = format!("{}/imported/p/n.h..0", deep.display());
    let out = run_with_timeout(
        root.cmd("dipus-import").env("DIPUS_ROOT", &deep).arg("sep://127.0.0.1:1"),
        None,
        DEFAULT_TIMEOUT,
    );
    let stderr = assert_error(&out, 64, "dipus-import", &[&shortest, &format!("{} bytes", shortest.len()), "107"]);
    assert!(!stderr.contains("connect"), "the import tried to connect first: {stderr}");
    assert!(!deep.exists(), "the refused import created its root");
}

#[test]
fn the_ssh_control_path_is_the_short_hashed_form_in_the_users_scope() {
    let root = TestRoot::new();
    let args_file = root.path().join("ssh-args");
    let fake_ssh = root.path().join("fake-ssh");
    std::fs::write(&fake_ssh, format!("#!/bin/sh\nprintf '%s\\n' \"$@\" > {}\nexit 1\n", args_file.display())).unwrap();
    std::fs::set_permissions(&fake_ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run_with_timeout(
        root.cmd("dcat").env("DIPUS_SSH", &fake_ssh).arg("ssh://some-rather-long-host-name.example.org/x"),
        None,
        DEFAULT_TIMEOUT,
    );
    assert!(!out.status.success(), "dcat over a failing ssh succeeded");
    let args = std::fs::read_to_string(&args_file).expect("the fake ssh ran");
    let user = user_name(euid()).unwrap_or_else(|| format!("uid{}", euid()));
    let control = format!("ControlPath={}/{user}/.ssh-%C", root.tree().display());
    assert!(args.lines().any(|arg| arg == control), "no {control:?} among ssh's arguments:\n{args}");
    // %C is a 40-digit hash: the socket ssh makes fits, whatever the host.
    let expanded = control.trim_start_matches("ControlPath=").len() - 2 + 40;
    assert!(expanded <= 107, "the control socket would be {expanded} bytes");
}

/// Import proxies take `--mode` and `--group`, from dipus-import and from
/// dipusd (ssh imports' 0600 default is the ssh tests').
#[test]
fn import_proxies_take_the_mode_and_group_asked_for() {
    let (_a, port) = loopback_exporter();
    let group = (1..65535)
        .filter(|&gid| gid != egid())
        .find_map(|gid| group_name(gid).map(|name| (gid, name)))
        .expect("a group other than ours in /etc/group");
    let b = TestRoot::new().with_host("hostb");
    let uri = format!("sep://127.0.0.1:{port}");
    import_foreground(&b, &["--mode", "0660", "--group", &group.1, &uri], PROXY);
    assert_eq!(mode_and_group(&b.tree().join(PROXY)), (0o660, group.0), "dipus-import --mode 0660 --group {}", group.1);
    assert_sorts(&b, "sorter.hosta");

    let c = TestRoot::new().with_host("hostc");
    std::fs::write(c.path().join("services"), "").unwrap();
    let services = c.path().join("services").display().to_string();
    let port_arg = free_port().to_string();
    let daemon = c.spawn(c.cmd("dipusd").args([
        "--no-discovery",
        "--port",
        &port_arg,
        "--services",
        &services,
        "--mode",
        "0600",
        "--host",
        &uri,
    ]));
    wait_for_socket(&c, daemon, &c.tree().join(PROXY));
    assert_eq!(mode_and_group(&c.tree().join(PROXY)), (0o600, egid()), "dipusd --mode 0600");
    assert_sorts(&c, "sorter.hosta");
}

// ---------------------------------------------------------------------
// Network namespaces.
// ---------------------------------------------------------------------

impl Lan {
    /// `sep://<address of host index>` (the default port).
    fn uri(&self, index: usize) -> String {
        format!("sep://{}", self.host(index).addr())
    }

    /// `dipus-export-pipe --mode 0666 COMMAND NAME/PROTO` on host `index`.
    fn export(&self, index: usize, command: &str, spec: &str) -> u32 {
        export_with(
            self.root(index),
            &mut self.on(index, "dipus-export-pipe", &["--mode", "0666", command, spec]),
            spec,
        )
    }

    /// The exporter on host `index`, waited for until host `client` can
    /// list it; returns its pid.
    fn start_exporter(&self, index: usize, client: usize) -> u32 {
        let pid = self.root(index).spawn(&mut self.on(index, "dipus-exporter", &[]));
        wait_until(DEFAULT_TIMEOUT, "the exporter is reachable", || {
            assert!(self.root(index).with_child(pid, |c| c.is_running()), "the exporter exited");
            try_run_with_timeout(&mut self.on(client, "dls", &["-1", &self.uri(index)]), None, DEFAULT_TIMEOUT)
                .is_ok_and(|out| out.status.success())
        });
        pid
    }

    /// `dipus-import -f sep://<host exporter>` on host `index`, waited for
    /// until `proxy` is imported; returns its pid.
    fn import(&self, index: usize, exporter: usize, proxy: &str) -> u32 {
        let root = self.root(index);
        let pid = root.spawn(&mut self.on(index, "dipus-import", &["-f", &self.uri(exporter)]));
        wait_for_socket(root, pid, &root.tree().join(proxy));
        pid
    }

    /// Starts `dipusd ARGS… --pidfile F` on host `index` and waits for the
    /// pidfile, written once it has announced itself; returns its pid.
    fn start_dipusd(&self, index: usize, args: &[&str]) -> u32 {
        let root = self.root(index);
        let pidfile = root.path().join("dipusd.pid");
        let _ = std::fs::remove_file(&pidfile);
        let pidfile_arg = pidfile.display().to_string();
        let mut args = args.to_vec();
        args.extend(["--pidfile", &pidfile_arg]);
        let pid = root.spawn(&mut self.on(index, "dipusd", &args));
        wait_until(DEFAULT_TIMEOUT, &format!("dipusd on {} writes its pidfile", root.host), || {
            if let Some(status) = root.with_child(pid, |c| c.try_status()) {
                panic!("dipusd on {} exited ({status}) before it was ready", root.host);
            }
            std::fs::read_to_string(&pidfile).is_ok_and(|text| text == format!("{pid}\n"))
        });
        pid
    }

    fn imported(&self, index: usize) -> Vec<String> {
        sockets(&self.root(index).tree().join("imported"))
    }

    fn has(&self, index: usize, relative: &str) -> bool {
        std::fs::symlink_metadata(self.root(index).tree().join(relative)).is_ok()
    }

    /// `dcat SELECTOR` on host `index` with unsorted fruit.
    fn dcat(&self, index: usize, selector: &str) -> Output {
        run_with_timeout(&mut self.on(index, "dcat", &[selector]), Some(FRUIT), DEFAULT_TIMEOUT)
    }

    fn assert_sorts(&self, index: usize, selector: &str) {
        let out = self.dcat(index, selector);
        assert_success(&out, &format!("dcat {selector} on {}", self.root(index).host));
        assert_eq!(text(&out), (SORTED.to_string(), String::new()), "dcat {selector}");
    }
}

/// `ss -Htn ARGS…` in `host`'s namespace: established TCP connections.
fn established(host: &Host, filter: &[&str]) -> Vec<String> {
    let mut args = vec!["-Htnp", "state", "established"];
    args.extend(filter);
    let out = run_with_timeout(&mut host.cmd("ss", &args), None, DEFAULT_TIMEOUT);
    assert_success(&out, "ss");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Local ports of the established TCP connections of process `pid`.
fn tcp_ports_of(host: &Host, pid: u32) -> Vec<u16> {
    let owner = format!("pid={pid},");
    let mut ports: Vec<u16> = established(host, &[])
        .iter()
        .filter(|line| line.contains(&owner))
        .filter_map(|line| line.split_whitespace().nth(2)?.rsplit_once(':')?.1.parse().ok())
        .collect();
    ports.sort();
    ports
}

/// Polls `cond` every 100 ms (for conditions that run a command);
/// panics mentioning `what` after `timeout`.
fn poll_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `what` every 100 ms for `period`, asserting `ok` each time.
fn hold_for(period: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < period {
        assert!(ok(), "{what} failed {:?} into the period", start.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A reproducible byte stream (xorshift64), to send and to check against.
struct Stream {
    state: u64,
    ready: Vec<u8>,
    used: usize,
}

impl Stream {
    fn new(seed: u64) -> Stream {
        Stream { state: seed, ready: Vec::new(), used: 0 }
    }

    /// The next `count` bytes of the stream.
    fn take(&mut self, count: usize) -> &[u8] {
        if self.used + count > self.ready.len() {
            self.ready.drain(..self.used);
            self.used = 0;
            while self.ready.len() < count {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.ready.extend_from_slice(&self.state.to_le_bytes());
            }
        }
        self.used += count;
        &self.ready[self.used - count..self.used]
    }
}

const BLIP_BYTES: u64 = 64 << 20;
const BLIP_CHUNK: usize = 256 << 10;
/// 256 chunks, one every 30 ms: about 8 s of transfer, which the blip
/// lands in the middle of.
const BLIP_PACE: Duration = Duration::from_millis(30);

#[test]
fn a_three_second_blip_changes_nothing_and_a_transfer_through_it_completes_identical() {
    let Some(lan) = Lan::new(&["hosta", "hostb"]) else { return };
    lan.export(0, "cat", "echo/application/octet-stream");
    lan.start_exporter(0, 1);
    let proxy = "imported/application/octet-stream/echo.hosta..0";
    let importer = lan.import(1, 0, proxy);
    let session = tcp_ports_of(lan.host(1), importer);
    assert_eq!(session.len(), 1, "the importer's TCP connections before the transfer: {session:?}");

    let mut client = ChildGuard::spawn(
        lan.on(1, "dcat", &["echo.hosta"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()),
    );
    let mut stdin = client.0.stdin.take().unwrap();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut stream = Stream::new(0x9e37_79b9_7f4a_7c15);
        for _ in 0..BLIP_BYTES as usize / BLIP_CHUNK {
            stdin.write_all(stream.take(BLIP_CHUNK))?;
            std::thread::sleep(BLIP_PACE);
        }
        Ok(())
    });
    let echoed = Arc::new(AtomicU64::new(0));
    let mut stdout = client.0.stdout.take().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let counter = Arc::clone(&echoed);
    std::thread::spawn(move || {
        let mut expected = Stream::new(0x9e37_79b9_7f4a_7c15);
        let mut buffer = vec![0u8; 1 << 16];
        let verdict = loop {
            match stdout.read(&mut buffer) {
                Ok(0) => break Ok(()),
                Ok(count) => {
                    let at = counter.fetch_add(count as u64, Ordering::Relaxed);
                    if buffer[..count] != *expected.take(count) {
                        break Err(format!("the echo differs within bytes {at}..{}", at + count as u64));
                    }
                }
                Err(error) => break Err(format!("reading the echo: {error}")),
            }
        };
        let _ = done_tx.send(verdict);
    });
    let present = || lan.has(1, proxy);

    // The blip, in the middle of the transfer.
    hold_for(Duration::from_secs(2), "the proxy before the blip", present);
    let before = echoed.load(Ordering::Relaxed);
    lan.host(0).link_down();
    hold_for(Duration::from_secs(3), "the proxy during the blip", present);
    lan.host(0).link_up();
    let during = echoed.load(Ordering::Relaxed);
    eprintln!("echoed {before} bytes before the blip, {during} by its end, of {BLIP_BYTES}");
    assert!(before > 0 && during < BLIP_BYTES, "the blip was not in the middle of the transfer");

    // Until the transfer ends, the proxy stays.
    let start = Instant::now();
    let verdict = loop {
        assert!(present(), "the proxy vanished {:?} after the blip", start.elapsed());
        match done_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(verdict) => break verdict,
            Err(mpsc::RecvTimeoutError::Timeout) if start.elapsed() < Duration::from_secs(120) => {}
            Err(error) => panic!("the transfer did not end within 120 s of the blip ({error})"),
        }
    };
    eprintln!("transfer done {:?} after the blip", start.elapsed());
    writer.join().unwrap().expect("all of stdin written");
    assert_eq!(verdict, Ok(()));
    assert_eq!(echoed.load(Ordering::Relaxed), BLIP_BYTES, "bytes echoed");
    let status = client.wait_timeout(DEFAULT_TIMEOUT).expect("dcat exits after the echo");
    let mut stderr = String::new();
    client.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!((status.code(), stderr.as_str()), (Some(0), ""));
    // Nothing was redone behind our back: the same WATCH session (the
    // transfer's own connection closes a moment after dcat exits).
    poll_until(DEFAULT_TIMEOUT, "the importer's only connection is its first session", || {
        tcp_ports_of(lan.host(1), importer) == session
    });
}

#[test]
fn after_a_twenty_second_outage_proxies_go_within_the_keepalive_window_and_come_back() {
    let Some(lan) = Lan::new(&["hosta", "hostb"]) else { return };
    lan.export(0, "LC_ALL=C sort", "sorter/text/plain");
    lan.start_exporter(0, 1);
    lan.import(1, 0, PROXY);

    lan.host(0).link_down();
    let cut = Instant::now();
    wait_until(SILENCE + SLACK, "the proxies are removed", || lan.imported(1).is_empty());
    let lost = cut.elapsed();
    eprintln!("proxies gone {lost:?} after the cut");
    // The last keepalive came at most 5 s before the cut.
    assert!(lost >= SILENCE - KEEPALIVE - SLACK / 2, "given up after only {lost:?}");
    let outage = Duration::from_secs(20);
    hold_for(outage.saturating_sub(cut.elapsed()), "no proxy while the cable is out", || lan.imported(1).is_empty());

    lan.host(0).link_up();
    let up = Instant::now();
    // The backoff is at most 30 s; a connect pending since the outage is
    // retried by TCP itself.
    wait_until(Duration::from_secs(35), "the proxies are back", || {
        lan.imported(1) == [PROXY.trim_start_matches("imported/")]
    });
    eprintln!("proxies back {:?} after the cable", up.elapsed());
    lan.assert_sorts(1, "sorter.hosta");
}

#[test]
fn a_suspended_importer_whose_session_died_reconnects_and_resyncs_when_resumed() {
    let Some(lan) = Lan::new(&["hosta", "hostb"]) else { return };
    lan.export(0, "LC_ALL=C sort", "sorter/text/plain");
    lan.start_exporter(0, 1);
    let importer = lan.import(1, 0, PROXY);
    let session = tcp_ports_of(lan.host(1), importer);
    assert_eq!(session.len(), 1, "the importer's session: {session:?}");

    // The laptop sleeps, and the network moves on without it: while the
    // cable is out a service appears and the exporter gives the session up
    // (its keepalives unacknowledged for the 20 s user timeout), so on
    // resume the importer holds a session that is dead at the far end
    // (half-open, or already timed out by its own kernel's keepalive).
    lan.root(1).with_child(importer, |c| c.stop());
    let stopped = Instant::now();
    lan.host(0).link_down();
    lan.export(0, "tr a-z A-Z", "upper/text/plain");
    let exporter_side = || established(lan.host(0), &["( sport = :7347 )"]);
    poll_until(Duration::from_secs(40), "the exporter gives up the session", || exporter_side().is_empty());
    eprintln!("the exporter gave up {:?} into the suspension", stopped.elapsed());
    lan.host(0).link_up();
    assert!(stopped.elapsed() > SILENCE, "suspended for only {:?}", stopped.elapsed());
    lan.root(1).with_child(importer, |c| c.cont());
    let resumed = Instant::now();

    let upper = "imported/text/plain/upper.hosta..0";
    wait_until(SILENCE + SLACK, "the service added meanwhile is imported", || lan.has(1, upper));
    eprintln!("resynced {:?} after SIGCONT, suspended {:?}", resumed.elapsed(), resumed - stopped);
    let now = tcp_ports_of(lan.host(1), importer);
    assert!(now.len() == 1 && now != session, "the session was not redone: {session:?} then {now:?}");
    assert_eq!(lan.imported(1), ["text/plain/sorter.hosta..0", "text/plain/upper.hosta..0"]);
    let out = run_with_timeout(&mut lan.on(1, "dcat", &["upper"]), Some(b"awake\n"), DEFAULT_TIMEOUT);
    assert_success(&out, "dcat upper");
    assert_eq!(text(&out), ("AWAKE\n".to_string(), String::new()));
}

/// Open descriptors of process `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|dir| dir.count()).unwrap_or(0)
}

/// `count` WATCH sessions to `exporter` from inside network namespace
/// `ns`, each read up to its `= synced`: a thread joins the namespace (a
/// thread's own, not the process's), connects, and hands the sockets back.
fn watch_sessions_from(ns: &str, exporter: SocketAddr, count: usize) -> Vec<TcpStream> {
    let ns_path = PathBuf::from("/run/netns").join(ns);
    std::thread::spawn(move || {
        let namespace = std::fs::File::open(&ns_path).unwrap_or_else(|e| panic!("{}: {e}", ns_path.display()));
        // SAFETY: setns on a descriptor we own; it moves only this thread,
        // which ends once the sockets are made.
        if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            panic!("setns {}: {}", ns_path.display(), std::io::Error::last_os_error());
        }
        (0..count)
            .map(|index| {
                let mut stream = TcpStream::connect_timeout(&exporter, DEFAULT_TIMEOUT)
                    .unwrap_or_else(|e| panic!("WATCH session {index}: {e}"));
                stream.set_read_timeout(Some(DEFAULT_TIMEOUT)).unwrap();
                stream.write_all(b"SEP/1 WATCH\n").unwrap();
                let mut received = Vec::new();
                let mut byte = [0u8];
                while !received.ends_with(b"= synced\n") {
                    stream.read_exact(&mut byte).unwrap_or_else(|e| panic!("WATCH session {index}: {e}"));
                    received.push(byte[0]);
                }
                assert!(received.starts_with(b"SEP/1 200 OK\n"), "{:?}", String::from_utf8_lossy(&received));
                stream
            })
            .collect()
    })
    .join()
    .expect("the WATCH sessions")
}

#[test]
fn an_exporter_sheds_a_hundred_watch_sessions_of_a_vanished_host_and_serves_others_throughout() {
    let Some(lan) = Lan::new(&["hosta", "hostb", "hostc"]) else { return };
    lan.export(0, "LC_ALL=C sort", "sorter/text/plain");
    let exporter = lan.start_exporter(0, 1);
    let address = SocketAddr::from((lan.host(0).addr(), 7347));
    let idle = descriptors(exporter);

    let sessions = watch_sessions_from(lan.host(2).name(), address, 100);
    wait_until(DEFAULT_TIMEOUT, "the exporter holds the 100 sessions", || descriptors(exporter) >= idle + 100);

    // B uses the exporter every second, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let uses = Arc::new(AtomicU64::new(0));
    let user = {
        let (stop, failures, uses) = (Arc::clone(&stop), Arc::clone(&failures), Arc::clone(&uses));
        let mut dcat = lan.on(1, "dcat", &[&format!("sep://{}/sorter", lan.host(0).addr())]);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                match try_run_with_timeout(&mut dcat, Some(FRUIT), DEFAULT_TIMEOUT) {
                    Ok(out) if out.status.success() && text(&out) == (SORTED.to_string(), String::new()) => {}
                    other => failures.lock().unwrap().push(format!("{other:?}")),
                }
                uses.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
            }
        })
    };

    // C vanishes: the cable goes first, so not even a FIN leaves it.
    lan.host(2).pull_cable();
    lan.host(2).delete();
    let vanished = Instant::now();
    let deadline = vanished + Duration::from_secs(30);
    while descriptors(exporter) > idle {
        assert!(Instant::now() < deadline, "{} descriptors 30 s after, {idle} idle", descriptors(exporter));
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "idle again {:?} after the host vanished; B used it {} times",
        vanished.elapsed(),
        uses.load(Ordering::Relaxed)
    );
    stop.store(true, Ordering::Relaxed);
    user.join().expect("B's user");
    assert_eq!(*failures.lock().unwrap(), Vec::<String>::new(), "B's dcats that failed");
    assert!(uses.load(Ordering::Relaxed) >= 5, "B used the exporter only {} times", uses.load(Ordering::Relaxed));
    lan.assert_sorts(1, &format!("sep://{}/sorter", lan.host(0).addr()));
    // Closed only now, with nowhere to send a FIN to.
    drop(sessions);
}

#[test]
fn a_host_unplugged_without_bye_leaves_within_its_ttl_and_is_back_within_two_seconds() {
    let Some(lan) = Lan::new(&["hosta", "hostb"]) else { return };
    let ttl = Duration::from_secs(6);
    let ttl_arg = ttl.as_secs().to_string();
    let daemon = lan.start_dipusd(0, &["--ttl", &ttl_arg]);
    lan.start_dipusd(1, &["--ttl", &ttl_arg]);
    lan.export(0, "LC_ALL=C sort", "sorter/text/plain");
    wait_until(Duration::from_secs(5), "A's sorter imported on B", || lan.has(1, PROXY));

    // Unplugged and dead at once: no BYE, no FIN, half-open sessions.
    lan.host(0).link_down();
    lan.root(0).with_child(daemon, |c| c.kill9()).expect("A's dipusd dies");
    let gone = Instant::now();
    wait_until(ttl + Duration::from_secs(2), "A's imports gone from B", || !lan.has(1, PROXY));
    let left = gone.elapsed();
    eprintln!("A gone from B {left:?} after it vanished");
    // Not an end-of-stream: the announcements expired (the last one came
    // at most ttl/3 plus jitter before).
    assert!(left >= ttl / 2, "gone after only {left:?}, before its announcements could expire");
    let out = lan.dcat(1, "sorter");
    assert_error(&out, 69, "dcat", &["sorter"]);

    lan.host(0).link_up();
    let restarted = Instant::now();
    lan.start_dipusd(0, &["--ttl", &ttl_arg]);
    // The pidfile is written after the first announcement went out.
    let announced = Instant::now();
    wait_until(Duration::from_secs(2), "A's imports back on B", || lan.has(1, PROXY));
    eprintln!(
        "A back on B {:?} after its first announcement ({:?} after the restart)",
        announced.elapsed(),
        restarted.elapsed()
    );
    lan.assert_sorts(1, "sorter.hosta");
}

#[test]
fn an_address_added_after_dipusd_started_is_announced_within_two_seconds() {
    let Some(lan) = Lan::new(&["hosta", "hostb"]) else { return };
    let a = lan.host(0);
    let out = run_with_timeout(
        Command::new("ip").args(["-n", a.name(), "addr", "flush", "dev", "eth0"]),
        None,
        DEFAULT_TIMEOUT,
    );
    assert_success(&out, "ip addr flush");
    lan.start_dipusd(1, &[]);
    lan.export(0, "LC_ALL=C sort", "sorter/text/plain");
    lan.start_dipusd(0, &[]);
    hold_for(Duration::from_secs(1), "B does not see A without its address", || !lan.has(1, PROXY));

    let added = Instant::now();
    a.add_addr(&format!("{}/24", a.addr()));
    wait_until(Duration::from_secs(2), "A's sorter imported on B", || lan.has(1, PROXY));
    eprintln!("A seen on B {:?} after its address was added", added.elapsed());
    // A's exporter admits B: its default allow list followed the address.
    lan.assert_sorts(1, "sorter.hosta");
}

/// The exporter's host drops off the network in the middle of a transfer
/// (the cable, not the service): dcat must not take the silence for the
/// end of the reply. Once its data has gone unacknowledged for 20 s (seen
/// at two looks 5 s apart, see net::PeerCheck), it exits
/// 74 naming the failed connection, not 0 with a short output.
#[test]
fn a_link_that_fails_mid_transfer_is_an_error_for_dcat_not_a_short_reply() {
    let Some(lan) = Lan::new(&["hosta", "hostb"]) else { return };
    lan.export(0, "cat", "echo/text/plain");
    lan.start_exporter(0, 1);
    let uri = format!("{}/echo", lan.uri(0));
    let (mut dcat, stdin, down) = echo_then_cut(&lan, &uri);
    let status = dcat.wait_timeout(Duration::from_secs(45)).expect("dcat gives up once its data went unacknowledged");
    lan.host(0).link_up();
    let mut stderr = String::new();
    dcat.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    eprintln!("dcat ended {:?} after the cable: {status}, {stderr:?}", down.elapsed());
    assert_eq!(status.code(), Some(74), "{stderr}");
    assert!(stderr.contains("the connection to the service failed"), "{stderr}");
    drop(stdin);
}

/// `dcat SELECTOR` on host 1 to host 0's echo service: a line echoed
/// (the transfer is under way), then host 0's cable out and more sent,
/// which now goes unacknowledged. Returns dcat, its stdin (still open)
/// and when the cable went.
fn echo_then_cut(lan: &Lan, selector: &str) -> (ChildGuard, std::process::ChildStdin, Instant) {
    let mut dcat = ChildGuard::spawn(
        lan.on(1, "dcat", &[selector]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()),
    );
    let mut stdin = dcat.0.stdin.take().unwrap();
    let mut stdout = dcat.0.stdout.take().unwrap();
    stdin.write_all(b"before\n").unwrap();
    let mut got = [0u8; 7];
    stdout.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"before\n");
    lan.host(0).link_down();
    let down = Instant::now();
    stdin.write_all(&[b'x'; 4096]).unwrap();
    (dcat, stdin, down)
}

/// The exporter's host drops off in the middle of a transfer through an
/// import. The relayed connection has no TCP user timeout (a paused reader
/// must not be cut), so the importer itself notices that nothing it sends
/// is acknowledged any more, and ends the connection within the same 20 s
/// (and two looks, 5 s apart) rather than after TCP's fifteen minutes of
/// retransmissions: the client is not left hanging.
#[test]
fn a_link_that_fails_mid_transfer_through_an_import_is_ended_not_left_hanging() {
    let Some(lan) = Lan::new(&["hosta", "hostb"]) else { return };
    lan.export(0, "cat", "echo/text/plain");
    lan.start_exporter(0, 1);
    let importer = lan.import(1, 0, "imported/text/plain/echo.hosta..0");
    let (mut dcat, stdin, down) = echo_then_cut(&lan, "echo.hosta");
    poll_until(Duration::from_secs(45), "the importer ends its connections to the vanished host", || {
        tcp_ports_of(lan.host(1), importer).is_empty()
    });
    let ended = down.elapsed();
    // The client's connection was closed with it: dcat's reply ends.
    let status = dcat.wait_timeout(DEFAULT_TIMEOUT).expect("dcat's reply ends with the connection");
    lan.host(0).link_up();
    eprintln!("the import's connections ended {ended:?} after the cable; dcat {status}");
    assert!(ended >= Duration::from_secs(15), "given up after only {ended:?}");
    drop(stdin);
}

/// The client's host drops off while the exporter sends it a stream: the
/// exporter's relayed connection has no TCP user timeout (a paused reader
/// must not be cut), so the exporter itself notices that what it sends is
/// acknowledged no more, and closes the connection (and the service's)
/// within the same 20 s and two looks 5 s apart, rather than after TCP's
/// fifteen minutes of retransmissions.
#[test]
fn an_exporter_ends_a_stream_to_a_host_that_dropped_off_mid_transfer() {
    let Some(lan) = Lan::new(&["hosta", "hostb"]) else { return };
    lan.export(0, "cat /dev/zero", "zero/application/octet-stream");
    lan.start_exporter(0, 1);
    let uri = format!("{}/zero", lan.uri(0));
    let mut dcat = ChildGuard::spawn(lan.on(1, "dcat", &[&uri]).stdin(Stdio::piped()).stdout(Stdio::piped()));
    // Kept open: the connection stays established (not half-closed).
    let _stdin = dcat.0.stdin.take().unwrap();
    let mut stdout = dcat.0.stdout.take().unwrap();
    let (flowing_tx, flowing) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 64 << 10];
        let mut total = 0;
        while let Ok(count @ 1..) = stdout.read(&mut buffer) {
            total += count;
            if total >= 1 << 20 {
                let _ = flowing_tx.send(());
            }
        }
    });
    flowing.recv_timeout(DEFAULT_TIMEOUT).expect("the stream flows");
    let relays = || established(lan.host(0), &["( sport = :7347 )"]);
    assert_eq!(relays().len(), 1, "the exporter relays one connection");
    lan.host(1).link_down();
    let down = Instant::now();
    poll_until(Duration::from_secs(45), "the exporter closes the connection to the vanished host", || {
        relays().is_empty()
    });
    let ended = down.elapsed();
    lan.host(1).link_up();
    eprintln!("the exporter ended the stream {ended:?} after the cable");
    assert!(ended >= Duration::from_secs(15), "given up after only {ended:?}");
}
