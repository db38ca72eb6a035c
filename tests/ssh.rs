//! ssh:// against a real OpenSSH sshd on loopback (root only): dcat, dls,
//! dipus-import and dipus-ssh-importer reach a second tree on the same
//! machine through `dipus serve --stdio`, run by sshd as the authenticated
//! user. The "remote" is this machine with its own DIPUS_ROOT and
//! DIPUS_HOSTNAME=remote, given in DIPUS_REMOTE.
//!
//! DIPUS_SSH is the rig's ssh command without its `-p`: the port must come
//! from the URI, so every test also checks that dipus passes it on. Each
//! test has its own sshd (so its log counts that test's logins alone), and
//! its fixture ends the shared ssh connections (`ssh -O exit`) it made.

mod common;

use common::data::Random;
use common::proc;
use common::proc::Background;
use common::service::{assert_error, assert_success, euid, is_socket, listen_at, stale_at, stop, wait_for_socket};
use common::sshd::Sshd;
use common::*;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A bound for commands that may set up an ssh connection first.
const SSH_TIMEOUT: Duration = Duration::from_secs(20);

/// sshd, a remote tree served through it, and a client tree.
struct Link {
    sshd: Sshd,
    remote: TestRoot,
    client: TestRoot,
    /// The dipus the remote side runs.
    binary: PathBuf,
}

impl Link {
    fn new() -> Option<Link> {
        Link::with_binary(dipus_bin())
    }

    fn with_binary(binary: PathBuf) -> Option<Link> {
        Link::with(binary, Sshd::start()?)
    }

    /// With `extra` lines in sshd's config.
    fn with_sshd_config(extra: &str) -> Option<Link> {
        Link::with(dipus_bin(), Sshd::start_with(extra)?)
    }

    fn with(binary: PathBuf, sshd: Sshd) -> Option<Link> {
        Some(Link {
            sshd,
            remote: TestRoot::new().with_host("remote"),
            client: TestRoot::new().with_host("client"),
            binary,
        })
    }

    fn port(&self) -> u16 {
        self.sshd.port()
    }

    /// `ssh://USER@127.0.0.1:PORT`
    fn uri(&self, user: &str) -> String {
        format!("ssh://{user}@127.0.0.1:{}", self.port())
    }

    /// The rig's ssh command without `-p PORT`.
    fn ssh_command(&self) -> String {
        let args = self.sshd.ssh_args();
        let mut kept = Vec::new();
        let mut words = args.iter();
        while let Some(word) = words.next() {
            if word == "-p" {
                words.next();
            } else {
                kept.push(word.as_str());
            }
        }
        kept.join(" ")
    }

    fn remote_command(&self) -> String {
        format!("env DIPUS_ROOT={} DIPUS_HOSTNAME=remote {}", self.remote.tree().display(), self.binary.display())
    }

    /// An applet on the client, with DIPUS_SSH and DIPUS_REMOTE set.
    fn cmd(&self, applet: &str) -> Command {
        let mut cmd = self.client.cmd(applet);
        cmd.env("DIPUS_SSH", self.ssh_command()).env("DIPUS_REMOTE", self.remote_command());
        cmd
    }

    /// Runs an applet on the client to its end.
    fn run(&self, applet: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
        run_with_timeout(self.cmd(applet).args(args), stdin, SSH_TIMEOUT)
    }

    /// `dcat ARGS…` asserted to succeed quietly; its stdout.
    fn ask(&self, args: &[&str], stdin: &[u8]) -> String {
        let out = self.run("dcat", args, Some(stdin));
        self.assert_quiet_success(&out, &format!("dcat {args:?}"));
        String::from_utf8(out.stdout).expect("utf-8 reply")
    }

    fn assert_quiet_success(&self, out: &Output, what: &str) {
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{what}: {}; stderr: {}\nsshd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.sshd.log()
        );
    }

    /// Starts `dipus-local-pipe [ARGS…] COMMAND NAME/PROTOCOL` on the remote
    /// tree as root and waits for its socket; returns its pid and path.
    fn serve(&self, args: &[&str], command: &str, spec: &str) -> (u32, PathBuf) {
        self.serve_in("local", "dipus-local-pipe", args, command, spec)
    }

    fn export(&self, command: &str, spec: &str) -> (u32, PathBuf) {
        self.serve_in("exported", "dipus-export-pipe", &["--mode", "0666"], command, spec)
    }

    fn serve_in(&self, scope: &str, applet: &str, args: &[&str], command: &str, spec: &str) -> (u32, PathBuf) {
        let (name, protocol) = spec.split_once('/').expect("NAME/PROTOCOL");
        let pid = self.remote.spawn(self.remote.cmd(applet).args(args).args([command, spec]));
        let path = self.remote.tree().join(format!("{scope}/{protocol}/{name}.remote..0"));
        wait_for_socket(&self.remote, pid, &path);
        (pid, path)
    }

    /// The client's ssh scope, `<root>/root/`.
    fn scope(&self) -> PathBuf {
        self.client.tree().join(user_name())
    }

    /// The shared ssh connections' control sockets in the client tree.
    fn control_sockets(&self) -> Vec<PathBuf> {
        let Ok(scopes) = std::fs::read_dir(self.client.tree()) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for scope in scopes.flatten() {
            for entry in std::fs::read_dir(scope.path()).into_iter().flatten().flatten() {
                let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
                if is_socket && entry.file_name().to_string_lossy().starts_with(".ssh-") {
                    found.push(entry.path());
                }
            }
        }
        found
    }

    /// `ssh -O CONTROL` on one control socket.
    fn control(&self, socket: &Path, operation: &str) -> Output {
        run_with_timeout(
            Command::new("ssh").args(["-F", "/dev/null", "-S"]).arg(socket).args(["-O", operation, "127.0.0.1"]),
            None,
            DEFAULT_TIMEOUT,
        )
    }

    /// sshd's successful logins so far.
    fn logins(&self) -> usize {
        self.sshd.log().lines().filter(|line| line.contains("Accepted publickey")).count()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // The masters outlive the ssh that forked them (ControlPersist);
        // sshd's drop would cut them too, but they are ours to end.
        for socket in self.control_sockets() {
            let _ = try_run_with_timeout(
                Command::new("ssh").args(["-F", "/dev/null", "-S"]).arg(&socket).args(["-O", "exit", "127.0.0.1"]),
                None,
                DEFAULT_TIMEOUT,
            );
        }
    }
}

fn user_name() -> String {
    common::service::user_name(euid()).expect("the test's user has a name")
}

/// The sockets under `dir` whose names are not hidden, as sorted paths
/// relative to it.
fn services_under(dir: &Path) -> Vec<String> {
    // Hidden names (ssh's control socket) are not services.
    let visible = |path: &String| !path.split('/').any(|component| component.starts_with('.'));
    common::service::sockets(dir).into_iter().filter(visible).collect()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `dipus-import --pidfile … URI`, asserted to succeed quietly; the
/// importer now runs in the background. Its output goes to files, as a
/// shell script's might, so nothing waits on a pipe it inherited.
fn import(link: &Link, uri: &str) -> Background {
    let pidfile = link.client.path().join(format!("import-{}.pid", next_id()));
    let (stdout, stderr) = (link.client.path().join("import.out"), link.client.path().join("import.err"));
    let mut child = link
        .cmd("dipus-import")
        .args(["--pidfile", pidfile.to_str().unwrap(), uri])
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn dipus-import");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait()));
    let status = match rx.recv_timeout(SSH_TIMEOUT) {
        Ok(status) => status.expect("wait for dipus-import"),
        Err(_) => {
            // Not reaped yet (the thread still waits), so the pid is its own.
            proc::signal(&[pid], "KILL");
            panic!("dipus-import {uri} did not return within {SSH_TIMEOUT:?}");
        }
    };
    let background = pidfile.exists().then(|| Background::from_pidfile(&pidfile));
    let out = Output { status, stdout: std::fs::read(&stdout).unwrap(), stderr: std::fs::read(&stderr).unwrap() };
    link.assert_quiet_success(&out, &format!("dipus-import {uri}"));
    assert!(out.stdout.is_empty(), "dipus-import stdout: {:?}", String::from_utf8_lossy(&out.stdout));
    background.expect("the pidfile is there when the import returns")
}

/// A command fed and read piece by piece.
struct Streaming {
    child: ChildGuard,
    stdin: Option<ChildStdin>,
    output: Receiver<Vec<u8>>,
}

impl Streaming {
    fn spawn(cmd: &mut Command) -> Streaming {
        let mut child = ChildGuard::spawn(cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()));
        let stdin = child.0.stdin.take();
        let mut stdout = child.0.stdout.take().unwrap();
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buffer = vec![0u8; 64 * 1024];
            while let Ok(count @ 1..) = stdout.read(&mut buffer) {
                if tx.send(buffer[..count].to_vec()).is_err() {
                    break;
                }
            }
        });
        Streaming { child, stdin, output }
    }

    fn write(&mut self, data: &[u8]) {
        self.stdin.as_mut().unwrap().write_all(data).expect("write to the command");
    }

    /// Whatever arrives within `wait`.
    fn arrived(&self, wait: Duration) -> Vec<u8> {
        let deadline = Instant::now() + wait;
        let mut data = Vec::new();
        while let Ok(chunk) = self.output.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            data.extend(chunk);
        }
        data
    }

    /// Closes stdin, reads to the end; the output and the exit status.
    fn finish(mut self, timeout: Duration) -> (Vec<u8>, std::process::ExitStatus) {
        self.stdin = None;
        let deadline = Instant::now() + timeout;
        let mut data = Vec::new();
        loop {
            match self.output.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(chunk) => data.extend(chunk),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("no end of output within {timeout:?}; got {data:?}"),
            }
        }
        let status = self.child.wait_timeout(deadline.saturating_duration_since(Instant::now()) + DEFAULT_TIMEOUT);
        (data, status.expect("the command exits after its output ends"))
    }
}

