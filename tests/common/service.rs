//! Services for tests: dipus pipe servers started under a [`TestRoot`] and
//! waited for, foreign sockets (live or stale) planted in the tree the way
//! another program would, exporters and dipusd started on a free port and
//! waited for, the identity of the test process, and the sockets found in
//! a tree.
//!
//! A server is ready when its socket exists at its public path: dipus binds
//! at a hidden name and links the socket into place only once it listens,
//! so waiting for the path is waiting for readiness, not a guess.

use super::child::run_with_timeout;
use super::{free_port, wait_until, TestRoot, DEFAULT_TIMEOUT};
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Starts `dipus-local-pipe COMMAND SPEC` and waits for its socket at
/// `relative` (to the tree, e.g. `local/text/plain/sorter.testhost..0`).
/// Returns the server's pid (a child of `root`) and the socket's path.
pub fn serve(root: &TestRoot, command: &str, spec: &str, relative: &str) -> (u32, PathBuf) {
    serve_with(root, root.cmd("dipus-local-pipe").args([command, spec]), relative)
}

/// Starts the server `cmd` and waits for its socket at `relative`.
pub fn serve_with(root: &TestRoot, cmd: &mut Command, relative: &str) -> (u32, PathBuf) {
    let pid = root.spawn(cmd);
    let path = root.tree().join(relative);
    wait_for_socket(root, pid, &path);
    (pid, path)
}

/// Waits until `path` is a socket; panics early if the server `pid`
/// exits first.
pub fn wait_for_socket(root: &TestRoot, pid: u32, path: &Path) {
    wait_until(DEFAULT_TIMEOUT, &format!("socket {}", path.display()), || {
        if let Some(status) = root.with_child(pid, |c| c.try_status()) {
            panic!("server {pid} exited ({status}) before {} appeared", path.display());
        }
        is_socket(path)
    });
}

pub fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Creates `<tree>/<relative_dir>` level by level with the modes dipus
/// gives them: the root and the shared scopes (and their protocol
/// directories) 1777, `imported/` 0755, a user's scope 0700.
pub fn make_dirs(root: &TestRoot, relative_dir: &str) -> PathBuf {
    let mut dir = root.tree();
    make_dir(&dir, 0o1777);
    let mut mode = 0o1777;
    for (depth, component) in relative_dir.split('/').enumerate() {
        if depth == 0 {
            mode = match component {
                "local" | "exported" => 0o1777,
                "imported" => 0o755,
                _ => 0o700,
            };
        }
        dir.push(component);
        make_dir(&dir, mode);
    }
    dir
}

fn make_dir(dir: &Path, mode: u32) {
    if dir.is_dir() {
        return;
    }
    fs::DirBuilder::new().mode(0o700).create(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
}

/// Makes `<tree>/<top>` (the root as by [`make_dirs`]) owned by `uid`
/// with mode `mode`, as that user would make it in the shared root, and
/// the directories of `protocol` below it (0755, `uid`'s); returns the
/// deepest.
pub fn make_foreign_top(root: &TestRoot, top: &str, uid: u32, mode: u32, protocol: &str) -> PathBuf {
    let mut dir = root.tree();
    make_dir(&dir, 0o1777);
    for (depth, component) in std::iter::once(top).chain(protocol.split('/')).enumerate() {
        dir.push(component);
        make_dir(&dir, if depth == 0 { mode } else { 0o755 });
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid)).unwrap_or_else(|e| panic!("chown {}: {e}", dir.display()));
    }
    dir
}

/// A live foreign socket at `<tree>/<relative>` (directories made as by
/// [`make_dirs`]): a listener the test holds, as socat or any other
/// server would hold one. A reaper that has just removed the last socket
/// of the directory prunes it, maybe between our mkdir and our bind: then
/// the directory is made again, as dipus's own servers do.
pub fn listen_at(root: &TestRoot, relative: &str) -> (UnixListener, PathBuf) {
    let path = root.tree().join(relative);
    let (dir, _) = relative.rsplit_once('/').expect("relative path has a directory");
    let mut attempts = 0;
    loop {
        make_dirs(root, dir);
        match UnixListener::bind(&path) {
            Ok(listener) => return (listener, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 3 => attempts += 1,
            Err(e) => panic!("bind {}: {e}", path.display()),
        }
    }
}

/// A stale socket at `<tree>/<relative>`: bound, then closed without being
/// unlinked, as a crashed server leaves it; connecting to it is refused.
pub fn stale_at(root: &TestRoot, relative: &str) -> PathBuf {
    let (listener, path) = listen_at(root, relative);
    drop(listener);
    assert!(is_socket(&path));
    path
}

/// Runs `dcat ARGS…` with `stdin` (None: /dev/null), bounded in time.
pub fn dcat(root: &TestRoot, args: &[&str], stdin: Option<&[u8]>) -> Output {
    run_with_timeout(root.cmd("dcat").args(args), stdin, DEFAULT_TIMEOUT)
}

/// What a service answers to `stdin` through dcat, asserting success and
/// a quiet stderr.
pub fn ask(root: &TestRoot, selector: &str, stdin: &[u8]) -> String {
    let out = dcat(root, &[selector], Some(stdin));
    assert_success(&out, &format!("dcat {selector}"));
    assert!(out.stderr.is_empty(), "dcat {selector}: stderr {:?}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 reply")
}

/// Panics with the exit status and stderr unless `out` succeeded.
pub fn assert_success(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}; stderr: {}", out.status, String::from_utf8_lossy(&out.stderr));
}

