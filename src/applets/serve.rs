//! dipus serve --stdio — one SEP/1 request on stdin and stdout.
//!
//! Usage: dipus serve --stdio
//!
//! Reads one request line on stdin (LIST, CONNECT, WATCH, PING or FORWARD,
//! as in doc/sep.md; within 10 s, or `400 request timeout`) and answers on
//! stdout; for CONNECT, stdin and stdout
//! are then relayed to the service. This is what `ssh://` runs on the remote host,
//! as the authenticated user: it sees `local/`, `exported/` and that user's
//! own scope, paths start with the scope directory (`local/text/x.h..0`),
//! and the kernel checks every connect with the user's permissions.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use argh::FromArgs;

use crate::error::Error;
use crate::net::BusyWait;
use crate::relay::{self, Relay, Way};
use crate::sep::{self, Event, Request, Status, StatusLine};
use crate::sep_server::View;
use crate::tree::Tree;
use crate::watch::TreeWatcher;

#[derive(FromArgs)]
#[argh(help_triggers("--help"))]
/// Answer one SEP/1 request on stdin/stdout (what ssh:// runs remotely).
struct Args {
    /// serve on stdin and stdout (the only mode)
    #[argh(switch)]
    stdio: bool,
}

/// Standard input or output as a File that is never closed by us, and is
/// read and written without buffering, so nothing past a request line is
/// taken from the relay.
fn raw(fd: i32) -> ManuallyDrop<File> {
    // SAFETY: fds 0 and 1 are open for the process's life; ManuallyDrop
    // keeps them open.
    ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}

/// Standard input under SEP's request deadline: a client that sends no
/// whole line in time gets `400 request timeout`, as from the exporter,
/// instead of holding its ssh session open for as long as it likes.
struct BeforeDeadline {
    until: Instant,
}

impl Read for BeforeDeadline {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        let mut poll = libc::pollfd { fd: libc::STDIN_FILENO, events: libc::POLLIN, revents: 0 };
        let timeout = left.as_millis().min(libc::c_int::MAX as u128) as libc::c_int;
        // SAFETY: poll on one live pollfd.
        match unsafe { libc::poll(&mut poll, 1, timeout) } {
            -1 => Err(io::Error::last_os_error()),
            0 => Err(io::Error::new(io::ErrorKind::TimedOut, "request timeout")),
            _ => raw(libc::STDIN_FILENO).read(buffer),
        }
    }
}

fn send(text: &str) -> Result<(), Error> {
    let mut stdout = raw(libc::STDOUT_FILENO);
    stdout.write_all(text.as_bytes()).map_err(|e| Error::io("cannot write to stdout", e))
}

pub fn main(name: &str, args: &[&str]) -> Result<(), Error> {
    let args: Args = crate::applets::parse_args(name, args);
    if !args.stdio {
        return Err(Error::Usage("serve needs --stdio".into()));
    }
    let tree = Tree::from_env()?;
    let view = View::User(Tree::own_scope());
    let mut stdin = BeforeDeadline { until: Instant::now() + Duration::from_secs(sep::REQUEST_TIMEOUT_SECS) };
    let line = match sep::read_line(&mut stdin, sep::MAX_REQUEST_LINE) {
        Ok(line) => line,
        Err(error) => {
            let why = match &error {
                sep::SepError::Io(io) if io.kind() == io::ErrorKind::TimedOut => io.to_string(),
                _ => error.to_string(),
            };
            send(&StatusLine::with_detail(Status::BadRequest, &why).to_line())?;
            return Err(Error::Failed(why));
        }
    };
    let request = match Request::parse(&line) {
        Ok(request) => request,
        Err(error) => return send(&StatusLine::with_detail(Status::BadRequest, &error.to_string()).to_line()),
    };
    match request {
        Request::Ping => send(&StatusLine::new(Status::Ok).to_line()),
        Request::Forward(selector) => forward(&tree, &view, selector.as_deref()),
        Request::List(argument) => {
            match View::selector(argument.as_deref()).and_then(|selector| view.list(&tree, &selector)) {
                Ok(paths) => {
                    let mut text = StatusLine::new(Status::Ok).to_line();
                    for path in paths {
                        text.push_str(&sep::format_list_line(&path));
                    }
                    send(&text)
                }
                Err(status) => send(&status.to_line()),
            }
        }
        Request::Connect(path) => match view
            .open(&tree, &path, Some(BusyWait::PATIENCE))
            .and_then(|opened| opened.ok_or_else(|| View::busy(&path)))
        {
            Ok(stream) => {
                send(&StatusLine::new(Status::Ok).to_line())?;
                let socket = stream.as_raw_fd();
                let mut relay = Relay::new(&[libc::STDIN_FILENO], socket, socket, libc::STDOUT_FILENO);
                // Done when both ways are, or when the service has closed
                // its socket entirely: then nothing more can reach it, and
                // only our exit lets ssh tell the client it ended (sshd
                // sends EOF once the command's stdout and stderr are both
                // closed). A service that only shut down its sending side
                // still gets everything the client sends.
                let finished = |relay: &Relay| relay.is_done() || (relay.way_done(Way::Backward) && hung_up(socket));
                relay::run_until(&mut relay, finished).map_err(|e| Error::io("relay failed", e))
            }
            Err(status) => send(&status.to_line()),
        },
        Request::Watch(argument) => match View::selector(argument.as_deref()) {
            Ok(selector) => watch(&tree, &view, &selector),
            Err(status) => send(&status.to_line()),
        },
    }
}

