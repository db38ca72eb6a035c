//! A daemon's whole tree removed under it (a /tmp cleaner, `rm -rf
//! $DIPUS_ROOT`): dipus-exporter and dipusd notice, say so, make the root
//! again and watch it afresh, so a WATCH reports the old services removed
//! and a service started in the new tree added; dipusd also makes its
//! default services and its imports again there.

mod common;

use common::service::{is_socket, spawn_exporter, wait_for_socket};
use common::*;
use std::io::Write;
use std::process::Stdio;

const UPPER: &str = "text/plain/upper.testhost..0";
const REBORN: &str = "data/reborn.testhost..0";

/// A raw `SEP/1 WATCH` session on 127.0.0.1:`port`, its status line read.
fn watch(port: u16) -> LineReader {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the exporter");
    stream.write_all(b"SEP/1 WATCH\n").unwrap();
    let mut lines = LineReader::new(stream);
    lines.expect_line("SEP/1 200 OK", DEFAULT_TIMEOUT);
    lines
}

/// Waits until `lines` has said each of `expected`, in any order (other
/// changes, keepalives, may come between).
fn expect_lines(lines: &mut LineReader, expected: &[String]) {
    let mut missing: Vec<&String> = expected.iter().collect();
    lines.lines_until(
        |line| {
            missing.retain(|wanted| *wanted != line);
            missing.is_empty()
        },
        DEFAULT_TIMEOUT,
    );
}

/// Removes the tree, then starts `cat` as `reborn/data` in it, which
/// makes it again (as any new service would).
fn remove_tree_and_start_a_service(root: &TestRoot) {
    std::fs::remove_dir_all(root.tree()).expect("remove the tree");
    let pid = root.spawn(root.cmd("dipus-export-pipe").args(["cat", "reborn/data"]));
    wait_for_socket(root, pid, &root.tree().join("exported").join(REBORN));
}

#[test]
fn an_exporter_whose_root_is_removed_watches_the_new_one() {
    let root = TestRoot::new();
    let first = root.spawn(root.cmd("dipus-export-pipe").args(["tr a-z A-Z", "upper/text/plain"]));
    wait_for_socket(&root, first, &root.tree().join("exported").join(UPPER));
    let (_, port) = spawn_exporter(&root, &[]);
    let mut lines = watch(port);
    lines.expect_line(&format!("+ {UPPER}"), DEFAULT_TIMEOUT);
    lines.expect_line("= synced", DEFAULT_TIMEOUT);

    remove_tree_and_start_a_service(&root);
    expect_lines(&mut lines, &[format!("- {UPPER}"), format!("+ {REBORN}")]);
    // And a new session sees the new tree as it is.
    let mut again = watch(port);
    again.expect_line(&format!("+ {REBORN}"), DEFAULT_TIMEOUT);
    again.expect_line("= synced", DEFAULT_TIMEOUT);
}

#[test]
fn dipusd_whose_root_is_removed_makes_its_services_and_imports_again() {
    let other = TestRoot::new().with_host("hostb");
    let remote = other.spawn(other.cmd("dipus-export-pipe").args(["--mode", "0666", "cat", "remote/text/plain"]));
    wait_for_socket(&other, remote, &other.tree().join("exported/text/plain/remote.hostb..0"));
    let (_, other_port) = spawn_exporter(&other, &[]);

    let root = TestRoot::new();
    let services = root.path().join("services");
    std::fs::write(&services, "upper/text/plain exported tr a-z A-Z\n").unwrap();
    let port = free_port();
    let mut command = root.cmd("dipusd");
    command
        .args(["--no-discovery", "--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--host", &format!("sep://127.0.0.1:{other_port}")])
        .arg("--services")
        .arg(&services)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard::spawn(&mut command);
    let mut stderr = LineReader::new(guard.0.stderr.take().expect("stderr was piped"));
    root.adopt(guard);
    let upper = root.tree().join("exported").join(UPPER);
    let imported = root.tree().join("imported/text/plain/remote.hostb..0");
    wait_until(DEFAULT_TIMEOUT, "dipusd's service and import", || is_socket(&upper) && is_socket(&imported));
    let mut lines = watch(port);
    lines.expect_line(&format!("+ {UPPER}"), DEFAULT_TIMEOUT);
    lines.expect_line("= synced", DEFAULT_TIMEOUT);

    remove_tree_and_start_a_service(&root);
    // Its default service leaves and comes back, the new one is seen.
    expect_lines(&mut lines, &[format!("- {UPPER}"), format!("+ {UPPER}"), format!("+ {REBORN}")]);
    let root_line = format!("{} was removed or moved away; made it again", root.tree().display());
    stderr.lines_until(|line| line.contains(&root_line), DEFAULT_TIMEOUT);
    wait_until(DEFAULT_TIMEOUT, "the import made again", || is_socket(&imported));
    let out = common::service::dcat(&root, &["upper"], Some(b"again\n"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "AGAIN\n", "the default service in the new tree");
    let out = common::service::dcat(&root, &["remote"], Some(b"through\n"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through\n", "the import in the new tree");
}
