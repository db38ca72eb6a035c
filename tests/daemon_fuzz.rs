//! dipusd's discovery port under attack: from one namespace of a private
//! LAN (root and ip(8) needed, skipped loudly otherwise), thousands of
//! malformed and hostile datagrams go to dipusd's UDP port 7347 in another
//! (unicast and broadcast): oversize, binary garbage, NULs, host names
//! that try to be paths, out-of-range numbers, duplicated keys, a flood of
//! valid announcements for 500 fake hosts at a port nobody listens on, and
//! BYEs for hosts never announced. Afterwards the daemon's tree holds
//! nothing but the expected layout, nothing appeared beside it, and the
//! daemon still answers a discoverer and a dcat from a third namespace.
//!
//! The sender is the test itself: a thread enters the attacker's network
//! namespace (setns), binds its UDP sockets there and comes back out; the
//! sockets stay in that namespace. The attacker sends from many addresses
//! and paces itself under the daemon's per-source rate limit, and in
//! chunks the daemon's receive buffer holds, so that every datagram is
//! parsed: the daemon's discovery log (at debug level) counts them, and
//! each chunk waits for its count before the next one goes.

mod common;

use common::netns::{Host, Net};
use common::service::{assert_success, sockets, wait_for_socket};
use common::*;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Addresses the attacker sends from (the daemon limits each source).
const SOURCES: u8 = 64;
/// The daemon lets a source send 40 at once and 20 a second after that;
/// the attacker stays below both.
const BURST: f64 = 36.0;
const PER_SECOND: f64 = 16.0;
/// Datagrams sent before waiting for the daemon to have read them all.
const CHUNK: usize = 50;
/// An unreachable exporter port for the fake hosts (nothing listens).
const NOWHERE: u16 = 9;

/// What the daemon logs for a datagram (`RUST_LOG=dipus::discovery=debug`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// Malformed: `…: dropped: …`.
    Dropped,
    /// A new host: `…: exporter at …`.
    Joined,
    /// Another address claims the daemon's own host name.
    OwnName,
    /// Nothing: a BYE for a host it does not know, a QUERY.
    Silent,
}

impl Expect {
    fn of_line(line: &str) -> Option<Expect> {
        if line.contains(": dropped: ") {
            Some(Expect::Dropped)
        } else if line.contains(": exporter at ") {
            Some(Expect::Joined)
        } else if line.contains("announces our own host name") {
            Some(Expect::OwnName)
        } else {
            None
        }
    }
}

struct Datagram {
    bytes: Vec<u8>,
    expect: Expect,
}

fn datagram(bytes: impl Into<Vec<u8>>, expect: Expect) -> Datagram {
    Datagram { bytes: bytes.into(), expect }
}

/// xorshift64: deterministic garbage without a crate.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

/// Hand-written malformed datagrams, each one dropped by the parser.
fn malformed() -> Vec<Datagram> {
    let announce = |fields: &str| format!("DIPUS/1 ANNOUNCE {fields}");
    let mut texts: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"\n".to_vec(),
        b"\0".to_vec(),
        b"\0\0\0\0\0\0\0\0".to_vec(),
        b"DIPUS/1 QUERY\0".to_vec(),
        b"DIPUS/1 ANNOUNCE host=a\0b port=1 ttl=5".to_vec(),
        b"DIPUS/1 ANNOUNCE host=h\xc3\xa9llo port=1 ttl=5".to_vec(),
        b"DIPUS/1 QUERY\r\n".to_vec(),
        b"DIPUS/1 QUERY\n\n".to_vec(),
        b"DIPUS/1 BYE host=a\nDIPUS/1 BYE host=b".to_vec(),
        b"\xff\xfe\xfd".to_vec(),
        format!("{} {}", announce("host=a port=1 ttl=5"), "x".repeat(600)).into_bytes(),
        vec![b'D'; 513],
    ];
    let hosts = [
        "../../etc",
        "a/b",
        "",
        &"a".repeat(100),
        &"a".repeat(65),
        ".",
        "..",
        "a..b",
        ".a",
        "a.",
        "/etc",
        "a/..",
        "..\\x",
        "%2e%2e",
        "~root",
        "*",
        "a:b",
        "$(id)",
    ];
    for host in hosts {
        texts.push(announce(&format!("host={host} port=1 ttl=5")).into_bytes());
        texts.push(format!("DIPUS/1 BYE host={host}").into_bytes());
    }
    for fields in [
        "host=a port=1 ttl=99999999999",
        "host=a port=1 ttl=4294967296",
        "host=a port=1 ttl=3601",
        "host=a port=1 ttl=0",
        "host=a port=1 ttl=-1",
        "host=a port=1 ttl=",
        "host=a port=0 ttl=5",
        "host=a port=65536 ttl=5",
        "host=a port=+80 ttl=5",
        "host=a port=0x50 ttl=5",
        "host=a port= ttl=5",
        "host=a host=b port=1 ttl=5",
        "host=a port=1 port=2 ttl=5",
        "host=a port=1 ttl=5 ttl=5",
        "host=a port=1",
        "port=1 ttl=5",
        "=x host=a port=1 ttl=5",
        "host",
        "host=a  port=1 ttl=5",
    ] {
        texts.push(announce(fields).into_bytes());
    }
    for text in [
        "DIPUS/2 QUERY",
        "DIPUS/1  QUERY",
        " DIPUS/1 QUERY",
        "DIPUS/1 QUERY ",
        "DIPUS/1",
        "DIPUS/1 HELLO",
        "DIPUS/1 announce host=a port=1 ttl=5",
        "DIPUS/1 ANNOUNCE",
        "DIPUS/1 BYE",
        "dipus/1 QUERY",
        "GET / HTTP/1.0",
        "SEP/1 LIST",
    ] {
        texts.push(text.as_bytes().to_vec());
    }
    texts.into_iter().map(|bytes| datagram(bytes, Expect::Dropped)).collect()
}

