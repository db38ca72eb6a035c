//! Discovery datagrams: how dipus servers announce themselves over UDP.
//!
//! Each datagram is one ASCII text line of at most [`MAX_DATAGRAM`] bytes:
//!
//! ```text
//! DIPUS/1 ANNOUNCE host=<HOST> port=<TCP PORT> ttl=<SECONDS>
//! DIPUS/1 BYE host=<HOST>
//! DIPUS/1 QUERY
//! ```
//!
//! This module parses datagrams into [`Datagram`] values and emits them back,
//! and provides [`RateLimiter`], a per-source token bucket the daemon uses to
//! survive floods on a port anyone on the LAN can send to.
//!
//! Limits: no sockets and no clock reads (callers pass the time in), so
//! everything here is deterministic and fuzzable. Parsing is total: any byte
//! slice yields a value or a [`DatagramError`] whose [`reason`] label lets
//! the daemon count drops by cause. Host names are judged by
//! [`crate::name::validate_host`]; what an announcement *means* (expiry,
//! trust) is the discovery module's business.
//!
//! [`reason`]: DatagramError::reason

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::name::{validate_host, NameError};

/// UDP port discovery datagrams are sent to and received on.
pub const DISCOVERY_PORT: u16 = 7347;

/// Largest datagram in bytes. Receive into a buffer at least one byte larger
/// so that an oversize datagram is detected instead of silently truncated.
pub const MAX_DATAGRAM: usize = 512;

/// Seconds an announcement stays valid unless its sender says otherwise.
pub const DEFAULT_TTL: u32 = 15;

/// Longest ttl accepted; a longer one would let a single forged datagram
/// keep a phantom server listed for too long.
pub const MAX_TTL: u32 = 3600;

/// First field of every datagram, carrying the format version.
pub const MAGIC: &str = "DIPUS/1";

/// How much of an offending value an error message quotes.
const EXCERPT_BYTES: usize = 48;

/// One discovery datagram.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Datagram {
    /// A SEP server on `host` is listening on TCP `port`; believe it for
    /// `ttl` seconds.
    Announce { host: String, port: u16, ttl: u32 },
    /// The server on `host` is shutting down; forget it now.
    Bye { host: String },
    /// Asks every server that hears it to announce itself.
    Query,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DatagramError {
    #[error("empty discovery datagram")]
    Empty,

    /// `length` is what arrived: a receiver reads one byte past the
    /// limit, so a longer datagram shows as that long (at least).
    #[error("discovery datagram of at least {length} bytes, over the {MAX_DATAGRAM}-byte limit")]
    Oversize { length: usize },

    #[error("non-ASCII byte 0x{byte:02x} at position {position} in discovery datagram \"{excerpt}\"")]
    NotAscii { position: usize, byte: u8, excerpt: String },

    #[error("NUL byte at position {position} in discovery datagram \"{excerpt}\"")]
    NulByte { position: usize, excerpt: String },

    #[error(
        "control byte 0x{byte:02x} at position {position} in discovery datagram \"{excerpt}\" (only one trailing newline is allowed)"
    )]
    ControlByte { position: usize, byte: u8, excerpt: String },

    #[error(
        "not a dipus discovery datagram: expected \"{MAGIC}\", got \"{found}\" (is another program using UDP port {DISCOVERY_PORT}?)"
    )]
    WrongMagic { found: String },

    #[error("unsupported discovery version \"{found}\"; this dipus speaks only {MAGIC}")]
    UnsupportedVersion { found: String },

    #[error("fields must be separated by exactly one space, with none leading or trailing: \"{excerpt}\"")]
    BadSpacing { excerpt: String },

    #[error("discovery datagram has no verb after \"{MAGIC}\"; expected ANNOUNCE, BYE or QUERY")]
    MissingVerb,

    #[error("unknown discovery verb \"{verb}\"; expected ANNOUNCE, BYE or QUERY")]
    UnknownVerb { verb: String },

    #[error("field \"{field}\" is not of the form key=value with a non-empty key")]
    MalformedField { field: String },

    #[error("field \"{key}\" appears more than once")]
    DuplicateField { key: String },

    #[error("{verb} datagram lacks its \"{key}=\" field")]
    MissingField { verb: &'static str, key: &'static str },

    #[error("invalid host name \"{host}\" in discovery datagram: {source}")]
    BadHost {
        host: String,
        #[source]
        source: NameError,
    },

    #[error("invalid port \"{value}\"; expected a decimal number from 1 to 65535")]
    BadPort { value: String },

    #[error("invalid ttl \"{value}\"; expected a decimal number of seconds from 1 to {MAX_TTL}")]
    BadTtl { value: String },
}

