//! dipusd on a LAN of three hosts (network namespaces on one bridge; root
//! and ip(8) needed, skipped loudly otherwise), each running nothing but
//! `dipusd` with its own tree and host name (h1, h2, h3). A service
//! exported on h1 is used by its plain name on h2 and h3 soon after it
//! appears and is gone from them soon after it goes; h1's dipusd killed,
//! restarted and stopped cleanly takes its services away from the others
//! and brings them back; `dipus-discoverer` lists the other hosts.

mod common;

use common::lan::Lan;
use common::service::{assert_success, sockets, text, wait_for_socket};
use common::*;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

/// A new service is usable on the other hosts this soon.
const APPEAR: Duration = Duration::from_secs(2);
/// A removed service, or a host that said BYE, is gone this soon.
const VANISH: Duration = Duration::from_secs(1);
/// The ttl h1 announces in the kill test, and the grace for the timers.
const SHORT_TTL: u64 = 4;
const TTL_GRACE: Duration = Duration::from_secs(2);
/// A restarted host's services are back this soon.
const RETURN: Duration = Duration::from_secs(3);

/// The sorter as the others import it.
const SORTER: &str = "imported/text/plain/sorter.h1..0";

/// The three hosts h1, h2, h3.
fn three_hosts() -> Option<Lan> {
    Lan::new(&["h1", "h2", "h3"])
}

impl Lan {
    /// Starts `dipusd ARGS… --pidfile F` on host `index` and waits for the
    /// pidfile, written once its sockets are bound; returns its pid.
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

    /// Starts dipusd with `args` on every host.
    fn start_all(&self, args: &[&str]) -> Vec<u32> {
        (0..3).map(|index| self.start_dipusd(index, args)).collect()
    }

    /// `dipus-export-pipe --mode 0666 COMMAND NAME/PROTO` on host `index`;
    /// waits for its socket and returns the server's pid and when the
    /// socket was first seen.
    fn export(&self, index: usize, command: &str, spec: &str) -> (u32, Instant) {
        let root = self.root(index);
        let (name, protocol) = spec.split_once('/').unwrap();
        let pid = root.spawn(&mut self.on(index, "dipus-export-pipe", &["--mode", "0666", command, spec]));
        wait_for_socket(root, pid, &root.tree().join(format!("exported/{protocol}/{name}.{}..0", root.host)));
        (pid, Instant::now())
    }

    fn has(&self, index: usize, relative: &str) -> bool {
        std::fs::symlink_metadata(self.root(index).tree().join(relative)).is_ok()
    }

    /// `dcat SELECTOR` on host `index` with unsorted fruit.
    fn dcat(&self, index: usize, selector: &str) -> Output {
        run_with_timeout(&mut self.on(index, "dcat", &[selector]), Some(b"pear\napple\nfig\n"), DEFAULT_TIMEOUT)
    }

    /// Asserts that `dcat sorter` on host `index` sorts, quietly.
    fn assert_sorts(&self, index: usize) {
        let out = self.dcat(index, "sorter");
        assert_success(&out, &format!("dcat sorter on {}", self.root(index).host));
        assert_eq!(text(&out), ("apple\nfig\npear\n".to_string(), String::new()));
    }

    /// Asserts that `dcat sorter` on host `index` finds no such service.
    fn assert_no_sorter(&self, index: usize) {
        let out = self.dcat(index, "sorter");
        common::service::assert_error(&out, 69, "dcat", &["sorter"]);
    }

    /// Waits until the sorter of h1 is usable on h2 and h3, at most
    /// `within` after `since`.
    fn wait_sorter_on_others(&self, since: Instant, within: Duration, what: &str) {
        for index in [1, 2] {
            wait_until(within.saturating_sub(since.elapsed()), &format!("{what} on h{}", index + 1), || {
                self.has(index, SORTER)
            });
            self.assert_sorts(index);
        }
        let took = since.elapsed();
        eprintln!("{what}: {took:?}");
        assert!(took <= within, "{what} took {took:?}, more than {within:?}");
    }

