//! dipus-local-pipe: the child's UCSPI environment, `-c`, socket mode and
//! group, signals, crashing children, and how instance indexes are taken:
//! first free, stale replaced, live never taken, races, successors.

mod common;

use common::service::{
    ask, assert_error, assert_success, dcat, egid, entries, euid, group_name, is_socket, listen_at, serve, serve_with,
    stale_at, stop,
};
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Answers with the pid of the server that ran it (`sh -c`'s parent).
const WHO: &str = "echo $PPID";

fn inode(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).ino()
}

#[test]
fn the_child_learns_who_called_from_its_environment() {
    let root = TestRoot::new();
    let command = "for v in PROTO IPCREMOTEEUID IPCREMOTEEGID IPCREMOTEPID IPCLOCALPATH DIPUS_SERVICE; do \
                   eval echo $v=\\$$v; done";
    let (_, path) = serve(&root, command, "env/text/plain", "local/text/plain/env.testhost..0");
    let (client, mut lines) = spawn_lines(root.cmd("dcat").arg("env").stdin(Stdio::null()));
    let (got, ended) = lines.rest(DEFAULT_TIMEOUT);
    assert!(ended, "the reply did not end: {got:?}");
    let path = path.display();
    assert_eq!(
        got,
        [
            "PROTO=IPC".to_string(),
            format!("IPCREMOTEEUID={}", euid()),
            format!("IPCREMOTEEGID={}", egid()),
            format!("IPCREMOTEPID={}", client.pid()),
            format!("IPCLOCALPATH={path}"),
            format!("DIPUS_SERVICE={path}"),
        ]
    );
}

#[test]
fn concurrency_one_serves_one_client_at_a_time() {
    let root = TestRoot::new();
    let log = root.path().join("log");
    let lock = root.path().join("lock");
    // mkdir is atomic: it fails if another child is inside at the same time.
    let command = format!(
        "echo start >>{log}; mkdir {lock} 2>/dev/null || echo overlap >>{log}; \
         sleep 0.5; rmdir {lock}; echo end >>{log}; echo x",
        log = log.display(),
        lock = lock.display()
    );
    serve_with(
        &root,
        root.cmd("dipus-local-pipe").args(["-c", "1", &command, "slow/text/plain"]),
        "local/text/plain/slow.testhost..0",
    );
    let clients: Vec<_> = (0..2)
        .map(|_| ChildGuard::spawn(root.cmd("dcat").arg("slow").stdin(Stdio::null()).stdout(Stdio::piped())))
        .collect();
    for mut client in clients {
        let status = client.wait_timeout(DEFAULT_TIMEOUT).expect("client served");
        assert!(status.success());
        let mut out = String::new();
        std::io::Read::read_to_string(client.0.stdout.as_mut().unwrap(), &mut out).unwrap();
        assert_eq!(out, "x\n");
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "start\nend\nstart\nend\n");
}

#[test]
fn mode_and_group_of_the_socket() {
    let root = TestRoot::new();
    // Root may give a socket any group; others only one of their own.
    let gid = if have_root() { 1 } else { egid() };
    let group = group_name(gid).unwrap_or_else(|| gid.to_string());
    for (args, relative, mode, owner_group) in [
        (vec!["--mode", "0600"], "local/m/a.testhost..0", 0o600, egid()),
        (vec!["--mode", "0640", "--group", &group], "local/m/b.testhost..0", 0o640, gid),
        (vec!["--mode", "660", "--group", &gid.to_string()], "local/m/c.testhost..0", 0o660, gid),
    ] {
        let name = relative.rsplit_once('/').unwrap().1.split('.').next().unwrap();
        let spec = format!("{name}/m");
        let (_, path) = serve_with(&root, root.cmd("dipus-local-pipe").args(&args).args(["true", &spec]), relative);
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.gid()), (mode, owner_group), "{args:?}");
    }
    // Bad values are usage errors, and nothing is created.
    for (args, needle) in [(["--mode", "0999"], "0999"), (["--group", "no-such-group-x"], "no-such-group-x")] {
        let out =
            run_with_timeout(root.cmd("dipus-local-pipe").args(args).args(["true", "d/m"]), None, DEFAULT_TIMEOUT);
        assert_error(&out, 64, "dipus-local-pipe", &[needle]);
    }
    assert_eq!(entries(&root.tree().join("local/m")), ["a.testhost..0", "b.testhost..0", "c.testhost..0"]);
}

