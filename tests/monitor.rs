//! dipus-service-monitor: exact `+ PATH` / `- PATH` lines as services
//! appear and vanish anywhere in the tree (also in directories made after
//! it started), `--initial`, selectors, and whole directories removed.

mod common;

use common::service::{assert_error, make_foreign_top, serve, serve_with, stale_at, stop};
use common::*;
use std::path::Path;
use std::time::Duration;

/// How long "nothing else" is awaited after the expected lines.
const QUIET: Duration = Duration::from_millis(300);

fn plus(path: &Path) -> String {
    format!("+ {}", path.display())
}

fn minus(path: &Path) -> String {
    format!("- {}", path.display())
}

/// Waits until process `pid` watches at least `watches` directories with
/// inotify (read from /proc): without `--initial` the monitor says nothing
/// when it is ready, and a service made before its watches exist is
/// current, not new.
fn wait_watching(pid: u32, watches: usize) {
    let count = || -> usize {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
        fds.flatten()
            .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == Path::new("anon_inode:inotify")))
            .map(|fd| {
                let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()));
                info.map(|info| info.lines().filter(|l| l.starts_with("inotify wd:")).count()).unwrap_or(0)
            })
            .sum()
    };
    wait_until(DEFAULT_TIMEOUT, &format!("{pid} watching {watches} directories"), || count() >= watches);
}

#[test]
fn services_starting_and_stopping_are_reported() {
    let root = TestRoot::new();
    let (before, before_path) = serve(&root, "cat", "before/text/plain", "local/text/plain/before.testhost..0");
    let (monitor, mut lines) = root.spawn_lines(&mut root.cmd("dipus-service-monitor"));
    // The root, local/, local/text/, local/text/plain/.
    wait_watching(monitor, 4);

    let (second, second_path) = serve(&root, "cat", "second/text/plain", "local/text/plain/second.testhost..0");
    lines.expect_line(&plus(&second_path), DEFAULT_TIMEOUT);
    // A protocol directory five levels deep, made after the monitor started.
    let (deep, deep_path) = serve(&root, "cat", "deep/a/b/c/d/e", "local/a/b/c/d/e/deep.testhost..0");
    lines.expect_line(&plus(&deep_path), DEFAULT_TIMEOUT);
    // And in a scope that did not exist yet.
    let (exported, exported_path) =
        serve_with(&root, root.cmd("dipus-export-pipe").args(["cat", "out/x/y"]), "exported/x/y/out.testhost..0");
    lines.expect_line(&plus(&exported_path), DEFAULT_TIMEOUT);

    for (pid, path) in [(second, &second_path), (before, &before_path), (deep, &deep_path), (exported, &exported_path)]
    {
        assert_eq!(stop(&root, pid, "TERM").code(), Some(0));
        lines.expect_line(&minus(path), DEFAULT_TIMEOUT);
    }
    assert_eq!(lines.next_line(QUIET), None, "nothing else changed");
}

#[test]
fn initial_lists_present_services_then_synced() {
    let root = TestRoot::new();
    let (_, exported) = serve_with(
        &root,
        root.cmd("dipus-export-pipe").args(["cat", "e/text/plain"]),
        "exported/text/plain/e.testhost..0",
    );
    let (_, local) = serve(&root, "cat", "l/text/plain", "local/text/plain/l.testhost..0");
    // A stale socket is still a socket in the tree.
    let stale = stale_at(&root, "local/text/plain/s.testhost..0");
    let (_, mut lines) = root.spawn_lines(root.cmd("dipus-service-monitor").arg("--initial"));
    for path in [&local, &stale, &exported] {
        lines.expect_line(&plus(path), DEFAULT_TIMEOUT);
    }
    lines.expect_line("= synced", DEFAULT_TIMEOUT);
    let (_, later) = serve(&root, "cat", "later/text/plain", "local/text/plain/later.testhost..0");
    lines.expect_line(&plus(&later), DEFAULT_TIMEOUT);
    std::fs::remove_file(&stale).unwrap();
    lines.expect_line(&minus(&stale), DEFAULT_TIMEOUT);
    assert_eq!(lines.next_line(QUIET), None, "nothing else changed");
}

