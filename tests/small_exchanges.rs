//! Many small exchanges (issue 9): the traffic of database clients, HTTP
//! clients and RPC tools, through an import of a loopback exporter (UNIX →
//! TCP → UNIX) and through `dipus-local-proxy` (UNIX → UNIX).
//!
//! - 500 concurrent connections through an import, 200 byte-checked round
//!   trips each, and the importer's and exporter's descriptors back to idle;
//! - Nagle: two 1-byte writes 0.5 ms apart answered after both, 200 times;
//! - a peer dribbling one byte at a time and one pausing mid-burst;
//! - out of descriptors: refused cleanly, the rest served, no spinning;
//! - a burst of clients and a stopped proxy: the listen backlog holds 512;
//! - idle connections hold no pipes, bulk ones at most the cap.
//!
//! The services are echo servers in this process (a thread per connection),
//! not `dipus-export-pipe cat`, so the figures measure the relay and not
//! fork. Every blocking socket operation has a timeout, so a stall fails the
//! test instead of hanging it; processes die with their `TestRoot`.

mod common;

use common::service::{listen_at, make_dirs, spawn_exporter_with, wait_for_socket};
use common::*;
use std::collections::BTreeSet;
use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const PROTOCOL: &str = "application/x-echo";
/// Idle pipes the relay keeps pooled per process (`relay::POOL_SIZE`).
const PIPE_POOL: usize = 32;
/// Most pipes the relay holds per process (`relay::MAX_PIPES`).
const MAX_PIPES: usize = 256;
/// How long any one blocking read or write may take before it counts as
/// a stall.
const STALL: Duration = Duration::from_secs(20);

/// xorshift64: reproducible sizes and contents per connection.
struct Xorshift(u64);

impl Xorshift {
    fn new(seed: u64) -> Xorshift {
        Xorshift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    fn bytes(&mut self, length: usize) -> Vec<u8> {
        let mut data = vec![0; length];
        self.fill(&mut data);
        data
    }
}

/// What a service does with one connection.
type Handler = fn(UnixStream);

/// Echoes everything, then passes the client's EOF on.
fn echo(mut stream: UnixStream) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(count) => {
                if stream.write_all(&buffer[..count]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// Answers every two bytes with one, their wrapping sum, and only once
/// both are there: the pattern Nagle plus delayed ACK punishes.
fn answer_pairs(mut stream: UnixStream) {
    let mut pair = [0u8; 2];
    while stream.read_exact(&mut pair).is_ok() {
        if stream.write_all(&[pair[0].wrapping_add(pair[1])]).is_err() {
            return;
        }
    }
}

/// A service in this process: a UNIX listener and a thread per connection.
/// Drop stops accepting; connection threads end when their peers close.
struct Service {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    acceptor: Option<JoinHandle<()>>,
}

impl Service {
    /// Serves `listener` (bound at `path`) with `handler`.
    fn start(listener: UnixListener, path: PathBuf, handler: Handler) -> Service {
        // A burst of clients through a proxy arrives as a burst of connects
        // here too: std's backlog would refuse some of them.
        // SAFETY: listen on a socket we own; Linux updates the backlog.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 4096) }, 0, "listen");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let (stop, accepted) = (Arc::clone(&stop), Arc::clone(&accepted));
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else {
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let spawned = thread::Builder::new().stack_size(256 * 1024).spawn(move || handler(stream)).is_ok();
                    assert!(spawned, "cannot start a service thread");
                }
            })
        };
        Service { path, stop, accepted, acceptor: Some(acceptor) }
    }

