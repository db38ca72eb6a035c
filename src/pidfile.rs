//! Pidfiles for init scripts, which signal a daemon through them.
//!
//! A pidfile is written once the daemon is ready, and removed on its way
//! out only while it still names it: a daemon started since with the same
//! file keeps it.
//!
//! A pidfile often lives in a directory others may write to (`/tmp`), and
//! the daemon writing it is often root. So its last component is never
//! followed if it is a symlink (which would have root overwrite the file
//! it points to, or remove a link that is not ours), nor written or read
//! if it is anything but a regular file with a single link (a FIFO would
//! hang the daemon; a hard link would be another file's content).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::Error;

/// Writes `pid` to `path`, logging when it named another running process.
pub fn write(path: &Path, pid: u32) -> Result<(), Error> {
    let error = |source| Error::Open { path: path.to_path_buf(), source };
    if let Some(old) = pid_in(path).filter(|&old| old != pid && process_exists(old)) {
        log::warn!("{}: names process {old}, which is running; writing ours over it", path.display());
    }
    let mut file = open(path, std::fs::OpenOptions::new().write(true).create(true)).map_err(error)?;
    file.set_len(0).and_then(|()| file.write_all(format!("{pid}\n").as_bytes())).map_err(error)
}

/// Removes `path` if it is still the very file holding this process's
/// pid (not a symlink to one: the link would not be ours).
pub fn remove_if_ours(path: &Path) {
    let Ok(mut file) = open(path, std::fs::OpenOptions::new().read(true)) else {
        return;
    };
    if pid_from(&mut file) != Some(std::process::id()) {
        return;
    }
    let same = |meta: std::fs::Metadata| {
        file.metadata().is_ok_and(|ours| (ours.dev(), ours.ino()) == (meta.dev(), meta.ino()))
    };
    if std::fs::symlink_metadata(path).is_ok_and(same) {
        let _ = std::fs::remove_file(path);
    }
}

/// Opens `path` as `options` say, refusing a symlink at its last component
/// and anything but a regular file with one link.
fn open(path: &Path, options: &mut std::fs::OpenOptions) -> io::Result<File> {
    // O_NONBLOCK: opening a FIFO must not wait for its other end.
    let file = options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path).map_err(
        |error| match error.raw_os_error() {
            Some(libc::ELOOP) => io::Error::other(
                "it is a symlink, and a pidfile is never written or removed through one (remove it, or name another file)",
            ),
            // A FIFO nobody reads, a socket: what no pidfile is.
            Some(libc::ENXIO) => not_a_file(),
            _ => error,
        },
    )?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(not_a_file());
    }
    if meta.nlink() != 1 {
        return Err(io::Error::other(
            "it has other hard links, whose content it would overwrite (remove it, or name another file)",
        ));
    }
    Ok(file)
}

fn not_a_file() -> io::Error {
    io::Error::other("it is not a regular file (remove it, or name another file)")
}

/// The process id a pidfile holds, if it holds one.
fn pid_in(path: &Path) -> Option<u32> {
    pid_from(&mut open(path, std::fs::OpenOptions::new().read(true)).ok()?)
}

fn pid_from(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    // A pid is short: a huge file is no pidfile, and not read whole.
    file.take(64).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

fn process_exists(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 only asks; EPERM means it exists as someone else's.
    matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None), Ok(()) | Err(nix::errno::Errno::EPERM))
}
