//! dipusd — everything a host needs, in one process and one event loop.
//!
//! Usage: dipusd [--port PORT] [--bind ADDR]… [--allow CIDR]… [--max-conns N]
//!               [--ttl SECONDS] [--host URI]… [--hosts FILE]
//!               [--services FILE] [--mode MODE] [--group GROUP] [--owner USER]
//!               [--pidfile FILE] [--no-discovery]
//!
//! Runs, in one mio loop: the exporter (SEP/1 on TCP port 7347), the
//! advertiser and discoverer (UDP broadcast on port 7347), an importer into
//! `imported/` for every exporter discovered and for every `--host` (and
//! every `sep://` URI in the `--hosts` file, one per line), the dead-socket
//! reaper, and the default services of the services file
//! (`/etc/dipus/services` unless `--services`; see `services`).
//!
//! Imports of discovered hosts vanish when the host says BYE or its
//! announcements expire (`--ttl`, default 15 s) and come back when it
//! returns. SIGHUP reloads the services file: added services start, removed
//! ones stop, unchanged ones keep running with their connections. SIGTERM
//! or SIGINT: BYE, then every socket dipusd created is removed and it exits
//! 0. It stays in the foreground and logs to stderr (`RUST_LOG`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use argh::FromArgs;
use mio::{Events, Interest, Poll, Registry};
use nix::sys::signal::Signal;

use crate::allow::AllowList;
use crate::applets::pipe::{reap_children, socket_options, PipeServer};
use crate::discovery::{Announcement, Discovery, PeerEvent};
use crate::error::Error;
use crate::event_loop::{self, earliest};
use crate::exporter::{Exporter, ExporterConfig};
use crate::import::Dialer;
use crate::import_set::ImportSet;
use crate::name::Scope;
use crate::netlink::InterfaceEvents;
use crate::reaper::Reaper;
use crate::selector::{Remote, Target};
use crate::sep_client::Server;
use crate::services::{self, ServiceLine};
use crate::signals::SignalPipe;
use crate::tree::{SocketOptions, Tree};

#[derive(FromArgs)]
#[argh(help_triggers("--help"))]
/// Run exporter, discovery, importers, reaper and default services in one process.
struct Args {
    /// TCP port of the exporter (default: $DIPUS_PORT or 7347)
    #[argh(option)]
    port: Option<u16>,
    /// address the exporter listens on (repeatable; default 0.0.0.0)
    #[argh(option)]
    bind: Vec<IpAddr>,
    /// network allowed to connect, CIDR (repeatable; default: the host's own networks and loopback)
    #[argh(option)]
    allow: Vec<String>,
    /// most exporter connections at once (default 1024)
    #[argh(option, default = "1024")]
    max_conns: usize,
    /// seconds an announcement is valid (default 15)
    #[argh(option, default = "crate::datagram::DEFAULT_TTL")]
    ttl: u32,
    /// also import this sep:// URI (repeatable)
    #[argh(option)]
    host: Vec<String>,
    /// file of sep:// URIs to import, one per line
    #[argh(option)]
    hosts: Option<PathBuf>,
    /// services file (default /etc/dipus/services, if it exists)
    #[argh(option)]
    services: Option<PathBuf>,
    /// mode of imported sockets, octal (default 0666)
    #[argh(option)]
    mode: Option<String>,
    /// group of imported sockets
    #[argh(option)]
    group: Option<String>,
    /// owner of imported sockets
    #[argh(option)]
    owner: Option<String>,
    /// write dipusd's pid to FILE
    #[argh(option)]
    pidfile: Option<PathBuf>,
    /// neither advertise nor discover (explicit --host imports only)
    #[argh(switch)]
    no_discovery: bool,
}

const DEFAULT_SERVICES: &str = "/etc/dipus/services";

/// The default services' sockets: open to every local user.
fn service_options() -> SocketOptions {
    SocketOptions { mode: Some(0o666), ..SocketOptions::default() }
}

// Token components.
const SIGNALS: u8 = 0;
const EXPORTER: u8 = crate::exporter::COMPONENT;
const DISCOVERY: u8 = 2;
const REAPER: u8 = 3;
const SERVICES: u8 = 4;
const INTERFACES: u8 = 5;
const FIRST_IMPORTER: u8 = 16;

/// How often interfaces are re-read where netlink is missing.
const INTERFACE_POLL: Duration = Duration::from_secs(30);

