//! The multicall binary: an applet is chosen by the name it is run as
//! (a symlink) or by the first argument; `--help`, `--version`, `--list`
//! and unknown names.

mod common;

use common::service::assert_error;
use common::*;
use std::process::{Command, Output};

fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, None, DEFAULT_TIMEOUT)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8 output")
}

/// Every applet name of this build (subcommands and aliases), from `--list`.
fn listed_names() -> Vec<String> {
    let out = run(Command::new(dipus_bin()).arg("--list"));
    assert!(out.status.success() && out.stderr.is_empty());
    text(&out.stdout).lines().map(str::to_string).collect()
}

/// The applets of issue 2, as (subcommand, installed name).
const CORE: &[(&str, &str)] = &[
    ("cat", "dcat"),
    ("ls", "dls"),
    ("local-pipe", "dipus-local-pipe"),
    ("export-pipe", "dipus-export-pipe"),
    ("monitor", "dipus-service-monitor"),
];

#[test]
fn symlink_name_and_first_argument_run_the_same_applet() {
    let root = TestRoot::new();
    // An empty tree lists as a bare header, whichever way dls is reached.
    let header = "NAME  HOST  INST  PROTOCOL  SCOPE\n";
    let mut by_link = root.cmd("dls");
    let mut by_subcommand = root.cmd("dipus");
    by_subcommand.arg("ls");
    let mut by_alias_argument = root.cmd("dipus");
    by_alias_argument.arg("dls");
    let mut by_subcommand_link = root.cmd("ls");
    for cmd in [&mut by_link, &mut by_subcommand, &mut by_alias_argument, &mut by_subcommand_link] {
        let out = run(cmd);
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(text(&out.stdout), header, "{cmd:?}");
        assert!(out.stderr.is_empty(), "{cmd:?}");
    }
}

#[test]
fn dipus_cat_and_dcat_pipe_through_the_same_service() {
    let root = TestRoot::new();
    common::service::serve(&root, "tr a-z A-Z", "upper/text/plain", "local/text/plain/upper.testhost..0");
    let mut via_subcommand = root.cmd("dipus");
    via_subcommand.args(["cat", "upper"]);
    let mut via_link = root.cmd("dcat");
    via_link.arg("upper");
    for cmd in [&mut via_subcommand, &mut via_link] {
        let out = run_with_timeout(cmd, Some(b"shout\n"), DEFAULT_TIMEOUT);
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(text(&out.stdout), "SHOUT\n");
    }
}

#[test]
fn help_lists_every_applet_with_a_summary() {
    let out = run(Command::new(dipus_bin()).arg("--help"));
    assert!(out.status.success() && out.stderr.is_empty());
    let help = text(&out.stdout);
    assert!(help.starts_with(&format!("dipus {} ", env!("CARGO_PKG_VERSION"))), "{help}");
    // One line per applet: its names, a run of spaces, a summary.
    let applets: Vec<(Vec<&str>, &str)> = help
        .lines()
        .filter(|l| l.starts_with("  "))
        .filter_map(|l| l.trim_start().split_once("  "))
        .map(|(names, summary)| (names.split(", ").collect(), summary.trim()))
        .collect();
    let names = listed_names();
    for (subcommand, installed) in CORE {
        assert!(names.contains(&subcommand.to_string()) && names.contains(&installed.to_string()), "{names:?}");
    }
    for name in &names {
        let (_, summary) = applets
            .iter()
            .find(|(names, _)| names.contains(&name.as_str()))
            .unwrap_or_else(|| panic!("--help does not list {name}:\n{help}"));
        assert!(summary.len() > 10, "no summary for {name}: {summary:?}");
    }
    let out = run(Command::new(dipus_bin()).arg("-h"));
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), help));
}

#[test]
fn version() {
    let out = run(Command::new(dipus_bin()).arg("--version"));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), format!("dipus {}\n", env!("CARGO_PKG_VERSION")));
    assert!(out.stderr.is_empty());
}

