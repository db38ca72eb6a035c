//! A server stopped cleanly (SIGTERM, SIGINT) takes along the protocol
//! directories that its sockets' removal left empty, and nothing else:
//! not a directory still holding another service's socket, not a scope
//! directory. For every kind of server that makes sockets in the tree:
//! `dipus-local-pipe`, `dipus-export-pipe`, `dipus-import` (proxies in
//! `imported/`) and `dipusd` (default services and imports).

mod common;

use common::service::{listen_at, sockets, start_exporter, stop, wait_for_socket};
use common::*;
use std::path::Path;
use std::process::Stdio;

/// The empty directories below the scopes of the tree at `root`, as sorted
/// paths relative to it: protocol directories nobody uses any more.
fn empty_protocol_dirs(root: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, depth: usize, found: &mut Vec<String>) {
        let entries: Vec<_> =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())).flatten().collect();
        if entries.is_empty() && depth >= 2 {
            found.push(dir.strip_prefix(base).unwrap().display().to_string());
        }
        for entry in entries {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(base, &entry.path(), depth + 1, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(root, root, 0, &mut found);
    found.sort();
    found
}

/// The directories of `root`'s tree, as sorted relative paths.
fn directories(root: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())).flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                found.push(entry.path().strip_prefix(base).unwrap().display().to_string());
                walk(base, &entry.path(), found);
            }
        }
    }
    let mut found = Vec::new();
    walk(root, root, &mut found);
    found.sort();
    found
}

#[test]
fn a_pipe_server_stopped_takes_its_emptied_protocol_directories_along() {
    for (applet, scope) in [("dipus-local-pipe", "local"), ("dipus-export-pipe", "exported")] {
        for signal in ["TERM", "INT"] {
            let root = TestRoot::new();
            // Another service's socket in `text/`: that directory stays.
            let (_other, _) = listen_at(&root, &format!("{scope}/text/other.testhost..0"));
            let deep = format!("{scope}/text/plain/utf-8/deep.testhost..0");
            let pid = root.spawn(root.cmd(applet).args(["cat", "deep/text/plain/utf-8"]));
            wait_for_socket(&root, pid, &root.tree().join(&deep));
            let (alone_pid, alone) = {
                let path = root.tree().join(format!("{scope}/audio/x-wav/alone.testhost..0"));
                let pid = root.spawn(root.cmd(applet).args(["cat", "alone/audio/x-wav"]));
                wait_for_socket(&root, pid, &path);
                (pid, path)
            };

            assert_eq!(stop(&root, pid, signal).code(), Some(0), "{applet} after SIG{signal}");
            assert_eq!(stop(&root, alone_pid, signal).code(), Some(0), "{applet} after SIG{signal}");
            assert!(!alone.exists());
            assert_eq!(sockets(&root.tree()), [format!("{scope}/text/other.testhost..0")], "{applet} SIG{signal}");
            assert_eq!(empty_protocol_dirs(&root.tree()), Vec::<String>::new(), "{applet} after SIG{signal}");
            assert_eq!(directories(&root.tree()), [scope.to_string(), format!("{scope}/text")], "{applet}");
        }
    }
}

/// Two servers in one protocol directory: the first to stop leaves it to
/// the second, the second takes it along.
#[test]
fn a_protocol_directory_stays_while_another_server_uses_it() {
    let root = TestRoot::new();
    let first = root.tree().join("local/text/plain/first.testhost..0");
    let second = root.tree().join("local/text/plain/second.testhost..0");
    let first_pid = root.spawn(root.cmd("dipus-local-pipe").args(["cat", "first/text/plain"]));
    wait_for_socket(&root, first_pid, &first);
    let second_pid = root.spawn(root.cmd("dipus-local-pipe").args(["cat", "second/text/plain"]));
    wait_for_socket(&root, second_pid, &second);

    assert_eq!(stop(&root, first_pid, "TERM").code(), Some(0));
    assert_eq!(sockets(&root.tree()), ["local/text/plain/second.testhost..0"]);
    assert_eq!(stop(&root, second_pid, "TERM").code(), Some(0));
    assert_eq!(directories(&root.tree()), ["local"]);
}

