//! dipusd's dead-socket reaper on loopback (`dipusd --no-discovery`): a
//! killed server's socket and a stale socket go within a second, with the
//! protocol directories they leave empty (the scope directory stays);
//! files, symlinks and FIFOs named like services, a live socket under a
//! connect flood and sockets that cannot be judged are never touched.
//!
//! The reaper only works when something happens (a watched process exits,
//! a socket appears), so "never removed" is checked across sweeps that are
//! provoked on purpose: a stale canary socket is planted, and once it is
//! gone a sweep has judged everything else in the tree.

mod common;

use common::service::{entries, is_socket, make_dirs, make_foreign_top, serve, stale_at, start_reaping_dipusd, stop};
use common::*;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How soon a dead socket must be gone.
const REAPED: Duration = Duration::from_secs(1);

fn inode(path: &Path) -> Option<u64> {
    std::fs::symlink_metadata(path).ok().map(|meta| meta.ino())
}

/// Plants a stale socket at `relative` and waits until the reaper has
/// removed it: a sweep is under way (and may still be judging entries
/// sorted after the canary).
fn canary(root: &TestRoot, relative: &str) {
    let path = stale_at(root, relative);
    let planted = Instant::now();
    wait_until(REAPED, &format!("the canary {relative} is reaped"), || !path.exists());
    eprintln!("canary reaped after {:?}", planted.elapsed());
}

/// Two canaries one after the other: the first sweep is over when the
/// second one is planted, so every entry of the tree was judged at least
/// once in full.
fn two_sweeps(root: &TestRoot) {
    canary(root, "local/canary/one.testhost..0");
    canary(root, "local/canary/two.testhost..0");
}

#[test]
fn a_killed_servers_socket_and_its_empty_protocol_directories_go_within_a_second() {
    let root = TestRoot::new();
    start_reaping_dipusd(&root);
    let (server, path) = serve(&root, "cat", "echo/text/plain", "local/text/plain/echo.testhost..0");
    // Let the reaper learn who holds the socket before the kill.
    two_sweeps(&root);
    root.with_child(server, |c| c.kill9()).expect("the server dies");
    let killed = Instant::now();
    let local = root.tree().join("local");
    wait_until(REAPED, "the socket and local/text are gone", || !path.exists() && !local.join("text").exists());
    eprintln!("reaped {:?} after the kill", killed.elapsed());
    assert_eq!(entries(&local), Vec::<String>::new(), "the scope directory stays, empty");
}

#[test]
fn a_stale_socket_made_while_the_daemon_runs_goes_within_a_second() {
    let root = TestRoot::new();
    start_reaping_dipusd(&root);
    make_dirs(&root, "local/text/plain");
    let path = stale_at(&root, "local/text/plain/old.testhost..3");
    let planted = Instant::now();
    let local = root.tree().join("local");
    wait_until(REAPED, "the stale socket and local/text are gone", || !path.exists() && !local.join("text").exists());
    eprintln!("reaped {:?} after it was planted", planted.elapsed());
    assert_eq!(entries(&local), Vec::<String>::new(), "the scope directory stays, empty");
}

#[test]
fn files_symlinks_and_fifos_named_like_services_stay() {
    let root = TestRoot::new();
    start_reaping_dipusd(&root);
    let dir = make_dirs(&root, "local/text/plain");
    std::fs::write(dir.join("file.testhost..0"), "data\n").unwrap();
    nix::unistd::mkfifo(&dir.join("fifo.testhost..0"), nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    // A symlink to a dead socket outside the tree: neither may go.
    let outside = root.path().join("outside.sock");
    drop(UnixListener::bind(&outside).unwrap());
    std::os::unix::fs::symlink(&outside, dir.join("link.testhost..0")).unwrap();
    two_sweeps(&root);
    assert_eq!(entries(&dir), ["fifo.testhost..0", "file.testhost..0", "link.testhost..0"]);
    assert_eq!(std::fs::read_to_string(dir.join("file.testhost..0")).unwrap(), "data\n");
    assert!(std::fs::symlink_metadata(dir.join("fifo.testhost..0")).unwrap().file_type().is_fifo());
    assert_eq!(std::fs::read_link(dir.join("link.testhost..0")).unwrap(), outside);
    assert!(is_socket(&outside), "the symlink's target was removed");
}

/// A listening socket at `path` with a backlog of one, never accepting.
fn listen_with_backlog_one(path: &Path) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    listen(&fd, Backlog::new(1).unwrap()).unwrap();
    fd
}

