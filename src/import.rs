//! Mirroring a remote host's services as local proxy sockets, kept in sync.
//!
//! An [`Importer`] holds one WATCH session with an exporter. Every `+ PATH`
//! becomes a proxy socket at the same protocol path and name in the import
//! scope (`imported/` for LAN imports), every `- PATH` removes it again.
//! A client connecting to a proxy becomes a CONNECT to the exporter, and
//! from its status line on, the shared relay moves the bytes; all in the
//! caller's mio loop, without a thread or process per connection.
//!
//! The session is judged by what arrives: the exporter sends a keepalive
//! every 5 s, so [`SILENCE`] without a byte means the peer or the path is
//! gone (a pulled cable, a suspended laptop). Then every proxy is removed,
//! and the session is retried with capped exponential backoff; the proxies
//! come back with the next sync. Connections already relayed are not cut:
//! each has its own TCP connection and fails or finishes on its own.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};

use crate::event_loop::{self, Timers};
use crate::name::{Scope, ServicePath};
use crate::relay::Relay;
use crate::sep::{self, Event, Request, StatusLine};
use crate::sep_client::Server;
use crate::tree::{ServiceSocket, SocketOptions, Tree};

/// No byte from the exporter for this long: three keepalives missed.
pub const SILENCE: Duration = Duration::from_secs(3 * sep::KEEPALIVE_SECS);
/// How long a connection attempt or a CONNECT's status line may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

const SESSION: usize = 0;
const TIMER_SESSION: usize = usize::MAX;
const PROXY_BASE: usize = 1;
const LINK_BASE: usize = 1 << 40;

#[derive(Debug, Clone)]
pub struct ImportConfig {
    pub server: Server,
    /// Which services to mirror (a selector, sent with WATCH).
    pub selector: Option<String>,
    pub scope: Scope,
    pub options: SocketOptions,
}

enum Session {
    /// Waiting to try again.
    Idle { retry_at: Instant },
    /// TCP connect in progress.
    Connecting { tcp: TcpStream, address: SocketAddr, since: Instant },
    /// WATCH sent; reading the status line and events.
    Watching { tcp: TcpStream, address: SocketAddr, input: Vec<u8>, status_read: bool, last_heard: Instant },
}

/// Where a proxied connection is.
enum LinkState {
    Connecting,
    ReadingStatus,
    Relaying(Relay),
}

struct Link {
    client: UnixStream,
    tcp: TcpStream,
    path: String,
    state: LinkState,
    since: Instant,
}

struct Proxy {
    socket: ServiceSocket,
    id: usize,
}

/// What happened to the session, for the caller (the applet waits for the
/// first sync; dipusd only logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    Synced,
    Lost(String),
}

pub struct Importer {
    tree: Tree,
    config: ImportConfig,
    component: u8,
    session: Session,
    backoff: Duration,
    synced: bool,
    proxies: HashMap<String, Proxy>,
    proxy_paths: HashMap<usize, String>,
    next_proxy: usize,
    links: HashMap<usize, Link>,
    next_link: usize,
    timers: Timers,
    events: Vec<SessionEvent>,
}

fn would_block(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::WouldBlock
}

fn readiness(event: &mio::event::Event) -> (bool, bool) {
    (
        event.is_readable() || event.is_read_closed() || event.is_error(),
        event.is_writable() || event.is_write_closed() || event.is_error(),
    )
}

impl Importer {
    pub fn new(tree: Tree, config: ImportConfig, component: u8) -> Importer {
        Importer {
            tree,
            config,
            component,
            session: Session::Idle { retry_at: Instant::now() },
            backoff: FIRST_BACKOFF,
            synced: false,
            proxies: HashMap::new(),
            proxy_paths: HashMap::new(),
            next_proxy: 0,
            links: HashMap::new(),
            next_link: 0,
            timers: Timers::default(),
            events: Vec::new(),
        }
    }

    fn token(&self, id: usize) -> Token {
        event_loop::token(self.component, id)
    }

    pub fn server(&self) -> &Server {
        &self.config.server
    }

    pub fn is_synced(&self) -> bool {
        self.synced
    }

    pub fn proxy_count(&self) -> usize {
        self.proxies.len()
    }

    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    /// Session events since the last call.
    pub fn take_events(&mut self) -> Vec<SessionEvent> {
        std::mem::take(&mut self.events)
    }