#[test]
fn sigterm_sigint_and_sighup_remove_the_socket_and_exit_0() {
    let root = TestRoot::new();
    for signal in ["TERM", "INT", "HUP"] {
        let (pid, path) = serve(&root, "cat", "sig/text/plain", "local/text/plain/sig.testhost..0");
        let status = stop(&root, pid, signal);
        assert_eq!(status.code(), Some(0), "after SIG{signal}: {status}");
        assert!(!path.exists(), "socket left after SIG{signal}");
        // Its protocol directories, emptied, went along; the scope stays.
        let left = entries(&root.tree().join("local"));
        assert!(left.is_empty(), "left after SIG{signal}: {left:?}");
    }
}

#[test]
fn a_crashing_child_does_not_take_the_server_down() {
    let root = TestRoot::new();
    let mark = root.path().join("crashed");
    let command = format!("if [ -e {m} ]; then echo alive; else touch {m}; kill -SEGV $$; fi", m = mark.display());
    let (pid, _) = serve(&root, &command, "crash/text/plain", "local/text/plain/crash.testhost..0");
    let out = dcat(&root, &["crash"], None);
    assert_success(&out, "dcat crash (the child dies)");
    assert_eq!(out.stdout, b"");
    assert!(mark.exists());
    assert_eq!(ask(&root, "crash", b""), "alive\n");
    assert!(root.with_child(pid, |c| c.is_running()));
}

#[test]
fn instances_take_the_first_free_index() {
    let root = TestRoot::new();
    let servers: Vec<(u32, PathBuf)> = (0..3)
        .map(|index| serve(&root, WHO, "w/text/plain", &format!("local/text/plain/w.testhost..{index}")))
        .collect();
    for (pid, path) in &servers {
        assert_eq!(ask(&root, path.to_str().unwrap(), b""), format!("{pid}\n"));
    }
    assert_eq!(entries(&root.tree().join("local/text/plain")), ["w.testhost..0", "w.testhost..1", "w.testhost..2"]);
    // A freed index is the first free one again.
    stop(&root, servers[1].0, "TERM");
    let (pid, _) = serve(&root, WHO, "w/text/plain", "local/text/plain/w.testhost..1");
    assert_eq!(ask(&root, "w.testhost..1", b""), format!("{pid}\n"));
}

#[test]
fn a_stale_socket_is_replaced() {
    let root = TestRoot::new();
    let stale = stale_at(&root, "local/text/plain/w.testhost..0");
    let stale_inode = inode(&stale);
    let pid = root.spawn(root.cmd("dipus-local-pipe").args([WHO, "w/text/plain"]));
    // The stale socket is there from the start: wait for another inode.
    wait_until(DEFAULT_TIMEOUT, "the stale socket replaced", || {
        assert!(root.with_child(pid, |c| c.is_running()), "the server exited");
        is_socket(&stale) && inode(&stale) != stale_inode
    });
    assert_eq!(ask(&root, "w", b""), format!("{pid}\n"));
    assert_eq!(entries(&root.tree().join("local/text/plain")), ["w.testhost..0"]);
}

#[test]
fn a_live_socket_is_never_taken() {
    let root = TestRoot::new();
    // Not a dipus server: any program listening there.
    let (listener, first) = listen_at(&root, "local/text/plain/w.testhost..0");
    let first_inode = inode(&first);
    let (pid, _) = serve(&root, WHO, "w/text/plain", "local/text/plain/w.testhost..1");
    assert_eq!(inode(&first), first_inode);
    assert_eq!(ask(&root, "w.testhost..1", b""), format!("{pid}\n"));
    // The first one still answers. The server's liveness probes wait in
    // its backlog first, already closed.
    listener.set_nonblocking(true).unwrap();
    while listener.accept().is_ok() {}
    listener.set_nonblocking(false).unwrap();
    let mut client = UnixStream::connect(&first).expect("the first socket still accepts");
    let (mut server_side, _) = listener.accept().unwrap();
    std::io::Write::write_all(&mut server_side, b"first\n").unwrap();
    drop(server_side);
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut client, &mut reply).unwrap();
    assert_eq!(reply, "first\n");
}