    /// An echo service at an absolute path outside any tree.
    fn at(path: PathBuf, handler: Handler) -> Service {
        let listener = UnixListener::bind(&path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        Service::start(listener, path, handler)
    }

    /// `NAME` in `root`'s `exported/PROTOCOL/`, mode 0666 so the exporter
    /// offers it; made before the exporter starts, so its first WATCH
    /// reply already has it.
    fn exported(root: &TestRoot, name: &str, handler: Handler) -> Service {
        make_dirs(root, &format!("exported/{PROTOCOL}"));
        let (listener, path) = listen_at(root, &format!("exported/{PROTOCOL}/{name}.{}..0", root.host));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        Service::start(listener, path, handler)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor, which then sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// `command`'s stderr goes to a file in the root's scratch dir, so the
/// warnings expected here do not clutter the test output.
fn quiet(root: &TestRoot, command: &mut Command, name: &str) {
    let log = std::fs::File::create(root.path().join(format!("{name}.err"))).unwrap();
    command.stdout(Stdio::null()).stderr(log);
}

/// A service of host `hosta` imported into the tree of host `hostb`.
struct Import {
    service: Service,
    _exporting: TestRoot,
    importing: TestRoot,
    exporter: u32,
    /// The exporter's TCP port on 127.0.0.1.
    port: u16,
    importer: u32,
    /// The proxy socket in `hostb`'s `imported/`.
    proxy: PathBuf,
}

/// Exports a `handler` service called `echo` from a tree of `hosta` on a
/// loopback exporter run by `wrap_exporter` and imports it with
/// `dipus-import -f` into `hostb`, run by `wrap_importer` (either e.g.
/// under a lower descriptor limit).
fn import_with(
    handler: Handler,
    wrap_exporter: impl Fn(Command) -> Command,
    wrap_importer: impl FnOnce(Command) -> Command,
) -> Import {
    let exporting = TestRoot::new().with_host("hosta");
    let service = Service::exported(&exporting, "echo", handler);
    let (exporter, port) = spawn_exporter_with(&exporting, &[], |command| {
        let mut command = wrap_exporter(command);
        quiet(&exporting, &mut command, "exporter");
        command
    });
    let importing = TestRoot::new().with_host("hostb");
    let mut command = importing.cmd("dipus-import");
    command.args(["-f", &format!("sep://127.0.0.1:{port}")]);
    let mut command = wrap_importer(command);
    quiet(&importing, &mut command, "import");
    let importer = importing.spawn(&mut command);
    let proxy = importing.tree().join(format!("imported/{PROTOCOL}/echo.hosta..0"));
    wait_for_socket(&importing, importer, &proxy);
    Import { service, _exporting: exporting, importing, exporter, port, importer, proxy }
}

fn import(handler: Handler) -> Import {
    import_with(handler, |command| command, |command| command)
}

/// A service at `<scratch>/target.sock` put in `root`'s `local/` by
/// `dipus-local-proxy`, run by `wrap`.
struct LocalProxy {
    _service: Service,
    pid: u32,
    /// The proxy's socket in `local/`.
    path: PathBuf,
}

fn local_proxy_with(root: &TestRoot, handler: Handler, wrap: impl FnOnce(&TestRoot, Command) -> Command) -> LocalProxy {
    let service = Service::at(root.path().join("target.sock"), handler);
    let mut command = root.cmd("dipus-local-proxy");
    command.arg(&service.path).arg(format!("echo/{PROTOCOL}"));
    let mut command = wrap(root, command);
    quiet(root, &mut command, "proxy");
    let pid = root.spawn(&mut command);
    let path = root.tree().join(format!("local/{PROTOCOL}/echo.{}..0", root.host));
    wait_for_socket(root, pid, &path);
    LocalProxy { _service: service, pid, path }
}

fn local_proxy(root: &TestRoot, handler: Handler) -> LocalProxy {
    local_proxy_with(root, handler, |_, command| command)
}

/// `command` with its soft and hard descriptor limits at `limit` (both:
/// dipus raises its soft limit to the hard one), through `prlimit` when
/// util-linux has it, else through the shell's `ulimit`. Either execs the
/// program, so the pid stays the applet's.
fn with_fd_limit(command: Command, limit: u32) -> Command {
    let mut wrapped = match find_command("prlimit") {
        Some(prlimit) => {
            let mut wrapped = Command::new(prlimit);
            wrapped.arg(format!("--nofile={limit}:{limit}")).arg("--").arg(command.get_program());
            wrapped
        }
        None => {
            let mut wrapped = Command::new("sh");
            wrapped.arg("-c").arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\"")).arg(command.get_program());
            wrapped
        }
    };
    wrapped.args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    wrapped
}

/// A connection with [`STALL`] timeouts both ways.
fn connect(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    bound(&stream);
    stream
}

fn bound(stream: &UnixStream) {
    stream.set_read_timeout(Some(STALL)).unwrap();
    stream.set_write_timeout(Some(STALL)).unwrap();
}

/// A nonblocking connect, as a client with a deadline makes it: a full
/// listen backlog is EAGAIN here instead of a wait. Returns the stream
/// made blocking again.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: a new socket, owned by the stream at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < address.sun_path.len(), "{} is too long for a socket", path.display());
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: a valid address of the size given, on our socket.
    let result = unsafe {
        libc::connect(
            fd,
            (&address as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    stream.set_nonblocking(false)?;
    bound(&stream);
    Ok(stream)
}

/// One message there and back, checked.
fn round_trip(stream: &mut UnixStream, message: &[u8]) -> Result<(), String> {
    stream.write_all(message).map_err(|e| format!("write {} bytes: {e}", message.len()))?;
    let mut reply = vec![0u8; message.len()];
    stream.read_exact(&mut reply).map_err(|e| format!("read {} bytes: {e}", message.len()))?;
    match reply.iter().zip(message).position(|(got, sent)| got != sent) {
        Some(offset) => Err(format!("{} bytes: first wrong byte at {offset}", message.len())),
        None => Ok(()),
    }
}

/// The open descriptors of `pid`: how many are not pipes, and the pipes
/// (both ends of one pipe name the same inode).
fn descriptors(pid: u32) -> (usize, BTreeSet<String>) {
    let mut others = 0;
    let mut pipes = BTreeSet::new();
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"));
    for entry in entries.flatten() {
        // A descriptor closed since the listing has no link any more.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if target.starts_with("pipe:") {
            pipes.insert(target);
        } else {
            others += 1;
        }
    }
    (others, pipes)
}

/// CPU time (user + system) `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    proc::cpu_time(pid).unwrap_or_else(|| panic!("process {pid} is gone"))
}

/// Joins `threads`, each reporting what went wrong with its connection.
fn join_all<T>(threads: Vec<JoinHandle<Result<T, String>>>) -> Vec<T> {
    let mut failures = Vec::new();
    let mut results = Vec::new();
    for (index, thread) in threads.into_iter().enumerate() {
        match thread.join() {
            Ok(Ok(result)) => results.push(result),
            Ok(Err(error)) => failures.push(format!("connection {index}: {error}")),
            Err(_) => failures.push(format!("connection {index}: panicked")),
        }
    }
    let (failed, total) = (failures.len(), failures.len() + results.len());
    let first = failures[..failed.min(20)].join("\n");
    assert!(failures.is_empty(), "{failed} of {total} connections failed; the first:\n{first}");
    results
}

/// A thread for one client connection (small stacks: there are hundreds).
fn client_thread<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> JoinHandle<Result<T, String>> {
    thread::Builder::new().stack_size(256 * 1024).spawn(work).expect("cannot start a client thread")
}

#[test]
fn five_hundred_concurrent_connections_through_an_import() {
    const CONNECTIONS: usize = 500;
    const ROUND_TRIPS: usize = 200;
    const LARGEST: u64 = 64 * 1024;
    let import = import(echo);
    let idle_exporter = descriptors(import.exporter);
    let idle_importer = descriptors(import.importer);

    let started = Instant::now();
    let barrier = Arc::new(Barrier::new(CONNECTIONS));
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|index| {
            let (proxy, barrier) = (import.proxy.clone(), Arc::clone(&barrier));
            client_thread(move || {
                let mut random = Xorshift::new(index as u64 + 1);
                let mut message = vec![0u8; LARGEST as usize];
                let connected = UnixStream::connect(&proxy);
                // Every thread reaches the barrier, or the others wait forever.
                barrier.wait();
                let mut stream = connected.map_err(|e| format!("connect: {e}"))?;
                bound(&stream);
                let mut bytes = 0u64;
                for round in 0..ROUND_TRIPS {
                    let length = (random.next() % LARGEST + 1) as usize;
                    random.fill(&mut message[..length]);
                    round_trip(&mut stream, &message[..length]).map_err(|e| format!("round trip {round}: {e}"))?;
                    bytes += length as u64;
                }
                // The service sees EOF and passes it back: nothing left over.
                stream.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest).map_err(|e| format!("read to EOF: {e}"))?;
                if !rest.is_empty() {
                    return Err(format!("{} bytes after the last reply", rest.len()));
                }
                Ok(bytes)
            })
        })
        .collect();
    let bytes: u64 = join_all(clients).iter().sum();
    let elapsed = started.elapsed();
    eprintln!(
        "{CONNECTIONS} connections × {ROUND_TRIPS} round trips through an import: {:.1} s, {} MiB each way, \
         {:.0} round trips/s",
        elapsed.as_secs_f64(),
        bytes >> 20,
        (CONNECTIONS * ROUND_TRIPS) as f64 / elapsed.as_secs_f64()
    );

    // The connections are gone: so are their descriptors, but for the
    // pipes the relay pools for the next bulk transfer.
    for (name, pid, idle) in
        [("exporter", import.exporter, &idle_exporter), ("importer", import.importer, &idle_importer)]
    {
        let mut now = descriptors(pid);
        let settled = |now: &(usize, BTreeSet<String>)| now.0 == idle.0 && now.1.len() <= idle.1.len() + PIPE_POOL;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !settled(&now) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
            now = descriptors(pid);
        }
        assert!(
            settled(&now),
            "the {name}'s descriptors did not return to idle: {} others and {} pipes, idle {} and {}",
            now.0,
            now.1.len(),
            idle.0,
            idle.1.len()
        );
    }
}

