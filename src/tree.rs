//! The service tree on disk: the root, its scopes and protocol directories,
//! their modes and owners, listing services, and creating and removing
//! service sockets without ever taking a live one.
//!
//! `/tmp` is hostile territory, so:
//! - a root that is a symlink is refused, and so is a root, scope or
//!   protocol directory we are about to write into that someone else could
//!   rearrange under us (owned by another user and not the administrator);
//! - anyone may make a directory in the shared root, so one named like a
//!   user is that user's scope only if the user owns it alone (0700); any
//!   other is no part of the tree: not listed, connected to or reaped;
//! - sockets appear at their public path only once they listen: they are
//!   bound at a hidden temporary name and `link(2)`ed into place, which fails
//!   if the name is taken, so two servers never share a name and a socket is
//!   never seen half-made (refusing connections) by a reaper;
//! - a socket is removed only while holding an exclusive `flock(2)` on its
//!   directory and only if it is still the very inode that was judged
//!   (dead, or ours), so a successor's socket is never removed;
//! - that directory is opened without following a symlink below the scope
//!   and the socket removed relative to it, so a protocol directory swapped
//!   for a symlink meanwhile leads nowhere outside the tree;
//! - anyone who may read a directory may hold its lock, so nobody waits
//!   for it long (see [`LOCK_PATIENCE`]).
//!
//! Limit: programs that bind in place (socat, most servers) are briefly
//! "refusing" between their `bind` and `listen`; a dead-socket judgment can
//! only be as exact as the kernel's answer at that moment.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::name::{self, NameError, Protocol, Scope, ServiceFile, ServicePath};
use crate::probe::{self, Liveness};

pub const DEFAULT_ROOT: &str = "/tmp/dipus";
/// Listen backlog of every socket dipus listens on: a burst of clients
/// must queue, not be refused.
pub const BACKLOG: i32 = 1024;
/// Instances tried before giving up on a name.
const MAX_INSTANCES: u32 = 10_000;

#[derive(Debug, Error)]
pub enum TreeError {
    #[error("{0} is a symlink; refusing to use it as the dipus root (set DIPUS_ROOT to a real directory)")]
    RootSymlink(PathBuf),
    #[error("{path} is owned by uid {owner}, not by root or you; refusing to use it (remove it, or set DIPUS_ROOT)")]
    ForeignOwner { path: PathBuf, owner: u32 },
    #[error("{path} has mode {mode:o}, expected {expected:o}; refusing to use it (fix its mode, or remove it)")]
    WrongMode { path: PathBuf, mode: u32, expected: u32 },
    #[error("{path} is owned by uid {owner}, whose scope would be named {owners_scope:?}; not a user's scope, so nothing in it is used (its owner may remove it)")]
    NotUsersScope { path: PathBuf, owner: u32, owners_scope: String },
    #[error("{0} is not a directory (a symlink or a file is in the way)")]
    NotDirectory(PathBuf),
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot bind a socket at {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("no free instance index for {0} (tried {MAX_INSTANCES})")]
    NoFreeIndex(String),
    #[error("{} leaves no room for service sockets: even the shortest, {}, is {length} bytes, more than the {limit} that fit in a UNIX socket address; use a shorter DIPUS_ROOT", dir.display(), shortest.display())]
    NoRoom { dir: PathBuf, shortest: PathBuf, length: usize, limit: usize },
    #[error(transparent)]
    Name(#[from] NameError),
}

/// A directory we may write into must be, besides a real directory, owned by
/// root or by us: its owner could otherwise replace our sockets.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// The mode bits every scope directory gets (umask notwithstanding).
fn scope_mode(scope: &Scope) -> u32 {
    match scope {
        Scope::Local | Scope::Exported => 0o1777,
        Scope::Imported => 0o755,
        Scope::User(_) => 0o700,
    }
}

/// A service found in the tree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Service {
    pub scope: Scope,
    pub path: ServicePath,
    pub full: PathBuf,
}

impl Service {
    /// The order of DESIGN §2: scope (see [`scope_preference`]), then
    /// protocol, name, host, index.
    fn sort_key<'a>(&'a self, own: &Scope) -> ((u8, &'a str), (&'a Protocol, &'a str, &'a str, u32)) {
        (scope_preference(&self.scope, own), self.path.sort_key())
    }
}

/// Where `scope` comes in preference order: local, exported, our own ssh
/// imports, LAN imports, and only then other users' scopes (which only
/// root can read), by name. Another user's imports reach their hosts as
/// that user: root asking for a service by name must get any other match
/// first, and one user's name must never rank their scope ahead of
/// another's own.
fn scope_preference<'a>(scope: &'a Scope, own: &Scope) -> (u8, &'a str) {
    match scope {
        Scope::Local => (0, ""),
        Scope::Exported => (1, ""),
        Scope::User(_) if scope == own => (2, ""),
        Scope::Imported => (3, ""),
        Scope::User(user) => (4, user),
    }
}

pub fn sort_services(services: &mut [Service]) {
    let own = Tree::own_scope();
    services.sort_by(|a, b| a.sort_key(&own).cmp(&b.sort_key(&own)));
}

/// The name of the scope of user `uid`: their user name, or `uid<N>` for
/// a uid without one that could name a directory.
fn scope_name_of(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|user| user.name)
        .filter(|user| name::valid_user_name(user))
        .unwrap_or_else(|| format!("uid{uid}"))
}

#[derive(Debug, Clone)]
pub struct Tree {
    root: PathBuf,
}

