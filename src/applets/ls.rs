//! dls — list services.
//!
//! Usage: dls [-1] [-f] [-l] [-w] [SELECTOR|URI…]
//!
//! Lists the services matching any SELECTOR (default: all), in preference
//! order (scope, protocol, name, host, instance). The default is an aligned
//! table NAME HOST INST PROTOCOL SCOPE. `-1` prints one service per line
//! (`PROTOCOL/NAME.HOST..N`), `-f` the full socket path instead (so
//! `socat - UNIX-CONNECT:$(dls -1 -f lame)` works), `-l` adds mode, owner,
//! group and whether something listens (alive, dead, unknown).
//!
//! `-w` keeps watching: on a terminal the table is redrawn in place as
//! services come and go; otherwise the services present are printed as
//! `+ PATH` lines, then `= synced`, then `+ PATH` / `- PATH` as they change.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;

use argh::FromArgs;

use crate::applets::written;
use crate::error::Error;
use crate::name::ServicePath;
use crate::probe;
use crate::selector::{Remote, Selector, Target};
use crate::sep_client::Server;
use crate::ssh::SshTarget;
use crate::tree::{Service, Tree};
use crate::watch::{Change, TreeWatcher};

#[derive(FromArgs)]
#[argh(help_triggers("--help"))]
/// List services matching the SELECTORs (default: all).
struct Args {
    /// one service per line
    #[argh(switch, short = '1')]
    one: bool,
    /// full socket paths
    #[argh(switch, short = 'f')]
    full: bool,
    /// long listing: mode, owner, group, alive
    #[argh(switch, short = 'l')]
    long: bool,
    /// keep watching: redraw (terminal) or print +/- lines
    #[argh(switch, short = 'w')]
    watch: bool,
    /// selectors or URIs
    #[argh(positional, greedy)]
    selectors: Vec<String>,
}

struct Format {
    one: bool,
    full: bool,
    long: bool,
}

pub fn main(name: &str, args: &[&str]) -> Result<(), Error> {
    let args: Args = crate::applets::parse_args(name, args);
    let mut selectors = Vec::new();
    let mut remotes = Vec::new();
    for text in &args.selectors {
        let target = Target::parse(text)?;
        match target.remote {
            Some(Remote::Sep { host, port }) => {
                remotes.push((RemoteHost::Sep(Server::new(&host, port)), target.selector))
            }
            Some(Remote::Ssh { user, host, port }) => {
                remotes.push((RemoteHost::Ssh(SshTarget { user, host, port }), target.selector))
            }
            None => selectors.push(target.selector),
        }
    }
    let format = Format { one: args.one, full: args.full, long: args.long };
    // `dls >&-` fails writing its listing, as ls does, not silently.
    crate::stdio::reclose();
    if !remotes.is_empty() {
        if !selectors.is_empty() {
            return Err(Error::Usage("list either local selectors or remote URIs, not both".into()));
        }
        return list_remote(name, &remotes, &format, args.watch);
    }
    if selectors.is_empty() {
        selectors.push(Selector::All);
    }
    let format = Format { one: args.one, full: args.full, long: args.long };
    let tree = Tree::from_env()?;
    let selected = |service: &Service| selectors.iter().any(|s| s.matches(&service.path, &service.full));
    if args.watch {
        return watch(&tree, &format, selected);
    }
    let services: Vec<Listed> = tree.list()?.iter().filter(|s| selected(s)).map(Listed::local).collect();
    let mut out = crate::stdio::Stdout;
    written(out.write_all(render(&services, &format).as_bytes()).and_then(|()| out.flush()))?;
    Ok(())
}

/// A service as listed: in the local tree, or on a remote host.
#[derive(Clone)]
struct Listed {
    scope: String,
    path: ServicePath,
    /// The full socket path, or the URI.
    location: String,
    /// Where to look for mode and owner (`-l`): local services only.
    local: Option<std::path::PathBuf>,
}

impl Listed {
    fn local(service: &Service) -> Listed {
        Listed {
            scope: service.scope.to_string(),
            path: service.path.clone(),
            location: service.full.display().to_string(),
            local: Some(service.full.clone()),
        }
    }

    fn remote(host: &RemoteHost, wire: &str) -> Option<Listed> {
        let (scope, relative) = match host {
            RemoteHost::Sep(server) => (format!("sep://{}", server.authority()), wire),
            RemoteHost::Ssh(ssh) => {
                let (scope, relative) = wire.split_once('/')?;
                (format!("{}/{scope}", ssh.uri()), relative)
            }
        };
        Some(Listed {
            scope,
            path: ServicePath::parse(relative).ok()?,
            location: format!("{}/{wire}", host.uri()),
            local: None,
        })
    }
}

