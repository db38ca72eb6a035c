//! dipus bench — measure a path with dipus's own ends, like iperf and netperf.
//!
//! Usage: dipus bench sink    --listen PATH [--count N]
//!        dipus bench source  --listen PATH [--count N]
//!        dipus bench echo    --listen PATH [--count N]
//!        dipus bench send    --connect TARGET [--bytes N] [--connections C]
//!        dipus bench recv    --connect TARGET [--bytes N] [--connections C]
//!        dipus bench rr      --connect TARGET [--connections C] [--size M] [--seconds S]
//!        dipus bench connect --connect TARGET [--connections C] [--seconds S]
//!
//! Servers listen on the UNIX socket PATH in one edge-triggered mio loop
//! until SIGTERM or SIGINT, then remove their sockets. Each socket is bound
//! under a temporary name and linked into place, so it accepts as soon as
//! PATH exists. With `--count N`, PATH holds `{}` and N sockets are served,
//! `{}` replaced by 0…N-1 (ten thousand services from one process).
//! - `sink` discards what arrives (spliced into /dev/null, never copied to
//!   user space) and at EOF answers the byte count as one decimal line.
//! - `source` reads one decimal line, N, sends N bytes and closes.
//! - `echo` sends back what arrives and closes after the peer's EOF.
//!
//! Clients print one line of `key=value` pairs on stdout. `mbps` is 10^6
//! bytes per second; latencies are in microseconds.
//! - `send`: C connections (default 1) share N bytes (default 1G; K, M, G, T
//!   are powers of 1024) to a sink; each waits for the sink's count, which
//!   must match: `bytes= seconds= mbps= connections= errors=`.
//! - `recv`: the same from a source.
//! - `rr`: C connections each do M-byte (default 64) request/response
//!   exchanges with an echo server for S seconds (default 5), after one
//!   warm-up exchange each; every reply byte is checked against a pattern of
//!   the connection and sequence number: `requests= seconds= rps= p50_us=
//!   p99_us= errors= connections= size=`.
//! - `connect`: C loops (default 1) each connect, send one byte, read it
//!   back and close, for S seconds: `connects= seconds= cps= p50_us=
//!   p99_us= errors= connections=`.
//!
//! TARGET is a UNIX socket path, a local selector or a `sep://` URI, opened
//! one connection after another before the clock starts (`connect` takes a
//! path or a local selector only: it reconnects for every sample). For
//! `ssh://`, measure an ssh import's socket, or `dcat ssh://…` into a sink.
//!
//! Exit status: 0; 1 if an exchange failed or a byte was wrong (the line is
//! printed all the same); 64 usage; 69 no such service; 74 cannot connect.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use argh::FromArgs;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::socket::{send, shutdown, MsgFlags, Shutdown};

use crate::error::Error;
use crate::net::DescriptorReserve;
use crate::selector::{Remote, Selector, Target};
use crate::signals::SignalPipe;
use crate::tree::FileId;

#[derive(FromArgs)]
#[argh(help_triggers("--help"))]
/// Measure a path: throughput, request/response exchanges, connection setup.
/// MODE is a server (sink, source, echo: give --listen) or a client (send,
/// recv, rr, connect: give --connect).
struct Args {
    /// servers: the socket path to listen on ({} is 0…N-1 with --count)
    #[argh(option)]
    listen: Option<String>,
    /// servers: how many sockets to serve (default 1)
    #[argh(option, default = "1")]
    count: usize,
    /// clients: a socket path, a selector or a sep:// URI
    #[argh(option)]
    connect: Option<String>,
    /// send, recv: bytes in all, shared by the connections (default 1G)
    #[argh(option, default = "1 << 30", from_str_fn(parse_size))]
    bytes: u64,
    /// clients: concurrent connections (default 1)
    #[argh(option, default = "1")]
    connections: usize,
    /// rr: bytes per request and per reply (default 64)
    #[argh(option, default = "64", from_str_fn(parse_size))]
    size: u64,
    /// rr, connect: seconds to measure, e.g. 5 or 0.5 (default 5)
    #[argh(option, default = "Duration::from_secs(5)", from_str_fn(parse_seconds))]
    seconds: Duration,
    /// sink, source, echo, send, recv, rr or connect
    #[argh(positional)]
    mode: String,
}

pub fn main(name: &str, args: &[&str]) -> Result<(), Error> {
    let args: Args = crate::applets::parse_args(name, args);
    let server = matches!(args.mode.as_str(), "sink" | "source" | "echo");
    if !server && !matches!(args.mode.as_str(), "send" | "recv" | "rr" | "connect") {
        return Err(Error::Usage(format!(
            "unknown mode {:?}: expected sink, source, echo, send, recv, rr or connect",
            args.mode
        )));
    }
    let (listen, connect) = match (&args.listen, &args.connect) {
        (Some(listen), None) if server => (listen.as_str(), ""),
        (None, Some(connect)) if !server => ("", connect.as_str()),
        _ if server => return Err(Error::Usage(format!("{} is a server: give --listen PATH only", args.mode))),
        _ => return Err(Error::Usage(format!("{}: give --connect TARGET only", args.mode))),
    };
    if args.connections == 0 {
        return Err(Error::Usage("--connections must be at least 1".into()));
    }
    crate::net::raise_fd_limit();
    match args.mode.as_str() {
        "sink" => serve(Role::Sink, listen, args.count),
        "source" => serve(Role::Source, listen, args.count),
        "echo" => serve(Role::Echo, listen, args.count),
        "send" => transfer(Direction::Send, connect, args.bytes, args.connections),
        "recv" => transfer(Direction::Receive, connect, args.bytes, args.connections),
        "rr" => request_response(connect, args.connections, args.size, args.seconds),
        "connect" => connect_rate(connect, args.connections, args.seconds),
        _ => unreachable!("the mode was checked above"),
    }
}