/// FNV-1a, 64 bits, with the byte count.
struct Hash {
    state: u64,
    length: u64,
}

impl Hash {
    fn new() -> Hash {
        Hash { state: 0xcbf2_9ce4_8422_2325, length: 0 }
    }

    fn update(&mut self, data: &[u8]) {
        for &byte in data {
            self.state = (self.state ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.length += data.len() as u64;
    }

    fn value(&self) -> (u64, u64) {
        (self.length, self.state)
    }
}

/// A copy of dipus that every user may run: the built one may sit under a
/// directory only root can enter. Removed on drop.
struct SharedBinary {
    dir: Option<PathBuf>,
    path: PathBuf,
}

impl SharedBinary {
    fn new() -> SharedBinary {
        let built = dipus_bin();
        let reachable = built.ancestors().skip(1).all(|dir| dir.metadata().is_ok_and(|m| m.mode() & 0o001 != 0))
            && built.metadata().is_ok_and(|m| m.mode() & 0o005 == 0o005);
        if reachable {
            return SharedBinary { dir: None, path: built };
        }
        let dir = std::env::temp_dir().join(format!("dipus-test-bin-{}-{}", std::process::id(), next_id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("dipus");
        std::fs::copy(&built, &path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        SharedBinary { dir: Some(dir), path }
    }
}

impl Drop for SharedBinary {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn dcat_sorts_on_the_remote_host() {
    let Some(link) = Link::new() else { return };
    link.serve(&[], "LC_ALL=C sort", "sorter/text/plain");
    let uri = format!("{}/sorter", link.uri("root"));
    assert_eq!(link.ask(&[&uri], b"pear\napple\nfig\n"), "apple\nfig\npear\n");
    // -v names the remote service used, as SCOPE/PROTOCOL/FILE.
    let out = link.run("dcat", &["-v", &uri], Some(b"b\na\n"));
    assert_success(&out, "dcat -v");
    assert_eq!(
        (String::from_utf8_lossy(&out.stdout).as_ref(), stderr_of(&out)),
        ("a\nb\n", format!("dcat: connected to {}/local/text/plain/sorter.remote..0\n", link.uri("root")))
    );
    let nothing = format!("{}/nothing", link.uri("root"));
    let out = link.run("dcat", &[&nothing], Some(b""));
    assert_error(&out, 69, "dcat", &[]);
    assert_eq!(stderr_of(&out), format!("dcat: no service matches {nothing:?} (dls lists what there is)\n"));
}

#[test]
fn dls_lists_the_local_and_exported_services_of_the_remote_user() {
    let Some(link) = Link::new() else { return };
    link.serve(&[], "LC_ALL=C sort", "sorter/text/plain");
    link.serve(&[], "wc -c", "counter/text/plain/to/text/number");
    link.export("cat", "echo/text/plain");
    let uri = link.uri("root");
    let out = link.run("dls", &["-1", &uri], None);
    link.assert_quiet_success(&out, "dls -1");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "text/plain/sorter.remote..0\ntext/plain/to/text/number/counter.remote..0\ntext/plain/echo.remote..0\n"
    );
    let out = link.run("dls", &["-1", "-f", &uri], None);
    link.assert_quiet_success(&out, "dls -1 -f");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "{uri}/local/text/plain/sorter.remote..0\n\
             {uri}/local/text/plain/to/text/number/counter.remote..0\n\
             {uri}/exported/text/plain/echo.remote..0\n"
        )
    );
    // A selector is resolved remotely.
    let out = link.run("dls", &["-1", "-f", &format!("{uri}/text/plain/to")], None);
    link.assert_quiet_success(&out, "dls -1 -f …/text/plain/to");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{uri}/local/text/plain/to/text/number/counter.remote..0\n")
    );
    // The table names the remote scope.
    let out = link.run("dls", &[&uri], None);
    link.assert_quiet_success(&out, "dls");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<Vec<&str>> = table.lines().map(|line| line.split_whitespace().collect()).collect();
    assert_eq!(
        rows,
        [
            vec!["NAME", "HOST", "INST", "PROTOCOL", "SCOPE"],
            vec!["sorter", "remote", "0", "text/plain", &format!("{uri}/local")],
            vec!["counter", "remote", "0", "text/plain/to/text/number", &format!("{uri}/local")],
            vec!["echo", "remote", "0", "text/plain", &format!("{uri}/exported")],
        ]
    );
}

#[test]
fn dls_w_follows_the_remote_tree() {
    let Some(link) = Link::new() else { return };
    link.serve(&[], "LC_ALL=C sort", "sorter/text/plain");
    let uri = link.uri("root");
    let (watcher, mut lines) = link.client.spawn_lines(link.cmd("dls").args(["-w", &uri]));
    lines.expect_line(&format!("+ {uri}/local/text/plain/sorter.remote..0"), SSH_TIMEOUT);
    lines.expect_line("= synced", DEFAULT_TIMEOUT);
    let (pid, _) = link.export("cat", "echo/text/plain");
    lines.expect_line(&format!("+ {uri}/exported/text/plain/echo.remote..0"), Duration::from_secs(2));
    stop(&link.remote, pid, "TERM");
    lines.expect_line(&format!("- {uri}/exported/text/plain/echo.remote..0"), Duration::from_secs(2));
    // Stopped before its ssh connection is ended, which would end it too.
    stop(&link.client, watcher, "TERM");
}

#[test]
fn half_close_crosses_ssh() {
    let Some(link) = Link::new() else { return };
    link.serve(&[], "LC_ALL=C sort", "sorter/text/plain");
    link.serve(&[], "wc -c", "counter/text/plain");
    let uri = link.uri("root");
    // sort answers only once its input ends: our EOF must reach it, and
    // its reply must still come back over the half-closed connection.
    let mut sort = Streaming::spawn(link.cmd("dcat").arg(format!("{uri}/sorter")));
    sort.write(b"pear\napple\n");
    assert_eq!(sort.arrived(Duration::from_secs(1)), b"", "sort answered before the end of its input");
    assert!(sort.child.is_running(), "dcat ended before the end of its input");
    sort.write(b"fig\n");
    let (reply, status) = sort.finish(SSH_TIMEOUT);
    assert_eq!((String::from_utf8_lossy(&reply).as_ref(), status.code()), ("apple\nfig\npear\n", Some(0)));

    let data = vec![b'x'; 3 * 1024 * 1024 + 7];
    assert_eq!(link.ask(&[&format!("{uri}/counter")], &data), format!("{}\n", data.len()));
    assert_eq!(link.ask(&[&format!("{uri}/counter")], b""), "0\n");
}

#[test]
fn ten_requests_share_one_ssh_connection() {
    let Some(link) = Link::new() else { return };
    link.serve(&[], "LC_ALL=C sort", "sorter/text/plain");
    let uri = format!("{}/sorter", link.uri("root"));
    for round in 0..10 {
        let input = format!("{}\n{round}\n", 10 - round);
        let mut expected: Vec<String> = input.lines().map(str::to_string).collect();
        expected.sort();
        assert_eq!(link.ask(&[&uri], input.as_bytes()), expected.join("\n") + "\n");
    }
    // Each dcat ran one ssh session (FORWARD) and its forwards: ten
    // sessions, one authentication.
    assert_eq!(link.logins(), 1, "sshd log:\n{}", link.sshd.log());
    let sockets = link.control_sockets();
    assert_eq!(sockets.len(), 1, "control sockets: {sockets:?}");
    assert!(sockets[0].starts_with(link.scope()), "{} is not in the user's scope", sockets[0].display());
    let check = link.control(&sockets[0], "check");
    assert!(
        check.status.success() && stderr_of(&check).starts_with("Master running"),
        "ssh -O check: {}",
        stderr_of(&check)
    );
}

#[test]
fn a_missing_remote_dipus_is_named() {
    let Some(link) = Link::new() else { return };
    let out = run_with_timeout(
        link.cmd("dcat").env("DIPUS_REMOTE", "/nonexistent/dipus").arg(format!("{}/sorter", link.uri("root"))),
        Some(b""),
        SSH_TIMEOUT,
    );
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(74), "stderr: {stderr}");
    assert!(out.stdout.is_empty());
    let ours: Vec<&str> = stderr.lines().filter(|line| line.starts_with("dcat: ")).collect();
    assert_eq!(
        ours,
        [format!(
            "dcat: {}: the remote command \"/nonexistent/dipus\" was not found; \
             install dipus there or set DIPUS_REMOTE to its path",
            link.uri("root")
        )],
        "stderr: {stderr}"
    );
    // dls says the same.
    let out = run_with_timeout(
        link.cmd("dls").env("DIPUS_REMOTE", "/nonexistent/dipus").arg(link.uri("root")),
        None,
        SSH_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(74), "stderr: {}", stderr_of(&out));
    assert!(stderr_of(&out).contains("was not found"), "stderr: {}", stderr_of(&out));
}

#[test]
fn a_failing_remote_command_is_not_called_an_ssh_failure() {
    let Some(link) = Link::new() else { return };
    // The remote dipus runs, and refuses its root.
    let symlink = link.remote.path().join("link");
    std::os::unix::fs::symlink(link.remote.tree(), &symlink).unwrap();
    let remote = format!("env DIPUS_ROOT={} {}", symlink.display(), link.binary.display());
    let out = run_with_timeout(
        link.cmd("dcat").env("DIPUS_REMOTE", &remote).arg(format!("{}/sorter", link.uri("root"))),
        Some(b""),
        SSH_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(74), "stderr: {}", stderr_of(&out));
    assert_eq!(
        stderr_of(&out),
        format!(
            "serve: {} is a symlink; refusing to use it as the dipus root (set DIPUS_ROOT to a real directory)\n\
             dcat: {}: the remote command {remote:?} failed (exit status: 1); its message is above\n",
            symlink.display(),
            link.uri("root")
        )
    );
}

#[test]
fn a_key_the_server_refuses_leaves_ssh_to_say_why() {
    let Some(link) = Link::new() else { return };
    link.serve(&[], "LC_ALL=C sort", "sorter/text/plain");
    let key = link.client.path().join("wrong_key");
    let keygen = run_with_timeout(
        Command::new("ssh-keygen").args(["-q", "-N", "", "-t", "ed25519", "-f"]).arg(&key),
        None,
        DEFAULT_TIMEOUT,
    );
    assert_success(&keygen, "ssh-keygen");
    // The rig's options with the other key (and no -p: the URI has it).
    let ssh = link.ssh_command().replace(&link.sshd.key_path().display().to_string(), &key.display().to_string());
    assert!(ssh.contains("BatchMode=yes") && ssh.contains(key.to_str().unwrap()), "{ssh}");
    // The client tree is fresh: no master to reuse.
    let out = run_with_timeout(
        link.cmd("dcat").env("DIPUS_SSH", &ssh).arg(format!("{}/sorter", link.uri("root"))),
        Some(b"b\na\n"),
        SSH_TIMEOUT,
    );
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(74), "stderr: {stderr}");
    assert!(out.stdout.is_empty());
    assert!(stderr.contains("Permission denied (publickey)"), "ssh's message is missing: {stderr}");
    let ours: Vec<&str> = stderr.lines().filter(|line| line.starts_with("dcat: ")).collect();
    assert_eq!(
        ours,
        [format!("dcat: {}: ssh failed (exit status: 255); its message is above", link.uri("root"))],
        "stderr: {stderr}"
    );
    assert_eq!(link.logins(), 0);
}

