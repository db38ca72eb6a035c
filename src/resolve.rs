//! Host names turned into addresses without stalling an event loop.
//! getaddrinfo(3) blocks for as long as the resolver takes (a nameserver
//! that does not answer costs 5 s per try, per server, and more), and
//! dipusd's exporter, discovery and every import share one loop: a
//! `--host sep://NAME` with a slow nameserver would stall all of them at
//! every retry. So a name is looked up in a forked child (see `forked`),
//! and an address literal needs no lookup at all.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::forked::Forked;

/// A lookup with no answer by then is given up (its child killed). The C
/// libraries' defaults (5 s per try, two tries, each nameserver in turn)
/// end most lookups well before.
pub const LOOKUP_LIMIT: Duration = Duration::from_secs(30);

/// What resolving a host starts with.
pub enum Resolution {
    /// An address literal: here already.
    Done(Vec<SocketAddr>),
    /// A name: the answer comes later.
    Pending(Lookup),
}

/// `host` (a name, or an address literal without brackets) and `port`.
pub fn resolve(host: &str, port: u16) -> io::Result<Resolution> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Resolution::Done(vec![SocketAddr::new(ip, port)]));
    }
    let name = host.to_string();
    let forked = Forked::start(move |report| {
        // One line per address, then an empty one; or `error MESSAGE`.
        let text = match (name.as_str(), port).to_socket_addrs() {
            Ok(addresses) => addresses.map(|address| format!("{address}\n")).collect::<String>() + "\n",
            Err(error) => format!("error {}\n", error.to_string().replace('\n', " ")),
        };
        let _ = (&*report).write_all(text.as_bytes());
    })?;
    Ok(Resolution::Pending(Lookup { host: host.to_string(), forked, since: Instant::now() }))
}

/// A name being looked up by a child process.
pub struct Lookup {
    host: String,
    forked: Forked,
    since: Instant,
}

impl Lookup {
    /// The descriptor to watch: readable when there is news.
    pub fn fd(&self) -> RawFd {
        self.forked.fd()
    }

    /// When the lookup is given up.
    pub fn deadline(&self) -> Instant {
        self.since + LOOKUP_LIMIT
    }

    /// The answer, once it has come (`None` until then): the addresses, or
    /// why there are none, in words for a log. Past [`LOOKUP_LIMIT`] that
    /// is the answer.
    pub fn answer(&mut self, now: Instant) -> Option<Result<Vec<SocketAddr>, String>> {
        let ended = self.forked.read();
        if let Some(answer) = parse(self.forked.text()) {
            return Some(answer.map_err(|message| format!("cannot resolve {}: {message}", self.host)));
        }
        if ended {
            return Some(Err(format!("cannot resolve {}: the lookup ended without an answer", self.host)));
        }
        if now >= self.deadline() {
            return Some(Err(format!("cannot resolve {}: no answer within {} s", self.host, LOOKUP_LIMIT.as_secs())));
        }
        None
    }
}

/// A child's report, once it is complete.
fn parse(text: &[u8]) -> Option<Result<Vec<SocketAddr>, String>> {
    let text = std::str::from_utf8(text).ok()?;
    if let Some(message) = text.strip_prefix("error ") {
        return message.strip_suffix('\n').map(|message| Err(message.to_string()));
    }
    let (lines, _) = text.split_once("\n\n").or_else(|| (text == "\n").then_some(("", "")))?;
    let addresses: Vec<SocketAddr> = lines.lines().filter_map(|line| line.parse().ok()).collect();
    if addresses.is_empty() {
        Some(Err("no address".to_string()))
    } else {
        Some(Ok(addresses))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_of(host: &str) -> Result<Vec<SocketAddr>, String> {
        match resolve(host, 7346).unwrap() {
            Resolution::Done(addresses) => Ok(addresses),
            Resolution::Pending(mut lookup) => loop {
                if let Some(answer) = lookup.answer(Instant::now()) {
                    return answer;
                }
                std::thread::sleep(Duration::from_millis(5));
            },
        }
    }

    #[test]
    fn literals_need_no_lookup() {
        assert!(
            matches!(resolve("127.0.0.1", 1).unwrap(), Resolution::Done(a) if a == ["127.0.0.1:1".parse().unwrap()])
        );
        assert!(matches!(resolve("::1", 1).unwrap(), Resolution::Done(a) if a == ["[::1]:1".parse().unwrap()]));
    }

    #[test]
    fn a_name_is_looked_up_by_a_child() {
        // localhost comes from /etc/hosts, without a nameserver.
        let addresses = answer_of("localhost").unwrap();
        assert!(addresses.iter().all(|a| a.ip().is_loopback() && a.port() == 7346), "{addresses:?}");
        assert!(!addresses.is_empty());
    }

    #[test]
    fn a_name_that_cannot_be_resolved_says_so() {
        // A name with a NUL cannot even be asked for.
        let error = answer_of("bad\0name").unwrap_err();
        assert!(error.starts_with("cannot resolve bad\0name: "), "{error}");
    }

    #[test]
    fn reports_are_read_only_when_complete() {
        assert_eq!(parse(b"127.0.0.1:5\n"), None);
        assert_eq!(parse(b"127.0.0.1:5\n\n"), Some(Ok(vec!["127.0.0.1:5".parse().unwrap()])));
        assert_eq!(parse(b"error no such host"), None);
        assert_eq!(parse(b"error no such host\n"), Some(Err("no such host".to_string())));
        assert_eq!(parse(b"\n"), Some(Err("no address".to_string())));
    }

    #[test]
    fn a_lookup_past_its_limit_is_given_up() {
        let forked = Forked::start(|_| std::thread::sleep(Duration::from_secs(600))).unwrap();
        let mut lookup = Lookup { host: "slow".into(), forked, since: Instant::now() };
        assert_eq!(lookup.answer(Instant::now()), None);
        let later = Instant::now() + LOOKUP_LIMIT;
        assert_eq!(lookup.answer(later), Some(Err("cannot resolve slow: no answer within 30 s".to_string())));
    }
}