    /// Waits until the sorter of h1 is gone from h2 and h3, at most
    /// `within` after `since`.
    fn wait_sorter_gone_from_others(&self, since: Instant, within: Duration, what: &str) {
        for index in [1, 2] {
            wait_until(within.saturating_sub(since.elapsed()), &format!("{what} on h{}", index + 1), || {
                !self.has(index, SORTER)
            });
        }
        eprintln!("{what}: {:?}", since.elapsed());
        for index in [1, 2] {
            self.assert_no_sorter(index);
        }
    }
}

#[test]
fn a_service_exported_on_h1_is_used_on_h2_and_h3_and_goes_when_it_goes() {
    let Some(lan) = three_hosts() else { return };
    lan.start_all(&[]);
    let (sorter, created) = lan.export(0, "LC_ALL=C sort", "sorter/text/plain");
    lan.wait_sorter_on_others(created, APPEAR, "the new sorter usable on h2 and h3");

    // Measured from the signal: the socket goes a moment after it.
    let removed = Instant::now();
    let status = lan.root(0).with_child(sorter, |c| c.terminate(DEFAULT_TIMEOUT)).expect("the sorter stops");
    assert_eq!(status.code(), Some(0));
    assert!(!lan.root(0).tree().join("exported/text/plain/sorter.h1..0").exists());
    lan.wait_sorter_gone_from_others(removed, VANISH, "the removed sorter gone from h2 and h3");
}

#[test]
fn h1s_daemon_killed_restarted_and_stopped_takes_its_services_away_and_brings_them_back() {
    let Some(lan) = three_hosts() else { return };
    let ttl = SHORT_TTL.to_string();
    let pids = lan.start_all(&["--ttl", &ttl]);
    let (_, created) = lan.export(0, "LC_ALL=C sort", "sorter/text/plain");
    lan.wait_sorter_on_others(created, APPEAR, "the sorter usable on h2 and h3");

    let killed = Instant::now();
    lan.root(0).with_child(pids[0], |c| c.kill9()).expect("h1's dipusd dies");
    let window = Duration::from_secs(SHORT_TTL) + TTL_GRACE;
    lan.wait_sorter_gone_from_others(killed, window, "h1's sorter gone after the kill");

    let restarted = Instant::now();
    let daemon = lan.start_dipusd(0, &["--ttl", &ttl]);
    lan.wait_sorter_on_others(restarted, RETURN, "h1's sorter back after the restart");

    // h1 imports too: a service of h2, which must go with h1's dipusd.
    let (_, created) = lan.export(1, "tr a-z A-Z", "upper/text/plain");
    wait_until(APPEAR.saturating_sub(created.elapsed()), "h2's upper imported on h1", || {
        lan.has(0, "imported/text/plain/upper.h2..0")
    });
    let out = run_with_timeout(&mut lan.on(0, "dcat", &["upper"]), Some(b"shout\n"), DEFAULT_TIMEOUT);
    assert_success(&out, "dcat upper on h1");
    assert_eq!(text(&out), ("SHOUT\n".to_string(), String::new()));

    let stopped = Instant::now();
    let status = lan.root(0).with_child(daemon, |c| c.terminate(VANISH));
    let status = status.unwrap_or_else(|| panic!("h1's dipusd still runs {VANISH:?} after SIGTERM"));
    assert_eq!(status.code(), Some(0), "h1's dipusd after SIGTERM");
    lan.wait_sorter_gone_from_others(stopped, VANISH, "h1's sorter gone after its BYE");
    assert_eq!(sockets(&lan.root(0).tree().join("imported")), Vec::<String>::new());
    assert_eq!(sockets(&lan.root(0).tree()), ["exported/text/plain/sorter.h1..0"], "h1's own service stays");
}

#[test]
fn the_discoverer_on_h3_lists_h1_and_h2_and_not_itself() {
    let Some(lan) = three_hosts() else { return };
    lan.start_all(&[]);
    let out = run_with_timeout(&mut lan.on(2, "dipus-discoverer", &[]), None, DEFAULT_TIMEOUT);
    assert_success(&out, "dipus-discoverer on h3");
    assert_eq!(
        text(&out),
        (format!("h1 {} 7347\nh2 {} 7347\n", lan.host(0).addr(), lan.host(1).addr()), String::new())
    );
}

