//! The SSH transport: SEP/1 over the system's OpenSSH client, never a
//! reimplementation. Authentication, encryption and host keys are ssh's;
//! the remote side is `dipus serve --stdio`, run as the authenticated user.
//!
//! Every request is one ssh process with connection sharing
//! (`ControlMaster=auto`, `ControlPersist=60`), so only the first pays for
//! a handshake and each further one costs a session on the shared
//! connection. The control socket lives in the user's private dipus scope
//! (`<root>/<user>/`, 0700) under ssh's hashed `%C` name, which keeps the
//! path short enough for `sun_path` whatever the host name. Requests to
//! the master itself (forward, cancel, check) go over that socket
//! ([`crate::ssh_mux`]) once `ssh -G` has said where it is, and through
//! `ssh -O` where it has not.
//!
//! `DIPUS_SSH` replaces the `ssh` command (it is split on white space, so
//! it can carry options: tests point it at their key and port), and
//! `DIPUS_REMOTE` the remote command (default `dipus`), to which
//! `serve --stdio` is appended.
//!
//! The child's stdin and stdout are pipes; ssh's stderr is ours, so its own
//! messages (host key, authentication) reach the user unchanged.
//!
//! Imports go further where sshd allows it: `FORWARD` tells where the
//! remote tree is and proves, through a probe socket, that sshd forwards to
//! it; then each imported service is a socket the shared connection's
//! master listens on (`ssh -O forward -L`) and ssh carries every
//! connection by itself, as `ssh -L` does: no process and no remote
//! command per connection.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::sep::{self, Request, SepError, Status, StatusLine};
use crate::ssh_mux::{Forward, Master, MuxError};
use crate::tree::{Tree, TreeError};

#[derive(Debug, Error)]
pub enum SshError {
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("cannot run {command:?}: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("{target}: ssh failed ({status}); its message is above")]
    Ssh { target: String, status: ExitStatus },
    #[error("{target}: the remote command {remote:?} failed ({status}); its message is above")]
    RemoteFailed { target: String, remote: String, status: ExitStatus },
    #[error(
        "{target}: the remote command {remote:?} was not found; install dipus there or set DIPUS_REMOTE to its path"
    )]
    NoRemoteDipus { target: String, remote: String },
    #[error("{target}: {source}")]
    Protocol { target: String, source: SepError },
    #[error("{target} answered: {}", status.to_line().trim_end())]
    Refused { target: String, status: StatusLine },
    #[error("{target}: ssh -O {operation} failed: {message}")]
    Control { target: String, operation: String, message: String },
    #[error("ssh cannot forward {path:?}: a path with ':' or '%' or not absolute")]
    Unforwardable { path: String },
    #[error("{target}: no answer within {} s", PROBE_TIMEOUT.as_secs())]
    Timeout { target: String },
    #[error(
        "{} leaves no room for ssh's control socket: {length} bytes with the temporary name ssh binds first, \
         more than the {limit} that fit in a UNIX socket address; use a shorter DIPUS_ROOT",
        dir.display()
    )]
    NoRoom { dir: std::path::PathBuf, length: usize, limit: usize },
    #[error("{target}: the ssh connection was lost before the reply ended, so the reply is incomplete ({detail})")]
    Lost { target: String, detail: String },
    #[error(transparent)]
    Setting(#[from] crate::settings::SettingError),
}

/// A command from the environment variable `name`, `default` when unset
/// or blank.
fn command_setting(name: &str, default: &str) -> Result<String, SshError> {
    let command = crate::settings::text(name)?.filter(|command| !command.trim().is_empty());
    Ok(command.unwrap_or_else(|| default.to_string()))
}

/// How long `ssh -O` may take: it only talks to the local master.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the forwarding probe may take in all, handshake included.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The control socket's name in the user's scope: `.ssh-` and the 40
/// hex digits of `%C`; ssh binds it first at that name plus a dot and 16
/// random characters, then renames it.
const CONTROL_NAME_LENGTH: usize = "/.ssh-".len() + 40 + 17;

