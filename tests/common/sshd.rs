//! A private OpenSSH server on 127.0.0.1 and throw-away Unix users (root
//! only: sshd must switch users; useradd/userdel edit /etc/passwd).
//!
//! Everything lives in one temp dir: host key, client key, config, pid file,
//! log and `keys/<user>` (AuthorizedKeysFile with `%u`). StrictModes is off
//! since the temp dir is owned by root; key files stay world-readable
//! because sshd reads them with the user's privileges. The config is given
//! with `-f`, so the system's /etc/ssh/sshd_config is not read.
//!
//! Limits: the port is picked free then handed to sshd (racy, so start
//! retries on "Address already in use"); a `TestUser` is a real account
//! visible to the whole machine until dropped.

use super::child::{run_with_timeout, try_run_with_timeout, ChildGuard};
use super::{free_port, have_command, have_root, next_id, require, unique_temp_dir, DEFAULT_TIMEOUT};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    dir: PathBuf,
    port: u16,
    child: Option<ChildGuard>,
    /// Appended to the config (e.g. `AllowStreamLocalForwarding no`).
    extra: String,
}

/// Fails loudly: a test needing sshd cannot continue without this step.
fn run_ok(cmd: &mut Command) {
    let out = run_with_timeout(cmd, None, DEFAULT_TIMEOUT);
    assert!(out.status.success(), "{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
}

fn keygen(path: &Path) {
    run_ok(Command::new("ssh-keygen").args(["-q", "-N", "", "-t", "ed25519", "-C", "dipus-test", "-f"]).arg(path));
}

fn write_mode(path: &Path, text: &str, mode: u32) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// True once `port` answers with an SSH banner (so it is our sshd, not a
/// stranger that grabbed the port).
fn answers_ssh(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut banner = String::new();
    BufReader::new(s).read_line(&mut banner).is_ok() && banner.starts_with("SSH-")
}

impl Sshd {
    /// Starts sshd and waits until it serves; None (loud skip) without
    /// root, sshd, ssh or ssh-keygen. Panics with sshd's log if it fails.
    pub fn start() -> Option<Sshd> {
        Sshd::start_with("")
    }

    /// As [`Sshd::start`], with `extra` lines added to the config.
    pub fn start_with(extra: &str) -> Option<Sshd> {
        let tools = have_command(SSHD) && have_command("ssh") && have_command("ssh-keygen");
        if !require(have_root() && tools, "needs root, /usr/sbin/sshd, ssh, ssh-keygen") {
            return None;
        }
        // sshd's privilege separation needs this dir (normally made by the
        // system service, which may never have run here).
        let _ = fs::create_dir_all("/run/sshd");
        let _ = fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755));
        let mut sshd = Sshd { dir: unique_temp_dir("dipus-sshd"), port: 0, child: None, extra: extra.to_string() };
        let dir = sshd.dir.clone();
        // Users must traverse the dir to reach their keys file.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        keygen(&dir.join("host_key"));
        keygen(&dir.join("client_key"));
        fs::create_dir(dir.join("keys")).expect("mkdir keys");
        fs::set_permissions(dir.join("keys"), fs::Permissions::from_mode(0o755)).expect("chmod");
        sshd.authorize("root");
        for attempt in 0..3 {
            sshd.port = free_port();
            let config = dir.join("sshd_config");
            write_mode(&config, &sshd.config(), 0o644);
            let log = File::create(dir.join("sshd.log")).expect("create sshd.log");
            let mut guard = ChildGuard::spawn(
                Command::new(SSHD)
                    .arg("-D")
                    .arg("-e")
                    .arg("-f")
                    .arg(&config)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log),
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if answers_ssh(sshd.port) {
                    sshd.child = Some(guard);
                    return Some(sshd);
                }
                if !guard.is_running() || Instant::now() >= deadline {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
            drop(guard);
            let log = sshd.log();
            if !(log.contains("Address already in use") && attempt < 2) {
                panic!("sshd did not start on port {}; its log:\n{log}", sshd.port);
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    /// `SetEnv SHLVL=1`: bash sources ~/.bashrc for a command run by sshd
    /// only at shell level 1 (SHLVL unset); the remote user's profile is
    /// the machine's, not ours to test, and one that prints (root's on this
    /// image runs `pyenv init`, whose rehash complains when sessions race)
    /// made the tests' quiet-stderr checks fail now and then.
    fn config(&self) -> String {
        let d = self.dir.display();
        format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {d}/host_key\n\
             PidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/keys/%u\n\
             StrictModes no\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             PermitRootLogin prohibit-password\n\
             AcceptEnv DIPUS_*\n\
             PrintMotd no\n\
             PrintLastLog no\n\
             UseDNS no\n\
             MaxStartups 100\n\
             MaxSessions 100\n\
             LogLevel INFO\n\
             SetEnv SHLVL=1\n\
             {extra}",
            port = self.port,
            extra = self.extra,
        )
    }

    /// Lets the client key log in as `user`.
    fn authorize(&self, user: &str) {
        let key = fs::read_to_string(self.dir.join("client_key.pub")).expect("read client key");
        write_mode(&self.dir.join("keys").join(user), &key, 0o644);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client's private key, authorised for root and every TestUser.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("client_key")
    }

    /// sshd's log so far (its stderr, `-e`).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// ssh and its options (no host), as separate arguments.
    pub fn ssh_args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec!["ssh".into(), "-F".into(), "/dev/null".into()];
        args.extend(["-i".into(), self.key_path().display().to_string()]);
        args.extend(["-p".into(), self.port.to_string()]);
        for opt in [
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "LogLevel=ERROR",
            "BatchMode=yes",
            "IdentitiesOnly=yes",
            "ConnectTimeout=10",
        ] {
            args.extend(["-o".into(), opt.into()]);
        }
        args
    }

    /// The same as one string, e.g. for DIPUS_SSH (temp paths hold no
    /// spaces, so plain joining is safe).
    pub fn ssh_command(&self) -> String {
        self.ssh_args().join(" ")
    }

    /// `ssh ... <user>@127.0.0.1 <remote...>` as a Command.
    pub fn command<I, S>(&self, user: &str, remote: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args = self.ssh_args();
        let mut cmd = Command::new(&args[0]);
        cmd.args(&args[1..]).arg(format!("{user}@127.0.0.1")).args(remote);
        cmd
    }

    /// Creates a real unprivileged user `<tag><pid>x<k>` (shell /bin/sh,
    /// home made, login by key only) whom the client key may log in as.
    /// `tag`: 1 to 12 lowercase letters, e.g. "dpu".
    pub fn add_user(&self, tag: &str) -> TestUser {
        assert!(
            (1..=12).contains(&tag.len()) && tag.bytes().all(|b| b.is_ascii_lowercase()),
            "add_user tag {tag:?}: 1-12 lowercase letters"
        );
        let name = format!("{tag}{}x{}", std::process::id(), next_id());
        let user = TestUser::create(&name);
        self.authorize(&name);
        user
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // The guard also kills the per-connection sshd processes and the
        // sessions under them.
        self.child.take();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A real account; Drop kills its processes and removes it with its home.
pub struct TestUser {
    name: String,
}

/// useradd/userdel lock /etc/passwd and fail rather than wait when another
/// one holds the lock: serialise them here, and retry for other processes.
fn user_tool(args: &[&str]) -> Result<(), String> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut last = String::new();
    for _ in 0..20 {
        let out = try_run_with_timeout(Command::new(args[0]).args(&args[1..]), None, DEFAULT_TIMEOUT)?;
        if out.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        if !last.contains("lock") {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{}: {last}", args.join(" ")))
}

impl TestUser {
    fn create(name: &str) -> TestUser {
        assert!(name.len() <= 31, "user name {name:?} too long");
        // Password "*": no password login, but not "locked" ("!"), which
        // sshd refuses outright when UsePAM is off.
        user_tool(&["useradd", "-m", "-s", "/bin/sh", "-p", "*", name]).unwrap_or_else(|e| panic!("{e}"));
        TestUser { name: name.into() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Home directory, from /etc/passwd.
    pub fn home(&self) -> PathBuf {
        let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 5 && f[0] == self.name)
            .map(|f| PathBuf::from(f[5]))
            .unwrap_or_else(|| panic!("user {} not in /etc/passwd", self.name))
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = try_run_with_timeout(Command::new("pkill").args(["-9", "-u", &self.name]), None, DEFAULT_TIMEOUT);
        // -f: a process killed a moment ago may not be gone yet.
        let _ = user_tool(&["userdel", "-r", "-f", &self.name]);
    }
}
