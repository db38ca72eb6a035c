//! [`TestRoot`]: one throw-away temp dir per test, used as `DIPUS_ROOT`.
//!
//! Layout: `<tmp>/dipus-<pid>-<k>-<n>/` is the test's scratch dir and its
//! `tree/` subdir is `DIPUS_ROOT`, deliberately not created beforehand so
//! the program's own creation of it is exercised. Paths stay short because
//! sockets under it are limited to 108 bytes.
//!
//! Drop kills the processes started with [`TestRoot::spawn`] (latest first,
//! so clients go before the daemon they talk to) and removes the dir.

use super::child::{ChildGuard, LineReader};
use super::{applet_bin, unique_temp_dir};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

pub struct TestRoot {
    dir: PathBuf,
    /// Value of DIPUS_HOSTNAME for commands made by [`TestRoot::cmd`].
    pub host: String,
    children: Mutex<Vec<ChildGuard>>,
}

impl TestRoot {
    pub fn new() -> TestRoot {
        TestRoot { dir: unique_temp_dir("dipus"), host: "testhost".into(), children: Mutex::new(Vec::new()) }
    }

    /// Builder: sets DIPUS_HOSTNAME (default "testhost").
    pub fn with_host(mut self, host: &str) -> TestRoot {
        self.host = host.into();
        self
    }

    /// The scratch dir (exists; free for the test's own files).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The DIPUS_ROOT dir, `<path>/tree` (not created by the rig).
    pub fn tree(&self) -> PathBuf {
        self.dir.join("tree")
    }

    /// A command running applet `applet` with DIPUS_ROOT and DIPUS_HOSTNAME
    /// set; RUST_LOG is removed unless DIPUS_TEST_LOG is set, whose value
    /// then becomes RUST_LOG (keeps parallel test output readable).
    pub fn cmd(&self, applet: &str) -> Command {
        let mut cmd = Command::new(applet_bin(applet));
        cmd.env("DIPUS_ROOT", self.tree()).env("DIPUS_HOSTNAME", &self.host).env_remove("RUST_LOG");
        if let Some(level) = std::env::var_os("DIPUS_TEST_LOG") {
            cmd.env("RUST_LOG", level);
        }
        cmd
    }

    /// Starts `cmd` in the background, owned by this root; returns its pid,
    /// the handle for [`TestRoot::with_child`]. Stdin is set to /dev/null
    /// (for a piped stdin use `ChildGuard::spawn` and [`TestRoot::adopt`]).
    pub fn spawn(&self, cmd: &mut Command) -> u32 {
        self.adopt(ChildGuard::spawn(cmd.stdin(Stdio::null())))
    }

    /// Like [`TestRoot::spawn`] with stdout read line by line.
    pub fn spawn_lines(&self, cmd: &mut Command) -> (u32, LineReader) {
        let (guard, lines) = super::child::spawn_lines(cmd.stdin(Stdio::null()));
        (self.adopt(guard), lines)
    }

    /// Hands a guard to this root so it dies with the root.
    pub fn adopt(&self, guard: ChildGuard) -> u32 {
        let pid = guard.pid();
        self.lock().push(guard);
        pid
    }

    /// Runs `f` on the child `pid` started by this root (e.g. to stop,
    /// terminate or check it). Panics if there is no such child.
    pub fn with_child<R>(&self, pid: u32, f: impl FnOnce(&mut ChildGuard) -> R) -> R {
        let mut children = self.lock();
        // Latest first: a reaped child's pid may have been reused by a newer one.
        let child = children
            .iter_mut()
            .rev()
            .find(|c| c.pid() == pid)
            .unwrap_or_else(|| panic!("pid {pid} was not spawned by this TestRoot"));
        f(child)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ChildGuard>> {
        // A test that panicked while holding the lock must not stop cleanup.
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for TestRoot {
    fn default() -> Self {
        TestRoot::new()
    }
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        let mut children = self.lock();
        while let Some(child) = children.pop() {
            drop(child);
        }
        drop(children);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