impl DatagramError {
    /// Every label [`DatagramError::reason`] can return, so the daemon can
    /// create its drop counters up front.
    pub const REASONS: [&'static str; 16] = [
        "empty",
        "oversize",
        "non-ascii",
        "nul",
        "control",
        "garbage",
        "version",
        "spacing",
        "missing-verb",
        "unknown-verb",
        "malformed-field",
        "duplicate-field",
        "missing-field",
        "bad-host",
        "bad-port",
        "bad-ttl",
    ];

    /// A short, stable label for counting drops by cause.
    pub fn reason(&self) -> &'static str {
        match self {
            DatagramError::Empty => "empty",
            DatagramError::Oversize { .. } => "oversize",
            DatagramError::NotAscii { .. } => "non-ascii",
            DatagramError::NulByte { .. } => "nul",
            DatagramError::ControlByte { .. } => "control",
            DatagramError::WrongMagic { .. } => "garbage",
            DatagramError::UnsupportedVersion { .. } => "version",
            DatagramError::BadSpacing { .. } => "spacing",
            DatagramError::MissingVerb => "missing-verb",
            DatagramError::UnknownVerb { .. } => "unknown-verb",
            DatagramError::MalformedField { .. } => "malformed-field",
            DatagramError::DuplicateField { .. } => "duplicate-field",
            DatagramError::MissingField { .. } => "missing-field",
            DatagramError::BadHost { .. } => "bad-host",
            DatagramError::BadPort { .. } => "bad-port",
            DatagramError::BadTtl { .. } => "bad-ttl",
        }
    }
}

/// Quotes at most [`EXCERPT_BYTES`] of `bytes`, escaped, because datagrams
/// on this port can come from anyone and end up in logs.
fn excerpt(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(EXCERPT_BYTES)];
    let mut text = shown.escape_ascii().to_string();
    if bytes.len() > EXCERPT_BYTES {
        text.push_str("...");
    }
    text
}

/// A plain decimal number: digits only, so `+80`, ` 80` and `0x50` (all of
/// which some integer parsers accept or half-accept) are refused.
fn parse_decimal(value: &str) -> Option<u32> {
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fn parse_port(value: &str) -> Result<u16, DatagramError> {
    parse_decimal(value)
        .and_then(|number| u16::try_from(number).ok())
        .filter(|&port| port != 0)
        .ok_or_else(|| DatagramError::BadPort { value: excerpt(value.as_bytes()) })
}

fn parse_ttl(value: &str) -> Result<u32, DatagramError> {
    parse_decimal(value)
        .filter(|ttl| (1..=MAX_TTL).contains(ttl))
        .ok_or_else(|| DatagramError::BadTtl { value: excerpt(value.as_bytes()) })
}

fn required<'a>(value: Option<&'a str>, verb: &'static str, key: &'static str) -> Result<&'a str, DatagramError> {
    value.ok_or(DatagramError::MissingField { verb, key })
}

fn check_host(host: &str) -> Result<(), DatagramError> {
    validate_host(host).map_err(|source| DatagramError::BadHost { host: excerpt(host.as_bytes()), source })
}

