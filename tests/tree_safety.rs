//! The tree is hostile territory: bad names, over-long paths, a symlinked
//! root or protocol directory, scope directories with the wrong mode or
//! owner are refused with a clear error, and nothing is written.

mod common;

use common::service::{assert_error, entries, euid, make_dirs, user_name};
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
