//! The tree is hostile territory: bad names, over-long paths, a symlinked
//! root or protocol directory, scope directories with the wrong mode or
//! owner are refused with a clear error, and nothing is written.

mod common;

use common::service::{assert_error, entries, euid, make_dirs, make_foreign_top, user_name};
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, None, DEFAULT_TIMEOUT)
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn invalid_service_specs_are_usage_errors_naming_the_input() {
    let root = TestRoot::new();
    for applet in ["dipus-local-pipe", "dipus-export-pipe"] {
        for spec in ["bad.name/x", "x/../y", "x", "a b/x", "x/a b", "/x", "x/", "x//y", "x/./y", "sp ace"] {
            let out = run(root.cmd(applet).args(["true", spec]));
            assert_error(&out, 64, applet, &[spec]);
        }
    }
    assert!(!root.tree().exists(), "a refused spec created the tree");
}

#[test]
fn an_over_long_socket_path_is_refused_naming_path_length_and_limit() {
    let root = TestRoot::new();
    let protocol = format!("{}/{}", "p".repeat(40), "q".repeat(40));
    let path = format!("{}/local/{protocol}/svc.testhost..0", root.tree().display());
    assert!(path.len() > 107);
    let out = run(root.cmd("dipus-local-pipe").args(["true", &format!("svc/{protocol}")]));
    let status = out.status.code();
    assert!(status.is_some_and(|code| code != 0), "status {status:?}");
    assert_error(&out, status.unwrap(), "dipus-local-pipe", &[&path, &format!("{} bytes", path.len()), "107"]);
    assert!(!root.tree().exists(), "directories were created for a socket that cannot exist");
}

#[test]
fn a_symlinked_root_is_refused_and_nothing_is_written_through_it() {
    let root = TestRoot::new();
    let real = root.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, root.tree()).unwrap();
    let tree = root.tree().display().to_string();
    let runs: [(&str, &[&str]); 5] = [
        ("dipus-local-pipe", &["true", "svc/text/plain"]),
        ("dipus-export-pipe", &["true", "svc/text/plain"]),
        ("dls", &[]),
        ("dcat", &["svc"]),
        ("dipus-service-monitor", &[]),
    ];
    for (applet, args) in runs {
        let out = run(root.cmd(applet).args(args));
        assert_error(&out, 1, applet, &[&tree, "symlink"]);
    }
    assert_eq!(entries(&real), Vec::<String>::new(), "written through the symlink");

    // A dangling link is not created through either.
    let missing = root.path().join("missing");
    std::fs::remove_file(root.tree()).unwrap();
    std::os::unix::fs::symlink(&missing, root.tree()).unwrap();
    let out = run(root.cmd("dipus-local-pipe").args(["true", "svc/text/plain"]));
    assert_error(&out, 1, "dipus-local-pipe", &[&tree, "symlink"]);
    assert!(!missing.exists());
}

#[test]
fn a_symlinked_protocol_directory_is_refused() {
    let root = TestRoot::new();
    let local = make_dirs(&root, "local");
    let elsewhere = root.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    chmod(&elsewhere, 0o1777);
    std::os::unix::fs::symlink(&elsewhere, local.join("evil")).unwrap();
    let link = local.join("evil").display().to_string();
    let out = run(root.cmd("dipus-local-pipe").args(["true", "svc/evil/deeper"]));
    assert_error(&out, 1, "dipus-local-pipe", &[&link]);
    assert_eq!(entries(&elsewhere), Vec::<String>::new(), "written through the symlink");
}

#[test]
fn a_shared_scope_without_its_mode_is_refused() {
    let root = TestRoot::new();
    let local = make_dirs(&root, "local");
    // local/ must be 1777 like /tmp; owned by a trusted user (root, or
    // the test's user) it is still refused for its mode.
    for (mode, shown) in [(0o777, "777"), (0o755, "755")] {
        chmod(&local, mode);
        let out = run(root.cmd("dipus-local-pipe").args(["true", "svc/text/plain"]));
        assert_error(&out, 1, "dipus-local-pipe", &[&local.display().to_string(), shown, "1777"]);
        assert_eq!(entries(&local), Vec::<String>::new(), "created in a refused local/ ({shown})");
    }
}

/// The user's own scope, `<root>/<user>/`, which dls checks before it
/// trusts anything in it.
fn own_scope(root: &TestRoot) -> std::path::PathBuf {
    let user = user_name(euid()).expect("the test's user has a name");
    make_dirs(root, &user)
}

#[test]
fn a_user_scope_owned_by_someone_else_is_refused() {
    if !require(have_root(), "needs root to chown a directory to nobody") {
        return;
    }
    let root = TestRoot::new();
    let scope = own_scope(&root);
    std::os::unix::fs::chown(&scope, Some(65534), Some(65534)).unwrap();
    let path = scope.display().to_string();
    let out = run(&mut root.cmd("dls"));
    assert_error(&out, 1, "dls", &[&path, "65534"]);
    let out = run(root.cmd("dcat").arg("svc"));
    assert_error(&out, 1, "dcat", &[&path, "65534"]);
}