struct Daemon {
    tree: Tree,
    host: String,
    exporter: Exporter,
    discovery: Option<Discovery>,
    reaper: Reaper,
    interfaces: Option<InterfaceEvents>,
    next_interface_poll: Instant,
    services_path: PathBuf,
    services_optional: bool,
    services: Vec<(ServiceLine, PipeServer)>,
    /// Imports by key: the discovered host name, or the configured URI.
    imports: ImportSet,
}

pub fn main(name: &str, args: &[&str]) -> Result<(), Error> {
    let args: Args = crate::applets::parse_args(name, args);
    if !(1..=crate::datagram::MAX_TTL).contains(&args.ttl) {
        return Err(Error::Usage(format!("--ttl {}: expected 1 to {}", args.ttl, crate::datagram::MAX_TTL)));
    }
    let port = crate::applets::exporter::port(args.port)?;
    let discovery_port = if args.no_discovery { None } else { Some(crate::applets::discovery_port()?) };
    let max_connections = crate::applets::exporter::max_connections(args.max_conns)?;
    let host = crate::applets::host_name()?;
    let allow = AllowList::from_args(&args.allow).map_err(|e| Error::Usage(e.to_string()))?;
    let mut import_options =
        socket_options(args.mode.as_deref().or(Some("0666")), args.group.as_deref(), args.owner.as_deref())?;
    import_options.mode.get_or_insert(0o666);
    let mut configured: Vec<String> = args.host.clone();
    if let Some(path) = &args.hosts {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Open { path: path.clone(), source })?;
        configured
            .extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
    }
    let mut servers = Vec::new();
    for uri in &configured {
        let target = Target::parse(uri)?;
        let selector = crate::transport::selector_argument(&target.selector);
        match target.remote {
            Some(Remote::Sep { host, port }) => servers.push((uri.clone(), Server::new(&host, port), selector)),
            _ => return Err(Error::Usage(format!("{uri}: dipusd imports sep://HOST[:PORT] URIs"))),
        }
    }
    let (services_path, services_optional) = match &args.services {
        Some(path) => (path.clone(), false),
        None => (PathBuf::from(DEFAULT_SERVICES), true),
    };
    let service_lines = services::load(&services_path, services_optional).map_err(|e| Error::Failed(e.to_string()))?;

    crate::net::raise_fd_limit();
    let tree = Tree::from_env()?;
    tree.check_room(&Scope::Imported)?;
    tree.ensure_scope(&Scope::Imported)?;
    let signals = SignalPipe::new(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGCHLD])
        .map_err(|e| Error::io("cannot set up signal handling", e))?;
    let binds = if args.bind.is_empty() { vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)] } else { args.bind.clone() };
    let exporter = Exporter::new(
        tree.clone(),
        ExporterConfig {
            listen: binds.into_iter().map(|ip| SocketAddr::new(ip, port)).collect(),
            allow: allow.clone(),
            max_connections,
        },
    )
    .map_err(|e| Error::io("cannot start the exporter", e))?;
    let exported_port = exporter.local_addresses().first().map(|a| a.port()).unwrap_or(port);
    let discovery = match discovery_port {
        None => None,
        Some(discovery_port) => {
            let announcement = Announcement { host: host.clone(), port: exported_port, ttl: args.ttl };
            let mut discovery = Discovery::new(&host, Some(announcement), discovery_port)
                .map_err(|e| Error::io("cannot start discovery", e))?;
            discovery.hear_only(allow);
            Some(discovery)
        }
    };
    let reaper = Reaper::new(tree.clone(), REAPER).map_err(|e| Error::io("cannot start the reaper", e))?;
    let interfaces = InterfaceEvents::open().map_err(|e| log::info!("no interface events ({e}); polling")).ok();
    let imports = ImportSet::new(tree.clone(), Scope::Imported, import_options, Some(host.clone()), FIRST_IMPORTER);
    let mut daemon = Daemon {
        tree,
        host,
        exporter,
        discovery,
        reaper,
        interfaces,
        next_interface_poll: Instant::now() + INTERFACE_POLL,
        services_path,
        services_optional,
        services: Vec::new(),
        imports,
    };
    let mut poll = Poll::new().map_err(|e| Error::io("cannot create an event loop", e))?;
    daemon.register(poll.registry(), &signals).map_err(|e| Error::io("cannot create an event loop", e))?;
    daemon.apply_services(poll.registry(), service_lines);
    for (uri, server, selector) in servers {
        daemon.imports.start_or_wait(poll.registry(), uri, Dialer::Sep(server), selector);
    }
    if let Some(path) = &args.pidfile {
        crate::pidfile::write(path, std::process::id())?;
    }
    log::info!("dipusd for {} on port {exported_port}", daemon.host);
    let result = daemon.run(&mut poll, &signals);
    daemon.stop(poll.registry());
    if let Some(path) = &args.pidfile {
        crate::pidfile::remove_if_ours(path);
    }
    result.map_err(|e| Error::io("event loop failed", e))
}