/// Largest unit of I/O: big enough that syscalls are not what is measured.
const CHUNK: usize = 1 << 20;
/// Listen backlog of the servers: 500 clients connecting at once must not
/// be refused by the bench itself.
const BACKLOG: i32 = 1024;
/// A transfer or exchange with no progress for this long has stalled.
const STALL: Duration = Duration::from_secs(30);
/// How long replies outstanding at the end of a timed run may take.
const GRACE: Duration = Duration::from_secs(5);
const SIGNALS: Token = Token(usize::MAX);

/// `1024`, `64K`, `2G`: K, M, G and T are powers of 1024.
fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a size (digits, then optionally K, M, G or T)");
    let (digits, shift) = match text.char_indices().last() {
        Some((at, unit)) if unit.is_ascii_alphabetic() => {
            let shift = match unit.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&text[..at], shift)
        }
        _ => (text, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let value: u64 = digits.parse().map_err(|_| bad())?;
    value.checked_mul(1 << shift).ok_or_else(bad)
}

/// Fills `buffer` with the bytes of request `sequence` on connection
/// `connection`: a reply from another connection or an earlier exchange
/// differs from it.
fn pattern(connection: u64, sequence: u64, buffer: &mut [u8]) {
    let mut state = connection.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sequence.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    for chunk in buffer.chunks_mut(8) {
        // splitmix64: cheap, and every byte depends on both numbers.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// The sample at `percent` of sorted samples, by nearest rank (p99 of 100
/// samples is the 99th smallest); 0 without samples.
fn percentile(sorted: &[u32], percent: usize) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (percent * sorted.len()).div_ceil(100);
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `5`, `0.5`, `1.25`: seconds with at most microsecond precision. (No
/// floating point: its parsing and printing would cost the static binary
/// tens of kilobytes.)
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a number of seconds (like 5 or 0.5)");
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) || fraction.len() > 6 {
        return Err(bad());
    }
    let seconds: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
    let micros: u32 = format!("{fraction:0<6}").parse().map_err(|_| bad())?;
    let duration = Duration::from_secs(seconds) + Duration::from_micros(micros.into());
    if duration.is_zero() {
        return Err(format!("{text:?}: give more than 0 seconds"));
    }
    Ok(duration)
}

/// `1.234567` for a duration, to the microsecond.
fn seconds_text(duration: Duration) -> String {
    format!("{}.{:06}", duration.as_secs(), duration.subsec_micros())
}

/// How many per second `count` in `duration` is. (u64 throughout: 128-bit
/// division and printing would cost the static binary too.)
fn per_second(count: u64, duration: Duration) -> u64 {
    count.saturating_mul(1_000_000) / micros_of(duration)
}

/// MB/s (bytes per microsecond) with one decimal.
fn megabytes_per_second(bytes: u64, duration: Duration) -> String {
    let tenths = bytes.saturating_mul(10) / micros_of(duration);
    format!("{}.{}", tenths / 10, tenths % 10)
}

fn micros_of(duration: Duration) -> u64 {
    (duration.as_secs().saturating_mul(1_000_000) + u64::from(duration.subsec_micros())).max(1)
}

fn micros(duration: Duration) -> u32 {
    micros_of(duration).min(u64::from(u32::MAX)) as u32
}

/// PATH, or with `--count N` the N paths PATH's `{}` stands for.
fn listen_paths(listen: &str, count: usize) -> Result<Vec<PathBuf>, Error> {
    match (count, listen.contains("{}")) {
        (0, _) => Err(Error::Usage("--count must be at least 1".into())),
        (1, false) => Ok(vec![PathBuf::from(listen)]),
        (_, false) => Err(Error::Usage(format!("--count {count} needs {{}} in the --listen path {listen:?}"))),
        (_, true) => Ok((0..count).map(|index| PathBuf::from(listen.replace("{}", &index.to_string()))).collect()),
    }
}

fn would_block(errno: Errno) -> bool {
    errno == Errno::EAGAIN || errno == Errno::EWOULDBLOCK
}

/// What a nonblocking operation did.
enum Moved {
    Bytes(usize),
    Blocked,
}

/// A connected stream socket (UNIX, or TCP from sep://), nonblocking, with
/// what the poller last said about it: the loops are edge-triggered, so a
/// direction counts as ready until an operation on it would block.
struct Socket {
    fd: OwnedFd,
    readable: bool,
    writable: bool,
}

impl Socket {
    fn new(fd: OwnedFd) -> io::Result<Socket> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok(Socket { fd, readable: true, writable: true })
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn register(&self, registry: &Registry, token: Token, interest: Interest) -> io::Result<()> {
        registry.register(&mut SourceFd(&self.raw()), token, interest)
    }

    fn deregister(&self, registry: &Registry) {
        let _ = registry.deregister(&mut SourceFd(&self.raw()));
    }

    fn ready(&mut self, event: &mio::event::Event) {
        let (readable, writable) = crate::event_loop::readiness(event);
        self.readable |= readable;
        self.writable |= writable;
    }

    fn read(&mut self, buffer: &mut [u8]) -> io::Result<Moved> {
        loop {
            match nix::unistd::read(self.raw(), buffer) {
                Ok(count) => return Ok(Moved::Bytes(count)),
                Err(Errno::EINTR) => continue,
                Err(errno) if would_block(errno) => {
                    self.readable = false;
                    return Ok(Moved::Blocked);
                }
                Err(errno) => return Err(errno.into()),
            }
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<Moved> {
        loop {
            match send(self.raw(), data, MsgFlags::MSG_NOSIGNAL) {
                Ok(count) => return Ok(Moved::Bytes(count)),
                Err(Errno::EINTR) => continue,
                Err(errno) if would_block(errno) => {
                    self.writable = false;
                    return Ok(Moved::Blocked);
                }
                Err(errno) => return Err(errno.into()),
            }
        }
    }

    fn shutdown_write(&self) -> io::Result<()> {
        shutdown(self.raw(), Shutdown::Write).map_err(io::Error::from)
    }
}

/// Throws received bytes away as cheaply as the kernel allows: spliced from
/// the socket through one pipe into /dev/null, never copied to user space;
/// where splice is refused (or absent), read into one large buffer.
struct Discard {
    /// Read end, write end. Empty between calls, so one pipe serves every
    /// connection of a single-threaded loop.
    pipe: Option<(OwnedFd, OwnedFd)>,
    null: Option<fs::File>,
    buffer: Vec<u8>,
}

impl Discard {
    fn new() -> Discard {
        Discard {
            pipe: Self::pipe(),
            null: fs::OpenOptions::new().write(true).open("/dev/null").ok(),
            buffer: Vec::new(),
        }
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn pipe() -> Option<(OwnedFd, OwnedFd)> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).ok()?;
        // Best effort: a larger pipe means fewer splices per megabyte.
        let _ = fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
        Some((read, write))
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn pipe() -> Option<(OwnedFd, OwnedFd)> {
        None
    }

    /// Discards what `socket` holds, up to one chunk; `Bytes(0)` is EOF.
    fn take(&mut self, socket: &mut Socket) -> io::Result<Moved> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        while let (Some((read, write)), Some(null)) = (&self.pipe, &self.null) {
            use nix::fcntl::{splice, SpliceFFlags};
            let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
            match splice(&socket.fd, None, write, None, CHUNK, flags) {
                Ok(count) => {
                    let mut left = count;
                    while left > 0 {
                        match splice(read, None, null, None, left, flags) {
                            Ok(moved) => left -= moved,
                            Err(Errno::EINTR) => {}
                            Err(errno) => return Err(errno.into()),
                        }
                    }
                    return Ok(Moved::Bytes(count));
                }
                Err(Errno::EINTR) => {}
                // The pipe is always drained, so only the socket can be dry.
                Err(errno) if would_block(errno) => {
                    socket.readable = false;
                    return Ok(Moved::Blocked);
                }
                Err(Errno::EINVAL) => self.pipe = None,
                Err(errno) => return Err(errno.into()),
            }
        }
        if self.buffer.is_empty() {
            self.buffer = vec![0; CHUNK];
        }
        socket.read(&mut self.buffer)
    }
}

// ---------------------------------------------------------------- servers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Sink,
    Source,
    Echo,
}

/// Where an accepted connection is in its role's exchange.
enum Exchange {
    /// Sink: counting bytes until EOF.
    Counting { received: u64 },
    /// Source: reading the request line.
    Asked { line: Vec<u8> },
    /// Source: sending.
    Sending { remaining: u64 },
    /// Echo: what the peer has not taken back yet; whether it sent EOF.
    Echoing { pending: Vec<u8>, eof: bool },
    /// Sink: writing the count, then closing.
    Answering { answer: Vec<u8>, written: usize },
}

/// Longest request line a source accepts ("18446744073709551615\n").
const MAX_LINE: usize = 32;

/// Shared by every connection of a server loop.
struct Scratch {
    discard: Discard,
    buffer: Vec<u8>,
    zeros: Vec<u8>,
}

struct Peer {
    socket: Socket,
    exchange: Exchange,
}

impl Peer {
    fn new(socket: Socket, role: Role) -> Peer {
        let exchange = match role {
            Role::Sink => Exchange::Counting { received: 0 },
            Role::Source => Exchange::Asked { line: Vec::new() },
            Role::Echo => Exchange::Echoing { pending: Vec::new(), eof: false },
        };
        Peer { socket, exchange }
    }

    /// Moves what can move without blocking; true once the connection is
    /// finished and may be closed.
    fn drive(&mut self, scratch: &mut Scratch) -> io::Result<bool> {
        let Peer { socket, exchange } = self;
        loop {
            match exchange {
                Exchange::Counting { received } => {
                    if !socket.readable {
                        return Ok(false);
                    }
                    match scratch.discard.take(socket)? {
                        Moved::Bytes(0) => {
                            *exchange = Exchange::Answering { answer: format!("{received}\n").into_bytes(), written: 0 }
                        }
                        Moved::Bytes(count) => *received += count as u64,
                        Moved::Blocked => return Ok(false),
                    }
                }
                Exchange::Asked { line } => {
                    if !socket.readable {
                        return Ok(false);
                    }
                    let mut buffer = [0u8; MAX_LINE];
                    let count = match socket.read(&mut buffer[..MAX_LINE - line.len()])? {
                        Moved::Bytes(count) => count,
                        Moved::Blocked => return Ok(false),
                    };
                    line.extend_from_slice(&buffer[..count]);
                    let Some(end) = line.iter().position(|&b| b == b'\n').or((count == 0).then_some(line.len())) else {
                        if line.len() == MAX_LINE {
                            return Err(io::Error::new(io::ErrorKind::InvalidData, "request line too long"));
                        }
                        continue;
                    };
                    let text = std::str::from_utf8(&line[..end]).unwrap_or("").trim();
                    let remaining = match text {
                        "" => 0,
                        text => text.parse().map_err(|_| {
                            io::Error::new(io::ErrorKind::InvalidData, format!("bad request line {text:?}"))
                        })?,
                    };
                    *exchange = Exchange::Sending { remaining };
                }
                Exchange::Sending { remaining } => {
                    if *remaining == 0 {
                        return Ok(true);
                    }
                    if !socket.writable {
                        return Ok(false);
                    }
                    let length = (*remaining).min(scratch.zeros.len() as u64) as usize;
                    match socket.write(&scratch.zeros[..length])? {
                        Moved::Bytes(count) => *remaining -= count as u64,
                        Moved::Blocked => return Ok(false),
                    }
                }
                Exchange::Echoing { pending, eof } => {
                    if !pending.is_empty() {
                        if !socket.writable {
                            return Ok(false);
                        }
                        match socket.write(pending)? {
                            Moved::Bytes(count) => drop(pending.drain(..count)),
                            Moved::Blocked => return Ok(false),
                        }
                        continue;
                    }
                    if *eof {
                        return Ok(true);
                    }
                    if !socket.readable {
                        return Ok(false);
                    }
                    let count = match socket.read(&mut scratch.buffer)? {
                        Moved::Bytes(0) => {
                            *eof = true;
                            continue;
                        }
                        Moved::Bytes(count) => count,
                        Moved::Blocked => return Ok(false),
                    };
                    // Straight back from the shared buffer; only what the
                    // peer does not take now is kept.
                    let written = match socket.write(&scratch.buffer[..count])? {
                        Moved::Bytes(written) => written,
                        Moved::Blocked => 0,
                    };
                    pending.extend_from_slice(&scratch.buffer[written..count]);
                }
                Exchange::Answering { answer, written } => {
                    if *written == answer.len() {
                        return Ok(true);
                    }
                    if !socket.writable {
                        return Ok(false);
                    }
                    match socket.write(&answer[*written..])? {
                        Moved::Bytes(count) => *written += count,
                        Moved::Blocked => return Ok(false),
                    }
                }
            }
        }
    }
}

/// One listening socket, and the file to remove at the end.
struct Listening {
    listener: UnixListener,
    path: PathBuf,
    id: Option<FileId>,
}

/// Binds under a temporary name beside `path` and links it into place, so
/// that `path` never exists without something listening on it.
fn listen_at(path: &Path, index: usize) -> Result<Listening, Error> {
    let failed = |source| Error::io(format!("cannot listen on {}", path.display()), source);
    let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let temp = dir.join(format!(".bench-{}-{index}", std::process::id()));
    let _ = fs::remove_file(&temp);
    let listener = crate::net::unix_listen(&temp, BACKLOG).map_err(failed)?;
    let linked = fs::hard_link(&temp, path);
    let _ = fs::remove_file(&temp);
    linked.map_err(failed)?;
    Ok(Listening { listener, path: path.to_path_buf(), id: FileId::of(path).ok() })
}

/// Peers' tokens start above the listeners'.
const PEER_BASE: usize = 1 << 40;

fn serve(role: Role, listen: &str, count: usize) -> Result<(), Error> {
    let paths = listen_paths(listen, count)?;
    let signals = SignalPipe::new(&[Signal::SIGTERM, Signal::SIGINT])
        .map_err(|e| Error::io("cannot set up signal handling", e))?;
    let mut listening: Vec<Listening> = Vec::with_capacity(paths.len());
    let result = paths
        .iter()
        .enumerate()
        .try_for_each(|(index, path)| listen_at(path, index).map(|socket| listening.push(socket)))
        .and_then(|()| {
            log::info!("{role:?} listening on {} socket(s), {}", listening.len(), listen);
            run_server(role, &listening, &signals).map_err(|e| Error::io(format!("{role:?} on {listen} failed"), e))
        });
    for socket in &listening {
        match socket.id {
            Some(id) => drop(crate::tree::remove_if_same(&socket.path, 0, id)),
            None => drop(fs::remove_file(&socket.path)),
        }
    }
    result
}

fn run_server(role: Role, listening: &[Listening], signals: &SignalPipe) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let registry = poll.registry().try_clone()?;
    registry.register(&mut SourceFd(&signals.fd()), SIGNALS, Interest::READABLE)?;
    for (index, socket) in listening.iter().enumerate() {
        registry.register(&mut SourceFd(&socket.listener.as_raw_fd()), Token(index), Interest::READABLE)?;
    }
    let mut scratch = Scratch { discard: Discard::new(), buffer: vec![0; 64 * 1024], zeros: vec![0; CHUNK] };
    let mut peers: std::collections::HashMap<usize, Peer> = std::collections::HashMap::new();
    let mut next_peer = PEER_BASE;
    let mut reserve = DescriptorReserve::new();
    let mut events = Events::with_capacity(1024);
    loop {
        crate::event_loop::wait(&mut poll, &mut events, None)?;
        for event in events.iter() {
            match event.token() {
                SIGNALS => {
                    if !signals.drain().is_empty() {
                        return Ok(());
                    }
                }
                Token(index) if index < PEER_BASE => {
                    let listener = &listening[index].listener;
                    // Edge-triggered: take every waiting client now.
                    loop {
                        let stream = match listener.accept() {
                            Ok((stream, _)) => stream,
                            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                            Err(error) if DescriptorReserve::is_exhaustion(&error) => {
                                log::warn!("out of descriptors: refusing a client");
                                if !reserve.refuse_one(|| listener.accept().is_ok()) {
                                    break;
                                }
                                continue;
                            }
                            Err(error) => return Err(error),
                        };
                        let socket = Socket::new(OwnedFd::from(stream))?;
                        let token = Token(next_peer);
                        next_peer += 1;
                        socket.register(&registry, token, Interest::READABLE | Interest::WRITABLE)?;
                        peers.insert(token.0, Peer::new(socket, role));
                    }
                }
                Token(id) => {
                    let Some(peer) = peers.get_mut(&id) else {
                        continue;
                    };
                    peer.socket.ready(event);
                    let done = peer.drive(&mut scratch).unwrap_or_else(|error| {
                        log::debug!("connection ends: {error}");
                        true
                    });
                    if done {
                        if let Some(peer) = peers.remove(&id) {
                            peer.socket.deregister(&registry);
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- clients

/// Where a client connects: a socket path (resolved once from a selector),
/// or a sep:// target, opened through the transport module.
enum Destination {
    Path(PathBuf),
    Remote(Target),
}

impl Destination {
    fn parse(text: &str) -> Result<Destination, Error> {
        let target = Target::parse(text)?;
        match &target.remote {
            Some(Remote::Sep { .. }) => Ok(Destination::Remote(target)),
            Some(Remote::Ssh { .. }) => Err(Error::Usage(format!(
                "{text}: dipus bench does not open ssh:// itself; measure an ssh import's socket, \
                 or dcat ssh://… into a sink"
            ))),
            None => match &target.selector {
                Selector::Path(path) => Ok(Destination::Path(path.clone())),
                selector => {
                    let tree = crate::tree::Tree::from_env()?;
                    let services = crate::transport::resolve_local(&tree, selector)?;
                    let service = services.into_iter().next().ok_or_else(|| Error::NoService(text.to_string()))?;
                    Ok(Destination::Path(service.full))
                }
            },
        }
    }

    fn open(&self) -> Result<OwnedFd, Error> {
        match self {
            Destination::Path(path) => crate::net::unix_connect(path)
                .map(OwnedFd::from)
                .map_err(|e| Error::io(format!("cannot connect to {}", path.display()), e)),
            Destination::Remote(target) => match crate::transport::connect(target)?.stream {
                crate::transport::Stream::Socket(fd) | crate::transport::Stream::Forwarded(fd, _) => Ok(fd),
                crate::transport::Stream::Ssh(_) => Err(Error::Usage("ssh:// is not measured by dipus bench".into())),
            },
        }
    }

    fn open_socket(&self) -> Result<Socket, Error> {
        let fd = self.open()?;
        Socket::new(fd).map_err(|e| Error::io("cannot set up the connection", e))
    }
}

/// Opens `count` connections one after another and registers each under
/// its index. A connection that cannot be opened is an error of the run;
/// if none can, the last error is returned.
fn open_all(destination: &Destination, count: usize, registry: &Registry) -> Result<Vec<Option<Socket>>, Error> {
    let mut sockets = Vec::with_capacity(count);
    let mut last = None;
    for index in 0..count {
        match destination.open_socket() {
            Ok(socket) => {
                socket
                    .register(registry, Token(index), Interest::READABLE | Interest::WRITABLE)
                    .map_err(|e| Error::io("cannot watch the connection", e))?;
                sockets.push(Some(socket));
            }
            Err(error) => {
                log::warn!("connection {index}: {error}");
                last = Some(error);
                sockets.push(None);
            }
        }
    }
    match last {
        Some(error) if sockets.iter().all(Option::is_none) => Err(error),
        _ => Ok(sockets),
    }
}

fn poll_once(poll: &mut Poll, events: &mut Events, timeout: Option<Duration>) -> Result<(), Error> {
    crate::event_loop::wait(poll, events, timeout).map_err(|e| Error::io("cannot wait for the connections", e))
}

/// Prints the result line; errors make the exit status 1.
fn report(line: String, errors: u64) -> Result<(), Error> {
    crate::applets::print_quietly(&format!("{line}\n"));
    match errors {
        0 => Ok(()),
        errors => Err(Error::Failed(format!("{errors} error(s) (the figures above count only what succeeded)"))),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Send,
    Receive,
}

/// One throughput connection.
enum Stream {
    /// Send: writing our share. Receive: writing the request line.
    Writing {
        data_left: u64,
        request: Vec<u8>,
        written: usize,
    },
    /// Send: reading the sink's count until EOF.
    Awaiting {
        answer: Vec<u8>,
    },
    /// Receive: discarding until EOF.
    Receiving {
        received: u64,
    },
    Done,
}

fn transfer(direction: Direction, connect: &str, bytes: u64, connections: usize) -> Result<(), Error> {
    let destination = Destination::parse(connect)?;
    let mut poll = Poll::new().map_err(|e| Error::io("cannot create a poller", e))?;
    let registry = poll.registry().try_clone().map_err(|e| Error::io("cannot create a poller", e))?;
    let mut sockets = open_all(&destination, connections, &registry)?;
    let share = |index: usize| bytes / connections as u64 + u64::from((index as u64) < bytes % connections as u64);
    let mut streams: Vec<Stream> = (0..connections)
        .map(|index| match (direction, &sockets[index]) {
            (_, None) => Stream::Done,
            (Direction::Send, Some(_)) => Stream::Writing { data_left: share(index), request: Vec::new(), written: 0 },
            (Direction::Receive, Some(_)) => {
                Stream::Writing { data_left: 0, request: format!("{}\n", share(index)).into_bytes(), written: 0 }
            }
        })
        .collect();
    let mut errors = sockets.iter().filter(|socket| socket.is_none()).count() as u64;
    let mut moved = 0u64;
    let mut discard = Discard::new();
    let zeros = vec![0u8; CHUNK];
    let mut events = Events::with_capacity(1024);
    let start = Instant::now();
    let mut last_progress = start;
    // Every stream is driven once before the first wait: nothing has been
    // sent yet, so no event would start them.
    let mut ready: Vec<usize> = (0..connections).collect();
    loop {
        for &index in &ready {
            let Some(socket) = sockets[index].as_mut() else {
                continue;
            };
            let outcome = drive_stream(&mut streams[index], socket, share(index), &zeros, &mut discard);
            match outcome {
                Ok(count) => {
                    if count > 0 {
                        moved += count;
                        last_progress = Instant::now();
                    }
                    if matches!(streams[index], Stream::Done) {
                        socket.deregister(&registry);
                        sockets[index] = None;
                    }
                }
                Err(error) => {
                    log::warn!("connection {index}: {error}");
                    errors += 1;
                    streams[index] = Stream::Done;
                    socket.deregister(&registry);
                    sockets[index] = None;
                }
            }
        }
        if sockets.iter().all(Option::is_none) {
            break;
        }
        if last_progress.elapsed() >= STALL {
            let stalled = sockets.iter().filter(|socket| socket.is_some()).count();
            log::warn!("{stalled} connection(s) made no progress for {STALL:?}");
            errors += stalled as u64;
            break;
        }
        poll_once(&mut poll, &mut events, Some(Duration::from_secs(1)))?;
        ready.clear();
        for event in events.iter() {
            if let Some(socket) = sockets.get_mut(event.token().0).and_then(Option::as_mut) {
                socket.ready(event);
                ready.push(event.token().0);
            }
        }
    }
    let elapsed = start.elapsed();
    report(
        format!(
            "bytes={moved} seconds={} mbps={} connections={connections} errors={errors}",
            seconds_text(elapsed),
            megabytes_per_second(moved, elapsed)
        ),
        errors,
    )
}

/// Moves one throughput stream along; returns the payload bytes moved.
fn drive_stream(
    stream: &mut Stream,
    socket: &mut Socket,
    share: u64,
    zeros: &[u8],
    discard: &mut Discard,
) -> io::Result<u64> {
    let mut moved = 0u64;
    loop {
        match stream {
            Stream::Writing { data_left, request, written } => {
                if *written == request.len() && *data_left == 0 {
                    *stream = if request.is_empty() {
                        socket.shutdown_write()?;
                        Stream::Awaiting { answer: Vec::new() }
                    } else {
                        Stream::Receiving { received: 0 }
                    };
                    continue;
                }
                if !socket.writable {
                    return Ok(moved);
                }
                let result = if *written < request.len() {
                    socket.write(&request[*written..])
                } else {
                    socket.write(&zeros[..(*data_left).min(zeros.len() as u64) as usize])
                };
                match result? {
                    Moved::Bytes(count) if *written < request.len() => *written += count,
                    Moved::Bytes(count) => {
                        *data_left -= count as u64;
                        moved += count as u64;
                    }
                    Moved::Blocked => return Ok(moved),
                }
            }
            Stream::Awaiting { answer } => {
                if !socket.readable {
                    return Ok(moved);
                }
                let mut buffer = [0u8; MAX_LINE];
                match socket.read(&mut buffer)? {
                    Moved::Bytes(0) => {
                        let text = String::from_utf8_lossy(answer);
                        if text.trim() != share.to_string() {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("sent {share} bytes, the sink counted {:?}", text.trim()),
                            ));
                        }
                        *stream = Stream::Done;
                        return Ok(moved);
                    }
                    Moved::Bytes(count) if answer.len() + count <= MAX_LINE => {
                        answer.extend_from_slice(&buffer[..count])
                    }
                    Moved::Bytes(_) => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "the sink's answer is too long"))
                    }
                    Moved::Blocked => return Ok(moved),
                }
            }
            Stream::Receiving { received } => {
                if !socket.readable {
                    return Ok(moved);
                }
                match discard.take(socket)? {
                    Moved::Bytes(0) => {
                        if *received != share {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("asked for {share} bytes, received {received}"),
                            ));
                        }
                        *stream = Stream::Done;
                        return Ok(moved);
                    }
                    Moved::Bytes(count) => {
                        *received += count as u64;
                        moved += count as u64;
                    }
                    Moved::Blocked => return Ok(moved),
                }
            }
            Stream::Done => return Ok(moved),
        }
    }
}

/// One request/response connection.
struct Exchanger {
    socket: Socket,
    index: u64,
    sequence: u64,
    request: Vec<u8>,
    written: usize,
    received: usize,
    started: Instant,
    /// No exchange in flight: warmed up and waiting for the clock, or done.
    idle: bool,
}

impl Exchanger {
    fn begin(&mut self, sequence: u64) {
        self.sequence = sequence;
        pattern(self.index, sequence, &mut self.request);
        self.written = 0;
        self.received = 0;
        self.started = Instant::now();
        self.idle = false;
    }

    /// Writes the request and checks the reply as far as possible; the
    /// reply's latency once it is complete.
    fn drive(&mut self, buffer: &mut [u8]) -> io::Result<Option<Duration>> {
        if self.idle {
            return Ok(None);
        }
        loop {
            let mut progress = false;
            if self.written < self.request.len() && self.socket.writable {
                if let Moved::Bytes(count) = self.socket.write(&self.request[self.written..])? {
                    self.written += count;
                    progress = true;
                }
            }
            // Read no further than this reply: what follows would belong to
            // the next, and is checked against it.
            if self.received < self.written && self.socket.readable {
                let wanted = (self.request.len() - self.received).min(buffer.len());
                match self.socket.read(&mut buffer[..wanted])? {
                    Moved::Bytes(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "closed before the reply was complete",
                        ))
                    }
                    Moved::Bytes(count) => {
                        if buffer[..count] != self.request[self.received..self.received + count] {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!(
                                    "reply {} differs from its request at byte {}",
                                    self.sequence,
                                    self.received + first_difference(&buffer[..count], &self.request[self.received..])
                                ),
                            ));
                        }
                        self.received += count;
                        progress = true;
                    }
                    Moved::Blocked => {}
                }
            }
            if self.received == self.request.len() {
                self.idle = true;
                return Ok(Some(self.started.elapsed()));
            }
            if !progress {
                return Ok(None);
            }
        }
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0)
}