#[test]
fn a_discovery_port_that_is_no_port_is_a_usage_error() {
    // Refused before any socket is opened: a typo must not put the applet
    // on the LAN's discovery port instead. Run on a host of its own, so
    // that a regression broadcasts only there.
    let Some(lan) = Lan::new(&["h1"]) else { return };
    let runs: [(&str, &[&str]); 3] = [
        ("dipus-discoverer", &["-t", "0.1"]),
        ("dipusd", &["--port", "0", "--services", "/dev/null"]),
        ("dipus-ssh-importer", &["--discover"]),
    ];
    let cases: [(&OsStr, &str); 2] = [
        (OsStr::new("7347x"), "DIPUS_DISCOVERY_PORT=\"7347x\" is not a port number"),
        (OsStr::from_bytes(b"73\xff"), "DIPUS_DISCOVERY_PORT=\"73\\xFF\" is not valid UTF-8"),
    ];
    for ((applet, args), (value, message)) in runs.into_iter().flat_map(|run| cases.map(|case| (run, case))) {
        let out = run_with_timeout(lan.on(0, applet, args).env("DIPUS_DISCOVERY_PORT", value), None, DEFAULT_TIMEOUT);
        common::service::assert_error(&out, 64, applet, &[message]);
    }
}

#[test]
fn the_discoverer_watching_ends_when_its_reader_goes_away_while_no_exporter_is_heard() {
    // On a host of its own: the discoverer asks the LAN at start.
    let Some(lan) = Lan::new(&["h1"]) else { return };
    let mut child =
        ChildGuard::spawn(lan.on(0, "dipus-discoverer", &["-w"]).stdin(Stdio::null()).stdout(Stdio::piped()));
    // The reader leaves before anything is printed: `| head -1` on a LAN
    // that stays as it is.
    drop(child.0.stdout.take());
    let status = child.wait_timeout(Duration::from_secs(3));
    assert_eq!(status.map(|s| s.code()), Some(Some(0)), "the discoverer kept watching for no one");
}

/// A host that leaves (here a `BYE` from h1's address, while its dipusd
/// goes on: one datagram from socat) has its import stopped, and started
/// again at its next announcement, but a transfer already relayed through
/// the import is no part of that: it goes on to the end, byte for byte (it
/// used to be cut, which its client took for the end of the reply). A
/// host that moves is stopped the same way.
#[test]
fn a_transfer_through_an_import_outlives_the_import_being_stopped() {
    use std::io::{Read, Write};
    let Some(lan) = three_hosts() else { return };
    if !require(have_command("socat"), "socat, to send the BYE") {
        return;
    }
    lan.start_dipusd(0, &[]);
    lan.start_dipusd(1, &[]);
    lan.export(0, "cat", "echo/application/octet-stream");
    let proxy = "imported/application/octet-stream/echo.h1..0";
    wait_until(APPEAR, "the echo imported on h2", || lan.has(1, proxy));

    let mut client = ChildGuard::spawn(
        lan.on(1, "dcat", &["echo.h1"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()),
    );
    // 16 MiB in 64 paced chunks: about 3 s, which the move lands in.
    let chunk: Vec<u8> = (0..256 * 1024u32).map(|n| (n.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let mut stdin = client.0.stdin.take().unwrap();
    let sent = chunk.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        for _ in 0..64 {
            stdin.write_all(&sent)?;
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    });
    let mut stdout = client.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut echoed = Vec::new();
        stdout.read_to_end(&mut echoed).map(|_| echoed)
    });
    std::thread::sleep(Duration::from_millis(800));
    let datagram = "DIPUS/1 BYE host=h1\n";
    let target = format!("UDP-DATAGRAM:{}:7347,broadcast", lan.net.broadcast());
    let out = run_with_timeout(
        &mut lan.host(0).cmd("socat", ["-u", "-", target.as_str()]),
        Some(datagram.as_bytes()),
        DEFAULT_TIMEOUT,
    );
    assert_success(&out, "socat sending the BYE");
    // h2 takes h1 for gone: the import is stopped (and made again).
    wait_until(DEFAULT_TIMEOUT, "the import stopped on h2", || !lan.has(1, proxy));

    writer.join().unwrap().expect("all of stdin written");
    let echoed = reader.join().unwrap().expect("the echo read");
    let status = client.wait_timeout(DEFAULT_TIMEOUT).expect("dcat exits after the echo");
    let mut stderr = String::new();
    client.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!((status.code(), stderr.as_str()), (Some(0), ""));
    assert_eq!(echoed.len(), 64 * chunk.len(), "bytes echoed");
    assert!(echoed.chunks(chunk.len()).all(|piece| piece == chunk.as_slice()), "the echo differs");
}

