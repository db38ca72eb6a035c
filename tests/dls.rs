//! dls: the aligned table, `-1`, `-f`, `-l`, selectors, the preference
//! order of services, and `-w` as +/- lines when stdout is no terminal.

mod common;

use common::service::{
    assert_success, egid, euid, group_name, listen_at, serve, serve_with, spawn_exporter, stale_at, stop, user_name,
};
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};

fn dls(root: &TestRoot, args: &[&str]) -> String {
    let out = run_with_timeout(root.cmd("dls").args(args), None, DEFAULT_TIMEOUT);
    assert_success(&out, &format!("dls {args:?}"));
    assert!(out.stderr.is_empty(), "dls {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 listing")
}

/// `dls -1 -f ARGS…` with the tree's prefix taken off each path.
fn selected(root: &TestRoot, selectors: &[&str]) -> Vec<String> {
    let prefix = format!("{}/", root.tree().display());
    let mut args = vec!["-1", "-f"];
    args.extend(selectors);
    dls(root, &args)
        .lines()
        .map(|l| l.strip_prefix(&prefix).unwrap_or_else(|| panic!("{l:?} is not in the tree")).to_string())
        .collect()
}

/// Live sockets planted at `relative` paths; kept open while the test runs.
fn plant(root: &TestRoot, relatives: &[&str]) -> Vec<UnixListener> {
    relatives.iter().map(|r| listen_at(root, r).0).collect()
}

#[test]
fn the_table_is_aligned_under_its_header() {
    let root = TestRoot::new();
    serve(&root, "cat", "cat/text/plain", "local/text/plain/cat.testhost..0");
    serve(&root, "sort", "sorter/text/plain", "local/text/plain/sorter.testhost..0");
    serve_with(
        &root,
        root.cmd("dipus-local-pipe").env("DIPUS_HOSTNAME", "b.lan").args(["sort", "sorter/text/plain"]),
        "local/text/plain/sorter.b.lan..0",
    );
    serve_with(
        &root,
        root.cmd("dipus-export-pipe").args(["tr a-z A-Z", "up/text/x-upper"]),
        "exported/text/x-upper/up.testhost..0",
    );
    assert_eq!(
        dls(&root, &[]),
        "NAME    HOST      INST  PROTOCOL      SCOPE\n\
         cat     testhost  0     text/plain    local\n\
         sorter  b.lan     0     text/plain    local\n\
         sorter  testhost  0     text/plain    local\n\
         up      testhost  0     text/x-upper  exported\n"
    );
    assert_eq!(
        dls(&root, &["-1"]),
        "text/plain/cat.testhost..0\n\
         text/plain/sorter.b.lan..0\n\
         text/plain/sorter.testhost..0\n\
         text/x-upper/up.testhost..0\n"
    );
    let tree = root.tree().display().to_string();
    assert_eq!(
        dls(&root, &["-f"]),
        format!(
            "PATH\n\
             {tree}/local/text/plain/cat.testhost..0\n\
             {tree}/local/text/plain/sorter.b.lan..0\n\
             {tree}/local/text/plain/sorter.testhost..0\n\
             {tree}/exported/text/x-upper/up.testhost..0\n"
        )
    );
    // Nothing selected: the header alone, or nothing at all.
    assert_eq!(dls(&root, &["nosuch"]), "NAME  HOST  INST  PROTOCOL  SCOPE\n");
    assert_eq!(dls(&root, &["-1", "nosuch"]), "");
}

#[test]
fn a_full_path_from_dls_works_with_socat() {
    if !require(have_command("socat"), "needs socat") {
        return;
    }
    let root = TestRoot::new();
    let (_, path) = serve(&root, "sort", "sorter/text/plain", "local/text/plain/sorter.testhost..0");
    let listed = dls(&root, &["-1", "-f", "sorter"]);
    assert_eq!(listed, format!("{}\n", path.display()));
    let address = format!("UNIX-CONNECT:{}", listed.trim_end());
    let out = run_with_timeout(Command::new("socat").args(["-", &address]), Some(b"b\nc\na\n"), DEFAULT_TIMEOUT);
    assert_success(&out, "socat");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a\nb\nc\n");
}

