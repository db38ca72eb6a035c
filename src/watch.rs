//! Watching the tree: services appearing and vanishing anywhere under the
//! root, as `Added`/`Removed` changes. Used by the monitor, `dls -w`, SEP
//! `WATCH` and the daemons.
//!
//! Event-driven by inotify, recursively: every directory gets a watch, and
//! a directory created later is watched and then scanned, so sockets made in
//! it before its watch existed are not missed. The watcher keeps the set of
//! services it has reported, so every change is reported exactly once, and
//! an inotify queue overflow is repaired by a rescan that reports the
//! difference. Linux only (inotify); other systems would need a periodic
//! rescan, which this module does not offer yet.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::tree::{FileId, Service, Tree};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added(Service),
    Removed(Service),
    /// A service's mode, owner or links changed (socat's `mode=` sets the
    /// mode after the bind): who may connect to it may have changed.
    Modified(Service),
}

/// What became of the root of a watcher that keeps it
/// ([`keep_root`](TreeWatcher::keep_root)), for the daemon to log and act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootEvent {
    /// The root was removed or moved away (its services were reported
    /// removed) and a root is watched at its path again, made anew or
    /// found made by another process (its services reported added).
    Renewed,
    /// The root was removed or moved away and none can be watched at its
    /// path, for the reason given. Tried again whenever something changes
    /// in the root's parent.
    Unavailable(String),
}

/// A reported service and the socket file it was reported for, so that
/// another file put at its path (renamed over it) is told apart.
struct Known {
    service: Service,
    id: FileId,
}

pub struct TreeWatcher {
    tree: Tree,
    inotify: Inotify,
    directories: HashMap<WatchDescriptor, PathBuf>,
    /// What has been reported, by full path.
    known: BTreeMap<PathBuf, Known>,
    /// Changes found while setting up watches, not yet handed out.
    pending: Vec<Change>,
    /// A watch on the root's parent, for the root itself being removed or
    /// moved away: the root's own IN_DELETE_SELF comes only once nothing
    /// holds the directory any more, and every socket bound below it does.
    parent: Option<WatchDescriptor>,
    /// The parent watch is for good (a client's, see
    /// [`follow_root`](Self::follow_root)), not only while the root of a
    /// watcher that keeps it may be going.
    following_root: bool,
    /// A daemon's: a root removed or moved away is made again and watched.
    keep_root: bool,
    /// The root watched, as it was when its watch was added: a path that
    /// names another directory now names another tree.
    root_id: Option<FileId>,
    /// Not yet taken by [`take_root_event`](Self::take_root_event).
    root_event: Option<RootEvent>,
    /// The root is lost and could not be watched again (reported once).
    root_unavailable: bool,
}

fn watch_flags() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
        | AddWatchFlags::IN_DONT_FOLLOW
}