    pub fn timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let session = match &self.session {
            Session::Idle { retry_at } => Some(retry_at.saturating_duration_since(now)),
            _ => None,
        };
        event_loop::earliest(session, self.timers.timeout(now))
    }

    /// Starts (or retries) the session when it is due.
    pub fn handle_timers(&mut self, registry: &Registry) {
        let now = Instant::now();
        if let Session::Idle { retry_at } = self.session {
            if now >= retry_at {
                self.connect_session(registry);
            }
        }
        for key in self.timers.expired(now) {
            if key == TIMER_SESSION {
                self.check_session(registry, now);
            } else if key >= LINK_BASE {
                let stuck = self.links.get(&key).is_some_and(|link| {
                    !matches!(link.state, LinkState::Relaying(_)) && now.duration_since(link.since) >= CONNECT_TIMEOUT
                });
                if stuck {
                    log::info!("{}: CONNECT timed out", self.config.server.authority());
                    self.close_link(registry, key);
                }
            }
        }
    }

    pub fn handle_event(&mut self, registry: &Registry, event: &mio::event::Event) {
        let id = event_loop::id(event.token());
        let (readable, writable) = readiness(event);
        if id == SESSION {
            self.session_ready(registry);
        } else if id >= LINK_BASE {
            let link = LINK_BASE + (id - LINK_BASE) / 2 * 2;
            let side = (id - LINK_BASE) % 2;
            self.link_ready(registry, link, side, readable, writable);
        } else if let Some(path) = self.proxy_paths.get(&id).cloned() {
            self.accept(registry, &path);
        }
    }

    fn connect_session(&mut self, registry: &Registry) {
        let server = self.config.server.clone();
        let address = match server.addresses() {
            Ok(addresses) if !addresses.is_empty() => addresses[0],
            Ok(_) => return self.session_failed(registry, format!("{}: no address", server.authority())),
            Err(error) => return self.session_failed(registry, error.to_string()),
        };
        match TcpStream::connect(address) {
            Ok(mut tcp) => {
                if let Err(error) =
                    registry.register(&mut tcp, self.token(SESSION), Interest::READABLE | Interest::WRITABLE)
                {
                    return self.session_failed(registry, error.to_string());
                }
                self.session = Session::Connecting { tcp, address, since: Instant::now() };
                self.timers.after(CONNECT_TIMEOUT, TIMER_SESSION);
            }
            Err(error) => self.session_failed(registry, format!("cannot connect to {}: {error}", server.authority())),
        }
    }

    fn session_ready(&mut self, registry: &Registry) {
        if let Session::Connecting { tcp, address, .. } = &mut self.session {
            match tcp.take_error() {
                Ok(None) => {}
                Ok(Some(error)) | Err(error) => {
                    let message = format!("cannot connect to {}: {error}", self.config.server.authority());
                    return self.session_failed(registry, message);
                }
            }
            if let Err(error) = tcp.peer_addr() {
                if error.kind() == io::ErrorKind::NotConnected {
                    return; // still connecting
                }
                let message = format!("cannot connect to {}: {error}", self.config.server.authority());
                return self.session_failed(registry, message);
            }
            let _ = crate::net::tune_tcp(tcp.as_raw_fd());
            let request = Request::Watch(self.config.selector.clone()).to_line();
            // A fresh socket's send buffer takes one short line whole.
            if let Err(error) = tcp.write_all(request.as_bytes()) {
                let message = format!("{}: {error}", self.config.server.authority());
                return self.session_failed(registry, message);
            }
            let address = *address;
            let Session::Connecting { tcp, .. } =
                std::mem::replace(&mut self.session, Session::Idle { retry_at: Instant::now() })
            else {
                unreachable!()
            };
            self.session =
                Session::Watching { tcp, address, input: Vec::new(), status_read: false, last_heard: Instant::now() };
            self.timers.after(SILENCE, TIMER_SESSION);
        }
        if matches!(self.session, Session::Watching { .. }) {
            if let Err(message) = self.read_session(registry) {
                self.session_failed(registry, message);
            }
        }
    }

    /// Reads and applies everything the exporter sent.
    fn read_session(&mut self, registry: &Registry) -> Result<(), String> {
        let authority = self.config.server.authority();
        let mut lines = Vec::new();
        // How the stream ended, if it did: reported after the lines that
        // came before the end, so a refusal's status line is not lost.
        let mut ended = None;
        {
            let Session::Watching { tcp, input, last_heard, .. } = &mut self.session else {
                return Ok(());
            };
            let mut buffer = [0u8; 16 * 1024];
            loop {
                match tcp.read(&mut buffer) {
                    Ok(0) => {
                        ended = Some(format!("{authority}: the exporter closed the session"));
                        break;
                    }
                    Ok(count) => {
                        *last_heard = Instant::now();
                        input.extend_from_slice(&buffer[..count]);
                    }
                    Err(error) if would_block(&error) => break,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(error) => {
                        ended = Some(format!("{authority}: {error}"));
                        break;
                    }
                }
            }
            let mut start = 0;
            while let Some(end) = input[start..].iter().position(|&b| b == b'\n') {
                lines.push(input[start..start + end + 1].to_vec());
                start += end + 1;
            }
            input.drain(..start);
            if input.len() > sep::MAX_REQUEST_LINE {
                return Err(format!("{authority}: a line longer than {} bytes", sep::MAX_REQUEST_LINE));
            }
        }
        for line in lines {
            self.apply_line(registry, &line)?;
        }
        ended.map_or(Ok(()), Err)
    }

    fn apply_line(&mut self, registry: &Registry, line: &[u8]) -> Result<(), String> {
        let authority = self.config.server.authority();
        let Session::Watching { status_read, .. } = &mut self.session else {
            return Ok(());
        };
        if !*status_read {
            let status = StatusLine::parse(line).map_err(|e| format!("{authority}: {e}"))?;
            if !status.status.is_success() {
                return Err(format!("{authority} answered: {}", status.to_line().trim_end()));
            }
            *status_read = true;
            return Ok(());
        }
        match Event::parse(line).map_err(|e| format!("{authority}: {e}"))? {
            Event::Keepalive => {}
            Event::Synced => {
                if !self.synced {
                    log::info!("{authority}: synced, {} services", self.proxies.len());
                }
                self.synced = true;
                self.backoff = FIRST_BACKOFF;
                self.events.push(SessionEvent::Synced);
            }
            Event::Added(path) => self.add_proxy(registry, &path),
            Event::Removed(path) => self.remove_proxy(registry, &path),
        }
        Ok(())
    }

    fn add_proxy(&mut self, registry: &Registry, wire: &str) {
        if self.proxies.contains_key(wire) {
            return;
        }
        let Ok(path) = ServicePath::parse(wire) else {
            log::warn!("{}: ignoring invalid service path {wire:?}", self.config.server.authority());
            return;
        };
        let socket = match ServiceSocket::bind_exact(&self.tree, &self.config.scope, &path, &self.config.options) {
            Ok(socket) => socket,
            Err(error) => {
                log::warn!("cannot import {wire}: {error}");
                return;
            }
        };
        let id = PROXY_BASE + self.next_proxy;
        self.next_proxy += 1;
        let fd = socket.listener().as_raw_fd();
        if let Err(error) = registry.register(&mut mio::unix::SourceFd(&fd), self.token(id), Interest::READABLE) {
            log::warn!("cannot import {wire}: {error}");
            return;
        }
        log::debug!("imported {}", socket.path().display());
        self.proxy_paths.insert(id, wire.to_string());
        self.proxies.insert(wire.to_string(), Proxy { socket, id });
        // Clients may already be waiting on a socket we just made.
        self.accept(registry, wire);
    }

    fn remove_proxy(&mut self, registry: &Registry, wire: &str) {
        if let Some(proxy) = self.proxies.remove(wire) {
            let fd = proxy.socket.listener().as_raw_fd();
            let _ = registry.deregister(&mut mio::unix::SourceFd(&fd));
            self.proxy_paths.remove(&proxy.id);
            log::debug!("removed {}", proxy.socket.path().display());
        }
    }

    fn remove_all_proxies(&mut self, registry: &Registry) {
        let paths: Vec<String> = self.proxies.keys().cloned().collect();
        for path in paths {
            self.remove_proxy(registry, &path);
        }
    }

    fn check_session(&mut self, registry: &Registry, now: Instant) {
        match &self.session {
            Session::Connecting { since, .. } if now.duration_since(*since) >= CONNECT_TIMEOUT => {
                let message = format!("{}: connection timed out", self.config.server.authority());
                self.session_failed(registry, message);
            }
            Session::Watching { last_heard, .. } if now.duration_since(*last_heard) >= SILENCE => {
                let message =
                    format!("{}: silent for {} s, session lost", self.config.server.authority(), SILENCE.as_secs());
                self.session_failed(registry, message);
            }
            Session::Watching { last_heard, .. } => self.timers.at(*last_heard + SILENCE, TIMER_SESSION),
            Session::Connecting { since, .. } => self.timers.at(*since + CONNECT_TIMEOUT, TIMER_SESSION),
            Session::Idle { .. } => {}
        }
    }

    /// The session is gone: its proxies go, and a retry is scheduled.
    fn session_failed(&mut self, registry: &Registry, message: String) {
        let previous = std::mem::replace(&mut self.session, Session::Idle { retry_at: Instant::now() + self.backoff });
        match previous {
            Session::Connecting { mut tcp, .. } | Session::Watching { mut tcp, .. } => {
                let _ = registry.deregister(&mut tcp);
            }
            Session::Idle { .. } => {}
        }
        if self.synced || !self.proxies.is_empty() {
            log::warn!("{message}; removing its {} services, retrying in {:?}", self.proxies.len(), self.backoff);
        } else {
            log::info!("{message}; retrying in {:?}", self.backoff);
        }
        self.remove_all_proxies(registry);
        self.synced = false;
        self.events.push(SessionEvent::Lost(message));
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Takes every pending client of a proxy and starts its CONNECT.
    fn accept(&mut self, registry: &Registry, wire: &str) {
        let address = match &self.session {
            Session::Watching { address, .. } => *address,
            _ => return,
        };
        loop {
            let Some(proxy) = self.proxies.get(wire) else {
                return;
            };
            let client = match proxy.socket.listener().accept() {
                Ok((client, _)) => client,
                Err(error) if would_block(&error) => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    // Out of descriptors and the like: the client waits in
                    // the backlog until a link closes.
                    log::warn!("cannot accept on {}: {error}", proxy.socket.path().display());
                    return;
                }
            };
            let tcp = match TcpStream::connect(address) {
                Ok(tcp) => tcp,
                Err(error) => {
                    log::warn!("cannot reach {address}: {error}");
                    continue;
                }
            };
            if client.set_nonblocking(true).is_err() {
                continue;
            }
            let id = LINK_BASE + self.next_link * 2;
            self.next_link += 1;
            let mut link = Link {
                client: UnixStream::from_std(client),
                tcp,
                path: wire.to_string(),
                state: LinkState::Connecting,
                since: Instant::now(),
            };
            if registry.register(&mut link.tcp, self.token(id), Interest::READABLE | Interest::WRITABLE).is_err() {
                continue;
            }
            self.links.insert(id, link);
            self.timers.after(CONNECT_TIMEOUT, id);
        }
    }

    fn close_link(&mut self, registry: &Registry, id: usize) {
        if let Some(mut link) = self.links.remove(&id) {
            let _ = registry.deregister(&mut link.tcp);
            if let LinkState::Relaying(relay) = link.state {
                drop(relay);
                let _ = registry.deregister(&mut link.client);
            }
        }
    }

    fn link_ready(&mut self, registry: &Registry, id: usize, side: usize, readable: bool, writable: bool) {
        let token = self.token(id + 1);
        let Some(link) = self.links.get_mut(&id) else {
            return;
        };
        let result = advance_link(link, registry, token, side, readable, writable);
        match result {
            Ok(true) => {}
            Ok(false) => self.close_link(registry, id),
            Err(error) => {
                log::debug!("{}: {error}", self.links.get(&id).map(|l| l.path.as_str()).unwrap_or(""));
                self.close_link(registry, id);
            }
        }
    }

    /// Everything this importer made is removed (also on drop).
    pub fn shutdown(&mut self, registry: &Registry) {
        self.remove_all_proxies(registry);
        let links: Vec<usize> = self.links.keys().copied().collect();
        for id in links {
            self.close_link(registry, id);
        }
    }
}