#[test]
fn two_one_byte_writes_are_not_delayed_by_nagle() {
    const EXCHANGES: usize = 200;
    let run = |path: &Path| {
        let mut stream = connect(path);
        let started = Instant::now();
        for index in 0..EXCHANGES {
            let (first, second) = (index as u8, (index * 7) as u8);
            stream.write_all(&[first]).unwrap();
            thread::sleep(Duration::from_micros(500));
            stream.write_all(&[second]).unwrap();
            let mut answer = [0u8; 1];
            stream.read_exact(&mut answer).unwrap_or_else(|e| panic!("exchange {index}: {e}"));
            assert_eq!(answer[0], first.wrapping_add(second), "exchange {index}");
        }
        started.elapsed()
    };
    let import = import(answer_pairs);
    let direct = run(&import.service.path);
    let imported = run(&import.proxy);
    eprintln!(
        "{EXCHANGES} exchanges of two 1-byte writes 0.5 ms apart: {:.3} s direct, {:.3} s through an import",
        direct.as_secs_f64(),
        imported.as_secs_f64()
    );
    assert!(imported < Duration::from_secs(2), "{imported:?} through an import: Nagle on a TCP leg?");
}

/// A peer that sends one byte at a time with pauses, then one that sends
/// 100 KiB messages with a 50 ms pause in the middle of each, through the
/// echo at `path`: every byte comes back, in order, and the EOF after it.
fn dribble_and_burst(path: &Path) {
    let mut random = Xorshift::new(42);
    let dribble = random.bytes(300);
    let messages: Vec<Vec<u8>> = (0..3).map(|_| random.bytes(100 * 1024)).collect();
    let stream = connect(path);
    let mut reader = stream.try_clone().unwrap();
    let collector = thread::spawn(move || {
        let mut got = Vec::new();
        reader.read_to_end(&mut got).map(|_| got)
    });
    let mut writer = stream;
    let started = Instant::now();
    for byte in &dribble {
        writer.write_all(&[*byte]).unwrap();
        thread::sleep(Duration::from_micros(300));
    }
    for message in &messages {
        let middle = message.len() / 2 + 123;
        writer.write_all(&message[..middle]).unwrap();
        thread::sleep(Duration::from_millis(50));
        writer.write_all(&message[middle..]).unwrap();
    }
    writer.shutdown(Shutdown::Write).unwrap();
    let got = collector.join().unwrap().unwrap_or_else(|e| panic!("{}: reading the echo: {e}", path.display()));
    let mut expected = dribble;
    for message in &messages {
        expected.extend_from_slice(message);
    }
    assert_eq!(got.len(), expected.len(), "{}: bytes echoed", path.display());
    if let Some(offset) = got.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!("{}: first wrong byte at {offset}", path.display());
    }
    eprintln!("{}: dribbled and bursty echo in {:.2} s", path.display(), started.elapsed().as_secs_f64());
}