/// How long the warm-up exchanges (and thereby every connection's setup
/// behind a proxy) may take.
const WARM_UP: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Each connection does one exchange that is not counted.
    WarmUp,
    Measuring,
    /// Past the deadline: replies in flight are still checked.
    Draining,
}

fn request_response(connect: &str, connections: usize, size: u64, duration: Duration) -> Result<(), Error> {
    if size == 0 || size > 64 << 20 {
        return Err(Error::Usage(format!("--size {size}: give 1 byte to 64M")));
    }
    let destination = Destination::parse(connect)?;
    let mut poll = Poll::new().map_err(|e| Error::io("cannot create a poller", e))?;
    let registry = poll.registry().try_clone().map_err(|e| Error::io("cannot create a poller", e))?;
    let sockets = open_all(&destination, connections, &registry)?;
    let mut errors = sockets.iter().filter(|socket| socket.is_none()).count() as u64;
    let mut exchangers: Vec<Option<Exchanger>> = sockets
        .into_iter()
        .enumerate()
        .map(|(index, socket)| {
            socket.map(|socket| Exchanger {
                socket,
                index: index as u64,
                sequence: 0,
                request: vec![0; size as usize],
                written: 0,
                received: 0,
                started: Instant::now(),
                idle: true,
            })
        })
        .collect();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut latencies: Vec<u32> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut phase = Phase::WarmUp;
    let mut phase_end = Instant::now() + WARM_UP;
    let mut ready: Vec<usize> = Vec::new();
    for (index, exchanger) in exchangers.iter_mut().enumerate() {
        if let Some(exchanger) = exchanger {
            exchanger.begin(0);
            ready.push(index);
        }
    }
    loop {
        for &index in &ready {
            let Some(exchanger) = exchangers[index].as_mut() else {
                continue;
            };
            loop {
                match exchanger.drive(&mut buffer) {
                    Ok(None) => break,
                    Ok(Some(latency)) => {
                        if phase == Phase::Measuring {
                            if Instant::now() > phase_end {
                                break;
                            }
                            latencies.push(micros(latency));
                            exchanger.begin(exchanger.sequence + 1);
                        }
                    }
                    Err(error) => {
                        log::warn!("connection {index}: {error}");
                        errors += 1;
                        exchanger.socket.deregister(&registry);
                        exchangers[index] = None;
                        break;
                    }
                }
            }
        }
        ready.clear();
        let busy = exchangers.iter().flatten().filter(|exchanger| !exchanger.idle).count();
        let now = Instant::now();
        match phase {
            Phase::WarmUp if busy == 0 || now >= phase_end => {
                errors += drop_busy(&mut exchangers, &registry, "no warm-up reply");
                phase = Phase::Measuring;
                phase_end = Instant::now() + duration;
                for (index, exchanger) in exchangers.iter_mut().enumerate() {
                    if let Some(exchanger) = exchanger {
                        exchanger.begin(1);
                        ready.push(index);
                    }
                }
                continue;
            }
            Phase::Measuring if now >= phase_end => {
                phase = Phase::Draining;
                phase_end += GRACE;
            }
            Phase::Draining if busy == 0 || now >= phase_end => {
                errors += drop_busy(&mut exchangers, &registry, "no reply within the grace time");
                break;
            }
            _ => {}
        }
        poll_once(&mut poll, &mut events, Some(phase_end.saturating_duration_since(now)))?;
        for event in events.iter() {
            if let Some(exchanger) = exchangers.get_mut(event.token().0).and_then(Option::as_mut) {
                exchanger.socket.ready(event);
                ready.push(event.token().0);
            }
        }
    }
    latencies.sort_unstable();
    let requests = latencies.len();
    report(
        format!(
            "requests={requests} seconds={} rps={} p50_us={} p99_us={} errors={errors} connections={} size={}",
            seconds_text(duration),
            per_second(requests as u64, duration),
            percentile(&latencies, 50),
            percentile(&latencies, 99),
            connections,
            size,
        ),
        errors,
    )
}

