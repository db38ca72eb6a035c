//! Shared integration-test rig for dipus (std only, no dev-dependencies).
//!
//! Every integration test does `mod common;` and picks what it needs:
//! - here: locating the binary and its applet symlinks, skip/require logic,
//!   polling helpers, unique temp dirs and free ports;
//! - [`data`]: `Random` bytes and their `Digest`, for bulk transfers;
//! - [`child`]: `ChildGuard` (processes killed on drop), `LineReader`,
//!   `run_with_timeout`;
//! - [`root`]: `TestRoot`, a throw-away `DIPUS_ROOT` per test;
//! - [`service`]: pipe servers waited for, sockets planted in the tree,
//!   dcat runs and error assertions;
//! - [`netns`]: hosts in network namespaces on a private bridge (root only);
//! - [`sshd`]: a private sshd on 127.0.0.1 plus throw-away users (root only).
//!
//! Tests run in parallel threads of one process and test binaries may run
//! concurrently, so every name (dirs, namespaces, users) carries the pid and
//! a per-process counter. Every wait is bounded; every resource is released
//! by a `Drop` guard so a panicking test still cleans up.
#![allow(dead_code)]

pub mod child;
pub mod data;
pub mod lan;
pub mod netns;
pub mod proc;
pub mod root;
pub mod service;
pub mod sshd;

// Not every test uses every re-export.
#[allow(unused_imports)]
pub use child::{run_with_timeout, spawn_lines, status_and_capture, try_run_with_timeout, ChildGuard, LineReader};
#[allow(unused_imports)]
pub use root::TestRoot;

use std::io::{ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A generous bound for single commands that should finish quickly.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Applet names the multicall binary answers to (any name works with
/// [`applet_bin`], this list is for tests that iterate over all of them).
pub const APPLETS: &[&str] = &[
    "dcat",
    "dls",
    "dipus-local-pipe",
    "dipus-export-pipe",
    "dipus-service-monitor",
    "dipus-exporter",
    "dipus-import",
    "dipus-discoverer",
    "dipus-ssh-importer",
    "dipusd",
];

/// The multicall binary under test: cargo's build for this test run, or
/// the one `DIPUS_TEST_BIN` names (`make test-static` points it at the
/// static musl binary).
pub fn dipus_bin() -> PathBuf {
    match std::env::var_os("DIPUS_TEST_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_dipus")),
    }
}

/// Per-process counter feeding every unique name the rig makes.
pub fn next_id() -> usize {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Directory holding this process's applet symlinks, made once.
///
/// Directories left by earlier test processes that no longer exist are
/// removed here, since a test binary has no exit hook to remove its own.
fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("dipus-bin-")) else {
                    continue;
                };
                if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tmp.join(format!("dipus-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        dir
    })
}

/// Path of a symlink called `name` pointing at the dipus binary, so the
/// program sees `name` as its argv[0] basename and runs that applet.
///
/// Safe to call from many threads: the link is made under a temp name and
/// renamed into place, which is atomic.
pub fn applet_bin(name: &str) -> PathBuf {
    assert!(!name.is_empty() && !name.contains('/') && name != "." && name != "..", "bad applet name {name:?}");
    let target = dipus_bin();
    let link = bin_dir().join(name);
    if std::fs::read_link(&link).ok().as_deref() == Some(target.as_path()) {
        return link;
    }
    let tmp = bin_dir().join(format!(".{name}.{}.tmp", next_id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp).unwrap_or_else(|e| panic!("symlink {}: {e}", tmp.display()));
    std::fs::rename(&tmp, &link).unwrap_or_else(|e| panic!("rename to {}: {e}", link.display()));
    link
}

/// `cmd` run by a shell script instead, for what only a shell does
/// (`>&-`, `ulimit`): `WRAPPER… sh -c SCRIPT PROGRAM ARGS…`, so the
/// script sees the program as `$0` and its arguments as `"$@"`, with
/// `cmd`'s environment. A script that ends in `exec "$0" "$@"` keeps the
/// process id.
pub fn shell_around(wrapper: &[&str], cmd: &Command, script: &str) -> Command {
    let mut shell = Command::new(wrapper.first().copied().unwrap_or("sh"));
    if !wrapper.is_empty() {
        shell.args(&wrapper[1..]).arg("sh");
    }
    shell.arg("-c").arg(script).arg(cmd.get_program()).args(cmd.get_args());
    for (name, value) in cmd.get_envs() {
        match value {
            Some(value) => shell.env(name, value),
            None => shell.env_remove(name),
        };
    }
    shell
}

/// Creates and returns a fresh directory `<tmp>/<prefix>-<pid>-<k>-<n>`.
///
/// Kept short because UNIX socket paths are limited to 108 bytes.
pub fn unique_temp_dir(prefix: &str) -> PathBuf {
    let tmp = std::env::temp_dir();
    loop {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = tmp.join(format!("{prefix}-{}-{}-{}", std::process::id(), next_id(), nanos % 1_000_000));
        match std::fs::create_dir(&dir) {
            Ok(()) => return dir,
            // A stale dir from a dead process with our pid: try the next name.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("cannot create {}: {e}", dir.display()),
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to :0 and
/// release). Racy by nature: users should retry on "address in use".
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind 127.0.0.1:0")
}

/// Polls `cond` every 10 ms; panics mentioning `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Returns `cond`; when false, prints `SKIPPED: <test>: <what>` straight to
/// stderr (past libtest's capture, so it shows) and the test should return.
/// With `DIPUS_TEST_REQUIRE_ALL=1` a missing requirement is a failure.
pub fn require(cond: bool, what: &str) -> bool {
    if cond {
        return true;
    }
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("<unnamed test>");
    if std::env::var("DIPUS_TEST_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("{test}: requirement not met: {what} (DIPUS_TEST_REQUIRE_ALL=1)");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {what}");
    false
}

/// True when the effective uid is 0 (read from /proc, no libc).
pub fn have_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// True when `name` is an executable file: a path as given, otherwise
/// searched in PATH and then /usr/sbin and /sbin (often not in a user's PATH).
pub fn have_command(name: &str) -> bool {
    find_command(name).is_some()
}

/// Full path of `name` as searched by [`have_command`].
pub fn find_command(name: &str) -> Option<PathBuf> {
    let executable =
        |p: &Path| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false);
    if name.contains('/') {
        let p = PathBuf::from(name);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| executable(p))
}