#[test]
fn dribbling_and_bursty_peers_through_an_import() {
    let import = import(echo);
    dribble_and_burst(&import.proxy);
    // Both at once, on several connections.
    let proxy = Arc::new(import.proxy.clone());
    let peers: Vec<_> =
        (0..4).map(|_| Arc::clone(&proxy)).map(|p| thread::spawn(move || dribble_and_burst(&p))).collect();
    for peer in peers {
        peer.join().expect("a peer failed");
    }
}

#[test]
fn dribbling_and_bursty_peers_through_a_local_proxy() {
    let root = TestRoot::new();
    let proxy = local_proxy(&root, echo);
    dribble_and_burst(&proxy.path);
    let path = Arc::new(proxy.path.clone());
    let peers: Vec<_> =
        (0..4).map(|_| Arc::clone(&path)).map(|p| thread::spawn(move || dribble_and_burst(&p))).collect();
    for peer in peers {
        peer.join().expect("a peer failed");
    }
}

/// What a new client of a proxy out of descriptors sees within 2 s.
#[derive(Debug, PartialEq)]
enum Answer {
    Echoed,
    /// EOF or a reset: refused cleanly.
    Refused,
}

/// How a client learns that a proxy dropped it: EOF, a reset, or a
/// broken pipe if it writes after the drop.
fn refused(error: &io::Error) -> bool {
    matches!(error.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)
}

