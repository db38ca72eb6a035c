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
use std::path::PathBuf;

use argh::FromArgs;
use mio::net::UnixStream;
use mio::{Events, Interest, Poll, Registry, Token};
use nix::sys::signal::Signal;

use crate::error::Error;
use crate::event_loop;
use crate::name::{Scope, ServiceSpec};
use crate::net::DescriptorReserve;
use crate::relay::Relay;
use crate::signals::SignalPipe;
use crate::tree::{ServiceSocket, Tree};

#[derive(FromArgs)]
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

fn run(socket: &ServiceSocket, target: &std::path::Path, signals: &SignalPipe) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let registry = poll.registry().try_clone()?;
    registry.register(&mut mio::unix::SourceFd(&signals.fd()), SIGNALS, Interest::READABLE)?;
    registry.register(&mut mio::unix::SourceFd(&socket.listener().as_raw_fd()), LISTENER, Interest::READABLE)?;
    let mut links: HashMap<usize, Link> = HashMap::new();
    let mut next = 0usize;
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
                LISTENER => accept(socket, target, &registry, &mut links, &mut next, &mut reserve),
                token => {
                    let id = event_loop::id(token) - LINK_BASE;
                    let link_id = id / 2;
                    let Some(link) = links.get_mut(&link_id) else {
                        continue;
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
                        if let Some(mut link) = links.remove(&link_id) {
                            let _ = registry.deregister(&mut link.client);
                            let _ = registry.deregister(&mut link.target);
                        }
                    }
                }
            }
        }
    }
}

/// Takes every waiting client and connects each to the target.
fn accept(
    socket: &ServiceSocket,
    target: &std::path::Path,
    registry: &Registry,
    links: &mut HashMap<usize, Link>,
    next: &mut usize,
    reserve: &mut DescriptorReserve,
) {
    loop {
        let client = match socket.listener().accept() {
            Ok((client, _)) => client,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) if DescriptorReserve::is_exhaustion(&error) => {
                log::warn!("out of descriptors: refusing a client");
                if !reserve.refuse_one(|| socket.listener().accept().is_ok()) {
                    return;
                }
                continue;
            }
            Err(error) => {
                log::warn!("cannot accept: {error}");
                return;
            }
        };
        // A nonblocking connect to a UNIX socket completes at once or
        // fails: a full backlog (EAGAIN) or a dead target drops the client,
        // who sees EOF, rather than stall the loop.
        let target = match UnixStream::connect(target) {
            Ok(stream) => stream,
            Err(error) => {
                log::warn!("cannot connect to {}: {error}", target.display());
                continue;
            }
        };
        if client.set_nonblocking(true).is_err() {
            continue;
        }
        let mut client = UnixStream::from_std(client);
        let mut target = target;
        let id = *next;
        *next += 1;
        let both = Interest::READABLE | Interest::WRITABLE;
        if registry.register(&mut client, event_loop::token(0, LINK_BASE + 2 * id), both).is_err()
            || registry.register(&mut target, event_loop::token(0, LINK_BASE + 2 * id + 1), both).is_err()
        {
            continue;
        }
        let mut relay = Relay::between(client.as_raw_fd(), target.as_raw_fd());
        if relay.pump().is_err() {
            continue;
        }
        links.insert(id, Link { client, target, relay });
    }
}
