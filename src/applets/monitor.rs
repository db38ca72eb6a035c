//! dipus-service-monitor — report services appearing and vanishing.
//!
//! Usage: dipus-service-monitor [--initial] [SELECTOR]
//!
//! Prints `+ PATH` when a service matching SELECTOR (default: all) appears
//! anywhere in the tree, and `- PATH` when it vanishes, PATH being the full
//! socket path; one line each, flushed at once. With `--initial`, the
//! services present at start are printed first as `+` lines, followed by
//! `= synced`. Event-driven (inotify), including directories made later.

use std::io::Write;

use argh::FromArgs;

use crate::applets::written;
use crate::error::Error;
use crate::selector::Selector;
use crate::tree::Tree;
use crate::watch::{Change, TreeWatcher};

#[derive(FromArgs)]
#[argh(help_triggers("--help"))]
/// Print + PATH / - PATH as services matching SELECTOR appear and vanish.
struct Args {
    /// first print the services present now, then "= synced"
    #[argh(switch)]
    initial: bool,
    /// which services to report (default: all)
    #[argh(positional)]
    selector: Option<String>,
}

pub fn main(name: &str, args: &[&str]) -> Result<(), Error> {
    let args: Args = crate::applets::parse_args(name, args);
    let text = args.selector.as_deref().unwrap_or("");
    if !text.starts_with('/') && text.contains("://") {
        // Read as a selector, a URI would only be called an invalid one.
        return Err(Error::Usage(format!(
            "{text:?} is a URI, and the monitor watches this host's tree only: it takes a selector \
             (dls -w URI watches another host's services)"
        )));
    }
    let selector = Selector::parse(text)?;
    let tree = Tree::from_env()?;
    tree.ensure_root()?;
    let mut watcher =
        TreeWatcher::new(&tree).map_err(|e| Error::io(format!("cannot watch {}", tree.root().display()), e))?;
    watcher.follow_root();
    let mut out = std::io::stdout().lock();
    let mut emit = |line: String| written(writeln!(out, "{line}").and_then(|()| out.flush()));
    if args.initial {
        for service in watcher.current() {
            if selector.matches(&service.path, &service.full) && !emit(format!("+ {}", service.full.display()))? {
                return Ok(());
            }
        }
        if !emit("= synced".into())? {
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
        for change in changes {
            let line = match &change {
                Change::Added(service) if selector.matches(&service.path, &service.full) => {
                    format!("+ {}", service.full.display())
                }
                Change::Removed(service) if selector.matches(&service.path, &service.full) => {
                    format!("- {}", service.full.display())
                }
                _ => continue,
            };
            // A closed stdout ends the monitor quietly.
            if !emit(line)? {
                return Ok(());
            }
        }
    }
}