/// The wire paths of the services `argument` picks that listen and that
/// this user may connect to (write permission on the socket, as connect
/// checks), or why there are none: what a CONNECT of each would answer,
/// without connecting (a connection would start an inetd-style service).
fn forward_targets(tree: &Tree, view: &View, argument: &str) -> Result<Vec<String>, StatusLine> {
    let selector = View::selector(Some(argument))?;
    let services = tree.list().map_err(|error| StatusLine::with_detail(Status::Internal, &error.to_string()))?;
    let listening = crate::probe::listening_inodes();
    let mut refusal = StatusLine::with_detail(Status::NotFound, argument);
    let mut paths = Vec::new();
    for service in services.iter().filter(|service| selector.matches(&service.path, &service.full)) {
        let Some(wire) = view.wire_path(service) else {
            continue;
        };
        let Ok(meta) = std::fs::symlink_metadata(&service.full) else {
            continue;
        };
        if nix::unistd::access(&service.full, nix::unistd::AccessFlags::W_OK).is_err() {
            refusal = StatusLine::with_detail(Status::Forbidden, &format!("permission denied: {wire}"));
        } else if listening.as_ref().is_some_and(|set| !set.contains(&meta.ino())) {
            if refusal.status == Status::NotFound {
                refusal = StatusLine::with_detail(Status::Unavailable, &format!("refused: {wire}"));
            }
        } else {
            paths.push(wire);
        }
    }
    if paths.is_empty() {
        return Err(refusal);
    }
    Ok(paths)
}

/// Whether the peer of `socket` has closed it both ways.
fn hung_up(socket: i32) -> bool {
    let mut fd = libc::pollfd { fd: socket, events: 0, revents: 0 };
    // SAFETY: one valid pollfd; zero timeout.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready > 0 && fd.revents & libc::POLLHUP != 0
}

/// How long a FORWARD probe waits for the client's forwarded connection.
const PROBE_WAIT: Duration = Duration::from_secs(20);

