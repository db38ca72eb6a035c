//! The hot path: one nonblocking state machine that moves bytes both ways
//! between descriptors, used by every applet that moves bytes.
//!
//! A [`Relay`] has two directions, each a source (or a queue of sources, for
//! `dcat a b -`) and a sink. The two directions are one symmetric table, as
//! in s6-ioconnect: nothing is written twice for "upstream" and
//! "downstream". EOF on a source becomes `shutdown(SHUT_WR)` of its sink
//! once everything read has been written, so half-close crosses the relay.
//!
//! How bytes move depends on the descriptors:
//! - one end is a pipe: `splice(2)` straight between the two (zero copy);
//! - a regular file into a socket: `sendfile(2)`;
//! - socket to socket: a hybrid. Small messages go through a buffer with
//!   `recv`/`send`, one syscall pair per message; a read that fills the
//!   buffer means bulk, and the direction moves to `splice` through a pipe
//!   borrowed from a per-thread pool, and back to the buffer when the
//!   source runs dry. Into a TCP socket, bulk is copied through a 256 KiB
//!   bulk buffer instead, which costs TCP less than spliced pages (see
//!   [`BULK_BUFFER_SIZE`]). Pipes and bulk buffers are capped per thread,
//!   so thousands of idle connections hold neither; above the caps a
//!   direction stays buffered.
//! - anything else (a terminal), or where splice is refused (`EINVAL`),
//!   or off Linux: read/write through the buffer.
//!
//! The relay never waits: each operation that would block clears that
//! descriptor's readiness flag, and the driver (a mio loop, edge-triggered,
//! or a `polling` loop, level-triggered) sets it again on the next event.
//! Descriptors that are not nonblocking (a terminal, a blocking socket given
//! to dcat) get one operation per readiness event, which cannot block long.
//! `splice`'s `EAGAIN` does not say which end would block. Through a pool
//! pipe the relay knows (it drains the pipe before reading again); between
//! a pipe and a socket it polls both ends after the `EAGAIN` and waits only
//! on an end it saw blocked, so it never waits for an edge that cannot come
//! and never spins.
//!
//! The relay does not own the descriptors: the caller keeps them open for
//! the relay's lifetime and closes them afterwards.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Buffer of a direction in buffered mode; a read that fills it is bulk.
pub const BUFFER_SIZE: usize = 16 * 1024;
/// Most bytes one splice or sendfile call is asked to move.
const SPLICE_CHUNK: usize = 1 << 20;
/// Pipes one process may hold for splicing, in use or pooled. Each can pin
/// 16 pages; the kernel's per-user soft limit is typically 16384 pages.
pub const MAX_PIPES: usize = 256;
/// A direct splice that fails this often in a row while poll calls both
/// ends ready gives way to copying, so the relay can never spin on it.
const MAX_REFUSALS: u8 = 8;
/// Idle pipes kept for reuse.
const POOL_SIZE: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Socket,
    Pipe,
    File,
    /// Terminals and other character devices: read/write only.
    Other,
}

impl Kind {
    pub fn of(fd: RawFd) -> Kind {
        // SAFETY: fstat writes into a zeroed stat we own.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut stat) } != 0 {
            return Kind::Other;
        }
        match stat.st_mode & libc::S_IFMT {
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFIFO => Kind::Pipe,
            libc::S_IFREG => Kind::File,
            _ => Kind::Other,
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn socket_domain(fd: RawFd) -> Option<libc::c_int> {
    let mut domain: libc::c_int = 0;
    let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_DOMAIN writes one int into `domain`, whose size we pass.
    let result = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN, (&mut domain as *mut libc::c_int).cast(), &mut length)
    };
    (result == 0).then_some(domain)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn socket_domain(_fd: RawFd) -> Option<libc::c_int> {
    None
}

fn is_ip_domain(domain: libc::c_int) -> bool {
    domain == libc::AF_INET || domain == libc::AF_INET6
}

fn is_nonblocking(fd: RawFd) -> bool {
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    flags >= 0 && flags & libc::O_NONBLOCK != 0
}

/// One descriptor as the relay sees it.
#[derive(Debug)]
struct Endpoint {
    fd: RawFd,
    kind: Kind,
    /// `O_NONBLOCK` is set: splice and read/write return EAGAIN.
    nonblocking: bool,
    /// A blocking terminal or pipe read/written with read/write: one
    /// operation per readiness event, so it never blocks for long.
    one_shot: bool,
    /// Cannot be polled (a regular file, /dev/null): always ready.
    always_ready: bool,
    readable: bool,
    writable: bool,
    /// The driver saw the peer's end of data (EPOLLRDHUP) or an error:
    /// reads go on until they return 0, short or not.
    read_closed: bool,
    /// The same event: a socket is asked once whether its connection is
    /// gone (reset, timed out), since a direction into it may have nothing
    /// to write that would tell.
    check_error: bool,
    /// A TCP (or other IP) socket; asked only when a direction into it
    /// turns bulk, then kept.
    over_ip: Option<bool>,
    /// Whether the peer of a TCP leg still answers (see [`Relay::check_peers`]).
    peer_check: crate::net::PeerCheck,
    /// Given to the relay (see [`Relay::adopt`]): a pipe sink is closed
    /// at EOF, since closing is the only way to end a pipe.
    owned: Option<OwnedFd>,
}

impl Endpoint {
    fn new(fd: RawFd) -> Endpoint {
        let kind = Kind::of(fd);
        let nonblocking = is_nonblocking(fd);
        // Sockets are read and written with MSG_DONTWAIT, so they never
        // block whatever their flags say.
        let one_shot = !nonblocking && matches!(kind, Kind::Pipe | Kind::Other);
        let always_ready = kind == Kind::File;
        Endpoint {
            fd,
            kind,
            nonblocking,
            one_shot,
            always_ready,
            // Blocking descriptors wait for the poller's word first.
            readable: !one_shot,
            writable: !one_shot,
            read_closed: false,
            check_error: false,
            over_ip: None,
            peer_check: crate::net::PeerCheck::default(),
            owned: None,
        }
    }

    fn is_over_ip(&mut self) -> bool {
        let (kind, fd) = (self.kind, self.fd);
        *self.over_ip.get_or_insert_with(|| kind == Kind::Socket && socket_domain(fd).is_some_and(is_ip_domain))
    }

    /// Once per error or hang-up event: whether this socket's connection
    /// is gone (reset, timed out, its peer closed), so that nothing can be
    /// written to it again. Asked of the socket itself, since a read of it
    /// in the same pump may already have taken its pending error.
    fn take_connection_error(&mut self) -> Option<io::Error> {
        if !std::mem::take(&mut self.check_error) {
            return None;
        }
        // A hang-up is both ways shut: the connection reset or timed out
        // (TCP), or the peer closed, not just half-closed (UNIX).
        let mut poll = libc::pollfd { fd: self.fd, events: libc::POLLOUT, revents: 0 };
        // SAFETY: poll on one live pollfd, without waiting.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        (ready == 1 && poll.revents & (libc::POLLHUP | libc::POLLERR) != 0)
            .then(|| io::Error::from(io::ErrorKind::ConnectionReset))
    }

    fn after_read(&mut self) {
        if self.one_shot && !self.always_ready {
            self.readable = false;
        }
    }

    fn after_write(&mut self) {
        if self.one_shot && !self.always_ready {
            self.writable = false;
        }
    }

    fn set_blocked_read(&mut self) {
        if !self.always_ready {
            self.readable = false;
        }
    }

    fn set_blocked_write(&mut self) {
        if !self.always_ready {
            self.writable = false;
        }
    }
}

/// How a direction moves its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    Buffered,
    /// Buffered for small messages, spliced through a pool pipe for bulk.
    Hybrid,
    /// One end is a pipe: splice directly.
    Direct,
    /// A regular file into a socket.
    SendFile,
}

fn choose_strategy(source: &Endpoint, sink: &Endpoint) -> Strategy {
    if !cfg!(any(target_os = "linux", target_os = "android")) {
        return Strategy::Buffered;
    }
    let splicable = |e: &Endpoint| match e.kind {
        Kind::Pipe => true,
        Kind::Socket => e.nonblocking,
        Kind::File | Kind::Other => false,
    };
    match (source.kind, sink.kind) {
        (Kind::File, Kind::Socket) if sink.nonblocking => Strategy::SendFile,
        (Kind::Pipe, _) | (_, Kind::Pipe) if splicable(source) && splicable(sink) => Strategy::Direct,
        (Kind::Socket, Kind::Socket) if source.nonblocking && sink.nonblocking => Strategy::Hybrid,
        _ => Strategy::Buffered,
    }
}

