//! Signals as events: the handler writes the signal number into a pipe
//! (the self-pipe trick), and the event loop reads it like any other
//! descriptor, so SIGTERM, SIGHUP and SIGCHLD arrive in the same wait as the
//! sockets and are handled outside signal context.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::fcntl::OFlag;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// The write end of the pipe, for the handler.
static WRITE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(number: libc::c_int) {
    let fd = WRITE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = number as u8;
        // SAFETY: write(2) is async-signal-safe; errno is saved and
        // restored so the interrupted code does not see ours. A full pipe
        // drops the byte, which is fine: a pending byte already wakes the
        // loop, and the loop handles each signal kind idempotently.
        unsafe {
            let saved = *libc::__errno_location();
            libc::write(fd, (&byte as *const u8).cast(), 1);
            *libc::__errno_location() = saved;
        }
    }
}

/// Receives the signals it was created for, as bytes on `fd()`.
pub struct SignalPipe {
    read: OwnedFd,
    _write: OwnedFd,
}

impl SignalPipe {
    /// Routes `signals` to the pipe. One per process.
    pub fn new(signals: &[Signal]) -> io::Result<SignalPipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(io::Error::from)?;
        WRITE_FD.store(write.as_raw_fd(), Ordering::Relaxed);
        let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
        for &signal in signals {
            // SAFETY: the handler only calls async-signal-safe functions.
            unsafe { sigaction(signal, &action) }.map_err(io::Error::from)?;
        }
        Ok(SignalPipe { read, _write: write })
    }

    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// The signals received since the last call, each once.
    pub fn drain(&self) -> Vec<Signal> {
        let mut buffer = [0u8; 64];
        let mut signals = Vec::new();
        loop {
            // SAFETY: reading into a local buffer from our own pipe.
            let count = unsafe { libc::read(self.read.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
            if count <= 0 {
                break;
            }
            for &byte in &buffer[..count as usize] {
                if let Ok(signal) = Signal::try_from(byte as i32) {
                    if !signals.contains(&signal) {
                        signals.push(signal);
                    }
                }
            }
        }
        signals
    }
}

/// The signal noted while [`Deferred`] holds, 0 for none.
static DEFERRED: AtomicI32 = AtomicI32::new(0);

extern "C" fn note_signal(number: libc::c_int) {
    // The same signal twice: the user insists, and gets it now.
    if DEFERRED.swap(number, Ordering::Relaxed) == number {
        // SAFETY: signal(2) and raise(3) are async-signal-safe.
        unsafe {
            libc::signal(number, libc::SIG_DFL);
            libc::raise(number);
        }
    }
}

/// While held, SIGINT, SIGTERM and SIGHUP are noted instead of acted on,
/// so that a short section that leaves state outside the process (ssh
/// forwards in a shared master) undoes it before the process ends. Dropped,
/// it puts back what was there and raises the signal noted, which then
/// acts as it would have. A signal the process ignores stays ignored; the
/// same signal twice acts at once.
pub struct Deferred {
    previous: Vec<(Signal, SigAction)>,
}

impl Deferred {
    pub fn hold() -> io::Result<Deferred> {
        DEFERRED.store(0, Ordering::Relaxed);
        let action = SigAction::new(SigHandler::Handler(note_signal), SaFlags::SA_RESTART, SigSet::empty());
        let mut deferred = Deferred { previous: Vec::new() };
        for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            // SAFETY: the handler only calls async-signal-safe functions.
            let previous = unsafe { sigaction(signal, &action) }.map_err(io::Error::from)?;
            deferred.previous.push((signal, previous));
            if previous.handler() == SigHandler::SigIgn {
                // SAFETY: putting back the disposition that was there.
                unsafe { sigaction(signal, &previous) }.map_err(io::Error::from)?;
            }
        }
        Ok(deferred)
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        for (signal, previous) in self.previous.drain(..) {
            // SAFETY: putting back the disposition that was there.
            let _ = unsafe { sigaction(signal, &previous) };
        }
        let noted = DEFERRED.swap(0, Ordering::Relaxed);
        if noted != 0 {
            // SAFETY: raising a signal at ourselves.
            unsafe { libc::raise(noted) };
        }
    }
}