impl TreeWatcher {
    /// Watches the whole tree (the root must exist). The services present
    /// now are in [`current`](Self::current), not reported as changes.
    pub fn new(tree: &Tree) -> io::Result<TreeWatcher> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(io::Error::from)?;
        let mut watcher = TreeWatcher {
            tree: tree.clone(),
            inotify,
            directories: HashMap::new(),
            known: BTreeMap::new(),
            pending: Vec::new(),
            parent: None,
            following_root: false,
            keep_root: false,
            root_id: None,
            root_event: None,
            root_unavailable: false,
        };
        watcher.watch_root()?;
        watcher.pending.clear();
        Ok(watcher)
    }

    /// For daemons, which outlive anything done to the tree: once the root
    /// is removed or moved away (a /tmp cleaner, `rm -rf`), its services
    /// are reported removed, the root is made again (or the one another
    /// process made is taken) and watched, and its services are reported
    /// added; see [`take_root_event`](Self::take_root_event). Without it
    /// the watcher would stay on the old directory, blind for good.
    ///
    /// The root's parent (usually /tmp) is watched only from the moment a
    /// scope directory goes, which is how a root with live sockets below
    /// it starts to be removed, until one is made again: not for good, as
    /// its every change would wake the daemon.
    pub fn keep_root(&mut self) {
        self.keep_root = true;
    }

    /// What became of the root since the last call (see
    /// [`keep_root`](Self::keep_root)).
    pub fn take_root_event(&mut self) -> Option<RootEvent> {
        self.root_event.take()
    }

    /// Also watches the root's parent, so that the root itself being
    /// removed or moved away is noticed at once, for the clients that wait
    /// with [`wait_changes`](Self::wait_changes). Not for daemons: the
    /// parent is usually /tmp, whose every deletion would wake them.
    pub fn follow_root(&mut self) {
        self.following_root = true;
        self.watch_parent();
    }

    fn watch_parent(&mut self) {
        if self.parent.is_some() {
            return;
        }
        if let Some(parent) = self.tree.root().parent() {
            let mut flags = AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_ONLYDIR;
            if self.keep_root {
                // A root made again by another process, or what was in the
                // way of making it removed: time to try again.
                flags |= AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO;
            }
            // Without it (a parent we may not read), a removed root is
            // noticed when the last socket below it is closed.
            self.parent = self.inotify.add_watch(parent, flags).ok();
        }
    }

    /// Drops the parent watch a keeping watcher holds while its root may
    /// be going (not a client's).
    fn unwatch_parent(&mut self) {
        if self.following_root {
            return;
        }
        if let Some(parent) = self.parent.take() {
            let _ = self.inotify.rm_watch(parent);
        }
    }

    fn root_watched(&self) -> bool {
        self.directories.values().any(|directory| directory == self.tree.root())
    }

    /// Whether the root's path no longer names the directory watched.
    fn root_replaced(&self) -> bool {
        FileId::of(self.tree.root()).ok() != self.root_id
    }

    fn watch_root(&mut self) -> io::Result<()> {
        // The identity first: a root swapped between the two is then seen
        // as another one than recorded, and watched again.
        self.root_id = FileId::of(self.tree.root()).ok();
        self.watch_directory(self.tree.root().to_path_buf())
    }

    /// The root is gone: everything under it is reported removed, then a
    /// root is made at its path and watched (a symlink or a directory of
    /// a stranger in its place is refused by `ensure_root`, and by the
    /// watch's IN_DONT_FOLLOW).
    fn renew_root(&mut self) {
        let root = self.tree.root().to_path_buf();
        self.forget_directory(&root);
        // To hear of it when the way is clear, if it is not now.
        self.watch_parent();
        let outcome = match self.tree.ensure_root() {
            Ok(()) => self.watch_root().map_err(|error| format!("cannot watch {}: {error}", root.display())),
            Err(error) => Err(error.to_string()),
        };
        match outcome {
            Ok(()) => {
                log::debug!("{}: watching the root made again", root.display());
                self.root_event = Some(RootEvent::Renewed);
                self.root_unavailable = false;
                self.unwatch_parent();
            }
            Err(error) => {
                self.forget_directory(&root);
                if !self.root_unavailable {
                    self.root_event = Some(RootEvent::Unavailable(error));
                }
                self.root_unavailable = true;
            }
        }
    }

    pub fn fd(&self) -> RawFd {
        self.inotify.as_fd().as_raw_fd()
    }

    /// The services known now, in preference order.
    pub fn current(&self) -> Vec<Service> {
        let mut services: Vec<Service> = self.known.values().map(|known| known.service.clone()).collect();
        crate::tree::sort_services(&mut services);
        services
    }

    /// Reads every queued event (nonblocking) and returns the changes.
    pub fn read_changes(&mut self) -> io::Result<Vec<Change>> {
        loop {
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(error) => return Err(error.into()),
            };
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    self.rescan_into_pending();
                    continue;
                }
                if Some(event.wd) == self.parent {
                    let root = self.tree.root().to_path_buf();
                    let going = AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM;
                    // A late event for a root already made again names the
                    // old one: only a path that names another is gone.
                    if event.mask.contains(AddWatchFlags::IN_ISDIR)
                        && event.mask.intersects(going)
                        && event.name.as_deref() == root.file_name()
                        && self.root_replaced()
                    {
                        self.forget_directory(&root);
                    }
                    continue;
                }
                let Some(directory) = self.directories.get(&event.wd).cloned() else {
                    continue;
                };
                if event
                    .mask
                    .intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_IGNORED)
                {
                    self.forget_directory(&directory);
                    if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                        self.directories.remove(&event.wd);
                    }
                    continue;
                }
                let Some(name) = event.name.as_deref() else {
                    continue;
                };
                let path = directory.join(name);
                let is_dir = event.mask.contains(AddWatchFlags::IN_ISDIR);
                if event.mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
                    if is_dir {
                        if directory == self.tree.root() {
                            // A scope is back: the tree is in use again.
                            self.unwatch_parent();
                        }
                        // Watch first, then scan: nothing made in between
                        // is missed, and `known` dedupes what is seen twice.
                        let _ = self.watch_directory(path);
                    } else {
                        self.consider(&path);
                    }
                } else if event.mask.intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM) {
                    if is_dir {
                        self.forget_directory(&path);
                        if self.keep_root && directory == self.tree.root() {
                            // The root may be next (`rm -rf` empties it
                            // first): hear of it from its parent, and see
                            // whether it went already.
                            self.watch_parent();
                            if self.root_replaced() {
                                self.forget_directory(&directory);
                            }
                        }
                    } else if let Some(known) = self.known.remove(&path) {
                        self.pending.push(Change::Removed(known.service));
                    }
                } else if event.mask.contains(AddWatchFlags::IN_ATTRIB) && !is_dir {
                    if let Some(known) = self.known.get(&path) {
                        self.pending.push(Change::Modified(known.service.clone()));
                    }
                }
            }
        }
        if self.keep_root && !self.root_watched() {
            self.renew_root();
        }
        Ok(std::mem::take(&mut self.pending))
    }

    /// Blocks until there are changes and returns them (for one-shot
    /// clients; daemons put [`fd`](Self::fd) in their event loop instead).
    /// `output` is where the caller prints: if its reader goes away while
    /// nothing changes, this returns `BrokenPipe` rather than wait on.
    /// Once the root itself is removed or moved away, after the services
    /// under it were reported gone, this returns `NotFound`: a root made
    /// again in its place would never be watched, and waiting on would
    /// report nothing, for ever.
    pub fn wait_changes(&mut self, output: RawFd) -> io::Result<Vec<Change>> {
        loop {
            let changes = self.read_changes()?;
            if !changes.is_empty() {
                return Ok(changes);
            }
            if !self.root_watched() {
                let root = self.tree.root().display();
                return Err(io::Error::new(io::ErrorKind::NotFound, format!("{root} was removed or moved away")));
            }
            let mut fds = [
                libc::pollfd { fd: self.fd(), events: libc::POLLIN, revents: 0 },
                // No events asked: only errors and hang-ups are reported.
                libc::pollfd { fd: output, events: 0, revents: 0 },
            ];
            // SAFETY: a valid array of two pollfds; no timeout.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ready < 0 {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
                continue;
            }
            if fds[1].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
        }
    }

    /// Compares the tree on disk with what was reported and queues the
    /// difference (after an overflow, when events were lost).
    fn rescan_into_pending(&mut self) {
        if self.root_replaced() {
            // Lost with the events: the root itself went.
            let root = self.tree.root().to_path_buf();
            self.forget_directory(&root);
            return;
        }
        let on_disk: BTreeSet<PathBuf> =
            self.tree.list().unwrap_or_default().into_iter().map(|service| service.full).collect();
        let gone: Vec<PathBuf> = self.known.keys().filter(|path| !on_disk.contains(*path)).cloned().collect();
        for path in gone {
            if let Some(known) = self.known.remove(&path) {
                self.pending.push(Change::Removed(known.service));
            }
        }
        // New ones, and known paths where another socket took the place
        // of the one reported.
        for path in on_disk {
            self.consider(&path);
        }
        // Directories made while the queue overflowed need watches too.
        let _ = self.watch_directory(self.tree.root().to_path_buf());
    }

    /// Adds a watch on `directory` and everything below it, reporting the
    /// services found there.
    fn watch_directory(&mut self, directory: PathBuf) -> io::Result<()> {
        let depth = directory.strip_prefix(self.tree.root()).map(|relative| relative.components().count()).unwrap_or(0);
        // Scope + protocol components: nothing deeper is a service.
        if depth > crate::name::MAX_PROTOCOL_COMPONENTS + 1 {
            return Ok(());
        }
        // Fails if gone already, not a directory, or not ours to read.
        let descriptor = self.inotify.add_watch(&directory, watch_flags())?;
        self.directories.insert(descriptor, directory.clone());
        let Ok(entries) = std::fs::read_dir(&directory) else {
            return Ok(());
        };
        for entry in entries.filter_map(Result::ok) {
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if file_type.is_dir() {
                let _ = self.watch_directory(entry.path());
            } else {
                self.consider(&entry.path());
            }
        }
        Ok(())
    }

    /// A file made at `path` or renamed to it: a service if it is a socket
    /// with a service's name. At a path already reported, rename(2) may
    /// have put anything in place of the socket (a file, a symlink,
    /// another socket) with no deletion event: unless it is the very
    /// socket reported, that service is gone, and a new socket there is a
    /// new service.
    fn consider(&mut self, path: &Path) {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if path.file_name().and_then(OsStr::to_str).is_none_or(|n| n.starts_with('.')) {
            return;
        }
        let socket = std::fs::symlink_metadata(path)
            .ok()
            .filter(|meta| meta.file_type().is_socket())
            .map(|meta| FileId { dev: meta.dev(), ino: meta.ino() });
        if let Some(known) = self.known.get(path) {
            if Some(known.id) == socket {
                return;
            }
            if let Some(known) = self.known.remove(path) {
                self.pending.push(Change::Removed(known.service));
            }
        }
        let Some(id) = socket else {
            return;
        };
        if let Some(service) = self.tree.service_at(path) {
            self.known.insert(path.to_path_buf(), Known { service: service.clone(), id });
            self.pending.push(Change::Added(service));
        }
    }

    /// A directory went away: everything reported under it is gone.
    fn forget_directory(&mut self, directory: &Path) {
        let gone: Vec<PathBuf> = self
            .known
            .range(directory.to_path_buf()..)
            .take_while(|(path, _)| path.starts_with(directory))
            .map(|(path, _)| path.clone())
            .collect();
        for path in gone {
            if let Some(known) = self.known.remove(&path) {
                self.pending.push(Change::Removed(known.service));
            }
        }
        let stale: Vec<WatchDescriptor> = self
            .directories
            .iter()
            .filter(|(_, path)| path.starts_with(directory))
            .map(|(descriptor, _)| *descriptor)
            .collect();
        for descriptor in stale {
            self.directories.remove(&descriptor);
            let _ = self.inotify.rm_watch(descriptor);
        }
    }
}
