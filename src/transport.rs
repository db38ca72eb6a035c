//! Opening a connection to a service named by a [`Target`]: a local
//! selector (the first matching socket that accepts), or a remote one over
//! SEP or SSH.

use std::io;
use std::os::fd::OwnedFd;

use crate::error::Error;
use crate::selector::{Remote, Selector, Target};
use crate::sep::Request;
use crate::sep_client::{ClientError, Server};
use crate::ssh::{SshChannel, SshError, SshTarget};
use crate::tree::{Service, Tree};

/// An open connection to a service, ready for the relay.
pub struct Connection {
    pub stream: Stream,
    /// What was connected to, for messages.
    pub description: String,
}

pub enum Stream {
    /// A UNIX or TCP socket: both directions on one descriptor.
    Socket(OwnedFd),
    /// A socket the shared ssh connection's master carries (as `ssh -L`):
    /// its end is the reply's end only if the connection still stands
    /// afterwards (`SshTarget::check_connection`).
    Forwarded(OwnedFd, SshTarget),
    /// An ssh process: its stdin and stdout pipes.
    Ssh(SshChannel),
}

pub fn connect(target: &Target) -> Result<Connection, Error> {
    match &target.remote {
        None => connect_local(&target.selector),
        Some(Remote::Sep { host, port }) => connect_sep(&Server::new(host, *port), &target.selector),
        Some(Remote::Ssh { user, host, port }) => {
            let ssh = SshTarget { user: user.clone(), host: host.clone(), port: *port };
            connect_ssh(&ssh, &target.selector)
        }
    }
}

/// The selector as a SEP argument (`None` for everything).
pub fn selector_argument(selector: &Selector) -> Option<String> {
    match selector {
        Selector::All => None,
        other => Some(other.to_string()),
    }
}

/// LIST to resolve the selector remotely, then CONNECT to each match in
/// order until one accepts.
fn connect_sep(server: &Server, selector: &Selector) -> Result<Connection, Error> {
    let paths = server.list(selector_argument(selector).as_deref())?;
    if paths.is_empty() {
        return Err(Error::NoService(format!("sep://{}/{}", server.authority(), selector)));
    }
    let mut last = String::new();
    for path in paths {
        match server.request(&Request::Connect(path.clone())) {
            Ok(stream) => {
                return Ok(Connection {
                    stream: Stream::Socket(stream.into()),
                    description: format!("sep://{}/{path}", server.authority()),
                })
            }
            Err(error @ ClientError::Refused { .. }) => {
                log::info!("{error}; trying the next match");
                last = error.to_string();
            }
            Err(error) => return Err(error.into()),
        }
    }
    Err(Error::NoneAccepted { selector: selector.to_string(), last })
}

/// Over ssh: where sshd forwards to the remote tree, FORWARD picks the
/// first match that listens and that the ssh user may connect to, and the
/// shared connection's master carries the connection itself (as `ssh -L`
/// would). Otherwise LIST, then CONNECT to each match in order until one
/// accepts, each a session with `dipus serve` relaying there.
fn connect_ssh(ssh: &SshTarget, selector: &Selector) -> Result<Connection, Error> {
    let tree = Tree::from_env()?;
    if let Some(argument) = selector_argument(selector) {
        // Ctrl-C once the probe's forwards are asked for would leave them
        // listening in ssh's master, and their names in the user's scope:
        // from then on it waits until they are withdrawn. (Before, while
        // ssh logs in or the remote answers, it acts at once.)
        let mut deferred = None;
        let probed = ssh.probe_forwarding(&tree, Some(&argument), &mut |_, _| {
            if deferred.is_none() {
                deferred =
                    Some(crate::signals::Deferred::hold().map_err(|e| Error::io("cannot set up signal handling", e)));
            }
        });
        drop(deferred.transpose()?);
        match probed {
            Ok(Some(forwarding)) => {
                if let (Some(target), Some(stream)) = (forwarding.targets.first(), forwarding.connection) {
                    let wire = target.strip_prefix(&forwarding.root).unwrap_or(target).trim_start_matches('/');
                    let description = format!("{}/{wire}", ssh.uri());
                    return Ok(Connection { stream: Stream::Forwarded(stream.into(), ssh.clone()), description });
                }
            }
            Ok(None) => {}
            Err(SshError::Refused { status, .. }) if status.status == crate::sep::Status::NotFound => {
                return Err(Error::NoService(format!("{}/{}", ssh.uri(), selector)));
            }
            Err(error @ SshError::Refused { .. }) => {
                return Err(Error::NoneAccepted { selector: selector.to_string(), last: error.to_string() });
            }
            Err(error) => return Err(error.into()),
        }
    }
    let paths = ssh.list(&tree, selector_argument(selector).as_deref())?;
    if paths.is_empty() {
        return Err(Error::NoService(format!("{}/{}", ssh.uri(), selector)));
    }
    let mut last = String::new();
    for path in paths {
        match ssh.request(&tree, &Request::Connect(path.clone())) {
            Ok(channel) => {
                return Ok(Connection { stream: Stream::Ssh(channel), description: format!("{}/{path}", ssh.uri()) })
            }
            Err(error @ SshError::Refused { .. }) => {
                log::info!("{error}; trying the next match");
                last = error.to_string();
            }
            Err(error) => return Err(error.into()),
        }
    }
    Err(Error::NoneAccepted { selector: selector.to_string(), last })
}

/// The local services a selector picks, in preference order.
pub fn resolve_local(tree: &Tree, selector: &Selector) -> Result<Vec<Service>, Error> {
    if let Selector::Path(path) = selector {
        // An absolute path may be any socket, in the tree or not.
        if let Some(service) = tree.service_at(path) {
            return Ok(vec![service]);
        }
    }
    Ok(tree.list()?.into_iter().filter(|service| selector.matches(&service.path, &service.full)).collect())
}

/// Tries each match in order; a refused, vanished or forbidden socket, or
/// one whose path is too long to connect to, falls over to the next.
fn connect_local(selector: &Selector) -> Result<Connection, Error> {
    let tree = Tree::from_env()?;
    if let Selector::Path(path) = selector {
        crate::name::check_socket_path(path)?;
    }
    let candidates: Vec<std::path::PathBuf> = match selector {
        Selector::Path(path) if tree.service_at(path).is_none() => vec![path.clone()],
        _ => resolve_local(&tree, selector)?.into_iter().map(|service| service.full).collect(),
    };
    if candidates.is_empty() {
        return Err(Error::NoService(selector.to_string()));
    }
    let mut last = None;
    for path in candidates {
        match crate::net::unix_connect(&path) {
            Ok(stream) => {
                return Ok(Connection {
                    stream: Stream::Socket(stream.into()),
                    description: path.display().to_string(),
                })
            }
            // A path too long for a socket address (InvalidInput, its
            // message naming the path) is only unusable, as a refusing
            // socket is: the selector found it, and the next match may
            // serve. An absolute path the user gave was checked above.
            Err(error) if error.kind() == io::ErrorKind::InvalidInput => {
                log::info!("{error}; trying the next match");
                last = Some(error.to_string());
            }
            Err(error) => {
                log::info!("{}: {error}; trying the next match", path.display());
                last = Some(format!("{}: {error}", path.display()));
            }
        }
    }
    Err(Error::NoneAccepted { selector: selector.to_string(), last: last.unwrap_or_default() })
}