#[test]
fn a_user_scope_with_a_wrong_mode_is_refused() {
    let root = TestRoot::new();
    let scope = own_scope(&root);
    chmod(&scope, 0o755);
    let out = run(&mut root.cmd("dls"));
    assert_error(&out, 1, "dls", &[&scope.display().to_string(), "755", "700"]);
    // Fixed, it is accepted (and empty).
    chmod(&scope, 0o700);
    let out = run(&mut root.cmd("dls"));
    assert_eq!((out.status.code(), String::from_utf8_lossy(&out.stdout).lines().count()), (Some(0), 1));
}

/// Answers every connection to each of `listeners` with its label, until
/// dropped.
struct Answering {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Answering {
    fn new(listeners: Vec<(std::os::unix::net::UnixListener, &'static str)>) -> Answering {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for (listener, _) in &listeners {
                listener.set_nonblocking(true).unwrap();
            }
            while !stopped.load(Ordering::Relaxed) {
                for (listener, label) in &listeners {
                    if let Ok((mut stream, _)) = listener.accept() {
                        let _ = stream.write_all(label.as_bytes());
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        Answering { stop, thread: Some(thread) }
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A live socket at `<dir>/<file>` that anyone may connect to.
fn open_socket(dir: &Path, file: &str) -> (std::os::unix::net::UnixListener, std::path::PathBuf) {
    let path = dir.join(file);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    chmod(&path, 0o666);
    (listener, path)
}

/// `cmd` run as user `uid` (and group `uid`, no others), through setpriv.
fn as_user(uid: u32, cmd: &Command) -> Command {
    let (reuid, regid) = (format!("--reuid={uid}"), format!("--regid={uid}"));
    shell_around(&["setpriv", &reuid, &regid, "--clear-groups"], cmd, r#"exec "$0" "$@""#)
}

/// The users a test of other users' scopes needs: a victim with a name
/// (uid 1) and an attacker (uid 65534), both with a name in /etc/passwd.
fn two_users() -> Option<(String, String)> {
    if !require(have_root(), "needs root to make directories owned by other users")
        || !require(have_command("setpriv"), "needs setpriv to run dcat as another user")
    {
        return None;
    }
    let users = user_name(1).zip(user_name(65534));
    if !require(users.is_some(), "needs users with uids 1 and 65534 in /etc/passwd") {
        return None;
    }
    users
}

/// A directory in the shared root named like a user is that user's scope
/// only if it is owned by that user with mode 0700: others (anyone may
/// make one, named as they like) are neither listed nor connected to,
/// however their names sort. A user's dcat used to connect to an
/// attacker's `aaa/` ahead of its own scope.
#[test]
fn a_directory_that_is_not_its_users_scope_is_neither_listed_nor_connected_to() {
    let Some((victim, attacker)) = two_users() else {
        return;
    };
    let root = TestRoot::new();
    let own = make_foreign_top(&root, &victim, 1, 0o700, "text/plain");
    let (own_listener, own_path) = open_socket(&own, "sorter.beta..0");
    let mut listeners = vec![(own_listener, "own scope\n")];
    // No user's name; the attacker's name but open to others; another
    // name, with the right mode. All the attacker's.
    for (top, mode) in [("aaa", 0o755), (attacker.as_str(), 0o755), ("aab", 0o700)] {
        let dir = make_foreign_top(&root, top, 65534, mode, "text/plain");
        listeners.push((open_socket(&dir, "sorter.beta..0").0, "attacker\n"));
    }
    let _answering = Answering::new(listeners);

    let out = run_with_timeout(&mut as_user(1, root.cmd("dcat").args(["-v", "sorter.beta"])), None, DEFAULT_TIMEOUT);
    assert_eq!(
        (text_of(&out), String::from_utf8_lossy(&out.stderr).into_owned()),
        ("own scope\n".to_string(), format!("dcat: connected to {}\n", own_path.display()))
    );
    let out = run(root.cmd("dls").args(["-1", "-f", "sorter.beta"]));
    assert_eq!(text_of(&out), format!("{}\n", own_path.display()), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The order of preference: local, exported, your own scope, LAN imports,
/// and only then other users' scopes (root can read them), whatever the
/// names: root's `dls` used to put a user named `daemon` before its own.
#[test]
fn other_users_scopes_come_after_lan_imports_and_your_own_before() {
    let Some((victim, _)) = two_users() else {
        return;
    };
    let root = TestRoot::new();
    let own_name = user_name(euid()).expect("the test user's name");
    let mut listeners = Vec::new();
    let mut path_of = |dir: std::path::PathBuf| {
        let (listener, path) = open_socket(&dir, "sorter.beta..0");
        listeners.push(listener);
        path.display().to_string()
    };
    let local = path_of(make_dirs(&root, "local/text/plain"));
    let exported = path_of(make_dirs(&root, "exported/text/plain"));
    let imported = path_of(make_dirs(&root, "imported/text/plain"));
    let own = path_of(make_dirs(&root, &format!("{own_name}/text/plain")));
    let other = path_of(make_foreign_top(&root, &victim, 1, 0o700, "text/plain"));

    let out = run(root.cmd("dls").args(["-1", "-f", "sorter.beta"]));
    assert_eq!(text_of(&out), [&local, &exported, &own, &imported, &other].map(|p| format!("{p}\n")).concat());
    // The other user sees their own scope where root saw its own, and not
    // root's (which they cannot read).
    let out = run(&mut as_user(1, root.cmd("dls").args(["-1", "-f", "sorter.beta"])));
    assert_eq!(text_of(&out), [&local, &exported, &other, &imported].map(|p| format!("{p}\n")).concat());
}

fn text_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
