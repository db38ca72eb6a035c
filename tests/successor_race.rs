//! dipusd's dead-socket reaper racing servers that keep replacing stale
//! sockets at the same paths (`dipusd --no-discovery`, loopback only, so
//! this runs in CI): no live socket is ever removed.
//!
//! Every round of a racer: a live listener is linked into place at its
//! path, lives a moment, is checked to still be the file at that path, and
//! is closed without being unlinked, so it is stale; the next listener then
//! takes the path over. The reaper sweeps whenever a socket appears, so its
//! sweeps keep landing between "judged dead" and "replaced".
//!
//! - Emulated servers (threads of this test, thousands of rounds) follow
//!   dipus's protocol: bind at a hidden name, `link(2)` into place, and on
//!   EEXIST remove the stale socket only under the directory's `flock`
//!   and only if it is still the same dead inode. Half of them listen with
//!   a backlog of one that a flooding thread keeps full, so the reaper's
//!   connect is answered EAGAIN.
//! - Real `dipus-local-pipe` servers, SIGKILLed (their socket stays, stale)
//!   and replaced by a new server under the same name, which must take
//!   `..0` again and answer.
//!
//! A steady flooded listener over several sweeps is tests/reaper.rs's.

mod common;

use common::service::{is_socket, make_dirs, start_reaping_dipusd};
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the racers run (each also stops at its round limit).
const RACE: Duration = Duration::from_secs(8);
const EMULATED_RACERS: usize = 4;
const EMULATED_ROUNDS: u64 = 2500;
const SERVER_RACERS: usize = 2;
const SERVER_ROUNDS: u64 = 300;

fn inode(path: &Path) -> Option<u64> {
    std::fs::symlink_metadata(path).ok().map(|meta| meta.ino())
}

/// xorshift64 for the racers' pauses: varied, reproducible, no crate.
struct Random(u64);

impl Random {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }

    fn pause(&mut self, max_micros: u64) {
        std::thread::sleep(Duration::from_micros(self.below(max_micros)));
    }
}

/// What the racers saw, for the verdict.
#[derive(Default)]
struct Tally {
    rounds: AtomicU64,
    /// Stale sockets already gone when the successor came: the reaper won.
    reaped_first: AtomicU64,
    /// Stale sockets the successor removed itself: it won.
    replaced: AtomicU64,
    /// Flood connects answered EAGAIN (a full backlog).
    refused_full: AtomicU64,
    /// Live sockets found removed or replaced: must stay empty.
    removed_live: Mutex<Vec<String>>,
}

impl Tally {
    fn live_removed(&self, what: String) {
        self.removed_live.lock().unwrap_or_else(|e| e.into_inner()).push(what);
    }
}

/// Nonblocking connect: how the kernel judges `path` right now.
fn connect_errno(path: &Path) -> Result<(), nix::errno::Errno> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let address = UnixAddr::new(path)?;
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    connect(fd.as_raw_fd(), &address)
}

/// An exclusive `flock` on a directory, as dipus takes it to judge and
/// remove a socket there.
struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    fn lock(dir: &Path) -> std::io::Result<DirLock> {
        let file = std::fs::File::open(dir)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirLock { _file: file })
    }
}

/// A listening socket bound at `path` with `backlog`.
fn listen(path: &Path, backlog: i32) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    listen(&fd, Backlog::new(backlog).unwrap_or(Backlog::MAXCONN))?;
    Ok(fd)
}

/// dipus's way of taking `path` over: listen at the hidden `temp`, link
/// into place; on EEXIST remove what is there under the directory lock if
/// it is a dead socket, and link again. Returns the listener and its inode.
fn take_over(dir: &Path, temp: &Path, path: &Path, backlog: i32, tally: &Tally) -> (OwnedFd, u64) {
    let listener = loop {
        let _ = std::fs::remove_file(temp);
        match listen(temp, backlog) {
            Ok(listener) => break listener,
            // The reaper prunes protocol directories that are empty.
            Err(error) if error.kind() == ErrorKind::NotFound => {
                make_dirs_at(dir);
            }
            Err(error) => panic!("listen at {}: {error}", temp.display()),
        }
    };
    let mine = inode(temp).expect("the temporary socket exists");
    let mut first = true;
    let patience = Instant::now() + Duration::from_secs(1);
    loop {
        match std::fs::hard_link(temp, path) {
            Ok(()) => break,
            Err(error) if error.kind() == ErrorKind::AlreadyExists => {
                first = false;
                let _lock = DirLock::lock(dir).expect("lock the directory");
                let Some(stale) = inode(path) else { continue };
                match connect_errno(path) {
                    Err(nix::errno::Errno::ECONNREFUSED) if inode(path) == Some(stale) => {
                        std::fs::remove_file(path).expect("remove the stale socket");
                        tally.replaced.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(nix::errno::Errno::ECONNREFUSED) => {}
                    // Still open somewhere: another test thread may be
                    // forking, and its child holds our descriptors until
                    // it execs. Alive until then, so left alone.
                    _ if Instant::now() < patience => std::thread::sleep(Duration::from_micros(200)),
                    other => panic!("{} is still not dead a second after it closed: {other:?}", path.display()),
                }
            }
            Err(error) => panic!("link {} to {}: {error}", temp.display(), path.display()),
        }
    }
    if first {
        tally.reaped_first.fetch_add(1, Ordering::Relaxed);
    }
    std::fs::remove_file(temp).expect("remove the temporary name");
    (listener, mine)
}

fn make_dirs_at(dir: &Path) {
    // The reaper may prune it again at once: take_over retries.
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777));
}

