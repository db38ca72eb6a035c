//! dipus-discoverer — find exporters on the LAN.
//!
//! Usage: dipus-discoverer [-t SECONDS] [-w]
//!
//! Broadcasts a QUERY and listens for announcements (UDP port 7347, or
//! `DIPUS_DISCOVERY_PORT`). Prints `HOST ADDR PORT` for every exporter
//! heard of within `-t` seconds (default 2), sorted by host, and exits.
//! With `-w` it keeps listening and prints `+ HOST ADDR PORT` when an
//! exporter appears and `- HOST` when it says bye or its announcements
//! expire.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use argh::FromArgs;
use mio::{Events, Interest, Poll, Token};

use crate::discovery::{Discovery, PeerEvent};
use crate::error::Error;

#[derive(FromArgs)]
#[argh(help_triggers("--help"))]
/// Find exporters on the LAN and print HOST ADDR PORT.
struct Args {
    /// seconds to listen, e.g. 2 or 0.5 (default 2)
    #[argh(option, short = 't', default = "String::from(\"2\")")]
    time: String,
    /// keep listening, printing + and - lines
    #[argh(switch, short = 'w')]
    watch: bool,
}

/// `2`, `0.5`, `1.25`: seconds with up to millisecond precision, parsed
/// without floating point (which would cost the static binary its size).
fn parse_seconds(text: &str) -> Option<Duration> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.len() > 3 {
        return None;
    }
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(fraction) {
        return None;
    }
    let seconds: u64 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let millis: u64 = format!("{fraction:0<3}").parse().ok()?;
    Some(Duration::from_secs(seconds) + Duration::from_millis(millis))
}

pub fn main(name: &str, args: &[&str]) -> Result<(), Error> {
    let args: Args = crate::applets::parse_args(name, args);
    let listen = parse_seconds(&args.time)
        .filter(|d| !d.is_zero() && *d < Duration::from_secs(86400))
        .ok_or_else(|| Error::Usage(format!("-t {}: expected seconds, more than 0, e.g. 2 or 0.5", args.time)))?;
    let host = crate::applets::host_name()?;
    let mut discovery = Discovery::new(&host, None, crate::applets::discovery_port()?)
        .map_err(|e| Error::io("cannot listen for exporters", e))?;
    let mut poll = Poll::new().map_err(|e| Error::io("cannot create an event loop", e))?;
    for (index, fd) in discovery.fds().iter().enumerate() {
        poll.registry()
            .register(&mut mio::unix::SourceFd(fd), Token(index), Interest::READABLE)
            .map_err(|e| Error::io("cannot create an event loop", e))?;
    }
    // Lines are printed only as exporters come and go: without this, a
    // reader that left would be noticed at the next change, maybe never.
    let output = Token(discovery.fds().len());
    if args.watch {
        crate::event_loop::register_output(poll.registry(), libc::STDOUT_FILENO, output);
    }
    discovery.query();
    let deadline = (!args.watch).then(|| Instant::now() + listen);
    let mut events = Events::with_capacity(16);
    let mut out = io::stdout().lock();
    loop {
        let now = Instant::now();
        if deadline.is_some_and(|deadline| now >= deadline) {
            break;
        }
        let timeout =
            crate::event_loop::earliest(discovery.timeout(), deadline.map(|d| d.saturating_duration_since(now)));
        crate::event_loop::wait(&mut poll, &mut events, timeout).map_err(|e| Error::io("event loop failed", e))?;
        if events.iter().any(|event| event.token() == output && crate::event_loop::output_gone(event)) {
            return Ok(());
        }
        if events.iter().any(|event| event.token() != output) {
            discovery.handle_readable();
        }
        discovery.handle_timers();
        if args.watch {
            for event in discovery.take_events() {
                let line = match event {
                    PeerEvent::Joined(peer) => format!("+ {} {} {}", peer.host, peer.address, peer.port),
                    PeerEvent::Left { host, .. } => format!("- {host}"),
                    PeerEvent::Heard { .. } => continue,
                };
                if !crate::applets::written(writeln!(out, "{line}").and_then(|()| out.flush()))? {
                    return Ok(());
                }
            }
        }
    }
    let mut text = String::new();
    for peer in discovery.peers() {
        text.push_str(&format!("{} {} {}\n", peer.host, peer.address, peer.port));
    }
    crate::applets::written(out.write_all(text.as_bytes()).and_then(|()| out.flush()))?;
    if discovery.drops.total() > 0 {
        log::info!("dropped datagrams: {:?}", discovery.drops.by_reason);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_parse_exactly() {
        assert_eq!(parse_seconds("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_seconds("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_seconds(".25"), Some(Duration::from_millis(250)));
        assert_eq!(parse_seconds("1.125"), Some(Duration::from_millis(1125)));
        for bad in ["", ".", "-1", "1.2345", "1e3", "x", "1.-2"] {
            assert_eq!(parse_seconds(bad), None, "{bad:?}");
        }
    }
}