/// A host listed over SEP or over ssh.
enum RemoteHost {
    Sep(Server),
    Ssh(SshTarget),
}

impl RemoteHost {
    fn uri(&self) -> String {
        match self {
            RemoteHost::Sep(server) => format!("sep://{}", server.authority()),
            RemoteHost::Ssh(ssh) => ssh.uri(),
        }
    }

    fn list(&self, selector: &Selector) -> Result<Vec<String>, Error> {
        let argument = crate::transport::selector_argument(selector);
        Ok(match self {
            RemoteHost::Sep(server) => server.list(argument.as_deref())?,
            RemoteHost::Ssh(ssh) => ssh.list(&Tree::from_env()?, argument.as_deref())?,
        })
    }
}

fn list_remote(name: &str, remotes: &[(RemoteHost, Selector)], format: &Format, watch: bool) -> Result<(), Error> {
    if watch {
        let [(host, selector)] = remotes else {
            return Err(Error::Usage("-w follows one remote host at a time".into()));
        };
        return watch_remote(name, host, selector, format);
    }
    let mut services = Vec::new();
    for (host, selector) in remotes {
        services.extend(host.list(selector)?.iter().filter_map(|wire| Listed::remote(host, wire)));
    }
    let mut out = crate::stdio::Stdout;
    written(out.write_all(render(&services, format).as_bytes()).and_then(|()| out.flush()))?;
    Ok(())
}

/// `dls -w sep://…`: the WATCH stream, as a redrawn table on a terminal
/// or as +/- lines with URIs.
fn watch_remote(name: &str, host: &RemoteHost, selector: &Selector, format: &Format) -> Result<(), Error> {
    use crate::sep::{Event, Request};
    let request = Request::Watch(crate::transport::selector_argument(selector));
    // Either kind of stream ends up as one descriptor to read lines from;
    // the connection (or ssh process) lives as long as `_keep`.
    let (fd, _keep): (std::os::fd::RawFd, Box<dyn std::any::Any>) = match host {
        RemoteHost::Sep(server) => {
            let stream = server.request(&request)?;
            (std::os::fd::AsRawFd::as_raw_fd(&stream), Box::new(stream))
        }
        RemoteHost::Ssh(ssh) => {
            let channel = ssh.request(&Tree::from_env()?, &request)?;
            (std::os::fd::AsRawFd::as_raw_fd(&channel.output), Box::new(channel))
        }
    };
    let mut lines = crate::sep_client::LineStream::new(fd);
    // A silent exporter is gone: three keepalives missed.
    let silence = std::time::Duration::from_secs(3 * crate::sep::KEEPALIVE_SECS);
    let terminal = std::io::stdout().is_terminal();
    let mut current: std::collections::BTreeMap<String, Listed> = std::collections::BTreeMap::new();
    let mut synced = false;
    // Said once: more services than a client keeps.
    let mut over_cap = false;
    let mut out = crate::stdio::Stdout;
    loop {
        let line = match lines.next_line(silence, libc::STDOUT_FILENO) {
            Ok(Some(line)) => line,
            Ok(None) => return Err(Error::Failed(format!("{}: the watch was closed", host.uri()))),
            // Our reader went away: end quietly.
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(error) => return Err(Error::io(format!("{}: watch lost", host.uri()), error)),
        };
        let event = Event::parse(&line).map_err(|e| Error::Failed(format!("{}: {e}", host.uri())))?;
        let text = match event {
            Event::Keepalive => continue,
            Event::Synced => {
                synced = true;
                "= synced\n".to_string()
            }
            Event::Added(wire) if current.len() >= crate::sep::MAX_SERVICES && !current.contains_key(&wire) => {
                if !over_cap {
                    over_cap = true;
                    let limit = crate::sep::MAX_SERVICES;
                    crate::applets::eprint_quietly(&format!(
                        "{name}: {}: it offers more than {limit} services; following the first {limit} only\n",
                        host.uri()
                    ));
                }
                continue;
            }
            Event::Added(wire) => match Listed::remote(host, &wire) {
                Some(listed) => {
                    let text = format!("+ {}\n", listed.location);
                    current.insert(wire, listed);
                    text
                }
                None => continue,
            },
            Event::Removed(wire) => match current.remove(&wire) {
                Some(listed) => format!("- {}\n", listed.location),
                None => continue,
            },
        };
        let result = if terminal {
            if !synced {
                continue;
            }
            let services: Vec<Listed> = current.values().cloned().collect();
            write!(out, "\x1b[H\x1b[2J{}", render(&services, format))
        } else {
            out.write_all(text.as_bytes())
        };
        if !written(result.and_then(|()| out.flush()))? {
            return Ok(());
        }
    }
}

