//! SEP/1 between two hosts: network namespaces A and B on a private
//! bridge (root and ip(8) needed, skipped loudly otherwise), each with its
//! own tree and host name. A exports a sorter and runs the exporter; B uses
//! it with dcat, dls and socat over sep://, imports it, pushes 256 MiB
//! through the import, and sees A's services come and go, A's exporter die
//! and return, and A fall silent.

mod common;

use common::data::{Digest, Random};
use common::netns::{Host, Net};
use common::service::{assert_success, sockets, text, wait_for_socket};
use common::*;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Services appear and vanish on the importer this soon (the tree watcher
/// and the WATCH stream are event-driven; the margin is for a loaded box).
const SYNC: Duration = Duration::from_millis(1500);
/// A session silent for 15 s (three keepalives) is lost; timers add a bit.
const SILENCE: Duration = Duration::from_secs(16);
/// The importer's backoff reaches 30 s at worst.
const RETRY: Duration = Duration::from_secs(35);
/// 256 MiB through three relays in a debug build, on two cores.
const BULK_TIMEOUT: Duration = Duration::from_secs(180);

/// Hosts A (`hosta`, exporting) and B (`hostb`, using it). Fields drop in
/// order: the namespaces and every process in them go first.
struct Lan {
    net: Net,
    a: TestRoot,
    b: TestRoot,
}

impl Lan {
    /// None (after a loud skip) without root or ip(8).
    fn new() -> Option<Lan> {
        let net = Net::new(2)?;
        Some(Lan { net, a: TestRoot::new().with_host("hosta"), b: TestRoot::new().with_host("hostb") })
    }

    fn host_a(&self) -> &Host {
        self.net.host(0)
    }

    fn host_b(&self) -> &Host {
        self.net.host(1)
    }

    /// `sep://<A's address>` (the default port).
    fn uri(&self) -> String {
        format!("sep://{}", self.host_a().addr())
    }

    /// APPLET ARGS… on A, in A's tree.
    fn on_a(&self, applet: &str, args: &[&str]) -> Command {
        on(self.host_a(), &self.a, applet, args)
    }

    /// APPLET ARGS… on B, in B's tree.
    fn on_b(&self, applet: &str, args: &[&str]) -> Command {
        on(self.host_b(), &self.b, applet, args)
    }

    /// Exports `dipus-export-pipe --mode 0666 COMMAND NAME/PROTO` on A and
    /// waits for its socket; returns the server's pid.
    fn export(&self, command: &str, spec: &str) -> u32 {
        let (name, protocol) = spec.split_once('/').unwrap();
        let pid = self.a.spawn(&mut self.on_a("dipus-export-pipe", &["--mode", "0666", command, spec]));
        wait_for_socket(&self.a, pid, &self.a.tree().join(format!("exported/{protocol}/{name}.hosta..0")));
        pid
    }

    /// Starts the exporter on A and waits until B can list its services;
    /// returns its pid.
    fn start_exporter(&self) -> u32 {
        let pid = self.a.spawn(&mut self.on_a("dipus-exporter", &[]));
        wait_until(DEFAULT_TIMEOUT, "B reaches A's exporter", || {
            assert!(self.a.with_child(pid, |c| c.is_running()), "the exporter exited");
            try_run_with_timeout(&mut self.on_b("dls", &["-1", &self.uri()]), None, DEFAULT_TIMEOUT)
                .is_ok_and(|out| out.status.success())
        });
        pid
    }

    /// `dipus-import sep://A` on B: asserted to return quietly, the
    /// importer left running in B's namespace.
    fn import(&self) {
        let out = run_with_timeout(&mut self.on_b("dipus-import", &[&self.uri()]), None, Duration::from_secs(20));
        assert_success(&out, "dipus-import");
        assert_eq!((out.stdout.as_slice(), String::from_utf8_lossy(&out.stderr).as_ref()), (&b""[..], ""));
    }

    /// The sockets in B's imported/, as sorted relative paths.
    fn imported(&self) -> Vec<String> {
        sockets(&self.b.tree().join("imported"))
    }
}

/// `ip netns exec HOST APPLET ARGS…` with `root`'s tree and host name.
fn on(host: &Host, root: &TestRoot, applet: &str, args: &[&str]) -> Command {
    let mut cmd = host.cmd(applet_bin(applet), args);
    cmd.env("DIPUS_ROOT", root.tree())
        .env("DIPUS_HOSTNAME", &root.host)
        .env_remove("DIPUS_PORT")
        .env_remove("RUST_LOG");
    if let Some(level) = std::env::var_os("DIPUS_TEST_LOG") {
        cmd.env("RUST_LOG", level);
    }
    cmd
}

/// Asserts that `cmd` (a dcat) sorts unsorted fruit, quietly.
fn assert_sorts(cmd: &mut Command) {
    let out = run_with_timeout(cmd, Some(b"pear\napple\nfig\n"), DEFAULT_TIMEOUT);
    assert_success(&out, &format!("{:?}", cmd.get_args().collect::<Vec<_>>()));
    assert_eq!(text(&out), ("apple\nfig\npear\n".to_string(), String::new()));
}

#[test]
fn dcat_on_b_sorts_with_the_sorter_of_a() {
    let Some(lan) = Lan::new() else { return };
    lan.export("LC_ALL=C sort", "sorter/text/plain");
    lan.start_exporter();
    assert_sorts(&mut lan.on_b("dcat", &[&format!("{}/sorter", lan.uri())]));
}

#[test]
fn dls_on_b_lists_the_services_of_a() {
    let Some(lan) = Lan::new() else { return };
    lan.export("LC_ALL=C sort", "sorter/text/plain");
    lan.start_exporter();
    let out = run_with_timeout(&mut lan.on_b("dls", &["-1", &lan.uri()]), None, DEFAULT_TIMEOUT);
    assert_success(&out, "dls -1");
    assert_eq!(text(&out), ("text/plain/sorter.hosta..0\n".to_string(), String::new()));
}

#[test]
fn an_imported_service_is_used_by_its_plain_name() {
    let Some(lan) = Lan::new() else { return };
    lan.export("LC_ALL=C sort", "sorter/text/plain");
    lan.start_exporter();
    lan.import();
    assert_eq!(lan.imported(), ["text/plain/sorter.hosta..0"]);
    assert_sorts(&mut lan.on_b("dcat", &["sorter.hosta"]));
}

const BIG: usize = 256 << 20;

#[test]
fn big_random_data_through_the_import_comes_back_identical() {
    let Some(lan) = Lan::new() else { return };
    lan.export("cat", "echo/application/octet-stream");
    lan.start_exporter();
    lan.import();
    let mut client = ChildGuard::spawn(
        lan.on_b("dcat", &["echo.hosta"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()),
    );
    let mut stdin = client.0.stdin.take().unwrap();
    // Generated and hashed while it is written, so nothing is kept.
    let writer = std::thread::spawn(move || -> std::io::Result<(u64, u64)> {
        let mut random = Random(0x9e37_79b9_7f4a_7c15);
        let mut digest = Digest::new();
        let mut buffer = vec![0u8; 1 << 20];
        for _ in 0..BIG / buffer.len() {
            random.fill(&mut buffer);
            digest.update(&buffer);
            stdin.write_all(&buffer)?;
        }
        Ok(digest.finish())
    });
    let mut stdout = client.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut digest = Digest::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            match stdout.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => digest.update(&buffer[..n]),
            }
        }
        let _ = tx.send(digest.finish());
    });
    // On timeout the guard kills dcat, which ends both threads.
    let got = rx.recv_timeout(BULK_TIMEOUT).expect("the echo ends in time");
    let expected = writer.join().unwrap().expect("all of stdin written");
    assert_eq!(expected.0, BIG as u64);
    let status = client.wait_timeout(DEFAULT_TIMEOUT).expect("dcat exits after the reply");
    let mut stderr = String::new();
    client.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!((status.code(), stderr.as_str()), (Some(0), ""));
    assert_eq!(got, expected, "(length, hash) of what came back");
}