fn try_echo(path: &Path, message: &[u8]) -> Answer {
    let Ok(mut stream) = UnixStream::connect(path) else {
        return Answer::Refused;
    };
    stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut reply = vec![0u8; message.len()];
    match stream.write_all(message).and_then(|()| stream.read_exact(&mut reply)) {
        Ok(()) => {
            assert_eq!(reply, message);
            Answer::Echoed
        }
        Err(error) if refused(&error) => Answer::Refused,
        Err(error) => panic!("{}: a refused client is left hanging: {error}", path.display()),
    }
}

/// Descriptor limits the proxies are run with. A link holds two
/// descriptors, so with one limit the last free descriptor is taken by an
/// accepted client whose onward connection then fails, and with the other
/// none is left and `accept` itself fails (EMFILE): both ways are tested.
const LIMITS: [u32; 2] = [64, 65];

/// The process `pid` runs with `limit` descriptors and serves the clients
/// of `path`, directly or through the `relaying` processes (named, with
/// their usual limits): connections are opened until it runs out; then
/// new clients are refused at once, the early ones are still served, no
/// process on the way spins, and once some close, new clients are served
/// again. What `at_the_limit` returns, run while out of descriptors, is
/// returned.
fn out_of_descriptors<T>(
    pid: u32,
    path: &Path,
    limit: u32,
    relaying: &[(&str, u32)],
    at_the_limit: impl FnOnce() -> T,
) -> T {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let limit = limit.to_string();
    assert_eq!(open_files.split_whitespace().collect::<Vec<_>>()[3..5], [&limit, &limit], "{open_files}");

    let mut held: Vec<UnixStream> = Vec::new();
    loop {
        assert!(held.len() < 64, "64 connections and still not out of descriptors");
        let mut stream = connect(path);
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let message = format!("hello {}", held.len());
        let mut reply = vec![0u8; message.len()];
        // A refusal may come before the write (EPIPE) or after it.
        match stream.write_all(message.as_bytes()).and_then(|()| stream.read_exact(&mut reply)) {
            Ok(()) => {
                assert_eq!(reply, message.as_bytes());
                held.push(stream);
            }
            Err(error) if refused(&error) => break,
            Err(error) => panic!("client {} is left hanging instead of refused: {error}", held.len()),
        }
    }
    eprintln!("{}: {limit} descriptors: out after {} connections", path.display(), held.len());
    assert!(held.len() >= 10, "only {} connections with {limit} descriptors", held.len());
    for attempt in 0..5 {
        assert_eq!(try_echo(path, b"more"), Answer::Refused, "attempt {attempt} past the limit");
    }
    for (index, stream) in held.iter_mut().enumerate().step_by(7) {
        round_trip(stream, format!("still here {index}").as_bytes())
            .unwrap_or_else(|e| panic!("early connection {index}: {e}"));
    }
    let result = at_the_limit();

    // A client knocking every 10 ms: refusing it must not cost CPU.
    let knocking = Arc::new(AtomicBool::new(true));
    let knocker = {
        let (knocking, path) = (Arc::clone(&knocking), path.to_path_buf());
        thread::spawn(move || {
            let mut answers = Vec::new();
            while knocking.load(Ordering::SeqCst) {
                answers.push(try_echo(&path, b"knock"));
                thread::sleep(Duration::from_millis(10));
            }
            answers
        })
    };
    let watched: Vec<(&str, u32)> =
        std::iter::once(("the process out of descriptors", pid)).chain(relaying.iter().copied()).collect();
    thread::sleep(Duration::from_millis(100));
    let before: Vec<Duration> = watched.iter().map(|&(_, pid)| cpu_time(pid)).collect();
    thread::sleep(Duration::from_secs(1));
    let used: Vec<Duration> = watched.iter().zip(&before).map(|(&(_, pid), &before)| cpu_time(pid) - before).collect();
    knocking.store(false, Ordering::SeqCst);
    let answers = knocker.join().expect("the knocking client failed");
    eprintln!(
        "{}: {:?} of CPU in 1 s while refusing {} knocking clients",
        path.display(),
        watched.iter().map(|&(name, _)| name).zip(&used).collect::<Vec<_>>(),
        answers.iter().filter(|a| **a == Answer::Refused).count()
    );
    for (&(name, _), used) in watched.iter().zip(&used) {
        assert!(*used < Duration::from_millis(250), "{name}: {used:?} of CPU in 1 s out of descriptors: spinning?");
    }
    assert!(answers.iter().all(|a| *a == Answer::Refused), "{answers:?}");
    for (index, stream) in held.iter_mut().enumerate().step_by(5) {
        round_trip(stream, format!("after the knocking {index}").as_bytes())
            .unwrap_or_else(|e| panic!("early connection {index}: {e}"));
    }

    // Room again: new clients are served.
    held.truncate(held.len() / 2);
    wait_until(Duration::from_secs(3), "a new client is served once connections closed", || {
        try_echo(path, b"again") == Answer::Echoed
    });
    result
}