/// What one ssh import does with connections, whichever way it carries
/// them: a reply after the request's EOF, a service that speaks first and
/// closes while the client still could write, and eight connections open
/// at once. Returns the ssh processes the importer ran while the eight
/// were open.
fn connections_through(link: &Link, importer: &Background) -> usize {
    // sort answers only after EOF: half-close goes there, the reply back.
    let sorter = link.scope().join("text/plain/sorter.remote..0");
    let mut stream = UnixStream::connect(&sorter).expect("connect to the imported sorter");
    stream.set_read_timeout(Some(SSH_TIMEOUT)).unwrap();
    stream.write_all(b"pear\napple\n").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    if let Err(error) = stream.read_to_string(&mut reply) {
        let log = std::fs::read_to_string(link.client.path().join("import.err")).unwrap_or_default();
        panic!(
            "no reply from sort ({error}, {reply:?} so far); the importer's log:\n{log}\nsshd's:\n{}",
            link.sshd.log()
        );
    }
    assert_eq!(reply, "apple\npear\n");

    // The service closes first; the client never shuts down its side and
    // must still see the end.
    let greeter = link.scope().join("text/plain/greeter.remote..0");
    let mut stream = UnixStream::connect(&greeter).expect("connect to the imported greeter");
    stream.set_read_timeout(Some(SSH_TIMEOUT)).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("the greeter's words, then EOF");
    assert_eq!(reply, "hello\n");

    let echo = link.scope().join("application/octet-stream/echo.remote..0");
    let mut open: Vec<UnixStream> = (0..8)
        .map(|index| {
            let mut stream = UnixStream::connect(&echo).expect("connect to the imported echo");
            stream.set_read_timeout(Some(SSH_TIMEOUT)).unwrap();
            echo_back(&mut stream, &format!("message {index}\n"));
            stream
        })
        .collect();
    let ssh_processes = proc::descendants(importer.pid()).iter().filter(|p| proc::name(p.pid) == "ssh").count();
    for (index, stream) in open.iter_mut().enumerate() {
        echo_back(stream, &format!("again {index}\n"));
    }
    ssh_processes
}

/// Sends `message` and checks that the echo service sends it back.
fn echo_back(stream: &mut UnixStream, message: &str) {
    stream.write_all(message.as_bytes()).unwrap();
    let mut reply = vec![0; message.len()];
    stream.read_exact(&mut reply).unwrap_or_else(|error| panic!("{message:?} not echoed: {error}"));
    assert_eq!(reply, message.as_bytes());
}

fn serve_for_connections(link: &Link) {
    link.serve(&[], "LC_ALL=C sort", "sorter/text/plain");
    link.serve(&[], "echo hello", "greeter/text/plain");
    link.serve(&[], "cat", "echo/application/octet-stream");
}

#[test]
fn an_ssh_import_lets_ssh_carry_its_connections() {
    let Some(link) = Link::new() else { return };
    serve_for_connections(&link);
    let importer = import(&link, &link.uri("root"));
    let ssh_processes = connections_through(&link, &importer);
    // Forwarded by the shared connection's master, as `ssh -L` does: no
    // ssh process (and no remote dipus) per connection, only the session's.
    assert_eq!(ssh_processes, 1, "ssh processes of the importer with eight connections open");
    // The master listens on the imported sockets, the importer does not.
    let listeners = unix_listeners();
    let greeter = link.scope().join("text/plain/greeter.remote..0");
    let greeter_inode = std::fs::metadata(&greeter).unwrap().ino();
    for service in services_under(&link.scope()) {
        let inode = std::fs::metadata(link.scope().join(&service)).unwrap().ino();
        let owner = listeners.get(&inode).map(String::as_str).unwrap_or("nobody");
        assert!(
            owner.contains("\"ssh\"") && !owner.contains(&format!("pid={},", importer.pid())),
            "{service}: {owner}"
        );
    }
    // A service removed remotely goes, and ssh stops listening for it.
    std::fs::remove_file(link.remote.tree().join("local/text/plain/greeter.remote..0")).unwrap();
    wait_until(SSH_TIMEOUT, "the removed service is gone locally", || !greeter.exists());
    wait_until(SSH_TIMEOUT, "ssh stops listening for it", || !unix_listeners().contains_key(&greeter_inode));
}

