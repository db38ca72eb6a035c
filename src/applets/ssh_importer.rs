//! dipus-ssh-importer — import over ssh from several hosts at once.
//!
//! Usage: dipus-ssh-importer [--discover] [--mode MODE] [--group GROUP] [HOST…]
//!
//! Imports the `local/` and `exported/` services of each HOST (`HOST`,
//! `USER@HOST`, or an `ssh://` URI) over ssh, as `dipus-import ssh://…`
//! does, into the user's private scope `<root>/<user>/` (0700), proxy
//! sockets mode 0600 unless `--mode`. With `--discover` it also imports
//! from every exporter the LAN discovery finds (by its address, as the
//! current user), and drops those imports when the host says bye or its
//! announcements expire. Runs in the foreground until SIGTERM, SIGINT or
//! SIGHUP, then removes every socket it made.

use std::io;

use argh::FromArgs;
use mio::{Events, Interest, Poll};
use nix::sys::signal::Signal;

use crate::discovery::{Discovery, PeerEvent};
use crate::error::Error;
use crate::event_loop::{self, earliest};
use crate::import::Dialer;
use crate::import_set::ImportSet;
use crate::selector::{Remote, Target};
use crate::signals::SignalPipe;
use crate::ssh::SshTarget;
use crate::tree::Tree;

#[derive(FromArgs)]
#[argh(help_triggers("--help"))]
/// Import over ssh from the given hosts, or from every exporter discovered.
struct Args {
    /// also import from every exporter found by LAN discovery
    #[argh(switch)]
    discover: bool,
    /// mode of the proxy sockets, octal (default 0600)
    #[argh(option)]
    mode: Option<String>,
    /// group of the proxy sockets
    #[argh(option)]
    group: Option<String>,
    /// hosts: HOST, USER@HOST or ssh://[USER@]HOST[:PORT]
    #[argh(positional, greedy)]
    hosts: Vec<String>,
}

const SIGNALS: u8 = 0;
const DISCOVERY: u8 = 1;
const FIRST_IMPORTER: u8 = 16;

/// `HOST`, `USER@HOST` or an ssh:// URI, as an ssh target.
fn parse_host(text: &str) -> Result<SshTarget, Error> {
    let uri = if text.contains("://") { text.to_string() } else { format!("ssh://{text}") };
    match Target::parse(&uri)?.remote {
        Some(Remote::Ssh { user, host, port }) => Ok(SshTarget { user, host, port }),
        _ => Err(Error::Usage(format!("{text}: expected HOST, USER@HOST or ssh://[USER@]HOST[:PORT]"))),
    }
}

pub fn main(name: &str, args: &[&str]) -> Result<(), Error> {
    let args: Args = crate::applets::parse_args(name, args);
    if args.hosts.is_empty() && !args.discover {
        return Err(Error::Usage("name at least one HOST, or --discover".into()));
    }
    let targets = args.hosts.iter().map(|host| parse_host(host)).collect::<Result<Vec<_>, _>>()?;
    let discovery_port = if args.discover { Some(crate::applets::discovery_port()?) } else { None };
    let options = crate::applets::pipe::socket_options(
        Some(args.mode.as_deref().unwrap_or("0600")),
        args.group.as_deref(),
        None,
    )?;
    crate::net::raise_fd_limit();
    let tree = Tree::from_env()?;
    let scope = Tree::own_scope();
    tree.ensure_scope(&scope)?;
    let signals = SignalPipe::new(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP])
        .map_err(|e| Error::io("cannot set up signal handling", e))?;
    let mut poll = Poll::new().map_err(|e| Error::io("cannot create an event loop", e))?;
    let loop_error = |e: io::Error| Error::io("event loop failed", e);
    poll.registry()
        .register(&mut mio::unix::SourceFd(&signals.fd()), event_loop::token(SIGNALS, 0), Interest::READABLE)
        .map_err(loop_error)?;
    let mut discovery = if let Some(discovery_port) = discovery_port {
        let discovery = Discovery::new(&crate::applets::host_name()?, None, discovery_port)
            .map_err(|e| Error::io("cannot listen for exporters", e))?;
        for (index, fd) in discovery.fds().iter().enumerate() {
            poll.registry()
                .register(&mut mio::unix::SourceFd(fd), event_loop::token(DISCOVERY, index), Interest::READABLE)
                .map_err(loop_error)?;
        }
        discovery.query();
        Some(discovery)
    } else {
        None
    };
    let mut imports = ImportSet::new(tree, scope, options, None, FIRST_IMPORTER);
    // A host named here that another importer holds is refused, as
    // dipus-import refuses it: running on without it would look like
    // success.
    for target in targets {
        if let Err(error) = imports.start(poll.registry(), target.uri(), Dialer::Ssh(target), None) {
            imports.stop_all(poll.registry());
            return Err(error.into());
        }
    }
    let result = run(&mut poll, &signals, &mut imports, discovery.as_mut());
    imports.stop_all(poll.registry());
    result.map_err(loop_error)
}

fn run(
    poll: &mut Poll,
    signals: &SignalPipe,
    imports: &mut ImportSet,
    mut discovery: Option<&mut Discovery>,
) -> io::Result<()> {
    let mut events = Events::with_capacity(1024);
    loop {
        let timeout = earliest(imports.timeout(), discovery.as_ref().and_then(|d| d.timeout()));
        crate::event_loop::wait(poll, &mut events, timeout)?;
        for event in events.iter() {
            match event_loop::component(event.token()) {
                SIGNALS => {
                    if !signals.drain().is_empty() {
                        return Ok(());
                    }
                }
                DISCOVERY => {
                    if let Some(discovery) = discovery.as_mut() {
                        discovery.handle_readable();
                    }
                }
                _ => imports.handle_event(poll.registry(), event),
            }
        }
        imports.handle_timers(poll.registry());
        if let Some(discovery) = discovery.as_mut() {
            discovery.handle_timers();
            for event in discovery.take_events() {
                match event {
                    PeerEvent::Joined(peer) => {
                        let target = SshTarget { user: None, host: peer.address.to_string(), port: None };
                        imports.stop(poll.registry(), &peer.host);
                        imports.start_or_wait(poll.registry(), peer.host, Dialer::Ssh(target), None);
                    }
                    PeerEvent::Left { host, .. } => imports.stop(poll.registry(), &host),
                    PeerEvent::Heard { host } => imports.retry_now(&host),
                }
            }
        }
    }
}
