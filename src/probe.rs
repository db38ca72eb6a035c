//! Is anybody listening on a socket file? The dead-socket judgment used by
//! the monitor (`dls -l`), the reaper and servers replacing stale sockets.
//!
//! A nonblocking `connect(2)` answers exactly: accepted or queued means
//! alive; `EAGAIN` means the backlog is full, which also means alive;
//! `ECONNREFUSED` means nobody listens: dead. Anything else (no permission,
//! not a stream socket, gone) cannot be judged, and what cannot be judged is
//! never removed.

use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Dead,
    Unknown,
}

impl Liveness {
    pub fn label(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Dead => "dead",
            Liveness::Unknown => "unknown",
        }
    }
}

pub fn probe(path: &Path) -> Liveness {
    let Ok(address) = UnixAddr::new(path) else {
        return Liveness::Unknown;
    };
    let Ok(fd) = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)
    else {
        return Liveness::Unknown;
    };
    use std::os::fd::AsRawFd;
    match connect(fd.as_raw_fd(), &address) {
        Ok(()) | Err(Errno::EAGAIN) | Err(Errno::EINPROGRESS) => Liveness::Alive,
        Err(Errno::ECONNREFUSED) => Liveness::Dead,
        Err(_) => Liveness::Unknown,
    }
}