/// An exporting host `hosta` with `sorter/text/plain` and
/// `player/audio/mpeg/to/audio/out`, on a free loopback port.
fn exporting_host() -> (TestRoot, u16) {
    let other = TestRoot::new().with_host("hosta");
    for (spec, path) in [
        ("sorter/text/plain", "exported/text/plain/sorter.hosta..0"),
        ("player/audio/mpeg/to/audio/out", "exported/audio/mpeg/to/audio/out/player.hosta..0"),
    ] {
        let pid = other.spawn(other.cmd("dipus-export-pipe").args(["cat", spec]));
        wait_for_socket(&other, pid, &other.tree().join(path));
    }
    let port = start_exporter(&other, &[]);
    (other, port)
}

#[test]
fn an_import_stopped_takes_its_emptied_protocol_directories_along() {
    let (_other, port) = exporting_host();
    let root = TestRoot::new().with_host("hostb");
    // Someone else's proxy in `imported/text/plain`: that directory stays.
    let (_foreign, _) = listen_at(&root, "imported/text/plain/other.hostc..0");
    let pidfile = root.path().join("import.pid");
    let mut importer = ChildGuard::spawn(
        root.cmd("dipus-import")
            .args(["-f", "--pidfile", pidfile.to_str().unwrap(), &format!("sep://127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stderr(Stdio::null()),
    );
    // In the foreground, the pidfile is written once the first sync is done.
    wait_until(DEFAULT_TIMEOUT, "the import's first sync", || pidfile.exists());
    assert_eq!(
        sockets(&root.tree()),
        [
            "imported/audio/mpeg/to/audio/out/player.hosta..0",
            "imported/text/plain/other.hostc..0",
            "imported/text/plain/sorter.hosta..0",
        ]
    );

    let status = importer.terminate(DEFAULT_TIMEOUT).expect("the importer exits on SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert_eq!(sockets(&root.tree()), ["imported/text/plain/other.hostc..0"]);
    assert_eq!(empty_protocol_dirs(&root.tree()), Vec::<String>::new());
    assert_eq!(directories(&root.tree()), ["imported", "imported/text", "imported/text/plain"]);
}

#[test]
fn dipusd_stopped_takes_the_emptied_protocol_directories_of_its_services_and_imports_along() {
    let (_other, port) = exporting_host();
    let root = TestRoot::new();
    let services = root.path().join("services");
    std::fs::write(&services, "upper/text/plain/utf-8 local tr a-z A-Z\nlower/text/x exported tr A-Z a-z\n").unwrap();
    // Another service's socket in `local/text`: that directory stays.
    let (_foreign, _) = listen_at(&root, "local/text/foreign.testhost..0");
    let host = format!("sep://127.0.0.1:{port}");
    let daemon = common::service::start_loopback_dipusd(&root, &services, &["--host", &host]);
    wait_until(DEFAULT_TIMEOUT, "the import of hosta", || sockets(&root.tree()).len() == 5);
    assert_eq!(
        sockets(&root.tree()),
        [
            "exported/text/x/lower.testhost..0",
            "imported/audio/mpeg/to/audio/out/player.hosta..0",
            "imported/text/plain/sorter.hosta..0",
            "local/text/foreign.testhost..0",
            "local/text/plain/utf-8/upper.testhost..0",
        ]
    );

    assert_eq!(stop(&root, daemon, "TERM").code(), Some(0));
    assert_eq!(sockets(&root.tree()), ["local/text/foreign.testhost..0"]);
    assert_eq!(empty_protocol_dirs(&root.tree()), Vec::<String>::new());
    assert_eq!(directories(&root.tree()), ["exported", "imported", "local", "local/text"]);
}