/// Connects to `path` without blocking, over and over, until `stop`.
fn flood(path: PathBuf, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    while !stop.load(Ordering::Relaxed) {
        match connect_errno(&path) {
            Err(nix::errno::Errno::EAGAIN) => {
                tally.refused_full.fetch_add(1, Ordering::Relaxed);
            }
            // Queued, stale between two servers, or gone a moment.
            Ok(()) | Err(nix::errno::Errno::ECONNREFUSED | nix::errno::Errno::ENOENT) => {}
            Err(error) => panic!("connect {}: {error}", path.display()),
        }
    }
}

/// Joins every racer, then re-raises the first failure: nothing is left
/// running (and holding the tree or a server) when the test panics.
fn join_all(racers: Vec<std::thread::JoinHandle<()>>) {
    let results: Vec<_> = racers.into_iter().map(|racer| racer.join()).collect();
    for result in results {
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}

/// One emulated server after another at `path`, until `deadline`.
fn emulated_racer(dir: PathBuf, racer: usize, flooded: bool, deadline: Instant, tally: Arc<Tally>) {
    let path = dir.join(format!("e{racer}.testhost..0"));
    let temp = dir.join(format!(".new-race-{racer}"));
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flooded.then(|| {
        let (path, stop, tally) = (path.clone(), Arc::clone(&stop), Arc::clone(&tally));
        std::thread::spawn(move || flood(path, stop, tally))
    });
    let backlog = if flooded { 1 } else { 64 };
    let mut random = Random(0x9e37_79b9_7f4a_7c15 ^ racer as u64);
    let mut round = 0;
    while round < EMULATED_ROUNDS && Instant::now() < deadline {
        let (listener, mine) = take_over(&dir, &temp, &path, backlog, &tally);
        random.pause(2000);
        if inode(&path) != Some(mine) {
            tally.live_removed(format!("{} in round {round}: {:?}, not {mine}", path.display(), inode(&path)));
        }
        // Closed, not unlinked: stale, for the reaper or the successor.
        drop(listener);
        random.pause(2000);
        round += 1;
        tally.rounds.fetch_add(1, Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(flooder) = flooder {
        flooder.join().expect("the flooder failed");
    }
}

#[test]
fn emulated_servers_replacing_stale_sockets_thousands_of_times_never_lose_a_live_one_to_the_reaper() {
    let root = TestRoot::new();
    let dipusd = start_reaping_dipusd(&root);
    let dir = make_dirs(&root, "local/race");
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + RACE;
    let started = Instant::now();
    let racers: Vec<_> = (0..EMULATED_RACERS)
        .map(|racer| {
            let (dir, tally) = (dir.clone(), Arc::clone(&tally));
            std::thread::spawn(move || emulated_racer(dir, racer, racer % 2 == 0, deadline, tally))
        })
        .collect();
    join_all(racers);
    let rounds = tally.rounds.load(Ordering::Relaxed);
    let reaped_first = tally.reaped_first.load(Ordering::Relaxed);
    let replaced = tally.replaced.load(Ordering::Relaxed);
    let refused_full = tally.refused_full.load(Ordering::Relaxed);
    eprintln!(
        "{rounds} rounds in {:?}: {reaped_first} stale sockets reaped first, {replaced} replaced by the successor, \
         {refused_full} flood connects refused by a full backlog",
        started.elapsed()
    );
    assert_eq!(*tally.removed_live.lock().unwrap(), Vec::<String>::new(), "live sockets removed");
    assert!(rounds >= 1000, "only {rounds} rounds");
    assert!(
        reaped_first > 0 && replaced > 0,
        "the reaper never raced: {reaped_first} reaped first, {replaced} replaced"
    );
    assert!(refused_full > 0, "the flooded backlogs never filled");
    assert!(root.with_child(dipusd, |c| c.is_running()), "dipusd died during the race");
}

/// `cat` answers through the socket at `path`, in-process.
fn echoes(path: &Path, round: u64) -> bool {
    let Ok(mut stream) = UnixStream::connect(path) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(DEFAULT_TIMEOUT));
    let message = format!("round {round}\n");
    let mut reply = String::new();
    stream.write_all(message.as_bytes()).is_ok()
        && stream.shutdown(std::net::Shutdown::Write).is_ok()
        && stream.read_to_string(&mut reply).is_ok()
        && reply == message
}

/// One real server after another under `r<racer>/race`, each SIGKILLed so
/// its socket stays behind, stale, for the next one to take over.
fn server_racer(root: Arc<TestRoot>, racer: usize, deadline: Instant, tally: Arc<Tally>) {
    let path = root.tree().join(format!("local/race/r{racer}.testhost..0"));
    let spec = format!("r{racer}/race");
    let mut random = Random(0x2545_f491_4f6c_dd1d ^ racer as u64);
    let mut round = 0;
    while round < SERVER_ROUNDS && Instant::now() < deadline {
        // Its stderr kept, to say why if it fails.
        let stderr_path = root.path().join(format!("server-{racer}.err"));
        let stderr = std::fs::File::create(&stderr_path).expect("a file for the server's stderr");
        let mut server =
            ChildGuard::spawn(root.cmd("dipus-local-pipe").args(["cat", &spec]).stdin(Stdio::null()).stderr(stderr));
        let appeared = Instant::now() + DEFAULT_TIMEOUT;
        // Inode numbers are reused at once on tmpfs: the successor's socket
        // is the one that does not refuse, and still the file at the path
        // after the connect (read before it, the inode may have been the
        // stale socket's, replaced while we connected).
        let mine = loop {
            if let Some(status) = server.try_status() {
                panic!(
                    "round {round}: the server exited ({status}) before taking {}: {}",
                    path.display(),
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
            match inode(&path) {
                Some(current) if is_socket(&path) && connect_errno(&path).is_ok() && inode(&path) == Some(current) => {
                    break current
                }
                _ if Instant::now() >= appeared => panic!(
                    "round {round}: {} was not taken over within {DEFAULT_TIMEOUT:?}; the directory holds {:?}; \
                     the server is in {:?}: {}; inode {:?}; fds {:?}",
                    path.display(),
                    common::service::entries(path.parent().unwrap()),
                    std::fs::read_to_string(format!("/proc/{}/wchan", server.pid())),
                    std::fs::read_to_string(format!("/proc/{}/stack", server.pid())).unwrap_or_default(),
                    inode(&path),
                    std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
                        .map(|d| d.flatten().map(|e| std::fs::read_link(e.path())).collect::<Vec<_>>())
                ),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        random.pause(20_000);
        if round % 10 == 0 && !echoes(&path, round) {
            tally.live_removed(format!("{} in round {round}: does not answer", path.display()));
        }
        if inode(&path) != Some(mine) {
            tally.live_removed(format!("{} in round {round}: {:?}, not {mine}", path.display(), inode(&path)));
        }
        server.kill9().expect("the server dies");
        // The reaper sweeps 50 ms after an exit: successors come before,
        // during and after that sweep.
        random.pause(80_000);
        round += 1;
        tally.rounds.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn real_servers_taking_over_killed_servers_sockets_never_lose_a_live_one_to_the_reaper() {
    let root = Arc::new(TestRoot::new());
    let dipusd = start_reaping_dipusd(&root);
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + RACE;
    let started = Instant::now();
    let racers: Vec<_> = (0..SERVER_RACERS)
        .map(|racer| {
            let (root, tally) = (Arc::clone(&root), Arc::clone(&tally));
            std::thread::spawn(move || server_racer(root, racer, deadline, tally))
        })
        .collect();
    join_all(racers);
    let rounds = tally.rounds.load(Ordering::Relaxed);
    eprintln!("{rounds} servers replaced killed ones in {:?}", started.elapsed());
    assert_eq!(*tally.removed_live.lock().unwrap(), Vec::<String>::new(), "live sockets removed");
    assert!(rounds >= 50, "only {rounds} rounds");
    assert!(root.with_child(dipusd, |c| c.is_running()), "dipusd died during the race");
    // The last servers' sockets are stale: the reaper takes them.
    let dir = root.tree().join("local/race");
    wait_until(Duration::from_secs(2), "the last stale sockets reaped", || {
        (0..SERVER_RACERS).all(|racer| !dir.join(format!("r{racer}.testhost..0")).exists())
    });
}
