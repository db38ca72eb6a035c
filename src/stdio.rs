//! Standard descriptors that whoever started us had closed (`dcat x >&-`).
//! Rust's runtime opens /dev/null on a closed 0, 1 or 2 before `main`, so
//! a reply written to stdout would vanish and dcat would exit 0, where
//! cat says "Bad file descriptor" and fails. Which were closed is recorded
//! before the runtime starts (an `.init_array` entry: the C library runs
//! those before `main`), and [`reclose`] makes them fail again as closed
//! ones do, with EBADF, while their numbers stay taken: a socket opened
//! later must not become "stdout".

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};

/// Bit N set: descriptor N was closed at exec.
static CLOSED_AT_START: AtomicU8 = AtomicU8::new(0);

extern "C" fn record_closed() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only asks about the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            CLOSED_AT_START.fetch_or(1 << fd, Ordering::Relaxed);
        }
    }
}

#[used]
#[link_section = ".init_array"]
static RECORD_CLOSED: extern "C" fn() = record_closed;

/// Whether descriptor `fd` (0, 1 or 2) was closed when the program started.
pub fn was_closed(fd: i32) -> bool {
    (0..3).contains(&fd) && CLOSED_AT_START.load(Ordering::Relaxed) & (1 << fd) != 0
}

/// Puts /dev/null, opened the wrong way round, on stdin and stdout where
/// they were closed at start: reading a write-only descriptor, or writing
/// a read-only one, fails with EBADF, as on a closed one.
pub fn reclose() {
    for (fd, write) in [(libc::STDIN_FILENO, true), (libc::STDOUT_FILENO, false)] {
        if !was_closed(fd) {
            continue;
        }
        if let Ok(null) = std::fs::OpenOptions::new().read(!write).write(write).open("/dev/null") {
            // SAFETY: replaces a descriptor of ours (std's /dev/null) with another.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// Standard output, unbuffered, for output that must not vanish: std's
/// `Stdout` takes a write's EBADF (a closed stdout) for success.
pub struct Stdout;

impl io::Write for Stdout {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        // SAFETY: writes from our buffer to descriptor 1.
        let written = unsafe { libc::write(libc::STDOUT_FILENO, buffer.as_ptr().cast(), buffer.len()) };
        if written < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(written as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