/// A pipe for splicing, with the read end first.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static PIPES: RefCell<PipePool> = const { RefCell::new(PipePool { idle: Vec::new(), live: 0 }) };
}

struct PipePool {
    idle: Vec<Pipe>,
    live: usize,
}

/// A pipe from the pool, or a new one while under the cap.
fn take_pipe() -> Option<Pipe> {
    PIPES.with(|pool| {
        let mut pool = pool.borrow_mut();
        if let Some(pipe) = pool.idle.pop() {
            return Some(pipe);
        }
        if pool.live >= MAX_PIPES {
            return None;
        }
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK).ok()?;
        enlarge(&write);
        pool.live += 1;
        Some(Pipe { read, write })
    })
}

/// Bytes a splicing pipe is asked to hold: fewer, larger splices for bulk
/// streams. Best effort: past the per-user pipe budget
/// (`/proc/sys/fs/pipe-user-pages-soft`) the kernel refuses and the pipe
/// keeps its default 64 KiB.
/// With [`MAX_PIPES`] that bounds the kernel memory bulk relaying can pin
/// at 64 MiB.
pub const PIPE_SIZE: i32 = 256 * 1024;

#[cfg(any(target_os = "linux", target_os = "android"))]
fn enlarge(pipe: &OwnedFd) {
    // SAFETY: F_SETPIPE_SZ on our own pipe; failure leaves it as it was.
    unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn enlarge(_pipe: &OwnedFd) {}

/// Returns an empty pipe to the pool (or closes it).
fn give_pipe(pipe: Pipe) {
    PIPES.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.idle.len() < POOL_SIZE {
            pool.idle.push(pipe);
        } else {
            pool.live -= 1;
        }
    })
}

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// Idle copy buffers kept for reuse. A direction holds a buffer only while
/// bytes wait in it, so many connections exchanging small messages share
/// a few buffers instead of each keeping two (16 MiB at 500 connections).
const BUFFER_POOL_SIZE: usize = 64;

fn take_buffer() -> Box<[u8]> {
    BUFFERS.with(|pool| pool.borrow_mut().pop()).unwrap_or_else(|| vec![0; BUFFER_SIZE].into_boxed_slice())
}

fn give_buffer(buffer: Box<[u8]>) {
    if buffer.len() == BULK_BUFFER_SIZE {
        give_bulk_buffer(buffer);
        return;
    }
    BUFFERS.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < BUFFER_POOL_SIZE {
            pool.push(buffer);
        }
    })
}

/// Buffer of a bulk direction into a TCP socket. Splicing into TCP costs
/// more than copying: every spliced page becomes a fragment of its own in
/// the segments, on both sides of the connection. Measured on loopback
/// (doc/performance.md), importer and exporter each spent about 40% less
/// CPU per byte copying through 256 KiB than splicing, and the two hops
/// ran about 1.5 × faster; 1 MiB gained nothing more. UNIX to UNIX it is
/// the other way round, so only TCP sinks get one.
pub const BULK_BUFFER_SIZE: usize = 256 * 1024;
/// Bulk buffers one thread may hold, in use or pooled (8 MiB); past it, a
/// bulk direction into TCP splices like any other.
pub const MAX_BULK_BUFFERS: usize = 32;
/// Idle bulk buffers kept for reuse.
const BULK_POOL_SIZE: usize = 4;

thread_local! {
    static BULK_BUFFERS: RefCell<BulkPool> = const { RefCell::new(BulkPool { idle: Vec::new(), live: 0 }) };
}

struct BulkPool {
    idle: Vec<Box<[u8]>>,
    live: usize,
}

fn take_bulk_buffer() -> Option<Box<[u8]>> {
    BULK_BUFFERS.with(|pool| {
        let mut pool = pool.borrow_mut();
        if let Some(buffer) = pool.idle.pop() {
            return Some(buffer);
        }
        if pool.live >= MAX_BULK_BUFFERS {
            return None;
        }
        pool.live += 1;
        Some(vec![0; BULK_BUFFER_SIZE].into_boxed_slice())
    })
}

fn give_bulk_buffer(buffer: Box<[u8]>) {
    BULK_BUFFERS.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.idle.len() < BULK_POOL_SIZE {
            pool.idle.push(buffer);
        } else {
            pool.live -= 1;
        }
    })
}

/// Bulk buffers this thread holds, in use or pooled.
#[cfg(test)]
fn bulk_buffers_live() -> usize {
    BULK_BUFFERS.with(|pool| pool.borrow().live)
}

/// A pipe that still holds data is not reusable: close it.
fn discard_pipe(pipe: Pipe) {
    drop(pipe);
    PIPES.with(|pool| pool.borrow_mut().live -= 1);
}

/// Pipes this thread holds, in use or pooled.
#[cfg(test)]
fn pipes_live() -> usize {
    PIPES.with(|pool| pool.borrow().live)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// The source is finished; what is buffered is still being written.
    Draining,
    /// Done: the sink has been shut down (or broke).
    Closed,
}

#[derive(Debug)]
struct Direction {
    /// Endpoint indices; `sources[0]` is current, the rest wait their turn.
    sources: Vec<usize>,
    sink: usize,
    strategy: Strategy,
    state: State,
    buffer: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    /// Set while spliced through a pool pipe.
    pipe: Option<Pipe>,
    in_pipe: usize,
    /// The source is carrying bulk (its last read filled the buffer, or
    /// its last splice moved at least as much): splice, through a pool
    /// pipe taken afresh whenever the direction is empty. Idle, the pipe
    /// goes back to the pool but this stays, so a stream that pauses
    /// resumes in splice mode without a copying read first.
    bulk: bool,
    /// EAGAINs in a row from a direct splice while both ends polled
    /// ready (see [`MAX_REFUSALS`]).
    refusals: u8,
    bytes: u64,
    /// The sink refused data (peer gone, EPIPE): bytes were lost.
    broken: Option<io::ErrorKind>,
    /// The endpoint whose read failed the relay, to name it.
    failed_source: Option<usize>,
    /// A write to the sink failed the relay (not a peer gone: ENOSPC,
    /// EBADF).
    failed_sink: bool,
}

/// What moving one direction returned.
enum Step {
    Progress,
    Blocked,
}

/// Which way bytes go: `Forward` is the first pair given to the
/// constructor (e.g. client to service), `Backward` the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    Forward = 0,
    Backward = 1,
}

/// What a poller should wait for on one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    pub fd: RawFd,
    pub read: bool,
    pub write: bool,
}

#[derive(Debug)]
pub struct Relay {
    endpoints: Vec<Endpoint>,
    directions: [Direction; 2],
}

impl Relay {
    /// A bidirectional relay between two sockets: `a → b` is forward.
    pub fn between(a: RawFd, b: RawFd) -> Relay {
        Relay::new(&[a], b, b, a)
    }

    /// A relay from each of `sources` in turn into `sink` (forward) and
    /// from `back_source` into `back_sink` (backward), as dcat needs.
    pub fn new(sources: &[RawFd], sink: RawFd, back_source: RawFd, back_sink: RawFd) -> Relay {
        let mut endpoints: Vec<Endpoint> = Vec::new();
        let mut index_of = |fd: RawFd| match endpoints.iter().position(|e| e.fd == fd) {
            Some(index) => index,
            None => {
                endpoints.push(Endpoint::new(fd));
                endpoints.len() - 1
            }
        };
        let forward_sources: Vec<usize> = sources.iter().map(|&fd| index_of(fd)).collect();
        let forward_sink = index_of(sink);
        let back_source = index_of(back_source);
        let back_sink = index_of(back_sink);
        let mut relay = Relay {
            directions: [Direction::new(forward_sources, forward_sink), Direction::new(vec![back_source], back_sink)],
            endpoints,
        };
        for direction in &mut relay.directions {
            direction.choose(&relay.endpoints);
        }
        relay
    }

