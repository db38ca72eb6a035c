//! dipus-local-pipe, dipus-export-pipe — serve a stdin/stdout command.
//!
//! Usage: dipus-local-pipe [-c N] [--mode MODE] [--group GROUP] CMD NAME/PROTOCOL
//!        dipus-export-pipe [-c N] [--mode MODE] [--group GROUP] CMD NAME/PROTOCOL
//!
//! Creates the service socket `<root>/local/PROTOCOL/NAME.HOST..N` (or under
//! `exported/`, offered to the LAN by the exporter) with the first free
//! instance index N, and for each connection runs `sh -c CMD` with the
//! connection as its stdin and stdout, inetd-style: no byte passes through
//! this process. The child's stderr is ours. The child learns who called
//! from its environment, UCSPI-IPC style: `PROTO=IPC`, `IPCREMOTEEUID`,
//! `IPCREMOTEEGID`, `IPCREMOTEPID` (from SO_PEERCRED), `IPCLOCALPATH` and
//! `DIPUS_SERVICE` (the socket's path).
//!
//! `-c N` runs at most N children at once; further connections wait in the
//! listen backlog. The socket is removed on SIGTERM, SIGINT and SIGHUP and
//! when the server fails, but only if it is still ours.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

use argh::FromArgs;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;
use nix::sys::socket::{getsockopt, sockopt};

use crate::error::Error;
use crate::name::{Scope, ServiceSpec};
use crate::signals::SignalPipe;
use crate::tree::{ServiceSocket, SocketOptions, Tree};

#[derive(FromArgs)]
#[argh(help_triggers("--help"))]
/// Serve CMD (run as `sh -c CMD` per connection, the connection as its stdin and stdout) as the service NAME/PROTOCOL.
struct Args {
    /// run at most N children at once (others wait in the backlog)
    #[argh(option, short = 'c')]
    concurrency: Option<usize>,
    /// mode of the socket file, octal (default: 0666 for export-pipe, from the umask for local-pipe)
    #[argh(option)]
    mode: Option<String>,
    /// group of the socket file, a name or number
    #[argh(option)]
    group: Option<String>,
    /// the command, run with sh -c
    #[argh(positional)]
    command: String,
    /// NAME/PROTOCOL, e.g. sorter/text/plain
    #[argh(positional)]
    service: String,
}

pub fn local_main(name: &str, args: &[&str]) -> Result<(), Error> {
    serve(name, args, Scope::Local)
}

pub fn export_main(name: &str, args: &[&str]) -> Result<(), Error> {
    serve(name, args, Scope::Exported)
}

/// An exported service is there for the LAN: the exporter only offers
/// sockets "other" may connect to, so exported services default to 0666.
/// Local ones take the umask.
pub fn default_mode(scope: &Scope) -> Option<&'static str> {
    (*scope == Scope::Exported).then_some("0666")
}

/// `--mode` and `--group` as socket options.
pub fn socket_options(mode: Option<&str>, group: Option<&str>, owner: Option<&str>) -> Result<SocketOptions, Error> {
    let mode = match mode {
        Some(text) => Some(
            u32::from_str_radix(text, 8)
                .ok()
                .filter(|mode| *mode <= 0o7777)
                .ok_or_else(|| Error::Usage(format!("invalid mode {text:?}: expected octal, e.g. 0660")))?,
        ),
        None => None,
    };
    let group = match group {
        Some(text) => Some(match text.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => nix::unistd::Group::from_name(text)
                .ok()
                .flatten()
                .ok_or_else(|| Error::Usage(format!("no such group {text:?}")))?
                .gid
                .as_raw(),
        }),
        None => None,
    };
    let owner = match owner {
        Some(text) => Some(match text.parse::<u32>() {
            Ok(uid) => uid,
            Err(_) => nix::unistd::User::from_name(text)
                .ok()
                .flatten()
                .ok_or_else(|| Error::Usage(format!("no such user {text:?}")))?
                .uid
                .as_raw(),
        }),
        None => None,
    };
    Ok(SocketOptions { mode, group, owner })
}

fn serve(name: &str, args: &[&str], scope: Scope) -> Result<(), Error> {
    let args: Args = crate::applets::parse_args(name, args);
    let spec = ServiceSpec::parse(&args.service)?;
    if args.concurrency == Some(0) {
        return Err(Error::Usage("-c must be at least 1".into()));
    }
    let options = socket_options(args.mode.as_deref().or(default_mode(&scope)), args.group.as_deref(), None)?;
    let host = crate::applets::host_name()?;
    let tree = Tree::from_env()?;
    crate::net::raise_fd_limit();
    let signals = SignalPipe::new(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGCHLD])
        .map_err(|e| Error::io("cannot set up signal handling", e))?;
    let mut server = PipeServer::new(&tree, scope, &spec, &host, &options, args.command, args.concurrency)?;
    log::info!("serving {} at {}", spec, server.socket.path().display());
    run(&mut server, &signals).map_err(|e| Error::io(format!("{} failed", server.socket.path().display()), e))
}