/// ssh splits `-L` on ':' and expands '%' tokens in socket paths.
fn forwardable(path: &str) -> bool {
    path.starts_with('/') && path.len() <= 1024 && !path.chars().any(|c| c == ':' || c == '%' || c.is_control())
}

/// Whether `fd` has something to read (or its end) before `deadline`.
fn readable_by(fd: std::os::fd::RawFd, deadline: Instant) -> io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pollfd, 1, left.as_millis().clamp(1, 60_000) as libc::c_int) };
        if ready > 0 {
            return Ok(true);
        }
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

/// Runs `command` to its end, killed after `timeout`: its exit status and
/// its stderr (a line or two). The end of stderr is the event waited for.
fn run_bounded(command: &mut Command, timeout: Duration) -> io::Result<(ExitStatus, Vec<u8>)> {
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let stderr = child.stderr.take().expect("piped");
    finish_bounded(child, stderr.into(), Instant::now() + timeout)
}

/// Reads `pipe` (one of `child`'s outputs) to its end and waits for the
/// child, which is killed at `deadline`; its exit status and what it wrote.
fn finish_bounded(mut child: Child, pipe: OwnedFd, deadline: Instant) -> io::Result<(ExitStatus, Vec<u8>)> {
    use std::io::Read;
    let mut pipe = std::fs::File::from(pipe);
    let mut message = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if !readable_by(pipe.as_raw_fd(), deadline)? {
            let _ = child.kill();
            message.extend_from_slice(b" (timed out)");
            break;
        }
        match pipe.read(&mut chunk) {
            Ok(0) => break,
            Ok(count) => message.extend_from_slice(&chunk[..count]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(error);
            }
        }
    }
    Ok((child.wait()?, message))
}

/// The line the remote probe socket sends through a forward, if any.
fn read_probe(listen: &Path, deadline: Instant) -> Option<Vec<u8>> {
    let mut stream = std::os::unix::net::UnixStream::connect(listen).ok()?;
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left)).ok()?;
    sep::read_line(&mut stream, sep::MAX_REQUEST_LINE).ok()
}

/// ssh's exit status for its own failures (connection, authentication).
const SSH_FAILED: i32 = 255;

/// What FORWARD found out, once its probe went through.
#[derive(Debug)]
pub struct Forwarding {
    /// The remote tree's absolute root: a service at wire path P is ROOT/P.
    pub root: String,
    /// With a selector: the absolute paths of the sockets it picks that
    /// listen and may be connected to, in preference order.
    pub targets: Vec<String>,
    /// With a selector that picked some: a connection to the first target,
    /// carried by the shared connection's master (forwarded in the same
    /// `ssh -O` calls as the probe, which is one call less each way).
    pub connection: Option<std::os::unix::net::UnixStream>,
}

/// What `ssh -O` is asked to do.
#[derive(Debug, Clone, Copy)]
enum Control {
    Forward,
    Cancel,
    Check,
}

impl Control {
    fn word(self) -> &'static str {
        match self {
            Control::Forward => "forward",
            Control::Cancel => "cancel",
            Control::Check => "check",
        }
    }
}

/// [`Control`] spoken to the master itself. Forwards stop at the first
/// refused (the caller withdraws what was made); cancels go through all,
/// reporting the first refusal.
fn ask_master(socket: &Path, operation: Control, forwards: &[Forward]) -> Result<String, MuxError> {
    let mut master = Master::connect(socket, CONTROL_TIMEOUT)?;
    match operation {
        // As `ssh -O check` says it.
        Control::Check => master.alive().map(|pid| format!("Master running (pid={pid})")),
        Control::Forward => {
            forwards.iter().try_for_each(|&forward| master.open_forward(forward)).map(|()| String::new())
        }
        Control::Cancel => {
            let mut first_refusal = Ok(());
            for &forward in forwards {
                let closed = master.close_forward(forward);
                first_refusal = first_refusal.and(closed);
            }
            first_refusal.map(|()| String::new())
        }
    }
}