/// Who listens on each listening UNIX socket, by the inode of its file
/// (`ss -xlpe`: `… users:(("ssh",pid=7,fd=10)) <-> ino:1234 …`).
fn unix_listeners() -> std::collections::HashMap<u64, String> {
    let out = run_with_timeout(Command::new("ss").arg("-xlpe"), None, SSH_TIMEOUT);
    assert!(out.status.success(), "ss -xlpe: {}", stderr_of(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let inode = line.split_whitespace().find_map(|word| word.strip_prefix("ino:"))?.parse().ok()?;
            let users = line.split_whitespace().find(|word| word.starts_with("users:"))?;
            Some((inode, users.to_string()))
        })
        .collect()
}

/// While `dcat ssh://…/echo` is connected, the ssh sessions running
/// `dipus serve --stdio` on this link's remote tree (each one a remote
/// `dipus serve` relaying, or answering a request) come to `expected`.
fn assert_serve_sessions_during_dcat(link: &Link, expected: usize) {
    let mut echo = Streaming::spawn(link.cmd("dcat").arg(format!("{}/echo", link.uri("root"))));
    echo.write(b"ping\n");
    let mut reply = Vec::new();
    let deadline = Instant::now() + SSH_TIMEOUT;
    while reply.len() < 5 && Instant::now() < deadline {
        reply.extend(echo.arrived(Duration::from_millis(100)));
    }
    assert_eq!(reply, b"ping\n");
    let remote = format!("DIPUS_ROOT={} ", link.remote.tree().display());
    let sessions = || -> Vec<u32> {
        proc::with_command_line(&remote)
            .into_iter()
            .filter(|pid| proc::name(*pid) == "ssh" && proc::with_command_line("serve --stdio").contains(pid))
            .collect()
    };
    // FORWARD's own session ends once its probe is through.
    wait_until(DEFAULT_TIMEOUT, &format!("{expected} ssh sessions running dipus serve"), || {
        sessions().len() == expected
    });
    // And stays so while the bytes flow.
    echo.write(b"pong\n");
    let mut reply = Vec::new();
    while reply.len() < 5 && Instant::now() < deadline {
        reply.extend(echo.arrived(Duration::from_millis(100)));
    }
    assert_eq!((reply.as_slice(), sessions().len()), (&b"pong\n"[..], expected));
    let (rest, status) = echo.finish(SSH_TIMEOUT);
    assert_eq!((rest, status.code()), (Vec::new(), Some(0)));
}

#[test]
fn dcat_over_ssh_lets_ssh_carry_the_bytes() {
    let Some(link) = Link::new() else { return };
    link.serve(&[], "cat", "echo/application/octet-stream");
    assert_serve_sessions_during_dcat(&link, 0);
}

/// The rig's ssh behind a script that notes each command line it is given
/// in `log`, one per line; with `without_config_dump`, `ssh -G` fails, as
/// where DIPUS_SSH is not OpenSSH's.
fn logging_ssh(link: &Link, log: &Path, without_config_dump: bool) -> PathBuf {
    let script = link.client.path().join(format!("logging-ssh-{}", next_id()));
    let refuse = if without_config_dump { "for arg; do [ \"$arg\" = -G ] && exit 1; done\n" } else { "" };
    let body =
        format!("#!/bin/sh\n{refuse}printf '%s\\n' \"$*\" >> {}\nexec {} \"$@\"\n", log.display(), link.ssh_command());
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// How many of the logged ssh command lines hold each of `words`.
fn ssh_calls(log: &Path, words: &[&str]) -> Vec<usize> {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let count = |word: &str| log.lines().filter(|line| line.split(' ').any(|arg| arg == word)).count();
    words.iter().map(|word| count(word)).collect()
}

/// dcat asks the shared connection's master for its forwards, and whether
/// it still stands, over the master's control socket: one `ssh -G` (to
/// learn where that is) beside the session, and no `ssh -O` process.
/// Where ssh does not say (`-G` fails), `ssh -O` does the same.
#[test]
fn dcat_over_ssh_asks_the_master_itself_for_its_forwards() {
    let Some(link) = Link::new() else { return };
    link.serve(&[], "LC_ALL=C sort", "sorter/text/plain");
    for without_config_dump in [false, true] {
        let log = link.client.path().join(format!("ssh-{without_config_dump}.log"));
        let ssh = logging_ssh(&link, &log, without_config_dump);
        let out = run_with_timeout(
            link.cmd("dcat").env("DIPUS_SSH", &ssh).arg(format!("{}/sorter", link.uri("root"))),
            Some(b"b\na\n"),
            SSH_TIMEOUT,
        );
        link.assert_quiet_success(&out, "dcat");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a\nb\n");
        let calls = ssh_calls(&log, &["-G", "-O", "forward", "cancel", "check"]);
        let expected = if without_config_dump { [0, 3, 1, 1, 1] } else { [1, 0, 0, 0, 0] };
        assert_eq!(
            calls,
            expected,
            "-G, -O (forward, cancel, check); ssh was run as:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert_eq!(forward_names(&link), Vec::<String>::new());
    }
}

/// An import, likewise: each service's forward asked of the master, and
/// withdrawn from it when the service goes, without an ssh process.
#[test]
fn an_ssh_import_asks_the_master_itself_for_its_forwards() {
    let Some(link) = Link::new() else { return };
    serve_for_connections(&link);
    let log = link.client.path().join("ssh.log");
    let ssh = logging_ssh(&link, &log, false);
    let mut importer = ChildGuard::spawn(
        link.cmd("dipus-import")
            .args(["-f", &link.uri("root")])
            .env("DIPUS_SSH", &ssh)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    let all =
        ["application/octet-stream/echo.remote..0", "text/plain/greeter.remote..0", "text/plain/sorter.remote..0"];
    wait_until(SSH_TIMEOUT, "the three proxies", || services_under(&link.scope()) == all);
    assert_eq!(link.ask(&["greeter.remote"], b""), "hello\n");
    let greeter = link.scope().join("text/plain/greeter.remote..0");
    let greeter_inode = std::fs::metadata(&greeter).unwrap().ino();
    std::fs::remove_file(link.remote.tree().join("local/text/plain/greeter.remote..0")).unwrap();
    wait_until(SSH_TIMEOUT, "ssh to stop listening for the removed service", || {
        !greeter.exists() && !unix_listeners().contains_key(&greeter_inode)
    });
    assert!(importer.is_running());
    assert_eq!(importer.terminate(DEFAULT_TIMEOUT).expect("the importer exits on SIGTERM").code(), Some(0));
    let calls = ssh_calls(&log, &["-G", "-O"]);
    assert_eq!(calls[1], 0, "ssh -O was run; ssh was run as:\n{}", std::fs::read_to_string(&log).unwrap());
    assert!(calls[0] >= 1, "ssh -G was never run:\n{}", std::fs::read_to_string(&log).unwrap());
}

#[test]
fn where_sshd_refuses_forwarding_dcat_over_ssh_relays_through_a_session() {
    let Some(link) = Link::with_sshd_config("AllowStreamLocalForwarding no\n") else { return };
    link.serve(&[], "cat", "echo/application/octet-stream");
    assert_serve_sessions_during_dcat(&link, 1);
}

/// FORWARD judges without connecting: a socket nobody listens on is
/// refused as CONNECT would refuse it; once a server has the name again,
/// it is reached.
#[test]
fn dcat_over_ssh_passes_over_a_dead_socket() {
    let Some(link) = Link::new() else { return };
    let path = stale_at(&link.remote, "local/text/plain/gone.remote..0");
    assert!(is_socket(&path));
    let out = link.run("dcat", &[&format!("{}/gone", link.uri("root"))], Some(b"x\n"));
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(69), "stderr: {stderr}");
    assert!(stderr.contains("503 service unavailable: refused: local/text/plain/gone.remote..0"), "{stderr}");
    link.serve(&[], "cat", "gone/text/plain");
    assert_eq!(link.ask(&[&format!("{}/gone", link.uri("root"))], b"back\n"), "back\n");
}

#[test]
fn where_sshd_refuses_forwarding_an_ssh_import_runs_a_session_per_connection() {
    let Some(link) = Link::with_sshd_config("AllowStreamLocalForwarding no\n") else { return };
    serve_for_connections(&link);
    let importer = import(&link, &link.uri("root"));
    let ssh_processes = connections_through(&link, &importer);
    // One per connection open (one more may still be winding down).
    assert!(ssh_processes >= 9, "{ssh_processes} ssh processes of the importer with eight connections open");
}

/// Where each connection is an ssh session, a client that sends and
/// closes without waiting for a reply still has everything delivered:
/// its ssh is left to pass on what it holds (it used to be killed as the
/// client went, with what was still in its stdin pipe).
#[test]
fn where_sshd_refuses_forwarding_what_a_client_sent_before_closing_arrives() {
    let Some(link) = Link::with_sshd_config("AllowStreamLocalForwarding no\n") else { return };
    let received = link.remote.path().join("received");
    link.serve(&[], &format!("cat >> '{}'", received.display()), "store/application/octet-stream");
    let importer = import(&link, &link.uri("root"));
    let store = link.scope().join("application/octet-stream/store.remote..0");
    // More than a pipe holds, so some of it is still on its way when the
    // client goes.
    let message: Vec<u8> = (0..256 * 1024u32).map(|n| (n % 251) as u8).collect();
    let mut stream = UnixStream::connect(&store).expect("connect to the imported store");
    stream.write_all(&message).unwrap();
    drop(stream);
    let size = || std::fs::metadata(&received).map(|m| m.len()).unwrap_or(0);
    let arrived = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        size() == message.len() as u64
    });
    assert!(arrived, "{} of {} bytes arrived", size(), message.len());
    assert_eq!(std::fs::read(&received).unwrap(), message);
    // The ssh left to finish has been reaped.
    wait_until(SSH_TIMEOUT, "the finished ssh to be reaped", || {
        proc::descendants(importer.pid()).iter().all(|p| proc::state(p.pid) != Some('Z'))
    });
}