    /// The descriptors a poller should watch, with what each waits for.
    /// Regular files are left out: they are always ready.
    pub fn interests(&self) -> Vec<Interest> {
        let mut interests: Vec<Interest> = Vec::with_capacity(self.endpoints.len());
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            if endpoint.always_ready || endpoint.fd < 0 {
                continue;
            }
            let mut interest = Interest { fd: endpoint.fd, read: false, write: false };
            for direction in &self.directions {
                let (read, write) = direction.waits_for(&self.endpoints);
                interest.read |= read == Some(index);
                interest.write |= write == Some(index);
            }
            interests.push(interest);
        }
        interests
    }

    /// A poller reported readiness on `fd`. Errors and hang-ups count as
    /// both: the next operation reports them.
    pub fn set_ready(&mut self, fd: RawFd, readable: bool, writable: bool) {
        for endpoint in &mut self.endpoints {
            if endpoint.fd == fd {
                endpoint.readable |= readable;
                endpoint.writable |= writable;
            }
        }
    }

    /// The poller reported that the peer of `fd` closed its sending side
    /// (or an error). An edge-triggered driver must say so: the relay
    /// takes a short read from a socket as "drained" (saving a read that
    /// would fail with EAGAIN on every message), and the end of data can
    /// arrive on the same edge as the last bytes.
    pub fn set_read_closed(&mut self, fd: RawFd) {
        for endpoint in &mut self.endpoints {
            if endpoint.fd == fd {
                endpoint.read_closed = true;
                endpoint.check_error = endpoint.kind == Kind::Socket;
            }
        }
    }

    /// Writable readiness for every sink (for a driver that cannot tell
    /// which descriptor an event was for).
    pub fn set_ready_all_writers(&mut self, writable: bool) {
        for direction in &self.directions {
            let sink = direction.sink;
            self.endpoints[sink].writable |= writable;
        }
    }

    /// Hands `fd` (one of the relay's descriptors) to the relay: if it is
    /// a pipe that a direction writes into, the relay closes it when that
    /// direction ends, which is how the reader learns of the EOF (ssh's
    /// stdin, for one). Otherwise it is closed when the relay is dropped.
    pub fn adopt(&mut self, fd: OwnedFd) {
        let raw = fd.as_raw_fd();
        if let Some(endpoint) = self.endpoints.iter_mut().find(|endpoint| endpoint.fd == raw) {
            endpoint.owned = Some(fd);
        }
    }

    /// The poller cannot watch `fd` (epoll refuses /dev/null and regular
    /// files): treat it as always ready.
    pub fn set_always_ready(&mut self, fd: RawFd) {
        for endpoint in &mut self.endpoints {
            if endpoint.fd == fd {
                endpoint.always_ready = true;
                endpoint.readable = true;
                endpoint.writable = true;
            }
        }
    }

    /// Moves as many bytes as possible without blocking. Errors of the
    /// peers (reset, broken pipe) end a direction and are not returned;
    /// `Err` is for the relay's own failures.
    pub fn pump(&mut self) -> io::Result<()> {
        loop {
            let mut progressed = false;
            for way in 0..2 {
                let Relay { endpoints, directions } = self;
                let direction = &mut directions[way];
                match direction.step(endpoints) {
                    Ok(Step::Progress) => progressed = true,
                    Ok(Step::Blocked) => {}
                    Err(error) => {
                        // Not a read: the write.
                        direction.failed_sink = direction.failed_source.is_none();
                        return Err(error);
                    }
                }
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    /// Whether any descriptor is a TCP (or other IP) connection, whose
    /// peer [`Relay::check_peers`] looks after.
    pub fn has_ip_leg(&mut self) -> bool {
        self.endpoints.iter_mut().any(Endpoint::is_over_ip)
    }

    /// Asks the kernel whether the peer of each TCP leg still answers, to
    /// be called every [`crate::net::PEER_CHECK_EVERY`] by whoever drives
    /// the relay (TCP legs have no user timeout while relaying, see
    /// [`crate::net::relaying`]). An error: a peer left what we sent
    /// unanswered for 20 s, and the relay has failed.
    pub fn check_peers(&mut self) -> io::Result<()> {
        let gone = self.endpoints.iter_mut().position(|endpoint| {
            let fd = endpoint.fd;
            endpoint.is_over_ip() && endpoint.peer_check.gone(fd)
        });
        let Some(gone) = gone else {
            return Ok(());
        };
        // What was written into it is what went unacknowledged.
        if let Some(direction) = self.directions.iter_mut().find(|direction| direction.sink == gone) {
            direction.failed_sink = true;
        }
        Err(crate::net::peer_silent())
    }

    pub fn is_done(&self) -> bool {
        self.directions.iter().all(|d| d.state == State::Closed)
    }

    pub fn way_done(&self, way: Way) -> bool {
        self.directions[way as usize].state == State::Closed
    }

    /// Bytes moved in one direction so far.
    pub fn bytes(&self, way: Way) -> u64 {
        self.directions[way as usize].bytes
    }

    /// Why the sink of a direction refused data, if it did.
    pub fn broken(&self, way: Way) -> Option<io::ErrorKind> {
        self.directions[way as usize].broken
    }

    /// The source whose read failed the relay (a file that gave EIO), if
    /// a read did, so that the error can name it.
    pub fn failed_source(&self) -> Option<RawFd> {
        self.directions.iter().find_map(|direction| direction.failed_source).map(|source| self.endpoints[source].fd)
    }

    /// The sink whose write failed the relay, if a write did.
    pub fn failed_sink(&self) -> Option<RawFd> {
        self.directions
            .iter()
            .find(|direction| direction.failed_sink)
            .map(|direction| self.endpoints[direction.sink].fd)
    }

    /// Whether a direction currently splices through a pool pipe.
    #[cfg(test)]
    fn is_spliced(&self, way: Way) -> bool {
        self.directions[way as usize].pipe.is_some()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for direction in &mut self.directions {
            direction.release_pipe();
            direction.release_buffer();
        }
    }
}

/// Drives `relay` with a `polling` loop (level-triggered, as one-shot
/// clients like dcat want) until `finished` says so or nothing is left.
pub fn run_until(relay: &mut Relay, finished: impl Fn(&Relay) -> bool) -> io::Result<()> {
    use std::os::fd::BorrowedFd;
    let poller = polling::Poller::new()?;
    let mut registered: Vec<RawFd> = Vec::new();
    let mut events = polling::Events::new();
    let watched = relay.has_ip_leg();
    let mut next_check = std::time::Instant::now() + crate::net::PEER_CHECK_EVERY;
    let result = (|| loop {
        relay.pump()?;
        if finished(relay) || relay.is_done() {
            return Ok(());
        }
        if watched && std::time::Instant::now() >= next_check {
            relay.check_peers()?;
            next_check = std::time::Instant::now() + crate::net::PEER_CHECK_EVERY;
        }
        // A descriptor epoll refuses (/dev/null) is always ready from now
        // on: pump again before sleeping, or nothing may ever wake us.
        let mut newly_ready = false;
        for interest in relay.interests() {
            if !interest.read && !interest.write {
                // Nothing to wait for on it now: not watched, or an error
                // or hang-up there (stdout's reader gone while the service
                // is silent) would wake us at once, again and again, with
                // nothing to do.
                if let Some(at) = registered.iter().position(|&fd| fd == interest.fd) {
                    registered.swap_remove(at);
                    // SAFETY: still open, as below.
                    poller.delete(unsafe { BorrowedFd::borrow_raw(interest.fd) })?;
                }
                continue;
            }
            let event = polling::Event::new(interest.fd as usize, interest.read, interest.write);
            if registered.contains(&interest.fd) {
                // SAFETY: the relay's descriptors stay open while it lives.
                poller.modify(unsafe { BorrowedFd::borrow_raw(interest.fd) }, event)?;
                continue;
            }
            // SAFETY: as above; every added descriptor is deleted below
            // before this function returns.
            match unsafe { poller.add(interest.fd, event) } {
                Ok(()) => registered.push(interest.fd),
                Err(error) if error.raw_os_error() == Some(libc::EPERM) => {
                    relay.set_always_ready(interest.fd);
                    newly_ready = true;
                }
                Err(error) => return Err(error),
            }
        }
        if newly_ready {
            continue;
        }
        events.clear();
        let timeout = watched.then(|| next_check.saturating_duration_since(std::time::Instant::now()));
        match poller.wait(&mut events, timeout) {
            Ok(_) => {}
            Err(error) if interrupted(&error) => continue,
            Err(error) => return Err(error),
        }
        for event in events.iter() {
            // Hang-ups and errors come as readable/writable here.
            relay.set_ready(event.key as RawFd, event.readable, event.writable);
        }
    })();
    for fd in registered {
        // SAFETY: still open, as above.
        let _ = poller.delete(unsafe { BorrowedFd::borrow_raw(fd) });
    }
    result
}

fn would_block(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EAGAIN)) || error.kind() == io::ErrorKind::WouldBlock
}