/// Each target's control socket as `ssh -G` gave it (`None`: not given).
static CONTROL_SOCKETS: std::sync::Mutex<Vec<(SshTarget, Option<std::path::PathBuf>)>> =
    std::sync::Mutex::new(Vec::new());

/// `ssh -G` at work (see [`SshTarget::look_up_control_socket`]).
pub struct ControlLookup {
    target: SshTarget,
    running: Option<(Child, OwnedFd)>,
    deadline: Instant,
}

impl ControlLookup {
    /// Waits for ssh's answer and keeps it for the process's later calls.
    pub fn finish(mut self) -> Option<std::path::PathBuf> {
        let socket = self.running.take().and_then(|(child, stdout)| {
            let (status, output) = finish_bounded(child, stdout, self.deadline).ok()?;
            if status.success() {
                control_path_in(&output)
            } else {
                None
            }
        });
        let mut known = CONTROL_SOCKETS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        known.push((self.target.clone(), socket.clone()));
        socket
    }
}

impl Drop for ControlLookup {
    /// Reaped even when its caller gave up (a session that failed).
    fn drop(&mut self) {
        if let Some((child, stdout)) = self.running.take() {
            let _ = finish_bounded(child, stdout, self.deadline);
        }
    }
}

/// The control socket in `ssh -G`'s output: an absolute path, not `none`.
fn control_path_in(output: &[u8]) -> Option<std::path::PathBuf> {
    let text = std::str::from_utf8(output).ok()?;
    let path = text.lines().find_map(|line| line.strip_prefix("controlpath "))?;
    path.starts_with('/').then(|| std::path::PathBuf::from(path))
}

/// Where to ssh to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SshTarget {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

impl SshTarget {
    pub fn uri(&self) -> String {
        crate::selector::Remote::Ssh { user: self.user.clone(), host: self.host.clone(), port: self.port }.to_string()
    }

    /// The remote dipus command (checked by [`SshTarget::base_command`]
    /// before any is run).
    fn remote_command() -> String {
        command_setting("DIPUS_REMOTE", "dipus").unwrap_or_else(|_| "dipus".into())
    }