#[test]
fn a_selector_filters_what_is_reported() {
    let root = TestRoot::new();
    serve(&root, "cat", "other/text/plain", "local/text/plain/other.testhost..0");
    let (_, first) = serve(&root, "sort", "sorter/text/plain", "local/text/plain/sorter.testhost..0");
    let (_, mut lines) = root.spawn_lines(root.cmd("dipus-service-monitor").args(["--initial", "sorter"]));
    lines.expect_line(&plus(&first), DEFAULT_TIMEOUT);
    lines.expect_line("= synced", DEFAULT_TIMEOUT);
    // Events arrive in order: once the sorter line is there, the earlier
    // events of the other service were seen and filtered out.
    let (other, _) = serve(&root, "cat", "other/text/plain", "local/text/plain/other.testhost..1");
    let (second, second_path) = serve(&root, "sort", "sorter/text/plain", "local/text/plain/sorter.testhost..1");
    lines.expect_line(&plus(&second_path), DEFAULT_TIMEOUT);
    stop(&root, other, "TERM");
    stop(&root, second, "TERM");
    lines.expect_line(&minus(&second_path), DEFAULT_TIMEOUT);
    assert_eq!(lines.next_line(QUIET), None, "nothing else reported");
}

#[test]
fn removing_a_protocol_directory_reports_its_services() {
    let root = TestRoot::new();
    let deep = stale_at(&root, "local/gone/a/b/stale.testhost..0");
    let shallow = stale_at(&root, "local/gone/x.testhost..0");
    let (_, kept) = serve(&root, "cat", "kept/text/plain", "local/text/plain/kept.testhost..0");
    let (_, mut lines) = root.spawn_lines(root.cmd("dipus-service-monitor").arg("--initial"));
    for path in [&shallow, &deep, &kept] {
        lines.expect_line(&plus(path), DEFAULT_TIMEOUT);
    }
    lines.expect_line("= synced", DEFAULT_TIMEOUT);
    std::fs::remove_dir_all(root.tree().join("local/gone")).unwrap();
    let mut removed = vec![lines.next_line(DEFAULT_TIMEOUT), lines.next_line(DEFAULT_TIMEOUT)];
    removed.sort();
    assert_eq!(removed, [Some(minus(&deep)), Some(minus(&shallow))]);
    assert_eq!(lines.next_line(QUIET), None, "nothing else changed");
    // The monitor still sees a directory of the same name made again.
    let (_, again) = serve(&root, "cat", "again/gone", "local/gone/again.testhost..0");
    lines.expect_line(&plus(&again), DEFAULT_TIMEOUT);
}

#[test]
fn sockets_in_directories_made_in_a_burst_are_all_reported() {
    let root = TestRoot::new();
    let (monitor, mut lines) = root.spawn_lines(root.cmd("dipus-service-monitor").arg("--initial"));
    lines.expect_line("= synced", DEFAULT_TIMEOUT);
    // Directory and socket made back to back, faster than the monitor can
    // add its watches: the scan after each new watch must find them.
    let mut expected = Vec::new();
    let mut sockets = Vec::new();
    for i in 0..20 {
        let (listener, path) = common::service::listen_at(&root, &format!("local/burst/{i}/a/b/s.testhost..0"));
        sockets.push(listener);
        expected.push(plus(&path));
    }
    let mut got: Vec<String> = (0..20).filter_map(|_| lines.next_line(DEFAULT_TIMEOUT)).collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    assert_eq!(lines.next_line(QUIET), None, "each reported once");
    assert!(root.with_child(monitor, |c| c.is_running()));
}

#[test]
fn a_removed_root_ends_the_monitor_and_dls_watch_with_status_74() {
    let root = TestRoot::new();
    // A server keeps its socket, and so the root, alive in the kernel after
    // the removal: the root's own watch says nothing until it is gone.
    let (_server, path) = serve(&root, "cat", "held/text/plain", "local/text/plain/held.testhost..0");
    let (monitor, mut monitor_lines) = root.spawn_lines(&mut root.cmd("dipus-service-monitor"));
    let (watch, mut watch_lines) = root.spawn_lines(root.cmd("dls").arg("-w"));
    wait_watching(monitor, 4);
    watch_lines.expect_line(&plus(&path), DEFAULT_TIMEOUT);
    watch_lines.expect_line("= synced", DEFAULT_TIMEOUT);
    wait_watching(watch, 4);
    std::fs::remove_dir_all(root.tree()).expect("remove the tree");
    for (pid, lines) in [(monitor, &mut monitor_lines), (watch, &mut watch_lines)] {
        lines.expect_line(&minus(&path), DEFAULT_TIMEOUT);
        let status = root.with_child(pid, |child| child.wait_timeout(DEFAULT_TIMEOUT));
        assert_eq!(status.map(|s| s.code()), Some(Some(74)), "a watch of a tree that is gone went on");
    }
}

#[test]
fn lines_lost_to_a_write_error_end_the_monitor_with_status_74() {
    let root = TestRoot::new();
    let (_server, _) = serve(&root, "cat", "held/text/plain", "local/text/plain/held.testhost..0");
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let mut cmd = root.cmd("dipus-service-monitor");
    cmd.arg("--initial").stdin(std::process::Stdio::null()).stdout(full).stderr(std::process::Stdio::piped());
    let out = run_child(cmd);
    assert_eq!(out.0, Some(74), "{}", out.1);
    assert_eq!(out.1, "dipus-service-monitor: cannot write to stdout: No space left on device (os error 28)\n");
}