fn interrupted(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::Interrupted
}

/// Errors of a connection whose link failed (the peer's host silent past
/// the timeouts, a route gone) rather than one its peer ended: what was
/// read is not all there was, so a source that gets one fails the relay
/// instead of ending its direction like a peer that closed.
pub fn link_failed(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ETIMEDOUT | libc::EHOSTUNREACH | libc::ENETUNREACH))
}

/// Errors that mean the peer is gone, not that the relay failed.
fn peer_gone(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::EPIPE
                | libc::ECONNRESET
                | libc::ENOTCONN
                | libc::ETIMEDOUT
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::ECONNABORTED
                | libc::EIO
        )
    )
}

impl Direction {
    fn new(sources: Vec<usize>, sink: usize) -> Direction {
        Direction {
            sources,
            sink,
            strategy: Strategy::Buffered,
            state: State::Open,
            buffer: None,
            start: 0,
            end: 0,
            pipe: None,
            in_pipe: 0,
            bulk: false,
            refusals: 0,
            bytes: 0,
            broken: None,
            failed_source: None,
            failed_sink: false,
        }
    }

    fn source(&self) -> Option<usize> {
        self.sources.first().copied()
    }

    fn choose(&mut self, endpoints: &[Endpoint]) {
        if let Some(source) = self.source() {
            self.strategy = choose_strategy(&endpoints[source], &endpoints[self.sink]);
        }
    }

    fn pending(&self) -> usize {
        self.end - self.start + self.in_pipe
    }

    /// The endpoints (source to read, sink to write) whose readiness this
    /// direction is waiting for.
    fn waits_for(&self, endpoints: &[Endpoint]) -> (Option<usize>, Option<usize>) {
        if self.state == State::Closed {
            return (None, None);
        }
        let sink = (!endpoints[self.sink].writable).then_some(self.sink);
        if self.pending() > 0 {
            return (None, sink);
        }
        let source = self.source().filter(|&s| self.state == State::Open && !endpoints[s].readable);
        match self.strategy {
            // Both ends must be ready for one splice.
            Strategy::Direct => (source, sink),
            Strategy::SendFile => (None, sink),
            Strategy::Hybrid | Strategy::Buffered => (source, None),
        }
    }

    /// A bulk direction with nothing pending and something to read takes
    /// its carrier again (an idle one must hold neither pipe nor buffer).
    fn retake_carrier(&mut self, endpoints: &mut [Endpoint]) {
        let readable = self.source().is_some_and(|source| endpoints[source].readable);
        if self.bulk && self.buffer.is_none() && self.state == State::Open && readable {
            self.take_carrier(endpoints);
        }
    }

    /// What carries bulk best: into TCP a bulk buffer (see
    /// [`BULK_BUFFER_SIZE`]), elsewhere a pool pipe to splice through.
    /// Past either cap the direction stays buffered.
    fn take_carrier(&mut self, endpoints: &mut [Endpoint]) {
        if endpoints[self.sink].is_over_ip() {
            if let Some(buffer) = take_bulk_buffer() {
                self.buffer = Some(buffer);
                return;
            }
        }
        self.pipe = take_pipe();
    }

