//! Self-test of the integration-test rig in tests/common (not of dipus:
//! the binary is only located and linked here, never run).

mod common;

use common::netns::Net;
use common::proc;
use common::sshd::Sshd;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(5);

#[test]
fn applet_links_point_at_the_binary_even_when_made_concurrently() {
    let threads: Vec<_> =
        (0..8).map(|_| std::thread::spawn(|| APPLETS.iter().map(|a| applet_bin(a)).collect::<Vec<_>>())).collect();
    for t in threads {
        for (link, name) in t.join().unwrap().iter().zip(APPLETS) {
            assert_eq!(link.file_name().unwrap(), *name);
            assert_eq!(std::fs::read_link(link).unwrap(), dipus_bin());
        }
    }
    assert!(dipus_bin().is_absolute() && dipus_bin().exists());
    assert_eq!(applet_bin("any-name").file_name().unwrap(), "any-name");
}

#[test]
fn test_root_sets_env_and_cleans_up() {
    let root = TestRoot::new().with_host("a");
    let dir = root.path().to_path_buf();
    assert!(dir.is_dir() && !root.tree().exists());
    assert_ne!(dir, TestRoot::new().path());
    let cmd = root.cmd("dls");
    assert_eq!(cmd.get_program(), applet_bin("dls").as_os_str());
    let env: Vec<_> = cmd.get_envs().collect();
    let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
    assert_eq!(get("DIPUS_ROOT"), Some(Some(root.tree().as_os_str())));
    assert_eq!(get("DIPUS_HOSTNAME"), Some(Some("a".as_ref())));
    if std::env::var_os("DIPUS_TEST_LOG").is_none() {
        assert_eq!(get("RUST_LOG"), Some(None), "RUST_LOG removed");
    }
    let pid = root.spawn(Command::new("sleep").arg("100"));
    assert!(root.with_child(pid, |c| c.is_running()));
    drop(root);
    assert!(!dir.exists());
    assert!(!proc::is_alive(pid));
}

#[test]
fn child_guard_signals() {
    let mut c = ChildGuard::spawn(Command::new("sleep").arg("100"));
    c.stop();
    wait_until(T, "stopped", || proc::state(c.pid()) == Some('T'));
    c.cont();
    wait_until(T, "running", || proc::state(c.pid()) == Some('S'));
    assert!(c.wait_timeout(Duration::from_millis(50)).is_none());
    let st = c.terminate(T).expect("sleep dies on SIGTERM");
    assert!(!st.success());
    assert!(!c.signal("TERM"), "no signal once reaped");

    let mut c = ChildGuard::spawn(Command::new("sleep").arg("100"));
    assert!(c.kill9().is_some());
}

#[test]
fn child_guard_drop_kills_stubborn_child_and_descendants() {
    // The shell ignores SIGTERM; its background sleep must die too.
    let (c, mut lines) = spawn_lines(Command::new("sh").args(["-c", "trap '' TERM; sleep 100 & echo $!; wait; wait"]));
    let grandchild: u32 = lines.next_line(T).expect("pid").parse().unwrap();
    let pid = c.pid();
    let start = Instant::now();
    drop(c);
    assert!(start.elapsed() < Duration::from_secs(4));
    assert!(!proc::is_alive(pid));
    wait_until(T, "grandchild dead", || !proc::is_alive(grandchild));
}

#[test]
fn line_reader() {
    let (_c, mut l) = spawn_lines(Command::new("printf").arg("a\\nb\\nc\\nd"));
    l.expect_line("a", T);
    assert_eq!(l.lines_until(|s| s == "c", T), ["b", "c"]);
    assert_eq!(l.rest(T), (vec!["d".to_string()], true));
    assert_eq!(l.next_line(Duration::from_millis(10)), None);
}

#[test]
#[should_panic(expected = "expected line \"x\", got \"a\"")]
fn expect_line_shows_what_came() {
    let (_c, mut l) = spawn_lines(Command::new("echo").arg("a"));
    l.expect_line("x", T);
}

#[test]
fn run_with_timeout_feeds_stdin() {
    let out = run_with_timeout(&mut Command::new("cat"), Some(b"hello"), T);
    assert!(out.status.success());
    assert_eq!(out.stdout, b"hello");
    let out = run_with_timeout(Command::new("sh").args(["-c", "echo e >&2; exit 3"]), None, T);
    assert_eq!((out.status.code(), &out.stderr[..]), (Some(3), &b"e\n"[..]));
}

#[test]
#[should_panic(expected = "boom")]
fn run_with_timeout_kills_and_shows_stderr() {
    run_with_timeout(
        Command::new("sh").args(["-c", "echo boom >&2; sleep 100; true"]),
        None,
        Duration::from_millis(300),
    );
}