    /// ssh with dipus's options and the target's port and user, without
    /// the host: what both sessions and control commands (`-O`) need.
    fn base_command(&self, tree: &Tree) -> Result<Command, SshError> {
        let ssh = command_setting("DIPUS_SSH", "ssh")?;
        command_setting("DIPUS_REMOTE", "dipus")?;
        let control_dir = tree.ensure_scope(&Tree::own_scope())?;
        let mut words = ssh.split_whitespace();
        // ssh takes the first value it is given for an option: a
        // ControlPath of the user's, in DIPUS_SSH, is the one used.
        let own_control_path =
            ssh.split_whitespace().any(|word| word == "-S" || word.to_ascii_lowercase().contains("controlpath"));
        let length = control_dir.as_os_str().len() + CONTROL_NAME_LENGTH;
        if !own_control_path && length > crate::name::SUN_PATH_LIMIT {
            return Err(SshError::NoRoom { dir: control_dir, length, limit: crate::name::SUN_PATH_LIMIT });
        }
        let mut command = Command::new(words.next().unwrap_or("ssh"));
        command.args(words);
        // ssh reads an -o value as a line of its configuration: '%'
        // doubled, or `%u` in the path would be expanded and put the socket
        // elsewhere; quoted where a space, a quote or a `#` would end it.
        let mut control_path = format!("{}/.ssh-", control_dir.display()).replace('%', "%%") + "%C";
        if control_path.contains(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | '#')) {
            control_path = format!("\"{}\"", control_path.replace('\\', "\\\\").replace('"', "\\\""));
        }
        command
            .arg("-o")
            .arg("ControlMaster=auto")
            .arg("-o")
            .arg(format!("ControlPath={control_path}"))
            .arg("-o")
            .arg("ControlPersist=60");
        if let Some(port) = self.port {
            command.arg("-p").arg(port.to_string());
        }
        if let Some(user) = &self.user {
            command.arg("-l").arg(user);
        }
        Ok(command)
    }

    /// The ssh command line for one request.
    pub fn command(&self, tree: &Tree) -> Result<Command, SshError> {
        let mut command = self.base_command(tree)?;
        // `--` ends ssh's options: a host can never be read as one.
        command.arg("-T").arg("--").arg(&self.host).arg(format!("{} serve --stdio", Self::remote_command()));
        Ok(command)
    }

    /// Asks the shared connection's master to listen at `listen` and
    /// forward each connection to the remote socket `remote` (`ssh -O
    /// forward -L`): ssh alone then carries the bytes, as `ssh -L` does.
    pub fn forward(&self, tree: &Tree, listen: &Path, remote: &str) -> Result<(), SshError> {
        self.control(tree, Control::Forward, &[(listen, remote)]).map(drop)
    }

    /// Withdraws a forward made by [`SshTarget::forward`]; connections it
    /// carries go on.
    pub fn cancel(&self, tree: &Tree, listen: &Path, remote: &str) -> Result<(), SshError> {
        self.control(tree, Control::Cancel, &[(listen, remote)]).map(drop)
    }

    /// One `ssh -O OPERATION` for all of `forwards` (listen, remote); what
    /// ssh said on success. Asked of the master over its control socket
    /// where ssh has said where that is ([`crate::ssh_mux`]), which spares
    /// an ssh process; of `ssh -O` where it has not, or where no master
    /// answers there (ssh then says what it makes of it).
    fn control(&self, tree: &Tree, operation: Control, forwards: &[Forward]) -> Result<String, SshError> {
        for &(listen, remote) in forwards {
            if !listen.to_str().is_some_and(forwardable) {
                return Err(SshError::Unforwardable { path: listen.display().to_string() });
            }
            if !forwardable(remote) {
                return Err(SshError::Unforwardable { path: remote.to_string() });
            }
        }
        if let Some(socket) = self.control_socket(tree) {
            match ask_master(&socket, operation, forwards) {
                Ok(message) => return Ok(message),
                Err(MuxError::Refused(message)) => {
                    return Err(SshError::Control {
                        target: self.uri(),
                        operation: operation.word().to_string(),
                        message,
                    })
                }
                Err(error) => log::debug!("{error}; asking ssh -O {}", operation.word()),
            }
        }
        let mut command = self.base_command(tree)?;
        command.arg("-O").arg(operation.word());
        for &(listen, remote) in forwards {
            command.arg("-L").arg(format!("{}:{remote}", listen.display()));
        }
        command.arg("--").arg(&self.host);
        let described = format!("{command:?}");
        let (status, message) = run_bounded(&mut command, CONTROL_TIMEOUT)
            .map_err(|source| SshError::Spawn { command: described.clone(), source })?;
        let message = String::from_utf8_lossy(&message).trim().to_string();
        if status.success() {
            return Ok(message);
        }
        Err(SshError::Control { target: self.uri(), operation: operation.word().to_string(), message })
    }

    /// Where the shared connection's control socket is, once ssh has said
    /// (see [`SshTarget::look_up_control_socket`]); `None` where it does
    /// not (not OpenSSH, `ControlPath none`).
    fn control_socket(&self, tree: &Tree) -> Option<std::path::PathBuf> {
        if let Some(known) = self.known_control_socket() {
            return known;
        }
        match self.look_up_control_socket(tree) {
            Ok(Some(lookup)) => lookup.finish(),
            Ok(None) => self.known_control_socket().flatten(),
            Err(_) => None,
        }
    }

    fn known_control_socket(&self) -> Option<Option<std::path::PathBuf>> {
        let known = CONTROL_SOCKETS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        known.iter().find(|(target, _)| target == self).map(|(_, socket)| socket.clone())
    }

    /// Starts `ssh -G`, which prints ssh's configuration for this target
    /// with ControlPath expanded as the master uses it (the user's
    /// configuration and DIPUS_SSH's options applied: `%C` hashes what
    /// they make of the host). `None` if that is known already. Callers
    /// about to wait for something else (a session) start it first.
    pub fn look_up_control_socket(&self, tree: &Tree) -> Result<Option<ControlLookup>, SshError> {
        if self.known_control_socket().is_some() {
            return Ok(None);
        }
        let mut command = self.base_command(tree)?;
        command.arg("-G").arg("--").arg(&self.host);
        let described = format!("{command:?}");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| SshError::Spawn { command: described, source })?;
        let stdout = child.stdout.take().expect("piped").into();
        Ok(Some(ControlLookup {
            target: self.clone(),
            running: Some((child, stdout)),
            deadline: Instant::now() + CONTROL_TIMEOUT,
        }))
    }

    /// Whether the shared connection still stands (`ssh -O check`), for a
    /// connection its master carried: when the ssh connection dies, the
    /// master closes the sockets it forwards just as a service ending its
    /// reply would, so the end of such a reply proves nothing until the
    /// master is found alive. (A master that loses its connection exits,
    /// and does not answer `-O check` while it does.) Only the master's
    /// own `Master running` counts: ssh -O, connected to a master that
    /// dies before it answers, goes on to make a connection of its own,
    /// which may well succeed.
    pub fn check_connection(&self, tree: &Tree) -> Result<(), SshError> {
        match self.control(tree, Control::Check, &[]) {
            Ok(message) if message.starts_with("Master running") => Ok(()),
            Ok(message) | Err(SshError::Control { message, .. }) => {
                Err(SshError::Lost { target: self.uri(), detail: message })
            }
            Err(other) => Err(other),
        }
    }

    /// Whether this host's sshd forwards to sockets of the remote tree,
    /// where that tree is, and (with a selector) the sockets it picks that
    /// may be connected to: FORWARD, then a forward to the probe socket it
    /// names, and the status line read through it. `None` means no (an
    /// older remote dipus, forwarding refused): use sessions. A selector
    /// that picks nothing usable is `Refused`, as a CONNECT would be.
    /// `making` is told of each forward (listen, remote) before it is
    /// asked for: a caller that may have to stop the probe midway can then
    /// [`SshTarget::withdraw`] what it left.
    pub fn probe_forwarding(
        &self,
        tree: &Tree,
        selector: Option<&str>,
        making: &mut dyn FnMut(&Path, &str),
    ) -> Result<Option<Forwarding>, SshError> {
        let deadline = Instant::now() + PROBE_TIMEOUT;
        // While the session logs in and the remote answers: where the
        // forwards below are asked for.
        let lookup = self.look_up_control_socket(tree).ok().flatten();
        let mut channel = self.open(tree, &Request::Forward(selector.map(str::to_string)))?;
        let status = channel.read_status_by(deadline)?;
        if status.status == Status::BadRequest {
            log::info!(
                "{}: no FORWARD there ({}); one ssh session per connection",
                self.uri(),
                status.to_line().trim_end()
            );
            return Ok(None);
        }
        if !status.status.is_success() {
            return Err(SshError::Refused { target: self.uri(), status });
        }
        let answer = (|| {
            let root = channel.read_path_by(deadline)?;
            let probe = channel.read_path_by(deadline)?;
            let mut targets = Vec::new();
            while let Some(path) = channel.read_path_or_end_by(deadline)? {
                targets.push(path);
            }
            Ok((root, probe, targets))
        })();
        let (root, probe, targets) = match answer {
            Ok(answer) => answer,
            // A remote tree at such a path is still reached through
            // sessions, which name its sockets by their wire paths.
            Err(SshError::Unforwardable { path }) => {
                log::info!("{}: ssh cannot forward to {path:?}; one ssh session per connection", self.uri());
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        if let Some(lookup) = lookup {
            lookup.finish();
        }
        let listen = self.forward_socket_name(tree, "probe")?;
        let mut forwards = vec![(listen.as_path(), probe.as_str())];
        let connect_at = match targets.first() {
            Some(target) => Some((self.forward_socket_name(tree, "connect")?, target.as_str())),
            None => None,
        };
        if let Some((at, target)) = &connect_at {
            forwards.push((at.as_path(), target));
        }
        for &(listen, remote) in &forwards {
            making(listen, remote);
        }
        if let Err(error) = self.control(tree, Control::Forward, &forwards).map(drop) {
            // One of the two may have been made before the other failed.
            self.withdraw(tree, &forwards);
            log::info!("{error}; one ssh session per connection");
            return Ok(None);
        }
        let answer = read_probe(&listen, deadline);
        let forwarded =
            answer.as_deref().is_some_and(|line| StatusLine::parse(line).is_ok_and(|s| s.status.is_success()));
        // Connected before the cancel: the connection outlives the forward.
        let connection = match &connect_at {
            Some((at, _)) if forwarded => Some(
                std::os::unix::net::UnixStream::connect(at)
                    .map_err(|source| SshError::Protocol { target: self.uri(), source: SepError::Io(source) }),
            ),
            _ => None,
        };
        self.withdraw(tree, &forwards);
        let connection = connection.transpose()?;
        if forwarded {
            return Ok(Some(Forwarding { root, targets, connection }));
        }
        log::info!(
            "{}: sshd does not forward to the remote tree's sockets (AllowStreamLocalForwarding?); \
             one ssh session per connection",
            self.uri()
        );
        Ok(None)
    }

    /// Cancels short-lived forwards and removes their sockets, as far as
    /// it can: what is left is only a stale name in the user's own scope.
    pub fn withdraw(&self, tree: &Tree, forwards: &[(&Path, &str)]) {
        let _ = self.control(tree, Control::Cancel, forwards);
        for (listen, _) in forwards {
            let _ = std::fs::remove_file(listen);
        }
    }

    /// A fresh name in the user's private scope for a short-lived forward.
    fn forward_socket_name(&self, tree: &Tree, what: &str) -> Result<std::path::PathBuf, SshError> {
        static NUMBER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let number = NUMBER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let control_dir = tree.ensure_scope(&Tree::own_scope())?;
        let listen = control_dir.join(format!(".forward-{what}-{}-{number}", std::process::id()));
        let _ = std::fs::remove_file(&listen);
        Ok(listen)
    }

    /// Starts ssh and sends `request`; the channel then carries the reply.
    pub fn open(&self, tree: &Tree, request: &Request) -> Result<SshChannel, SshError> {
        let mut command = self.command(tree)?;
        let described = format!("{command:?}");
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| SshError::Spawn { command: described, source })?;
        let mut input = child.stdin.take().expect("piped");
        let output = child.stdout.take().expect("piped");
        // A short line fits a pipe's buffer whole; ssh reads it once the
        // session is up.
        if let Err(source) = input.write_all(Request::to_line(request).as_bytes()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(SshError::Protocol { target: self.uri(), source: SepError::Io(source) });
        }
        Ok(SshChannel { target: self.clone(), child: Some(child), input: Some(input.into()), output: output.into() })
    }

    /// Sends `request` and reads the status line; `Refused` unless 200.
    pub fn request(&self, tree: &Tree, request: &Request) -> Result<SshChannel, SshError> {
        let mut channel = self.open(tree, request)?;
        let status = channel.read_status()?;
        if !status.status.is_success() {
            return Err(SshError::Refused { target: self.uri(), status });
        }
        Ok(channel)
    }

    /// LIST: the remote paths (`SCOPE/PROTOCOL/FILE`) the selector picks.
    pub fn list(&self, tree: &Tree, selector: Option<&str>) -> Result<Vec<String>, SshError> {
        let mut channel = self.request(tree, &Request::List(selector.map(str::to_string)))?;
        channel.close_input();
        let output = std::fs::File::from(channel.output.try_clone().map_err(|e| channel.protocol(SepError::Io(e)))?);
        let paths = crate::sep_client::read_list(output).map_err(|e| channel.protocol(e))?;
        // A list cut short by a lost connection ends like a whole one.
        channel.finish()?;
        Ok(paths)
    }
}

