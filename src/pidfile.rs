//! Pidfiles for init scripts, which signal a daemon through them.
//!
//! A pidfile is written once the daemon is ready, and removed on its way
//! out only while it still names it: a daemon started since with the same
//! file keeps it.

use std::path::Path;

use crate::error::Error;

/// Writes `pid` to `path`, logging when it named another running process.
pub fn write(path: &Path, pid: u32) -> Result<(), Error> {
    if let Some(old) = pid_in(path).filter(|&old| old != pid && process_exists(old)) {
        log::warn!("{}: names process {old}, which is running; writing ours over it", path.display());
    }
    std::fs::write(path, format!("{pid}\n")).map_err(|source| Error::Open { path: path.to_path_buf(), source })
}

/// Removes `path` if it still holds this process's pid.
pub fn remove_if_ours(path: &Path) {
    if pid_in(path) == Some(std::process::id()) {
        let _ = std::fs::remove_file(path);
    }
}

/// The process id a pidfile holds, if it holds one.
fn pid_in(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn process_exists(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 only asks; EPERM means it exists as someone else's.
    matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None), Ok(()) | Err(nix::errno::Errno::EPERM))
}