impl Tree {
    /// The tree named by `DIPUS_ROOT`, default `/tmp/dipus`. Refuses a
    /// symlinked root at once, whatever the applet means to do.
    pub fn from_env() -> Result<Tree, TreeError> {
        let root = std::env::var_os("DIPUS_ROOT")
            .filter(|root| !root.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
        Tree::at(root)
    }

    pub fn at(root: PathBuf) -> Result<Tree, TreeError> {
        // Absolute, so paths compare equal whoever computes them, and a
        // daemon that changes directory keeps its tree.
        let root = match root.is_absolute() {
            true => root,
            false => std::env::current_dir().map(|cwd| cwd.join(&root)).unwrap_or(root),
        };
        if let Ok(meta) = fs::symlink_metadata(&root) {
            if meta.file_type().is_symlink() {
                return Err(TreeError::RootSymlink(root));
            }
            // A missing root is an empty tree; a file is a mistake, and
            // listing nothing from it would hide that.
            if !meta.is_dir() {
                return Err(TreeError::NotDirectory(root));
            }
        }
        Ok(Tree { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn scope_dir(&self, scope: &Scope) -> PathBuf {
        self.root.join(scope.dir_name())
    }

    /// The scope of the user running this process (for ssh imports).
    pub fn own_scope() -> Scope {
        Scope::User(scope_name_of(nix::unistd::geteuid().as_raw()))
    }

    /// Refuses a scope too deep for any service: one whose shortest
    /// possible socket path (`<scope>/p/n.h..0`) does not fit in sun_path.
    /// For importers, which learn their names only from the remote side.
    pub fn check_room(&self, scope: &Scope) -> Result<(), TreeError> {
        let dir = self.scope_dir(scope);
        let shortest = dir.join("p").join("n.h..0");
        let length = shortest.as_os_str().len();
        if length > name::SUN_PATH_LIMIT {
            return Err(TreeError::NoRoom { dir, shortest, length, limit: name::SUN_PATH_LIMIT });
        }
        Ok(())
    }

    /// Creates the root (1777, like /tmp) if needed and checks it.
    pub fn ensure_root(&self) -> Result<(), TreeError> {
        make_dir(&self.root, 0o1777)?;
        check_dir(&self.root, None).map(|_| ())
    }

    /// Creates a scope directory if needed, checks its owner and mode.
    pub fn ensure_scope(&self, scope: &Scope) -> Result<PathBuf, TreeError> {
        self.ensure_root()?;
        let dir = self.scope_dir(scope);
        make_dir(&dir, scope_mode(scope))?;
        let meta = check_dir(&dir, None)?;
        match scope {
            Scope::User(_) => {
                if meta.uid() != nix::unistd::geteuid().as_raw() {
                    return Err(TreeError::ForeignOwner { path: dir, owner: meta.uid() });
                }
                if meta.mode() & 0o7777 != 0o700 {
                    return Err(TreeError::WrongMode { path: dir, mode: meta.mode() & 0o7777, expected: 0o700 });
                }
            }
            Scope::Local | Scope::Exported => {
                // Shared like /tmp: anyone may add, nobody may remove others'.
                if meta.mode() & 0o1002 != 0o1002 {
                    return Err(TreeError::WrongMode { path: dir, mode: meta.mode() & 0o7777, expected: 0o1777 });
                }
            }
            Scope::Imported => {}
        }
        Ok(dir)
    }

    /// Creates `<scope>/<protocol…>` with each level checked, so that a
    /// symlink planted in a shared scope cannot redirect our socket. In the
    /// shared scopes a protocol directory another user made is used if it
    /// is sticky and open to all (1777, as we make them): users share
    /// protocols, and its owner can do no more there than any user could.
    pub fn ensure_protocol_dir(&self, scope: &Scope, protocol: &Protocol) -> Result<PathBuf, TreeError> {
        let mut dir = self.ensure_scope(scope)?;
        let mode = scope_mode(scope);
        let shared = matches!(scope, Scope::Local | Scope::Exported);
        for component in protocol.components() {
            dir.push(component);
            make_dir(&dir, mode)?;
            race_point(RacePoint::Made, &dir);
            let meta = fs::symlink_metadata(&dir).map_err(|source| TreeError::Create { path: dir.clone(), source })?;
            if !meta.file_type().is_dir() {
                return Err(TreeError::NotDirectory(dir));
            }
            let shared_with_all = shared && meta.mode() & 0o1777 == 0o1777;
            if !(trusted_owner(meta.uid()) || shared_with_all) {
                return Err(TreeError::ForeignOwner { path: dir, owner: meta.uid() });
            }
        }
        Ok(dir)
    }

    pub fn service_path(&self, scope: &Scope, path: &ServicePath) -> PathBuf {
        let mut full = self.scope_dir(scope);
        full.extend(path.protocol.components());
        full.push(path.file.to_string());
        full
    }

    /// The scopes present, in preference order. Other users' private scopes
    /// are listed only if we can read them (root can), and only if they
    /// pass [`Tree::check_user_scope`]: anyone may make a directory in the
    /// shared root, and one named like a user must not pass for that
    /// user's. Our own is listed whatever its state, for
    /// [`Tree::collect`] to say what is wrong with it.
    pub fn scopes(&self) -> Vec<Scope> {
        let own = Tree::own_scope();
        let mut scopes: Vec<Scope> = match fs::read_dir(&self.root) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|entry| Scope::from_dir_name(entry.file_name().to_str()?))
                .filter(|scope| match scope {
                    Scope::User(user) if *scope != own => match self.check_user_scope(user) {
                        Ok(()) => true,
                        Err(error) => {
                            // Whoever made it decides when it appears, so a
                            // warning would be theirs to print on every
                            // listing.
                            log::debug!("{error}");
                            false
                        }
                    },
                    _ => true,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        scopes.sort_by(|a, b| scope_preference(a, &own).cmp(&scope_preference(b, &own)));
        scopes
    }

    /// Whether `<root>/<user>` is that user's scope: a real directory (not
    /// a symlink), owned by the user whose scope has that name (see
    /// [`Tree::own_scope`]), with mode exactly 0700. Only then is anything
    /// in it listed, connected to or judged dead.
    pub fn check_user_scope(&self, user: &str) -> Result<(), TreeError> {
        let path = self.root.join(user);
        let meta = fs::symlink_metadata(&path).map_err(|source| TreeError::Create { path: path.clone(), source })?;
        if !meta.file_type().is_dir() {
            return Err(TreeError::NotDirectory(path));
        }
        let owners_scope = scope_name_of(meta.uid());
        if owners_scope != user {
            return Err(TreeError::NotUsersScope { path, owner: meta.uid(), owners_scope });
        }
        if meta.mode() & 0o7777 != 0o700 {
            return Err(TreeError::WrongMode { path, mode: meta.mode() & 0o7777, expected: 0o700 });
        }
        Ok(())
    }

    /// Every service socket in the tree, in preference order. Entries that
    /// are not sockets or whose names do not parse are not services.
    pub fn list(&self) -> Result<Vec<Service>, TreeError> {
        self.list_scopes(&self.scopes())
    }

    /// Every service socket in `scopes` (those present), in preference
    /// order. Our own private scope, if among them, is checked first.
    pub fn list_scopes(&self, scopes: &[Scope]) -> Result<Vec<Service>, TreeError> {
        self.collect(scopes, false)
    }

    /// Like [`Tree::list`], but our own private scope, if it fails its
    /// check (another user made a directory of its name in the shared
    /// root, say), is left out with a warning instead of failing the
    /// whole listing: what a daemon keeping the rest of the tree needs.
    pub fn list_trusted(&self) -> Vec<Service> {
        self.collect(&self.scopes(), true).unwrap_or_default()
    }

    fn collect(&self, scopes: &[Scope], skip_untrusted: bool) -> Result<Vec<Service>, TreeError> {
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let own = Tree::own_scope();
        let mut services = Vec::new();
        for scope in self.scopes().into_iter().filter(|scope| scopes.contains(scope)) {
            let dir = self.scope_dir(&scope);
            if scope == own {
                // Our own private scope must really be ours before we trust
                // (and connect to) what is in it.
                match self.ensure_scope(&scope) {
                    Ok(_) => {}
                    Err(error) if skip_untrusted => {
                        if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                            log::debug!("{error}; leaving it out");
                        } else {
                            log::warn!("{error}; leaving it out");
                        }
                        continue;
                    }
                    Err(error) => return Err(error),
                }
            }
            collect_services(&scope, &dir, &mut Vec::new(), &mut services);
        }
        sort_services(&mut services);
        Ok(services)
    }

    /// Reads one service from its full path (used by the watcher). A path
    /// in a directory that fails [`Tree::check_user_scope`] is no service.
    pub fn service_at(&self, full: &Path) -> Option<Service> {
        let relative = full.strip_prefix(&self.root).ok()?;
        let mut components = relative.iter().map(OsStr::to_str);
        let scope = Scope::from_dir_name(components.next()??)?;
        if let Scope::User(user) = &scope {
            self.check_user_scope(user).ok()?;
        }
        let rest: Vec<&str> = components.collect::<Option<_>>()?;
        let path = ServicePath::parse(&rest.join("/")).ok()?;
        Some(Service { scope, path, full: full.to_path_buf() })
    }
}

fn collect_services(scope: &Scope, dir: &Path, protocol: &mut Vec<String>, out: &mut Vec<Service>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        let Some(file_name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if file_type.is_dir() && protocol.len() < name::MAX_PROTOCOL_COMPONENTS {
            protocol.push(file_name);
            collect_services(scope, &entry.path(), protocol, out);
            protocol.pop();
        } else if is_socket(&file_type) && !protocol.is_empty() {
            let (Ok(protocol), Ok(file)) =
                (Protocol::from_components(protocol.clone()), ServiceFile::parse(&file_name))
            else {
                continue;
            };
            out.push(Service { scope: scope.clone(), path: ServicePath { protocol, file }, full: entry.path() });
        }
    }
}

fn is_socket(file_type: &fs::FileType) -> bool {
    use std::os::unix::fs::FileTypeExt;
    file_type.is_socket()
}

/// mkdir with an exact mode, atomically: another process never sees the
/// directory with less than its final mode (Linux's mkdir honours the
/// sticky bit). An existing directory is left as it is (the caller checks
/// it).
fn make_dir(path: &Path, mode: u32) -> Result<(), TreeError> {
    match with_umask(0, || fs::DirBuilder::new().mode(mode).create(path)) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(TreeError::Create { path: path.to_path_buf(), source }),
    }
}

/// Runs `make` with the process's umask set to `mask`, so that what it
/// creates has its final mode from the start.
fn with_umask<T>(mask: u32, make: impl FnOnce() -> T) -> T {
    // SAFETY: umask only swaps the process's mask; dipus makes files in
    // its tree from one thread (tests aside, which set no modes).
    let saved = unsafe { libc::umask(mask as libc::mode_t) };
    let result = make();
    // SAFETY: as above.
    unsafe { libc::umask(saved) };
    result
}

/// A real directory (not a symlink) owned by root or us (or `owner`).
fn check_dir(path: &Path, owner: Option<u32>) -> Result<fs::Metadata, TreeError> {
    let meta = fs::symlink_metadata(path).map_err(|source| TreeError::Create { path: path.to_path_buf(), source })?;
    if !meta.file_type().is_dir() {
        return Err(TreeError::NotDirectory(path.to_path_buf()));
    }
    let owner_ok = match owner {
        Some(owner) => meta.uid() == owner,
        None => trusted_owner(meta.uid()),
    };
    if !owner_ok {
        return Err(TreeError::ForeignOwner { path: path.to_path_buf(), owner: meta.uid() });
    }
    Ok(meta)
}

/// Device and inode: the identity of a socket file, to tell ours from a
/// successor's at the same path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(path: &Path) -> io::Result<FileId> {
        let meta = fs::symlink_metadata(path)?;
        Ok(FileId { dev: meta.dev(), ino: meta.ino() })
    }
}

/// A directory of the tree, opened without following a symlink in any of
/// its last `depth` components (the protocol's, which other users may own
/// and rename in the shared scopes). Names are then looked at and removed
/// in this very directory, so whatever is renamed or swapped for a symlink
/// meanwhile, nothing outside the tree is touched. Holds its `flock` (see
/// [`TreeDir::lock`]) until dropped.
struct TreeDir {
    fd: OwnedFd,
}

/// How long a bind or a removal waits for another process's lock on a
/// directory. dipus holds one for a stat and a connect; a longer hold is
/// someone (any user may lock a directory they can read) holding it on
/// purpose, and waiting for them would hang us.
const LOCK_PATIENCE: Duration = Duration::from_millis(100);

/// Directories whose lock was held past [`LOCK_PATIENCE`]: this process
/// does not wait for them again (an importer removing a thousand proxies
/// from one held directory must not wait a thousand times).
static STARVED: Mutex<Vec<FileId>> = Mutex::new(Vec::new());

/// What [`reap_if_dead`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaped {
    Removed,
    /// Live, not judgeable, not a socket, or no longer there.
    Kept,
    /// Another process holds the directory's lock: judge again later.
    Busy,
}

