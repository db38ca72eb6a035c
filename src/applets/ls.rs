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

use crate::error::Error;
use crate::probe;
use crate::selector::{Selector, Target};
use crate::tree::{Service, Tree};
use crate::watch::{Change, TreeWatcher};

#[derive(FromArgs)]
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
    for text in &args.selectors {
        let target = Target::parse(text)?;
        if let Some(remote) = target.remote {
            return Err(Error::Usage(format!("{remote}: remote listing is not supported by this build")));
        }
        selectors.push(target.selector);
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
    let services: Vec<Service> = tree.list()?.into_iter().filter(|s| selected(s)).collect();
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(render(&services, &format).as_bytes());
    Ok(())
}

fn render(services: &[Service], format: &Format) -> String {
    let rows: Vec<Vec<String>> = services.iter().map(|service| row(service, format)).collect();
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
fn row(service: &Service, format: &Format) -> Vec<String> {
    let mut fields = Vec::new();
    if format.long {
        match std::fs::symlink_metadata(&service.full) {
            Ok(meta) => {
                fields.push(format!("{:04o}", meta.mode() & 0o7777));
                fields.push(user_name(meta.uid()));
                fields.push(group_name(meta.gid()));
            }
            Err(_) => fields.extend(["?", "?", "?"].map(String::from)),
        }
        fields.push(probe::probe(&service.full).label().to_string());
    }
    if format.full {
        fields.push(service.full.display().to_string());
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
    let mut out = std::io::stdout().lock();
    let terminal = std::io::stdout().is_terminal();
    let redraw = |out: &mut std::io::StdoutLock, watcher: &TreeWatcher| {
        let services: Vec<Service> = watcher.current().into_iter().filter(|s| selected(s)).collect();
        // Home, clear to the end of the screen, table.
        write!(out, "\x1b[H\x1b[2J{}", render(&services, format)).and_then(|()| out.flush()).is_ok()
    };
    if terminal {
        if !redraw(&mut out, &watcher) {
            return Ok(());
        }
    } else {
        let mut text = String::new();
        for service in watcher.current().iter().filter(|s| selected(s)) {
            text.push_str(&format!("+ {}\n", service.full.display()));
        }
        text.push_str("= synced\n");
        if out.write_all(text.as_bytes()).and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
    loop {
        let changes = watcher.wait_changes().map_err(|e| Error::io("cannot read changes", e))?;
        if terminal {
            if !redraw(&mut out, &watcher) {
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
        if out.write_all(text.as_bytes()).and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
}
