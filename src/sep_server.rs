//! What a SEP request may see and do, shared by the TCP exporter and
//! `dipus serve --stdio`: the peer's *view* of the tree, the services a
//! LIST or WATCH selects, and opening the socket a CONNECT names.
//!
//! Over TCP the peer is anonymous: the view is `exported/` alone, paths on
//! the wire are relative to it, and only sockets whose mode lets "other"
//! connect are listed or opened, since the exporter often runs as root and
//! must not lend it its permissions. Over SSH the peer is an authenticated
//! user running `dipus serve --stdio` as themselves: the view is `local/`,
//! `exported/` and their own scope, paths on the wire start with the scope
//! directory, and the kernel checks permissions as that user.
//!
//! Opening never follows a symlink: every directory on the way is checked
//! with `lstat`, and after connecting, the address the listener was bound
//! at (its `getpeername`) must lie in the directory the path names, so a
//! symlink swapped in at the last moment still cannot lead elsewhere.

use std::collections::HashSet;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{connect, getpeername, socket, AddressFamily, SockFlag, SockType, UnixAddr};

use crate::name::{Scope, ServicePath};
use crate::selector::Selector;
use crate::sep::{Status, StatusLine};
use crate::tree::{Service, Tree};
use crate::watch::Change;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// Anonymous, over TCP: `exported/` only, "other"-connectable only.
    Exported,
    /// An authenticated user over SSH: `local/`, `exported/` and this scope.
    User(Scope),
}

impl View {
    fn scopes(&self) -> Vec<Scope> {
        match self {
            View::Exported => vec![Scope::Exported],
            View::User(own) => vec![Scope::Local, Scope::Exported, own.clone()],
        }
    }

    /// The path a peer sees for `service`, if it may see it at all.
    pub fn wire_path(&self, service: &Service) -> Option<String> {
        let wire = self.wire_name(service)?;
        if *self == View::Exported {
            let meta = std::fs::symlink_metadata(&service.full).ok()?;
            if meta.mode() & 0o002 == 0 {
                return None;
            }
        }
        Some(wire)
    }

    /// The path `service` has in this view, whether or not it may be
    /// seen (a service that went away no longer has a mode to ask): `None`
    /// for a scope outside the view, so that a namesake there going away
    /// is not taken for it.
    pub fn wire_name(&self, service: &Service) -> Option<String> {
        if !self.scopes().contains(&service.scope) {
            return None;
        }
        Some(match self {
            View::Exported => service.path.to_string(),
            View::User(_) => format!("{}/{}", service.scope, service.path),
        })
    }

    /// What a WATCH peer that was told of `announced` hears of `change`,
    /// if anything; `announced` follows.
    pub fn watch_event(
        &self,
        change: &Change,
        selector: &Selector,
        announced: &mut HashSet<String>,
    ) -> Option<crate::sep::Event> {
        use crate::sep::Event;
        match change {
            Change::Added(service) | Change::Modified(service) if selector.matches(&service.path, &service.full) => {
                match self.wire_path(service) {
                    Some(wire) => announced.insert(wire.clone()).then_some(Event::Added(wire)),
                    // Not (or no longer) to be seen: its mode changed.
                    None => self.wire_name(service).filter(|wire| announced.remove(wire)).map(Event::Removed),
                }
            }
            Change::Removed(service) => {
                self.wire_name(service).filter(|wire| announced.remove(wire)).map(Event::Removed)
            }
            Change::Added(_) | Change::Modified(_) => None,
        }
    }

    /// Parses a selector argument of LIST or WATCH.
    pub fn selector(argument: Option<&str>) -> Result<Selector, StatusLine> {
        match Selector::parse(argument.unwrap_or("")) {
            Ok(Selector::Path(_)) => Err(StatusLine::with_detail(Status::BadRequest, "a selector cannot be a path")),
            Ok(selector) => Ok(selector),
            Err(error) => Err(StatusLine::with_detail(Status::BadRequest, &error.to_string())),
        }
    }

    /// The wire paths of the services `selector` picks, in preference order.
    pub fn list(&self, tree: &Tree, selector: &Selector) -> Result<Vec<String>, StatusLine> {
        // Only the view's scopes: a private scope of the user running the
        // exporter, in whatever state, is no business of its peers.
        let services = tree
            .list_scopes(&self.scopes())
            .map_err(|error| StatusLine::with_detail(Status::Internal, &error.to_string()))?;
        Ok(services
            .iter()
            .filter(|service| selector.matches(&service.path, &service.full))
            .filter_map(|service| self.wire_path(service))
            .collect())
    }

    /// Splits a wire path into scope and service path, refusing what the
    /// view does not include.
    fn parse_wire_path(&self, wire: &str) -> Result<(Scope, ServicePath), StatusLine> {
        let bad = |why: &str| StatusLine::with_detail(Status::BadRequest, &format!("{why}: {wire}"));
        crate::sep::check_path(wire)
            .map_err(|error| StatusLine::with_detail(Status::BadRequest, &error.to_string()))?;
        let (scope, relative) = match self {
            View::Exported => (Scope::Exported, wire),
            View::User(_) => {
                let (scope, relative) = wire.split_once('/').ok_or_else(|| bad("expected SCOPE/PROTOCOL/FILE"))?;
                (Scope::from_dir_name(scope).ok_or_else(|| bad("no such scope"))?, relative)
            }
        };
        if !self.scopes().contains(&scope) {
            return Err(StatusLine::with_detail(Status::Forbidden, &format!("not offered here: {wire}")));
        }
        let path = ServicePath::parse(relative).map_err(|error| bad(&error.to_string()))?;
        Ok((scope, path))
    }