/// Connects to `path` without blocking, over and over, until `stop`;
/// returns how many attempts the full backlog refused with EAGAIN.
fn flood(path: PathBuf, stop: Arc<AtomicBool>, refused: Arc<AtomicU64>) {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let address = UnixAddr::new(&path).unwrap();
    while !stop.load(Ordering::Relaxed) {
        let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)
            .unwrap();
        match connect(fd.as_raw_fd(), &address) {
            Err(Errno::EAGAIN) => {
                refused.fetch_add(1, Ordering::Relaxed);
            }
            Ok(()) => {}
            Err(error) => panic!("connect {}: {error}", path.display()),
        }
    }
}

#[test]
fn a_live_socket_under_a_connect_flood_is_never_removed() {
    let root = TestRoot::new();
    start_reaping_dipusd(&root);
    let dir = make_dirs(&root, "local/text/plain");
    let path = dir.join("busy.testhost..0");
    let listener = listen_with_backlog_one(&path);
    let original = inode(&path);
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            let (path, stop, refused) = (path.clone(), Arc::clone(&stop), Arc::clone(&refused));
            std::thread::spawn(move || flood(path, stop, refused))
        })
        .collect();
    // Sweeps while the flood goes on: a canary every round, each reaped.
    let flooding = Instant::now();
    let mut round = 0;
    while flooding.elapsed() < Duration::from_secs(3) {
        canary(&root, &format!("local/canary/c{round}.testhost..0"));
        assert_eq!(inode(&path), original, "the live socket was removed or replaced in round {round}");
        round += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for flooder in flooders {
        flooder.join().expect("a flooder failed");
    }
    assert!(refused.load(Ordering::Relaxed) > 0, "the backlog never filled");
    assert!(round >= 3, "only {round} sweeps in 3 s");
    two_sweeps(&root);
    assert_eq!(inode(&path), original, "the live socket was removed after the flood");
    // Closed, it is dead: the next sweep takes it.
    drop(listener);
    two_sweeps(&root);
    assert!(!path.exists(), "the socket stayed after its listener closed");
}

#[test]
fn sockets_the_daemon_cannot_judge_stay() {
    let root = TestRoot::new();
    start_reaping_dipusd(&root);
    // A dead socket whose path is too long for connect(2): bound through a
    // short symlink to its deep directory.
    let deep = make_dirs(&root, &format!("local/{}/{}", "a".repeat(60), "b".repeat(60)));
    let shortcut = root.path().join("s");
    std::os::unix::fs::symlink(&deep, &shortcut).unwrap();
    drop(UnixListener::bind(shortcut.join("deep.testhost..0")).unwrap());
    let long = deep.join("deep.testhost..0");
    assert!(long.as_os_str().len() > 108 && is_socket(&long));
    // A live datagram socket: a stream connect to it is refused with
    // EPROTOTYPE, which says nothing about whether anyone is there.
    let dir = make_dirs(&root, "local/text/plain");
    let datagram = dir.join("datagram.testhost..0");
    let receiver = UnixDatagram::bind(&datagram).unwrap();
    two_sweeps(&root);
    assert!(is_socket(&long), "the socket at a long path was removed");
    assert!(is_socket(&datagram), "the datagram socket was removed");
    drop(receiver);
}

/// Holds an exclusive flock on `dir`, as any user who may read it can,
/// until dropped.
fn hold_lock(dir: &Path) -> std::fs::File {
    let file = std::fs::File::open(dir).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0, "cannot lock {}", dir.display());
    file
}