#[test]
fn unknown_applet_is_a_usage_error_listing_the_known_names() {
    let out = run(Command::new(dipus_bin()).args(["frobnicate", "x"]));
    let mut needles = vec!["frobnicate"];
    needles.extend(CORE.iter().flat_map(|(a, b)| [*a, *b]));
    let stderr = assert_error(&out, 64, "dipus", &needles);
    assert!(!stderr.contains("run as"), "{stderr}");
    // Through a symlink whose name is no applet, the first argument
    // decides, and the error says why it was taken for an applet's name.
    let out = run(Command::new(applet_bin("frobnicate")).args(["nosuch"]));
    let why = "(run as \"frobnicate\", which is no applet's name, so the first argument must be one)";
    assert_error(&out, 64, "dipus", &["nosuch", why, "dcat", "dls"]);
    // No applet at all: usage, and the usage status.
    let out = run(&mut Command::new(dipus_bin()));
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stdout).contains("Usage:") || text(&out.stderr).contains("Usage:"));
}

#[test]
fn every_applet_answers_help_with_status_0() {
    for name in listed_names() {
        let by_link = run(Command::new(applet_bin(&name)).arg("--help"));
        let by_argument = run(Command::new(dipus_bin()).args([&name, "--help"]));
        for (how, out) in [("link", &by_link), ("argument", &by_argument)] {
            assert_eq!(out.status.code(), Some(0), "{name} --help by {how}: {}", String::from_utf8_lossy(&out.stderr));
            assert!(out.stderr.is_empty(), "{name} --help by {how}: {}", String::from_utf8_lossy(&out.stderr));
            assert!(text(&out.stdout).starts_with("Usage: "), "{name} --help by {how}: {}", text(&out.stdout));
        }
        assert_eq!(by_link.stdout, by_argument.stdout, "{name}: the help depends on how it was called");
    }
}

#[test]
fn no_applet_takes_a_bare_help_argument_for_help() {
    // `help` may be a service, a selector or a FILE: only `--help` asks
    // for usage. An applet that takes `help` as a name may run on (a
    // monitor, an importer): it is stopped after a while.
    let root = TestRoot::new();
    let mut running = Vec::new();
    for name in listed_names() {
        let stdout = root.path().join(format!("stdout-{name}"));
        let mut cmd = root.cmd(&name);
        cmd.arg("help").env("DIPUS_SSH", "false").env("DIPUS_DISCOVERY_PORT", free_port().to_string());
        cmd.current_dir(root.path()).stdin(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        cmd.stdout(std::fs::File::create(&stdout).expect("create the stdout file"));
        running.push((name, stdout, ChildGuard::spawn(&mut cmd)));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < deadline && running.iter_mut().any(|(_, _, child)| child.is_running()) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for (name, stdout, child) in running {
        drop(child);
        let stdout = std::fs::read_to_string(&stdout).expect("read the stdout file");
        assert!(!stdout.contains("Usage:"), "{name} help printed usage: {stdout}");
    }
}

#[test]
fn bench_names_an_unknown_mode() {
    // A mistyped mode is called that, with or without the option a mode needs.
    for args in [&["bench", "snd"][..], &["bench", "snd", "--connect", "/nonexistent.sock"]] {
        let out = run(Command::new(dipus_bin()).args(args));
        assert_error(&out, 64, "bench", &["unknown mode \"snd\"", "sink, source, echo, send, recv, rr or connect"]);
    }
}

/// A pipe-like stdout or stderr whose reader is already gone: every write
/// to it fails with EPIPE, at once and without a race.
fn reader_gone() -> std::process::Stdio {
    let (writer, reader) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    drop(reader);
    std::process::Stdio::from(std::os::fd::OwnedFd::from(writer))
}

/// Runs `cmd` (bounded in time) with stdout, or with stderr if `stderr_gone`,
/// going to a reader that is gone; returns the exit status and what the
/// other stream said.
fn run_reader_gone(root: &TestRoot, cmd: &mut Command, stderr_gone: bool) -> (Option<i32>, String) {
    let other = root.path().join(format!("other-{}", next_id()));
    let file = std::fs::File::create(&other).expect("create the capture file");
    cmd.stdin(std::process::Stdio::null());
    if stderr_gone {
        cmd.stdout(file).stderr(reader_gone());
    } else {
        cmd.stdout(reader_gone()).stderr(file);
    }
    status_and_capture(cmd, &other)
}

#[test]
fn help_and_listings_into_a_closed_pipe_end_quietly() {
    let root = TestRoot::new();
    let mut cases: Vec<Command> = Vec::new();
    for args in [&["--help"][..], &["--list"], &["--version"], &["ls", "--help"]] {
        let mut cmd = root.cmd("dipus");
        cmd.args(args);
        cases.push(cmd);
    }
    let mut dls_help = root.cmd("dls");
    dls_help.arg("--help");
    cases.push(dls_help);
    for mut cmd in cases {
        let (status, stderr) = run_reader_gone(&root, &mut cmd, false);
        assert_eq!((status, stderr.as_str()), (Some(0), ""), "{cmd:?}");
    }
}

#[test]
fn errors_into_a_closed_pipe_keep_their_exit_status() {
    let root = TestRoot::new();
    let mut unknown_option = root.cmd("dls");
    unknown_option.arg("--bogus");
    let mut no_service = root.cmd("dcat");
    no_service.arg("nosuch");
    let mut unknown_applet = root.cmd("dipus");
    unknown_applet.arg("frobnicate");
    for (cmd, code) in [(&mut unknown_option, 64), (&mut no_service, 69), (&mut unknown_applet, 64)] {
        let (status, stdout) = run_reader_gone(&root, cmd, true);
        assert_eq!((status, stdout.as_str()), (Some(code), ""), "{cmd:?}");
    }
}

#[test]
fn arguments_that_are_not_utf8_are_a_usage_error() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let root = TestRoot::new();
    let bad = OsStr::from_bytes(b"x\xff");
    let out = run(root.cmd("dcat").arg("svc").arg(bad));
    let message = assert_error(&out, 64, "dcat", &["x\\xFF", "UTF-8"]);
    assert_eq!(message.lines().count(), 1, "{message}");
    let out = run(root.cmd("dipus").args([OsStr::new("ls"), bad]));
    assert_error(&out, 64, "dls", &["x\\xFF", "UTF-8"]);
    // A name that is not UTF-8 is no applet's name: the first argument decides.
    let out = run(root.cmd("dipus").arg0(bad).arg("--version"));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text(&out.stdout), format!("dipus {}\n", env!("CARGO_PKG_VERSION")));
}

