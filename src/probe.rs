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

/// The inodes of every socket file some UNIX socket in this network
/// namespace is listening on, from the kernel's socket diagnostics
/// (NETLINK_SOCK_DIAG, UNIX_DIAG_VFS), without connecting to anything.
///
/// Connecting is the exact test, but a connection to a live inetd-style
/// service starts a child there. So sweeps ask this first: a socket file
/// whose inode is listed is alive, and only the others are probed with a
/// connect (which a dead socket refuses without side effects). Inode
/// numbers alone can collide across filesystems; a collision can only make
/// a dead socket look alive, never the reverse. `None` where the kernel
/// does not offer the interface.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn listening_inodes() -> Option<std::collections::HashSet<u64>> {
    listening_sockets().map(|sockets| sockets.into_keys().collect())
}

/// Listening UNIX sockets: the inode of their socket file (VFS) → the
/// inode of the socket itself (as `/proc/PID/fd` shows it: `socket:[N]`).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn listening_sockets() -> Option<std::collections::HashMap<u64, u64>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const UDIAG_SHOW_VFS: u32 = 0x2;
    const UNIX_DIAG_VFS: u16 = 1;
    const TCP_LISTEN: u32 = 10;
    // SAFETY: a plain socket call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr (16) + unix_diag_req (24).
    let mut request = [0u8; 40];
    request[0..4].copy_from_slice(&40u32.to_ne_bytes());
    request[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    request[16] = libc::AF_UNIX as u8;
    request[20..24].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    request[28..32].copy_from_slice(&UDIAG_SHOW_VFS.to_ne_bytes());
    // SAFETY: sending our own buffer to the kernel (destination: kernel,
    // the default for an unbound, unconnected netlink socket).
    if unsafe { libc::send(socket.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) } < 0 {
        return None;
    }
    let mut inodes = std::collections::HashMap::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into our own buffer.
        let length = unsafe { libc::recv(socket.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        if length <= 0 {
            return None;
        }
        let mut messages = &buffer[..length as usize];
        while messages.len() >= 16 {
            let message_length = u32::from_ne_bytes(messages[0..4].try_into().ok()?) as usize;
            let kind = u16::from_ne_bytes(messages[4..6].try_into().ok()?);
            if message_length < 16 || message_length > messages.len() {
                return None;
            }
            if kind == libc::NLMSG_DONE as u16 {
                return Some(inodes);
            }
            if kind == libc::NLMSG_ERROR as u16 {
                return None;
            }
            // unix_diag_msg (16 bytes: family, type, state, pad, ino, cookie),
            // then attributes.
            let socket_inode = u64::from(u32::from_ne_bytes(messages.get(20..24)?.try_into().ok()?));
            let mut attributes = messages.get(32..message_length).unwrap_or(&[]);
            while attributes.len() >= 4 {
                let attribute_length = u16::from_ne_bytes([attributes[0], attributes[1]]) as usize;
                let attribute_kind = u16::from_ne_bytes([attributes[2], attributes[3]]);
                if attribute_length < 4 || attribute_length > attributes.len() {
                    break;
                }
                if attribute_kind == UNIX_DIAG_VFS && attribute_length >= 12 {
                    inodes.insert(u64::from(u32::from_ne_bytes(attributes[4..8].try_into().ok()?)), socket_inode);
                }
                let aligned = (attribute_length + 3) & !3;
                attributes = attributes.get(aligned..).unwrap_or(&[]);
            }
            let aligned = (message_length + 3) & !3;
            messages = messages.get(aligned..).unwrap_or(&[]);
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn listening_sockets() -> Option<std::collections::HashMap<u64, u64>> {
    None
}

/// Liveness without side effects where the kernel can tell: a socket the
/// diagnostics list as listening is alive; only others are connected to.
pub fn judge(path: &Path, listening: Option<&std::collections::HashSet<u64>>) -> Liveness {
    use std::os::unix::fs::MetadataExt;
    if let (Some(listening), Ok(meta)) = (listening, std::fs::symlink_metadata(path)) {
        if listening.contains(&meta.ino()) {
            return Liveness::Alive;
        }
    }
    probe(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnostics_see_a_listener_and_probe_agrees() {
        let directory = std::env::temp_dir().join(format!("dipus-probe-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let live = directory.join("live");
        let dead = directory.join("dead");
        let listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        let listening = listening_inodes().expect("sock_diag on Linux");
        use std::os::unix::fs::MetadataExt;
        assert!(listening.contains(&std::fs::metadata(&live).unwrap().ino()));
        assert!(!listening.contains(&std::fs::metadata(&dead).unwrap().ino()));
        assert_eq!(judge(&live, Some(&listening)), Liveness::Alive);
        assert_eq!(judge(&dead, Some(&listening)), Liveness::Dead);
        assert_eq!(probe(&directory.join("missing")), Liveness::Unknown);
        drop(listener);
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