#[test]
fn a_local_proxy_out_of_descriptors_refuses_cleanly_and_serves_the_rest() {
    for limit in LIMITS {
        let root = TestRoot::new();
        let proxy = local_proxy_with(&root, echo, |_, command| with_fd_limit(command, limit));
        out_of_descriptors(proxy.pid, &proxy.path, limit, &[], || ());
    }
}

#[test]
fn an_importer_out_of_descriptors_refuses_cleanly_and_serves_the_rest() {
    for limit in LIMITS {
        let import = import_with(echo, |command| command, |command| with_fd_limit(command, limit));
        out_of_descriptors(import.importer, &import.proxy, limit, &[("the exporter", import.exporter)], || ());
    }
}

/// Descriptor limits the exporter is run with, behind an importer with
/// its usual limit. A relayed connection holds two of the exporter's
/// descriptors (the TCP one and the service's), and its CONNECT needs two
/// more for a moment (the directories and the socket file, opened
/// `O_PATH` one inside the other, so that what was checked is what is
/// connected to), so of the descriptors the idle exporter leaves, one
/// limit leaves an odd number and the other an even one: once out, one or
/// two are still free, an accepted connection takes one and its CONNECT
/// cannot open the socket file. Either way the exporter answers `503
/// server overloaded` and the importer closes its client on it, so the
/// client sees a reset (its message unread) or EOF, as when a proxy
/// refuses it. (When `accept` itself fails, the reserve descriptor
/// refuses: the proxy and importer tests above reach that, and so does
/// the exporter's test with idle connections below.)
const EXPORTER_LIMITS: [u32; 2] = [64, 65];

