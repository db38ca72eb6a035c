//! Socket helpers every applet shares: listening and connecting UNIX and TCP
//! sockets the way dipus wants them (close-on-exec, a real backlog,
//! TCP_NODELAY, keepalive and a short unsent queue on every TCP leg), and
//! raising the descriptor limit of long-running applets.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use nix::sys::socket::{
    bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage, UnixAddr,
};

fn to_io(errno: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(errno as i32)
}

/// listen(2) with `backlog` as asked; the kernel caps it at
/// net.core.somaxconn. (nix's `Backlog` refuses anything above the C
/// library's SOMAXCONN, which musl has at 128: the static binary listened
/// with 128 where it asked for [`crate::tree::BACKLOG`].)
fn listen(fd: &impl AsRawFd, backlog: i32) -> io::Result<()> {
    // SAFETY: listen(2) on a socket the caller owns.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A listening UNIX stream socket at `path`, nonblocking, with `backlog`.
pub fn unix_listen(path: &Path, backlog: i32) -> io::Result<UnixListener> {
    let address = UnixAddr::new(path).map_err(to_io)?;
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)
        .map_err(to_io)?;
    bind(fd.as_raw_fd(), &address).map_err(to_io)?;
    listen(&fd, backlog)?;
    Ok(UnixListener::from(fd))
}

/// A blocking connection to the UNIX socket at `path`.
pub fn unix_connect(path: &Path) -> io::Result<UnixStream> {
    crate::name::check_socket_path(path).map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    UnixStream::connect(path)
}

/// A listening TCP socket, nonblocking, with `backlog` and SO_REUSEADDR so a
/// restarted exporter does not wait for TIME_WAIT.
pub fn tcp_listen(address: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let family = match address {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None).map_err(to_io)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(to_io)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(address)).map_err(to_io)?;
    listen(&fd, backlog)?;
    Ok(std::net::TcpListener::from(fd))
}

/// Seconds of silence before TCP keepalive probes start, the gap between
/// probes and how many unanswered probes end the connection: a vanished
/// peer is noticed within about 10 + 3 × 5 = 25 s.
pub const KEEPALIVE_IDLE_SECS: u32 = 10;
pub const KEEPALIVE_INTERVAL_SECS: u32 = 5;
pub const KEEPALIVE_PROBES: u32 = 3;
/// Data unacknowledged for this long ends the connection: a peer that
/// vanished while we were sending (a WATCH stream's keepalives) is noticed
/// even though our writes still fit in the send buffer. Longer than any
/// blip we ride out. Relayed connections drop it (see [`relaying`]) and
/// are watched by [`PeerCheck`] against the same figure instead.
pub const USER_TIMEOUT_MS: u32 = 20_000;
/// How often the TCP legs of relayed connections are looked at
/// ([`PeerCheck`]).
pub const PEER_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// Unsent bytes a TCP leg may queue before it stops reporting writable.
/// Without a limit the kernel lets a bulk relay park megabytes in the send
/// queue, cold by the time the far side reads them: two hops on one host
/// (an import of a local exporter, each side on a CPU of its own) took a
/// median 0.55 s per 2 GiB without the cap and 0.44 s with it. Only unsent
/// data is limited, not data in flight, so a long fat link still fills its
/// window, and many concurrent streams cannot each hold megabytes.
pub const NOTSENT_LOWAT: libc::c_int = 128 * 1024;