impl TreeDir {
    /// Opens the directory `dir`, following symlinks only above its last
    /// `depth` components.
    fn open(dir: &Path, depth: usize) -> io::Result<TreeDir> {
        use nix::fcntl::OFlag;
        let fd = walk(dir, depth, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)?;
        Ok(TreeDir { fd })
    }

    /// The file `name` here (not followed if a symlink): its identity and
    /// whether it is a socket.
    fn stat(&self, name: &OsStr) -> io::Result<(FileId, bool)> {
        use nix::sys::stat::{fstatat, SFlag};
        let stat = fstatat(Some(self.fd.as_raw_fd()), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?;
        let is_socket = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFSOCK;
        Ok((FileId { dev: stat.st_dev, ino: stat.st_ino }, is_socket))
    }

    fn remove(&self, name: &OsStr) -> io::Result<()> {
        nix::unistd::unlinkat(Some(self.fd.as_raw_fd()), name, nix::unistd::UnlinkatFlags::NoRemoveDir)?;
        Ok(())
    }

    /// Takes the exclusive `flock` that dipus processes hold while they
    /// judge and remove sockets here. Returns false if another process
    /// holds it past our patience (at once if `wait` is false).
    fn lock(&self, wait: bool) -> io::Result<bool> {
        let id = {
            let stat = nix::sys::stat::fstat(self.fd.as_raw_fd())?;
            FileId { dev: stat.st_dev, ino: stat.st_ino }
        };
        let starved = || STARVED.lock().map(|starved| starved.contains(&id)).unwrap_or(true);
        let deadline = Instant::now() + if wait && !starved() { LOCK_PATIENCE } else { Duration::ZERO };
        let mut pause = Duration::from_millis(1);
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(self.fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(true);
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::WouldBlock {
                return Err(error);
            }
            let now = Instant::now();
            if now >= deadline {
                if wait {
                    if let Ok(mut starved) = STARVED.lock() {
                        if !starved.contains(&id) {
                            starved.push(id);
                        }
                    }
                }
                return Ok(false);
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }
}

/// Opens `dir` with `last` (its flags), `depth` directories below its
/// scope (0: not in the tree), following symlinks only above the scope:
/// the scope and each directory below it are opened in the one before
/// with `O_NOFOLLOW`, so none can be swapped for a symlink meanwhile (the
/// owner of a user's scope may rename it in the shared root).
fn walk(dir: &Path, depth: usize, last: nix::fcntl::OFlag) -> io::Result<OwnedFd> {
    use nix::fcntl::{open, openat, OFlag};
    use nix::sys::stat::Mode;
    let depth = if depth > 0 { depth + 1 } else { 0 };
    let components: Vec<Component> = dir.components().collect();
    let split = components.len().checked_sub(depth).filter(|&split| split > 0).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not below a scope", dir.display()))
    })?;
    let base: PathBuf = components[..split].iter().collect();
    let walk = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let below = &components[split..];
    let first_flags = if below.is_empty() { last } else { walk };
    // SAFETY (both from_raw_fd): open and openat return a new
    // descriptor that nothing else owns.
    let mut fd = unsafe { OwnedFd::from_raw_fd(open(&base, first_flags, Mode::empty())?) };
    for (index, component) in below.iter().enumerate() {
        let Component::Normal(name) = component else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a tree path", dir.display())));
        };
        let flags = if index + 1 == below.len() { last } else { walk } | OFlag::O_NOFOLLOW;
        fd = unsafe { OwnedFd::from_raw_fd(openat(Some(fd.as_raw_fd()), *name, flags, Mode::empty())?) };
    }
    Ok(fd)
}