/// Random bytes, and random printable fields without `=` after a valid
/// head: all of them malformed.
fn garbage(random: &mut Random, count: usize) -> Vec<Datagram> {
    const PRINTABLE: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789./-_ +:%";
    (0..count)
        .map(|index| {
            let bytes = if index % 2 == 0 {
                let mut bytes: Vec<u8> = (0..1 + random.below(600)).map(|_| random.next() as u8).collect();
                // Not even the first letter of the magic.
                if bytes[0] == b'D' {
                    bytes[0] = 0;
                }
                bytes
            } else {
                let head = ["DIPUS/1 ANNOUNCE", "DIPUS/1 BYE", "DIPUS/1 QUERY"][random.below(3)];
                let tail: Vec<u8> =
                    (0..1 + random.below(500)).map(|_| PRINTABLE[random.below(PRINTABLE.len())]).collect();
                [head.as_bytes(), b" ", &tail].concat()
            };
            datagram(bytes, Expect::Dropped)
        })
        .collect()
}

/// Well-formed datagrams the daemon must take in its stride: hosts named
/// like the tree's own directories, 500 fake hosts at a port nobody
/// listens on, someone claiming the daemon's name, BYEs for strangers.
fn hostile(victim: &str) -> Vec<Datagram> {
    let mut list = Vec::new();
    for host in ["local", "imported", "exported", "etc", "tmp", "root", "proc", "a.b.c", "_", "-", "x-y_z"] {
        list.push(datagram(format!("DIPUS/1 ANNOUNCE host={host} port={NOWHERE} ttl=3"), Expect::Joined));
    }
    for index in 0..500 {
        list.push(datagram(format!("DIPUS/1 ANNOUNCE host=fake{index} port={NOWHERE} ttl=3"), Expect::Joined));
        if index % 50 == 0 {
            list.push(datagram(format!("DIPUS/1 ANNOUNCE host={victim} port={NOWHERE} ttl=5"), Expect::OwnName));
            list.push(datagram(format!("DIPUS/1 BYE host=stranger{index}"), Expect::Silent));
            list.push(datagram("DIPUS/1 QUERY", Expect::Silent));
        }
    }
    list
}

/// UDP sockets bound to `addresses` inside `host`'s network namespace,
/// broadcast allowed.
fn sockets_in(host: &Host, addresses: Vec<Ipv4Addr>) -> Vec<UdpSocket> {
    let namespace = Path::new("/run/netns").join(host.name());
    std::thread::spawn(move || {
        let file = std::fs::File::open(&namespace).unwrap_or_else(|e| panic!("{}: {e}", namespace.display()));
        // SAFETY: setns on a descriptor we hold; it moves only this
        // thread, which ends here, into the namespace.
        let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns {}: {}", namespace.display(), std::io::Error::last_os_error());
        addresses
            .into_iter()
            .map(|address| {
                let socket = UdpSocket::bind(SocketAddrV4::new(address, 0)).unwrap();
                socket.set_broadcast(true).unwrap();
                socket
            })
            .collect()
    })
    .join()
    .expect("the sockets are made in the namespace")
}

/// Sends datagrams from many sources, each under its rate limit.
struct Attacker {
    sockets: Vec<UdpSocket>,
    tokens: Vec<f64>,
    refilled: Instant,
    next: usize,
}