/// Longer than TCP's 20 s user timeout, which Linux also applies to a
/// zero window: a reader pausing this long had its stream cut after a few
/// hundred kilobytes, and dcat exited 0.
const READER_PAUSE: Duration = Duration::from_secs(26);

/// A reader that pauses (`dcat … | less`, a suspended client) holds the
/// stream up across the TCP leg, directly over sep:// and through an
/// import alike, for as long as it likes: when it reads on, the rest is
/// all there.
#[test]
fn a_reader_that_pauses_longer_than_the_tcp_timeouts_gets_the_whole_stream() {
    const SIZE: usize = 32 << 20;
    let Some(lan) = Lan::new() else { return };
    let file = lan.a.tree().with_file_name("source.bin");
    let mut expected = Digest::new();
    {
        let mut out = std::fs::File::create(&file).unwrap();
        let mut random = Random(0x2545_f491_4f6c_dd1d);
        let mut buffer = vec![0u8; 1 << 20];
        for _ in 0..SIZE / buffer.len() {
            random.fill(&mut buffer);
            expected.update(&buffer);
            out.write_all(&buffer).unwrap();
        }
    }
    let expected = expected.finish();
    lan.export(&format!("cat {}", file.display()), "source/application/octet-stream");
    lan.start_exporter();
    lan.import();
    let direct = format!("{}/source", lan.uri());
    let readers: Vec<_> = [direct.as_str(), "source.hosta"]
        .into_iter()
        .map(|selector| {
            let mut client = ChildGuard::spawn(
                lan.on_b("dcat", &[selector]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()),
            );
            let mut stdout = client.0.stdout.take().unwrap();
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut digest = Digest::new();
                let mut buffer = vec![0u8; 64 << 10];
                let mut first = true;
                loop {
                    match stdout.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => digest.update(&buffer[..n]),
                    }
                    if std::mem::take(&mut first) {
                        std::thread::sleep(READER_PAUSE);
                    }
                }
                let _ = tx.send(digest.finish());
            });
            (selector.to_string(), client, rx)
        })
        .collect();
    for (selector, mut client, rx) in readers {
        let got = rx.recv_timeout(READER_PAUSE + BULK_TIMEOUT).expect("the stream ends in time");
        let status = client.wait_timeout(DEFAULT_TIMEOUT).expect("dcat exits after the stream");
        let mut stderr = String::new();
        client.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        assert_eq!((status.code(), stderr.as_str()), (Some(0), ""), "dcat {selector}");
        assert_eq!(got, expected, "(length, hash) through dcat {selector}");
    }
}