/// Asserts the exit status `code`, no output on stdout, and one error
/// line on stderr that starts with `APPLET: `, contains every `needles`
/// and is no panic message. Returns the line.
pub fn assert_error(out: &Output, code: i32, applet: &str, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "exit status; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "a panic: {stderr}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.starts_with(&format!("{applet}: ")), "stderr {stderr:?} does not start with {applet}: ");
    for needle in needles {
        assert!(stderr.contains(needle), "stderr {stderr:?} does not mention {needle:?}");
    }
    stderr
}

/// A field of /proc/self/status (`Uid`, `Gid`): the effective id.
fn effective_id(field: &str) -> u32 {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|ids| ids.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

pub fn euid() -> u32 {
    effective_id("Uid")
}

pub fn egid() -> u32 {
    effective_id("Gid")
}

/// The name of `id` in a passwd-style file (`/etc/passwd`, `/etc/group`).
fn name_of(file: &str, id: u32) -> Option<String> {
    fs::read_to_string(file).ok()?.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(':').collect();
        (fields.len() > 2 && fields[2].parse() == Ok(id)).then(|| fields[0].to_string())
    })
}

pub fn user_name(uid: u32) -> Option<String> {
    name_of("/etc/passwd", uid)
}

pub fn group_name(gid: u32) -> Option<String> {
    name_of("/etc/group", gid)
}

/// Sends `sig` to the server `pid` of `root` and waits for its exit
/// status; panics if it does not exit.
pub fn stop(root: &TestRoot, pid: u32, sig: &str) -> std::process::ExitStatus {
    root.with_child(pid, |c| {
        assert!(c.signal(sig), "cannot send SIG{sig} to {pid}");
        c.wait_timeout(DEFAULT_TIMEOUT).unwrap_or_else(|| panic!("{pid} still runs after SIG{sig}"))
    })
}

/// The entries of a directory, sorted (hidden ones included).
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The sockets under `dir` (hidden ones included), as sorted paths
/// relative to it; entries that vanish or cannot be read are left out.
pub fn sockets(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, found: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if file_type.is_dir() {
                walk(base, &entry.path(), found);
            } else if file_type.is_socket() {
                found.push(entry.path().strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut found = Vec::new();
    walk(dir, dir, &mut found);
    found.sort();
    found
}

/// A command's stdout and stderr as text (invalid UTF-8 replaced).
pub fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Whether something answers a PING on 127.0.0.1:`port` with a status line
/// (an allow list may answer 403: that is an answer too).
pub fn answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(DEFAULT_TIMEOUT));
    let mut reply = String::new();
    stream.write_all(b"SEP/1 PING\n").is_ok()
        && stream.read_to_string(&mut reply).is_ok()
        && reply.starts_with("SEP/1 ")
}

/// Starts `dipus-exporter --port P --bind 127.0.0.1 ARGS…` for `root` on a
/// free port and waits until it [`answers`]; returns its pid and the port.
/// A port taken in the meantime makes the exporter exit: then another one
/// is tried.
pub fn spawn_exporter(root: &TestRoot, args: &[&str]) -> (u32, u16) {
    spawn_exporter_with(root, args, |command| command)
}

/// [`spawn_exporter`] with the command run by `wrap` (e.g. under a lower
/// descriptor limit, or with its output elsewhere).
pub fn spawn_exporter_with(root: &TestRoot, args: &[&str], wrap: impl Fn(Command) -> Command) -> (u32, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut command = root.cmd("dipus-exporter");
        command.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]).args(args);
        let pid = root.spawn(&mut wrap(command));
        let mut up = false;
        wait_until(DEFAULT_TIMEOUT, "the exporter answers", || {
            let running = root.with_child(pid, |c| c.is_running());
            up = running && answers(port);
            up || !running
        });
        if up {
            return (pid, port);
        }
    }
    panic!("the exporter did not start on any of 5 free ports");
}

/// [`spawn_exporter`] for its port alone.
pub fn start_exporter(root: &TestRoot, args: &[&str]) -> u16 {
    spawn_exporter(root, args).1
}

/// Starts `dipusd --no-discovery --bind 127.0.0.1 --port P --services
/// <empty file>` in `root` on a free port (on loopback only: tests never
/// offer anything to the host's network) and waits for its pidfile,
/// written once its reaper runs; returns its pid.
pub fn start_reaping_dipusd(root: &TestRoot) -> u32 {
    let services = root.path().join("services");
    fs::write(&services, "").unwrap();
    start_loopback_dipusd(root, &services, &[])
}

/// Starts `dipusd --no-discovery --bind 127.0.0.1 --port P --services
/// SERVICES ARGS…` in `root` on a free port and waits for its pidfile;
/// returns its pid. A port taken meanwhile makes dipusd exit: then
/// another one is tried.
pub fn start_loopback_dipusd(root: &TestRoot, services: &Path, args: &[&str]) -> u32 {
    let pidfile = root.path().join("dipusd.pid");
    for _ in 0..5 {
        let _ = fs::remove_file(&pidfile);
        let port = free_port().to_string();
        let pid = root.spawn(
            root.cmd("dipusd")
                .args(["--no-discovery", "--bind", "127.0.0.1", "--port", &port])
                .args(args)
                .args(["--services".as_ref(), services.as_os_str(), "--pidfile".as_ref(), pidfile.as_os_str()])
                .stderr(std::process::Stdio::null()),
        );
        let mut up = false;
        wait_until(DEFAULT_TIMEOUT, "dipusd writes its pidfile", || {
            let running = root.with_child(pid, |c| c.is_running());
            up = running && fs::read_to_string(&pidfile).is_ok_and(|text| text == format!("{pid}\n"));
            up || !running
        });
        if up {
            return pid;
        }
    }
    panic!("dipusd did not start on any of 5 free ports");
}