/// FORWARD [SELECTOR]: the tree's absolute root, then a probe socket in
/// the user's own scope, then (with a selector) the absolute paths of the
/// services it picks that are listening and that this user may connect
/// to, in preference order, then `.`. The client forwards a local socket
/// to the probe through its ssh connection (`ssh -O forward -L`) and
/// connects; the status line it reads back proves that this sshd forwards
/// to sockets in this tree, so the client may let ssh carry its
/// connections without this process in the path. Ends at the first
/// connection, when stdin closes, or after [`PROBE_WAIT`].
fn forward(tree: &Tree, view: &View, selector: Option<&str>) -> Result<(), Error> {
    // Without a place for the probe (no scope of the user's, and none to
    // be made: a root not open to all), FORWARD is not offered here, and
    // is answered as a dipus without it answers: the client then uses
    // CONNECT, which needs no such place.
    let unavailable = |why: &dyn std::fmt::Display| {
        send(&StatusLine::with_detail(Status::BadRequest, &format!("forwarding unavailable: {why}")).to_line())
    };
    let scope = match tree.ensure_scope(&Tree::own_scope()) {
        Ok(scope) => scope,
        Err(error) => return unavailable(&error),
    };
    let root = std::fs::canonicalize(tree.root()).map_err(|e| Error::io("cannot resolve the tree's root", e))?;
    let targets = match selector {
        Some(argument) => match forward_targets(tree, view, argument) {
            Ok(paths) => paths.iter().map(|wire| format!("{}/{wire}\n", root.display())).collect(),
            Err(status) => return send(&status.to_line()),
        },
        None => String::new(),
    };
    let probe = std::fs::canonicalize(&scope)
        .map_err(|e| Error::io("cannot resolve the user's scope", e))?
        .join(format!(".forward-probe-{}", std::process::id()));
    let _ = std::fs::remove_file(&probe);
    let listener = match crate::net::unix_listen(&probe, 1) {
        Ok(listener) => listener,
        Err(error) => return unavailable(&format!("cannot make {}: {error}", probe.display())),
    };
    struct Remove<'a>(&'a std::path::Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _remove = Remove(&probe);
    let mut text = StatusLine::new(Status::Ok).to_line();
    text.push_str(&format!("{}\n{}\n{targets}.\n", root.display(), probe.display()));
    send(&text)?;
    let deadline = std::time::Instant::now() + PROBE_WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        let Some((probe_ready, stdin_ready)) = wait_for(listener.as_raw_fd(), left)? else {
            continue;
        };
        if probe_ready {
            if let Ok((mut stream, _)) = listener.accept() {
                let _ = stream.set_nonblocking(false);
                let _ = stream.write_all(StatusLine::new(Status::Ok).to_line().as_bytes());
                return Ok(());
            }
        }
        if stdin_ready {
            return Ok(());
        }
    }
}

/// Waits up to `timeout` for `fd` or stdin to be readable (or closed):
/// which of the two are, or `None` if interrupted by a signal.
fn wait_for(fd: i32, timeout: Duration) -> Result<Option<(bool, bool)>, Error> {
    let mut fds = [
        libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: libc::STDIN_FILENO, events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: a valid array of two pollfds.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout.as_millis().min(60_000) as libc::c_int) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::Interrupted {
            return Ok(None);
        }
        return Err(Error::io("poll failed", error));
    }
    Ok(Some((fds[0].revents != 0, fds[1].revents != 0)))
}

/// The WATCH stream until the client goes away (stdin closes or stdout
/// breaks).
fn watch(tree: &Tree, view: &View, selector: &crate::selector::Selector) -> Result<(), Error> {
    tree.ensure_root()?;
    let mut watcher = TreeWatcher::new(tree).map_err(|e| Error::io("cannot watch the tree", e))?;
    let mut announced = std::collections::HashSet::new();
    let mut text = StatusLine::new(Status::Ok).to_line();
    for service in watcher.current() {
        if let Some(wire) = view.wire_path(&service).filter(|_| selector.matches(&service.path, &service.full)) {
            text.push_str(&Event::Added(wire.clone()).to_line());
            announced.insert(wire);
        }
    }
    text.push_str(&Event::Synced.to_line());
    if send(&text).is_err() {
        return Ok(());
    }
    let keepalive = Duration::from_secs(sep::KEEPALIVE_SECS);
    loop {
        let Some((changed, stdin_ready)) = wait_for(watcher.fd(), keepalive)? else {
            continue;
        };
        if stdin_ready {
            // The client has nothing to say on a WATCH: input or EOF on
            // stdin means it is going away.
            return Ok(());
        }
        let mut text = String::new();
        if !changed {
            text.push_str(&Event::Keepalive.to_line());
        }
        for change in watcher.read_changes().map_err(|e| Error::io("cannot read changes", e))? {
            if let Some(event) = view.watch_event(&change, selector, &mut announced) {
                text.push_str(&event.to_line());
            }
        }
        if !text.is_empty() && send(&text).is_err() {
            return Ok(());
        }
    }
}