/// Every TCP leg: no Nagle delay (small request/response traffic would
/// wait for delayed ACKs), keepalive so a vanished peer is noticed, and a
/// short unsent queue ([`NOTSENT_LOWAT`]).
pub fn tune_tcp(fd: RawFd) -> io::Result<()> {
    // SAFETY: the caller owns `fd` for the duration of the call; we only
    // borrow it to set options.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    setsockopt(&fd, sockopt::TcpNoDelay, &true).map_err(to_io)?;
    setsockopt(&fd, sockopt::KeepAlive, &true).map_err(to_io)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        setsockopt(&fd, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE_SECS).map_err(to_io)?;
        setsockopt(&fd, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL_SECS).map_err(to_io)?;
        setsockopt(&fd, sockopt::TcpKeepCount, &KEEPALIVE_PROBES).map_err(to_io)?;
        setsockopt(&fd, sockopt::TcpUserTimeout, &USER_TIMEOUT_MS).map_err(to_io)?;
        // nix has no TCP_NOTSENT_LOWAT.
        // SAFETY: setsockopt reads one c_int from a live local.
        let set = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&NOTSENT_LOWAT as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A connection that starts relaying a stream drops the user timeout
/// that [`tune_tcp`] set: Linux also counts a zero window held that long
/// as the peer being gone, and so cut the stream of any reader that paused
/// for 20 s (`dcat … | less`, a suspended client, a busy service) after a
/// few hundred kilobytes, as if it had ended. [`PeerCheck`] tells a paused
/// peer from a vanished one instead.
pub fn relaying(fd: RawFd) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: as in tune_tcp.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        setsockopt(&fd, sockopt::TcpUserTimeout, &0).map_err(to_io)?;
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = fd;
    Ok(())
}

/// Whether the peer of a relayed TCP connection is gone, asked of the
/// kernel every [`PEER_CHECK_EVERY`]: what we sent (data, or probes of a
/// zero window) unanswered for [`USER_TIMEOUT_MS`], at two looks in a row.
/// A paused reader answers the kernel's window probes, and so is never
/// taken for gone, however long it pauses; a probe just sent looks
/// unanswered for one round trip, hence the second look. A peer gone
/// while nothing was sent is keepalive's to notice.
#[derive(Debug, Default)]
pub struct PeerCheck {
    /// The first look of the current run of looks that found it silent.
    silent_since: Option<std::time::Instant>,
}

impl PeerCheck {
    /// Gone: silent at this look and at one at least
    /// [`PEER_CHECK_EVERY`] before, with none in between that was not.
    pub fn gone(&mut self, fd: RawFd) -> bool {
        self.judge(unanswered(fd), std::time::Instant::now())
    }

    fn judge(&mut self, silent: bool, now: std::time::Instant) -> bool {
        if !silent {
            self.silent_since = None;
            return false;
        }
        let since = *self.silent_since.get_or_insert(now);
        now.duration_since(since) >= PEER_CHECK_EVERY
    }
}

/// The error a relay fails with when [`PeerCheck`] finds its peer gone.
pub fn peer_silent() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("connection timed out: the peer acknowledged nothing for {} s", USER_TIMEOUT_MS / 1000),
    )
}

/// Whether `fd` has data or window probes out that its peer has not
/// answered for [`USER_TIMEOUT_MS`].
#[cfg(any(target_os = "linux", target_os = "android"))]
fn unanswered(fd: RawFd) -> bool {
    // SAFETY: tcp_info is plain old data; the kernel fills at most
    // `length` bytes of it, from a descriptor the caller keeps open.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut length = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let got = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut libc::tcp_info).cast(), &mut length)
    };
    got == 0 && (info.tcpi_unacked > 0 || info.tcpi_probes > 0) && info.tcpi_last_ack_recv >= USER_TIMEOUT_MS
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn unanswered(_fd: RawFd) -> bool {
    false
}

/// The soft descriptor limit the process was started with, before
/// [`raise_fd_limit`] (0: not raised).
static STARTING_FD_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Long-running applets serve many connections: take the whole hard limit.
/// The commands they start get the limit back (see
/// [`restore_fd_limit`]).
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => STARTING_FD_LIMIT.store(soft, std::sync::atomic::Ordering::Relaxed),
                Err(error) => log::debug!("cannot raise the descriptor limit to {hard}: {error}"),
            }
        }
    }
}