/// How many descriptors `pid` could still open under `limit`: numbers
/// below it not in use. Not the limit less the count of open ones: a
/// descriptor inherited from whatever runs the tests can be numbered above
/// the limit, and then it takes none of those numbers.
fn free_descriptors(pid: u32, limit: u32) -> usize {
    (0..limit).filter(|fd| std::fs::symlink_metadata(format!("/proc/{pid}/fd/{fd}")).is_err()).count()
}

/// The status line the exporter on `port` answers a CONNECT to the echo
/// service with, asked straight over TCP: through the import every
/// refusal is the same EOF.
fn connect_status(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the exporter");
    stream.set_read_timeout(Some(STALL)).unwrap();
    stream.write_all(format!("SEP/1 CONNECT {PROTOCOL}/echo.hosta..0\n").as_bytes()).unwrap();
    let mut line = String::new();
    io::BufReader::new(stream).read_line(&mut line).expect("the exporter's status line");
    line.trim_end().to_string()
}

#[test]
fn an_exporter_out_of_descriptors_refuses_cleanly_and_serves_the_rest() {
    let mut free_when_out = BTreeSet::new();
    for limit in EXPORTER_LIMITS {
        let import = import_with(echo, |command| with_fd_limit(command, limit), |command| command);
        let importer = [("the importer", import.importer)];
        let (free, status) = out_of_descriptors(import.exporter, &import.proxy, limit, &importer, || {
            // Counted before asking, which takes one.
            (free_descriptors(import.exporter, limit), connect_status(import.port))
        });
        eprintln!("{limit} descriptors, {free} free when out: the exporter answers {status:?}");
        assert_eq!(status, "SEP/1 503 service unavailable: server overloaded", "{limit} descriptors, {free} free");
        free_when_out.insert(free);
    }
    // An odd and an even number of descriptors left: both are tested.
    assert_eq!(free_when_out, BTreeSet::from([1, 2]), "descriptors free when out with limits {EXPORTER_LIMITS:?}");
}

/// Idle TCP connections (no request line yet: each holds one of the
/// exporter's descriptors for up to 10 s) until the exporter's `accept`
/// itself fails: the next clients are still answered `503 server
/// overloaded` through the descriptor kept in reserve and closed, the
/// refusing costs no CPU, and once the idle ones go the exporter serves
/// again.
#[test]
fn an_exporter_whose_accept_runs_out_refuses_from_its_reserve() {
    let limit = 48;
    let import = import_with(echo, |command| with_fd_limit(command, limit), |command| command);
    let overloaded = "SEP/1 503 service unavailable: server overloaded\n";
    // Idle: nothing to read from an accepted one within a moment.
    let answer = |stream: &mut std::net::TcpStream| {
        stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut text = String::new();
        match stream.read_to_string(&mut text) {
            Ok(_) => Some(text),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(error) => Some(format!("error: {error}")),
        }
    };
    let mut idle = Vec::new();
    let refusal = loop {
        assert!(idle.len() < limit as usize, "{} idle connections and still not out of descriptors", idle.len());
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", import.port)).expect("connect to the exporter");
        match answer(&mut stream) {
            None => idle.push(stream),
            Some(text) => break text,
        }
    };
    assert_eq!(refusal, overloaded, "after {} idle connections", idle.len());
    assert!(idle.len() >= 20, "only {} idle connections with {limit} descriptors", idle.len());
    let before = cpu_time(import.exporter);
    for attempt in 0..20 {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", import.port)).expect("connect to the exporter");
        assert_eq!(answer(&mut stream).as_deref(), Some(overloaded), "attempt {attempt} past the limit");
    }
    let used = cpu_time(import.exporter) - before;
    assert!(used < Duration::from_millis(500), "refusing 20 clients took {used:?} of CPU");
    drop(idle);
    wait_until(STALL, "the exporter to serve again", || connect_status(import.port) == "SEP/1 200 OK");
}

