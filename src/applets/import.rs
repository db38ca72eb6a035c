//! dipus-import — mirror a remote host's services as local sockets.
//!
//! Usage: dipus-import [-f] [--pidfile FILE] [--mode MODE] [--group GROUP]
//!                     [--owner USER] sep://HOST[:PORT][/SELECTOR]
//!        dipus-import [-f] … ssh://[USER@]HOST[:PORT][/SELECTOR]
//!
//! Creates a proxy socket for every service the remote host offers (or
//! every one SELECTOR picks), in `imported/` for `sep://` and in the user's
//! own scope `<root>/<user>/` for `ssh://`, with the same protocol path and
//! `NAME.HOST..N`, and keeps them in sync: services added or removed there
//! appear or vanish here within a second. If the exporter goes away (the
//! connection drops, or 15 s pass without its 5 s keepalive), its proxies
//! are removed and the session is retried with backoff (0.5 s doubling to
//! 30 s); they return when it is back.
//!
//! `dipus-import` returns once the first sync is done, with the services in
//! place, and goes on in the background; an exporter that cannot be reached
//! or refuses is an error (exit 74). `-f` stays in the foreground, logging
//! to stderr, for init scripts and supervisors. Stopped by SIGTERM, SIGINT
//! or SIGHUP, it removes every socket it created. Proxy sockets are mode
//! 0666 for `sep://` (the service is public on the LAN anyway) and 0600 for
//! `ssh://`; `--mode`, `--group` and `--owner` change that. Importing the
//! same host twice into one scope is refused (exit 1), and so is a sep://
//! exporter that is this very host (its services all carry our name).

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use argh::FromArgs;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;

use crate::error::Error;
use crate::event_loop;
use crate::import::{Dialer, HostLock, ImportConfig, ImportError, Importer, SessionEvent};
use crate::name::Scope;
use crate::selector::{Remote, Target};
use crate::sep_client::Server;
use crate::signals::SignalPipe;
use crate::ssh::SshTarget;
use crate::tree::Tree;

#[derive(FromArgs)]
#[argh(help_triggers("--help"))]
/// Mirror the services of sep://HOST (or ssh://[USER@]HOST) as local proxy sockets, kept in sync.
struct Args {
    /// stay in the foreground
    #[argh(switch, short = 'f')]
    foreground: bool,
    /// write the importer's pid to FILE
    #[argh(option)]
    pidfile: Option<PathBuf>,
    /// mode of the proxy sockets, octal (default 0666 for sep://, 0600 for ssh://)
    #[argh(option)]
    mode: Option<String>,
    /// group of the proxy sockets
    #[argh(option)]
    group: Option<String>,
    /// owner of the proxy sockets (root only)
    #[argh(option)]
    owner: Option<String>,
    /// sep://HOST[:PORT][/SELECTOR] or ssh://[USER@]HOST[:PORT][/SELECTOR]
    #[argh(positional)]
    uri: String,
}

/// How long the first sync may take before the import is given up.
const FIRST_SYNC: Duration = Duration::from_secs(15);
const COMPONENT: u8 = 2;
const SIGNALS: Token = event_loop::token(0, 0);

pub fn main(name: &str, args: &[&str]) -> Result<(), Error> {
    let args: Args = crate::applets::parse_args(name, args);
    let target = Target::parse(&args.uri)?;
    // LAN imports are public anyway (0666, in imported/); ssh imports are
    // the user's own (0600, in the user's 0700 scope).
    let (dialer, scope, default_mode) = match &target.remote {
        Some(Remote::Sep { host, port }) => (Dialer::Sep(Server::new(host, *port)), Scope::Imported, "0666"),
        Some(Remote::Ssh { user, host, port }) => {
            (Dialer::Ssh(SshTarget { user: user.clone(), host: host.clone(), port: *port }), Tree::own_scope(), "0600")
        }
        None => return Err(Error::Usage(format!("{}: expected sep://HOST[:PORT][/SELECTOR] or ssh://…", args.uri))),
    };
    let options = crate::applets::pipe::socket_options(
        Some(args.mode.as_deref().unwrap_or(default_mode)),
        args.group.as_deref(),
        args.owner.as_deref(),
    )?;
    let tree = Tree::from_env()?;
    tree.check_room(&scope)?;
    let directory = tree.ensure_scope(&scope)?;
    // One import in this process: its lock may wait for the resolver.
    let addresses = match &dialer {
        Dialer::Sep(server) => server.addresses().unwrap_or_default(),
        Dialer::Ssh(_) => Vec::new(),
    };
    let _lock = HostLock::acquire(&directory, &dialer, &addresses)?;
    // This host's own services are here already: a sep:// exporter that
    // offers nothing else is this host, and refused.
    let own_host = match &dialer {
        Dialer::Sep(_) => Some(crate::applets::host_name()?),
        Dialer::Ssh(_) => None,
    };
    let selector = crate::transport::selector_argument(&target.selector);
    let config = ImportConfig { dialer, selector, scope, options, own_host };
    crate::net::raise_fd_limit();
    let signals = SignalPipe::new(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP])
        .map_err(|e| Error::io("cannot set up signal handling", e))?;
    let mut poll = Poll::new().map_err(|e| Error::io("cannot create an event loop", e))?;
    poll.registry()
        .register(&mut mio::unix::SourceFd(&signals.fd()), SIGNALS, Interest::READABLE)
        .map_err(|e| Error::io("cannot create an event loop", e))?;
    let mut importer = Importer::new(tree, config, COMPONENT);
    importer.start_at(&addresses);
    importer.caller_reports_first_failure();
    let result = run(&mut poll, &mut importer, &signals, args.foreground, args.pidfile.as_deref());
    importer.shutdown(poll.registry());
    if let Some(path) = &args.pidfile {
        crate::pidfile::remove_if_ours(path);
    }
    result
}

