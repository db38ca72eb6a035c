//! The dead-socket reaper: removes sockets nobody listens on any more,
//! anywhere in the tree, and the protocol directories that become empty.
//!
//! When to look, without polling: a listening socket dies with the last
//! process holding it, so the reaper watches those processes. The kernel's
//! socket diagnostics map each socket file in the tree to its socket, a
//! scan of `/proc/*/fd` maps the socket to the processes holding it, and a
//! pidfd per process becomes readable when it exits: then the reaper
//! sweeps. Sockets appearing (inotify) trigger the mapping again. Where
//! pidfds or `/proc` are unavailable (old kernels, other users' processes
//! when not root) a periodic sweep does the job, and a slow one runs always
//! as a safety net.
//!
//! What to remove is judged by `tree::reap_if_dead`: only a socket whose
//! connect is refused, re-checked under the directory lock with the same
//! inode. A live socket, one that cannot be judged (no permission, say), or
//! anything that is not a socket is never touched.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use mio::{Interest, Registry};

use crate::event_loop;
use crate::probe;
use crate::tree::{self, Tree};
use crate::watch::{Change, TreeWatcher};

/// Sweeps follow exits this soon, so a burst of exits costs one sweep.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// The second look after an exit.
const RECHECK: Duration = Duration::from_secs(1);
/// The next look at sockets whose directory another process held locked.
const BUSY_RETRY: Duration = Duration::from_secs(5);
/// The safety-net sweep.
pub const SLOW_SWEEP: Duration = Duration::from_secs(60);
/// The sweep interval where processes cannot be watched.
pub const FALLBACK_SWEEP: Duration = Duration::from_secs(1);

const WATCHER: usize = 0;
const PIDFD_BASE: usize = 1;
/// Processes watched at most (one pidfd each); past it, sweeps run every
/// [`FALLBACK_SWEEP`] as where processes cannot be watched.
const MAX_WATCHED: usize = 256;