/// 200 clients connecting at once, then 512 waiting in the backlog of a
/// stopped proxy: every connect succeeds at once (no EAGAIN, no refusal)
/// and every client is served.
fn backlog(root: &TestRoot, pid: u32, path: &Path) {
    let barrier = Arc::new(Barrier::new(200));
    let clients: Vec<_> = (0..200)
        .map(|index| {
            let (barrier, path) = (Arc::clone(&barrier), path.to_path_buf());
            client_thread(move || {
                barrier.wait();
                let mut stream = connect_nonblocking(&path).map_err(|e| format!("connect: {e}"))?;
                round_trip(&mut stream, format!("client {index}").as_bytes())
            })
        })
        .collect();
    join_all(clients);

    root.with_child(pid, |child| child.stop());
    let waiting: Result<Vec<UnixStream>, String> = (0..512)
        .map(|index| connect_nonblocking(path).map_err(|e| format!("connect {index} to the stopped proxy: {e}")))
        .collect();
    root.with_child(pid, |child| child.cont());
    let waiting = waiting.unwrap_or_else(|e| panic!("{e}"));
    let clients: Vec<_> = waiting
        .into_iter()
        .enumerate()
        .map(|(index, mut stream)| client_thread(move || round_trip(&mut stream, format!("waited {index}").as_bytes())))
        .collect();
    join_all(clients);
}

#[test]
fn a_burst_of_clients_fits_the_backlog_of_a_local_proxy() {
    let root = TestRoot::new();
    let proxy = local_proxy(&root, echo);
    backlog(&root, proxy.pid, &proxy.path);
}

#[test]
fn a_burst_of_clients_fits_the_backlog_of_an_import() {
    let import = import(echo);
    backlog(&import.importing, import.importer, &import.proxy);
    assert!(import.service.accepted() >= 712);
}

#[test]
fn idle_connections_hold_no_pipes_and_bulk_ones_at_most_the_cap() {
    const CONNECTIONS: usize = 300;
    const BULK: usize = 1 << 20;
    let root = TestRoot::new();
    let proxy = local_proxy(&root, echo);
    let (_, at_start) = descriptors(proxy.pid);
    assert!(at_start.len() <= 4, "{} pipes before any connection", at_start.len());

    let mut streams: Vec<UnixStream> = (0..CONNECTIONS).map(|_| connect(&proxy.path)).collect();
    for (index, stream) in streams.iter_mut().enumerate() {
        round_trip(stream, format!("small {index}").as_bytes()).unwrap_or_else(|e| panic!("connection {index}: {e}"));
    }
    let (_, idle) = descriptors(proxy.pid);
    eprintln!("{CONNECTIONS} idle connections: {} pipes (at start {})", idle.len(), at_start.len());
    assert_eq!(idle, at_start, "pipes held by {CONNECTIONS} idle connections");

    // Bulk on every connection at once: more directions want a pipe than
    // the cap allows.
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(index, stream)| {
            let done = Arc::clone(&done);
            client_thread(move || {
                let data = Xorshift::new(index as u64 + 7).bytes(BULK);
                let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
                let sent = data.clone();
                let feeder = thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || writer.write_all(&sent).and_then(|()| writer.shutdown(Shutdown::Write)))
                    .map_err(|e| e.to_string())?;
                let mut reader = stream;
                let mut got = Vec::with_capacity(BULK);
                let read = reader.read_to_end(&mut got);
                done.fetch_add(1, Ordering::SeqCst);
                feeder.join().map_err(|_| "the writer panicked".to_string())?.map_err(|e| format!("write: {e}"))?;
                read.map_err(|e| format!("read: {e}"))?;
                if got != data {
                    return Err(format!("{} bytes back of {BULK}, or wrong ones", got.len()));
                }
                Ok(())
            })
        })
        .collect();
    let mut most = 0;
    while done.load(Ordering::SeqCst) < CONNECTIONS && clients.iter().any(|c| !c.is_finished()) {
        most = most.max(descriptors(proxy.pid).1.len());
        thread::sleep(Duration::from_millis(2));
    }
    join_all(clients);
    let (_, after) = descriptors(proxy.pid);
    eprintln!("bulk on {CONNECTIONS} connections: at most {most} pipes seen, {} after", after.len());
    assert!(most <= MAX_PIPES + at_start.len(), "{most} pipes at once, above the cap of {MAX_PIPES}");
    assert!(after.len() <= PIPE_POOL + at_start.len(), "{} pipes after the bulk transfers ended", after.len());
}