impl Datagram {
    /// Parses one received datagram.
    pub fn parse(bytes: &[u8]) -> Result<Datagram, DatagramError> {
        if bytes.len() > MAX_DATAGRAM {
            return Err(DatagramError::Oversize { length: bytes.len() });
        }
        let content = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        if content.is_empty() {
            return Err(DatagramError::Empty);
        }
        for (position, &byte) in content.iter().enumerate() {
            if byte == 0 {
                return Err(DatagramError::NulByte { position, excerpt: excerpt(content) });
            }
            if !byte.is_ascii() {
                return Err(DatagramError::NotAscii { position, byte, excerpt: excerpt(content) });
            }
            if byte.is_ascii_control() {
                return Err(DatagramError::ControlByte { position, byte, excerpt: excerpt(content) });
            }
        }
        // All bytes are printable ASCII by now, so this cannot fail; the
        // fallback only keeps the function free of panics.
        let Ok(text) = std::str::from_utf8(content) else {
            return Err(DatagramError::NotAscii { position: 0, byte: content[0], excerpt: excerpt(content) });
        };

        let mut fields = text.split(' ');
        let magic = fields.next().unwrap_or_default();
        if magic != MAGIC {
            return Err(if magic.starts_with("DIPUS/") {
                DatagramError::UnsupportedVersion { found: excerpt(magic.as_bytes()) }
            } else {
                DatagramError::WrongMagic { found: excerpt(magic.as_bytes()) }
            });
        }
        if text.split(' ').any(str::is_empty) {
            return Err(DatagramError::BadSpacing { excerpt: excerpt(content) });
        }
        let verb = fields.next().ok_or(DatagramError::MissingVerb)?;
        if !matches!(verb, "ANNOUNCE" | "BYE" | "QUERY") {
            return Err(DatagramError::UnknownVerb { verb: excerpt(verb.as_bytes()) });
        }

        let mut host = None;
        let mut port = None;
        let mut ttl = None;
        // The remaining fields, re-split so duplicates can be found by
        // looking back without allocating a set; a datagram holds at most a
        // few hundred fields, so the quadratic scan stays cheap.
        let field_text = text.splitn(3, ' ').nth(2).unwrap_or_default();
        for (index, field) in fields.enumerate() {
            let (key, value) = match field.split_once('=') {
                Some((key, value)) if !key.is_empty() => (key, value),
                _ => return Err(DatagramError::MalformedField { field: excerpt(field.as_bytes()) }),
            };
            let seen_before = field_text
                .split(' ')
                .take(index)
                .any(|earlier| earlier.split_once('=').map(|(earlier_key, _)| earlier_key) == Some(key));
            if seen_before {
                return Err(DatagramError::DuplicateField { key: excerpt(key.as_bytes()) });
            }
            // Unknown keys, including ones meaningless for this verb, are
            // ignored so that later versions can add fields.
            match (verb, key) {
                ("ANNOUNCE" | "BYE", "host") => host = Some(value),
                ("ANNOUNCE", "port") => port = Some(value),
                ("ANNOUNCE", "ttl") => ttl = Some(value),
                _ => {}
            }
        }

        match verb {
            "ANNOUNCE" => {
                let host = required(host, "ANNOUNCE", "host")?;
                let port = required(port, "ANNOUNCE", "port")?;
                let ttl = required(ttl, "ANNOUNCE", "ttl")?;
                check_host(host)?;
                Ok(Datagram::Announce { host: host.to_owned(), port: parse_port(port)?, ttl: parse_ttl(ttl)? })
            }
            "BYE" => {
                let host = required(host, "BYE", "host")?;
                check_host(host)?;
                Ok(Datagram::Bye { host: host.to_owned() })
            }
            _ => Ok(Datagram::Query),
        }
    }

    /// Checks a datagram built in code against the rules
    /// [`Datagram::parse`] enforces, so that `to_bytes` will not emit one
    /// that receivers drop.
    pub fn validate(&self) -> Result<(), DatagramError> {
        match self {
            Datagram::Announce { host, port, ttl } => {
                check_host(host)?;
                if *port == 0 {
                    return Err(DatagramError::BadPort { value: port.to_string() });
                }
                if !(1..=MAX_TTL).contains(ttl) {
                    return Err(DatagramError::BadTtl { value: ttl.to_string() });
                }
                Ok(())
            }
            Datagram::Bye { host } => check_host(host),
            Datagram::Query => Ok(()),
        }
    }

    /// The datagram's bytes, ending in `\n` so that it reads well in
    /// `socat` and packet dumps. Fields are written as they are; call
    /// [`Datagram::validate`] first for values built from outside input.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Datagram::Announce { host, port, ttl } => {
                format!("{MAGIC} ANNOUNCE host={host} port={port} ttl={ttl}\n")
            }
            Datagram::Bye { host } => format!("{MAGIC} BYE host={host}\n"),
            Datagram::Query => format!("{MAGIC} QUERY\n"),
        }
        .into_bytes()
    }
}

/// Token-bucket state for one source address.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens in millionths, so that slow refill rates accumulate exactly
    /// without floating point.
    micro_tokens: u64,
    /// The instant up to which refill has been credited.
    refilled_at: Instant,
    /// The last time this source sent anything, allowed or not; used to pick
    /// the eviction victim.
    seen_at: Instant,
}

const MICRO: u64 = 1_000_000;

/// A per-source token bucket: each source may send `burst` datagrams at
/// once and `per_second` on average after that.
///
/// It is pure: the caller passes the current [`Instant`], which keeps it
/// deterministic under test. Memory is bounded by `max_sources`: a new
/// source arriving when the table is full evicts the least recently seen
/// one, found by a linear scan. That scan is O(n) per new source, which is
/// fine for the intended sizes (n ≤ 1024) even under a flood of spoofed
/// addresses; do not configure it much larger without changing the
/// structure. An evicted source that returns starts with a full bucket,
/// so a flood of spoofed sources can reset an honest source's bucket; it
/// cannot raise the rate of any one source beyond `burst` per eviction.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    per_second: u32,
    burst: u32,
    max_sources: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