/// One inetd-style service: its socket and the children serving its
/// connections. Driven by an event loop: the applet's own, or dipusd's.
pub struct PipeServer {
    pub socket: ServiceSocket,
    command: String,
    limit: Option<usize>,
    children: HashSet<u32>,
}

impl PipeServer {
    pub fn new(
        tree: &Tree,
        scope: Scope,
        spec: &ServiceSpec,
        host: &str,
        options: &SocketOptions,
        command: String,
        limit: Option<usize>,
    ) -> Result<PipeServer, Error> {
        let socket = ServiceSocket::bind(tree, &scope, &spec.name, host, &spec.protocol, options)?;
        Ok(PipeServer { socket, command, limit, children: HashSet::new() })
    }

    /// Binds a new socket in place of one whose file went with the tree
    /// (see `dipusd`): the children serving connections run on, and count
    /// against the limit as before.
    pub fn rebind(
        &mut self,
        tree: &Tree,
        scope: Scope,
        spec: &ServiceSpec,
        host: &str,
        options: &SocketOptions,
    ) -> Result<(), Error> {
        self.socket = ServiceSocket::bind(tree, &scope, &spec.name, host, &spec.protocol, options)?;
        Ok(())
    }

    pub fn set_limit(&mut self, limit: Option<usize>) {
        self.limit = limit;
    }

    pub fn listener_fd(&self) -> i32 {
        self.socket.listener().as_raw_fd()
    }

    /// Accepts every pending connection the concurrency limit allows.
    pub fn accept_ready(&mut self) -> io::Result<()> {
        while self.limit.is_none_or(|limit| self.children.len() < limit) {
            let stream = match self.socket.listener().accept() {
                Ok((stream, _)) => stream,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    // Out of descriptors: leave the rest in the backlog
                    // until a child exits, rather than spin.
                    log::warn!("cannot accept on {}: {error}", self.socket.path().display());
                    return Ok(());
                }
                Err(error) if error.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(error) => return Err(error),
            };
            match self.spawn(stream) {
                Ok(pid) => {
                    self.children.insert(pid);
                }
                Err(error) => log::warn!("cannot start {:?}: {error}", self.command),
            }
        }
        Ok(())
    }

    fn spawn(&self, stream: UnixStream) -> io::Result<u32> {
        let credentials = getsockopt(&stream, sockopt::PeerCredentials).map_err(io::Error::from)?;
        let output = OwnedFd::from(stream.try_clone()?);
        let mut command = Command::new("/bin/sh");
        // SAFETY: the hook only makes async-signal-safe system calls.
        unsafe { std::os::unix::process::CommandExt::pre_exec(&mut command, crate::net::restore_fd_limit) };
        let child = command
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::from(OwnedFd::from(stream)))
            .stdout(Stdio::from(output))
            .env("PROTO", "IPC")
            .env("IPCREMOTEEUID", credentials.uid().to_string())
            .env("IPCREMOTEEGID", credentials.gid().to_string())
            .env("IPCREMOTEPID", credentials.pid().to_string())
            .env("IPCLOCALPATH", self.socket.path())
            .env("DIPUS_SERVICE", self.socket.path())
            .spawn()?;
        // The child is reaped by pid through `child_exited`; dropping the
        // handle neither waits nor kills.
        Ok(child.id())
    }

    /// A child exited; true if it was one of ours.
    pub fn child_exited(&mut self, pid: u32) -> bool {
        self.children.remove(&pid)
    }
}

/// Reaps every exited child, returning their pids.
pub fn reap_children() -> Vec<u32> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut pids = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return pids,
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    pids.push(pid.as_raw() as u32);
                }
            }
        }
    }
}

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);

fn run(server: &mut PipeServer, signals: &SignalPipe) -> io::Result<()> {
    let mut poll = Poll::new()?;
    poll.registry().register(&mut SourceFd(&server.listener_fd()), LISTENER, Interest::READABLE)?;
    poll.registry().register(&mut SourceFd(&signals.fd()), SIGNALS, Interest::READABLE)?;
    let mut events = Events::with_capacity(16);
    server.accept_ready()?;
    loop {
        crate::event_loop::wait(&mut poll, &mut events, None)?;
        for event in events.iter() {
            match event.token() {
                LISTENER => server.accept_ready()?,
                SIGNALS => {
                    for signal in signals.drain() {
                        if signal == Signal::SIGCHLD {
                            for pid in reap_children() {
                                server.child_exited(pid);
                            }
                            // A free slot: take what waited in the backlog.
                            server.accept_ready()?;
                        } else {
                            // Its socket is removed on the way out only if it is
                            // still ours (a successor may hold the name by now).
                            log::info!("{signal}: exiting (serving {})", server.socket.path().display());
                            return Ok(());
                        }
                    }
                }
                _ => {}
            }
        }
    }
}
