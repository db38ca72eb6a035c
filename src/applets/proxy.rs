//! dipus-local-proxy, dipus-export-proxy — put an existing socket in the tree.
//!
//! Usage: dipus-local-proxy [--mode MODE] [--group GROUP] SOCKET NAME/PROTOCOL
//!        dipus-export-proxy [--mode MODE] [--group GROUP] SOCKET NAME/PROTOCOL
//!
//! Creates the service `NAME/PROTOCOL` (in `local/`, or in `exported/` to
//! offer it to the LAN) and relays every connection to it to the listening
//! UNIX socket SOCKET, which may live anywhere (a database's socket in
//! /run, say). One event loop, the shared relay, no process per
//! connection. The service behind SOCKET sees this proxy as its peer, with
//! the proxy's credentials; the original socket's own permissions are not
//! touched, which is the point: the proxy's socket mode (`--mode`) decides
//! who may use the service through the tree. Runs until SIGTERM, SIGINT or
//! SIGHUP, then removes its socket.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use argh::FromArgs;
use mio::net::UnixStream;
use mio::{Events, Interest, Poll, Registry, Token};
use nix::sys::signal::Signal;

use crate::error::Error;
use crate::event_loop;
use crate::name::{Scope, ServiceSpec};
use crate::net::{BusyWait, DescriptorReserve};
use crate::relay::Relay;
use crate::signals::SignalPipe;
use crate::tree::{ServiceSocket, Tree};

#[derive(FromArgs)]
#[argh(help_triggers("--help"))]
/// Serve the listening UNIX socket SOCKET as the service NAME/PROTOCOL.
struct Args {
    /// mode of the service socket, octal (default: 0666 for export-proxy, from the umask for local-proxy)
    #[argh(option)]
    mode: Option<String>,
    /// group of the service socket, a name or number
    #[argh(option)]
    group: Option<String>,
    /// the socket to relay to
    #[argh(positional)]
    socket: PathBuf,
    /// NAME/PROTOCOL, e.g. postgres/sql
    #[argh(positional)]
    service: String,
}

pub fn local_main(name: &str, args: &[&str]) -> Result<(), Error> {
    serve(name, args, Scope::Local)
}

pub fn export_main(name: &str, args: &[&str]) -> Result<(), Error> {
    serve(name, args, Scope::Exported)
}

const SIGNALS: Token = event_loop::token(0, 0);
const LISTENER: Token = event_loop::token(0, 1);
const LINK_BASE: usize = 16;

/// One relayed connection: the client and the target.
struct Link {
    client: UnixStream,
    target: UnixStream,
    relay: Relay,
}

/// The connections of the proxy, and the one client waiting for room in
/// the target's full backlog: while it waits, no other client is taken,
/// so the rest wait in the proxy's own backlog, in order, as they would
/// have waited in the target's.
struct Links {
    links: HashMap<usize, Link>,
    next: usize,
    reserve: DescriptorReserve,
    waiting: Option<(std::os::unix::net::UnixStream, BusyWait, Instant)>,
}

fn serve(name: &str, args: &[&str], scope: Scope) -> Result<(), Error> {
    let args: Args = crate::applets::parse_args(name, args);
    let spec = ServiceSpec::parse(&args.service)?;
    crate::name::check_socket_path(&args.socket)?;
    if !args.socket.is_absolute() {
        return Err(Error::Usage(format!("{}: give the socket's absolute path", args.socket.display())));
    }
    let mode = args.mode.as_deref().or(crate::applets::pipe::default_mode(&scope));
    let options = crate::applets::pipe::socket_options(mode, args.group.as_deref(), None)?;
    let host = crate::applets::host_name()?;
    let tree = Tree::from_env()?;
    crate::net::raise_fd_limit();
    let signals = SignalPipe::new(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP])
        .map_err(|e| Error::io("cannot set up signal handling", e))?;
    let socket = ServiceSocket::bind(&tree, &scope, &spec.name, &host, &spec.protocol, &options)?;
    log::info!("{} → {}", socket.path().display(), args.socket.display());
    run(&socket, &args.socket, &signals).map_err(|e| Error::io(format!("{} failed", socket.path().display()), e))
}

