//! Process inspection through /proc and signalling through `kill(1)`, so the
//! rig needs no libc.
//!
//! A pid alone is unsafe to signal later (it may be reused), so processes
//! remembered for later signalling are [`ProcId`]s: pid plus start time,
//! re-checked right before the signal.

use std::process::{Command, Stdio};
use std::time::Duration;

/// A process identity that survives pid reuse: pid and kernel start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcId {
    pub pid: u32,
    pub start: u64,
}

/// Fields of /proc/<pid>/stat after the command name (which may contain
/// spaces and parentheses, hence the search for the last ')').
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// CPU time (user and system) the process has used so far, None when the
/// pid is gone.
pub fn cpu_time(pid: u32) -> Option<std::time::Duration> {
    let fields = stat_fields(pid)?;
    // utime and stime: fields 14 and 15 of stat(5), 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(ticks * 1_000_000 / per_second))
}

/// Process state letter (R, S, D, T, Z...), None when the pid is gone.
pub fn state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// Processes whose command line (arguments joined by spaces) contains
/// `needle`.
pub fn with_command_line(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            let line = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&line).replace('\0', " ").contains(needle)
        })
        .collect()
}

/// The command name (`comm`), empty when the pid is gone.
pub fn name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|n| n.trim_end().to_string()).unwrap_or_default()
}

/// True while the process exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    matches!(state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// Identity of a live pid.
pub fn proc_id(pid: u32) -> Option<ProcId> {
    let start = stat_fields(pid)?.get(19)?.parse().ok()?;
    Some(ProcId { pid, start })
}

/// Every process below `pid` (children, grandchildren...), found by
/// walking parent links of all processes in /proc.
pub fn descendants(pid: u32) -> Vec<ProcId> {
    let mut parents = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(p).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                parents.push((p, ppid));
            }
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    found[1..].iter().filter_map(|&p| proc_id(p)).collect()
}

/// Sends `sig` (a name like "TERM" or "KILL") to the pids; false if `kill`
/// could not be run or reported an error (e.g. a pid already gone).
pub fn signal(pids: &[u32], sig: &str) -> bool {
    if pids.is_empty() {
        return true;
    }
    let mut cmd = Command::new("kill");
    cmd.arg(format!("-{sig}"))
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    // kill(1) returns at once; the bound only guards against the impossible.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return st.success(),
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Signals those of `procs` that are still the same processes.
pub fn signal_same(procs: &[ProcId], sig: &str) {
    let still: Vec<u32> = procs.iter().filter(|p| proc_id(p.pid) == Some(**p)).map(|p| p.pid).collect();
    signal(&still, sig);
}

/// A daemon (an importer) gone to the background, known by its pidfile: SIGTERM on
/// drop, SIGKILL if it lingers.
pub struct Background {
    id: ProcId,
}

impl Background {
    /// The importer named in `pidfile`, which must exist already.
    pub fn from_pidfile(pidfile: &std::path::Path) -> Background {
        let present = pidfile.exists();
        if !present {
            // Found late or not, the importer must not outlive the test.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while !pidfile.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let text = std::fs::read_to_string(pidfile)
            .unwrap_or_else(|e| panic!("{} missing after the import returned: {e}", pidfile.display()));
        let pid: u32 =
            text.strip_suffix('\n').and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("pidfile {text:?}"));
        let id = proc_id(pid).unwrap_or_else(|| panic!("the importer {pid} is not running"));
        let background = Background { id };
        assert!(present, "{} missing when the import returned", pidfile.display());
        background
    }

    pub fn is_alive(&self) -> bool {
        proc_id(self.id.pid) == Some(self.id) && is_alive(self.id.pid)
    }

    pub fn pid(&self) -> u32 {
        self.id.pid
    }

    /// SIGTERM; true if it is gone within `timeout`.
    pub fn terminate(&self, timeout: std::time::Duration) -> bool {
        signal_same(&[self.id], "TERM");
        let deadline = std::time::Instant::now() + timeout;
        while self.is_alive() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        true
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if !self.terminate(std::time::Duration::from_secs(2)) {
            signal_same(&[self.id], "KILL");
        }
    }
}