/// Columns padded to their widest cell, two spaces apart, the last one
/// unpadded: the expected form of a table.
fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap()).collect();
    let mut text = String::new();
    for row in rows {
        let last = row.len() - 1;
        for (c, cell) in row.iter().enumerate() {
            if c == last {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        text.push('\n');
    }
    text
}

#[test]
fn long_listing_shows_mode_owner_group_and_liveness() {
    let root = TestRoot::new();
    serve_with(
        &root,
        root.cmd("dipus-local-pipe").args(["--mode", "0640", "cat", "live/text/plain"]),
        "local/text/plain/live.testhost..0",
    );
    let stale = stale_at(&root, "local/text/plain/stale.testhost..0");
    std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o600)).unwrap();
    let owner = user_name(euid()).unwrap_or_else(|| euid().to_string());
    let group = group_name(egid()).unwrap_or_else(|| egid().to_string());
    let row = |cells: &[&str]| cells.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    let expected = table(&[
        row(&["MODE", "OWNER", "GROUP", "STATE", "NAME", "HOST", "INST", "PROTOCOL", "SCOPE"]),
        row(&["0640", &owner, &group, "alive", "live", "testhost", "0", "text/plain", "local"]),
        row(&["0600", &owner, &group, "dead", "stale", "testhost", "0", "text/plain", "local"]),
    ]);
    assert_eq!(dls(&root, &["-l"]), expected);
    let tree = root.tree().display().to_string();
    assert_eq!(
        dls(&root, &["-l", "-1", "-f"]),
        format!(
            "0640 {owner} {group} alive {tree}/local/text/plain/live.testhost..0\n\
             0600 {owner} {group} dead {tree}/local/text/plain/stale.testhost..0\n"
        )
    );
}

#[test]
fn selectors_pick_by_name_host_instance_protocol_and_path() {
    let root = TestRoot::new();
    let _sockets = plant(
        &root,
        &[
            "local/text/plain/sorter.testhost..0",
            "local/text/plain/sorter.testhost..1",
            "local/text/plain/sorter.testhost.lan..0",
            "local/text/plain/sorter.testhostx..0",
            "local/text/plain/cat.testhost..0",
            "local/text/html/sorter.testhost..0",
            "local/texts/x.testhost..0",
            "local/text/plainer/y.testhost..0",
            "exported/text/plain/sorter.testhost..0",
        ],
    );
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["sorter"],
            &[
                "local/text/html/sorter.testhost..0",
                "local/text/plain/sorter.testhost..0",
                "local/text/plain/sorter.testhost..1",
                "local/text/plain/sorter.testhost.lan..0",
                "local/text/plain/sorter.testhostx..0",
                "exported/text/plain/sorter.testhost..0",
            ],
        ),
        // HOST matches exactly or as a dotted prefix, never as a string prefix.
        (
            &["sorter.testhost"],
            &[
                "local/text/html/sorter.testhost..0",
                "local/text/plain/sorter.testhost..0",
                "local/text/plain/sorter.testhost..1",
                "local/text/plain/sorter.testhost.lan..0",
                "exported/text/plain/sorter.testhost..0",
            ],
        ),
        (&["sorter.testhost.lan"], &["local/text/plain/sorter.testhost.lan..0"]),
        (&["sorter.testhost..1"], &["local/text/plain/sorter.testhost..1"]),
        // An instance names one file: its host is exact.
        (
            &["sorter.testhost..0"],
            &[
                "local/text/html/sorter.testhost..0",
                "local/text/plain/sorter.testhost..0",
                "exported/text/plain/sorter.testhost..0",
            ],
        ),
        // Protocol prefixes are component-wise: text/plain is not a prefix
        // of text/plainer.
        (
            &["text/plain"],
            &[
                "local/text/plain/cat.testhost..0",
                "local/text/plain/sorter.testhost..0",
                "local/text/plain/sorter.testhost..1",
                "local/text/plain/sorter.testhost.lan..0",
                "local/text/plain/sorter.testhostx..0",
                "exported/text/plain/sorter.testhost..0",
            ],
        ),
        (&["text/plai"], &[]),
        (&["text/plainer"], &["local/text/plainer/y.testhost..0"]),
        (&["text/html"], &["local/text/html/sorter.testhost..0"]),
        (
            &["text/plain/sorter.testhost..0"],
            &["local/text/plain/sorter.testhost..0", "exported/text/plain/sorter.testhost..0"],
        ),
        (
            &["text/plain/sorter"],
            &[
                "local/text/plain/sorter.testhost..0",
                "local/text/plain/sorter.testhost..1",
                "local/text/plain/sorter.testhost.lan..0",
                "local/text/plain/sorter.testhostx..0",
                "exported/text/plain/sorter.testhost..0",
            ],
        ),
        // Several selectors: their union, in preference order.
        (&["x", "cat"], &["local/text/plain/cat.testhost..0", "local/texts/x.testhost..0"]),
    ];
    for (selectors, expected) in cases {
        assert_eq!(selected(&root, selectors), *expected, "dls -1 -f {selectors:?}");
    }
    let path = root.tree().join("exported/text/plain/sorter.testhost..0");
    assert_eq!(selected(&root, &[path.to_str().unwrap()]), ["exported/text/plain/sorter.testhost..0"]);
}

