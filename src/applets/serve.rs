//! dipus serve --stdio — one SEP/1 request on stdin and stdout.
//!
//! Usage: dipus serve --stdio
//!
//! Reads one request line on stdin (LIST, CONNECT, WATCH or PING, as in
//! doc/sep.md) and answers on stdout; for CONNECT, stdin and stdout are then
//! relayed to the service. This is what `ssh://` runs on the remote host,
//! as the authenticated user: it sees `local/`, `exported/` and that user's
//! own scope, paths start with the scope directory (`local/text/x.h..0`),
//! and the kernel checks every connect with the user's permissions.

use std::fs::File;
use std::io::{self, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Duration;

use argh::FromArgs;

use crate::error::Error;
use crate::relay::{self, Relay};
use crate::sep::{self, Event, Request, Status, StatusLine};
use crate::sep_server::View;
use crate::tree::Tree;
use crate::watch::{Change, TreeWatcher};

#[derive(FromArgs)]
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
    let view = View::User(Tree::own_scope()?);
    let line = match sep::read_line(&mut *raw(libc::STDIN_FILENO), sep::MAX_REQUEST_LINE) {
        Ok(line) => line,
        Err(error) => {
            send(&StatusLine::with_detail(Status::BadRequest, &error.to_string()).to_line())?;
            return Err(Error::Failed(error.to_string()));
        }
    };
    let request = match Request::parse(&line) {
        Ok(request) => request,
        Err(error) => return send(&StatusLine::with_detail(Status::BadRequest, &error.to_string()).to_line()),
    };
    match request {
        Request::Ping => send(&StatusLine::new(Status::Ok).to_line()),
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
        Request::Connect(path) => match view.open(&tree, &path) {
            Ok(stream) => {
                send(&StatusLine::new(Status::Ok).to_line())?;
                let socket = stream.as_raw_fd();
                let mut relay = Relay::new(&[libc::STDIN_FILENO], socket, socket, libc::STDOUT_FILENO);
                relay::run_until(&mut relay, Relay::is_done).map_err(|e| Error::io("relay failed", e))
            }
            Err(status) => send(&status.to_line()),
        },
        Request::Watch(argument) => match View::selector(argument.as_deref()) {
            Ok(selector) => watch(&tree, &view, &selector),
            Err(status) => send(&status.to_line()),
        },
    }
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
        let mut fds = [
            libc::pollfd { fd: watcher.fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: libc::STDIN_FILENO, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: a valid array of two pollfds.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, keepalive.as_millis() as libc::c_int) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("poll failed", error));
        }
        if fds[1].revents != 0 {
            // The client has nothing to say on a WATCH: input or EOF on
            // stdin means it is going away.
            return Ok(());
        }
        let mut text = String::new();
        if ready == 0 {
            text.push_str(&Event::Keepalive.to_line());
        }
        for change in watcher.read_changes().map_err(|e| Error::io("cannot read changes", e))? {
            match change {
                Change::Added(service) if selector.matches(&service.path, &service.full) => {
                    if let Some(wire) = view.wire_path(&service) {
                        if announced.insert(wire.clone()) {
                            text.push_str(&Event::Added(wire).to_line());
                        }
                    }
                }
                Change::Removed(service) => {
                    let wire = format!("{}/{}", service.scope, service.path);
                    if announced.remove(&wire) {
                        text.push_str(&Event::Removed(wire).to_line());
                    }
                }
                Change::Added(_) => {}
            }
        }
        if !text.is_empty() && send(&text).is_err() {
            return Ok(());
        }
    }
}
