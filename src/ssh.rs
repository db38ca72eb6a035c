//! The SSH transport: SEP/1 over the system's OpenSSH client, never a
//! reimplementation. Authentication, encryption and host keys are ssh's;
//! the remote side is `dipus serve --stdio`, run as the authenticated user.
//!
//! Every request is one ssh process with connection sharing
//! (`ControlMaster=auto`, `ControlPersist=60`), so only the first pays for
//! a handshake and each further one costs a session on the shared
//! connection. The control socket lives in the user's private dipus scope
//! (`<root>/<user>/`, 0700) under ssh's hashed `%C` name, which keeps the
//! path short enough for `sun_path` whatever the host name.
//!
//! `DIPUS_SSH` replaces the `ssh` command (it is split on white space, so
//! it can carry options: tests point it at their key and port), and
//! `DIPUS_REMOTE` the remote command (default `dipus`), to which
//! `serve --stdio` is appended.
//!
//! The child's stdin and stdout are pipes; ssh's stderr is ours, so its own
//! messages (host key, authentication) reach the user unchanged.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};

use thiserror::Error;

use crate::sep::{self, Request, SepError, StatusLine};
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
}

/// ssh's exit status for its own failures (connection, authentication).
const SSH_FAILED: i32 = 255;

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

    fn remote_command() -> String {
        std::env::var("DIPUS_REMOTE").ok().filter(|r| !r.trim().is_empty()).unwrap_or_else(|| "dipus".into())
    }

    /// The ssh command line for one request.
    pub fn command(&self, tree: &Tree) -> Result<Command, SshError> {
        let control_dir = tree.ensure_scope(&Tree::own_scope()?)?;
        let ssh = std::env::var("DIPUS_SSH").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| "ssh".into());
        let mut words = ssh.split_whitespace();
        let mut command = Command::new(words.next().unwrap_or("ssh"));
        command.args(words);
        command
            .arg("-T")
            .arg("-o")
            .arg("ControlMaster=auto")
            .arg("-o")
            .arg(format!("ControlPath={}/.ssh-%C", control_dir.display()))
            .arg("-o")
            .arg("ControlPersist=60");
        if let Some(port) = self.port {
            command.arg("-p").arg(port.to_string());
        }
        if let Some(user) = &self.user {
            command.arg("-l").arg(user);
        }
        // `--` ends ssh's options: a host can never be read as one.
        command.arg("--").arg(&self.host).arg(format!("{} serve --stdio", Self::remote_command()));
        Ok(command)
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
        channel.finish();
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

    /// Closes ssh's stdin: the remote side sees EOF.
    pub fn close_input(&mut self) {
        self.input = None;
    }

    /// Waits for ssh to exit (after its output has ended).
    pub fn finish(&mut self) {
        self.input = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
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
    matches!(scope, "local" | "exported").then_some(rest)
}