fn run(
    poll: &mut Poll,
    importer: &mut Importer,
    signals: &SignalPipe,
    foreground: bool,
    pidfile: Option<&Path>,
) -> Result<(), Error> {
    let mut events = Events::with_capacity(1024);
    let deadline = Instant::now() + FIRST_SYNC;
    let mut first_sync_done = false;
    let loop_error = |e: io::Error| Error::io("event loop failed", e);
    loop {
        let timeout = importer.timeout();
        let timeout = if first_sync_done {
            timeout
        } else {
            event_loop::earliest(timeout, Some(deadline.saturating_duration_since(Instant::now())))
        };
        crate::event_loop::wait(poll, &mut events, timeout).map_err(loop_error)?;
        for event in events.iter() {
            if event.token() == SIGNALS {
                if !signals.drain().is_empty() {
                    log::info!("stopping: removing {} imported services", importer.proxy_count());
                    return Ok(());
                }
            } else {
                importer.handle_event(poll.registry(), event);
            }
        }
        importer.handle_timers(poll.registry());
        for event in importer.take_events() {
            match event {
                SessionEvent::Synced if !first_sync_done => {
                    first_sync_done = true;
                    if foreground {
                        if let Some(path) = pidfile {
                            crate::pidfile::write(path, std::process::id())?;
                        }
                    } else {
                        daemonize(pidfile)?;
                        // The session's ssh process was started before we
                        // let go of the caller's stdio, and holds it: a new
                        // session, started from the background, does not.
                        importer.renew_session(poll.registry());
                    }
                }
                // Its services would be mirrored back into it: no use
                // trying again, whether before the first sync or after.
                SessionEvent::ThisHost(host) => {
                    return Err(ImportError::ThisHost { uri: importer.uri(), host }.into());
                }
                SessionEvent::Lost(message) if !first_sync_done => {
                    return Err(Error::io("cannot import", io::Error::other(message)));
                }
                _ => {}
            }
        }
        if !first_sync_done && Instant::now() >= deadline {
            let message = format!("{}: no complete sync within {} s", importer.uri(), FIRST_SYNC.as_secs());
            return Err(Error::io("cannot import", io::Error::new(io::ErrorKind::TimedOut, message)));
        }
    }
}

/// Goes on in the background: the parent writes the child's pid to the
/// pidfile, so that it is there when the command returns, and exits at
/// once (without running any destructor, so the sockets stay); the child
/// leaves the terminal's session and lets go of its stdio.
fn daemonize(pidfile: Option<&Path>) -> Result<(), Error> {
    use nix::unistd::{fork, setsid, ForkResult};
    // SAFETY: single-threaded; the child only continues our own loop.
    match unsafe { fork() }.map_err(|e| Error::io("cannot go to the background", e.into()))? {
        ForkResult::Parent { child } => {
            if let Some(path) = pidfile {
                if let Err(error) = crate::pidfile::write(path, child.as_raw() as u32) {
                    // No importer without its pidfile: the parent stops
                    // it, and removes the sockets on its way out.
                    let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                    return Err(error);
                }
            }
            // SAFETY: _exit skips destructors on purpose: the child owns
            // the sockets now.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Child => {
            let _ = setsid();
            if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
                for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO] {
                    // SAFETY: dup2 onto our own standard descriptors.
                    unsafe { libc::dup2(null.as_raw_fd(), fd) };
                }
            }
            Ok(())
        }
    }
}
