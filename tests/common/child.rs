//! Child processes for tests: [`ChildGuard`] (never outlives the test),
//! [`LineReader`] (stdout lines with timeouts) and [`run_with_timeout`].
//!
//! Limits: signals are sent with `kill(1)` (std has no API for them);
//! descendants are found by walking /proc at drop time, so a grandchild
//! that already double-forked away from the tree is not found (network
//! namespaces and test users have their own sweeping cleanup).

use super::proc::{self, ProcId};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a dropped guard waits after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// Owns a child process. Drop: SIGTERM, up to 2 s of grace, SIGKILL, reap,
/// then SIGKILL whatever descendants it left behind.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// Spawns `cmd`, panicking with the program name if that fails.
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        match cmd.spawn() {
            Ok(c) => ChildGuard(c),
            Err(e) => panic!("cannot spawn {:?}: {e}", cmd.get_program()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// The exit status if the child has exited (reaping it), else None.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().ok().flatten()
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Sends `sig` ("TERM", "STOP", ...) unless the child was already
    /// reaped (its pid could then belong to someone else). An unreaped
    /// zombie keeps its pid, so this is race-free.
    pub fn signal(&mut self, sig: &str) -> bool {
        self.is_running() && proc::signal(&[self.pid()], sig)
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.0.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                _ => return None,
            }
        }
    }

    /// SIGTERM, then waits up to `timeout`; None if it is still running.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
        self.wait_timeout(timeout)
    }

    /// SIGKILL and reap (bounded: a process stuck in the kernel gives None).
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        let _ = self.0.kill();
        self.wait_timeout(Duration::from_secs(5))
    }

    /// SIGSTOP: the process freezes (simulates a hung peer).
    pub fn stop(&mut self) {
        assert!(self.signal("STOP"), "cannot SIGSTOP pid {}", self.pid());
    }

    /// SIGCONT: resumes a stopped process.
    pub fn cont(&mut self) {
        assert!(self.signal("CONT"), "cannot SIGCONT pid {}", self.pid());
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !self.is_running() {
            return;
        }
        // Collected before the child dies: afterwards its children are
        // reparented and no longer findable through it.
        let tree: Vec<ProcId> = proc::descendants(self.pid());
        // A stopped child would not act on SIGTERM until continued.
        self.signal("CONT");
        if self.terminate(TERM_GRACE).is_none() {
            let _ = self.kill9();
        }
        proc::signal_same(&tree, "KILL");
    }
}

/// Lines of a stream, read on a background thread into a channel.
pub struct LineReader {
    rx: Receiver<String>,
    eof: bool,
}

impl LineReader {
    /// Reads `r` line by line (lossy UTF-8, without the newline) until EOF.
    pub fn new(r: impl Read + Send + 'static) -> LineReader {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if buf.last() == Some(&b'\n') {
                            buf.pop();
                        }
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        LineReader { rx, eof: false }
    }

    /// The next line, or None on timeout or end of stream.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        match self.rx.recv_timeout(timeout) {
            Ok(l) => Some(l),
            Err(RecvTimeoutError::Disconnected) => {
                self.eof = true;
                None
            }
            Err(RecvTimeoutError::Timeout) => None,
        }
    }

    /// True once the stream was seen to end.
    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// Asserts that the very next line is `expected`.
    pub fn expect_line(&mut self, expected: &str, timeout: Duration) {
        match self.next_line(timeout) {
            Some(l) if l == expected => {}
            Some(l) => panic!("expected line {expected:?}, got {l:?}"),
            None => panic!("expected line {expected:?}, got {}", self.nothing(timeout)),
        }
    }

    /// Reads lines until one satisfies `pred` (included in the result);
    /// panics listing what arrived if that takes longer than `timeout`.
    pub fn lines_until(&mut self, mut pred: impl FnMut(&str) -> bool, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left) {
                Some(l) => {
                    let done = pred(&l);
                    seen.push(l);
                    if done {
                        return seen;
                    }
                }
                None => panic!("no matching line: got {} after {seen:?}", self.nothing(timeout)),
            }
        }
    }

    /// Reads until end of stream, at most `timeout`; returns the lines and
    /// whether the end was reached.
    pub fn rest(&mut self, timeout: Duration) -> (Vec<String>, bool) {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(l) = self.next_line(deadline.saturating_duration_since(Instant::now())) {
            seen.push(l);
        }
        (seen, self.eof)
    }

    fn nothing(&self, timeout: Duration) -> String {
        if self.eof {
            "end of stream".into()
        } else {
            format!("nothing within {timeout:?}")
        }
    }
}