/// The file `name` in `dir` (`depth` components below its scope), opened
/// as a path only (`O_PATH`), with no symlink followed below the scope,
/// the file itself included: what is checked through the descriptor
/// (fstat) is the file a connect through it (/proc/self/fd/N) reaches,
/// whatever is renamed or swapped in the tree meanwhile.
pub fn open_unfollowed(dir: &Path, depth: usize, name: &OsStr) -> io::Result<OwnedFd> {
    use nix::fcntl::{openat, OFlag};
    let dir = walk(dir, depth, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)?;
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(Some(dir.as_raw_fd()), name, flags, nix::sys::stat::Mode::empty())?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `path`'s directory and file name.
fn split_path(path: &Path) -> io::Result<(&Path, &OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => Ok((dir, name)),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} names no file", path.display()))),
    }
}

/// Removes `path` only if it is still the file `id`. Returns whether it
/// did. `depth` is how many directories below its scope it sits (its
/// protocol's components; 0 for a path outside the tree). If another
/// process holds the directory's lock past our patience, the file stays
/// (a dead socket, for the reaper).
pub fn remove_if_same(path: &Path, depth: usize, id: FileId) -> io::Result<bool> {
    let (dir, name) = split_path(path)?;
    let dir = match TreeDir::open(dir, depth) {
        Ok(dir) => dir,
        Err(error) if matches!(error.raw_os_error(), Some(libc::ENOENT)) => return Ok(false),
        Err(error) => return Err(error),
    };
    if !dir.lock(true)? {
        return Err(io::Error::new(io::ErrorKind::WouldBlock, "another process holds its directory locked"));
    }
    match dir.stat(name) {
        Ok((current, _)) if current == id => dir.remove(name).map(|()| true),
        Ok(_) => Ok(false),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// Removes `path` if it is a socket nobody listens on (connect refused),
/// judged twice: before taking the directory lock and again under it.
/// Live sockets, sockets that cannot be judged and non-sockets stay.
/// `depth` as for [`remove_if_same`]. `listening` (from
/// `probe::listening_inodes`) spares live services a probing connection.
/// `wait`: whether to wait (briefly) for another process's lock.
pub fn reap_if_dead(path: &Path, depth: usize, listening: Option<&HashSet<u64>>, wait: bool) -> io::Result<Reaped> {
    let (dir, name) = split_path(path)?;
    let Ok(dir) = TreeDir::open(dir, depth) else {
        // Gone, or a symlink now: nothing of the tree to judge.
        return Ok(Reaped::Kept);
    };
    let Ok((id, true)) = dir.stat(name) else {
        return Ok(Reaped::Kept);
    };
    // The probe connects by path: only while that path still names the
    // file we opened is its answer about that file.
    let still_here = || FileId::of(path).ok() == Some(id);
    if !still_here() || probe::judge(path, listening) != Liveness::Dead {
        return Ok(Reaped::Kept);
    }
    if !dir.lock(wait)? {
        return Ok(Reaped::Busy);
    }
    if dir.stat(name).ok() != Some((id, true)) || !still_here() || probe::probe(path) != Liveness::Dead {
        return Ok(Reaped::Kept);
    }
    dir.remove(name).map(|()| Reaped::Removed)
}

/// Removes the empty directories of `protocol` from the deepest up to (not
/// including) the scope directory `scope`, each in the directory it was
/// opened in without following symlinks. rmdir fails on anything not
/// empty, so a directory someone is using stays.
pub fn prune_empty(scope: &Path, protocol: &Protocol) {
    use nix::fcntl::{open, openat, OFlag};
    use nix::sys::stat::Mode;
    let walk = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let (Some(root), Some(name)) = (scope.parent(), scope.file_name()) else {
        return;
    };
    // The scope itself not followed either (see `walk`).
    // SAFETY (all from_raw_fd): open and openat return a new descriptor
    // that nothing else owns.
    let Ok(root_fd) = open(root, walk, Mode::empty()).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }) else {
        return;
    };
    let Ok(scope_fd) = openat(Some(root_fd.as_raw_fd()), name, walk | OFlag::O_NOFOLLOW, Mode::empty())
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
    else {
        return;
    };
    let components = protocol.components();
    // parents[i] is the directory holding components[i].
    let mut parents = vec![scope_fd];
    for component in &components[..components.len() - 1] {
        let parent = parents.last().map(AsRawFd::as_raw_fd);
        match openat(parent, OsStr::new(component), walk | OFlag::O_NOFOLLOW, Mode::empty()) {
            Ok(fd) => parents.push(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(_) => return,
        }
    }
    for (parent, component) in parents.iter().zip(components).rev() {
        let removed = nix::unistd::unlinkat(
            Some(parent.as_raw_fd()),
            OsStr::new(component),
            nix::unistd::UnlinkatFlags::RemoveDir,
        );
        if removed.is_err() {
            return;
        }
    }
}

/// A listening service socket at its public path, removed again when
/// dropped, but only while it is still ours.
#[derive(Debug)]
pub struct ServiceSocket {
    /// First, so the name goes before the listener closes.
    placement: Placement,
    listener: UnixListener,
}

/// A socket file we put at its public path: removed again when dropped,
/// but only while it is still the one we put there.
#[derive(Debug)]
struct Placement {
    path: PathBuf,
    /// Directories below the scope (the protocol's components).
    depth: usize,
    id: FileId,
}

impl Drop for Placement {
    fn drop(&mut self) {
        match remove_if_same(&self.path, self.depth, self.id) {
            // The protocol directories it leaves empty go too, as the
            // reaper's do: a server stopping leaves the tree as it found it.
            Ok(true) => prune_protocol_of(&self.path, self.depth),
            Ok(false) => {}
            Err(error) => log::warn!("cannot remove {} (left for the reaper): {error}", self.path.display()),
        }
    }
}

/// [`prune_empty`] for the protocol directories of the socket path `path`,
/// `depth` of them below its scope (none for a path outside the tree).
fn prune_protocol_of(path: &Path, depth: usize) {
    let Some(dir) = path.parent() else {
        return;
    };
    let components: Vec<Component> = dir.components().collect();
    let Some(split) = components.len().checked_sub(depth).filter(|_| depth > 0) else {
        return;
    };
    let scope: PathBuf = components[..split].iter().collect();
    let names: Option<Vec<String>> =
        components[split..].iter().map(|component| component.as_os_str().to_str().map(String::from)).collect();
    if let Some(protocol) = names.and_then(|names| Protocol::from_components(names).ok()) {
        prune_empty(&scope, &protocol);
    }
}

/// How a new service socket is made.
#[derive(Debug, Clone, Default)]
pub struct SocketOptions {
    /// Mode bits for the socket file; `None`: what the umask leaves.
    pub mode: Option<u32>,
    /// Group for the socket file.
    pub group: Option<u32>,
    /// Owner for the socket file (root only).
    pub owner: Option<u32>,
}

static TEMP_COUNTER: AtomicU32 = AtomicU32::new(0);

impl ServiceSocket {
    /// Binds `<scope>/<protocol>/<name>.<host>..<N>` with the first free N.
    /// A stale socket (connect refused) at N is replaced; a live one, or one
    /// that cannot be judged, is left alone and N+1 tried.
    pub fn bind(
        tree: &Tree,
        scope: &Scope,
        name: &str,
        host: &str,
        protocol: &Protocol,
        options: &SocketOptions,
    ) -> Result<ServiceSocket, TreeError> {
        let first = ServicePath { protocol: protocol.clone(), file: ServiceFile::new(name, host, 0)? };
        // Refuse before creating any directory: the error names the path.
        name::check_tree_socket_path(&tree.service_path(scope, &first))?;
        retry_pruned(|| {
            let dir = tree.ensure_protocol_dir(scope, protocol)?;
            Self::bind_in(&dir, first.clone(), options)
        })
    }

    /// Binds exactly `path` (an import mirroring a remote name), replacing
    /// a stale socket but never a live one.
    pub fn bind_exact(
        tree: &Tree,
        scope: &Scope,
        path: &ServicePath,
        options: &SocketOptions,
    ) -> Result<ServiceSocket, TreeError> {
        name::check_tree_socket_path(&tree.service_path(scope, path))?;
        retry_pruned(|| Self::bind_exact_once(tree, scope, path, options))
    }

    fn bind_exact_once(
        tree: &Tree,
        scope: &Scope,
        path: &ServicePath,
        options: &SocketOptions,
    ) -> Result<ServiceSocket, TreeError> {
        let dir = tree.ensure_protocol_dir(scope, &path.protocol)?;
        let staging = Staging::new(&dir, path.protocol.components().len())?;
        let listener = staging.bind(options)?;
        let full = dir.join(path.file.to_string());
        match staging.link(&full, &mut true) {
            Ok(id) => Ok(ServiceSocket { placement: Placement { path: full, depth: staging.depth, id }, listener }),
            Err(source) => Err(TreeError::Bind { path: full, source }),
        }
    }

    fn bind_in(dir: &Path, first: ServicePath, options: &SocketOptions) -> Result<ServiceSocket, TreeError> {
        let staging = Staging::new(dir, first.protocol.components().len())?;
        let listener = staging.bind(options)?;
        let mut service = first;
        // Once a stale socket's directory lock was held past our patience,
        // the next names are taken as they are, without waiting again.
        let mut wait = true;
        loop {
            if service.file.index >= MAX_INSTANCES {
                return Err(TreeError::NoFreeIndex(service.to_string()));
            }
            let full = dir.join(service.file.to_string());
            name::check_tree_socket_path(&full)?;
            match staging.link(&full, &mut wait) {
                Ok(id) => {
                    return Ok(ServiceSocket {
                        placement: Placement { path: full, depth: staging.depth, id },
                        listener,
                    })
                }
                Err(error) if matches!(error.kind(), io::ErrorKind::AlreadyExists | io::ErrorKind::WouldBlock) => {
                    service.file.index += 1;
                }
                Err(source) => return Err(TreeError::Bind { path: full, source }),
            }
        }
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    pub fn path(&self) -> &Path {
        &self.placement.path
    }
}

/// A service socket another process listens on (ssh's master, for a
/// forward), put at its public path by us and removed again when dropped,
/// but only while it is still the one we put there.
#[derive(Debug)]
pub struct PlacedSocket {
    placement: Placement,
    /// The hidden name the other process bound, gone once placed; it still
    /// names the listener to that process (ssh's `-O cancel`).
    bound_at: PathBuf,
}

impl PlacedSocket {
    /// Has `make` bind a listening socket at a hidden name in the
    /// directory of `path`, then links it to exactly `path`, replacing a
    /// stale socket but never a live one, as [`ServiceSocket::bind_exact`].
    pub fn place_exact(
        tree: &Tree,
        scope: &Scope,
        path: &ServicePath,
        options: &SocketOptions,
        make: &mut dyn FnMut(&Path) -> io::Result<()>,
    ) -> Result<PlacedSocket, TreeError> {
        let full = tree.service_path(scope, path);
        name::check_tree_socket_path(&full)?;
        retry_pruned(|| {
            let dir = tree.ensure_protocol_dir(scope, &path.protocol)?;
            let staging = Staging::new(&dir, path.protocol.components().len())?;
            let temp = staging.temp.clone();
            make(&temp).map_err(|source| TreeError::Bind { path: temp.clone(), source })?;
            staging.adopt(options).map_err(|source| TreeError::Bind { path: temp.clone(), source })?;
            match staging.link(&full, &mut true) {
                Ok(id) => Ok(PlacedSocket {
                    placement: Placement { path: full.clone(), depth: staging.depth, id },
                    bound_at: temp,
                }),
                Err(source) => Err(TreeError::Bind { path: full.clone(), source }),
            }
        })
    }

    pub fn path(&self) -> &Path {
        &self.placement.path
    }

    pub fn bound_at(&self) -> &Path {
        &self.bound_at
    }
}

/// How many times a bind is made again after its protocol directory was
/// pruned under it. Each time takes a rival removing the last socket of
/// that very directory (a reaped one, a server stopping) while we were in
/// it, so this is never reached in earnest; it only bounds a livelock.
const PRUNED_ATTEMPTS: u32 = 64;

/// Runs `bind` again if a protocol directory it made was pruned under it:
/// the reaper, and every server taking its last socket out of a directory,
/// remove it once empty. That shows as ENOENT on whichever step came next:
/// the mkdir of the component below (its parent went), the check after a
/// mkdir, the open of the directory, the bind in it, or the check of where
/// the bind landed (a directory made again meanwhile is another one).
fn retry_pruned<T>(mut bind: impl FnMut() -> Result<T, TreeError>) -> Result<T, TreeError> {
    let mut attempts = 0;
    loop {
        match bind() {
            Err(TreeError::Create { source, .. } | TreeError::Bind { source, .. })
                if source.kind() == io::ErrorKind::NotFound && attempts < PRUNED_ATTEMPTS =>
            {
                attempts += 1;
            }
            result => return result,
        }
    }
}

/// The steps of making a socket after which a rival may prune the (still
/// empty) protocol directory: [`retry_pruned`] must cover each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RacePoint {
    /// A directory of the protocol was made (or found).
    Made,
    /// The protocol directory was opened for the hidden name, nothing in
    /// it yet.
    Staged,
}

/// What a test's rival does at a [`RacePoint`].
#[cfg(test)]
type Rival = Box<dyn FnMut(RacePoint, &Path)>;

#[cfg(test)]
thread_local! {
    /// The rival acting at each [`RacePoint`] of this thread, if any.
    static RIVAL: std::cell::RefCell<Option<Rival>> = const { std::cell::RefCell::new(None) };
}

/// Where another process may act on the directory `dir`; tests act as
/// that process here, so the race is run deterministically.
fn race_point(point: RacePoint, dir: &Path) {
    #[cfg(test)]
    RIVAL.with(|rival| {
        if let Some(rival) = rival.borrow_mut().as_mut() {
            rival(point, dir);
        }
    });
    #[cfg(not(test))]
    let _ = (point, dir);
}

/// A socket being made at a hidden name in its protocol directory, to be
/// linked to its public name once complete. The bind itself goes by path
/// (UNIX sockets have no `bindat`); everything else (checking where it
/// landed, its mode and owner, the link, the cleanup) happens in the
/// directory opened without symlinks below the scope ([`TreeDir`]), so the
/// owner of a shared protocol directory who swaps it for a symlink
/// meanwhile cannot have us chmod, chown, link or remove anything outside
/// the tree. The hidden name is removed when dropped.
struct Staging {
    dir: TreeDir,
    /// Directories below the scope.
    depth: usize,
    /// The hidden name, as a path (to bind at) and as a name in `dir`.
    temp: PathBuf,
    name: std::ffi::OsString,
}

impl Staging {
    fn new(dir: &Path, depth: usize) -> Result<Staging, TreeError> {
        let hidden = std::ffi::OsString::from(format!(
            ".new-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let temp = dir.join(&hidden);
        name::check_tree_socket_path(&temp)?;
        let opened = TreeDir::open(dir, depth).map_err(|source| TreeError::Bind { path: dir.to_path_buf(), source })?;
        // A leftover of an earlier process that had our process id.
        let _ = opened.remove(&hidden);
        race_point(RacePoint::Staged, dir);
        Ok(Staging { dir: opened, depth, temp, name: hidden })
    }

    /// Binds and listens at the hidden name, then [`Staging::adopt`]s the
    /// socket: it is complete before anyone can see it.
    fn bind(&self, options: &SocketOptions) -> Result<UnixListener, TreeError> {
        let bind_error = |source| TreeError::Bind { path: self.temp.clone(), source };
        let listen = || crate::net::unix_listen(&self.temp, BACKLOG);
        // A mode of permission bits only is the bind's own, through the
        // umask (no chmod to make); others are set by adopt.
        let (listener, adopted) = match options.mode.filter(|mode| mode & !0o777 == 0) {
            Some(mode) => {
                let listener = with_umask(!mode & 0o777, listen).map_err(bind_error)?;
                (listener, self.adopt(&SocketOptions { mode: None, ..options.clone() }))
            }
            None => {
                let listener = listen().map_err(bind_error)?;
                (listener, self.adopt(options))
            }
        };
        if let Err(error) = adopted {
            if error.kind() == io::ErrorKind::NotFound {
                self.remove_stray();
            }
            return Err(bind_error(error));
        }
        Ok(listener)
    }

    /// After a bind that did not land in the directory we opened: it was
    /// pruned and made again (by another server) meanwhile, and the bind,
    /// by path, went into the new one. The socket at our hidden name there
    /// is the one just bound (the name is this process's alone), and would
    /// stay for ever, dead and unlisted, keeping that directory from being
    /// pruned. Removed in the directory now at that path, opened without
    /// following symlinks below the scope, and only if it is a socket.
    fn remove_stray(&self) {
        let Some(dir) = self.temp.parent() else {
            return;
        };
        if let Ok(now) = TreeDir::open(dir, self.depth) {
            if let Ok((_, true)) = now.stat(&self.name) {
                let _ = now.remove(&self.name);
            }
        }
    }

    /// Checks that the socket just made at the hidden name landed in the
    /// directory we opened and is ours, then gives it its final mode and
    /// owner.
    fn adopt(&self, options: &SocketOptions) -> io::Result<()> {
        use nix::fcntl::{openat, OFlag};
        use nix::sys::stat::{fchmodat, fstat, FchmodatFlags, Mode, SFlag};
        let dirfd = self.dir.fd.as_raw_fd();
        let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        // SAFETY: openat returns a new descriptor that nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(openat(Some(dirfd), self.name.as_os_str(), flags, Mode::empty())?) };
        let stat = fstat(socket.as_raw_fd())?;
        let is_socket = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFSOCK;
        if !is_socket || stat.st_uid != nix::unistd::geteuid().as_raw() {
            return Err(io::Error::other("the socket is not where it was bound: its directory was replaced meanwhile"));
        }
        if let Some(mode) = options.mode {
            let mode = Mode::from_bits_truncate(mode);
            // The descriptor names exactly the socket checked above, even
            // if a symlink took its name since; without /proc, by name.
            match nix::sys::stat::fchmodat(
                None,
                std::ffi::OsString::from(format!("/proc/self/fd/{}", socket.as_raw_fd())).as_os_str(),
                mode,
                FchmodatFlags::FollowSymlink,
            ) {
                Err(nix::errno::Errno::ENOENT) => {
                    fchmodat(Some(dirfd), self.name.as_os_str(), mode, FchmodatFlags::FollowSymlink)?
                }
                result => result?,
            }
        }
        if options.group.is_some() || options.owner.is_some() {
            let (owner, group) =
                (options.owner.map(nix::unistd::Uid::from_raw), options.group.map(nix::unistd::Gid::from_raw));
            nix::unistd::fchownat(
                Some(dirfd),
                self.name.as_os_str(),
                owner,
                group,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
        }
        Ok(())
    }

    /// Links the socket at the hidden name to `target` (in the same
    /// directory). A stale socket at `target` is removed (under the
    /// directory lock, still the same inode) and the link tried again; a
    /// live one gives `AlreadyExists`, one whose directory another process
    /// holds locked `WouldBlock` (and `wait` is cleared: the caller's next
    /// names need not wait for it again).
    fn link(&self, target: &Path, wait: &mut bool) -> io::Result<FileId> {
        let (_, target_name) = split_path(target)?;
        let dirfd = Some(self.dir.fd.as_raw_fd());
        loop {
            match nix::unistd::linkat(dirfd, self.name.as_os_str(), dirfd, target_name, nix::fcntl::AtFlags::empty()) {
                Ok(()) => return self.dir.stat(target_name).map(|(id, _)| id),
                Err(nix::errno::Errno::EEXIST) => {
                    match reap_if_dead(target, self.depth, probe::listening_inodes().as_ref(), *wait)? {
                        Reaped::Removed => {}
                        Reaped::Busy => {
                            *wait = false;
                            return Err(io::Error::new(
                                io::ErrorKind::WouldBlock,
                                "a stale socket is there and another process holds its directory locked",
                            ));
                        }
                        // Not removed: live, unjudgeable, or someone else
                        // was faster. Check the last case so we do not skip
                        // a name that has just become free.
                        Reaped::Kept if self.dir.stat(target_name).is_ok() => {
                            return Err(io::Error::from(io::ErrorKind::AlreadyExists))
                        }
                        Reaped::Kept => {}
                    }
                }
                Err(errno) => return Err(errno.into()),
            }
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = self.dir.remove(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh directory for one test, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("dipus-tree-{}-{test}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn dead_socket(path: &Path) -> FileId {
        drop(UnixListener::bind(path).unwrap());
        FileId::of(path).unwrap()
    }

    fn protocol(text: &str) -> Protocol {
        Protocol::parse(text).unwrap()
    }

    /// Our own scope open to others (or another user's directory of its
    /// name) fails a listing, but the reaper's listing leaves it out and
    /// keeps the rest of the tree (it used to see nothing at all).
    #[test]
    fn an_untrusted_own_scope_is_left_out_of_the_trusted_listing() {
        use std::os::unix::fs::PermissionsExt;
        let scratch = Scratch::new("untrusted");
        let tree = Tree::at(scratch.0.clone()).unwrap();
        fs::create_dir_all(scratch.0.join("local").join("p")).unwrap();
        let _live = UnixListener::bind(scratch.0.join("local").join("p").join("x.h..0")).unwrap();
        let own = tree.scope_dir(&Tree::own_scope());
        fs::create_dir_all(&own).unwrap();
        fs::set_permissions(&own, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(tree.list().is_err(), "a scope open to others was trusted");
        let trusted: Vec<PathBuf> = tree.list_trusted().into_iter().map(|service| service.full).collect();
        assert_eq!(trusted, [scratch.0.join("local").join("p").join("x.h..0")]);
    }

    /// A user's scope renamed by its owner in the shared root and replaced
    /// by a symlink after the reaper listed it: judging, removing and
    /// pruning through it reach nothing outside the tree.
    #[test]
    fn a_scope_swapped_for_a_symlink_is_not_followed() {
        let scratch = Scratch::new("scope-swap");
        let scope = scratch.0.join("alice");
        let victim = scratch.0.join("elsewhere");
        fs::create_dir_all(victim.join("p")).unwrap();
        let id = dead_socket(&victim.join("p").join("x.h..0"));
        std::os::unix::fs::symlink(&victim, &scope).unwrap();

        let through = scope.join("p").join("x.h..0");
        assert_eq!(reap_if_dead(&through, 1, None, true).unwrap(), Reaped::Kept);
        assert!(remove_if_same(&through, 1, id).is_err(), "a symlinked scope was opened");
        fs::remove_file(victim.join("p").join("x.h..0")).unwrap();
        prune_empty(&scope, &protocol("p"));
        assert!(victim.join("p").is_dir(), "a directory outside the tree was pruned");
    }

    /// A protocol directory renamed and replaced by a symlink after the
    /// reaper listed it (or before a server removes its socket) leads
    /// nowhere: judging, removing and pruning stay in the tree.
    #[test]
    fn a_protocol_directory_swapped_for_a_symlink_is_not_followed() {
        let scratch = Scratch::new("swap");
        let scope = scratch.0.join("local");
        let victim = scratch.0.join("victim");
        fs::create_dir_all(scope.join("moved")).unwrap();
        fs::create_dir_all(victim.join("sub")).unwrap();
        let id = dead_socket(&victim.join("x.h..0"));
        dead_socket(&victim.join("sub").join("y.h..0"));
        std::os::unix::fs::symlink(&victim, scope.join("b")).unwrap();

        let through = scope.join("b").join("x.h..0");
        assert_eq!(reap_if_dead(&through, 1, None, true).unwrap(), Reaped::Kept);
        assert!(remove_if_same(&through, 1, id).is_err(), "a symlinked protocol directory was opened");
        let deeper = scope.join("b").join("sub").join("y.h..0");
        assert_eq!(reap_if_dead(&deeper, 2, None, true).unwrap(), Reaped::Kept);
        fs::remove_file(victim.join("sub").join("y.h..0")).unwrap();
        prune_empty(&scope, &protocol("b/sub"));
        assert!(victim.join("x.h..0").exists(), "a socket outside the tree was removed");
        assert!(victim.join("sub").is_dir(), "a directory outside the tree was pruned");

        // The same paths through a real directory are judged and removed.
        let real = scope.join("moved").join("x.h..0");
        dead_socket(&real);
        assert_eq!(reap_if_dead(&real, 1, None, true).unwrap(), Reaped::Removed);
        prune_empty(&scope, &protocol("moved"));
        assert!(!scope.join("moved").exists() && scope.is_dir(), "the emptied protocol directory stays");
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    /// The owner of a shared protocol directory swaps it for a symlink
    /// while a socket is made in it: the socket's mode goes to our socket
    /// alone, and a bind that landed elsewhere is refused, not linked.
    #[test]
    fn a_directory_swapped_while_a_socket_is_made_leads_nowhere() {
        let scratch = Scratch::new("staging");
        let scope = scratch.0.join("local");
        let victim = scratch.0.join("victim");
        fs::create_dir_all(scope.join("p")).unwrap();
        fs::create_dir_all(&victim).unwrap();
        let secret = victim.join("secret");
        fs::write(&secret, "x").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let options = SocketOptions { mode: Some(0o666), ..SocketOptions::default() };

        // Swapped after the bind: a symlink at the hidden name in the
        // directory now at that path must not pass the chmod on.
        let staging = Staging::new(&scope.join("p"), 1).unwrap();
        let listener = UnixListener::bind(&staging.temp).unwrap();
        fs::rename(scope.join("p"), scope.join("moved")).unwrap();
        fs::create_dir_all(scope.join("p")).unwrap();
        std::os::unix::fs::symlink(&secret, scope.join("p").join(&staging.name)).unwrap();
        staging.adopt(&options).unwrap();
        assert_eq!(mode_of(&secret), 0o600, "the chmod followed a symlink out of the tree");
        assert_eq!(mode_of(&scope.join("moved").join(&staging.name)), 0o666, "our socket did not get its mode");
        drop((staging, listener));

        // Swapped before the bind: the socket lands outside, is refused,
        // and nothing is linked to a public name.
        fs::remove_dir_all(scope.join("p")).unwrap();
        fs::create_dir_all(scope.join("p")).unwrap();
        let staging = Staging::new(&scope.join("p"), 1).unwrap();
        fs::rename(scope.join("p"), scope.join("moved2")).unwrap();
        std::os::unix::fs::symlink(&victim, scope.join("p")).unwrap();
        // No mode: a bind with one swaps the process's umask, which other
        // tests running in parallel threads would feel.
        assert!(staging.bind(&SocketOptions::default()).is_err(), "a socket bound outside the tree was adopted");
        assert_eq!(mode_of(&secret), 0o600);
        assert!(fs::read_dir(scope.join("moved2")).unwrap().next().is_none(), "something was linked in");
    }

    /// Has `rival` act at every [`RacePoint`] of this thread (None: no more).
    fn set_rival(rival: Option<Rival>) {
        RIVAL.with(|slot| *slot.borrow_mut() = rival);
    }

    /// What the reaper or a stopping server does after taking the last
    /// socket out of `dir`: prune it and its empty parents up to `scope`.
    fn prune_as_a_rival(scope: &Path, dir: &Path) {
        let components: Vec<String> =
            dir.strip_prefix(scope).unwrap().iter().map(|c| c.to_str().unwrap().to_string()).collect();
        prune_empty(scope, &Protocol::from_components(components).unwrap());
    }

    /// A rival that prunes twelve times, each time at the next of the four
    /// race points of making a socket in `<scope>/a/b/c` (after each mkdir,
    /// after the open for the hidden name), so that each is hit three
    /// times; the count of its prunes.
    fn pruning_rival(scope: PathBuf) -> std::rc::Rc<std::cell::Cell<u32>> {
        let pruned = std::rc::Rc::new(std::cell::Cell::new(0));
        let count = std::rc::Rc::clone(&pruned);
        // A pruned attempt fails at once: its next point is the next
        // attempt's first.
        let mut points_since = 0;
        set_rival(Some(Box::new(move |_, dir| {
            if count.get() < 12 && points_since == count.get() % 4 {
                prune_as_a_rival(&scope, dir);
                count.set(count.get() + 1);
                points_since = 0;
            } else {
                points_since += 1;
            }
        })));
        pruned
    }

    /// The protocol directories pruned after each is made, and after it is
    /// opened for the hidden name, twelve times over (a parent gone fails
    /// the mkdir below it, a directory gone its check, open or bind): every
    /// way of making a socket makes them again and binds. They used to
    /// retry a failed bind alone, three times, and fail on a failed mkdir
    /// (dipus-local-pipe exiting 1 while the reaper pruned its directory).
    #[test]
    fn a_bind_makes_its_protocol_directories_again_however_often_they_are_pruned() {
        let scratch = Scratch::new("pruned");
        let tree = Tree::at(scratch.0.join("tree")).unwrap();
        let scope = tree.scope_dir(&Scope::Local);
        let options = SocketOptions::default();

        let pruned = pruning_rival(scope.clone());
        let bound = ServiceSocket::bind(&tree, &Scope::Local, "first", "h", &protocol("a/b/c"), &options);
        set_rival(None);
        let bound = bound.expect("bind after its directories were pruned");
        assert_eq!(pruned.get(), 12, "the rival did not prune twelve times");
        assert_eq!(bound.path(), scope.join("a/b/c/first.h..0"));
        assert!(std::os::unix::net::UnixStream::connect(bound.path()).is_ok());
        drop(bound);

        let pruned = pruning_rival(scope.clone());
        let exact = ServicePath::parse("a/b/c/exact.h..0").unwrap();
        let bound = ServiceSocket::bind_exact(&tree, &Scope::Local, &exact, &options);
        set_rival(None);
        let bound = bound.expect("bind_exact after its directories were pruned");
        assert_eq!(pruned.get(), 12);
        assert_eq!(bound.path(), scope.join("a/b/c/exact.h..0"));
        drop(bound);

        let pruned = pruning_rival(scope.clone());
        let path = ServicePath::parse("a/b/c/placed.h..0").unwrap();
        let mut listeners = Vec::new();
        let mut make = |temp: &Path| UnixListener::bind(temp).map(|listener| listeners.push(listener));
        let placed = PlacedSocket::place_exact(&tree, &Scope::Local, &path, &options, &mut make);
        set_rival(None);
        let placed = placed.expect("place_exact after its directories were pruned");
        assert_eq!(pruned.get(), 12);
        assert_eq!(placed.path(), scope.join("a/b/c/placed.h..0"));
    }

    /// The protocol directory pruned and made again by another server
    /// between its opening and the bind: the bind lands in the new one, is
    /// refused there (not where it was opened) and made again; the socket
    /// it left at the hidden name there is removed, not left for ever.
    #[test]
    fn a_bind_into_a_directory_made_again_meanwhile_leaves_no_stray_socket() {
        let scratch = Scratch::new("remade");
        let tree = Tree::at(scratch.0.join("tree")).unwrap();
        let scope = tree.scope_dir(&Scope::Local);
        let mut remade = false;
        set_rival(Some(Box::new(move |point, dir| {
            if point == RacePoint::Staged && !std::mem::replace(&mut remade, true) {
                fs::remove_dir(dir).unwrap();
                make_dir(dir, 0o1777).unwrap();
            }
        })));
        let bound = ServiceSocket::bind(&tree, &Scope::Local, "x", "h", &protocol("p"), &SocketOptions::default());
        set_rival(None);
        let bound = bound.expect("bind after its directory was made again");
        let names: Vec<String> =
            fs::read_dir(scope.join("p")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, ["x.h..0"], "a stray socket was left beside the service");
        drop(bound);
    }

    /// Holds the directory's lock as another process (or any user who may
    /// read it) could.
    fn hold(dir: &Path) -> fs::File {
        let file = fs::File::open(dir).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0);
        file
    }

    /// Runs `f` on another thread and fails the test if it does not
    /// return within a generous bound: it must not wait for the lock.
    fn returns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || sender.send(f()));
        receiver.recv_timeout(Duration::from_secs(10)).expect("it waited for the held lock")
    }

    #[test]
    fn a_held_directory_lock_is_not_waited_for_beyond_patience() {
        let scratch = Scratch::new("held");
        let dir = scratch.0.join("local").join("p");
        fs::create_dir_all(&dir).unwrap();
        let stale = dir.join("old.h..0");
        let id = dead_socket(&stale);
        let lock = hold(&dir);

        let path = stale.clone();
        assert_eq!(returns(move || reap_if_dead(&path, 1, None, false).unwrap()), Reaped::Busy);
        let path = stale.clone();
        assert_eq!(returns(move || reap_if_dead(&path, 1, None, true).unwrap()), Reaped::Busy);
        let path = stale.clone();
        let error = returns(move || remove_if_same(&path, 1, id).unwrap_err());
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
        assert!(stale.exists(), "removed while another process held the lock");

        drop(lock);
        assert_eq!(reap_if_dead(&stale, 1, None, false).unwrap(), Reaped::Removed);
    }
}