#[test]
fn settings_in_the_environment_that_are_not_utf8_or_no_port_are_a_usage_error() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    // Falling back to the default port, host name or command would put
    // the service or the exporter where the user did not ask for it, or
    // run another ssh than the one asked for.
    let root = TestRoot::new();
    let bad = OsStr::from_bytes(b"b\xff");
    let exporter = ["--bind", "127.0.0.1"];
    let cases: [(&str, &[&str], &str, &OsStr, &str); 6] = [
        ("dipus-exporter", &exporter, "DIPUS_PORT", OsStr::new("7347x"), "DIPUS_PORT=\"7347x\" is not a port number"),
        ("dipus-exporter", &exporter, "DIPUS_PORT", bad, "DIPUS_PORT=\"b\\xFF\" is not valid UTF-8"),
        (
            "dipus-local-pipe",
            &["cat", "echo/text/plain"],
            "DIPUS_HOSTNAME",
            bad,
            "DIPUS_HOSTNAME=\"b\\xFF\" is not valid UTF-8",
        ),
        (
            "dipus-export-pipe",
            &["cat", "echo/text/plain"],
            "DIPUS_HOSTNAME",
            bad,
            "DIPUS_HOSTNAME=\"b\\xFF\" is not valid UTF-8",
        ),
        // Before ssh runs, or the private scope is made for its socket.
        ("dcat", &["ssh://nowhere.invalid/echo"], "DIPUS_SSH", bad, "DIPUS_SSH=\"b\\xFF\" is not valid UTF-8"),
        ("dls", &["ssh://nowhere.invalid"], "DIPUS_REMOTE", bad, "DIPUS_REMOTE=\"b\\xFF\" is not valid UTF-8"),
    ];
    for (applet, args, name, value, message) in cases {
        let out = run(root.cmd(applet).args(args).env(name, value));
        assert_error(&out, 64, applet, &[message]);
    }
    assert!(!root.tree().exists(), "nothing was created");
}