fn render(services: &[Listed], format: &Format) -> String {
    // Asked once: whether each socket has a listener, without connecting
    // (a connection would start a child of an inetd-style service).
    let listening = if format.long { probe::listening_inodes() } else { None };
    let rows: Vec<Vec<String>> = services.iter().map(|service| row(service, format, listening.as_ref())).collect();
    if format.one {
        return rows.iter().map(|row| row.join(" ") + "\n").collect();
    }
    let mut header: Vec<String> = Vec::new();
    if format.long {
        header.extend(["MODE", "OWNER", "GROUP", "STATE"].map(String::from));
    }
    if format.full {
        header.push("PATH".into());
    } else {
        header.extend(["NAME", "HOST", "INST", "PROTOCOL", "SCOPE"].map(String::from));
    }
    align(std::iter::once(header).chain(rows).collect())
}

/// The fields of one service: the long fields, then the path (`-f`, `-1`)
/// or the name columns.
fn row(service: &Listed, format: &Format, listening: Option<&std::collections::HashSet<u64>>) -> Vec<String> {
    let mut fields = Vec::new();
    if format.long {
        let meta = service.local.as_ref().and_then(|path| std::fs::symlink_metadata(path).ok());
        match meta {
            Some(meta) => {
                fields.push(format!("{:04o}", meta.mode() & 0o7777));
                fields.push(user_name(meta.uid()));
                fields.push(group_name(meta.gid()));
            }
            None => fields.extend(["-", "-", "-"].map(String::from)),
        }
        let state = match &service.local {
            Some(path) => probe::judge(path, listening).label(),
            None => "-",
        };
        fields.push(state.to_string());
    }
    if format.full {
        fields.push(service.location.clone());
    } else if format.one {
        fields.push(service.path.to_string());
    } else {
        fields.push(service.path.file.name.clone());
        fields.push(service.path.file.host.clone());
        fields.push(service.path.file.index.to_string());
        fields.push(service.path.protocol.to_string());
        fields.push(service.scope.to_string());
    }
    fields
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(uid.into()).ok().flatten().map(|u| u.name).unwrap_or_else(|| uid.to_string())
}

fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(gid.into()).ok().flatten().map(|g| g.name).unwrap_or_else(|| gid.to_string())
}

/// Columns padded to their widest cell, the last one unpadded.
fn align(rows: Vec<Vec<String>>) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..columns).map(|c| rows.iter().filter_map(|r| r.get(c)).map(String::len).max().unwrap_or(0)).collect();
    let mut text = String::new();
    for row in &rows {
        let last = row.len().saturating_sub(1);
        for (column, cell) in row.iter().enumerate() {
            if column == last {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[column]));
            }
        }
        text.push('\n');
    }
    text
}

fn watch(tree: &Tree, format: &Format, selected: impl Fn(&Service) -> bool) -> Result<(), Error> {
    tree.ensure_root()?;
    let mut watcher =
        TreeWatcher::new(tree).map_err(|e| Error::io(format!("cannot watch {}", tree.root().display()), e))?;
    watcher.follow_root();
    let mut out = crate::stdio::Stdout;
    let terminal = std::io::stdout().is_terminal();
    let redraw = |out: &mut crate::stdio::Stdout, watcher: &TreeWatcher| {
        let services: Vec<Listed> = watcher.current().iter().filter(|s| selected(s)).map(Listed::local).collect();
        // Home, clear to the end of the screen, table.
        write!(out, "\x1b[H\x1b[2J{}", render(&services, format)).and_then(|()| out.flush())
    };
    if terminal {
        if !written(redraw(&mut out, &watcher))? {
            return Ok(());
        }
    } else {
        let mut text = String::new();
        for service in watcher.current().iter().filter(|s| selected(s)) {
            text.push_str(&format!("+ {}\n", service.full.display()));
        }
        text.push_str("= synced\n");
        if !written(out.write_all(text.as_bytes()).and_then(|()| out.flush()))? {
            return Ok(());
        }
    }
    loop {
        let changes = match watcher.wait_changes(libc::STDOUT_FILENO) {
            Ok(changes) => changes,
            // Our reader went away: end quietly.
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(error) => return Err(Error::io("cannot read changes", error)),
        };
        if terminal {
            if !written(redraw(&mut out, &watcher))? {
                return Ok(());
            }
            continue;
        }
        let mut text = String::new();
        for change in changes {
            match change {
                Change::Added(service) if selected(&service) => {
                    text.push_str(&format!("+ {}\n", service.full.display()))
                }
                Change::Removed(service) if selected(&service) => {
                    text.push_str(&format!("- {}\n", service.full.display()))
                }
                _ => {}
            }
        }
        if !written(out.write_all(text.as_bytes()).and_then(|()| out.flush()))? {
            return Ok(());
        }
    }
}