    fn release_pipe(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            if self.in_pipe == 0 {
                give_pipe(pipe);
            } else {
                discard_pipe(pipe);
            }
            self.in_pipe = 0;
        }
    }

    /// The source is finished: the next one takes over, or the sink is
    /// told there is no more once everything pending is written.
    fn source_finished(&mut self, endpoints: &[Endpoint]) {
        self.sources.remove(0);
        if self.sources.is_empty() {
            self.state = State::Draining;
        } else {
            self.release_pipe_if_empty();
            self.choose(endpoints);
        }
    }

    fn release_pipe_if_empty(&mut self) {
        if self.in_pipe == 0 {
            self.release_pipe();
        }
    }

    fn close(&mut self, endpoints: &mut [Endpoint]) {
        let sink = &mut endpoints[self.sink];
        if sink.kind == Kind::Socket {
            // SAFETY: shutdown on a descriptor the caller keeps open.
            unsafe { libc::shutdown(sink.fd, libc::SHUT_WR) };
        } else if let Some(fd) = sink.owned.take() {
            // Its number may be reused at once: forget it.
            drop(fd);
            sink.fd = -1;
        }
        self.state = State::Closed;
        self.release_pipe();
        self.release_buffer();
    }

    /// Hands the copy buffer back to the pool (what it held, if anything,
    /// is no longer wanted or was written).
    fn release_buffer(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            give_buffer(buffer);
        }
        self.start = 0;
        self.end = 0;
    }

    /// The sink is gone: stop, and stop reading what can no longer go
    /// anywhere.
    fn break_off(&mut self, endpoints: &mut [Endpoint], error: &io::Error) {
        self.broken = Some(error.kind());
        self.abandon(endpoints);
    }

    /// The sink is gone with nothing lost: stop reading what can no longer
    /// go anywhere, and end.
    fn abandon(&mut self, endpoints: &mut [Endpoint]) {
        if let Some(source) = self.source() {
            if endpoints[source].kind == Kind::Socket {
                // SAFETY: as in `close`.
                unsafe { libc::shutdown(endpoints[source].fd, libc::SHUT_RD) };
            }
        }
        self.close(endpoints);
    }

    fn step(&mut self, endpoints: &mut [Endpoint]) -> io::Result<Step> {
        if self.state == State::Closed {
            return Ok(Step::Blocked);
        }
        if let Some(error) = endpoints[self.sink].take_connection_error() {
            // Nothing more can reach the sink. Waiting for the source to
            // send something that would fail to be written would hold
            // both connections open for as long as the source is silent
            // (a service that never answers: forever).
            if self.pending() > 0 {
                self.break_off(endpoints, &error);
            } else {
                self.abandon(endpoints);
            }
            return Ok(Step::Progress);
        }
        if self.state == State::Draining && self.pending() == 0 {
            self.close(endpoints);
            return Ok(Step::Progress);
        }
        if self.strategy == Strategy::Hybrid && self.pipe.is_none() {
            self.retake_carrier(endpoints);
        }
        match self.strategy {
            Strategy::Direct => self.step_direct(endpoints),
            Strategy::SendFile => self.step_sendfile(endpoints),
            Strategy::Hybrid if self.pipe.is_some() => self.step_spliced(endpoints),
            Strategy::Hybrid | Strategy::Buffered => self.step_buffered(endpoints),
        }
    }

    fn step_buffered(&mut self, endpoints: &mut [Endpoint]) -> io::Result<Step> {
        let sink = self.sink;
        if self.end > self.start {
            if !endpoints[sink].writable {
                return Ok(Step::Blocked);
            }
            let buffer = self.buffer.as_ref().expect("data implies a buffer");
            match write_some(&endpoints[sink], &buffer[self.start..self.end]) {
                Ok(written) => {
                    endpoints[sink].after_write();
                    self.start += written;
                    self.bytes += written as u64;
                    if self.start == self.end {
                        self.release_buffer();
                        // Only if there is more to read now: a short read
                        // said the source was dry, and a paused stream must
                        // not sit on a carrier others need.
                        self.retake_carrier(endpoints);
                    }
                    return Ok(Step::Progress);
                }
                Err(error) if would_block(&error) => {
                    endpoints[sink].set_blocked_write();
                    return Ok(Step::Blocked);
                }
                Err(error) if interrupted(&error) => return Ok(Step::Progress),
                Err(error) if peer_gone(&error) => {
                    self.break_off(endpoints, &error);
                    return Ok(Step::Progress);
                }
                Err(error) => return Err(error),
            }
        }
        let Some(source) = self.source() else {
            return Ok(Step::Blocked);
        };
        if self.state != State::Open || !endpoints[source].readable {
            return Ok(Step::Blocked);
        }
        let buffer = self.buffer.get_or_insert_with(take_buffer);
        let capacity = buffer.len();
        let result = read_some(&endpoints[source], buffer);
        if !matches!(result, Ok(read) if read > 0) {
            self.release_buffer();
        }
        match result {
            Ok(0) => {
                self.source_finished(endpoints);
                Ok(Step::Progress)
            }
            Ok(read) => {
                endpoints[source].after_read();
                self.start = 0;
                self.end = read;
                let filled = read == capacity;
                self.bulk = read >= BUFFER_SIZE && self.strategy == Strategy::Hybrid;
                // A stream socket's read stops short only when its queue is
                // empty (UNIX sockets also at passed credentials or
                // descriptors, and at out-of-band data, which the peers
                // of a relay do not send; TCP at urgent data, likewise):
                // new bytes raise a new edge, so the read that would fail
                // with EAGAIN is skipped, one syscall per message. Not
                // once the end of data was seen: it may have come on the
                // edge that brought these bytes, and only a read shows it.
                let endpoint = &mut endpoints[source];
                if !filled && endpoint.kind == Kind::Socket && !endpoint.read_closed {
                    endpoint.set_blocked_read();
                }
                Ok(Step::Progress)
            }
            Err(error) if would_block(&error) => {
                endpoints[source].set_blocked_read();
                Ok(Step::Blocked)
            }
            Err(error) if interrupted(&error) => Ok(Step::Progress),
            // A reset source has said all it will: pass EOF on. A file
            // has no peer: its error (EIO) is a failure, and passing it
            // on as EOF would truncate what the sink gets; so is a failed
            // link (see `link_failed`).
            Err(error) if peer_gone(&error) && !link_failed(&error) && endpoints[source].kind != Kind::File => {
                self.source_finished(endpoints);
                Ok(Step::Progress)
            }
            Err(error) => {
                self.failed_source = Some(source);
                Err(error)
            }
        }
    }

    /// Socket to socket through a pool pipe.
    fn step_spliced(&mut self, endpoints: &mut [Endpoint]) -> io::Result<Step> {
        let sink = self.sink;
        let (pipe_read, pipe_write) = {
            let pipe = self.pipe.as_ref().expect("spliced implies a pipe");
            (pipe.read.as_raw_fd(), pipe.write.as_raw_fd())
        };
        if self.in_pipe > 0 {
            if !endpoints[sink].writable {
                return Ok(Step::Blocked);
            }
            return match splice(pipe_read, endpoints[sink].fd, self.in_pipe) {
                Ok(moved) => {
                    self.in_pipe -= moved;
                    self.bytes += moved as u64;
                    Ok(Step::Progress)
                }
                Err(error) if would_block(&error) => {
                    endpoints[sink].set_blocked_write();
                    Ok(Step::Blocked)
                }
                Err(error) if interrupted(&error) => Ok(Step::Progress),
                Err(error) if peer_gone(&error) => {
                    self.break_off(endpoints, &error);
                    Ok(Step::Progress)
                }
                Err(error) => Err(error),
            };
        }
        let Some(source) = self.source() else {
            return Ok(Step::Blocked);
        };
        if self.state != State::Open || !endpoints[source].readable {
            return Ok(Step::Blocked);
        }
        match splice(endpoints[source].fd, pipe_write, SPLICE_CHUNK) {
            Ok(0) => {
                self.source_finished(endpoints);
                Ok(Step::Progress)
            }
            Ok(moved) => {
                self.in_pipe += moved;
                self.bulk = moved >= BUFFER_SIZE;
                Ok(Step::Progress)
            }
            Err(error) if would_block(&error) => {
                // The pipe is empty (we drain it before reading), so the
                // source is dry: give the pipe to a connection that needs
                // it. Whether this one comes back spliced or buffered is
                // up to `bulk`.
                endpoints[source].set_blocked_read();
                self.release_pipe();
                Ok(Step::Blocked)
            }
            Err(error) if interrupted(&error) => Ok(Step::Progress),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                self.release_pipe();
                self.strategy = Strategy::Buffered;
                Ok(Step::Progress)
            }
            Err(error) if peer_gone(&error) && !link_failed(&error) => {
                self.source_finished(endpoints);
                Ok(Step::Progress)
            }
            Err(error) => {
                self.failed_source = Some(source);
                Err(error)
            }
        }
    }

    /// One end is a pipe: splice between the two. On EAGAIN, FIONREAD on
    /// the source says which end would block.
    fn step_direct(&mut self, endpoints: &mut [Endpoint]) -> io::Result<Step> {
        let sink = self.sink;
        let Some(source) = self.source() else {
            return Ok(Step::Blocked);
        };
        if self.state != State::Open || !endpoints[source].readable || !endpoints[sink].writable {
            return Ok(Step::Blocked);
        }
        match splice(endpoints[source].fd, endpoints[sink].fd, SPLICE_CHUNK) {
            Ok(0) => {
                self.source_finished(endpoints);
                Ok(Step::Progress)
            }
            Ok(moved) => {
                self.bytes += moved as u64;
                self.refusals = 0;
                Ok(Step::Progress)
            }
            Err(error) if would_block(&error) => {
                #[cfg(test)]
                tests::between_eagain_and_judgement(endpoints[source].fd);
                // Which end would block? Only what is seen *after* the
                // EAGAIN is safe to wait on: an end seen blocked now will
                // raise an edge when it unblocks. Asking the source for
                // bytes instead races with a writer: data arriving just
                // after a dry splice looked like a full sink, and waiting
                // for a pipe that was never full waits for an edge that
                // never comes (a pipe wakes writers only when it stops
                // being full). That stalled bulk streams into ssh.
                let (source_ready, sink_ready) = ready_now(endpoints[source].fd, endpoints[sink].fd);
                if !sink_ready {
                    endpoints[sink].set_blocked_write();
                } else if !source_ready {
                    endpoints[source].set_blocked_read();
                } else {
                    // Both ready now: something moved in between; try
                    // again, but never spin on a splice that keeps
                    // refusing what poll promises: copy instead.
                    self.refusals += 1;
                    if self.refusals > MAX_REFUSALS {
                        log::debug!("splice keeps refusing ready descriptors; copying instead");
                        self.strategy = Strategy::Buffered;
                    }
                    return Ok(Step::Progress);
                }
                Ok(Step::Blocked)
            }
            Err(error) if interrupted(&error) => Ok(Step::Progress),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                self.strategy = Strategy::Buffered;
                Ok(Step::Progress)
            }
            Err(error) if peer_gone(&error) => {
                // Which end broke? A broken sink loses data; a reset
                // source just ends. A pipe refuses a write only with
                // EPIPE: a reset or a timeout came from the socket read
                // (a service that closed without reading all we sent).
                let sink_broke = match endpoints[sink].kind {
                    Kind::Pipe => error.raw_os_error() == Some(libc::EPIPE),
                    _ => is_write_error(endpoints[sink].fd),
                };
                if sink_broke {
                    self.break_off(endpoints, &error);
                } else if link_failed(&error) {
                    self.failed_source = Some(source);
                    return Err(error);
                } else {
                    self.source_finished(endpoints);
                }
                Ok(Step::Progress)
            }
            Err(error) => Err(error),
        }
    }

    fn step_sendfile(&mut self, endpoints: &mut [Endpoint]) -> io::Result<Step> {
        let sink = self.sink;
        let Some(source) = self.source() else {
            return Ok(Step::Blocked);
        };
        if self.state != State::Open || !endpoints[sink].writable {
            return Ok(Step::Blocked);
        }
        match sendfile(endpoints[sink].fd, endpoints[source].fd, SPLICE_CHUNK) {
            Ok(0) => {
                self.source_finished(endpoints);
                Ok(Step::Progress)
            }
            Ok(moved) => {
                self.bytes += moved as u64;
                Ok(Step::Progress)
            }
            Err(error) if would_block(&error) => {
                endpoints[sink].set_blocked_write();
                Ok(Step::Blocked)
            }
            Err(error) if interrupted(&error) => Ok(Step::Progress),
            Err(error) if matches!(error.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                self.strategy = Strategy::Buffered;
                Ok(Step::Progress)
            }
            // The sink is a socket, which does not fail with EIO: the
            // file did, and that is a failure, not a gone peer.
            Err(error) if peer_gone(&error) && error.raw_os_error() != Some(libc::EIO) => {
                self.break_off(endpoints, &error);
                Ok(Step::Progress)
            }
            Err(error) => {
                if error.raw_os_error() == Some(libc::EIO) {
                    self.failed_source = Some(source);
                }
                Err(error)
            }
        }
    }
}