/// One ssh process carrying one SEP request: we write to `input` (its
/// stdin) and read from `output` (its stdout).
pub struct SshChannel {
    target: SshTarget,
    child: Option<Child>,
    pub input: Option<OwnedFd>,
    pub output: OwnedFd,
}

impl SshChannel {
    fn protocol(&self, source: SepError) -> SshError {
        SshError::Protocol { target: self.target.uri(), source }
    }

    /// Reads the status line byte by byte (nothing after it is taken). If
    /// ssh ends first, its exit status says why.
    pub fn read_status(&mut self) -> Result<StatusLine, SshError> {
        let mut output = std::mem::ManuallyDrop::new(
            // SAFETY: a second File over our own descriptor, never closed
            // (ManuallyDrop); `self.output` stays the owner.
            unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(self.output.as_raw_fd()) },
        );
        match sep::read_line(&mut *output, sep::MAX_REQUEST_LINE) {
            Ok(line) => StatusLine::parse(&line).map_err(|e| self.protocol(e)),
            Err(SepError::UnexpectedEof { .. }) => Err(self.failure()),
            Err(error) => Err(self.protocol(error)),
        }
    }

    /// Waits until ssh's output has something to read, or `deadline`.
    fn wait_readable(&self, deadline: Instant) -> Result<(), SshError> {
        match readable_by(self.output.as_raw_fd(), deadline) {
            Ok(true) => Ok(()),
            Ok(false) => Err(SshError::Timeout { target: self.target.uri() }),
            Err(error) => Err(self.protocol(SepError::Io(error))),
        }
    }

    /// One line, a byte at a time, given up at `deadline`.
    fn read_line_by(&mut self, deadline: Instant) -> Result<Vec<u8>, SshError> {
        let mut line = Vec::new();
        loop {
            self.wait_readable(deadline)?;
            let mut byte = 0u8;
            // SAFETY: reads one byte into `byte` from our own pipe.
            let count = unsafe { libc::read(self.output.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
            match count {
                0 if line.is_empty() => return Err(self.failure()),
                0 => return Err(self.protocol(SepError::UnexpectedEof { received: line.len() })),
                1 => {
                    line.push(byte);
                    if byte == b'\n' {
                        return Ok(line);
                    }
                    if line.len() > sep::MAX_REQUEST_LINE {
                        let start = String::from_utf8_lossy(&line[..40]).into_owned();
                        return Err(self.protocol(SepError::LineTooLong { limit: sep::MAX_REQUEST_LINE, start }));
                    }
                }
                _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
                _ => return Err(self.protocol(SepError::Io(io::Error::last_os_error()))),
            }
        }
    }

    /// The status line, given up at `deadline`.
    pub fn read_status_by(&mut self, deadline: Instant) -> Result<StatusLine, SshError> {
        let line = self.read_line_by(deadline)?;
        StatusLine::parse(&line).map_err(|e| self.protocol(e))
    }

    /// An absolute path line (FORWARD's answer), checked as ssh needs it.
    fn read_path_by(&mut self, deadline: Instant) -> Result<String, SshError> {
        let line = self.read_line_by(deadline)?;
        self.check_path(&line)
    }

    fn check_path(&self, line: &[u8]) -> Result<String, SshError> {
        let text = std::str::from_utf8(line).ok().map(|text| text.trim_end_matches('\n').to_string());
        match text {
            Some(path) if forwardable(&path) && !path.split('/').any(|part| part == "..") => Ok(path),
            _ => Err(SshError::Unforwardable { path: String::from_utf8_lossy(line).trim_end().to_string() }),
        }
    }

    /// An absolute path line, or `None` at FORWARD's closing `.`.
    fn read_path_or_end_by(&mut self, deadline: Instant) -> Result<Option<String>, SshError> {
        let line = self.read_line_by(deadline)?;
        if line == b".\n" {
            return Ok(None);
        }
        self.check_path(&line).map(Some)
    }

    /// Why ssh ended without answering.
    fn failure(&mut self) -> SshError {
        let status = self.child.take().and_then(|mut child| child.wait().ok());
        match status {
            Some(status) if status.code() == Some(127) => {
                SshError::NoRemoteDipus { target: self.target.uri(), remote: SshTarget::remote_command() }
            }
            // ssh exits 255 on its own errors, and with the remote
            // command's status otherwise: then ssh did its job.
            Some(status) if status.code().is_some_and(|code| code != SSH_FAILED) => {
                SshError::RemoteFailed { target: self.target.uri(), remote: SshTarget::remote_command(), status }
            }
            Some(status) => SshError::Ssh { target: self.target.uri(), status },
            None => self.protocol(SepError::UnexpectedEof { received: 0 }),
        }
    }

    /// Lets ssh finish by itself, for a connection whose client has gone
    /// after everything it sent was handed to ssh: what ssh has not passed
    /// on yet (in its stdin pipe, or its own buffers) would be lost if it
    /// were killed. Its output is closed (no one reads a reply any more);
    /// the process is returned, to be reaped, or killed if it lingers.
    pub fn let_finish(mut self) -> Option<Child> {
        self.input = None;
        self.child.take()
    }

    /// Closes ssh's stdin: the remote side sees EOF.
    pub fn close_input(&mut self) {
        self.input = None;
    }

    /// Waits for ssh to exit (after its output has ended) and judges the
    /// reply by its exit status: ssh ends its output the same way whether
    /// the remote side finished or the connection was lost, and only its
    /// status (255 for its own failures) tells the two apart. Not for a
    /// reply nobody reads any more: ssh may be stuck writing it (drop the
    /// channel instead, which ends ssh).
    pub fn finish(&mut self) -> Result<(), SshError> {
        self.input = None;
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = child.wait().map_err(|e| self.protocol(SepError::Io(e)))?;
        match status.code() {
            Some(0) => Ok(()),
            Some(code) if code != SSH_FAILED => {
                Err(SshError::RemoteFailed { target: self.target.uri(), remote: SshTarget::remote_command(), status })
            }
            _ => Err(SshError::Lost { target: self.target.uri(), detail: format!("ssh: {status}") }),
        }
    }
}

impl Drop for SshChannel {
    fn drop(&mut self) {
        self.input = None;
        if let Some(mut child) = self.child.take() {
            if !matches!(child.try_wait(), Ok(Some(_))) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Strips the remote scope from a path seen over ssh: imports keep the
/// protocol path and name. Only `local/` and `exported/` are imported:
/// a remote user's own imports are left there, so two hosts importing each
/// other never loop.
pub fn importable(wire: &str) -> Option<&str> {
    let (scope, rest) = wire.split_once('/')?;
    IMPORTED_SCOPES.contains(&scope).then_some(rest)
}

/// The remote scopes an ssh import mirrors, into one scope here.
pub const IMPORTED_SCOPES: [&str; 2] = ["local", "exported"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_socket_is_read_from_ssh_g() {
        let dump = b"user root\ncontrolmaster auto\ncontrolpath /tmp/t/sp ace/.ssh-0123\ncontrolpersist 60\n";
        assert_eq!(control_path_in(dump), Some("/tmp/t/sp ace/.ssh-0123".into()));
        assert_eq!(control_path_in(b"controlpath none\n"), None);
        assert_eq!(control_path_in(b"usage: ssh [-46AaCfGgKkMNnqsTtVvXxYy]\n"), None);
    }

    #[test]
    fn a_bounded_command_reports_its_status_and_message() {
        let (status, message) =
            run_bounded(Command::new("sh").args(["-c", "echo refused >&2; exit 3"]), Duration::from_secs(10)).unwrap();
        assert_eq!((status.code(), message.as_slice()), (Some(3), &b"refused\n"[..]));
    }

    #[test]
    fn a_bounded_command_that_hangs_is_killed_at_its_deadline() {
        let started = Instant::now();
        let (status, message) =
            run_bounded(Command::new("sh").args(["-c", "exec sleep 30"]), Duration::from_millis(200)).unwrap();
        assert!(started.elapsed() < Duration::from_secs(10), "not killed: {:?}", started.elapsed());
        assert!(!status.success() && message.ends_with(b"(timed out)"), "{status:?} {message:?}");
    }
}