/// Waits (bounded) for `cmd` to exit; its status and its piped stderr.
fn run_child(mut cmd: std::process::Command) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = ChildGuard::spawn(&mut cmd);
    let status = child.wait_timeout(DEFAULT_TIMEOUT).unwrap_or_else(|| panic!("{cmd:?} did not exit"));
    let mut stderr = String::new();
    child.0.stderr.take().expect("piped stderr").read_to_string(&mut stderr).unwrap();
    (status.code(), stderr)
}

#[test]
fn a_uri_is_refused_as_one_not_called_an_invalid_selector() {
    let root = TestRoot::new();
    let out = run_with_timeout(root.cmd("dipus-service-monitor").arg("sep://127.0.0.1:17347"), None, DEFAULT_TIMEOUT);
    let stderr = assert_error(&out, 64, "dipus-service-monitor", &["\"sep://127.0.0.1:17347\" is a URI", "dls -w URI"]);
    assert!(!stderr.contains("invalid selector"), "{stderr}");
    // A selector that is no selector is called that, without offering URIs.
    let out = run_with_timeout(root.cmd("dipus-service-monitor").arg("x.*"), None, DEFAULT_TIMEOUT);
    let stderr = assert_error(&out, 64, "dipus-service-monitor", &["invalid selector \"x.*\""]);
    assert!(!stderr.contains("URI"), "{stderr}");
}

/// A socket in a directory named like a user that is not that user's
/// scope (another user's, or open to others) is no service: not reported.
#[test]
fn sockets_in_a_directory_that_is_not_a_users_scope_are_not_reported() {
    if !require(have_root(), "needs root to make directories owned by another user") {
        return;
    }
    let root = TestRoot::new();
    let nobody = common::service::user_name(65534).unwrap_or_else(|| "uid65534".into());
    let foreign = [("aaa", 0o700), (nobody.as_str(), 0o755)]
        .map(|(top, mode)| make_foreign_top(&root, top, 65534, mode, "text/plain"));
    let (_, mut lines) = root.spawn_lines(root.cmd("dipus-service-monitor").arg("--initial"));
    lines.expect_line("= synced", DEFAULT_TIMEOUT);
    let _sockets = foreign.map(|dir| std::os::unix::net::UnixListener::bind(dir.join("x.testhost..0")).unwrap());
    let (_, local) = serve(&root, "cat", "l/text/plain", "local/text/plain/l.testhost..0");
    lines.expect_line(&plus(&local), DEFAULT_TIMEOUT);
    assert_eq!(lines.next_line(QUIET), None, "nothing else changed");
}

#[test]
fn anything_renamed_over_a_live_socket_reports_it_removed() {
    let root = TestRoot::new();
    let (_file_server, file_path) = serve(&root, "cat", "file/text/plain", "local/text/plain/file.testhost..0");
    let (_link_server, link_path) = serve(&root, "cat", "link/text/plain", "local/text/plain/link.testhost..0");
    let (_socket_server, socket_path) = serve(&root, "cat", "socket/text/plain", "local/text/plain/socket.testhost..0");
    let (_, mut lines) = root.spawn_lines(root.cmd("dipus-service-monitor").arg("--initial"));
    let mut initial: Vec<Option<String>> = (0..3).map(|_| lines.next_line(DEFAULT_TIMEOUT)).collect();
    initial.sort();
    assert_eq!(initial, [Some(plus(&file_path)), Some(plus(&link_path)), Some(plus(&socket_path))]);
    lines.expect_line("= synced", DEFAULT_TIMEOUT);

    // rename(2) over a path sends IN_MOVED_TO for it and no deletion: the
    // servers still listen, but their sockets are no longer in the tree.
    let staged = root.path().join("staged");
    std::fs::write(&staged, "not a socket").unwrap();
    std::fs::rename(&staged, &file_path).unwrap();
    lines.expect_line(&minus(&file_path), DEFAULT_TIMEOUT);
    std::os::unix::fs::symlink("/nonexistent", &staged).unwrap();
    std::fs::rename(&staged, &link_path).unwrap();
    lines.expect_line(&minus(&link_path), DEFAULT_TIMEOUT);
    // Another socket in its place (bound at a hidden name, which is no
    // service) is a new service at the same path.
    let (_other, hidden) = common::service::listen_at(&root, "local/text/plain/.other");
    std::fs::rename(&hidden, &socket_path).unwrap();
    lines.expect_line(&minus(&socket_path), DEFAULT_TIMEOUT);
    lines.expect_line(&plus(&socket_path), DEFAULT_TIMEOUT);
    assert_eq!(lines.next_line(QUIET), None, "nothing else changed");
}