#[test]
fn an_ssh_import_mirrors_follows_and_cleans_up() {
    let Some(link) = Link::new() else { return };
    link.serve(&[], "LC_ALL=C sort", "sorter/text/plain");
    link.serve(&[], "cat", "echo/application/octet-stream");
    link.serve(&[], "wc -c", "counter/text/plain");
    link.export("LC_ALL=C sort -r", "reverse/text/plain");
    // The remote user's own ssh imports are not mirrored again.
    let (_theirs, _) = listen_at(&link.remote, &format!("{}/text/plain/far.elsewhere..0", user_name()));
    let importer = import(&link, &link.uri("root"));
    let scope = link.scope();

    // No waiting: the command returned after the first sync.
    assert_eq!(
        services_under(&scope),
        [
            "application/octet-stream/echo.remote..0",
            "text/plain/counter.remote..0",
            "text/plain/reverse.remote..0",
            "text/plain/sorter.remote..0",
        ]
    );
    let meta = std::fs::symlink_metadata(&scope).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o700, euid()), "{}", scope.display());
    for service in services_under(&scope) {
        let meta = std::fs::symlink_metadata(scope.join(&service)).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o600, euid()), "{service}");
    }
    let out = link.run("dls", &["-1"], None);
    link.assert_quiet_success(&out, "dls -1");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "application/octet-stream/echo.remote..0\ntext/plain/counter.remote..0\n\
         text/plain/reverse.remote..0\ntext/plain/sorter.remote..0\n"
    );

    // Plain local selectors now reach the remote services.
    assert_eq!(link.ask(&["sorter.remote"], b"pear\napple\nfig\n"), "apple\nfig\npear\n");
    assert_eq!(link.ask(&["reverse"], b"a\nc\nb\n"), "c\nb\na\n");
    let data = vec![b'y'; 5 * 1024 * 1024 + 3];
    assert_eq!(link.ask(&["counter.remote"], &data), format!("{}\n", data.len()));
    // sort answers after EOF only, through the proxy too.
    let mut sort = Streaming::spawn(link.cmd("dcat").arg("sorter.remote"));
    sort.write(b"b\na\n");
    assert_eq!(sort.arrived(Duration::from_secs(1)), b"", "sort answered before the end of its input");
    let (reply, status) = sort.finish(SSH_TIMEOUT);
    assert_eq!((String::from_utf8_lossy(&reply).as_ref(), status.code()), ("a\nb\n", Some(0)));

    // 256 MiB of pseudo-random bytes there and back, unchanged.
    let size: usize = 256 * 1024 * 1024;
    let started = Instant::now();
    let mut echo = Streaming::spawn(link.cmd("dcat").arg("echo.remote"));
    let stdin = echo.stdin.take().unwrap();
    let sender = std::thread::spawn(move || {
        let mut stdin = stdin;
        let (mut random, mut hash) = (Random(0x9e37_79b9_7f4a_7c15), Hash::new());
        let mut buffer = vec![0u8; 1024 * 1024];
        for _ in 0..size / buffer.len() {
            random.fill(&mut buffer);
            hash.update(&buffer);
            stdin.write_all(&buffer).expect("write to dcat");
        }
        hash.value()
    });
    let mut received = Hash::new();
    let deadline = started + Duration::from_secs(180);
    let status = loop {
        match echo.output.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(chunk) => received.update(&chunk),
            Err(RecvTimeoutError::Disconnected) => break echo.child.wait_timeout(DEFAULT_TIMEOUT),
            Err(RecvTimeoutError::Timeout) => panic!("256 MiB: {} bytes back after 180 s", received.length),
        }
    };
    let sent = sender.join().expect("the sender");
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert_eq!(received.value(), sent, "256 MiB came back different");
    assert_eq!(sent.0, size as u64);
    eprintln!("256 MiB through an ssh import and back: {:?}", started.elapsed());

    // A service added remotely appears, one removed disappears.
    let (late, _) = link.serve(&[], "cat", "late/text/plain");
    let proxy = scope.join("text/plain/late.remote..0");
    wait_until(Duration::from_secs(2), "the new service's proxy", || is_socket(&proxy));
    assert_eq!(link.ask(&["late"], b"hello\n"), "hello\n");
    stop(&link.remote, late, "TERM");
    wait_until(Duration::from_secs(2), "the removed service's proxy to go", || !proxy.exists());

    // SIGTERM: the importer takes its proxies along.
    assert!(importer.terminate(DEFAULT_TIMEOUT), "the importer still runs after SIGTERM");
    assert_eq!(services_under(&scope), Vec::<String>::new());
    let out = link.run("dls", &["-1"], None);
    link.assert_quiet_success(&out, "dls -1");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    // The remote services are of course untouched.
    assert_eq!(
        services_under(&link.remote.tree().join("local")),
        ["application/octet-stream/echo.remote..0", "text/plain/counter.remote..0", "text/plain/sorter.remote..0"]
    );
    // One ssh connection carried it all.
    assert_eq!(link.logins(), 1, "sshd log:\n{}", link.sshd.log());
}

/// The remote `local/` and `exported/` meet in one scope here: of two
/// services of one name, the second is mirrored as soon as the first goes,
/// not only once a new session lists it again. In the foreground the
/// import hears the first go; in the background its first session is
/// renewed (from the background) just as the first goes, and the new one
/// never lists it.
#[test]
fn a_name_in_both_remote_local_and_exported_passes_to_the_other_when_one_goes() {
    for foreground in [true, false] {
        let Some(link) = Link::new() else { return };
        let (in_local, _) = link.serve(&[], "echo from-local", "twin/text/plain");
        let (in_exported, _) = link.export("echo from-exported", "twin/text/plain");
        let (_in_foreground, _in_background);
        if foreground {
            _in_foreground = ChildGuard::spawn(
                link.cmd("dipus-import").args(["-f", &link.uri("root")]).stdin(Stdio::null()).stdout(Stdio::null()),
            );
            wait_until(SSH_TIMEOUT, "the import's proxy", || !services_under(&link.scope()).is_empty());
        } else {
            _in_background = import(&link, &link.uri("root"));
        }
        assert_eq!(services_under(&link.scope()), ["text/plain/twin.remote..0"]);
        let first = link.ask(&["twin"], b"");
        let (holder, other) = match first.as_str() {
            "from-local\n" => (in_local, "from-exported\n"),
            "from-exported\n" => (in_exported, "from-local\n"),
            _ => panic!("twin answered {first:?}"),
        };
        stop(&link.remote, holder, "TERM");
        wait_until(SSH_TIMEOUT, "the other twin to take the name", || {
            link.run("dcat", &["twin"], Some(b"")).stdout == other.as_bytes()
        });
        assert_eq!(services_under(&link.scope()), ["text/plain/twin.remote..0"], "foreground: {foreground}");
    }
}