fn run(socket: &ServiceSocket, target: &Path, signals: &SignalPipe) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let registry = poll.registry().try_clone()?;
    registry.register(&mut mio::unix::SourceFd(&signals.fd()), SIGNALS, Interest::READABLE)?;
    registry.register(&mut mio::unix::SourceFd(&socket.listener().as_raw_fd()), LISTENER, Interest::READABLE)?;
    let mut all = Links { links: HashMap::new(), next: 0, reserve: DescriptorReserve::new(), waiting: None };
    let mut events = Events::with_capacity(1024);
    loop {
        let timeout = all.waiting.as_ref().map(|(_, _, when)| when.saturating_duration_since(Instant::now()));
        crate::event_loop::wait(&mut poll, &mut events, timeout)?;
        for event in events.iter() {
            match event.token() {
                SIGNALS => {
                    if !signals.drain().is_empty() {
                        return Ok(());
                    }
                }
                LISTENER => all.accept(socket, target, &registry),
                token => all.relay_event(&registry, token, event),
            }
        }
        if all.waiting.as_ref().is_some_and(|(_, _, when)| *when <= Instant::now()) {
            let (client, wait, _) = all.waiting.take().expect("checked");
            all.connect(client, target, &registry, wait);
            all.accept(socket, target, &registry);
        }
    }
}

impl Links {
    fn relay_event(&mut self, registry: &Registry, token: Token, event: &mio::event::Event) {
        let id = event_loop::id(token) - LINK_BASE;
        let link_id = id / 2;
        let Some(link) = self.links.get_mut(&link_id) else {
            return;
        };
        let fd = if id % 2 == 0 { link.client.as_raw_fd() } else { link.target.as_raw_fd() };
        let (readable, writable) = event_loop::readiness(event);
        link.relay.set_ready(fd, readable, writable);
        if event_loop::read_closed(event) {
            link.relay.set_read_closed(fd);
        }
        let done = match link.relay.pump() {
            Ok(()) => link.relay.is_done(),
            Err(error) => {
                log::debug!("relay failed: {error}");
                true
            }
        };
        if done {
            if let Some(mut link) = self.links.remove(&link_id) {
                let _ = registry.deregister(&mut link.client);
                let _ = registry.deregister(&mut link.target);
            }
        }
    }

    /// Takes every waiting client and connects each to the target, until
    /// one has to wait for room there.
    fn accept(&mut self, socket: &ServiceSocket, target: &Path, registry: &Registry) {
        while self.waiting.is_none() {
            let client = match socket.listener().accept() {
                Ok((client, _)) => client,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) if DescriptorReserve::is_exhaustion(&error) => {
                    log::warn!("out of descriptors: refusing a client");
                    if !self.reserve.refuse_one(|| socket.listener().accept().is_ok()) {
                        return;
                    }
                    continue;
                }
                Err(error) => {
                    log::warn!("cannot accept: {error}");
                    return;
                }
            };
            self.connect(client, target, registry, BusyWait::new());
        }
    }

    /// Connects `client` to the target and relays between them. A
    /// nonblocking connect to a UNIX socket completes at once or fails: a
    /// full backlog (EAGAIN) makes the client wait (see [`Links`]); past
    /// the patience, or with a dead target, the client is dropped and sees
    /// EOF.
    fn connect(
        &mut self,
        client: std::os::unix::net::UnixStream,
        target: &Path,
        registry: &Registry,
        mut wait: BusyWait,
    ) {
        let target_stream = match UnixStream::connect(target) {
            Ok(stream) => stream,
            Err(error) if error.raw_os_error() == Some(libc::EAGAIN) => {
                match wait.next_try() {
                    Some(when) => self.waiting = Some((client, wait, when)),
                    None => log::warn!(
                        "{} stayed busy (its backlog full) for {} s: closing a client",
                        target.display(),
                        BusyWait::PATIENCE.as_secs()
                    ),
                }
                return;
            }
            Err(error) => {
                log::warn!("cannot connect to {}: {error}", target.display());
                return;
            }
        };
        if client.set_nonblocking(true).is_err() {
            return;
        }
        let mut client = UnixStream::from_std(client);
        let mut target_stream = target_stream;
        let id = self.next;
        self.next += 1;
        let both = Interest::READABLE | Interest::WRITABLE;
        if registry.register(&mut client, event_loop::token(0, LINK_BASE + 2 * id), both).is_err()
            || registry.register(&mut target_stream, event_loop::token(0, LINK_BASE + 2 * id + 1), both).is_err()
        {
            return;
        }
        let mut relay = Relay::between(client.as_raw_fd(), target_stream.as_raw_fd());
        if relay.pump().is_err() {
            return;
        }
        self.links.insert(id, Link { client, target: target_stream, relay });
    }
}