/// Drops the connections still waiting for a reply; returns how many.
fn drop_busy(exchangers: &mut [Option<Exchanger>], registry: &Registry, why: &str) -> u64 {
    let mut dropped = 0;
    for (index, slot) in exchangers.iter_mut().enumerate() {
        if slot.as_ref().is_some_and(|exchanger| !exchanger.idle) {
            log::warn!("connection {index}: {why}");
            if let Some(exchanger) = slot.take() {
                exchanger.socket.deregister(registry);
            }
            dropped += 1;
        }
    }
    dropped
}

/// One connect loop's connection in flight.
struct Probe {
    socket: Socket,
    expected: u8,
    started: Instant,
}

fn connect_rate(connect: &str, connections: usize, duration: Duration) -> Result<(), Error> {
    let Destination::Path(path) = Destination::parse(connect)? else {
        return Err(Error::Usage(format!(
            "{connect}: the connect mode takes a socket path or a local selector (it reconnects for every sample)"
        )));
    };
    let mut poll = Poll::new().map_err(|e| Error::io("cannot create a poller", e))?;
    let registry = poll.registry().try_clone().map_err(|e| Error::io("cannot create a poller", e))?;
    let mut probes: Vec<Option<Probe>> = (0..connections).map(|_| None).collect();
    let mut sequences = vec![0u64; connections];
    let mut latencies: Vec<u32> = Vec::new();
    let mut errors = 0u64;
    let mut events = Events::with_capacity(1024);
    let start = Instant::now();
    let deadline = start + duration;
    // One probe: connect (a UNIX connect completes at once, or waits only
    // while the backlog is full), send the byte, wait for it to come back.
    let launch = |index: usize, sequence: u64| -> io::Result<Probe> {
        let started = Instant::now();
        let stream = std::os::unix::net::UnixStream::connect(&path)?;
        let mut socket = Socket::new(OwnedFd::from(stream))?;
        let mut byte = [0u8; 1];
        pattern(index as u64, sequence, &mut byte);
        match socket.write(&byte)? {
            Moved::Bytes(1) => {}
            _ => return Err(io::Error::new(io::ErrorKind::WriteZero, "a fresh connection took no byte")),
        }
        socket.register(&registry, Token(index), Interest::READABLE)?;
        Ok(Probe { socket, expected: byte[0], started })
    };
    let mut ready: Vec<usize> = (0..connections).collect();
    loop {
        for &index in &ready {
            loop {
                if let Some(probe) = probes[index].as_mut() {
                    let mut byte = [0u8; 1];
                    let outcome = match probe.socket.read(&mut byte) {
                        Ok(Moved::Blocked) => break,
                        Ok(Moved::Bytes(1)) if byte[0] == probe.expected => Ok(probe.started.elapsed()),
                        Ok(Moved::Bytes(1)) => Err(io::Error::new(io::ErrorKind::InvalidData, "wrong byte")),
                        Ok(_) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the reply")),
                        Err(error) => Err(error),
                    };
                    match outcome {
                        Ok(latency) if Instant::now() <= deadline => latencies.push(micros(latency)),
                        Ok(_) => {}
                        Err(error) => {
                            log::debug!("connect loop {index}: {error}");
                            errors += 1;
                        }
                    }
                    if let Some(probe) = probes[index].take() {
                        probe.socket.deregister(&registry);
                    }
                }
                if Instant::now() >= deadline {
                    break;
                }
                sequences[index] += 1;
                match launch(index, sequences[index]) {
                    Ok(probe) => probes[index] = Some(probe),
                    // Nothing ever worked: the target is not there.
                    Err(error) if latencies.is_empty() && errors == 0 => {
                        return Err(Error::io(format!("cannot connect to {}", path.display()), error))
                    }
                    Err(error) => {
                        log::debug!("connect loop {index}: {error}");
                        errors += 1;
                    }
                }
            }
        }
        ready.clear();
        let now = Instant::now();
        let in_flight = probes.iter().filter(|probe| probe.is_some()).count();
        if now >= deadline && (in_flight == 0 || now >= deadline + GRACE) {
            errors += in_flight as u64;
            break;
        }
        let wake = if now < deadline { deadline } else { deadline + GRACE };
        poll_once(&mut poll, &mut events, Some(wake.saturating_duration_since(now)))?;
        for event in events.iter() {
            if let Some(probe) = probes.get_mut(event.token().0).and_then(Option::as_mut) {
                probe.socket.ready(event);
                ready.push(event.token().0);
            }
        }
        if Instant::now() >= deadline {
            // Loops without a probe in flight have nothing to wait for.
            ready.retain(|&index| probes[index].is_some());
        }
    }
    latencies.sort_unstable();
    let connects = latencies.len();
    report(
        format!(
            "connects={connects} seconds={} cps={} p50_us={} p99_us={} errors={errors} connections={}",
            seconds_text(duration),
            per_second(connects as u64, duration),
            percentile(&latencies, 50),
            percentile(&latencies, 99),
            connections,
        ),
        errors,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("64"), Ok(64));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn pattern_depends_on_connection_and_sequence() {
        let fill = |connection, sequence| {
            let mut buffer = vec![0u8; 64];
            pattern(connection, sequence, &mut buffer);
            buffer
        };
        assert_eq!(fill(3, 7), fill(3, 7));
        assert_ne!(fill(3, 7), fill(3, 8));
        assert_ne!(fill(3, 7), fill(4, 7));
        assert_ne!(fill(0, 1), fill(1, 0));
        // Not constant within a buffer either: a shifted reply differs.
        let buffer = fill(0, 0);
        assert_ne!(buffer[..63], buffer[1..]);
        // Odd lengths fill every byte.
        let mut odd = vec![0u8; 13];
        pattern(1, 1, &mut odd);
        assert_eq!(odd[..], fill(1, 1)[..13]);
    }

    #[test]
    fn one_byte_patterns_differ_between_neighbours() {
        let byte = |connection, sequence| {
            let mut byte = [0u8; 1];
            pattern(connection, sequence, &mut byte);
            byte[0]
        };
        let distinct: std::collections::HashSet<u8> = (0..16).map(|sequence| byte(0, sequence)).collect();
        assert!(distinct.len() > 8, "{distinct:?}");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50), 50);
        assert_eq!(percentile(&samples, 99), 99);
        assert_eq!(percentile(&samples, 100), 100);
        assert_eq!(percentile(&samples, 0), 1);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[1, 2], 50), 1);
        assert_eq!(percentile(&[1, 2, 3], 99), 3);
        assert_eq!(percentile(&[3, 1, 2][..0], 50), 0);
        let thousand: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&thousand, 99), 990);
    }

    #[test]
    fn seconds_parse_without_floating_point() {
        assert_eq!(parse_seconds("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds(".25"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_seconds("2."), Ok(Duration::from_secs(2)));
        assert_eq!(parse_seconds("1.000001"), Ok(Duration::from_micros(1_000_001)));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("").is_err());
        assert!(parse_seconds(".").is_err());
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("1e3").is_err());
        assert!(parse_seconds("1.0000001").is_err());
    }

    #[test]
    fn rates_are_integer_arithmetic() {
        assert_eq!(seconds_text(Duration::from_micros(1_234_567)), "1.234567");
        assert_eq!(seconds_text(Duration::from_millis(2)), "0.002000");
        assert_eq!(per_second(1000, Duration::from_millis(500)), 2000);
        assert_eq!(megabytes_per_second(2_147_483_648, Duration::from_micros(204_615)), "10495.2");
        assert_eq!(megabytes_per_second(1, Duration::ZERO), "1.0");
    }

    #[test]
    fn counted_paths_replace_the_braces() {
        assert_eq!(listen_paths("/tmp/a.sock", 1).unwrap(), vec![PathBuf::from("/tmp/a.sock")]);
        assert_eq!(
            listen_paths("/tmp/s{}.h..0", 3).unwrap(),
            vec![PathBuf::from("/tmp/s0.h..0"), PathBuf::from("/tmp/s1.h..0"), PathBuf::from("/tmp/s2.h..0")]
        );
        assert!(listen_paths("/tmp/a.sock", 2).is_err());
        assert!(listen_paths("/tmp/a{}.sock", 0).is_err());
    }

    #[test]
    fn microseconds_saturate() {
        assert_eq!(micros(Duration::from_millis(3)), 3000);
        assert_eq!(micros(Duration::from_secs(1 << 40)), u32::MAX);
    }
}