#[test]
fn the_ssh_importer_imports_and_cleans_up() {
    let Some(link) = Link::new() else { return };
    link.serve(&[], "LC_ALL=C sort", "sorter/text/plain");
    link.export("cat", "echo/text/plain");
    let scope = link.scope();
    let host = format!("root@127.0.0.1:{}", link.port());
    for form in [host.clone(), format!("ssh://{host}")] {
        let mut importer = ChildGuard::spawn(
            link.cmd("dipus-ssh-importer")
                .arg(&form)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let wanted = ["text/plain/echo.remote..0", "text/plain/sorter.remote..0"];
        wait_until(SSH_TIMEOUT, &format!("the proxies of {form}"), || services_under(&scope) == wanted);
        let meta = std::fs::symlink_metadata(&scope).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o700, euid()));
        for service in wanted {
            assert_eq!(std::fs::symlink_metadata(scope.join(service)).unwrap().mode() & 0o7777, 0o600, "{service}");
        }
        assert_eq!(link.ask(&["sorter.remote"], b"b\nc\na\n"), "a\nb\nc\n");
        assert_eq!(link.ask(&["echo"], b"hi\n"), "hi\n");
        // The ssh connection ends: the proxies go, and return with the
        // next one.
        let logins = link.logins();
        for socket in link.control_sockets() {
            assert_success(&link.control(&socket, "exit"), "ssh -O exit");
        }
        wait_until(DEFAULT_TIMEOUT, "the proxies to go with the connection", || services_under(&scope).is_empty());
        wait_until(SSH_TIMEOUT, "the proxies to return", || services_under(&scope) == wanted);
        assert_eq!(link.logins(), logins + 1);
        assert_eq!(link.ask(&["sorter.remote"], b"z\ny\n"), "y\nz\n");

        let status = importer.terminate(DEFAULT_TIMEOUT).expect("the importer exits on SIGTERM");
        let mut output = (String::new(), String::new());
        importer.0.stdout.take().unwrap().read_to_string(&mut output.0).unwrap();
        importer.0.stderr.take().unwrap().read_to_string(&mut output.1).unwrap();
        let lost = format!(
            "[WARN  dipus::import] {}: the exporter closed the session; removing its 2 services, retrying in 500ms\n",
            link.uri("root")
        );
        assert_eq!((status.code(), output.0.as_str(), output.1.as_str()), (Some(0), "", lost.as_str()), "{form}");
        assert_eq!(services_under(&scope), Vec::<String>::new(), "{form}");
    }
}

/// A named host that another importer holds is refused at once, as
/// dipus-import refuses it, instead of leaving an importer that imports
/// nothing; what the other importer made stays.
#[test]
fn the_ssh_importer_refuses_a_host_already_imported() {
    let Some(link) = Link::new() else { return };
    link.serve(&[], "LC_ALL=C sort", "sorter/text/plain");
    let scope = link.scope();
    let host = format!("root@127.0.0.1:{}", link.port());
    let mut first = ChildGuard::spawn(
        link.cmd("dipus-ssh-importer").arg(&host).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()),
    );
    let wanted = ["text/plain/sorter.remote..0"];
    wait_until(SSH_TIMEOUT, "the first importer's proxy", || services_under(&scope) == wanted);
    let other_spelling = format!("root@localhost:{}", link.port());
    for hosts in [vec![host.clone()], vec![other_spelling, host.clone()]] {
        let out = run_with_timeout(link.cmd("dipus-ssh-importer").args(&hosts), None, SSH_TIMEOUT);
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{hosts:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("dipus-ssh-importer: {} is already being imported (lock ", link.uri("root")))
                && stderr.lines().count() == 1,
            "{hosts:?}: {stderr}"
        );
        assert_eq!(services_under(&scope), wanted, "{hosts:?}");
        assert_eq!(link.ask(&["sorter.remote"], b"b\na\n"), "a\nb\n");
    }
    let status = first.terminate(DEFAULT_TIMEOUT).expect("the importer exits on SIGTERM");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn the_remote_kernel_judges_as_the_remote_user() {
    let shared = SharedBinary::new();
    let Some(link) = Link::with_binary(shared.path.clone()) else { return };
    let user = link.sshd.add_user("dpu");
    link.serve(&["--mode", "0600"], "cat", "secret/text/plain");
    link.serve(&["--mode", "0666"], "LC_ALL=C sort", "sorter/text/plain");
    let theirs = link.uri(user.name());

    // Listed: the user may see the socket, just not connect to it.
    let out = link.run("dls", &["-1", &theirs], None);
    link.assert_quiet_success(&out, "dls -1 as the user");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "text/plain/secret.remote..0\ntext/plain/sorter.remote..0\n");
    assert_eq!(link.ask(&[&format!("{theirs}/sorter")], b"b\na\n"), "a\nb\n");
    let out = link.run("dcat", &[&format!("{theirs}/secret")], Some(b"x\n"));
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(69), "stderr: {stderr}");
    assert!(out.stdout.is_empty());
    assert!(stderr.starts_with("dcat: ") && stderr.lines().count() == 1, "stderr: {stderr}");
    assert!(stderr.contains("403 forbidden: permission denied"), "stderr: {stderr}");
    // root may.
    assert_eq!(link.ask(&[&format!("{}/secret", link.uri("root"))], b"x\n"), "x\n");

    // What root imports is root's alone.
    let _importer = import(&link, &link.uri("root"));
    let proxy = link.scope().join("text/plain/secret.remote..0");
    assert!(is_socket(&proxy));
    assert_eq!(link.ask(&["secret"], b"mine\n"), "mine\n");
    let as_user = |args: &[&str]| {
        run_with_timeout(
            Command::new("runuser")
                .args(["-u", user.name(), "--", "env", &format!("DIPUS_ROOT={}", link.client.tree().display())])
                .args(args),
            Some(b"x\n"),
            DEFAULT_TIMEOUT,
        )
    };
    let scope = link.scope().display().to_string();
    let out = as_user(&["ls", &scope]);
    assert!(!out.status.success() && stderr_of(&out).contains("Permission denied"), "ls: {}", stderr_of(&out));
    let binary = shared.path.display().to_string();
    let out = as_user(&[&binary, "cat", proxy.to_str().unwrap()]);
    assert!(!out.status.success() && out.stdout.is_empty(), "dcat {}: {out:?}", proxy.display());
    assert!(stderr_of(&out).contains("Permission denied"), "dcat: {}", stderr_of(&out));
    let out = as_user(&[&binary, "cat", "secret"]);
    assert!(!out.status.success() && out.stdout.is_empty(), "dcat secret: {out:?}");
    // The user sees the tree, but not into root's scope.
    let out = as_user(&[&binary, "ls", "-1"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "dls as the user: {out:?}");
}

/// Gone to the background, the importer must let go of the caller's
/// output, or `out=$(dipus-import ssh://…)` never returns.
#[test]
fn a_background_ssh_import_lets_go_of_the_callers_output() {
    let Some(link) = Link::new() else { return };
    link.serve(&[], "LC_ALL=C sort", "sorter/text/plain");
    let pidfile = link.client.path().join("import.pid");
    let out = try_run_with_timeout(
        link.cmd("dipus-import").args(["--pidfile", pidfile.to_str().unwrap(), &link.uri("root")]),
        None,
        SSH_TIMEOUT,
    );
    let _importer = pidfile.exists().then(|| Background::from_pidfile(&pidfile));
    let out = out.unwrap_or_else(|e| panic!("{e}"));
    link.assert_quiet_success(&out, "dipus-import");
    assert_eq!(link.ask(&["sorter.remote"], b"b\na\n"), "a\nb\n");
}