#[test]
fn two_servers_racing_never_share_an_index() {
    let root = TestRoot::new();
    let dir = root.tree().join("local/text/plain");
    let paths = [dir.join("r.testhost..0"), dir.join("r.testhost..1")];
    for round in 0..20 {
        let pids: Vec<u32> =
            (0..2).map(|_| root.spawn(root.cmd("dipus-local-pipe").args([WHO, "r/text/plain"]))).collect();
        wait_until(DEFAULT_TIMEOUT, &format!("round {round}: both sockets"), || {
            for &pid in &pids {
                if let Some(status) = root.with_child(pid, |c| c.try_status()) {
                    panic!("round {round}: server {pid} exited: {status}");
                }
            }
            paths.iter().all(|p| is_socket(p))
        });
        let mut answered: Vec<u32> =
            paths.iter().map(|p| ask(&root, p.to_str().unwrap(), b"").trim().parse().expect("a pid")).collect();
        answered.sort();
        let mut expected = pids.clone();
        expected.sort();
        assert_eq!(answered, expected, "round {round}");
        for pid in pids {
            assert_eq!(stop(&root, pid, "TERM").code(), Some(0));
        }
        // The last one out took the emptied protocol directories along.
        assert_eq!(entries(&root.tree().join("local")), Vec::<String>::new(), "round {round}");
    }
}

#[test]
fn a_server_never_removes_its_successors_socket() {
    let root = TestRoot::new();
    let (first, path) = serve(&root, WHO, "s/text/plain", "local/text/plain/s.testhost..0");
    // Someone removes the first server's socket; a successor takes the name.
    std::fs::remove_file(&path).unwrap();
    let (second, _) = serve(&root, WHO, "s/text/plain", "local/text/plain/s.testhost..0");
    let successor = inode(&path);
    assert_eq!(stop(&root, first, "TERM").code(), Some(0));
    assert!(is_socket(&path), "the first server removed its successor's socket");
    assert_eq!(inode(&path), successor);
    assert_eq!(ask(&root, "s", b""), format!("{second}\n"));
    assert_eq!(stop(&root, second, "TERM").code(), Some(0));
    assert!(!path.exists());
}

#[test]
fn mode_is_exact_whatever_the_umask() {
    let root = TestRoot::new();
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "umask 077; exec \"$0\" --mode 0666 true u/m"])
        .arg(applet_bin("dipus-local-pipe"))
        .env("DIPUS_ROOT", root.tree())
        .env("DIPUS_HOSTNAME", &root.host);
    let (_, path) = serve_with(&root, &mut cmd, "local/m/u.testhost..0");
    assert_eq!(std::fs::symlink_metadata(&path).unwrap().permissions().mode() & 0o7777, 0o666);
}

/// The server raises its own descriptor limit for its many connections;
/// the commands it starts get the limit it was started with (a select()
/// program breaks past 1024 descriptors).
#[test]
fn commands_get_the_descriptor_limit_the_server_was_started_with() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit on a live local.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    if !require(limit.rlim_max > 512, "a hard descriptor limit above 512 (to see it raised)") {
        return;
    }
    let root = TestRoot::new();
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "ulimit -Sn 512; exec \"$0\" 'ulimit -Sn' lim/text/plain"])
        .arg(applet_bin("dipus-local-pipe"))
        .env("DIPUS_ROOT", root.tree())
        .env("DIPUS_HOSTNAME", &root.host);
    let (server, _) = serve_with(&root, &mut cmd, "local/text/plain/lim.testhost..0");
    let soft = std::fs::read_to_string(format!("/proc/{server}/limits"))
        .unwrap()
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3).map(str::to_string))
        .unwrap();
    assert_eq!(soft, limit.rlim_max.to_string(), "the server did not raise its own limit");
    let out = dcat(&root, &["lim"], Some(b""));
    assert_success(&out, "dcat lim");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "512\n");
}
