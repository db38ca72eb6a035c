//! socat, a peer no one here wrote: as the client of a dipus service, and
//! as a server placed in the tree by hand, which dls lists and dcat uses
//! (also when it dies and leaves its socket behind).

mod common;

use common::service::{ask, assert_success, serve, stop};
use common::*;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;

fn have_socat() -> bool {
    require(have_command("socat"), "needs socat")
}

/// Starts `socat UNIX-LISTEN:<tree>/<relative>,fork EXEC:<command>` and
/// waits until it accepts (socat binds in place, so the file exists a
/// moment before it listens). `-t 5`: after one side's EOF, socat waits
/// that long for the other side instead of 0.5 s.
fn socat_service(root: &TestRoot, relative: &str, command: &str) -> (u32, PathBuf) {
    let path = root.tree().join(relative);
    let pid = root.spawn(Command::new("socat").args([
        "-t",
        "5",
        &format!("UNIX-LISTEN:{},fork", path.display()),
        &format!("EXEC:{command}"),
    ]));
    wait_until(DEFAULT_TIMEOUT, &format!("socat listening at {}", path.display()), || {
        assert!(root.with_child(pid, |c| c.is_running()), "socat exited");
        UnixStream::connect(&path).is_ok()
    });
    (pid, path)
}

#[test]
fn socat_as_the_client_of_a_dipus_service() {
    if !have_socat() {
        return;
    }
    let root = TestRoot::new();
    let (_, path) = serve(&root, "LC_ALL=C sort", "sorter/text/plain", "local/text/plain/sorter.testhost..0");
    let address = format!("UNIX-CONNECT:{}", path.display());
    let socat = |input: &[u8]| {
        let out =
            run_with_timeout(Command::new("socat").args(["-t", "5", "-", &address]), Some(input), DEFAULT_TIMEOUT);
        assert_success(&out, "socat - UNIX-CONNECT");
        out.stdout
    };
    assert_eq!(socat(b"pear\napple\nfig\n"), b"apple\nfig\npear\n");
    // More than the socket buffers: sort answers only after socat's
    // half-close.
    let mut lines: Vec<String> = (0..100_000u32).map(|i| format!("{:08x}", i.wrapping_mul(2_654_435_761))).collect();
    let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
    lines.sort();
    let expected: String = lines.iter().map(|l| format!("{l}\n")).collect();
    assert!(socat(input.as_bytes()) == expected.as_bytes(), "sorted output differs");
}

#[test]
fn a_socat_service_in_the_tree_is_listed_and_used_by_dcat() {
    if !have_socat() {
        return;
    }
    let root = TestRoot::new();
    // dipus makes the protocol directory with its mode; socat binds in it.
    serve(&root, "sort", "sorter/text/plain", "local/text/plain/sorter.testhost..0");
    socat_service(&root, "local/text/plain/upper.testhost..0", "tr a-z A-Z");
    let out = run_with_timeout(root.cmd("dls").arg("-1"), None, DEFAULT_TIMEOUT);
    assert_success(&out, "dls -1");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "text/plain/sorter.testhost..0\ntext/plain/upper.testhost..0\n");
    assert_eq!(ask(&root, "upper", b"hello\n"), "HELLO\n");
    // Bulk both ways through socat's EXEC and its half-close.
    let input: Vec<u8> = (0..4 << 20).map(|i| b"abcdefghij\n"[i % 11]).collect();
    let out = run_with_timeout(root.cmd("dcat").arg("upper"), Some(&input), DEFAULT_TIMEOUT);
    assert_success(&out, "dcat upper <4 MiB");
    assert!(
        out.stdout == input.to_ascii_uppercase(),
        "4 MiB came back as {} bytes, not all uppercased",
        out.stdout.len()
    );
}

#[test]
fn a_live_socat_socket_is_never_taken_and_its_stale_one_is_skipped() {
    if !have_socat() {
        return;
    }
    let root = TestRoot::new();
    // A dipus service first, for the directory; then socat takes ..0 of
    // another name by hand, and a dipus server of that name must get ..1.
    serve(&root, "cat", "cat/text/plain", "local/text/plain/cat.testhost..0");
    // Each service reads its input before it answers: socat may drop the
    // output of an EXEC child that exits before socat has read it.
    let (socat, first) = socat_service(&root, "local/text/plain/who.testhost..0", "tr a-z A-Z");
    let (dipus, _) = serve(&root, "cat", "who/text/plain", "local/text/plain/who.testhost..1");
    assert_eq!(ask(&root, "who", b"who\n"), "WHO\n", "..0 is preferred");
    // SIGKILL: socat cannot unlink its socket, which stays behind, stale.
    root.with_child(socat, |c| c.kill9()).expect("socat killed");
    assert!(first.exists());
    assert_eq!(ask(&root, "who", b"who\n"), "who\n", "the stale ..0 is skipped");
    // A new dipus server replaces the stale socket at ..0.
    let again = root.spawn(root.cmd("dipus-local-pipe").args(["sed s/^/again-/", "who/text/plain"]));
    wait_until(DEFAULT_TIMEOUT, "the stale ..0 replaced", || {
        assert!(root.with_child(again, |c| c.is_running()), "the server exited");
        UnixStream::connect(&first).is_ok()
    });
    assert_eq!(ask(&root, "who", b"who\n"), "again-who\n");
    assert_eq!(stop(&root, again, "TERM").code(), Some(0));
    assert_eq!(stop(&root, dipus, "TERM").code(), Some(0));
}