/// One step of a proxied connection; false when it is over.
fn advance_link(
    link: &mut Link,
    registry: &Registry,
    client_token: Token,
    side: usize,
    readable: bool,
    writable: bool,
) -> io::Result<bool> {
    loop {
        match &mut link.state {
            LinkState::Connecting => {
                if let Some(error) = link.tcp.take_error()? {
                    return Err(error);
                }
                match link.tcp.peer_addr() {
                    Ok(_) => {}
                    Err(error) if error.kind() == io::ErrorKind::NotConnected => return Ok(true),
                    Err(error) => return Err(error),
                }
                let _ = crate::net::tune_tcp(link.tcp.as_raw_fd());
                link.tcp.write_all(Request::Connect(link.path.clone()).to_line().as_bytes())?;
                link.state = LinkState::ReadingStatus;
            }
            LinkState::ReadingStatus => {
                // Peek, so the service's first bytes after the status
                // line stay in the socket for the relay.
                let mut peeked = [0u8; sep::MAX_REQUEST_LINE];
                let available = match link.tcp.peek(&mut peeked) {
                    Ok(0) => return Ok(false),
                    Ok(count) => count,
                    Err(error) if would_block(&error) => return Ok(true),
                    Err(error) => return Err(error),
                };
                let Some(end) = peeked[..available].iter().position(|&b| b == b'\n') else {
                    return if available >= sep::MAX_REQUEST_LINE { Ok(false) } else { Ok(true) };
                };
                let mut line = vec![0u8; end + 1];
                link.tcp.read_exact(&mut line)?;
                let status = StatusLine::parse(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if !status.status.is_success() {
                    log::info!("CONNECT {}: {}", link.path, status.to_line().trim_end());
                    return Ok(false);
                }
                registry.register(&mut link.client, client_token, Interest::READABLE | Interest::WRITABLE)?;
                link.state = LinkState::Relaying(Relay::between(link.client.as_raw_fd(), link.tcp.as_raw_fd()));
            }
            LinkState::Relaying(relay) => {
                let fd = if side == 0 { link.tcp.as_raw_fd() } else { link.client.as_raw_fd() };
                relay.set_ready(fd, readable, writable);
                relay.pump()?;
                return Ok(!relay.is_done());
            }
        }
    }
}