#[test]
fn services_appearing_and_vanishing_on_a_are_mirrored_on_b_within_a_second() {
    let Some(lan) = Lan::new() else { return };
    lan.export("LC_ALL=C sort", "sorter/text/plain");
    lan.start_exporter();
    lan.import();
    let proxy = lan.b.tree().join("imported/text/plain/echo.hosta..0");
    let present = || std::fs::symlink_metadata(&proxy).is_ok();

    let echo = lan.export("cat", "echo/text/plain");
    let appeared = Instant::now();
    wait_until(SYNC, "the new service is imported", present);
    eprintln!("appeared on B {:?} after A", appeared.elapsed());
    assert_eq!(lan.imported(), ["text/plain/echo.hosta..0", "text/plain/sorter.hosta..0"]);

    let status = common::service::stop(&lan.a, echo, "TERM");
    assert_eq!(status.code(), Some(0));
    let vanished = Instant::now();
    wait_until(SYNC, "the removed service is gone", || !present());
    eprintln!("vanished on B {:?} after A", vanished.elapsed());
    assert_eq!(lan.imported(), ["text/plain/sorter.hosta..0"]);
}

#[test]
fn a_killed_exporter_takes_the_proxies_along_and_a_restarted_one_brings_them_back() {
    let Some(lan) = Lan::new() else { return };
    lan.export("LC_ALL=C sort", "sorter/text/plain");
    let exporter = lan.start_exporter();
    lan.import();
    assert_eq!(lan.imported(), ["text/plain/sorter.hosta..0"]);

    lan.a.with_child(exporter, |c| c.kill9()).expect("the exporter dies");
    let killed = Instant::now();
    wait_until(SILENCE, "the proxies are removed", || lan.imported().is_empty());
    eprintln!("proxies gone {:?} after the kill", killed.elapsed());

    lan.start_exporter();
    let restarted = Instant::now();
    wait_until(RETRY, "the proxies are back", || lan.imported() == ["text/plain/sorter.hosta..0"]);
    eprintln!("proxies back {:?} after the restart", restarted.elapsed());
    assert_sorts(&mut lan.on_b("dcat", &["sorter.hosta"]));
}

#[test]
fn a_silent_exporter_is_given_up_after_three_keepalives_and_found_again() {
    let Some(lan) = Lan::new() else { return };
    lan.export("LC_ALL=C sort", "sorter/text/plain");
    lan.start_exporter();
    lan.import();
    assert_eq!(lan.imported(), ["text/plain/sorter.hosta..0"]);

    // No FIN, no reset: only the missing keepalives tell.
    lan.host_a().link_down();
    let down = Instant::now();
    wait_until(SILENCE + Duration::from_secs(1), "the proxies are removed", || lan.imported().is_empty());
    let lost = down.elapsed();
    eprintln!("proxies gone {lost:?} after the link went down");
    assert!(lost >= Duration::from_secs(9), "given up after only {lost:?}: keepalives were missed for 10 s at most");

    lan.host_a().link_up();
    let up = Instant::now();
    wait_until(RETRY, "the proxies are back", || lan.imported() == ["text/plain/sorter.hosta..0"]);
    eprintln!("proxies back {:?} after the link came up", up.elapsed());
    assert_sorts(&mut lan.on_b("dcat", &["sorter.hosta"]));
}

#[test]
fn socat_on_b_speaks_sep_to_the_exporter_of_a() {
    if !require(have_command("socat"), "needs socat") {
        return;
    }
    let Some(lan) = Lan::new() else { return };
    lan.export("LC_ALL=C sort", "sorter/text/plain");
    lan.start_exporter();
    let socat = || lan.host_b().cmd("socat", ["-t", "5", "-", &format!("TCP:{}:7347", lan.host_a().addr())]);
    for (request, expected) in [
        (&b"SEP/1 PING\n"[..], "SEP/1 200 OK\n"),
        (b"SEP/1 LIST\n", "SEP/1 200 OK\ntext/plain/sorter.hosta..0\n"),
        (b"SEP/1 CONNECT text/plain/sorter.hosta..0\npear\napple\nfig\n", "SEP/1 200 OK\napple\nfig\npear\n"),
        (b"SEP/1 CONNECT text/plain/nothing.hosta..0\n", "SEP/1 404 no such service: text/plain/nothing.hosta..0\n"),
    ] {
        let out = run_with_timeout(&mut socat(), Some(request), DEFAULT_TIMEOUT);
        assert_success(&out, "socat");
        assert_eq!(text(&out), (expected.to_string(), String::new()), "{:?}", String::from_utf8_lossy(request));
    }
}