impl Attacker {
    fn new(sockets: Vec<UdpSocket>) -> Attacker {
        let tokens = vec![BURST; sockets.len()];
        Attacker { sockets, tokens, refilled: Instant::now(), next: 0 }
    }

    /// The next source with a token to spend, waiting for one to refill
    /// if need be (pacing against a rate limit: no event to wait for).
    fn source(&mut self) -> usize {
        loop {
            let elapsed = self.refilled.elapsed().as_secs_f64();
            self.refilled = Instant::now();
            for tokens in &mut self.tokens {
                *tokens = (*tokens + elapsed * PER_SECOND).min(BURST);
            }
            for _ in 0..self.sockets.len() {
                let source = self.next;
                self.next = (self.next + 1) % self.sockets.len();
                if self.tokens[source] >= 1.0 {
                    self.tokens[source] -= 1.0;
                    return source;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send(&mut self, bytes: &[u8], target: SocketAddrV4) {
        let source = self.source();
        let sent = self.sockets[source].send_to(bytes, target).unwrap_or_else(|e| panic!("send to {target}: {e}"));
        assert_eq!(sent, bytes.len());
    }
}

/// The daemon's discovery log, counted by kind.
struct Log {
    lines: LineReader,
    counts: [usize; 3],
}

impl Log {
    fn index(expect: Expect) -> Option<usize> {
        match expect {
            Expect::Dropped => Some(0),
            Expect::Joined => Some(1),
            Expect::OwnName => Some(2),
            Expect::Silent => None,
        }
    }

    /// Reads the log until the counts reach `expected`; panics if that
    /// takes longer than `timeout` or overshoots.
    fn wait_for(&mut self, expected: [usize; 3], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.counts != expected {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(line) = self.lines.next_line(left) else {
                panic!("dipusd logged {:?} (dropped, joined, own name), expected {expected:?}", self.counts);
            };
            if let Some(index) = Expect::of_line(&line).and_then(Log::index) {
                self.counts[index] += 1;
            }
            assert!(
                self.counts.iter().zip(expected).all(|(got, want)| *got <= want),
                "dipusd logged {:?}, more than {expected:?}; last: {line}",
                self.counts
            );
        }
    }
}

/// Whether a file name in a protocol directory is a service's:
/// `NAME.HOST..N`.
fn is_service_file(name: &str) -> bool {
    let Some((stem, index)) = name.rsplit_once("..") else {
        return false;
    };
    let Some((service, host)) = stem.split_once('.') else {
        return false;
    };
    let word = |text: &str, extra: &[u8]| {
        !text.is_empty() && text.bytes().all(|c| c.is_ascii_alphanumeric() || b"_-".contains(&c) || extra.contains(&c))
    };
    word(service, b"+")
        && host.split('.').all(|label| word(label, b""))
        && !index.is_empty()
        && index.bytes().all(|c| c.is_ascii_digit())
}

fn is_protocol_component(name: &str) -> bool {
    name != "."
        && name != ".."
        && !name.is_empty()
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || b"._+-".contains(&c))
}

/// Everything in `tree` that is not the expected layout: scope
/// directories, protocol directories, sockets with service names, and
/// import lock files directly in `imported/`.
fn unexpected(tree: &Path) -> Vec<String> {
    fn walk(dir: &Path, depth: usize, scope: &str, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let file_type = entry.file_type().unwrap();
            let path = entry.path();
            let fine = if file_type.is_dir() {
                is_protocol_component(&name)
            } else if file_type.is_socket() {
                depth > 0 && is_service_file(&name)
            } else {
                depth == 0
                    && scope == "imported"
                    && file_type.is_file()
                    && name.starts_with(".import-")
                    && name.ends_with(".lock")
            };
            if !fine {
                found.push(path.display().to_string());
            } else if file_type.is_dir() {
                walk(&path, depth + 1, scope, found);
            }
        }
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(tree).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if ["local", "exported", "imported"].contains(&name.as_str()) && entry.file_type().unwrap().is_dir() {
            walk(&entry.path(), 0, &name, &mut found);
        } else {
            found.push(entry.path().display().to_string());
        }
    }
    found.sort();
    found
}

/// `ip netns exec HOST APPLET ARGS…` with `root`'s tree and host name.
fn on(host: &Host, root: &TestRoot, applet: &str, args: &[&str]) -> Command {
    let mut cmd = host.cmd(applet_bin(applet), args);
    cmd.env("DIPUS_ROOT", root.tree())
        .env("DIPUS_HOSTNAME", &root.host)
        .env_remove("DIPUS_PORT")
        .env_remove("DIPUS_DISCOVERY_PORT")
        .env_remove("RUST_LOG");
    cmd
}

#[test]
fn a_flood_of_hostile_datagrams_leaves_the_tree_alone_and_the_daemon_answering() {
    let Some(net) = Net::new(3) else { return };
    let (victim_host, attacker_host, observer_host) = (net.host(0), net.host(1), net.host(2));
    let victim = TestRoot::new().with_host("victim");
    let observer = TestRoot::new().with_host("observer");

    // The victim: dipusd, and a sorter it exports.
    let pidfile = victim.path().join("dipusd.pid");
    let mut guard = ChildGuard::spawn(
        on(victim_host, &victim, "dipusd", &["--pidfile", &pidfile.display().to_string()])
            .env("RUST_LOG", "dipus::discovery=debug")
            .stdin(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let mut log = Log { lines: LineReader::new(guard.0.stderr.take().unwrap()), counts: [0; 3] };
    let daemon = victim.adopt(guard);
    wait_until(DEFAULT_TIMEOUT, "dipusd writes its pidfile", || {
        assert!(victim.with_child(daemon, |c| c.is_running()), "dipusd exited");
        std::fs::read_to_string(&pidfile).is_ok_and(|text| text == format!("{daemon}\n"))
    });
    let sorter = victim.spawn(&mut on(
        victim_host,
        &victim,
        "dipus-export-pipe",
        &["--mode", "0666", "LC_ALL=C sort", "sorter/text/plain"],
    ));
    wait_for_socket(&victim, sorter, &victim.tree().join("exported/text/plain/sorter.victim..0"));
    let beside_before = common::service::entries(victim.path());

    // The attacker: many addresses, each a rate-limited source.
    let [a, b, c, _] = attacker_host.addr().octets();
    let addresses: Vec<Ipv4Addr> = (0..SOURCES).map(|i| Ipv4Addr::new(a, b, c, 100 + i)).collect();
    for address in &addresses {
        attacker_host.add_addr(&format!("{address}/24"));
    }
    let mut attacker = Attacker::new(sockets_in(attacker_host, addresses));
    let unicast = SocketAddrV4::new(victim_host.addr(), 7347);
    let broadcast = SocketAddrV4::new(net.broadcast(), 7347);

    let mut random = Random(0x2545_f491_4f6c_dd1d);
    let mut datagrams = malformed();
    datagrams.extend(garbage(&mut random, 2000));
    datagrams.extend(hostile(&victim.host));
    let mut expected = [0usize; 3];
    let started = Instant::now();
    for (chunk_index, chunk) in datagrams.chunks(CHUNK).enumerate() {
        for (index, datagram) in chunk.iter().enumerate() {
            let target = if (chunk_index * CHUNK + index) % 7 == 0 { broadcast } else { unicast };
            attacker.send(&datagram.bytes, target);
            if let Some(kind) = Log::index(datagram.expect) {
                expected[kind] += 1;
            }
        }
        log.wait_for(expected, Duration::from_secs(5));
    }
    eprintln!("{} datagrams in {:?}; logged {:?}", datagrams.len(), started.elapsed(), log.counts);
    assert!(datagrams.len() >= 2500);

    // Nothing but the expected layout, and nothing beside the tree.
    assert!(victim.with_child(daemon, |c| c.is_running()), "dipusd died");
    assert_eq!(unexpected(&victim.tree()), Vec::<String>::new());
    assert_eq!(sockets(&victim.tree()), ["exported/text/plain/sorter.victim..0"]);
    assert_eq!(common::service::entries(victim.path()), beside_before);

    // Still answering: found by a discoverer, its sorter used over SEP.
    let out = run_with_timeout(&mut on(observer_host, &observer, "dipus-discoverer", &[]), None, DEFAULT_TIMEOUT);
    assert_success(&out, "dipus-discoverer");
    assert_eq!(
        (String::from_utf8_lossy(&out.stdout).as_ref(), String::from_utf8_lossy(&out.stderr).as_ref()),
        (format!("victim {} 7347\n", victim_host.addr()).as_str(), "")
    );
    let uri = format!("sep://{}/sorter", victim_host.addr());
    let out =
        run_with_timeout(&mut on(observer_host, &observer, "dcat", &[&uri]), Some(b"pear\napple\n"), DEFAULT_TIMEOUT);
    assert_success(&out, &format!("dcat {uri}"));
    assert_eq!(
        (String::from_utf8_lossy(&out.stdout).as_ref(), String::from_utf8_lossy(&out.stderr).as_ref()),
        ("apple\npear\n", "")
    );
    assert!(victim.with_child(daemon, |c| c.is_running()), "dipusd died");
    assert_eq!(unexpected(&victim.tree()), Vec::<String>::new());
}
