//! Interface changes as events: an rtnetlink socket subscribed to link and
//! address changes, so dipusd re-reads its interfaces (broadcast addresses,
//! allowed networks) the moment one appears, changes or goes, rather than
//! polling. Where netlink is missing the caller re-reads periodically.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub struct InterfaceEvents {
    socket: OwnedFd,
}

impl InterfaceEvents {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub fn open() -> io::Result<InterfaceEvents> {
        // SAFETY: plain socket and bind calls on a zeroed sockaddr_nl.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let socket = OwnedFd::from_raw_fd(fd);
            let mut address: libc::sockaddr_nl = std::mem::zeroed();
            address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            address.nl_groups = (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
            let bound = libc::bind(
                fd,
                (&address as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            );
            if bound != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(InterfaceEvents { socket })
        }
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub fn open() -> io::Result<InterfaceEvents> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Discards the queued messages; true if there were any (the caller
    /// re-reads the interfaces rather than decoding each change).
    pub fn drain(&self) -> bool {
        let mut buffer = [0u8; 8192];
        let mut any = false;
        loop {
            // SAFETY: receiving into our own buffer.
            let length = unsafe { libc::recv(self.socket.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
            if length <= 0 {
                let error = io::Error::last_os_error();
                // ENOBUFS: messages were lost; a re-read covers them.
                if length < 0 && error.raw_os_error() == Some(libc::ENOBUFS) {
                    any = true;
                    continue;
                }
                return any;
            }
            any = true;
        }
    }
}