#[test]
fn services_are_ordered_by_scope_protocol_name_host_and_index() {
    let root = TestRoot::new();
    let user = user_name(euid()).expect("the test's user has a name");
    let user_socket = format!("{user}/a/u.h..0");
    let _sockets = plant(
        &root,
        &[
            "imported/a/i.h..0",
            &user_socket,
            "exported/a/x.h..0",
            "local/z/x.h..0",
            "local/a/b.h..10",
            "local/a/b.h..2",
            "local/a/b/c.h..0",
            "local/a/a.h..0",
            "local/a/b.g..5",
        ],
    );
    assert_eq!(
        selected(&root, &[]),
        [
            "local/a/a.h..0",
            "local/a/b.g..5",
            "local/a/b.h..2",
            "local/a/b.h..10",
            "local/a/b/c.h..0",
            "local/z/x.h..0",
            "exported/a/x.h..0",
            &user_socket,
            "imported/a/i.h..0",
        ]
    );
    let scopes: Vec<String> =
        dls(&root, &[]).lines().skip(1).map(|l| l.split_whitespace().last().unwrap().to_string()).collect();
    let user_scope = user.as_str();
    assert_eq!(scopes, ["local", "local", "local", "local", "local", "local", "exported", user_scope, "imported"]);
}

#[test]
fn watch_prints_present_services_then_changes() {
    let root = TestRoot::new();
    let (first, first_path) = serve(&root, "cat", "first/text/plain", "local/text/plain/first.testhost..0");
    let (_, mut lines) = root.spawn_lines(root.cmd("dls").arg("-w"));
    lines.expect_line(&format!("+ {}", first_path.display()), DEFAULT_TIMEOUT);
    lines.expect_line("= synced", DEFAULT_TIMEOUT);
    let (_, second_path) = serve(&root, "cat", "second/a/b/c", "local/a/b/c/second.testhost..0");
    lines.expect_line(&format!("+ {}", second_path.display()), DEFAULT_TIMEOUT);
    stop(&root, first, "TERM");
    lines.expect_line(&format!("- {}", first_path.display()), DEFAULT_TIMEOUT);
    assert_eq!(lines.next_line(std::time::Duration::from_millis(200)), None, "nothing else changed");
}

/// Reads the first line `child` prints (bounded in time), then closes the
/// reading end of its stdout, as `| head -1` does.
fn read_first_line_and_leave(child: &mut ChildGuard) -> String {
    use std::io::BufRead;
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = sender.send((line, reader));
    });
    let (line, reader) = receiver.recv_timeout(DEFAULT_TIMEOUT).expect("no first line");
    drop(reader);
    line
}

#[test]
fn watch_ends_when_its_reader_goes_away_while_nothing_changes() {
    let root = TestRoot::new();
    let (_exporter, port) = spawn_exporter(&root, &[]);
    let local = root.cmd("dls").arg("-w").stdin(Stdio::null()).stdout(Stdio::piped()).spawn();
    let remote_uri = format!("sep://127.0.0.1:{port}");
    let remote = root.cmd("dls").args(["-w", &remote_uri]).stdin(Stdio::null()).stdout(Stdio::piped()).spawn();
    for (what, child) in [("dls -w", local), ("dls -w sep://", remote)] {
        let mut child = ChildGuard(child.expect("spawn dls"));
        assert_eq!(read_first_line_and_leave(&mut child), "= synced\n", "{what}");
        // Well within the exporter's 5 s keepalive: the closed stdout is
        // noticed by itself, not at the next line to print.
        let status = child.wait_timeout(std::time::Duration::from_secs(3));
        assert_eq!(status.map(|s| s.code()), Some(Some(0)), "{what} did not end quietly");
    }
}

/// Runs `cmd` (bounded in time) with stdout on /dev/full, where every
/// write fails with ENOSPC; returns the exit status and stderr.
fn run_into_a_full_disk(root: &TestRoot, cmd: &mut Command) -> (Option<i32>, String) {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let stderr = root.path().join(format!("stderr-{}", next_id()));
    cmd.stdin(Stdio::null()).stdout(full).stderr(std::fs::File::create(&stderr).unwrap());
    status_and_capture(cmd, &stderr)
}

#[test]
fn a_listing_lost_to_a_write_error_is_a_failure_not_success() {
    let root = TestRoot::new();
    let _services = plant(&root, &["local/text/plain/sorter.beta..0"]);
    for args in [&["-1"][..], &[], &["-w"]] {
        let (status, stderr) = run_into_a_full_disk(&root, root.cmd("dls").args(args));
        assert_eq!(status, Some(74), "dls {args:?}: {stderr}");
        assert_eq!(stderr, "dls: cannot write to stdout: No space left on device (os error 28)\n", "dls {args:?}");
    }
}