/// In a child about to exec a command: the soft descriptor limit the
/// user started us with, not the one raised for our own many connections
/// (a `select()` program breaks past 1024, and one that closes every
/// descriptor up to the limit crawls under a large one). Only
/// async-signal-safe calls: it runs between fork and exec.
pub fn restore_fd_limit() -> io::Result<()> {
    let soft = STARTING_FD_LIMIT.load(std::sync::atomic::Ordering::Relaxed);
    if soft == 0 {
        return Ok(());
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit on a live local; both are
    // async-signal-safe system calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        limit.rlim_cur = soft as libc::rlim_t;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A UNIX listener whose backlog is full refuses a nonblocking connect
/// with EAGAIN: the service is busy, not gone, and a client connecting to
/// it directly (blocking) would simply wait for room. Relays that must not
/// block wait the same way, trying again after pauses from 1 ms doubling
/// to 50 ms, for at most [`BusyWait::PATIENCE`].
#[derive(Debug, Clone)]
pub struct BusyWait {
    since: std::time::Instant,
    pause: std::time::Duration,
}

impl Default for BusyWait {
    fn default() -> Self {
        BusyWait::new()
    }
}

impl BusyWait {
    /// How long a client is kept waiting for room before it is told the
    /// service is busy (SEP's 503) or, through a proxy, closed: less than
    /// the 10 s SEP clients (dcat, an importer) give a status line, so
    /// that the 503 reaches them.
    pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(8);
    const FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);
    const MOST_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

    pub fn new() -> BusyWait {
        BusyWait { since: std::time::Instant::now(), pause: Self::FIRST_PAUSE }
    }

    /// When to try again, or `None` once the patience is spent.
    pub fn next_try(&mut self) -> Option<std::time::Instant> {
        let now = std::time::Instant::now();
        if now.duration_since(self.since) >= Self::PATIENCE {
            return None;
        }
        let when = now + self.pause;
        self.pause = (self.pause * 2).min(Self::MOST_PAUSE);
        Some(when)
    }
}

/// Sets `O_NONBLOCK` on a descriptor we own (a pipe from a child, say,
/// that the event loop is to watch).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// In a forked child that does not exec: closes every descriptor but
/// stdin, stdout, stderr and `keep`. The child must not hold copies of the
/// parent's sockets and pipes: an end the parent closes to say EOF (ssh's
/// stdin, say) would stay open in the child for as long as it runs.
/// close_range(2), or on kernels before 5.9 each descriptor listed in
/// /proc/self/fd (which allocates: for single-threaded parents only).
pub fn close_descriptors_except(keep: RawFd) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let keep = keep.max(2) as libc::c_uint;
        // SAFETY: close_range only closes descriptors of this process.
        let below = keep <= 3 || unsafe { libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, keep - 1, 0) } == 0;
        // SAFETY: as above.
        let above = unsafe { libc::syscall(libc::SYS_close_range, keep + 1, libc::c_uint::MAX, 0) } == 0;
        if below && above {
            return;
        }
    }
    let open: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(entries) => entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok()).collect(),
        Err(_) => return,
    };
    for fd in open.into_iter().filter(|&fd| fd > 2 && fd != keep) {
        // SAFETY: closes a descriptor of this process; the listing's own
        // descriptor, among them, is already closed (EBADF).
        unsafe { libc::close(fd) };
    }
}

/// One descriptor kept in reserve so that, when a process runs out of
/// descriptors, a waiting client can still be accepted and closed at once
/// (refused cleanly) instead of staying in the backlog while the accept
/// loop spins on EMFILE.
pub struct DescriptorReserve {
    spare: Option<std::fs::File>,
}

impl Default for DescriptorReserve {
    fn default() -> Self {
        DescriptorReserve::new()
    }
}

impl DescriptorReserve {
    pub fn new() -> DescriptorReserve {
        DescriptorReserve { spare: std::fs::File::open("/dev/null").ok() }
    }

    /// Whether `error` means we are out of descriptors.
    pub fn is_exhaustion(error: &io::Error) -> bool {
        matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
    }

    /// Frees the reserve, runs `accept_and_refuse` (which accepts one
    /// connection and drops it, maybe after a word), and takes the reserve
    /// back. Returns what it returned, or false without a reserve.
    pub fn refuse_one(&mut self, accept_and_refuse: impl FnOnce() -> bool) -> bool {
        if self.spare.take().is_none() {
            return false;
        }
        let refused = accept_and_refuse();
        self.spare = std::fs::File::open("/dev/null").ok();
        refused
    }
}

#[cfg(test)]
mod tests {
    /// Two looks at least 5 s apart, silent both, and none answered in
    /// between: a look soon after another (a probe just sent, not yet
    /// answered) does not count.
    #[test]
    fn a_peer_is_gone_only_when_silent_at_two_looks_five_seconds_apart() {
        use std::time::{Duration, Instant};
        let start = Instant::now();
        let mut check = super::PeerCheck::default();
        assert!(!check.judge(true, start));
        assert!(!check.judge(true, start + Duration::from_millis(100)), "too soon after the first");
        assert!(!check.judge(false, start + Duration::from_secs(3)), "it answered");
        assert!(!check.judge(true, start + Duration::from_secs(6)), "a new run of silence");
        assert!(check.judge(true, start + Duration::from_secs(11)));
    }