    /// Connects to the service at `wire` (nonblocking), or says why not.
    /// `Ok(None)`: its backlog is full. `wait` is how long the kernel may
    /// keep us waiting for room first (a blocking connect, woken when the
    /// service accepts: for one-connection processes); `None` in an event
    /// loop, which tries again later instead (see [`crate::net::BusyWait`]).
    /// [`View::busy`] is the answer once done waiting.
    pub fn open(&self, tree: &Tree, wire: &str, wait: Option<Duration>) -> Result<Option<UnixStream>, StatusLine> {
        let (scope, path) = self.parse_wire_path(wire)?;
        let not_found = || StatusLine::with_detail(Status::NotFound, wire);
        let forbidden = |why: &str| StatusLine::with_detail(Status::Forbidden, &format!("{why}: {wire}"));
        let refusal = |error: io::Error| match error.raw_os_error() {
            Some(libc::ENOENT) => not_found(),
            Some(libc::ELOOP) => forbidden("symlinks are not followed"),
            Some(libc::EACCES | libc::EPERM) => forbidden("permission denied"),
            Some(libc::ECONNREFUSED) => StatusLine::with_detail(Status::Unavailable, &format!("refused: {wire}")),
            Some(libc::EMFILE | libc::ENFILE) => StatusLine::with_detail(Status::Unavailable, "server overloaded"),
            _ => StatusLine::with_detail(Status::Internal, &format!("{wire}: {error}")),
        };
        let mut directory = tree.scope_dir(&scope);
        // A private scope is trusted only once it is checked to be its
        // owner's alone, as LIST does (the one scope that may be private
        // here is the user's own).
        if matches!(scope, Scope::User(_)) && directory.exists() {
            tree.ensure_scope(&scope).map_err(|error| forbidden(&error.to_string()))?;
        }
        // By path first, for the answer that says what is wrong.
        for component in std::iter::once(None).chain(path.protocol.components().iter().map(Some)) {
            if let Some(component) = component {
                directory.push(component);
            }
            let meta = std::fs::symlink_metadata(&directory).map_err(|_| not_found())?;
            if meta.file_type().is_symlink() {
                return Err(forbidden("symlinks are not followed"));
            }
            if !meta.is_dir() {
                return Err(not_found());
            }
        }
        // Then the socket file itself, opened without following a symlink
        // anywhere below the root: what is checked through its descriptor
        // is what the connect through it reaches, whatever is swapped in
        // meanwhile (a symlink to a private socket, for an exporter
        // running as root).
        let name = path.file.to_string();
        let opened = crate::tree::open_unfollowed(&directory, path.protocol.components().len(), name.as_ref())
            .map_err(|error| match error.raw_os_error() {
                // A directory swapped for a symlink or a file since.
                Some(libc::ENOTDIR) => forbidden("symlinks are not followed"),
                _ => refusal(error),
            })?;
        let stat = nix::sys::stat::fstat(opened.as_raw_fd()).map_err(|errno| refusal(errno.into()))?;
        match stat.st_mode & libc::S_IFMT {
            libc::S_IFSOCK => {}
            libc::S_IFLNK => return Err(forbidden("symlinks are not followed")),
            _ => return Err(forbidden("not a socket")),
        }
        if *self == View::Exported && stat.st_mode & 0o002 == 0 {
            return Err(forbidden("the socket's mode does not let others connect"));
        }
        let through = PathBuf::from(format!("/proc/self/fd/{}", opened.as_raw_fd()));
        // Without /proc (a minimal chroot), by path as checked.
        let target = if Path::new("/proc/self/fd").is_dir() { through } else { directory.join(&name) };
        let stream = match connect_to(&target, wait) {
            Err(error) if error.raw_os_error() == Some(libc::EAGAIN) => return Ok(None),
            connected => connected.map_err(refusal)?,
        };
        if !bound_within(&stream, &directory) {
            return Err(forbidden("the socket is bound elsewhere"));
        }
        Ok(Some(stream))
    }

    /// The answer to a CONNECT whose service stayed busy (its backlog
    /// full) past [`crate::net::BusyWait::PATIENCE`].
    pub fn busy(wire: &str) -> StatusLine {
        StatusLine::with_detail(Status::Unavailable, &format!("busy: {wire}"))
    }
}

/// A connect that leaves the socket nonblocking. Without `wait`, it does
/// not wait at all: a full backlog must answer EAGAIN, not stall the
/// exporter's loop. With it, the kernel waits up to `wait` for room in a
/// full backlog (then EAGAIN).
fn connect_to(path: &Path, wait: Option<Duration>) -> io::Result<UnixStream> {
    let address = UnixAddr::new(path).map_err(io::Error::from)?;
    let flags = if wait.is_some() { SockFlag::SOCK_CLOEXEC } else { SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC };
    let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None).map_err(io::Error::from)?;
    if let Some(wait) = wait {
        // A blocking connect waits for room as long as the send timeout.
        let timeout = nix::sys::time::TimeVal::new(wait.as_secs() as _, wait.subsec_micros() as _);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SendTimeout, &timeout).map_err(io::Error::from)?;
    }
    match connect(fd.as_raw_fd(), &address) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(errno) => return Err(errno.into()),
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// Whether the listener behind `stream` was bound in `directory` (dipus
/// binds at a hidden name there and links it into place). Unnamed or
/// abstract listeners are not in any directory.
fn bound_within(stream: &UnixStream, directory: &Path) -> bool {
    let Ok(address) = getpeername::<UnixAddr>(stream.as_raw_fd()) else {
        return false;
    };
    let Some(bound) = address.path() else {
        return false;
    };
    let bound: PathBuf = bound.to_path_buf();
    bound.parent() == Some(directory)
}