pub struct Reaper {
    tree: Tree,
    watcher: TreeWatcher,
    component: u8,
    /// Process id → its pidfd, for the holders of live sockets.
    processes: HashMap<u32, OwnedFd>,
    /// Whether every live socket's holders could be watched.
    watching_all: bool,
    sweep_at: Option<Instant>,
    /// A process holding a socket exited, or sockets appeared: sweep once
    /// more a little later, for a socket that outlived its server in a
    /// child caught between fork and exec (it closes at exec, with no
    /// event of its own).
    recheck: bool,
    map_at: Option<Instant>,
    next_slow: Instant,
    pub removed: u64,
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Processes holding each of `sockets` (socket inodes), from `/proc`.
fn holders(sockets: &HashSet<u64>) -> HashMap<u64, Vec<u32>> {
    let mut found: HashMap<u64, Vec<u32>> = HashMap::new();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return found;
    };
    for process in processes.filter_map(Result::ok) {
        let Some(pid) = process.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(descriptors) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for descriptor in descriptors.filter_map(Result::ok) {
            let Ok(target) = std::fs::read_link(descriptor.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            if let Some(inode) = inode.filter(|inode| sockets.contains(inode)) {
                let pids = found.entry(inode).or_default();
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
    }
    found
}

impl Reaper {
    pub fn new(tree: Tree, component: u8) -> io::Result<Reaper> {
        tree.ensure_root().map_err(io::Error::other)?;
        let mut watcher = TreeWatcher::new(&tree)?;
        // The exporter beside it says so when the root is made again; this
        // one only needs to follow.
        watcher.keep_root();
        let now = Instant::now();
        Ok(Reaper {
            tree,
            watcher,
            component,
            processes: HashMap::new(),
            watching_all: false,
            sweep_at: Some(now),
            recheck: false,
            map_at: Some(now),
            next_slow: now + SLOW_SWEEP,
            removed: 0,
        })
    }

    pub fn register(&mut self, registry: &Registry) -> io::Result<()> {
        registry.register(
            &mut mio::unix::SourceFd(&self.watcher.fd()),
            event_loop::token(self.component, WATCHER),
            Interest::READABLE,
        )
    }

    pub fn timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        [self.sweep_at, self.map_at, Some(self.next_slow)]
            .into_iter()
            .flatten()
            .min()
            .map(|when| when.saturating_duration_since(now))
    }

    fn schedule_sweep(&mut self, delay: Duration) {
        let when = Instant::now() + delay;
        self.sweep_at = Some(self.sweep_at.map_or(when, |at| at.min(when)));
    }

    pub fn handle_event(&mut self, registry: &Registry, event: &mio::event::Event) {
        let id = event_loop::id(event.token());
        if id == WATCHER {
            let changes = self.watcher.read_changes().unwrap_or_default();
            let _ = self.watcher.take_root_event();
            if changes.iter().any(|change| matches!(change, Change::Added(_))) {
                // New sockets: learn who holds them; a successor may also
                // have made an older one stale. Look once more a little
                // later too: a server that died before it was mapped left
                // no process to watch, and its socket may still have been
                // held at the first look by a child between fork and exec.
                self.map_at.get_or_insert(Instant::now() + DEBOUNCE);
                self.schedule_sweep(DEBOUNCE);
                self.recheck = true;
            }
        } else if id >= PIDFD_BASE {
            let pid = (id - PIDFD_BASE) as u32;
            if let Some(fd) = self.processes.remove(&pid) {
                let _ = registry.deregister(&mut mio::unix::SourceFd(&fd.as_raw_fd()));
            }
            log::debug!("process {pid} holding a service socket exited");
            self.schedule_sweep(DEBOUNCE);
            self.recheck = true;
            // Its sockets may live on in other holders: watch one of those.
            self.map_at.get_or_insert(Instant::now() + DEBOUNCE);
        }
    }

    pub fn handle_timers(&mut self, registry: &Registry) {
        let now = Instant::now();
        if self.map_at.is_some_and(|at| now >= at) {
            self.map_at = None;
            self.map_holders(registry);
        }
        if self.sweep_at.is_some_and(|at| now >= at) || now >= self.next_slow {
            self.sweep_at = None;
            if std::mem::take(&mut self.recheck) {
                self.schedule_sweep(RECHECK);
            }
            self.sweep();
            let interval = if self.watching_all { SLOW_SWEEP } else { FALLBACK_SWEEP };
            self.next_slow = now + interval;
        }
    }

    /// Watches the processes holding every live socket in the tree.
    fn map_holders(&mut self, registry: &Registry) {
        let Some(listening) = probe::listening_sockets() else {
            self.watching_all = false;
            return;
        };
        let services = self.tree.list_trusted();
        let sockets: HashSet<u64> = services
            .iter()
            .filter_map(|service| std::fs::symlink_metadata(&service.full).ok())
            .filter_map(|meta| listening.get(&meta.ino()).copied())
            .collect();
        let holders = holders(&sockets);
        let mut complete = holders.len() == sockets.len();
        // One holder per socket is enough (when it exits, the holders are
        // mapped again): a user forking a thousand children that share
        // one listener must not cost dipusd a thousand descriptors.
        for pids in holders.into_values() {
            if pids.iter().any(|pid| self.processes.contains_key(pid) || *pid == std::process::id()) {
                continue;
            }
            let mut watched = false;
            for pid in pids {
                if self.processes.len() >= MAX_WATCHED {
                    break;
                }
                match pidfd_open(pid) {
                    Ok(fd) => {
                        let token = event_loop::token(self.component, PIDFD_BASE + pid as usize);
                        if registry
                            .register(&mut mio::unix::SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)
                            .is_ok()
                        {
                            self.processes.insert(pid, fd);
                            watched = true;
                            break;
                        }
                    }
                    // Already gone: the sweep will judge its socket.
                    Err(error) if error.raw_os_error() == Some(libc::ESRCH) => self.schedule_sweep(DEBOUNCE),
                    Err(_) => {}
                }
            }
            complete &= watched;
        }
        self.watching_all = complete;
        if !complete {
            log::debug!("cannot watch every service's process; sweeping every {FALLBACK_SWEEP:?}");
            self.next_slow = self.next_slow.min(Instant::now() + FALLBACK_SWEEP);
        }
    }

    /// Removes every dead socket in the tree; returns how many. Never waits
    /// for a directory another process holds locked: its sockets are
    /// judged again a little later.
    pub fn sweep(&mut self) -> usize {
        let listening = probe::listening_inodes();
        let mut removed = 0;
        let mut busy = false;
        for service in self.tree.list_trusted() {
            let depth = service.path.protocol.components().len();
            match tree::reap_if_dead(&service.full, depth, listening.as_ref(), false) {
                Ok(tree::Reaped::Removed) => {
                    log::info!("removed dead socket {}", service.full.display());
                    removed += 1;
                    tree::prune_empty(&self.tree.scope_dir(&service.scope), &service.path.protocol);
                }
                Ok(tree::Reaped::Kept) => {}
                Ok(tree::Reaped::Busy) => {
                    log::debug!("{}: its directory is locked by another process", service.full.display());
                    busy = true;
                }
                Err(error) => log::debug!("cannot judge {}: {error}", service.full.display()),
            }
        }
        if busy {
            self.schedule_sweep(BUSY_RETRY);
        }
        self.removed += removed as u64;
        removed
    }
}