#[test]
fn a_root_that_is_a_file_is_an_error_not_an_empty_tree() {
    let root = TestRoot::new();
    let file = root.path().join("not-a-tree");
    std::fs::write(&file, "").unwrap();
    let out = run_with_timeout(root.cmd("dls").env("DIPUS_ROOT", &file), None, DEFAULT_TIMEOUT);
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).as_ref(),
            String::from_utf8_lossy(&out.stderr).as_ref()
        ),
        (
            Some(1),
            "",
            format!("dls: {} is not a directory (a symlink or a file is in the way)\n", file.display()).as_str()
        )
    );
    // A root that is not there yet is only an empty tree.
    let out =
        run_with_timeout(root.cmd("dls").arg("-1").env("DIPUS_ROOT", root.path().join("none")), None, DEFAULT_TIMEOUT);
    assert_eq!((out.status.code(), out.stdout.as_slice(), out.stderr.as_slice()), (Some(0), &b""[..], &b""[..]));
}

/// A stdout closed from the start (`dls >&-`) fails the listing, as for
/// ls, rather than passing for an empty one.
#[test]
fn a_listing_to_a_closed_stdout_is_a_failure() {
    let root = TestRoot::new();
    let _live = plant(&root, &["local/text/plain/a.testhost..0"]);
    let mut shell = shell_around(&[], &root.cmd("dls"), r#"exec "$0" >&-"#);
    let out = run_with_timeout(&mut shell, None, DEFAULT_TIMEOUT);
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stderr).as_ref()),
        (Some(74), "dls: cannot write to stdout: Bad file descriptor (os error 9)\n")
    );
}

/// A fake exporter on loopback: answers its one client's request with
/// `answer` (the status line first) and closes; returns its port.
fn answering_exporter(answer: String) -> (u16, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("dls connects");
        let mut request = [0u8; 256];
        let _ = stream.read(&mut request);
        // dls may have given up and closed already.
        let _ = stream.write_all(answer.as_bytes());
    });
    (port, server)
}

fn services(range: std::ops::Range<usize>, prefix: &str) -> String {
    range.map(|n| format!("{prefix}text/plain/s{n}.hosta..0\n")).collect()
}

/// The most services a client keeps of one exporter.
const MAX_SERVICES: usize = 16384;

/// A LIST reply longer than any host's offer is an error, not memory
/// without end; one of exactly the bound is listed whole.
#[test]
fn a_listing_of_more_services_than_a_host_offers_is_refused() {
    let root = TestRoot::new();
    let (port, server) = answering_exporter(format!("SEP/1 200 OK\n{}", services(0..MAX_SERVICES, "")));
    let listed = dls(&root, &["-1", &format!("sep://127.0.0.1:{port}")]);
    server.join().unwrap();
    assert_eq!(listed.lines().count(), MAX_SERVICES);

    let (port, server) = answering_exporter(format!("SEP/1 200 OK\n{}", services(0..MAX_SERVICES + 1, "")));
    let out = run_with_timeout(root.cmd("dls").arg(format!("sep://127.0.0.1:{port}")), None, DEFAULT_TIMEOUT);
    server.join().unwrap();
    assert_eq!(out.status.code(), Some(74));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("dls: 127.0.0.1:{port}: more than {MAX_SERVICES} services listed; a host offers fewer\n")
    );
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// `dls -w sep://` follows at most as many services as a host offers:
/// past the bound it says so once and ignores the rest, their removals
/// included.
#[test]
fn a_watch_follows_no_more_services_than_a_host_offers() {
    let root = TestRoot::new();
    let answer = format!(
        "SEP/1 200 OK\n{}= synced\n- text/plain/s{MAX_SERVICES}.hosta..0\n- text/plain/s0.hosta..0\n",
        services(0..MAX_SERVICES + 10, "+ ")
    );
    let (port, server) = answering_exporter(answer);
    let uri = format!("sep://127.0.0.1:{port}");
    let out = run_with_timeout(root.cmd("dls").args(["-w", &uri]), None, DEFAULT_TIMEOUT);
    server.join().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.iter().filter(|l| l.starts_with("+ ")).count(), MAX_SERVICES);
    assert_eq!(lines[MAX_SERVICES..], ["= synced", &format!("- {uri}/text/plain/s0.hosta..0")]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "dls: {uri}: it offers more than {MAX_SERVICES} services; following the first {MAX_SERVICES} only\n\
             dls: {uri}: the watch was closed\n"
        )
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_selector_called_help_selects_not_prints_usage() {
    let root = TestRoot::new();
    let _planted = plant(&root, &["local/text/plain/help.testhost..0", "local/text/plain/other.testhost..0"]);
    assert_eq!(selected(&root, &["help"]), ["local/text/plain/help.testhost..0"]);
}
