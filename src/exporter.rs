//! The SEP/1 server: offers `exported/` on TCP to the peers the allow list
//! admits, in one mio event loop for all connections (no thread or process
//! per connection). The protocol is in `doc/sep.md`, what a peer may see
//! and open in `sep_server`.
//!
//! Each connection is a small state machine:
//! `Request` (the line must arrive within 10 s and 4096 bytes; it is read
//! with MSG_PEEK so that bytes after it stay in the socket for the relay)
//! → `Reply` (a status line and LIST lines, then a lingering close, so a
//! client that sent more than its request still gets the whole reply)
//! or `Watch` (the WATCH stream, with keepalives) or `Relay` (CONNECT:
//! the status line, then the shared relay module between the TCP and the
//! UNIX socket, half-close passed on both ways).
//!
//! Faults are bounded: a connection cap answered with 503, descriptors
//! running out answered with 503 through a reserve descriptor instead of a
//! spinning accept loop, a WATCH or reply whose peer stops reading closed
//! after [`STALL`], TCP keepalive on every socket, and a user timeout on
//! every one but those relaying a stream (see `net::relaying`).

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UnixStream};
use mio::{Interest, Registry, Token};

use crate::allow::AllowList;
use crate::event_loop::{self, Timers};
use crate::net::{BusyWait, DescriptorReserve};
use crate::relay::{Relay, Way};
use crate::selector::Selector;
use crate::sep::{self, Request, Status, StatusLine};
use crate::sep_server::View;
use crate::tree::Tree;
use crate::watch::{RootEvent, TreeWatcher};

/// Token component of the exporter's events.
pub const COMPONENT: u8 = 1;
const MAX_LISTENERS: usize = 16;
const WATCHER: usize = MAX_LISTENERS;
const CONNECTION_BASE: usize = 64;
/// A peer that has not taken any of our output for this long is gone.
pub const STALL: Duration = Duration::from_secs(30);
/// A WATCH peer that lets this much output pile up is not keeping up.
const MAX_WATCH_BACKLOG: usize = 1 << 20;
/// How long a finished reply waits for the peer to close first.
const LINGER: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct ExporterConfig {
    pub listen: Vec<SocketAddr>,
    pub allow: AllowList,
    pub max_connections: usize,
}

enum State {
    Request {
        deadline: Instant,
    },
    Reply {
        out: Vec<u8>,
        written: usize,
    },
    Linger {
        deadline: Instant,
    },
    Watch {
        out: Vec<u8>,
        written: usize,
        selector: Selector,
        announced: HashSet<String>,
        last_sent: Instant,
    },
    Relay {
        unix: UnixStream,
        prefix: Vec<u8>,
        written: usize,
        relay: Relay,
        /// When its peers are looked at next (see `Relay::check_peers`);
        /// timers of the connection's earlier states that fire before
        /// are stale.
        next_check: Instant,
    },
    /// CONNECT to a service whose backlog is full: tried again at the
    /// timer, as a blocking client would wait (see `BusyWait`).
    Busy {
        path: String,
        wait: BusyWait,
    },
}

struct Connection {
    tcp: TcpStream,
    peer: SocketAddr,
    state: State,
    /// The last time the peer took output from us (or the start).
    last_progress: Instant,
}

pub struct Exporter {
    tree: Tree,
    view: View,
    listeners: Vec<TcpListener>,
    watcher: TreeWatcher,
    /// The root was made again since [`take_root_renewed`](Exporter::take_root_renewed).
    root_renewed: bool,
    connections: HashMap<usize, Connection>,
    next_id: usize,
    timers: Timers,
    allow: AllowList,
    max_connections: usize,
    /// Freed when descriptors run out, so the peer can be told 503
    /// instead of being left in the backlog.
    reserve: DescriptorReserve,
}

fn token(id: usize) -> Token {
    event_loop::token(COMPONENT, id)
}

fn connection_token(connection: usize, side: usize) -> Token {
    token(CONNECTION_BASE + connection * 2 + side)
}