#[test]
fn a_directory_someone_holds_locked_stalls_neither_the_daemon_nor_a_server() {
    let root = TestRoot::new();
    start_reaping_dipusd(&root);
    let held = make_dirs(&root, "local/held");
    let lock = hold_lock(&held);
    let stale = stale_at(&root, "local/held/old.testhost..0");
    // Sweeps go on around the held directory (the reaper used to wait
    // for its lock, and the whole daemon with it).
    two_sweeps(&root);
    assert!(is_socket(&stale), "a socket was removed while its directory was locked");
    // A server in the held directory still stops at once; it leaves its
    // socket to the reaper.
    let (server, path) = serve(&root, "cat", "echo/held", "local/held/echo.testhost..0");
    stop(&root, server, "TERM");
    drop(lock);
    wait_until(Duration::from_secs(15), "both sockets in local/held are reaped once it is let go", || {
        !stale.exists() && !path.exists()
    });
}

/// A socket shared by many processes (a server's forked children): the
/// reaper watches one of them, not each (a user forking hundreds could
/// take dipusd's descriptors), and when the watched one exits it watches
/// another, so the socket is still removed as soon as the last one goes.
#[test]
fn a_socket_held_by_many_processes_costs_the_reaper_one_descriptor_and_still_goes_when_they_do() {
    let root = TestRoot::new();
    make_dirs(&root, "local/p");
    let path = root.tree().join("local/p/shared.hosta..0");
    let listener = UnixListener::bind(&path).unwrap();
    // Inherited by the children (std opens it close-on-exec).
    // SAFETY: fcntl on a descriptor this test owns.
    assert_eq!(unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_SETFD, 0) }, 0);
    struct Holders(Vec<std::process::Child>);
    impl Drop for Holders {
        fn drop(&mut self) {
            for holder in &mut self.0 {
                let _ = holder.kill();
                let _ = holder.wait();
            }
        }
    }
    let mut holders = Holders(
        (0..100).map(|_| std::process::Command::new("sleep").arg("60").spawn().expect("spawn sleep")).collect(),
    );
    drop(listener);
    let dipusd = start_reaping_dipusd(&root);
    // Mapped: the socket's holders were looked up (it stays: it listens).
    std::thread::sleep(Duration::from_millis(1500));
    let descriptors = std::fs::read_dir(format!("/proc/{dipusd}/fd")).unwrap().count();
    assert!(is_socket(&path), "a live socket was removed");
    for holder in holders.0.iter_mut().skip(1) {
        let _ = holder.kill();
        let _ = holder.wait();
    }
    // The watched holder may be among those gone: another is watched now.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(is_socket(&path), "a socket still held was removed");
    let _ = holders.0[0].kill();
    let _ = holders.0[0].wait();
    wait_until(Duration::from_secs(5), "the socket to be reaped once its last holder exited", || !path.exists());
    assert!(descriptors < 60, "dipusd held {descriptors} descriptors while 100 processes held one socket");
}

/// dipusd's own private scope made untrustworthy (open to others, as a
/// directory another user made of its name in the shared root would be):
/// the reaper leaves that scope alone and keeps the rest of the tree (it
/// used to take the failed listing for an empty tree and reap nothing).
#[test]
fn an_untrusted_own_scope_does_not_stop_the_reaper() {
    use std::os::unix::fs::PermissionsExt;
    let root = TestRoot::new();
    start_reaping_dipusd(&root);
    let user = common::service::user_name(common::service::euid()).expect("the test user's name");
    let own = root.tree().join(&user);
    std::fs::create_dir_all(&own).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o777)).unwrap();
    two_sweeps(&root);
}

/// Directories in the shared root named like users that are not those
/// users' scopes (not owned by the user of that name, or open to others)
/// are nobody's: nothing in them is judged or removed.
#[test]
fn dead_sockets_in_a_directory_that_is_not_a_users_scope_stay() {
    if !require(have_root(), "needs root to make directories owned by another user") {
        return;
    }
    let root = TestRoot::new();
    start_reaping_dipusd(&root);
    let nobody = common::service::user_name(65534).unwrap_or_else(|| "uid65534".into());
    let mut stale = Vec::new();
    for (top, mode) in [("aaa", 0o700), (nobody.as_str(), 0o755)] {
        let dir = make_foreign_top(&root, top, 65534, mode, "text/plain");
        let path = dir.join("old.testhost..0");
        drop(UnixListener::bind(&path).unwrap());
        stale.push(path);
    }
    two_sweeps(&root);
    for path in stale {
        assert!(is_socket(&path), "{} was removed", path.display());
    }
}
