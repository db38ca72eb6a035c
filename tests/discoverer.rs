//! dipus-discoverer as a tool in a pipeline.

mod common;

use common::*;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn watch_ends_when_its_reader_goes_away_while_no_exporter_is_heard() {
    let root = TestRoot::new();
    // A port of our own, so no exporter of another test or host is heard.
    let port = std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("a free UDP port").port();
    let mut cmd = root.cmd("dipus-discoverer");
    cmd.arg("-w").env("DIPUS_DISCOVERY_PORT", port.to_string());
    let mut child = ChildGuard::spawn(cmd.stdin(Stdio::null()).stdout(Stdio::piped()));
    // The reader leaves before anything is printed: `| head -1` on a LAN
    // that stays as it is.
    drop(child.0.stdout.take());
    let status = child.wait_timeout(Duration::from_secs(3));
    assert_eq!(status.map(|s| s.code()), Some(Some(0)), "the discoverer kept watching for no one");
}
