//! Blocking work (ssh's forwarding probe, a host name lookup) done in a
//! forked child that reports on a pipe, so that the event loop that asked
//! never waits in it: the loop watches the pipe and reads the report as it
//! comes. A process, not a thread: std's threads cost the static binary
//! some 25 KB, and a child that hangs can be killed.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, pipe2, ForkResult, Pid};

/// A child at work, and what it has reported so far. Dropped before the
/// child has closed its pipe, the child is killed; either way it is waited
/// for.
pub struct Forked {
    child: Pid,
    /// The pipe's read end, nonblocking.
    report: File,
    text: Vec<u8>,
    ended: bool,
}

impl Forked {
    /// Forks a child that runs `work`, which writes its report to the file
    /// it is given, and leaves with `_exit` (no destructor of the parent's
    /// state runs twice). The child first closes its copies of every other
    /// descriptor (see [`crate::net::close_descriptors_except`]).
    ///
    /// For single-threaded processes only, as dipus's are: a child forked
    /// while another thread held a lock would wait for it forever.
    pub fn start(work: impl FnOnce(&File)) -> io::Result<Forked> {
        let (read, write) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        // SAFETY: single-threaded (see above); the child runs `work` and
        // leaves with _exit.
        match unsafe { fork() }.map_err(io::Error::from)? {
            ForkResult::Child => {
                drop(read);
                crate::net::close_descriptors_except(write.as_raw_fd());
                work(&File::from(write));
                // SAFETY: ends the child without running the parent's destructors.
                unsafe { libc::_exit(0) }
            }
            ForkResult::Parent { child } => {
                drop(write);
                let report = File::from(read);
                crate::net::set_nonblocking(report.as_raw_fd())?;
                Ok(Forked { child, report, text: Vec::new(), ended: false })
            }
        }
    }

    /// The pipe to watch for readability.
    pub fn fd(&self) -> RawFd {
        self.report.as_raw_fd()
    }

    /// Takes in what the child has written; true once it has closed the
    /// pipe (it has ended).
    pub fn read(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        while !self.ended {
            match self.report.read(&mut chunk) {
                Ok(0) => self.ended = true,
                Ok(count) => self.text.extend_from_slice(&chunk[..count]),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => self.ended = true,
            }
        }
        self.ended
    }

    /// What the child has reported so far.
    pub fn text(&self) -> &[u8] {
        &self.text
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        // Only a child that still holds its pipe is signalled: one that
        // has closed it is leaving, or is gone already (reaped by a SIGCHLD
        // handler, as dipusd's), and its process id may be someone else's.
        if !self.read() {
            let _ = kill(self.child, Signal::SIGKILL);
        }
        let _ = waitpid(self.child, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    fn wait_for_end(forked: &mut Forked) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !forked.read() {
            assert!(Instant::now() < deadline, "the child did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_report_arrives_whole_and_the_child_ends() {
        let mut forked = Forked::start(|report| {
            let _ = (&*report).write_all(b"one\ntwo\n");
        })
        .unwrap();
        wait_for_end(&mut forked);
        assert_eq!(forked.text(), b"one\ntwo\n");
    }

    #[test]
    fn a_child_still_at_work_is_killed_and_waited_for_when_dropped() {
        let forked = Forked::start(|_| std::thread::sleep(Duration::from_secs(600))).unwrap();
        let child = forked.child;
        drop(forked);
        // Waited for: the process no longer exists, not even as a zombie.
        assert_eq!(kill(child, None), Err(nix::errno::Errno::ESRCH));
    }
}