/// The pid of the one shared ssh connection's master (`ssh -O check`
/// says `Master running (pid=N)`).
fn master_pid(link: &Link) -> u32 {
    let sockets = link.control_sockets();
    assert_eq!(sockets.len(), 1, "control sockets: {sockets:?}");
    let check = link.control(&sockets[0], "check");
    let text = stderr_of(&check);
    text.split("pid=")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("ssh -O check: {text}"))
}

/// `dcat ssh://…/echo` streams bytes there and back until the ssh
/// connection dies under it (its master killed, as when the network or
/// sshd goes): the reply it wrote is then incomplete, and dcat must fail
/// and say so, not exit 0. Returns dcat's exit status and stderr.
fn dcat_while_the_connection_dies(link: &Link) -> (Option<i32>, String) {
    link.serve(&[], "cat", "echo/application/octet-stream");
    let uri = format!("{}/echo", link.uri("root"));
    assert_eq!(link.ask(&[&uri], b"warm\n"), "warm\n");
    let master = master_pid(link);
    let stderr_path = link.client.path().join("dcat.err");
    let mut dcat = ChildGuard::spawn(
        link.cmd("dcat")
            .arg(&uri)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_path).unwrap()),
    );
    let mut stdin = dcat.0.stdin.take().unwrap();
    let mut stdout = dcat.0.stdout.take().unwrap();
    // Far more than can cross before the connection dies; the writer
    // stops once dcat is gone.
    std::thread::spawn(move || {
        let buffer = vec![b'z'; 1024 * 1024];
        for _ in 0..64 * 1024 {
            if stdin.write_all(&buffer).is_err() {
                break;
            }
        }
    });
    let (tx, received) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(count @ 1..) = stdout.read(&mut buffer) {
            if tx.send(count).is_err() {
                break;
            }
        }
    });
    let mut total = 0;
    let deadline = Instant::now() + SSH_TIMEOUT;
    while total < 8 * 1024 * 1024 {
        match received.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(count) => total += count,
            Err(error) => panic!("{total} bytes back, then {error:?}"),
        }
    }
    assert!(proc::signal(&[master], "KILL"), "cannot kill the ssh master {master}");
    let status = dcat.wait_timeout(SSH_TIMEOUT).expect("dcat ends once its ssh connection is gone");
    (status.code(), std::fs::read_to_string(&stderr_path).unwrap())
}

fn assert_lost_connection_reported(link: &Link, (code, stderr): (Option<i32>, String)) {
    let ours: Vec<&str> = stderr.lines().filter(|line| line.starts_with("dcat: ")).collect();
    let expected = format!("dcat: {}: the ssh connection was lost before the reply ended", link.uri("root"));
    assert!(code == Some(74) && ours.len() == 1 && ours[0].starts_with(&expected), "exit {code:?}, stderr: {stderr}");
}

#[test]
fn dcat_over_ssh_fails_when_the_connection_carrying_the_bytes_dies() {
    let Some(link) = Link::new() else { return };
    let outcome = dcat_while_the_connection_dies(&link);
    assert_lost_connection_reported(&link, outcome);
}

#[test]
fn dcat_through_an_ssh_session_fails_when_the_connection_dies() {
    let Some(link) = Link::with_sshd_config("AllowStreamLocalForwarding no\n") else { return };
    let outcome = dcat_while_the_connection_dies(&link);
    assert_lost_connection_reported(&link, outcome);
}