/// Spawns `cmd` with stdout piped into a [`LineReader`].
pub fn spawn_lines(cmd: &mut Command) -> (ChildGuard, LineReader) {
    let mut guard = ChildGuard::spawn(cmd.stdout(Stdio::piped()));
    let out = guard.0.stdout.take().expect("stdout was piped");
    (guard, LineReader::new(out))
}

/// Collects a stream on a thread; the buffer stays readable even while the
/// thread is blocked (so a timeout can still show partial stderr).
fn collect(r: Option<impl Read + Send + 'static>) -> (Arc<Mutex<Vec<u8>>>, Option<JoinHandle<()>>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let handle = r.map(|mut r| {
        let buf = Arc::clone(&buf);
        thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match r.read(&mut chunk) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]),
                }
            }
        })
    });
    (buf, handle)
}

fn finished(h: &Option<JoinHandle<()>>) -> bool {
    h.as_ref().is_none_or(|h| h.is_finished())
}

fn take(buf: &Arc<Mutex<Vec<u8>>>) -> Vec<u8> {
    std::mem::take(&mut *buf.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Runs `cmd` to completion with stdout/stderr captured and `stdin` fed on a
/// thread (stdin is /dev/null when None). Err (with stderr so far) when it
/// cannot start, outlives `timeout` (it and its descendants are killed), or
/// exits while something it started keeps its stdout/stderr open.
pub fn try_run_with_timeout(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output, String> {
    let what = format!("{:?} {:?}", cmd.get_program(), cmd.get_args().collect::<Vec<_>>());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("cannot spawn {what}: {e}"))?;
    if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        // A child that does not read all its input is not an error here.
        thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let (out, out_h) = collect(child.stdout.take());
    let (err, err_h) = collect(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            _ => break None,
        }
    };
    let Some(status) = status else {
        let tree = proc::descendants(child.id());
        let _ = child.kill();
        let _ = child.wait();
        proc::signal_same(&tree, "KILL");
        let grace = Instant::now() + Duration::from_secs(1);
        while !finished(&err_h) && Instant::now() < grace {
            thread::sleep(Duration::from_millis(5));
        }
        return Err(format!(
            "{what} timed out after {timeout:?} and was killed; stderr so far:\n{}",
            String::from_utf8_lossy(&take(&err))
        ));
    };
    // Pipes close when the last holder exits; allow a moment past the
    // deadline so a command finishing right at it is not failed.
    let grace = deadline.max(Instant::now() + Duration::from_secs(1));
    while !(finished(&out_h) && finished(&err_h)) {
        if Instant::now() >= grace {
            return Err(format!(
                "{what} exited ({status}) but its stdout/stderr stayed open \
                 (a background process inherited them?); stderr so far:\n{}",
                String::from_utf8_lossy(&take(&err))
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(Output { status, stdout: take(&out), stderr: take(&err) })
}

/// [`try_run_with_timeout`] that panics with the error message.
pub fn run_with_timeout(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    try_run_with_timeout(cmd, stdin, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `cmd`, whose streams the caller has set, until it exits (bounded
/// in time); returns its exit status and what it wrote to the file
/// `captured` (one of its streams).
pub fn status_and_capture(cmd: &mut Command, captured: &std::path::Path) -> (Option<i32>, String) {
    let mut child = ChildGuard::spawn(cmd);
    let status = child.wait_timeout(super::DEFAULT_TIMEOUT).unwrap_or_else(|| panic!("{cmd:?} did not exit"));
    (status.code(), std::fs::read_to_string(captured).unwrap_or_default())
}