impl Daemon {
    fn register(&mut self, registry: &Registry, signals: &SignalPipe) -> io::Result<()> {
        registry.register(
            &mut mio::unix::SourceFd(&signals.fd()),
            event_loop::token(SIGNALS, 0),
            Interest::READABLE,
        )?;
        self.exporter.register(registry)?;
        self.reaper.register(registry)?;
        if let Some(discovery) = &mut self.discovery {
            for (index, fd) in discovery.fds().iter().enumerate() {
                registry.register(
                    &mut mio::unix::SourceFd(fd),
                    event_loop::token(DISCOVERY, index),
                    Interest::READABLE,
                )?;
            }
            discovery.announce();
            discovery.query();
        }
        if let Some(interfaces) = &self.interfaces {
            registry.register(
                &mut mio::unix::SourceFd(&interfaces.fd()),
                event_loop::token(INTERFACES, 0),
                Interest::READABLE,
            )?;
        }
        Ok(())
    }

    fn timeout(&self) -> Option<Duration> {
        let mut timeout = earliest(self.exporter.timeout(), self.reaper.timeout());
        if let Some(discovery) = &self.discovery {
            timeout = earliest(timeout, discovery.timeout());
        }
        timeout = earliest(timeout, self.imports.timeout());
        if self.interfaces.is_none() {
            timeout = earliest(timeout, Some(self.next_interface_poll.saturating_duration_since(Instant::now())));
        }
        timeout
    }