/// `dcat ssh://…/yes | head -1`: once stdout is closed, dcat ends quietly,
/// whichever way ssh carries the bytes, and does not wait for a service
/// that never stops talking.
fn dcat_ends_when_its_reader_does(link: &Link) {
    link.serve(&[], "yes", "yes/text/plain");
    let mut dcat = ChildGuard::spawn(
        link.cmd("dcat")
            .arg(format!("{}/yes", link.uri("root")))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut stdout = dcat.0.stdout.take().unwrap();
    let mut first = [0u8; 2];
    stdout.read_exact(&mut first).expect("the first line");
    assert_eq!(&first, b"y\n");
    drop(stdout);
    let status = dcat.wait_timeout(SSH_TIMEOUT).expect("dcat ends once its stdout is closed");
    let mut stderr = String::new();
    dcat.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!((status.code(), stderr.as_str()), (Some(0), ""));
}

#[test]
fn dcat_over_ssh_ends_when_its_reader_does() {
    let Some(link) = Link::new() else { return };
    dcat_ends_when_its_reader_does(&link);
}

#[test]
fn dcat_through_an_ssh_session_ends_when_its_reader_does() {
    let Some(link) = Link::with_sshd_config("AllowStreamLocalForwarding no\n") else { return };
    dcat_ends_when_its_reader_does(&link);
}

/// The shared connection's control socket goes (a /tmp cleaner, a user
/// tidying up) while an ssh import runs: the master can no longer be told
/// to forward, so a service that appears remotely must still come, with
/// a session on a new connection, not be left out until the old
/// connection dies.
#[test]
fn an_ssh_import_outlives_the_loss_of_its_control_socket() {
    let Some(link) = Link::new() else { return };
    link.serve(&[], "LC_ALL=C sort", "sorter/text/plain");
    let log_path = link.client.path().join("ssh-importer.err");
    let mut importer = ChildGuard::spawn(
        link.cmd("dipus-ssh-importer")
            .arg(link.uri("root"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log_path).unwrap()),
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_until(SSH_TIMEOUT, "the first proxy", || services_under(&link.scope()) == ["text/plain/sorter.remote..0"]);
    let sockets = link.control_sockets();
    assert_eq!(sockets.len(), 1, "control sockets: {sockets:?}");
    let old_master = master_pid(&link);
    std::fs::remove_file(&sockets[0]).unwrap();
    link.serve(&[], "cat", "late/text/plain");
    let late = link.scope().join("text/plain/late.remote..0");
    let deadline = Instant::now() + SSH_TIMEOUT;
    while !is_socket(&late) {
        assert!(Instant::now() < deadline, "no proxy for the new service; the importer's log:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(link.ask(&["late"], b"hello\n"), "hello\n");
    assert_eq!(link.ask(&["sorter.remote"], b"b\na\n"), "a\nb\n");
    assert!(importer.is_running(), "the importer's log:\n{}", log());
    // The first master, out of reach, is the test's to end.
    proc::signal(&[old_master], "TERM");
}

/// Stopped while its forwarding probe waits for an answer through a
/// forward, the importer leaves nothing behind: not the probe's socket in
/// the user's scope, nor the forward in ssh's master. (The remote here
/// answers FORWARD with a probe socket that accepts and never speaks, so
/// the probe is caught in that moment.)
#[test]
fn an_ssh_importer_stopped_while_probing_leaves_no_forward_behind() {
    let Some(link) = Link::new() else { return };
    let (_silent, script) = forward_only_remote(&link);
    let (mut importer, names) = caught_probing(&link, &script, "dipus-ssh-importer", &link.uri("root"));
    let status = importer.terminate(DEFAULT_TIMEOUT).expect("the importer exits on SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert_no_forward_left(&link, &names);
}

/// Ctrl-C while dcat probes: dcat withdraws the forwards first, then ends
/// by the signal as it would have. (The probe here answers only once the
/// signal is sent.)
#[test]
fn dcat_interrupted_while_probing_leaves_no_forward_behind() {
    use std::os::unix::process::ExitStatusExt;
    let Some(link) = Link::new() else { return };
    let (probe, script) = forward_only_remote(&link);
    let (mut dcat, names) = caught_probing(&link, &script, "dcat", &format!("{}/sorter", link.uri("root")));
    assert!(dcat.signal("INT"));
    probe.set_nonblocking(true).unwrap();
    let mut answered = false;
    wait_until(SSH_TIMEOUT, "dcat to end", || {
        if let (false, Ok((mut connection, _))) = (answered, probe.accept()) {
            connection.set_nonblocking(false).unwrap();
            connection.write_all(b"SEP/1 200 OK\n").unwrap();
            answered = true;
        }
        !dcat.is_running()
    });
    let status = dcat.try_status().unwrap();
    assert_eq!(status.signal(), Some(2), "{status}");
    assert_no_forward_left(&link, &names);
}

/// Ctrl-C while dcat waits for the remote to answer FORWARD (nothing is
/// forwarded yet): dcat ends at once, not when the probe gives up.
#[test]
fn dcat_interrupted_before_forwarding_ends_at_once() {
    use std::os::unix::process::ExitStatusExt;
    let Some(link) = Link::new() else { return };
    let script = link.remote.path().join("mute-forward.sh");
    std::fs::write(&script, "#!/bin/sh\nread line\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut dcat = ChildGuard::spawn(
        link.cmd("dcat")
            .arg(format!("{}/sorter", link.uri("root")))
            .env("DIPUS_REMOTE", &script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let script_name = script.display().to_string();
    wait_until(SSH_TIMEOUT, "the remote to be asked FORWARD", || !proc::with_command_line(&script_name).is_empty());
    assert!(dcat.signal("INT"));
    let status = dcat.wait_timeout(Duration::from_secs(3)).expect("dcat still waits 3 s after SIGINT");
    assert_eq!(status.signal(), Some(2), "{status}");
    assert_eq!(forward_names(&link), Vec::<String>::new());
}

/// A remote whose `dipus serve` answers FORWARD, and nothing else, with
/// a probe socket the returned listener holds: it accepts, and the test
/// decides whether the probe is ever answered.
fn forward_only_remote(link: &Link) -> (std::os::unix::net::UnixListener, PathBuf) {
    let probe = link.remote.path().join("silent-probe.sock");
    let listener = std::os::unix::net::UnixListener::bind(&probe).unwrap();
    let script = link.remote.path().join("forward-only.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nread line\nprintf 'SEP/1 200 OK\\n{}\\n{}\\n.\\n'\nexec sleep 30\n",
            link.remote.tree().display(),
            probe.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (listener, script)
}

/// `applet ARGUMENT` against the remote `script`, once its probe's
/// forwards are made; with their names.
fn caught_probing(link: &Link, script: &Path, applet: &str, argument: &str) -> (ChildGuard, Vec<String>) {
    let child = ChildGuard::spawn(
        link.cmd(applet)
            .arg(argument)
            .env("DIPUS_REMOTE", script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_until(SSH_TIMEOUT, "the probe's forward", || !forward_names(link).is_empty());
    (child, forward_names(link))
}

/// The names of short-lived forwards in the user's scope.
fn forward_names(link: &Link) -> Vec<String> {
    entries_named(&link.scope(), ".forward-")
        .iter()
        .filter_map(|path| path.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .collect()
}

/// What is in `dir` (none if it is not there) with a name starting with
/// `prefix`.
fn entries_named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(prefix))
        .map(|entry| entry.path())
        .collect()
}

/// Neither the names of the forwards `names` are left in the scope, nor
/// the forwards in ssh's master.
fn assert_no_forward_left(link: &Link, names: &[String]) {
    assert_eq!(forward_names(link), Vec::<String>::new(), "left in the scope");
    // A socket the master still listens on is in the kernel's table by
    // the name it was bound at, even once that name is removed, with the
    // flag of a listener (__SO_ACCEPTCON). (The connection the probe
    // made may still be winding down: that one is not listening.)
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let listening: Vec<&str> = table
        .lines()
        .filter(|line| line.split_whitespace().nth(3) == Some("00010000"))
        .filter(|line| names.iter().any(|name| line.contains(name.as_str())))
        .collect();
    assert_eq!(listening, Vec::<&str>::new(), "ssh's master still listens for the probe");
}

/// A remote tree whose path ssh cannot forward to (`-L` splits on ':'):
/// ssh:// still works, one session per connection, as where sshd refuses
/// to forward.
#[test]
fn a_remote_tree_ssh_cannot_forward_to_is_reached_through_sessions() {
    let Some(link) = Link::new() else { return };
    let root = link.remote.path().join("odd:dir").join("tree");
    std::fs::create_dir_all(root.parent().unwrap()).unwrap();
    let pid = link.remote.spawn(
        link.remote.cmd("dipus-local-pipe").env("DIPUS_ROOT", &root).args(["LC_ALL=C sort", "sorter/text/plain"]),
    );
    let socket = root.join("local/text/plain/sorter.remote..0");
    wait_until(DEFAULT_TIMEOUT, "the sorter's socket", || is_socket(&socket));
    let remote = format!("env DIPUS_ROOT={} DIPUS_HOSTNAME=remote {}", root.display(), link.binary.display());
    let out = run_with_timeout(
        link.cmd("dcat").env("DIPUS_REMOTE", &remote).arg(format!("{}/sorter", link.uri("root"))),
        Some(b"b\na\n"),
        SSH_TIMEOUT,
    );
    link.assert_quiet_success(&out, "dcat");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a\nb\n");
    let _importer = ChildGuard::spawn(
        link.cmd("dipus-ssh-importer")
            .arg(link.uri("root"))
            .env("DIPUS_REMOTE", &remote)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_until(SSH_TIMEOUT, "the imported sorter", || services_under(&link.scope()) == ["text/plain/sorter.remote..0"]);
    assert_eq!(link.ask(&["sorter.remote"], b"d\nc\n"), "c\nd\n");
    stop(&link.remote, pid, "TERM");
}

/// ssh reads an `-o` value as a line of its configuration, where a space
/// ends the value and `%u`, `%d`… are tokens: a client tree whose path has
/// either still keeps its shared ssh connection's control socket in the
/// user's own scope there, and works.
#[test]
fn a_client_tree_with_a_space_or_a_percent_in_its_path_works_over_ssh() {
    let Some(link) = Link::new() else { return };
    link.serve(&[], "LC_ALL=C sort", "sorter/text/plain");
    let root = link.client.path().join("sp ace%d").join("tree");
    std::fs::create_dir_all(root.parent().unwrap()).unwrap();
    let out = run_with_timeout(
        link.cmd("dcat").env("DIPUS_ROOT", &root).arg(format!("{}/sorter", link.uri("root"))),
        Some(b"b\na\n"),
        SSH_TIMEOUT,
    );
    let scope = root.join(user_name());
    let controls = entries_named(&scope, ".ssh-");
    for socket in &controls {
        let _ = link.control(socket, "exit");
    }
    link.assert_quiet_success(&out, "dcat");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "a\nb\n");
    assert_eq!(controls.len(), 1, "control sockets in {}: {controls:?}", scope.display());
}

/// The control socket's name is about 60 bytes longer than the user's
/// scope (ssh binds it at a temporary name first), so a DIPUS_ROOT that
/// still leaves room for services may leave none for it: dcat says so,
/// and what to do, rather than pass on ssh's complaint about a path.
#[test]
fn a_tree_too_deep_for_ssh_control_socket_is_named() {
    let Some(link) = Link::new() else { return };
    let base = link.client.path().display().to_string();
    // 48 bytes: the control socket's own name fits, its temporary one not.
    let root = PathBuf::from(format!("{base}/{}/tree", "d".repeat(48 - 6 - base.len())));
    std::fs::create_dir_all(root.parent().unwrap()).unwrap();
    let out = run_with_timeout(
        link.cmd("dcat").env("DIPUS_ROOT", &root).arg(format!("{}/sorter", link.uri("root"))),
        Some(b""),
        SSH_TIMEOUT,
    );
    let scope = root.join(user_name());
    let socket = format!("{}/.ssh-{}.{}", scope.display(), "x".repeat(40), "x".repeat(16));
    assert_eq!(
        (out.status.code(), stderr_of(&out)),
        (
            Some(64),
            format!(
                "dcat: {} leaves no room for ssh's control socket: {} bytes with the temporary name ssh binds \
                 first, more than the 107 that fit in a UNIX socket address; use a shorter DIPUS_ROOT\n",
                scope.display(),
                socket.len()
            )
        )
    );
    assert_eq!(link.logins(), 0);
}

/// A remote tree whose root is not open to all (0755, root's): the ssh
/// user has no scope there and cannot get one, so there is no place for
/// FORWARD's probe socket. The services are still theirs to use, through
/// sessions, as from a dipus without FORWARD.
#[test]
fn a_user_without_a_scope_on_the_remote_host_still_reaches_its_services() {
    let shared = SharedBinary::new();
    let Some(link) = Link::with_binary(shared.path.clone()) else { return };
    let user = link.sshd.add_user("dpn");
    link.serve(&["--mode", "0666"], "LC_ALL=C sort", "sorter/text/plain");
    std::fs::set_permissions(link.remote.tree(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let theirs = link.uri(user.name());
    assert_eq!(link.ask(&[&format!("{theirs}/sorter")], b"b\na\n"), "a\nb\n");
    assert!(!link.remote.tree().join(user.name()).exists());
}