impl RateLimiter {
    /// A limiter allowing each source `burst` datagrams at once and
    /// `per_second` on average, remembering at most `max_sources` sources.
    /// `per_second == 0` means a source gets its burst and nothing more;
    /// `burst == 0` refuses everything; `max_sources` is raised to at
    /// least 1.
    pub fn new(per_second: u32, burst: u32, max_sources: usize) -> RateLimiter {
        RateLimiter { per_second, burst, max_sources: max_sources.max(1), buckets: HashMap::new() }
    }

    /// Whether a datagram from `source` arriving at `now` may be processed.
    /// Each allowed datagram spends one token. Instants earlier than ones
    /// already seen are treated as no time passing.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        let capacity = u64::from(self.burst) * MICRO;
        if let Some(bucket) = self.buckets.get_mut(&source) {
            Self::refill(bucket, now, self.per_second, capacity);
            bucket.seen_at = bucket.seen_at.max(now);
            return Self::spend(bucket);
        }
        if self.buckets.len() >= self.max_sources {
            self.evict_least_recently_seen();
        }
        let mut bucket = Bucket { micro_tokens: capacity, refilled_at: now, seen_at: now };
        let allowed = Self::spend(&mut bucket);
        self.buckets.insert(source, bucket);
        allowed
    }

    /// How many sources are currently remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn refill(bucket: &mut Bucket, now: Instant, per_second: u32, capacity: u64) {
        if per_second == 0 {
            return;
        }
        let elapsed_micros = now.saturating_duration_since(bucket.refilled_at).as_micros();
        let total =
            u128::from(bucket.micro_tokens).saturating_add(elapsed_micros.saturating_mul(u128::from(per_second)));
        match u64::try_from(total) {
            Ok(total) if total < capacity => {
                // Credit whole microseconds only and keep the remainder on
                // the clock, so that calls closer together than that still
                // add up instead of each losing its fraction.
                bucket.micro_tokens = total;
                let credited = Duration::from_micros(u64::try_from(elapsed_micros).unwrap_or(u64::MAX));
                bucket.refilled_at = bucket.refilled_at.checked_add(credited).unwrap_or(now);
            }
            _ => {
                bucket.micro_tokens = capacity;
                // Never move backwards: a stale `now` must not earn the same
                // interval twice.
                bucket.refilled_at = bucket.refilled_at.max(now);
            }
        }
    }

    fn spend(bucket: &mut Bucket) -> bool {
        if bucket.micro_tokens >= MICRO {
            bucket.micro_tokens -= MICRO;
            true
        } else {
            false
        }
    }

    fn evict_least_recently_seen(&mut self) {
        let oldest = self.buckets.iter().min_by_key(|(_, bucket)| bucket.seen_at).map(|(&source, _)| source);
        if let Some(source) = oldest {
            self.buckets.remove(&source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn parse(text: &str) -> Result<Datagram, DatagramError> {
        Datagram::parse(text.as_bytes())
    }

    fn announce(host: &str, port: u16, ttl: u32) -> Datagram {
        Datagram::Announce { host: host.into(), port, ttl }
    }

    // ---- valid ----

    #[test]
    fn parses_each_verb() {
        assert_eq!(parse("DIPUS/1 ANNOUNCE host=hosta port=7347 ttl=15\n").unwrap(), announce("hosta", 7347, 15));
        assert_eq!(parse("DIPUS/1 BYE host=hosta.lan").unwrap(), Datagram::Bye { host: "hosta.lan".into() });
        assert_eq!(parse("DIPUS/1 QUERY\n").unwrap(), Datagram::Query);
    }

    #[test]
    fn fields_may_come_in_any_order() {
        assert_eq!(parse("DIPUS/1 ANNOUNCE ttl=60 host=h port=1").unwrap(), announce("h", 1, 60));
        assert_eq!(parse("DIPUS/1 ANNOUNCE port=2 ttl=3 host=h").unwrap(), announce("h", 2, 3));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        assert_eq!(parse("DIPUS/1 ANNOUNCE host=h future=yes port=9 ttl=9 tls=").unwrap(), announce("h", 9, 9));
        assert_eq!(parse("DIPUS/1 QUERY scope=lan").unwrap(), Datagram::Query);
        // Fields of other verbs are unknown keys for this one.
        assert_eq!(parse("DIPUS/1 BYE host=h port=abc").unwrap(), Datagram::Bye { host: "h".into() });
        assert_eq!(parse("DIPUS/1 QUERY host=not..valid").unwrap(), Datagram::Query);
        // Only the first '=' splits; the rest belongs to the value.
        assert_eq!(parse("DIPUS/1 QUERY x=a=b").unwrap(), Datagram::Query);
    }

    // ---- invalid ----

    #[test]
    fn rejects_framing_problems() {
        assert_eq!(Datagram::parse(b""), Err(DatagramError::Empty));
        assert_eq!(Datagram::parse(b"\n"), Err(DatagramError::Empty));
        assert!(matches!(
            Datagram::parse(b"DIPUS/1 QUERY\n\n"),
            Err(DatagramError::ControlByte { position: 13, byte: b'\n', .. })
        ));
        assert!(matches!(Datagram::parse(b"DIPUS/1 QUERY\r\n"), Err(DatagramError::ControlByte { byte: b'\r', .. })));
        assert!(matches!(Datagram::parse(b"DIPUS/1\tQUERY"), Err(DatagramError::ControlByte { position: 7, .. })));
        assert!(matches!(Datagram::parse(b"DIPUS/1 QUERY\x7f"), Err(DatagramError::ControlByte { byte: 0x7f, .. })));
        assert!(matches!(Datagram::parse(b"DIPUS/1 BYE host=h\0x"), Err(DatagramError::NulByte { position: 18, .. })));
        assert!(matches!(
            Datagram::parse(b"DIPUS/1 BYE host=h\xc3\xa9"),
            Err(DatagramError::NotAscii { position: 18, byte: 0xc3, .. })
        ));
    }

    #[test]
    fn rejects_foreign_and_future_datagrams() {
        assert!(matches!(
            parse("M-SEARCH * HTTP/1.1"),
            Err(DatagramError::WrongMagic { found }) if found == "M-SEARCH"
        ));
        assert!(matches!(parse("dipus/1 QUERY"), Err(DatagramError::WrongMagic { .. })));
        assert!(matches!(
            parse("DIPUS/2 QUERY"),
            Err(DatagramError::UnsupportedVersion { found }) if found == "DIPUS/2"
        ));
        assert_eq!(parse("DIPUS/1"), Err(DatagramError::MissingVerb));
        assert!(matches!(
            parse("DIPUS/1 HELLO"),
            Err(DatagramError::UnknownVerb { verb }) if verb == "HELLO"
        ));
        assert!(matches!(parse("DIPUS/1 query"), Err(DatagramError::UnknownVerb { .. })));
    }

    #[test]
    fn rejects_bad_spacing() {
        for text in ["DIPUS/1  QUERY", "DIPUS/1 QUERY ", "DIPUS/1 BYE  host=h", "DIPUS/1 "] {
            assert!(matches!(parse(text), Err(DatagramError::BadSpacing { .. })), "{text:?}");
        }
    }

    #[test]
    fn rejects_bad_fields() {
        assert!(matches!(
            parse("DIPUS/1 QUERY junk"),
            Err(DatagramError::MalformedField { field }) if field == "junk"
        ));
        assert!(matches!(parse("DIPUS/1 QUERY =x"), Err(DatagramError::MalformedField { .. })));
        assert!(matches!(
            parse("DIPUS/1 ANNOUNCE host=a host=b port=1 ttl=1"),
            Err(DatagramError::DuplicateField { key }) if key == "host"
        ));
        // Duplicates are refused even among keys this version ignores.
        assert!(matches!(
            parse("DIPUS/1 QUERY x=1 y=2 x=3"),
            Err(DatagramError::DuplicateField { key }) if key == "x"
        ));
        assert_eq!(
            parse("DIPUS/1 ANNOUNCE port=1 ttl=1"),
            Err(DatagramError::MissingField { verb: "ANNOUNCE", key: "host" })
        );
        assert_eq!(
            parse("DIPUS/1 ANNOUNCE host=h ttl=1"),
            Err(DatagramError::MissingField { verb: "ANNOUNCE", key: "port" })
        );
        assert_eq!(
            parse("DIPUS/1 ANNOUNCE host=h port=1"),
            Err(DatagramError::MissingField { verb: "ANNOUNCE", key: "ttl" })
        );
        assert_eq!(parse("DIPUS/1 BYE"), Err(DatagramError::MissingField { verb: "BYE", key: "host" }));
    }

    #[test]
    fn rejects_bad_hosts() {
        for host in ["", ".h", "h.", "a..b", "h/x", "h=x", &"h".repeat(65)] {
            let text = format!("DIPUS/1 BYE host={host}");
            assert!(matches!(parse(&text), Err(DatagramError::BadHost { .. })), "{text:?}");
        }
        let error = parse("DIPUS/1 ANNOUNCE host=a..b port=1 ttl=1").unwrap_err();
        assert_eq!(error.reason(), "bad-host");
        assert!(error.to_string().contains("a..b"), "{error}");
        assert!(std::error::Error::source(&error).is_some());
        assert!(parse(&format!("DIPUS/1 BYE host={}", "h".repeat(64))).is_ok());
    }

    #[test]
    fn port_boundaries() {
        for (value, expected) in [("1", Some(1)), ("65535", Some(65535)), ("007347", Some(7347))] {
            let text = format!("DIPUS/1 ANNOUNCE host=h port={value} ttl=15");
            assert_eq!(parse(&text).ok(), expected.map(|port| announce("h", port, 15)), "{value}");
        }
        for value in ["0", "65536", "", "+80", "-1", "0x50", "8O", "99999999999", "4294967296"] {
            let text = format!("DIPUS/1 ANNOUNCE host=h port={value} ttl=15");
            assert!(matches!(parse(&text), Err(DatagramError::BadPort { .. })), "{value}");
        }
    }

    #[test]
    fn ttl_boundaries() {
        assert_eq!(parse("DIPUS/1 ANNOUNCE host=h port=1 ttl=1").unwrap(), announce("h", 1, 1));
        assert_eq!(parse("DIPUS/1 ANNOUNCE host=h port=1 ttl=3600").unwrap(), announce("h", 1, MAX_TTL));
        for value in ["0", "3601", "", "-5", "+5", "1.5", "4294967296"] {
            let text = format!("DIPUS/1 ANNOUNCE host=h port=1 ttl={value}");
            assert!(matches!(parse(&text), Err(DatagramError::BadTtl { .. })), "{value}");
        }
    }

    #[test]
    fn size_boundary() {
        let base = "DIPUS/1 QUERY pad=";
        let fits = format!("{base}{}", "x".repeat(MAX_DATAGRAM - base.len()));
        assert_eq!(fits.len(), MAX_DATAGRAM);
        assert_eq!(parse(&fits).unwrap(), Datagram::Query);
        assert_eq!(parse(&format!("{fits}\n")), Err(DatagramError::Oversize { length: 513 }));
        let fits_with_newline = format!("{}\n", &fits[..MAX_DATAGRAM - 1]);
        assert_eq!(parse(&fits_with_newline).unwrap(), Datagram::Query);
        assert!(matches!(Datagram::parse(&[0xff; 70_000]), Err(DatagramError::Oversize { length: 70_000 })));
    }

    #[test]
    fn error_messages_quote_short_escaped_excerpts() {
        let mut bytes = b"XX".to_vec();
        bytes.extend(std::iter::repeat_n(b'"', 400));
        let message = Datagram::parse(&bytes).unwrap_err().to_string();
        assert!(message.contains("\\\""), "{message}");
        assert!(message.contains("..."), "{message}");
        assert!(message.len() < 300, "{message}");
    }

    #[test]
    fn reasons_are_listed_and_distinct() {
        let samples = [
            DatagramError::Empty,
            DatagramError::Oversize { length: 600 },
            DatagramError::NotAscii { position: 0, byte: 0xff, excerpt: String::new() },
            DatagramError::NulByte { position: 0, excerpt: String::new() },
            DatagramError::ControlByte { position: 0, byte: 1, excerpt: String::new() },
            DatagramError::WrongMagic { found: String::new() },
            DatagramError::UnsupportedVersion { found: String::new() },
            DatagramError::BadSpacing { excerpt: String::new() },
            DatagramError::MissingVerb,
            DatagramError::UnknownVerb { verb: String::new() },
            DatagramError::MalformedField { field: String::new() },
            DatagramError::DuplicateField { key: String::new() },
            DatagramError::MissingField { verb: "BYE", key: "host" },
            DatagramError::BadHost { host: String::new(), source: validate_host("").unwrap_err() },
            DatagramError::BadPort { value: String::new() },
            DatagramError::BadTtl { value: String::new() },
        ];
        let reasons: Vec<_> = samples.iter().map(DatagramError::reason).collect();
        assert_eq!(reasons, DatagramError::REASONS);
        for (index, reason) in reasons.iter().enumerate() {
            assert!(!reasons[..index].contains(reason), "{reason} repeated");
        }
    }

    // ---- emitting and round trip ----

    #[test]
    fn emits_canonical_bytes() {
        assert_eq!(announce("hosta", 7347, DEFAULT_TTL).to_bytes(), b"DIPUS/1 ANNOUNCE host=hosta port=7347 ttl=15\n");
        assert_eq!(Datagram::Bye { host: "h".into() }.to_bytes(), b"DIPUS/1 BYE host=h\n");
        assert_eq!(Datagram::Query.to_bytes(), b"DIPUS/1 QUERY\n");
    }

    #[test]
    fn round_trips() {
        for datagram in [
            announce("a", 1, 1),
            announce(&"h".repeat(64), 65535, MAX_TTL),
            announce("host-1.lan_2", DISCOVERY_PORT, DEFAULT_TTL),
            Datagram::Bye { host: "x.y".into() },
            Datagram::Query,
        ] {
            assert!(datagram.validate().is_ok());
            let bytes = datagram.to_bytes();
            assert!(bytes.len() <= MAX_DATAGRAM);
            assert_eq!(Datagram::parse(&bytes).unwrap(), datagram);
        }
    }

    #[test]
    fn validate_rejects_what_parse_would() {
        assert_eq!(announce("h", 0, 1).validate().unwrap_err().reason(), "bad-port");
        assert_eq!(announce("h", 1, 0).validate().unwrap_err().reason(), "bad-ttl");
        assert_eq!(announce("h", 1, MAX_TTL + 1).validate().unwrap_err().reason(), "bad-ttl");
        assert_eq!(announce("h x", 1, 1).validate().unwrap_err().reason(), "bad-host");
        assert_eq!(Datagram::Bye { host: "a\nb".into() }.validate().unwrap_err().reason(), "bad-host");
    }

    // ---- rate limiter ----

    fn address(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn burst_then_refill() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(2, 3, 16);
        let source = address(1);
        for _ in 0..3 {
            assert!(limiter.allow(source, start));
        }
        assert!(!limiter.allow(source, start));
        // Half a second at 2/s earns exactly one token.
        let later = start + Duration::from_millis(500);
        assert!(limiter.allow(source, later));
        assert!(!limiter.allow(source, later));
        // A long pause refills only up to the burst.
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(limiter.allow(source, much_later));
        }
        assert!(!limiter.allow(source, much_later));
    }

    #[test]
    fn fractional_refill_accumulates() {
        let start = Instant::now();
        let mut limiter = RateLimiter::new(1, 1, 4);
        let source = address(1);
        assert!(limiter.allow(source, start));
        let mut allowed = 0;
        // 100 calls 10 ms apart span one second: exactly one more token.
        for step in 1..=100 {
            if limiter.allow(source, start + Duration::from_millis(10 * step)) {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 1);
        // Sub-microsecond spacing must not lose time either.
        let mut limiter = RateLimiter::new(1, 1, 4);
        assert!(limiter.allow(source, start));
        let mut allowed = 0;
        for step in 1..=2_000_000u64 {
            if limiter.allow(source, start + Duration::from_nanos(700 * step)) {
                allowed += 1;
            }
        }
        // 2e6 * 0.7 µs = 1.4 s, so one refill.
        assert_eq!(allowed, 1);
    }

    #[test]
    fn sources_are_independent() {
        let now = Instant::now();
        let mut limiter = RateLimiter::new(1, 1, 16);
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert!(limiter.allow(address(1), now));
        assert!(!limiter.allow(address(1), now));
        assert!(limiter.allow(address(2), now));
        assert!(limiter.allow(v6, now));
        assert!(!limiter.allow(v6, now));
        assert_eq!(limiter.len(), 3);
    }

    #[test]
    fn evicts_least_recently_seen_source() {
        let start = Instant::now();
        let at = |seconds| start + Duration::from_secs(seconds);
        let mut limiter = RateLimiter::new(0, 1, 2);
        assert!(limiter.is_empty());
        assert!(limiter.allow(address(1), at(0)));
        assert!(limiter.allow(address(2), at(1)));
        // Source 1 is seen again (and refused), so source 2 is now oldest.
        assert!(!limiter.allow(address(1), at(2)));
        assert!(limiter.allow(address(3), at(3)));
        assert_eq!(limiter.len(), 2);
        // Source 1 was remembered: still no tokens.
        assert!(!limiter.allow(address(1), at(4)));
        // Source 2 was evicted, so it comes back with a fresh bucket,
        // evicting source 3, the least recently seen now.
        assert!(limiter.allow(address(2), at(5)));
        assert_eq!(limiter.len(), 2);
        assert!(limiter.allow(address(3), at(6)));
    }

    #[test]
    fn degenerate_settings() {
        let now = Instant::now();
        let mut refuse_all = RateLimiter::new(1000, 0, 4);
        assert!(!refuse_all.allow(address(1), now));
        assert!(!refuse_all.allow(address(1), now + Duration::from_secs(10)));

        let mut one_source = RateLimiter::new(1, 1, 0);
        assert!(one_source.allow(address(1), now));
        assert!(one_source.allow(address(2), now));
        assert_eq!(one_source.len(), 1);

        let mut huge = RateLimiter::new(u32::MAX, u32::MAX, 1);
        for step in 0..1000 {
            assert!(huge.allow(address(1), now + Duration::from_secs(step * 1_000_000)));
        }
    }

    #[test]
    fn time_going_backwards_earns_nothing() {
        let start = Instant::now() + Duration::from_secs(100);
        let mut limiter = RateLimiter::new(1, 1, 4);
        assert!(limiter.allow(address(1), start));
        assert!(!limiter.allow(address(1), start - Duration::from_secs(50)));
        assert!(!limiter.allow(address(1), start + Duration::from_millis(999)));
        assert!(limiter.allow(address(1), start + Duration::from_secs(1)));
    }

    // ---- deterministic fuzzing ----

    use crate::test_random::XorShift;

    const PIECES: &[&[u8]] = &[
        b"DIPUS/1",
        b"DIPUS/2",
        b" ",
        b" ",
        b"ANNOUNCE",
        b"BYE",
        b"QUERY",
        b"host=",
        b"port=",
        b"ttl=",
        b"x=",
        b"=",
        b"hosta",
        b".",
        b"..",
        b"-",
        b"_",
        b"0",
        b"1",
        b"15",
        b"3600",
        b"65535",
        b"65536",
        b"\n",
        b"\r",
        b"\0",
        b"\t",
        b"\xc3\xa9",
        b"\xff",
    ];

    const PREFIXES: &[&[u8]] = &[
        b"",
        b"DIPUS/1 ",
        b"DIPUS/1 QUERY",
        b"DIPUS/1 BYE host=h",
        b"DIPUS/1 ANNOUNCE host=h port=1 ttl=1",
        b"DIPUS/1 ANNOUNCE ",
    ];

    fn random_datagram(random: &mut XorShift) -> Vec<u8> {
        let mut bytes = PREFIXES[random.below(PREFIXES.len())].to_vec();
        for _ in 0..random.below(8) {
            match random.below(12) {
                0 => bytes.push(random.next() as u8),
                1 => bytes.push(b' '),
                _ => bytes.extend_from_slice(PIECES[random.below(PIECES.len())]),
            }
        }
        if random.below(30) == 0 {
            bytes.extend(std::iter::repeat_n(b'z', random.below(2 * MAX_DATAGRAM)));
        }
        bytes
    }

    #[test]
    fn fuzz_parse_never_panics_and_accepted_datagrams_round_trip() {
        let mut random = XorShift(0x853c_49e6_748f_ea9b);
        let mut accepted = [0usize; 3];
        for _ in 0..50_000 {
            let bytes = random_datagram(&mut random);
            match Datagram::parse(&bytes) {
                Ok(datagram) => {
                    accepted[match datagram {
                        Datagram::Announce { .. } => 0,
                        Datagram::Bye { .. } => 1,
                        Datagram::Query => 2,
                    }] += 1;
                    assert!(datagram.validate().is_ok());
                    let emitted = datagram.to_bytes();
                    assert!(emitted.len() <= MAX_DATAGRAM);
                    assert_eq!(Datagram::parse(&emitted).unwrap(), datagram);
                }
                Err(error) => {
                    assert!(DatagramError::REASONS.contains(&error.reason()));
                    assert!(error.to_string().len() < 1024);
                }
            }
        }
        for count in accepted {
            assert!(count > 100, "{accepted:?}");
        }
    }

    #[test]
    fn fuzz_rate_limiter_never_exceeds_its_budget() {
        let mut random = XorShift(0xdead_beef_cafe_f00d);
        let start = Instant::now();
        let (per_second, burst) = (5u64, 4u64);
        let mut limiter = RateLimiter::new(per_second as u32, burst as u32, 8);
        let mut allowed = [0u64; 4];
        let mut elapsed = Duration::ZERO;
        for _ in 0..100_000 {
            elapsed += Duration::from_micros(random.below(2_000) as u64);
            let source = random.below(4);
            if limiter.allow(address(source as u8), start + elapsed) {
                allowed[source] += 1;
            }
        }
        // Four sources fit in eight slots, so none is ever evicted and each
        // is held to burst + rate * time.
        let ceiling = burst + per_second * elapsed.as_secs() + per_second;
        for count in allowed {
            assert!(count <= ceiling, "{count} > {ceiling}");
            assert!(count + per_second * 2 >= per_second * elapsed.as_secs());
        }
    }
}