fn would_block(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::WouldBlock
}

/// Writes what it can of `out[*written..]`; true when all is written.
fn flush(tcp: &mut TcpStream, out: &[u8], written: &mut usize, progress: &mut Instant) -> io::Result<bool> {
    while *written < out.len() {
        match tcp.write(&out[*written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(count) => {
                *written += count;
                *progress = Instant::now();
            }
            Err(error) if would_block(&error) => return Ok(false),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(true)
}

/// Tells a peer no, best effort, on a connection we are about to drop. The
/// request it has sent so far is read away first (up to a bound): closing
/// with unread input sends a reset instead of a FIN, and a reset can
/// destroy the status line before the peer has read it.
fn refuse(stream: &mut std::net::TcpStream, status: StatusLine) {
    let _ = stream.write(status.to_line().as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; sep::MAX_REQUEST_LINE];
    for _ in 0..4 {
        // Nonblocking: stops at what has arrived.
        if !matches!(stream.read(&mut sink), Ok(count) if count > 0) {
            break;
        }
    }
}

impl Exporter {
    /// Binds every listen address and starts watching the tree.
    pub fn new(tree: Tree, config: ExporterConfig) -> io::Result<Exporter> {
        if config.listen.is_empty() || config.listen.len() > MAX_LISTENERS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "between 1 and 16 listen addresses"));
        }
        let mut listeners = Vec::new();
        for address in &config.listen {
            let listener = crate::net::tcp_listen(*address, crate::tree::BACKLOG)
                .map_err(|error| io::Error::new(error.kind(), format!("cannot listen on {address}: {error}")))?;
            listeners.push(TcpListener::from_std(listener));
        }
        tree.ensure_root().map_err(io::Error::other)?;
        let mut watcher = TreeWatcher::new(&tree)?;
        watcher.keep_root();
        Ok(Exporter {
            tree,
            view: View::Exported,
            listeners,
            watcher,
            root_renewed: false,
            connections: HashMap::new(),
            next_id: 0,
            timers: Timers::default(),
            allow: config.allow,
            max_connections: config.max_connections,
            reserve: DescriptorReserve::new(),
        })
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addresses(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|listener| listener.local_addr().ok()).collect()
    }

    pub fn register(&mut self, registry: &Registry) -> io::Result<()> {
        for (index, listener) in self.listeners.iter_mut().enumerate() {
            registry.register(listener, token(index), Interest::READABLE)?;
        }
        registry.register(&mut mio::unix::SourceFd(&self.watcher.fd()), token(WATCHER), Interest::READABLE)
    }

    /// Whether `address` is among the peers this exporter serves.
    pub fn allows(&self, address: std::net::IpAddr) -> bool {
        self.allow.allows(address)
    }

    /// The allow list follows the interfaces (if it is the default).
    pub fn interfaces_changed(&mut self) {
        self.allow.refresh();
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.timers.timeout(Instant::now())
    }

    pub fn handle_event(&mut self, registry: &Registry, event: &mio::event::Event) {
        let id = event_loop::id(event.token());
        if id < MAX_LISTENERS {
            self.accept(registry, id);
        } else if id == WATCHER {
            self.tree_changed(registry);
        } else if id >= CONNECTION_BASE {
            let connection = (id - CONNECTION_BASE) / 2;
            let side = (id - CONNECTION_BASE) % 2;
            let (readable, writable) = event_loop::readiness(event);
            let read_closed = event_loop::read_closed(event);
            self.connection_event(registry, connection, side, [readable, writable, read_closed]);
        }
    }

    pub fn handle_timers(&mut self, registry: &Registry) {
        let now = Instant::now();
        for connection in self.timers.expired(now) {
            self.check_time(registry, connection, now);
        }
    }

    fn accept(&mut self, registry: &Registry, index: usize) {
        loop {
            let (stream, peer) = match self.listeners[index].accept() {
                Ok(accepted) => accepted,
                Err(error) if would_block(&error) => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) if DescriptorReserve::is_exhaustion(&error) => {
                    if !self.refuse_for_lack_of_descriptors(index) {
                        return;
                    }
                    continue;
                }
                Err(error) => {
                    log::warn!("accept failed: {error}");
                    return;
                }
            };
            let mut std_stream = into_std(stream);
            if !self.allow.allows(peer.ip()) {
                log::info!("{peer}: not in the allow list");
                refuse(&mut std_stream, StatusLine::with_detail(Status::Forbidden, "address not allowed"));
                continue;
            }
            if self.connections.len() >= self.max_connections {
                log::warn!("{peer}: refused, at the cap of {} connections", self.max_connections);
                refuse(&mut std_stream, StatusLine::with_detail(Status::Unavailable, "too many connections"));
                continue;
            }
            if let Err(error) = crate::net::tune_tcp(std_stream.as_raw_fd()) {
                log::debug!("{peer}: cannot tune: {error}");
            }
            let mut tcp = TcpStream::from_std(std_stream);
            let id = self.next_id;
            self.next_id += 1;
            if let Err(error) = registry.register(&mut tcp, connection_token(id, 0), Interest::READABLE) {
                log::warn!("{peer}: cannot register: {error}");
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(sep::REQUEST_TIMEOUT_SECS);
            self.timers.at(deadline, id);
            log::debug!("{peer}: connected (#{id})");
            self.connections.insert(
                id,
                Connection { tcp, peer, state: State::Request { deadline }, last_progress: Instant::now() },
            );
            // The request may already be there: edge-triggered events only
            // report what arrives after registration on some systems.
            self.connection_event(registry, id, 0, [true, false, false]);
        }
    }

    /// Out of descriptors: take one pending connection with the reserve,
    /// tell it 503 and close it. Returns whether one was refused.
    fn refuse_for_lack_of_descriptors(&mut self, index: usize) -> bool {
        let listener = &self.listeners[index];
        self.reserve.refuse_one(|| match listener.accept() {
            Ok((stream, peer)) => {
                log::warn!("{peer}: refused, out of file descriptors");
                refuse(&mut into_std(stream), StatusLine::with_detail(Status::Unavailable, "server overloaded"));
                true
            }
            Err(_) => false,
        })
    }

    fn close(&mut self, registry: &Registry, id: usize) {
        if let Some(mut connection) = self.connections.remove(&id) {
            let _ = registry.deregister(&mut connection.tcp);
            if let State::Relay { mut unix, relay, .. } = connection.state {
                log::debug!(
                    "{}: relayed {} bytes in, {} out",
                    connection.peer,
                    relay.bytes(Way::Forward),
                    relay.bytes(Way::Backward)
                );
                drop(relay);
                let _ = registry.deregister(&mut unix);
            }
            log::debug!("{}: closed (#{id})", connection.peer);
        }
    }

    /// `ready`: readable, writable, and read closed (see `Relay::set_read_closed`).
    fn connection_event(&mut self, registry: &Registry, id: usize, side: usize, ready: [bool; 3]) {
        let [readable, _, read_closed] = ready;
        let Some(connection) = self.connections.get_mut(&id) else {
            return;
        };
        let replying = matches!(connection.state, State::Reply { .. });
        let outcome = match &mut connection.state {
            State::Request { .. } if readable => self.read_request(registry, id, read_closed),
            State::Request { .. } => Ok(true),
            _ => Self::progress(connection, registry, id, side, ready),
        };
        if replying {
            self.arm_linger(id);
        }
        match outcome {
            Ok(true) => {}
            Ok(false) => self.close(registry, id),
            Err(error) => {
                log::debug!("#{id}: {error}");
                self.close(registry, id);
            }
        }
    }

    /// A reply that went out entered its linger: close at its deadline,
    /// not at the reply's stall timer (six times later).
    fn arm_linger(&mut self, id: usize) {
        if let Some(Connection { state: State::Linger { deadline }, .. }) = self.connections.get(&id) {
            self.timers.at(*deadline, id);
        }
    }

    /// Reads the request line if it is complete; returns whether the
    /// connection lives on. `read_closed`: the peer sent its end of data,
    /// so an unfinished line will stay unfinished.
    fn read_request(&mut self, registry: &Registry, id: usize, read_closed: bool) -> io::Result<bool> {
        let connection = self.connections.get_mut(&id).expect("caller checked");
        let mut peeked = [0u8; sep::MAX_REQUEST_LINE];
        let available = match connection.tcp.peek(&mut peeked) {
            Ok(0) => return Ok(false),
            Ok(count) => count,
            Err(error) if would_block(&error) => return Ok(true),
            Err(error) => return Err(error),
        };
        let Some(end) = peeked[..available].iter().position(|&byte| byte == b'\n') else {
            if available >= sep::MAX_REQUEST_LINE {
                let status = StatusLine::with_detail(Status::BadRequest, "request line too long");
                return self.reply(registry, id, status, &[]);
            }
            if read_closed {
                let status = StatusLine::with_detail(Status::BadRequest, "the request line ends without a line feed");
                return self.reply(registry, id, status, &[]);
            }
            return Ok(true);
        };
        let mut line = vec![0u8; end + 1];
        connection.tcp.read_exact(&mut line)?;
        let request = match Request::parse(&line) {
            Ok(request) => request,
            Err(error) => {
                return self.reply(registry, id, StatusLine::with_detail(Status::BadRequest, &error.to_string()), &[]);
            }
        };
        log::debug!("{}: {}", connection.peer, request.verb());
        match request {
            Request::Ping => self.reply(registry, id, StatusLine::new(Status::Ok), &[]),
            Request::Forward(_) => {
                // Where the tree is, and forwarding by ssh, mean nothing to
                // an anonymous TCP peer.
                let status = StatusLine::with_detail(Status::BadRequest, "FORWARD is only served over ssh");
                self.reply(registry, id, status, &[])
            }
            Request::List(argument) => {
                let listed = View::selector(argument.as_deref()).and_then(|s| self.view.list(&self.tree, &s));
                match listed {
                    Ok(paths) => self.reply(registry, id, StatusLine::new(Status::Ok), &paths),
                    Err(status) => self.reply(registry, id, status, &[]),
                }
            }
            Request::Watch(argument) => match View::selector(argument.as_deref()) {
                Ok(selector) => self.start_watch(registry, id, selector),
                Err(status) => self.reply(registry, id, status, &[]),
            },
            Request::Connect(path) => self.connect(registry, id, path, BusyWait::new()),
        }
    }

    /// CONNECT: the relay if the service takes the connection, a wait if
    /// its backlog is full, else the refusal.
    fn connect(&mut self, registry: &Registry, id: usize, path: String, mut wait: BusyWait) -> io::Result<bool> {
        let refusal = match self.view.open(&self.tree, &path, None) {
            Ok(Some(unix)) => return self.start_relay(registry, id, unix),
            Ok(None) => match wait.next_try() {
                Some(when) => {
                    let connection = self.connections.get_mut(&id).expect("caller checked");
                    connection.state = State::Busy { path, wait };
                    self.timers.at(when, id);
                    return Ok(true);
                }
                None => View::busy(&path),
            },
            Err(status) => status,
        };
        log::info!("#{id}: CONNECT {path}: {}", refusal.to_line().trim_end());
        self.reply(registry, id, refusal, &[])
    }

    fn reply(&mut self, registry: &Registry, id: usize, status: StatusLine, lines: &[String]) -> io::Result<bool> {
        let mut out = status.to_line().into_bytes();
        for line in lines {
            out.extend_from_slice(sep::format_list_line(line).as_bytes());
        }
        let connection = self.connections.get_mut(&id).expect("caller checked");
        registry.reregister(&mut connection.tcp, connection_token(id, 0), Interest::READABLE | Interest::WRITABLE)?;
        connection.state = State::Reply { out, written: 0 };
        connection.last_progress = Instant::now();
        self.timers.after(STALL, id);
        let outcome = Self::progress(connection, registry, id, 0, [false, true, false]);
        self.arm_linger(id);
        outcome
    }

    fn start_watch(&mut self, registry: &Registry, id: usize, selector: Selector) -> io::Result<bool> {
        // The watcher's view is only as fresh as the last inotify events
        // read, and this connection's readiness may come in the same turn
        // before theirs (dipusd binds its default services just after the
        // port listens). Services bound by now have queued their events:
        // read them first, so `= synced` follows every one that exists.
        self.tree_changed(registry);
        let mut out = StatusLine::new(Status::Ok).to_line().into_bytes();
        let mut announced = HashSet::new();
        for service in self.watcher.current() {
            if !selector.matches(&service.path, &service.full) {
                continue;
            }
            if let Some(wire) = self.view.wire_path(&service) {
                out.extend_from_slice(sep::Event::Added(wire.clone()).to_line().as_bytes());
                announced.insert(wire);
            }
        }
        out.extend_from_slice(sep::Event::Synced.to_line().as_bytes());
        let connection = self.connections.get_mut(&id).expect("caller checked");
        registry.reregister(&mut connection.tcp, connection_token(id, 0), Interest::READABLE | Interest::WRITABLE)?;
        connection.state = State::Watch { out, written: 0, selector, announced, last_sent: Instant::now() };
        connection.last_progress = Instant::now();
        self.timers.after(Duration::from_secs(sep::KEEPALIVE_SECS), id);
        Self::progress(connection, registry, id, 0, [false, true, false])
    }

    fn start_relay(
        &mut self,
        registry: &Registry,
        id: usize,
        unix: std::os::unix::net::UnixStream,
    ) -> io::Result<bool> {
        let connection = self.connections.get_mut(&id).expect("caller checked");
        let mut unix = UnixStream::from_std(unix);
        registry.register(&mut unix, connection_token(id, 1), Interest::READABLE | Interest::WRITABLE)?;
        registry.reregister(&mut connection.tcp, connection_token(id, 0), Interest::READABLE | Interest::WRITABLE)?;
        let relay = Relay::between(connection.tcp.as_raw_fd(), unix.as_raw_fd());
        let _ = crate::net::relaying(connection.tcp.as_raw_fd());
        let next_check = Instant::now() + crate::net::PEER_CHECK_EVERY;
        self.timers.at(next_check, id);
        let prefix = StatusLine::new(Status::Ok).to_line().into_bytes();
        connection.state = State::Relay { unix, prefix, written: 0, relay, next_check };
        Self::progress(connection, registry, id, 0, [true, true, false])
    }

    /// Moves a connection along after readiness on `side` (0 TCP, 1 UNIX).
    fn progress(
        connection: &mut Connection,
        _registry: &Registry,
        _id: usize,
        side: usize,
        ready: [bool; 3],
    ) -> io::Result<bool> {
        let [readable, writable, read_closed] = ready;
        let Connection { tcp, state, last_progress, .. } = connection;
        match state {
            State::Request { .. } | State::Busy { .. } => Ok(true),
            State::Reply { out, written } => {
                if flush(tcp, out, written, last_progress)? {
                    // Everything is out: half-close and wait for the peer
                    // to close, so unread request bytes cannot turn our
                    // close into a reset that destroys the reply.
                    tcp.shutdown(std::net::Shutdown::Write)?;
                    *state = State::Linger { deadline: Instant::now() + LINGER };
                    return Self::drain(tcp);
                }
                Ok(true)
            }
            State::Linger { .. } => Self::drain(tcp),
            State::Watch { out, written, .. } => {
                if readable {
                    // The peer has nothing to say on a WATCH; EOF is a
                    // half-close (socat does that), a reset ends it.
                    let mut sink = [0u8; 512];
                    loop {
                        match tcp.read(&mut sink) {
                            Ok(0) => break,
                            Ok(_) => {}
                            Err(error) if would_block(&error) => break,
                            Err(error) => return Err(error),
                        }
                    }
                }
                if flush(tcp, out, written, last_progress)? {
                    out.clear();
                    *written = 0;
                }
                Ok(true)
            }
            State::Relay { unix, prefix, written, relay, .. } => {
                let fd = if side == 0 { tcp.as_raw_fd() } else { unix.as_raw_fd() };
                relay.set_ready(fd, readable, writable);
                if read_closed {
                    relay.set_read_closed(fd);
                }
                if *written < prefix.len() && !flush(tcp, prefix, written, last_progress)? {
                    return Ok(true);
                }
                relay.pump()?;
                Ok(!relay.is_done())
            }
        }
    }

    /// Reads and discards until EOF; false once the peer has closed.
    fn drain(tcp: &mut TcpStream) -> io::Result<bool> {
        let mut sink = [0u8; 512];
        loop {
            match tcp.read(&mut sink) {
                Ok(0) => return Ok(false),
                Ok(_) => {}
                Err(error) if would_block(&error) => return Ok(true),
                Err(error) => return Err(error),
            }
        }
    }

    fn check_time(&mut self, registry: &Registry, id: usize, now: Instant) {
        enum Action {
            Close,
            TimeOut,
            Rearm(Instant),
            Keepalive,
            Connect,
            CheckPeers,
            Stale,
        }
        let Some(connection) = self.connections.get_mut(&id) else {
            return;
        };
        let stalled = now.duration_since(connection.last_progress) >= STALL;
        let keepalive = Duration::from_secs(sep::KEEPALIVE_SECS);
        let action = match &connection.state {
            State::Request { deadline } if now >= *deadline => Action::TimeOut,
            State::Request { deadline } => Action::Rearm(*deadline),
            State::Reply { .. } if stalled => Action::Close,
            State::Reply { .. } => Action::Rearm(connection.last_progress + STALL),
            State::Linger { deadline } if now >= *deadline => Action::Close,
            State::Linger { deadline } => Action::Rearm(*deadline),
            State::Watch { out, written, .. } if *written < out.len() && stalled => {
                log::info!("{}: WATCH peer stopped reading; closing", connection.peer);
                Action::Close
            }
            State::Watch { last_sent, .. } if now.duration_since(*last_sent) >= keepalive => Action::Keepalive,
            State::Watch { last_sent, .. } => Action::Rearm(*last_sent + keepalive),
            State::Relay { next_check, .. } if now >= *next_check => Action::CheckPeers,
            State::Relay { .. } => Action::Stale,
            State::Busy { .. } => Action::Connect,
        };
        match action {
            Action::Stale => {}
            Action::CheckPeers => {
                let State::Relay { relay, next_check, .. } = &mut connection.state else {
                    unreachable!("matched above")
                };
                match relay.check_peers() {
                    Ok(()) => {
                        *next_check = now + crate::net::PEER_CHECK_EVERY;
                        self.timers.at(*next_check, id);
                    }
                    Err(error) => {
                        log::info!("{}: {error}; closing", connection.peer);
                        self.close(registry, id);
                    }
                }
            }
            Action::Close => self.close(registry, id),
            Action::Rearm(when) => self.timers.at(when, id),
            Action::TimeOut => {
                log::info!("{}: no complete request within {} s", connection.peer, sep::REQUEST_TIMEOUT_SECS);
                let status = StatusLine::with_detail(Status::BadRequest, "request timeout");
                if !matches!(self.reply(registry, id, status, &[]), Ok(true)) {
                    self.close(registry, id);
                }
            }
            Action::Connect => {
                let busy = std::mem::replace(&mut connection.state, State::Request { deadline: now });
                let State::Busy { path, wait } = busy else { unreachable!("matched above") };
                if !matches!(self.connect(registry, id, path, wait), Ok(true)) {
                    self.close(registry, id);
                }
            }
            Action::Keepalive => {
                if let State::Watch { out, last_sent, .. } = &mut connection.state {
                    out.extend_from_slice(sep::Event::Keepalive.to_line().as_bytes());
                    *last_sent = now;
                }
                if matches!(Self::progress(connection, registry, id, 0, [false, true, false]), Ok(true)) {
                    self.timers.at(now + keepalive, id);
                } else {
                    self.close(registry, id);
                }
            }
        }
    }

    /// Whether the root was removed and made again since the last call:
    /// what the daemon had made in it is gone and is to be made again.
    pub fn take_root_renewed(&mut self) -> bool {
        std::mem::take(&mut self.root_renewed)
    }

    fn tree_changed(&mut self, registry: &Registry) {
        let changes = match self.watcher.read_changes() {
            Ok(changes) => changes,
            Err(error) => {
                log::warn!("cannot read tree changes: {error}");
                return;
            }
        };
        let root = self.tree.root().display();
        match self.watcher.take_root_event() {
            Some(RootEvent::Renewed) => {
                log::warn!("{root} was removed or moved away; made it again and watching it afresh");
                self.root_renewed = true;
            }
            Some(RootEvent::Unavailable(why)) => log::warn!(
                "{root} was removed or moved away and cannot be watched again ({why}); \
                 serving nothing until it can"
            ),
            None => {}
        }
        if changes.is_empty() {
            return;
        }
        let mut closing = Vec::new();
        for (&id, connection) in self.connections.iter_mut() {
            let State::Watch { out, selector, announced, last_sent, .. } = &mut connection.state else {
                continue;
            };
            let before = out.len();
            for change in &changes {
                if let Some(event) = self.view.watch_event(change, selector, announced) {
                    out.extend_from_slice(event.to_line().as_bytes());
                }
            }
            if out.len() == before {
                continue;
            }
            *last_sent = Instant::now();
            if out.len() > MAX_WATCH_BACKLOG {
                log::info!("{}: WATCH peer is not keeping up; closing", connection.peer);
                closing.push(id);
                continue;
            }
            if !matches!(Self::progress(connection, registry, id, 0, [false, true, false]), Ok(true)) {
                closing.push(id);
            }
        }
        for id in closing {
            self.close(registry, id);
        }
    }
}

