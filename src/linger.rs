//! Child processes left to finish on their own: an ssh that still passes on
//! what a gone client sent (see `SshChannel::let_finish`). Bounded in
//! number and in time, so a client that sends and leaves, again and again,
//! cannot make the importer hold processes without end: past the cap the
//! oldest is killed, and each is killed once its time is up.

use std::process::Child;
use std::time::{Duration, Instant};

/// How long an ssh process may take to pass on what a gone client sent.
pub const LINGER: Duration = Duration::from_secs(30);
/// Most processes left to finish at once; past it the oldest goes.
pub const MAX_LINGERING: usize = 64;
/// How often the owner should [`Lingering::sweep`] while any are left.
pub const LINGER_CHECK: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct Lingering {
    children: Vec<(Child, Instant)>,
    limit: usize,
    patience: Duration,
}

impl Default for Lingering {
    fn default() -> Self {
        Lingering::new(MAX_LINGERING, LINGER)
    }
}

impl Lingering {
    pub fn new(limit: usize, patience: Duration) -> Self {
        Lingering { children: Vec::new(), limit: limit.max(1), patience }
    }

    /// Leaves `child` to finish until `now` + the patience, killing the
    /// oldest if the set is full.
    pub fn add(&mut self, child: Child, now: Instant) {
        if self.children.len() >= self.limit {
            let (oldest, _) = self.children.remove(0);
            end(oldest);
        }
        self.children.push((child, now + self.patience));
    }

    /// Reaps the children that ended and kills those whose time is up.
    pub fn sweep(&mut self, now: Instant) {
        let mut kept = Vec::with_capacity(self.children.len());
        for (mut child, until) in self.children.drain(..) {
            if now < until && matches!(child.try_wait(), Ok(None)) {
                kept.push((child, until));
            } else {
                end(child);
            }
        }
        self.children = kept;
    }

    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Kills (and reaps) every child left.
    pub fn clear(&mut self) {
        self.children.drain(..).for_each(|(child, _)| end(child));
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Kills `child` unless it has ended, and reaps it either way.
fn end(mut child: Child) {
    if !matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sleeper() -> (Child, nix::unistd::Pid) {
        let child = Command::new("sleep").arg("60").spawn().expect("sleep runs");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        (child, pid)
    }

    /// Whether `pid` still names a process (ours are reaped by `end`, so a
    /// killed one is gone, not a zombie).
    fn exists(pid: nix::unistd::Pid) -> bool {
        nix::sys::signal::kill(pid, None).is_ok()
    }

    #[test]
    fn past_the_limit_the_oldest_is_killed() {
        let now = Instant::now();
        let mut set = Lingering::new(2, LINGER);
        let pids: Vec<_> = (0..3)
            .map(|_| {
                let (child, pid) = sleeper();
                set.add(child, now);
                pid
            })
            .collect();
        assert_eq!(set.len(), 2);
        assert!(!exists(pids[0]), "the oldest was killed and reaped");
        assert!(exists(pids[1]) && exists(pids[2]), "the newer two still run");
        set.clear();
        assert!(!exists(pids[1]) && !exists(pids[2]));
    }

    #[test]
    fn a_child_past_its_time_is_killed_and_one_within_it_kept() {
        let now = Instant::now();
        let mut set = Lingering::new(8, Duration::from_secs(30));
        let (old, old_pid) = sleeper();
        set.add(old, now);
        let (young, young_pid) = sleeper();
        set.add(young, now + Duration::from_secs(20));
        set.sweep(now + Duration::from_secs(31));
        assert_eq!(set.len(), 1);
        assert!(!exists(old_pid), "overdue: killed and reaped");
        assert!(exists(young_pid), "still within its 30 s");
        drop(set);
        assert!(!exists(young_pid), "dropping the set kills what is left");
    }

    #[test]
    fn a_child_that_ended_is_reaped_at_the_next_sweep() {
        let now = Instant::now();
        let mut set = Lingering::default();
        let child = Command::new("true").spawn().expect("true runs");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        set.add(child, now);
        // It ends on its own; until it is reaped its pid names a zombie.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !set.is_empty() && Instant::now() < deadline {
            set.sweep(Instant::now());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(set.is_empty(), "`true` ended and was reaped within 10 s");
        assert!(!exists(pid), "no zombie left behind");
    }
}
