//! dipus-exporter — offer `exported/` to the LAN over SEP/1.
//!
//! Usage: dipus-exporter [--port PORT] [--bind ADDR]… [--allow CIDR]…
//!                       [--max-conns N] [--user NAME]
//!
//! Serves LIST, CONNECT and WATCH (doc/sep.md) on TCP port 7347 (or
//! `--port`, or `DIPUS_PORT`) on every `--bind` address (default 0.0.0.0),
//! to peers in the `--allow` networks (default: the networks of this host's
//! interfaces, and loopback). Only sockets in `exported/` whose mode lets
//! "other" connect are offered. At most `--max-conns` connections (default
//! 1024) are served at once; more are answered 503. With `--user`, drops
//! to that user after binding.
//!
//! Warning: an exported socket is open to everyone the allow list admits,
//! with the exporter's identity as its peer. Never export a socket that
//! grants root-equivalent power (a container engine's, for example).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use argh::FromArgs;
use nix::sys::signal::Signal;

use crate::allow::AllowList;
use crate::error::Error;
use crate::exporter::{self, Exporter, ExporterConfig};
use crate::signals::SignalPipe;
use crate::tree::Tree;

#[derive(FromArgs)]
#[argh(help_triggers("--help"))]
/// Serve exported/ over SEP/1 on TCP.
struct Args {
    /// TCP port (default: $DIPUS_PORT or 7347)
    #[argh(option)]
    port: Option<u16>,
    /// address to listen on (repeatable; default 0.0.0.0)
    #[argh(option)]
    bind: Vec<IpAddr>,
    /// network allowed to connect, CIDR (repeatable; default: the host's own networks and loopback)
    #[argh(option)]
    allow: Vec<String>,
    /// most connections served at once (default 1024)
    #[argh(option, default = "1024")]
    max_conns: usize,
    /// user to run as after binding
    #[argh(option)]
    user: Option<String>,
}

/// The SEP port: `--port`, else `DIPUS_PORT`, else 7347.
pub fn port(explicit: Option<u16>) -> Result<u16, Error> {
    if let Some(port) = explicit {
        return Ok(port);
    }
    Ok(crate::settings::port("DIPUS_PORT", crate::sep::DEFAULT_PORT)?)
}

/// `--max-conns`: an exporter capped at 0 would refuse every connection.
pub fn max_connections(cap: usize) -> Result<usize, Error> {
    match cap {
        0 => Err(Error::Usage("--max-conns must be at least 1".into())),
        cap => Ok(cap),
    }
}

/// Drops root for `user`: its groups, then its gid, then its uid.
pub fn drop_privileges(user: &str) -> Result<(), Error> {
    use nix::unistd::{setgid, setgroups, setuid, User};
    let account = User::from_name(user).ok().flatten().ok_or_else(|| Error::Usage(format!("no such user {user:?}")))?;
    let failed = |e: nix::errno::Errno| Error::io(format!("cannot become {user}"), e.into());
    setgroups(&[account.gid]).map_err(failed)?;
    setgid(account.gid).map_err(failed)?;
    setuid(account.uid).map_err(failed)?;
    Ok(())
}

pub fn main(name: &str, args: &[&str]) -> Result<(), Error> {
    let args: Args = crate::applets::parse_args(name, args);
    let port = port(args.port)?;
    let max_connections = max_connections(args.max_conns)?;
    let allow = AllowList::from_args(&args.allow).map_err(|e| Error::Usage(e.to_string()))?;
    let binds = if args.bind.is_empty() { vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)] } else { args.bind };
    let listen: Vec<SocketAddr> = binds.into_iter().map(|ip| SocketAddr::new(ip, port)).collect();
    crate::net::raise_fd_limit();
    let tree = Tree::from_env()?;
    let signals = SignalPipe::new(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP])
        .map_err(|e| Error::io("cannot set up signal handling", e))?;
    let mut exporter = Exporter::new(tree, ExporterConfig { listen, allow, max_connections })
        .map_err(|e| Error::io("cannot start the exporter", e))?;
    if let Some(user) = &args.user {
        drop_privileges(user)?;
    }
    log::info!("serving SEP/1 on {:?}", exporter.local_addresses());
    exporter::run(&mut exporter, &signals).map_err(|e| Error::io("exporter failed", e))
}