/// A socket's pending error says whether a failed splice broke on it.
fn is_write_error(fd: RawFd) -> bool {
    let mut error: libc::c_int = 0;
    let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into `error`.
    let result = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&mut error as *mut libc::c_int).cast(), &mut length)
    };
    // Not a socket (a pipe) or an error recorded: count it as the sink's.
    result != 0 || error != 0 || {
        // SAFETY: a zero-length send only checks the socket's state.
        let sent = unsafe { libc::send(fd, std::ptr::null(), 0, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        sent < 0 && peer_gone(&io::Error::last_os_error())
    }
}

fn result(value: isize) -> io::Result<usize> {
    if value < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value as usize)
    }
}

fn read_some(endpoint: &Endpoint, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the buffer is valid for `len` bytes; the descriptor is the
    // caller's and stays open while the relay lives.
    let value = unsafe {
        if endpoint.kind == Kind::Socket {
            libc::recv(endpoint.fd, buffer.as_mut_ptr().cast(), buffer.len(), libc::MSG_DONTWAIT)
        } else {
            libc::read(endpoint.fd, buffer.as_mut_ptr().cast(), buffer.len())
        }
    };
    result(value)
}

fn write_some(endpoint: &Endpoint, data: &[u8]) -> io::Result<usize> {
    // SAFETY: as in read_some.
    let value = unsafe {
        if endpoint.kind == Kind::Socket {
            libc::send(endpoint.fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        } else {
            libc::write(endpoint.fd, data.as_ptr().cast(), data.len())
        }
    };
    result(value)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn splice(from: RawFd, to: RawFd, length: usize) -> io::Result<usize> {
    // SAFETY: null offsets (use and move the descriptors' own positions);
    // both descriptors are open for the call.
    let value = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            length,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    result(value)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn splice(_from: RawFd, _to: RawFd, _length: usize) -> io::Result<usize> {
    Err(io::Error::from_raw_os_error(libc::EINVAL))
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn sendfile(to: RawFd, from: RawFd, length: usize) -> io::Result<usize> {
    // SAFETY: null offset: the file's own position is used and moved.
    result(unsafe { libc::sendfile(to, from, std::ptr::null_mut(), length) })
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn sendfile(_to: RawFd, _from: RawFd, _length: usize) -> io::Result<usize> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

/// Bytes waiting to be read on a socket or pipe (0 if it cannot tell).
/// Whether `source` has something to read (or an EOF or error to report)
/// and `sink` room to write (or an error to report), as of now. For a
/// pipe, "room" is the kernel's own test: not full by buffer slots, which
/// counting bytes cannot tell.
fn ready_now(source: RawFd, sink: RawFd) -> (bool, bool) {
    let mut fds = [
        libc::pollfd { fd: source, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: sink, events: libc::POLLOUT, revents: 0 },
    ];
    // SAFETY: poll reads and writes the two pollfds we own; zero timeout.
    let count = unsafe { libc::poll(fds.as_mut_ptr(), 2, 0) };
    if count < 0 {
        // Cannot tell (EINTR, ENOMEM): call both ready, so the caller
        // retries and, if that keeps failing, copies instead.
        return (true, true);
    }
    let any = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
    (fds[0].revents & (libc::POLLIN | any) != 0, fds[1].revents & (libc::POLLOUT | any) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    type Race = Option<(RawFd, Box<dyn FnOnce()>)>;

    thread_local! {
        /// Run once by a direct splice's EAGAIN before it judges which end
        /// blocked: lets a test land data in the race window.
        static RACE: RefCell<Race> = const { RefCell::new(None) };
    }

    pub(super) fn between_eagain_and_judgement(source: RawFd) {
        let race = RACE.with(|race| {
            let mut race = race.borrow_mut();
            if race.as_ref().is_some_and(|(fd, _)| *fd == source) {
                race.take()
            } else {
                None
            }
        });
        if let Some((_, race)) = race {
            race();
        }
    }

    /// A splice finds the socket dry; before the relay looks, a byte
    /// arrives, while the pipe holds data but is far from full. The relay
    /// must not conclude "the pipe is full" and wait for a writable edge a
    /// pipe that is not full never raises (the ssh-import stall).
    #[test]
    fn data_landing_after_a_dry_splice_is_not_mistaken_for_a_full_pipe() {
        let (mut client, a) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let (pipe_read, pipe_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        let (back_read, _back_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        std::fs::File::from(pipe_write.try_clone().unwrap()).write_all(&[7; 1000]).unwrap();
        let mut relay = Relay::new(&[a.as_raw_fd()], pipe_write.as_raw_fd(), back_read.as_raw_fd(), a.as_raw_fd());
        client.write_all(b"first").unwrap();
        let mut late = client.try_clone().unwrap();
        let race: Box<dyn FnOnce()> = Box::new(move || late.write_all(b"late").unwrap());
        RACE.with(|slot| *slot.borrow_mut() = Some((a.as_raw_fd(), race)));
        relay.pump().unwrap();
        assert_eq!(bytes_in(&pipe_read), 1000 + 5 + 4, "the late bytes were not moved");
        let waits_on_pipe = relay.interests().iter().any(|i| i.fd == pipe_write.as_raw_fd() && i.write);
        assert!(!waits_on_pipe, "waits for the pipe to drain though it has room");
        let waits_on_client = relay.interests().iter().any(|i| i.fd == a.as_raw_fd() && i.read);
        assert!(waits_on_client, "a dry source must be waited on");
    }

    fn bytes_in(pipe: &OwnedFd) -> usize {
        let mut count: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        assert_eq!(unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut count) }, 0);
        count as usize
    }

    /// Drives a relay with a simple level-triggered poll loop until `done`.
    fn drive(relay: &mut Relay, mut done: impl FnMut(&Relay) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !done(relay) {
            assert!(std::time::Instant::now() < deadline, "relay stalled");
            relay.pump().unwrap();
            if done(relay) {
                break;
            }
            let interests = relay.interests();
            let mut fds: Vec<libc::pollfd> = interests
                .iter()
                .map(|i| libc::pollfd {
                    fd: i.fd,
                    events: (if i.read { libc::POLLIN } else { 0 }) | (if i.write { libc::POLLOUT } else { 0 }),
                    revents: 0,
                })
                .collect();
            // SAFETY: fds is a valid array of pollfd.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            for fd in &fds {
                let readable = fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
                let writable = fd.revents & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0;
                relay.set_ready(fd.fd, readable, writable);
            }
        }
    }

    /// Drives a relay as the daemons do: mio, edge-triggered, with every
    /// readiness and every closed read side passed on, pumping after each
    /// batch of events. Five seconds without an event is a stall.
    fn drive_edge_triggered(relay: &mut Relay, fds: &[RawFd], done: impl Fn(&Relay) -> bool) {
        use mio::unix::SourceFd;
        use mio::{Events, Interest, Poll, Token};
        let mut poll = Poll::new().unwrap();
        for (index, fd) in fds.iter().enumerate() {
            poll.registry().register(&mut SourceFd(fd), Token(index), Interest::READABLE | Interest::WRITABLE).unwrap();
        }
        let mut events = Events::with_capacity(8);
        while !done(relay) {
            poll.poll(&mut events, Some(std::time::Duration::from_secs(5))).unwrap();
            let (out, back) = (relay.bytes(Way::Forward), relay.bytes(Way::Backward));
            assert!(!events.is_empty(), "stalled after {out} bytes out, {back} back");
            for event in events.iter() {
                let fd = fds[event.token().0];
                let broken = event.is_error();
                relay.set_ready(
                    fd,
                    event.is_readable() || event.is_read_closed() || broken,
                    event.is_writable() || broken,
                );
                if event.is_read_closed() || broken {
                    relay.set_read_closed(fd);
                }
            }
            relay.pump().unwrap();
        }
    }

    fn pattern(length: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..length)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn nonblocking_pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    /// client <-> [a  relay  b] <-> server: bytes both ways, half-close
    /// passed on, byte-identical, bulk and small.
    #[test]
    fn socket_pair_both_ways_with_half_close() {
        for length in [0, 1, 100, BUFFER_SIZE, 5 * 1024 * 1024 + 7] {
            let (mut client, a) = UnixStream::pair().unwrap();
            let (b, mut server) = UnixStream::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            b.set_nonblocking(true).unwrap();
            let data = pattern(length, length as u64);
            let sent = data.clone();
            let writer = std::thread::spawn(move || {
                client.write_all(&sent).unwrap();
                client.shutdown(std::net::Shutdown::Write).unwrap();
                let mut back = Vec::new();
                client.read_to_end(&mut back).unwrap();
                back
            });
            let echo = std::thread::spawn(move || {
                let mut got = Vec::new();
                server.read_to_end(&mut got).unwrap();
                got.reverse();
                server.write_all(&got).unwrap();
            });
            let mut relay = Relay::between(a.as_raw_fd(), b.as_raw_fd());
            drive(&mut relay, Relay::is_done);
            echo.join().unwrap();
            let mut expected = data;
            expected.reverse();
            assert_eq!(writer.join().unwrap(), expected, "length {length}");
            assert_eq!(relay.bytes(Way::Forward), length as u64);
            assert_eq!(relay.bytes(Way::Backward), length as u64);
        }
    }

    /// A peer that dribbles one byte at a time, and one that pauses in the
    /// middle of a burst: every byte arrives, nothing stalls.
    #[test]
    fn dribbling_and_bursty_peers() {
        let (mut client, a) = UnixStream::pair().unwrap();
        let (b, mut server) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let data = pattern(200_000, 9);
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            for byte in &sent[..50] {
                client.write_all(&[*byte]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            client.write_all(&sent[50..100_000]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(30));
            client.write_all(&sent[100_000..]).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            server.read_to_end(&mut got).unwrap();
            got
        });
        let mut relay = Relay::between(a.as_raw_fd(), b.as_raw_fd());
        drive(&mut relay, |r| r.way_done(Way::Forward));
        writer.join().unwrap();
        drop(relay);
        drop(b);
        assert!(reader.join().unwrap() == data);
    }

    /// The ssh shape, driven edge-triggered as the importer drives it: a
    /// socket spliced into a pipe whose reader is slow, and a pipe back
    /// into the socket, with a writer that pauses between bursts. A wait
    /// for an edge that never comes is a stall here, not a pass.
    #[test]
    fn edge_triggered_socket_through_slow_pipes() {
        let (mut client, a) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let (in_read, in_write) = nix::unistd::pipe().unwrap();
        let (out_read, out_write) = nix::unistd::pipe().unwrap();
        for fd in [&in_write, &out_read] {
            nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).unwrap();
        }
        let data = pattern(24 * 1024 * 1024, 11);
        let sent = data.clone();
        let mut client_reader = client.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut offset = 0;
            let mut size = 1usize;
            while offset < sent.len() {
                let end = (offset + size).min(sent.len());
                client.write_all(&sent[offset..end]).unwrap();
                offset = end;
                size = (size * 7 + 3) % 70_000 + 1;
                if size % 5 == 0 {
                    std::thread::yield_now();
                }
            }
            client.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            client_reader.read_to_end(&mut got).unwrap();
            got
        });
        // The far side: reads ssh's stdin in small pieces, with pauses,
        // and echoes into its stdout.
        let remote = std::thread::spawn(move || {
            let mut input = std::fs::File::from(in_read);
            let mut output = std::fs::File::from(out_write);
            let mut buffer = vec![0; 3000];
            let mut rounds = 0u32;
            loop {
                let count = input.read(&mut buffer).unwrap();
                if count == 0 {
                    break;
                }
                output.write_all(&buffer[..count]).unwrap();
                rounds += 1;
                if rounds % 64 == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        });
        let mut relay = Relay::new(&[a.as_raw_fd()], in_write.as_raw_fd(), out_read.as_raw_fd(), a.as_raw_fd());
        relay.adopt(in_write);
        let fds = [a.as_raw_fd(), relay.endpoints[1].fd, out_read.as_raw_fd()];
        drive_edge_triggered(&mut relay, &fds, Relay::is_done);
        writer.join().unwrap();
        remote.join().unwrap();
        drop(relay);
        drop(a);
        assert!(reader.join().unwrap() == data);
    }

    /// The last bytes and the end of data on one edge: a short read is
    /// taken as "drained" only while the peer has not closed, or the EOF
    /// would never be read (no further edge comes).
    #[test]
    fn the_end_of_data_on_the_same_edge_as_the_last_bytes_is_read() {
        let (mut client, a) = UnixStream::pair().unwrap();
        let (b, mut server) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut relay = Relay::between(a.as_raw_fd(), b.as_raw_fd());
        // Both arrive before the relay looks: one edge for the two.
        client.write_all(b"hello").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        drive_edge_triggered(&mut relay, &[a.as_raw_fd(), b.as_raw_fd()], |relay| relay.way_done(Way::Forward));
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello");
    }

    /// A service that answers and closes without reading what it was
    /// sent: the kernel resets our side (its queue held unread bytes), and
    /// the reset comes out of the splice into stdout's pipe after the
    /// answer. The pipe did not break; the answer was delivered whole.
    #[test]
    fn a_reset_source_spliced_into_a_pipe_is_an_end_not_a_broken_sink() {
        let (relay_side, mut service) = UnixStream::pair().unwrap();
        relay_side.set_nonblocking(true).unwrap();
        (&relay_side).write_all(b"never read").unwrap();
        service.write_all(b"hi\n").unwrap();
        drop(service);
        let (stdin_read, _stdin_write) = nix::unistd::pipe().unwrap();
        let (stdout_read, stdout_write) = nix::unistd::pipe().unwrap();
        let mut relay = Relay::new(
            &[stdin_read.as_raw_fd()],
            relay_side.as_raw_fd(),
            relay_side.as_raw_fd(),
            stdout_write.as_raw_fd(),
        );
        drive(&mut relay, |r| r.way_done(Way::Backward));
        assert_eq!(relay.broken(Way::Backward), None);
        drop(relay);
        drop(stdout_write);
        let mut got = Vec::new();
        std::fs::File::from(stdout_read).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hi\n");
    }

    /// A file that fails to read (EIO, as a bad disk gives it; reading
    /// /proc/self/mem at address 0 gives it too) is a failure, not an end
    /// of data: passing it on as EOF would hand the service a truncated
    /// input and let dcat exit 0.
    #[test]
    fn a_file_that_fails_to_read_fails_the_relay() {
        let file = std::fs::File::open("/proc/self/mem").unwrap();
        let (relay_side, _service) = nonblocking_pair();
        let (_stdout_read, stdout_write) = nix::unistd::pipe().unwrap();
        let mut relay =
            Relay::new(&[file.as_raw_fd()], relay_side.as_raw_fd(), relay_side.as_raw_fd(), stdout_write.as_raw_fd());
        let result = run_until(&mut relay, |r| r.way_done(Way::Forward));
        assert_eq!(result.map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)));
        assert_eq!(relay.failed_source(), Some(file.as_raw_fd()));
    }

    /// Pipes in and out (as dcat sees them) and a file as a source.
    #[test]
    fn pipes_and_files() {
        let (service_side, relay_side) = nonblocking_pair();
        let (stdin_read, stdin_write) = nix::unistd::pipe().unwrap();
        let (stdout_read, stdout_write) = nix::unistd::pipe().unwrap();
        let file_path = std::env::temp_dir().join(format!("dipus-relay-test-{}", std::process::id()));
        let file_data = pattern(300_000, 3);
        std::fs::write(&file_path, &file_data).unwrap();
        let file = std::fs::File::open(&file_path).unwrap();
        std::fs::remove_file(&file_path).unwrap();
        let stdin_data = pattern(1_000_000, 4);
        let feed = stdin_data.clone();
        let feeder = std::thread::spawn(move || {
            let mut pipe = std::fs::File::from(stdin_write);
            pipe.write_all(&feed).unwrap();
        });
        let echo = std::thread::spawn(move || {
            let mut service = service_side;
            service.set_nonblocking(false).unwrap();
            let mut got = Vec::new();
            service.read_to_end(&mut got).unwrap();
            service.write_all(&got).unwrap();
        });
        let collector = std::thread::spawn(move || {
            let mut pipe = std::fs::File::from(stdout_read);
            let mut got = Vec::new();
            pipe.read_to_end(&mut got).unwrap();
            got
        });
        let mut relay = Relay::new(
            &[file.as_raw_fd(), stdin_read.as_raw_fd()],
            relay_side.as_raw_fd(),
            relay_side.as_raw_fd(),
            stdout_write.as_raw_fd(),
        );
        drive(&mut relay, |r| r.way_done(Way::Backward));
        drop(relay);
        drop(stdout_write);
        feeder.join().unwrap();
        echo.join().unwrap();
        let mut expected = file_data;
        expected.extend_from_slice(&stdin_data);
        assert!(collector.join().unwrap() == expected);
    }

    /// client <-> [a  relay  b] <-> server, a UNIX pair on the client's
    /// side and a loopback TCP connection on the server's; a and b
    /// nonblocking.
    fn unix_to_tcp() -> (UnixStream, UnixStream, std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        b.set_nonblocking(true).unwrap();
        let (client, a) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (client, a, b, server)
    }

    /// Bulk into TCP is copied through a bulk buffer (cheaper than
    /// splicing there), bulk out of TCP is spliced; both byte-identical,
    /// and the buffer goes back when the stream ends.
    #[test]
    fn bulk_into_tcp_goes_through_a_bulk_buffer() {
        let (mut client, a, b, mut server) = unix_to_tcp();
        let length = 8 * 1024 * 1024 + 3;
        let (up, down) = (pattern(length, 11), pattern(length, 12));
        let (sent_up, sent_down) = (up.clone(), down.clone());
        let mut client_reader = client.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            client.write_all(&sent_up).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let reader = std::thread::spawn(move || {
            let mut back = Vec::new();
            client_reader.read_to_end(&mut back).unwrap();
            back
        });
        let far = std::thread::spawn(move || {
            let mut writing = server.try_clone().unwrap();
            let answer = std::thread::spawn(move || {
                writing.write_all(&sent_down).unwrap();
                writing.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut got = Vec::new();
            server.read_to_end(&mut got).unwrap();
            answer.join().unwrap();
            got
        });
        let mut relay = Relay::between(a.as_raw_fd(), b.as_raw_fd());
        drive_edge_triggered(&mut relay, &[a.as_raw_fd(), b.as_raw_fd()], Relay::is_done);
        writer.join().unwrap();
        assert!(far.join().unwrap() == up, "bytes into TCP differ");
        assert!(reader.join().unwrap() == down, "bytes out of TCP differ");
        assert_eq!(bulk_buffers_live(), 1, "the direction into TCP took no bulk buffer, or kept it");
        assert!(relay.directions.iter().all(|d| d.buffer.is_none() && d.pipe.is_none()));
    }

    /// A bulk stream into TCP that pauses holds no bulk buffer while it
    /// waits: the buffers are few, and idle connections must not keep
    /// them from busy ones.
    #[test]
    fn a_paused_stream_into_tcp_gives_its_bulk_buffer_back() {
        let (mut client, a, b, mut server) = unix_to_tcp();
        let burst = pattern(4 * 1024 * 1024, 13);
        let sent = burst.clone();
        let writer = std::thread::spawn(move || {
            client.write_all(&sent).unwrap();
            client
        });
        let length = burst.len();
        let far = std::thread::spawn(move || {
            let mut got = vec![0; length];
            server.read_exact(&mut got).unwrap();
            (server, got)
        });
        let mut relay = Relay::between(a.as_raw_fd(), b.as_raw_fd());
        let forwarded = |relay: &Relay| relay.bytes(Way::Forward) == length as u64;
        drive_edge_triggered(&mut relay, &[a.as_raw_fd(), b.as_raw_fd()], forwarded);
        let (_server, got) = far.join().unwrap();
        assert!(got == burst, "bytes into TCP differ");
        assert!(bulk_buffers_live() >= 1, "the burst never went through a bulk buffer");
        let forward = &relay.directions[0];
        assert!(forward.buffer.is_none() && forward.pipe.is_none(), "a paused stream holds its carrier");
        drop(writer.join().unwrap());
    }

    /// The TCP peer half-closes, then its connection is reset, while the
    /// UNIX side stays silent: nothing could ever be written to TCP again,
    /// so the relay ends (the exporter used to hold such a connection, a
    /// slot under --max-conns and two descriptors, for as long as the
    /// service said nothing). The UNIX side saw the end of data.
    #[test]
    fn a_reset_connection_ends_a_relay_whose_other_side_is_silent() {
        let (mut client, a, b, server) = unix_to_tcp();
        let mut relay = Relay::between(a.as_raw_fd(), b.as_raw_fd());
        server.shutdown(std::net::Shutdown::Write).unwrap();
        let fds = [a.as_raw_fd(), b.as_raw_fd()];
        drive_edge_triggered(&mut relay, &fds, |relay| relay.way_done(Way::Backward));
        let mut got = Vec::new();
        client.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        client.read_to_end(&mut got).unwrap();
        assert!(got.is_empty() && !relay.is_done(), "the half-close was not passed on alone");
        // SO_LINGER 0: close sends a reset.
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: setsockopt reads one linger struct from a live local.
        let set = unsafe {
            libc::setsockopt(
                server.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0);
        drop(server);
        drive_edge_triggered(&mut relay, &fds, Relay::is_done);
        assert_eq!(relay.broken(Way::Forward), None, "nothing was pending, nothing was lost");
        drop(client);
    }

    /// A client that closes (not half-closes) while the service is silent
    /// ends the relay: nothing could reach it any more. One that only
    /// half-closes is still waited for.
    #[test]
    fn a_closed_client_ends_a_relay_whose_service_is_silent() {
        let (client, a) = nonblocking_pair();
        let (b, server) = nonblocking_pair();
        let mut relay = Relay::between(a.as_raw_fd(), b.as_raw_fd());
        let fds = [a.as_raw_fd(), b.as_raw_fd()];
        client.shutdown(std::net::Shutdown::Write).unwrap();
        drive_edge_triggered(&mut relay, &fds, |relay| relay.way_done(Way::Forward));
        relay.pump().unwrap();
        assert!(!relay.is_done(), "a half-closed client was given up on");
        drop(client);
        drive_edge_triggered(&mut relay, &fds, Relay::is_done);
        assert_eq!(relay.broken(Way::Backward), None, "nothing was pending, nothing was lost");
        drop(server);
    }

    /// Idle connections hold no pipes and no buffers; bulk ones give their
    /// pipes back.
    #[test]
    fn pipes_are_borrowed_only_for_bulk() {
        let before = pipes_live();
        let (mut client, a) = UnixStream::pair().unwrap();
        let (b, mut server) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut relay = Relay::between(a.as_raw_fd(), b.as_raw_fd());
        client.write_all(b"ping").unwrap();
        relay.pump().unwrap();
        let mut small = [0; 4];
        server.read_exact(&mut small).unwrap();
        assert_eq!(&small, b"ping");
        assert!(!relay.is_spliced(Way::Forward));
        assert_eq!(pipes_live(), before);
        assert!(relay.directions.iter().all(|d| d.buffer.is_none()), "an idle connection holds a copy buffer");
        let bulk = pattern(4 * BUFFER_SIZE, 5);
        client.write_all(&bulk[..2 * BUFFER_SIZE]).unwrap();
        relay.set_ready(a.as_raw_fd(), true, false);
        relay.pump().unwrap();
        let mut got = vec![0; 2 * BUFFER_SIZE];
        server.read_exact(&mut got).unwrap();
        assert!(got == bulk[..2 * BUFFER_SIZE]);
        relay.set_ready(a.as_raw_fd(), true, false);
        relay.pump().unwrap();
        assert!(!relay.is_spliced(Way::Forward), "a dry source gives its pipe back");
    }
}