/// Two live hosts with one name (h1 and a clone of it, as a copied VM
/// would be): h2 keeps importing the first it heard, for as long as that
/// one announces, and says once that the name is announced twice. Each
/// announcement of the other used to move the host: h2's import flipped
/// between the two every second or so, its proxy going and coming.
#[test]
fn a_host_name_announced_by_two_hosts_stays_with_the_first() {
    use std::os::unix::fs::MetadataExt;
    let Some(lan) = Lan::new(&["h1", "h2", "h1"]) else { return };
    // Announcements every second, so that a flip would show at once.
    let ttl = ["--ttl", "3"];
    lan.start_dipusd(0, &ttl);
    lan.start_dipusd(2, &ttl);
    for (index, answer) in [(0, "first"), (2, "clone")] {
        let root = lan.root(index);
        let pid = root.spawn(&mut lan.on(
            index,
            "dipus-export-pipe",
            &["--mode", "0666", &format!("echo {answer}"), "who/text/plain"],
        ));
        wait_for_socket(root, pid, &root.tree().join("exported/text/plain/who.h1..0"));
    }
    let pidfile = lan.root(1).path().join("dipusd.pid");
    let mut args = ttl.to_vec();
    args.extend(["--pidfile", pidfile.to_str().unwrap()]);
    let mut guard = ChildGuard::spawn(lan.on(1, "dipusd", &args).stdin(Stdio::null()).stderr(Stdio::piped()));
    let mut stderr = common::child::LineReader::new(guard.0.stderr.take().unwrap());
    let daemon = lan.root(1).adopt(guard);
    let proxy = "imported/text/plain/who.h1..0";
    wait_until(DEFAULT_TIMEOUT, "h1's who imported on h2", || lan.has(1, proxy));
    let who = || {
        let out = run_with_timeout(&mut lan.on(1, "dcat", &["who"]), None, DEFAULT_TIMEOUT);
        assert_success(&out, "dcat who on h2");
        text(&out).0
    };
    let kept = who();
    let (kept_index, other_index) = if kept == "first\n" { (0, 2) } else { (2, 0) };
    let inode = |relative: &str| std::fs::symlink_metadata(lan.root(1).tree().join(relative)).map(|m| m.ino()).ok();
    let proxy_inode = inode(proxy);

    // Three ttls: some nine announcements of each.
    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        assert_eq!(who(), kept, "h2's import of h1 moved to the other h1");
        assert_eq!(inode(proxy), proxy_inode, "h2's proxy of h1's who was made again");
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = lan.root(1).with_child(daemon, |c| c.terminate(DEFAULT_TIMEOUT));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "h2's dipusd after SIGTERM");
    let (lines, _) = stderr.rest(DEFAULT_TIMEOUT);
    let (kept_address, other_address) = (lan.host(kept_index).addr(), lan.host(other_index).addr());
    assert_eq!(
        lines,
        [format!(
            "[WARN  dipus::discovery] host h1 is announced from {kept_address} and {other_address}; keeping \
             {kept_address}; two hosts have one name?"
        )]
    );
}