    fn run(&mut self, poll: &mut Poll, signals: &SignalPipe) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            crate::event_loop::wait(poll, &mut events, self.timeout())?;
            let registry = poll.registry();
            for event in events.iter() {
                let token = event.token();
                match event_loop::component(token) {
                    SIGNALS => {
                        for signal in signals.drain() {
                            match signal {
                                Signal::SIGCHLD => self.children_exited(),
                                Signal::SIGHUP => self.reload(registry),
                                _ => {
                                    log::info!("{signal}: stopping");
                                    return Ok(());
                                }
                            }
                        }
                    }
                    EXPORTER => {
                        self.exporter.handle_event(registry, event);
                        if self.exporter.take_root_renewed() {
                            self.remake_tree(registry);
                        }
                    }
                    DISCOVERY => {
                        if let Some(discovery) = &mut self.discovery {
                            discovery.handle_readable();
                        }
                    }
                    REAPER => self.reaper.handle_event(registry, event),
                    SERVICES => {
                        if let Some((_, server)) = self.services.get_mut(event_loop::id(token)) {
                            if let Err(error) = server.accept_ready() {
                                log::warn!("{}: {error}", server.socket.path().display());
                            }
                        }
                    }
                    INTERFACES => {
                        if self.interfaces.as_ref().is_some_and(InterfaceEvents::drain) {
                            self.interfaces_changed();
                        }
                    }
                    _ => self.imports.handle_event(registry, event),
                }
            }
            self.handle_timers(registry);
        }
    }

    fn handle_timers(&mut self, registry: &Registry) {
        self.exporter.handle_timers(registry);
        self.reaper.handle_timers(registry);
        self.imports.handle_timers(registry);
        if self.interfaces.is_none() && Instant::now() >= self.next_interface_poll {
            self.next_interface_poll = Instant::now() + INTERFACE_POLL;
            self.interfaces_changed();
        }
        let peer_events = match &mut self.discovery {
            Some(discovery) => {
                discovery.handle_timers();
                discovery.take_events()
            }
            None => Vec::new(),
        };
        for event in peer_events {
            match event {
                PeerEvent::Joined(peer) => {
                    // Only a peer we would serve may make us connect out:
                    // a datagram's source is all that names the address.
                    if !self.exporter.allows(peer.address) {
                        log::info!("{}: {} is outside the allowed networks; not importing", peer.host, peer.address);
                        continue;
                    }
                    self.stop_import(registry, &peer.host);
                    let server = Server::new(&peer.address.to_string(), Some(peer.port));
                    self.imports.start_or_wait(registry, peer.host, Dialer::Sep(server), None);
                }
                // A host heard again may have restarted: an import waiting
                // out its backoff tries at once (one the host refused keeps
                // waiting: a refusal does not change with an announcement).
                PeerEvent::Heard { host } => self.imports.retry_now(&host),
                PeerEvent::Left { host, why } => {
                    log::info!("{host}: {why}; removing its imports");
                    self.stop_import(registry, &host);
                }
            }
        }
    }

    fn interfaces_changed(&mut self) {
        log::debug!("interfaces changed");
        self.exporter.interfaces_changed();
        if let Some(discovery) = &mut self.discovery {
            discovery.interfaces_changed();
            discovery.query();
        }
    }

    fn stop_import(&mut self, registry: &Registry, key: &str) {
        self.imports.stop(registry, key);
    }

    /// Starts the services in `lines` that are not running, stops the ones
    /// running that are not in `lines`, and leaves the rest alone.
    fn apply_services(&mut self, registry: &Registry, lines: Vec<ServiceLine>) {
        let mut kept = Vec::new();
        for (mut line, mut server) in std::mem::take(&mut self.services) {
            // A new cap alone keeps the socket and the children it has.
            if let Some(wanted) = lines.iter().find(|wanted| wanted.same_service(&line)) {
                line.children = wanted.children;
                server.set_limit(Some(line.children));
                kept.push((line, server));
            } else {
                log::info!("stopping {} ({})", line.spec, server.socket.path().display());
                let _ = registry.deregister(&mut mio::unix::SourceFd(&server.listener_fd()));
            }
        }
        self.services = kept;
        for line in lines {
            if self.services.iter().any(|(running, _)| *running == line) {
                continue;
            }
            match PipeServer::new(
                &self.tree,
                line.scope.clone(),
                &line.spec,
                &self.host,
                &service_options(),
                line.command.clone(),
                Some(line.children),
            ) {
                Ok(server) => {
                    log::info!("serving {} at {}", line.spec, server.socket.path().display());
                    self.services.push((line, server));
                }
                Err(error) => log::warn!("cannot start {}: {error}", line.spec),
            }
        }
        self.register_services(registry);
    }

    /// Tokens are indexes: every listener is registered afresh.
    fn register_services(&mut self, registry: &Registry) {
        for (index, (_, server)) in self.services.iter_mut().enumerate() {
            let fd = server.listener_fd();
            let token = event_loop::token(SERVICES, index);
            let source = &mut mio::unix::SourceFd(&fd);
            if registry.reregister(source, token, Interest::READABLE).is_err() {
                let _ = registry.register(source, token, Interest::READABLE);
            }
            let _ = server.accept_ready();
        }
    }

    /// The root was removed and the exporter made it again (it logged
    /// that): what dipusd had in the old tree is made again in the new
    /// one, its `imported/` scope, its default services (their running
    /// children kept) and its imports.
    fn remake_tree(&mut self, registry: &Registry) {
        if let Err(error) = self.tree.ensure_scope(&Scope::Imported) {
            log::warn!("cannot make the imported scope again: {error}");
        }
        for (line, server) in &mut self.services {
            let _ = registry.deregister(&mut mio::unix::SourceFd(&server.listener_fd()));
            match server.rebind(&self.tree, line.scope.clone(), &line.spec, &self.host, &service_options()) {
                Ok(()) => log::info!("serving {} again at {}", line.spec, server.socket.path().display()),
                // Its old listener stays registered, unreachable, until a
                // SIGHUP or a root made again once more tries again.
                Err(error) => log::warn!("cannot serve {} again in the new tree: {error}", line.spec),
            }
        }
        self.register_services(registry);
        self.imports.restart_all(registry);
    }

    fn reload(&mut self, registry: &Registry) {
        match services::load(&self.services_path, self.services_optional) {
            Ok(lines) => {
                log::info!("SIGHUP: reloading {}", self.services_path.display());
                self.apply_services(registry, lines);
            }
            Err(error) => log::warn!("SIGHUP: {error}; keeping the services as they are"),
        }
    }

    fn children_exited(&mut self) {
        for pid in reap_children() {
            for (_, server) in &mut self.services {
                if server.child_exited(pid) {
                    // A freed place lets in a connection the cap kept
                    // waiting: its listener will not report it again.
                    if let Err(error) = server.accept_ready() {
                        log::warn!("{}: {error}", server.socket.path().display());
                    }
                    break;
                }
            }
        }
    }

    /// BYE, then everything this daemon created goes.
    fn stop(&mut self, registry: &Registry) {
        if let Some(discovery) = &mut self.discovery {
            discovery.bye();
        }
        self.imports.stop_all(registry);
        self.services.clear();
    }
}