    use super::*;
    use nix::sys::socket::getsockopt;

    #[test]
    fn a_forked_child_keeps_only_stdio_and_the_descriptor_it_is_told() {
        use std::io::Read;
        let (report_read, report_write) = nix::unistd::pipe().unwrap();
        let (_other_read, other_write) = nix::unistd::pipe().unwrap();
        let (report, other) = (report_write.as_raw_fd(), other_write.as_raw_fd());
        // SAFETY: the child makes only async-signal-safe system calls
        // (close_range, fcntl, write) and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                close_descriptors_except(report);
                // SAFETY: fcntl and write on numbers; _exit ends the child.
                unsafe {
                    let answer: &[u8] = if libc::fcntl(other, libc::F_GETFD) == -1 { b"closed" } else { b"open" };
                    libc::write(report, answer.as_ptr().cast(), answer.len());
                    libc::_exit(0);
                }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(report_write);
                let mut answer = String::new();
                std::fs::File::from(report_read).read_to_string(&mut answer).unwrap();
                nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(answer, "closed", "the child still held the parent's other pipe");
            }
        }
    }

    /// The backlog asked for is the one the kernel applies, whatever the
    /// C library's SOMAXCONN (musl's is 128): a UNIX listener queues
    /// BACKLOG + 1 connections, and refuses the next with EAGAIN.
    #[test]
    fn a_listener_gets_the_backlog_it_asks_for() {
        const ASKED: usize = 300;
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        if somaxconn < ASKED {
            // Loudly, and a failure where every test must run (CI).
            let why = format!("net.core.somaxconn is {somaxconn}, under {ASKED}");
            assert!(std::env::var_os("DIPUS_TEST_REQUIRE_ALL").is_none(), "cannot run: {why}");
            eprintln!("SKIPPED: {why}");
            return;
        }
        let path = std::env::temp_dir().join(format!("dipus-backlog-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = unix_listen(&path, ASKED as i32).unwrap();
        let connect = || -> io::Result<std::os::fd::OwnedFd> {
            let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK, None).map_err(to_io)?;
            nix::sys::socket::connect(fd.as_raw_fd(), &UnixAddr::new(&path).map_err(to_io)?).map_err(to_io)?;
            Ok(fd)
        };
        let queued: Vec<_> =
            (0..=ASKED).map(|index| connect().unwrap_or_else(|e| panic!("connection {index}: {e}"))).collect();
        let refused = connect().map(drop).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EAGAIN), "{refused}");
        drop((queued, listener));
        std::fs::remove_file(&path).unwrap();
    }

    fn int_option(fd: RawFd, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into a live local.
        let got = unsafe { libc::getsockopt(fd, level, name, (&mut value as *mut libc::c_int).cast(), &mut len) };
        assert_eq!(got, 0, "getsockopt: {}", io::Error::last_os_error());
        value
    }

    #[test]
    fn tune_tcp_sets_every_option_it_promises() {
        let listener = tcp_listen("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        tune_tcp(stream.as_raw_fd()).unwrap();
        let fd = stream.as_raw_fd();
        // SAFETY: `stream` outlives the borrow.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        assert!(getsockopt(&borrowed, sockopt::TcpNoDelay).unwrap());
        assert!(getsockopt(&borrowed, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&borrowed, sockopt::TcpKeepIdle).unwrap(), KEEPALIVE_IDLE_SECS);
        assert_eq!(getsockopt(&borrowed, sockopt::TcpKeepInterval).unwrap(), KEEPALIVE_INTERVAL_SECS);
        assert_eq!(getsockopt(&borrowed, sockopt::TcpKeepCount).unwrap(), KEEPALIVE_PROBES);
        assert_eq!(getsockopt(&borrowed, sockopt::TcpUserTimeout).unwrap(), USER_TIMEOUT_MS);
        assert_eq!(int_option(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT), NOTSENT_LOWAT);
    }
}