/// mio's stream as a std stream, for the one-line refusals.
fn into_std(stream: TcpStream) -> std::net::TcpStream {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the descriptor moves from one owner to the other.
    unsafe { std::net::TcpStream::from_raw_fd(stream.into_raw_fd()) }
}

/// Runs an exporter in its own loop until SIGTERM/SIGINT, following
/// interface changes (rtnetlink) so a default allow list stays current.
pub fn run(exporter: &mut Exporter, signals: &crate::signals::SignalPipe) -> io::Result<()> {
    let mut poll = mio::Poll::new()?;
    exporter.register(poll.registry())?;
    const SIGNALS: Token = event_loop::token(0, 0);
    const INTERFACES: Token = event_loop::token(0, 1);
    poll.registry().register(&mut mio::unix::SourceFd(&signals.fd()), SIGNALS, Interest::READABLE)?;
    let interfaces = crate::netlink::InterfaceEvents::open().ok();
    if let Some(interfaces) = &interfaces {
        poll.registry().register(&mut mio::unix::SourceFd(&interfaces.fd()), INTERFACES, Interest::READABLE)?;
    }
    let mut events = mio::Events::with_capacity(1024);
    loop {
        crate::event_loop::wait(&mut poll, &mut events, exporter.timeout())?;
        for event in events.iter() {
            match event.token() {
                SIGNALS => {
                    if !signals.drain().is_empty() {
                        return Ok(());
                    }
                }
                INTERFACES => {
                    if interfaces.as_ref().is_some_and(crate::netlink::InterfaceEvents::drain) {
                        exporter.interfaces_changed();
                    }
                }
                _ => exporter.handle_event(poll.registry(), event),
            }
        }
        exporter.handle_timers(poll.registry());
    }
}