#[test]
#[should_panic(expected = "waiting for: never")]
fn wait_until_times_out() {
    wait_until(Duration::from_millis(50), "never", || false);
}

#[test]
fn requirements() {
    assert!(require(true, "nothing"));
    assert!(have_command("sh") && have_command("/bin/sh") && !have_command("no-such-cmd-x"));
    let uid = std::fs::read_to_string("/proc/self/status").unwrap();
    assert_eq!(have_root(), uid.lines().any(|l| l.starts_with("Uid:\t0\t0")));
}

fn netns_list() -> String {
    let out = run_with_timeout(Command::new("ip").args(["netns", "list"]), None, T);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn net_tcp_and_broadcast_cross_the_bridge() {
    if !require(have_command("socat"), "needs socat") {
        return;
    }
    let Some(net) = Net::new(2) else { return };
    let (h0, h1) = (net.host(0), net.host(1));
    assert_ne!(h0.addr(), h1.addr());

    // TCP: h1 listens, h0 connects to h1's address.
    let (_srv, mut got) = spawn_lines(&mut h1.cmd("socat", ["-u", "TCP-LISTEN:7000,reuseaddr", "-"]));
    wait_until(T, "tcp listener", || {
        let out = run_with_timeout(&mut h1.cmd("ss", ["-Hltn", "sport = :7000"]), None, T);
        !out.stdout.is_empty()
    });
    let target = format!("TCP:{}:7000", h1.addr());
    let out = run_with_timeout(&mut h0.cmd("socat", ["-u", "-", &target]), Some(b"over tcp\n"), T);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    got.expect_line("over tcp", T);

    // UDP broadcast from h0 reaches h1 (resent until the receiver is up).
    let (_rx, mut got) = spawn_lines(&mut h1.cmd("socat", ["-u", "UDP-RECV:7001", "-"]));
    let target = format!("UDP-DATAGRAM:{}:7001,broadcast", net.broadcast());
    let line = (0..50).find_map(|_| {
        run_with_timeout(&mut h0.cmd("socat", ["-u", "-", &target]), Some(b"bcast\n"), T);
        got.next_line(Duration::from_millis(100))
    });
    assert_eq!(line.as_deref(), Some("bcast"));

    // Cable pull: carrier goes, comes back.
    h1.link_down();
    wait_until(T, "carrier lost", || !h1.link_is_up());
    h1.link_up();
    h0.add_addr(&format!("{}/24", std::net::Ipv4Addr::new(198, 18, net.broadcast().octets()[2], 200)));

    let names: Vec<String> = net.hosts.iter().map(|h| h.name().to_string()).collect();
    let bridge = net.bridge_ns().to_string();
    h1.delete();
    assert!(!netns_list().contains(&names[1]));
    drop(net);
    let list = netns_list();
    for ns in names.iter().chain([&bridge]) {
        assert!(!list.contains(ns.as_str()), "{ns} left in {list}");
    }
}

#[test]
fn nets_in_parallel_do_not_collide() {
    let Some(a) = Net::new(1) else { return };
    let Some(b) = Net::new(1) else { return };
    assert_ne!(a.host(0).name(), b.host(0).name());
    assert_ne!(a.broadcast(), b.broadcast());
}

#[test]
fn sshd_serves_root_and_a_test_user() {
    let Some(sshd) = Sshd::start() else { return };
    let run = |cmd: &mut Command| {
        let out = run_with_timeout(cmd, None, Duration::from_secs(20));
        assert!(out.status.success(), "{}\nsshd log:\n{}", String::from_utf8_lossy(&out.stderr), sshd.log());
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run(&mut sshd.command("root", ["echo", "ok"])), "ok\n");
    assert!(sshd.ssh_command().contains(&format!("-p {}", sshd.port())));
    assert!(sshd.key_path().exists());

    let user = sshd.add_user("dpu");
    assert!(user.home().is_dir());
    assert_eq!(run(&mut sshd.command(user.name(), ["id", "-un"])), format!("{}\n", user.name()));
    // The env var form works through a shell too.
    let cmd = format!("{} {}@127.0.0.1 id -un", sshd.ssh_command(), user.name());
    let out = run(Command::new("sh").args(["-c", &cmd]));
    assert_eq!(out, format!("{}\n", user.name()));

    let name = user.name().to_string();
    let home = user.home();
    drop(user);
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    assert!(!passwd.lines().any(|l| l.starts_with(&format!("{name}:"))));
    assert!(!home.exists());
}
