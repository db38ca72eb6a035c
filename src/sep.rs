//! SEP/1, the Socket Export Protocol, as bytes on the wire.
//!
//! This module turns SEP/1 lines into typed values and back: request lines
//! (`SEP/1 CONNECT text/plain/sorter.hosta..0`), status lines
//! (`SEP/1 200 OK`), `LIST` result lines and `WATCH` stream events. It also
//! assembles lines from a byte stream without over-reading, because after a
//! `CONNECT` request line every further byte is payload for the relayed
//! service and must not be swallowed by the line parser.
//!
//! Limits: it does no I/O of its own (except [`read_line`], which reads from
//! a reader it is handed), keeps no timers (the 10-second request deadline and
//! the keepalive schedule belong to the server) and knows nothing about the
//! filesystem. Service paths and selectors are checked only for what the wire
//! format needs and for the path tricks that must never reach the exporter
//! (absolute paths, `.` and `..` components); the exporter and the selector
//! module validate them further. Every parser is total: any byte slice gives
//! either a value or a [`SepError`], never a panic, and every accepted line
//! is emitted back by `to_line` so that it parses to the same value.
//!
//! The protocol itself is specified in `doc/sep.md`.

use std::io::Read;

use thiserror::Error;

/// Version token that starts every request and status line.
pub const VERSION: &str = "SEP/1";

/// TCP port a SEP server listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7347;

/// Longest SEP line in bytes, counting its `\n`. It bounds request lines and
/// also every line a server sends, so a client can use the same limit.
pub const MAX_REQUEST_LINE: usize = 4096;

/// Seconds a client has to deliver its complete request line.
pub const REQUEST_TIMEOUT_SECS: u64 = 10;

/// Seconds of silence after which a server sends a keepalive line on a
/// `WATCH` stream.
pub const KEEPALIVE_SECS: u64 = 5;

/// Longest selector argument in bytes; together with the verb it still fits
/// in [`MAX_REQUEST_LINE`].
pub const MAX_SELECTOR: usize = 4000;

/// Longest service path in bytes, for the same reason as [`MAX_SELECTOR`].
pub const MAX_PATH: usize = 4000;

/// Most services a client keeps of one exporter (a LIST reply, a WATCH
/// stream's current set, an import): well above the 10,000 a large host
/// may offer, and a bound on the memory a hostile exporter can make a
/// client use.
pub const MAX_SERVICES: usize = 16384;

/// How much of an offending value an error message quotes; enough to
/// recognise it, short enough to keep one hostile line from flooding a log.
const EXCERPT_BYTES: usize = 64;

/// Everything that can be wrong with a SEP line or with reading one.
#[derive(Debug, Error)]
pub enum SepError {
    #[error("empty line where a SEP/1 line was expected")]
    EmptyLine,

    #[error("line is longer than the {limit}-byte limit (newline included) without ending; it starts \"{start}\"")]
    LineTooLong { limit: usize, start: String },

    #[error("line is not valid UTF-8 (first bad byte at position {position}): \"{line}\"")]
    NotUtf8 { position: usize, line: String },

    #[error("NUL byte at position {position} in \"{line}\"; SEP lines are printable text")]
    NulByte { position: usize, line: String },

    #[error("control character {character} at position {position} in \"{line}\"; SEP lines are printable text")]
    ControlCharacter { position: usize, character: String, line: String },

    #[error("fields must be separated by exactly one space, with none leading or trailing: \"{line}\"")]
    BadSpacing { line: String },

    #[error(
        "not a SEP line: expected it to start with \"SEP/1\", got \"{found}\" (is something other than dipus on the other end?)"
    )]
    NotSep { found: String },

    #[error("unsupported protocol version \"{found}\"; this dipus speaks only SEP/1")]
    UnsupportedVersion { found: String },

    #[error("request line has no verb after \"SEP/1\"; expected LIST, CONNECT, WATCH, PING or FORWARD")]
    MissingVerb,

    #[error("unknown verb \"{verb}\"; expected LIST, CONNECT, WATCH, PING or FORWARD (upper case)")]
    UnknownVerb { verb: String },

    #[error("{verb} needs {expected}")]
    MissingArgument { verb: &'static str, expected: &'static str },

    #[error("{verb} takes {allowed}, but got the extra argument \"{argument}\"")]
    UnexpectedArgument { verb: &'static str, allowed: &'static str, argument: String },

    #[error("selector is {length} bytes long, over the {limit}-byte limit: \"{selector}\"")]
    SelectorTooLong { length: usize, limit: usize, selector: String },

    #[error("invalid selector \"{selector}\": {problem}")]
    InvalidSelector { selector: String, problem: &'static str },

    #[error("service path is {length} bytes long, over the {limit}-byte limit: \"{path}\"")]
    PathTooLong { length: usize, limit: usize, path: String },

    #[error("invalid service path \"{path}\": {problem}")]
    InvalidPath { path: String, problem: &'static str },

    #[error("bad status code \"{found}\"; expected three digits from 100 to 599")]
    BadStatusCode { found: String },

    #[error("status line \"{line}\" has no reason text after the code")]
    MissingReason { line: String },

    #[error("unrecognised WATCH stream line \"{line}\"; expected \"+ PATH\", \"- PATH\", \"= synced\" or \".\"")]
    UnknownEvent { line: String },

    #[error("more than {limit} services listed; a host offers fewer")]
    TooManyServices { limit: usize },

    #[error("connection closed after {received} bytes, before the line's newline")]
    UnexpectedEof { received: usize },

    #[error("I/O error while reading a SEP line: {0}")]
    Io(#[from] std::io::Error),
}

/// Quotes at most [`EXCERPT_BYTES`] of `bytes`, escaped so that binary junk
/// and quotes cannot garble the error message that embeds it.
fn excerpt(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(EXCERPT_BYTES)];
    let mut text = shown.escape_ascii().to_string();
    if bytes.len() > EXCERPT_BYTES {
        text.push_str("...");
    }
    text
}

/// Checks the framing shared by every SEP line and returns its text without
/// the terminator. The `\r` tolerance is for people typing at `telnet`.
fn line_text(line: &[u8]) -> Result<&str, SepError> {
    let without_newline = line.strip_suffix(b"\n").unwrap_or(line);
    if without_newline.len() >= MAX_REQUEST_LINE {
        return Err(SepError::LineTooLong { limit: MAX_REQUEST_LINE, start: excerpt(without_newline) });
    }
    let content = without_newline.strip_suffix(b"\r").unwrap_or(without_newline);
    // Byte-level checks first: they name the culprit more precisely than a
    // UTF-8 error would, and a NUL is the classic C-string truncation trick.
    for (position, &byte) in content.iter().enumerate() {
        if byte == 0 {
            return Err(SepError::NulByte { position, line: excerpt(content) });
        }
        if byte < 0x20 || byte == 0x7f {
            return Err(SepError::ControlCharacter { position, character: excerpt(&[byte]), line: excerpt(content) });
        }
    }
    let text = std::str::from_utf8(content)
        .map_err(|error| SepError::NotUtf8 { position: error.valid_up_to(), line: excerpt(content) })?;
    // C1 controls (U+0080..U+009F) are multi-byte in UTF-8, so only now
    // visible; some terminals act on them.
    if let Some((position, character)) = text.char_indices().find(|(_, character)| character.is_control()) {
        return Err(SepError::ControlCharacter {
            position,
            character: format!("U+{:04X}", u32::from(character)),
            line: excerpt(content),
        });
    }
    Ok(text)
}

fn check_version(found: &str) -> Result<(), SepError> {
    if found == VERSION {
        Ok(())
    } else if found.starts_with("SEP/") {
        Err(SepError::UnsupportedVersion { found: excerpt(found.as_bytes()) })
    } else {
        Err(SepError::NotSep { found: excerpt(found.as_bytes()) })
    }
}

/// Checks a selector for what the wire needs; its meaning is the selector
/// module's business.
pub fn check_selector(selector: &str) -> Result<(), SepError> {
    let invalid = |problem| SepError::InvalidSelector { selector: excerpt(selector.as_bytes()), problem };
    if selector.is_empty() {
        return Err(invalid("it is empty"));
    }
    if selector.len() > MAX_SELECTOR {
        return Err(SepError::SelectorTooLong {
            length: selector.len(),
            limit: MAX_SELECTOR,
            selector: excerpt(selector.as_bytes()),
        });
    }
    if selector.contains(' ') {
        return Err(invalid("it contains a space"));
    }
    if selector.chars().any(char::is_control) {
        return Err(invalid("it contains a control character"));
    }
    Ok(())
}

/// Checks a service path for what the wire needs and rejects anything that
/// could step outside the served directory, so that no later layer has to
/// be the only line of defence. The exporter validates the name further.
pub fn check_path(path: &str) -> Result<(), SepError> {
    let invalid = |problem| SepError::InvalidPath { path: excerpt(path.as_bytes()), problem };
    if path.is_empty() {
        return Err(invalid("it is empty"));
    }
    if path.len() > MAX_PATH {
        return Err(SepError::PathTooLong { length: path.len(), limit: MAX_PATH, path: excerpt(path.as_bytes()) });
    }
    if path.starts_with('/') {
        return Err(invalid("it is absolute; service paths are relative to the served directory"));
    }
    if path.contains(' ') {
        return Err(invalid("it contains a space"));
    }
    if path.chars().any(char::is_control) {
        return Err(invalid("it contains a control character"));
    }
    for component in path.split('/') {
        match component {
            "" => return Err(invalid("it has an empty component (a doubled or trailing slash)")),
            "." => return Err(invalid("it has a \".\" component")),
            ".." => return Err(invalid("it has a \"..\" component, which would leave the served directory")),
            _ => {}
        }
    }
    Ok(())
}

/// A client's request, the first line of every SEP connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Request {
    /// `LIST [SELECTOR]`: the matching service paths, then the server closes.
    List(Option<String>),
    /// `CONNECT PATH`: relay raw bytes to and from that service.
    Connect(String),
    /// `WATCH [SELECTOR]`: the matching services, then changes as they happen.
    Watch(Option<String>),
    /// `PING`: a bare reachability check.
    Ping,
    /// `FORWARD [SELECTOR]`: over ssh only, where the tree is, whether ssh
    /// may forward to its sockets, and with a selector which of the
    /// sockets it picks may be connected to (see doc/sep.md).
    Forward(Option<String>),
}

impl Request {
    /// Parses a request line, with or without its `\n`.
    pub fn parse(line: &[u8]) -> Result<Request, SepError> {
        let text = line_text(line)?;
        if text.is_empty() {
            return Err(SepError::EmptyLine);
        }
        // The version is judged before the spacing so that a stray HTTP or
        // SSH client gets "not a SEP line" rather than a spacing complaint.
        let mut fields = text.split(' ');
        check_version(fields.next().unwrap_or_default())?;
        if text.split(' ').any(str::is_empty) {
            return Err(SepError::BadSpacing { line: excerpt(text.as_bytes()) });
        }
        let verb = fields.next().ok_or(SepError::MissingVerb)?;
        let argument = fields.next();
        let extra = fields.next();
        let unexpected = |verb, allowed, argument: &str| SepError::UnexpectedArgument {
            verb,
            allowed,
            argument: excerpt(argument.as_bytes()),
        };
        let selector = |verb| -> Result<Option<String>, SepError> {
            if let Some(extra) = extra {
                return Err(unexpected(verb, "at most one selector", extra));
            }
            match argument {
                Some(selector) => {
                    check_selector(selector)?;
                    Ok(Some(selector.to_owned()))
                }
                None => Ok(None),
            }
        };
        match verb {
            "LIST" => Ok(Request::List(selector("LIST")?)),
            "WATCH" => Ok(Request::Watch(selector("WATCH")?)),
            "CONNECT" => {
                let path = argument.ok_or(SepError::MissingArgument {
                    verb: "CONNECT",
                    expected: "a service path, e.g. \"SEP/1 CONNECT text/plain/sorter.hosta..0\"",
                })?;
                if let Some(extra) = extra {
                    return Err(unexpected("CONNECT", "exactly one service path", extra));
                }
                check_path(path)?;
                Ok(Request::Connect(path.to_owned()))
            }
            "PING" => match argument {
                Some(argument) => Err(unexpected("PING", "no arguments", argument)),
                None => Ok(Request::Ping),
            },
            "FORWARD" => Ok(Request::Forward(selector("FORWARD")?)),
            other => Err(SepError::UnknownVerb { verb: excerpt(other.as_bytes()) }),
        }
    }

    /// The verb as it appears on the wire, for logs.
    pub fn verb(&self) -> &'static str {
        match self {
            Request::List(_) => "LIST",
            Request::Connect(_) => "CONNECT",
            Request::Watch(_) => "WATCH",
            Request::Ping => "PING",
            Request::Forward(_) => "FORWARD",
        }
    }

    /// Checks a request built in code (rather than parsed) against the rules
    /// [`Request::parse`] enforces, so that `to_line` will not emit a line
    /// the server rejects.
    pub fn validate(&self) -> Result<(), SepError> {
        match self {
            Request::List(Some(selector)) | Request::Watch(Some(selector)) | Request::Forward(Some(selector)) => {
                check_selector(selector)
            }
            Request::Connect(path) => check_path(path),
            Request::List(None) | Request::Watch(None) | Request::Ping | Request::Forward(None) => Ok(()),
        }
    }

    /// The request line, `\n` included. Arguments are written as they are;
    /// call [`Request::validate`] first if they came from outside.
    pub fn to_line(&self) -> String {
        match self {
            Request::List(None) => format!("{VERSION} LIST\n"),
            Request::List(Some(selector)) => format!("{VERSION} LIST {selector}\n"),
            Request::Connect(path) => format!("{VERSION} CONNECT {path}\n"),
            Request::Watch(None) => format!("{VERSION} WATCH\n"),
            Request::Watch(Some(selector)) => format!("{VERSION} WATCH {selector}\n"),
            Request::Ping => format!("{VERSION} PING\n"),
            Request::Forward(None) => format!("{VERSION} FORWARD\n"),
            Request::Forward(Some(selector)) => format!("{VERSION} FORWARD {selector}\n"),
        }
    }
}

/// A status code. Codes this version does not know are kept as
/// [`Status::Other`] rather than guessed at, so a newer server's answer is
/// still reported faithfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// 200: the request is accepted; the verb's payload follows.
    Ok,
    /// 400: the request line could not be understood.
    BadRequest,
    /// 403: the service is not exported, or the client is not allowed.
    Forbidden,
    /// 404: there is no such service.
    NotFound,
    /// 500: the server failed in a way that is not the client's fault.
    Internal,
    /// 503: the service refused the connection, or the server is full.
    Unavailable,
    /// Any other code from 100 to 599. Never holds one of the codes above
    /// when produced by [`Status::from_code`] or by parsing.
    Other(u16),
}

impl Status {
    /// Maps a numeric code to its variant; unknown codes become `Other`.
    pub fn from_code(code: u16) -> Status {
        match code {
            200 => Status::Ok,
            400 => Status::BadRequest,
            403 => Status::Forbidden,
            404 => Status::NotFound,
            500 => Status::Internal,
            503 => Status::Unavailable,
            other => Status::Other(other),
        }
    }

    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::Internal => 500,
            Status::Unavailable => 503,
            Status::Other(code) => code,
        }
    }

    /// The standard reason text for this code.
    pub fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "bad request",
            Status::Forbidden => "forbidden",
            Status::NotFound => "no such service",
            Status::Internal => "internal error",
            Status::Unavailable => "service unavailable",
            Status::Other(_) => "unknown status",
        }
    }

    /// Whether the code is in the 2xx class, i.e. the verb's payload follows.
    pub fn is_success(self) -> bool {
        (200..300).contains(&self.code())
    }
}

/// The server's first line: `SEP/1 <CODE> <reason>`. The reason is free text
/// for humans; clients must act on the code alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StatusLine {
    pub status: Status,
    pub message: String,
}

impl StatusLine {
    /// A status line with the standard reason text.
    pub fn new(status: Status) -> StatusLine {
        StatusLine { status, message: status.reason().to_owned() }
    }

    /// A status line whose reason adds detail to the standard text, as in
    /// `SEP/1 404 no such service: text/plain/x.h..0`.
    pub fn with_detail(status: Status, detail: &str) -> StatusLine {
        StatusLine { status, message: format!("{}: {detail}", status.reason()) }
    }

    /// Parses a status line, with or without its `\n`.
    pub fn parse(line: &[u8]) -> Result<StatusLine, SepError> {
        let text = line_text(line)?;
        if text.is_empty() {
            return Err(SepError::EmptyLine);
        }
        let (version, rest) = text.split_once(' ').unwrap_or((text, ""));
        check_version(version)?;
        let (code_text, message) = match rest.split_once(' ') {
            Some(parts) => parts,
            None => (rest, ""),
        };
        let code =
            parse_code(code_text).ok_or_else(|| SepError::BadStatusCode { found: excerpt(code_text.as_bytes()) })?;
        if message.is_empty() {
            return Err(SepError::MissingReason { line: excerpt(text.as_bytes()) });
        }
        Ok(StatusLine { status: Status::from_code(code), message: message.to_owned() })
    }

    /// The status line, `\n` included. Because the reason often quotes
    /// client-supplied text, control characters in it are replaced by `?`
    /// and it is cut to keep the line within [`MAX_REQUEST_LINE`]: a status
    /// line must never be able to smuggle a second line to the client. An
    /// empty reason is replaced by the standard one, and an `Other` code
    /// outside 100..=599 is sent as 500, since the client could not parse it.
    pub fn to_line(&self) -> String {
        let code = match self.status.code() {
            code @ 100..=599 => code,
            _ => Status::Internal.code(),
        };
        let message = if self.message.is_empty() { Status::from_code(code).reason() } else { self.message.as_str() };
        let mut line = format!("{VERSION} {code} ");
        let room = MAX_REQUEST_LINE - 1 - line.len();
        let mut used = 0;
        for character in message.chars() {
            let character = if character.is_control() { '?' } else { character };
            used += character.len_utf8();
            if used > room {
                break;
            }
            line.push(character);
        }
        line.push('\n');
        line
    }
}

/// Three ASCII digits from 100 to 599, the only shape a code may take.
fn parse_code(text: &str) -> Option<u16> {
    let bytes = text.as_bytes();
    if bytes.len() != 3 || !bytes.iter().all(u8::is_ascii_digit) || !(b'1'..=b'5').contains(&bytes[0]) {
        return None;
    }
    text.parse().ok()
}

/// One line of a `WATCH` stream after the status line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Event {
    /// `+ PATH`: the service exists (initially) or has appeared.
    Added(String),
    /// `- PATH`: the service has gone.
    Removed(String),
    /// `= synced`: every service that existed at subscription time has been
    /// listed; what follows are changes.
    Synced,
    /// `.`: nothing happened for [`KEEPALIVE_SECS`]; the server is alive.
    Keepalive,
}

impl Event {
    /// Parses a `WATCH` stream line, with or without its `\n`.
    pub fn parse(line: &[u8]) -> Result<Event, SepError> {
        let text = line_text(line)?;
        if text.is_empty() {
            return Err(SepError::EmptyLine);
        }
        // The trailing space is tolerated because some hand-written servers
        // and test scripts emit ". " for keepalives.
        if text == "." || text == ". " {
            return Ok(Event::Keepalive);
        }
        if text == "= synced" {
            return Ok(Event::Synced);
        }
        if let Some(path) = text.strip_prefix("+ ") {
            check_path(path)?;
            return Ok(Event::Added(path.to_owned()));
        }
        if let Some(path) = text.strip_prefix("- ") {
            check_path(path)?;
            return Ok(Event::Removed(path.to_owned()));
        }
        Err(SepError::UnknownEvent { line: excerpt(text.as_bytes()) })
    }

    /// The event line, `\n` included; paths are written as they are.
    pub fn to_line(&self) -> String {
        match self {
            Event::Added(path) => format!("+ {path}\n"),
            Event::Removed(path) => format!("- {path}\n"),
            Event::Synced => "= synced\n".to_owned(),
            Event::Keepalive => ".\n".to_owned(),
        }
    }
}

/// Parses one line of a `LIST` answer (a bare service path), with or without
/// its `\n`.
pub fn parse_list_line(line: &[u8]) -> Result<String, SepError> {
    let text = line_text(line)?;
    if text.is_empty() {
        return Err(SepError::EmptyLine);
    }
    check_path(text)?;
    Ok(text.to_owned())
}

/// One line of a `LIST` answer, `\n` included.
pub fn format_list_line(path: &str) -> String {
    format!("{path}\n")
}

/// Assembles lines from a nonblocking stream one chunk at a time, holding at
/// most `limit` bytes.
///
/// [`LineReader::feed`] takes bytes up to and including the first `\n` and
/// says how many it took; the rest of the chunk is left with the caller.
/// That is what lets a server read a `CONNECT` request line and relay the
/// bytes that arrived in the same segment behind it. Typical use:
///
/// ```ignore
/// let mut offset = 0;
/// while offset < received {
///     offset += reader.feed(&buffer[offset..received]);
///     if let Some(line) = reader.next_line()? {
///         // buffer[offset..received] is what came after the line.
///     }
/// }
/// ```
///
/// Lines are returned with their `\n`, so the bytes fed and the bytes
/// returned always add up.
#[derive(Debug, Clone)]
pub struct LineReader {
    buffer: Vec<u8>,
    limit: usize,
    complete: bool,
    overflowed: bool,
}

impl Default for LineReader {
    fn default() -> Self {
        LineReader::new()
    }
}

impl LineReader {
    /// A reader with the protocol's limit, [`MAX_REQUEST_LINE`].
    pub fn new() -> LineReader {
        LineReader::with_limit(MAX_REQUEST_LINE)
    }

    /// A reader that accepts lines of at most `limit` bytes, newline
    /// included. A limit of 0 is raised to 1 (a lone `\n`).
    pub fn with_limit(limit: usize) -> LineReader {
        LineReader { buffer: Vec::new(), limit: limit.max(1), complete: false, overflowed: false }
    }

    #[cfg(test)]
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes bytes from `data` up to and including the first `\n` and
    /// returns how many it took. Takes nothing while a complete line waits
    /// for [`LineReader::next_line`], or after the limit was exceeded.
    pub fn feed(&mut self, data: &[u8]) -> usize {
        if self.complete || self.overflowed {
            return 0;
        }
        let room = self.limit - self.buffer.len();
        let window = &data[..data.len().min(room)];
        let taken = match window.iter().position(|&byte| byte == b'\n') {
            Some(index) => {
                self.complete = true;
                &window[..=index]
            }
            None => window,
        };
        self.reserve(taken.len());
        self.buffer.extend_from_slice(taken);
        if !self.complete && self.buffer.len() >= self.limit {
            // The newline could only come after the limit now, so the line
            // is already known to be too long; saying so at once spares the
            // server from waiting for the deadline.
            self.overflowed = true;
        }
        taken.len()
    }

    /// Grows the buffer geometrically but never past the limit, so a hostile
    /// peer cannot make it allocate more than `limit` bytes.
    fn reserve(&mut self, additional: usize) {
        let needed = self.buffer.len() + additional;
        if needed > self.buffer.capacity() {
            let target = needed.max(self.buffer.capacity() * 2).max(64).min(self.limit);
            self.buffer.reserve_exact(target - self.buffer.len());
        }
    }

    /// The next complete line, `\n` included, or `None` if more bytes are
    /// needed. Once the limit is exceeded this keeps returning
    /// [`SepError::LineTooLong`]; the connection cannot be resynchronised.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, SepError> {
        if self.overflowed {
            return Err(SepError::LineTooLong { limit: self.limit, start: excerpt(&self.buffer) });
        }
        if !self.complete {
            return Ok(None);
        }
        self.complete = false;
        Ok(Some(std::mem::take(&mut self.buffer)))
    }

    /// Bytes of a line still waiting for its `\n`.
    #[cfg(test)]
    pub fn partial(&self) -> &[u8] {
        if self.complete {
            &[]
        } else {
            &self.buffer
        }
    }

    /// Call at end of stream: fails if a line was cut off or too long.
    pub fn finish(&self) -> Result<(), SepError> {
        if self.overflowed {
            return Err(SepError::LineTooLong { limit: self.limit, start: excerpt(&self.buffer) });
        }
        if !self.complete && !self.buffer.is_empty() {
            return Err(SepError::UnexpectedEof { received: self.buffer.len() });
        }
        Ok(())
    }
}

/// Reads one line, `\n` included, of at most `limit` bytes from a blocking
/// reader.
///
/// It reads one byte per `read` call on purpose: a client reads the status
/// line and then hands the same socket to a relay, and any byte read past
/// the `\n` would be service payload lost to the relay. Status lines are
/// short and read once per connection, so the cost does not matter; do not
/// use this for bulk data. Wrap the reader in nothing that buffers ahead.
pub fn read_line<R: Read>(reader: &mut R, limit: usize) -> Result<Vec<u8>, SepError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if line.len() >= limit {
            return Err(SepError::LineTooLong { limit, start: excerpt(&line) });
        }
        match reader.read(&mut byte) {
            Ok(0) => return Err(SepError::UnexpectedEof { received: line.len() }),
            Ok(_) => {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    return Ok(line);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(SepError::Io(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(line: &str) -> Result<Request, SepError> {
        Request::parse(line.as_bytes())
    }

    // ---- requests: valid ----

    #[test]
    fn parses_every_verb() {
        assert_eq!(request("SEP/1 LIST").unwrap(), Request::List(None));
        assert_eq!(request("SEP/1 LIST text/*").unwrap(), Request::List(Some("text/*".into())));
        assert_eq!(
            request("SEP/1 CONNECT text/plain/sorter.hosta..0").unwrap(),
            Request::Connect("text/plain/sorter.hosta..0".into())
        );
        assert_eq!(request("SEP/1 WATCH").unwrap(), Request::Watch(None));
        assert_eq!(request("SEP/1 WATCH host=hosta").unwrap(), Request::Watch(Some("host=hosta".into())));
        assert_eq!(request("SEP/1 PING").unwrap(), Request::Ping);
    }

    #[test]
    fn accepts_newline_and_carriage_return_newline() {
        for line in ["SEP/1 PING", "SEP/1 PING\n", "SEP/1 PING\r\n", "SEP/1 PING\r"] {
            assert_eq!(request(line).unwrap(), Request::Ping, "{line:?}");
        }
    }

    #[test]
    fn accepts_utf8_arguments() {
        assert_eq!(request("SEP/1 LIST caf\u{e9}").unwrap(), Request::List(Some("caf\u{e9}".into())));
    }

    #[test]
    fn verb_names_match_the_wire() {
        for line in ["SEP/1 LIST", "SEP/1 CONNECT a", "SEP/1 WATCH", "SEP/1 PING"] {
            let parsed = request(line).unwrap();
            assert_eq!(line.split(' ').nth(1), Some(parsed.verb()));
        }
    }

    // ---- requests: invalid ----

    #[test]
    fn rejects_empty_lines() {
        assert!(matches!(request(""), Err(SepError::EmptyLine)));
        assert!(matches!(request("\n"), Err(SepError::EmptyLine)));
        assert!(matches!(request("\r\n"), Err(SepError::EmptyLine)));
    }

    #[test]
    fn rejects_wrong_version_and_foreign_protocols() {
        assert!(matches!(
            request("SEP/2 LIST"),
            Err(SepError::UnsupportedVersion { found }) if found == "SEP/2"
        ));
        assert!(matches!(
            request("GET / HTTP/1.1"),
            Err(SepError::NotSep { found }) if found == "GET"
        ));
        assert!(matches!(request("sep/1 LIST"), Err(SepError::NotSep { .. })));
        assert!(matches!(request(" SEP/1 LIST"), Err(SepError::NotSep { .. })));
    }

    #[test]
    fn rejects_bad_spacing() {
        for line in ["SEP/1  LIST", "SEP/1 LIST ", "SEP/1 LIST a  ", "SEP/1 CONNECT  a", "SEP/1 "] {
            assert!(matches!(request(line), Err(SepError::BadSpacing { .. })), "{line:?}");
        }
        // A tab is a control character, not a separator.
        assert!(matches!(request("SEP/1\tLIST"), Err(SepError::ControlCharacter { position: 5, .. })));
    }

    #[test]
    fn rejects_missing_and_unknown_verbs() {
        assert!(matches!(request("SEP/1"), Err(SepError::MissingVerb)));
        assert!(matches!(
            request("SEP/1 list"),
            Err(SepError::UnknownVerb { verb }) if verb == "list"
        ));
        assert!(matches!(request("SEP/1 DELETE x"), Err(SepError::UnknownVerb { .. })));
    }

    #[test]
    fn rejects_wrong_argument_counts() {
        assert!(matches!(request("SEP/1 CONNECT"), Err(SepError::MissingArgument { verb: "CONNECT", .. })));
        assert!(matches!(
            request("SEP/1 CONNECT a b"),
            Err(SepError::UnexpectedArgument { verb: "CONNECT", argument, .. }) if argument == "b"
        ));
        assert!(matches!(request("SEP/1 LIST a b"), Err(SepError::UnexpectedArgument { verb: "LIST", .. })));
        assert!(matches!(request("SEP/1 WATCH a b"), Err(SepError::UnexpectedArgument { verb: "WATCH", .. })));
        assert!(matches!(request("SEP/1 PING x"), Err(SepError::UnexpectedArgument { verb: "PING", .. })));
        assert!(matches!(request("SEP/1 FORWARD x y"), Err(SepError::UnexpectedArgument { verb: "FORWARD", .. })));
    }

    #[test]
    fn rejects_nul_and_control_characters() {
        assert!(matches!(Request::parse(b"SEP/1 CONNECT a\0b"), Err(SepError::NulByte { position: 15, .. })));
        assert!(matches!(Request::parse(b"SEP/1 LIST a\x1bb"), Err(SepError::ControlCharacter { position: 12, .. })));
        assert!(matches!(Request::parse(b"SEP/1 LIST a\x7f"), Err(SepError::ControlCharacter { .. })));
        // A second line inside the first is an embedded control character.
        assert!(matches!(
            Request::parse(b"SEP/1 PING\nSEP/1 PING\n"),
            Err(SepError::ControlCharacter { position: 10, .. })
        ));
        assert!(matches!(Request::parse(b"SEP/1 PING\r\r\n"), Err(SepError::ControlCharacter { .. })));
        // C1 control, U+0085, encoded in UTF-8.
        assert!(matches!(
            Request::parse(b"SEP/1 LIST a\xc2\x85"),
            Err(SepError::ControlCharacter { character, .. }) if character == "U+0085"
        ));
    }

    #[test]
    fn rejects_invalid_utf8() {
        assert!(matches!(Request::parse(b"SEP/1 LIST \xff\xfe"), Err(SepError::NotUtf8 { position: 11, .. })));
        assert!(matches!(Request::parse(b"SEP/1 LIST \xc3"), Err(SepError::NotUtf8 { .. })));
    }

    #[test]
    fn rejects_dangerous_connect_paths() {
        for (path, fragment) in [
            ("/etc/passwd", "absolute"),
            ("..", "\"..\""),
            ("../x", "\"..\""),
            ("text/../../x", "\"..\""),
            ("text/..", "\"..\""),
            (".", "\".\""),
            ("./x", "\".\""),
            ("text/./x", "\".\""),
            ("text//x", "empty component"),
            ("text/", "empty component"),
        ] {
            let error = request(&format!("SEP/1 CONNECT {path}")).unwrap_err();
            assert!(matches!(error, SepError::InvalidPath { .. }), "{path}: {error:?}");
            assert!(error.to_string().contains(fragment), "{path}: {error}");
        }
        // Dots inside a component are ordinary.
        assert!(request("SEP/1 CONNECT a/.b/c..d/e...").is_ok());
    }

    #[test]
    fn selector_and_path_checks_cover_what_parsing_cannot_reach() {
        assert!(matches!(check_selector(""), Err(SepError::InvalidSelector { .. })));
        assert!(matches!(check_selector("a b"), Err(SepError::InvalidSelector { .. })));
        assert!(matches!(check_selector("a\nb"), Err(SepError::InvalidSelector { .. })));
        assert!(matches!(check_path(""), Err(SepError::InvalidPath { .. })));
        assert!(matches!(check_path("a b"), Err(SepError::InvalidPath { .. })));
        assert!(matches!(check_path("a\tb"), Err(SepError::InvalidPath { .. })));
    }

    #[test]
    fn validate_catches_bad_built_requests() {
        assert!(Request::Connect("../x".into()).validate().is_err());
        assert!(Request::Connect("a\nSEP/1 PING".into()).validate().is_err());
        assert!(Request::List(Some(String::new())).validate().is_err());
        assert!(Request::Watch(Some("a b".into())).validate().is_err());
        assert!(Request::Ping.validate().is_ok());
        assert!(Request::List(None).validate().is_ok());
        assert!(Request::Connect("text/plain/x.h..0".into()).validate().is_ok());
    }

    // ---- requests: boundaries ----

    #[test]
    fn selector_length_boundary() {
        let longest = "s".repeat(MAX_SELECTOR);
        assert_eq!(request(&format!("SEP/1 LIST {longest}")).unwrap(), Request::List(Some(longest.clone())));
        let too_long = format!("{longest}s");
        assert!(matches!(
            request(&format!("SEP/1 WATCH {too_long}")),
            Err(SepError::SelectorTooLong { length: 4001, limit: 4000, .. })
        ));
    }

    #[test]
    fn path_length_boundary() {
        let longest = "p".repeat(MAX_PATH);
        assert!(request(&format!("SEP/1 CONNECT {longest}")).is_ok());
        assert!(matches!(
            request(&format!("SEP/1 CONNECT {longest}p")),
            Err(SepError::PathTooLong { length: 4001, .. })
        ));
        assert!(matches!(check_path(&format!("{longest}p")), Err(SepError::PathTooLong { .. })));
    }

    #[test]
    fn line_length_boundary_counts_the_newline() {
        // Selectors and paths have their own, smaller limits, so the line
        // limit is probed through a status line, whose reason is unbounded.
        let prefix = "SEP/1 200 ";
        let fits = format!("{prefix}{}", "r".repeat(MAX_REQUEST_LINE - 1 - prefix.len()));
        assert_eq!(fits.len() + 1, MAX_REQUEST_LINE);
        assert!(StatusLine::parse(fits.as_bytes()).is_ok());
        assert!(StatusLine::parse(format!("{fits}\n").as_bytes()).is_ok());
        let over = format!("{fits}r");
        assert!(matches!(StatusLine::parse(over.as_bytes()), Err(SepError::LineTooLong { limit: 4096, .. })));
        // The \r of a \r\n ending counts against the limit too.
        assert!(matches!(StatusLine::parse(format!("{fits}\r\n").as_bytes()), Err(SepError::LineTooLong { .. })));
        assert!(matches!(Request::parse(&[b'a'; 10_000]), Err(SepError::LineTooLong { .. })));
    }

    #[test]
    fn error_excerpts_are_short_and_escaped() {
        let mut line = b"GET".to_vec();
        line.extend(std::iter::repeat_n(b'\xff', 1000));
        let message = Request::parse(&line).unwrap_err().to_string();
        assert!(message.len() < 400, "{message}");
        assert!(message.contains("\\xff"), "{message}");
        assert!(message.contains("..."), "{message}");
        let message = request("SEP/1 CONNECT \"x/../y").unwrap_err().to_string();
        assert!(message.contains("\\\"x/../y"), "{message}");
    }

    // ---- requests: round trip ----

    #[test]
    fn requests_round_trip() {
        for value in [
            Request::List(None),
            Request::List(Some("text/*".into())),
            Request::Connect("text/plain/sorter.hosta..0".into()),
            Request::Watch(None),
            Request::Watch(Some("h\u{e9}".into())),
            Request::Ping,
            Request::Forward(None),
            Request::Forward(Some("sorter".into())),
        ] {
            let line = value.to_line();
            assert!(line.ends_with('\n') && line.starts_with("SEP/1 "));
            assert_eq!(Request::parse(line.as_bytes()).unwrap(), value);
        }
    }

    // ---- status lines ----

    #[test]
    fn status_codes_and_reasons() {
        let table = [
            (Status::Ok, 200, "OK"),
            (Status::BadRequest, 400, "bad request"),
            (Status::Forbidden, 403, "forbidden"),
            (Status::NotFound, 404, "no such service"),
            (Status::Internal, 500, "internal error"),
            (Status::Unavailable, 503, "service unavailable"),
        ];
        for (status, code, reason) in table {
            assert_eq!(status.code(), code);
            assert_eq!(status.reason(), reason);
            assert_eq!(Status::from_code(code), status);
            assert_eq!(StatusLine::new(status).to_line(), format!("SEP/1 {code} {reason}\n"));
        }
        assert_eq!(Status::from_code(201), Status::Other(201));
        assert!(Status::Other(204).is_success());
        assert!(Status::Ok.is_success());
        assert!(!Status::NotFound.is_success());
    }

    #[test]
    fn parses_status_lines() {
        assert_eq!(StatusLine::parse(b"SEP/1 200 OK\n").unwrap(), StatusLine::new(Status::Ok));
        let detailed = StatusLine::parse(b"SEP/1 404 no such service: text/plain/x.h..0\r\n").unwrap();
        assert_eq!(detailed.status, Status::NotFound);
        assert_eq!(detailed.message, "no such service: text/plain/x.h..0");
        assert_eq!(detailed, StatusLine::with_detail(Status::NotFound, "text/plain/x.h..0"));
        assert_eq!(StatusLine::parse(b"SEP/1 429 slow down").unwrap().status, Status::Other(429));
        // The reason is free text and kept verbatim, spaces included.
        assert_eq!(StatusLine::parse(b"SEP/1 500  odd  spacing ").unwrap().message, " odd  spacing ");
    }

    #[test]
    fn rejects_bad_status_lines() {
        for (line, check) in [
            (&b"SEP/1 2000 OK"[..], "code"),
            (b"SEP/1 20 OK", "code"),
            (b"SEP/1 600 OK", "code"),
            (b"SEP/1 099 OK", "code"),
            (b"SEP/1 +20 OK", "code"),
            (b"SEP/1 abc OK", "code"),
            (b"SEP/1", "code"),
            (b"SEP/1  200 OK", "code"),
            (b"SEP/1 200", "reason"),
            (b"SEP/1 200 ", "reason"),
            (b"HTTP/1.0 200 OK", "version"),
            (b"SEP/9 200 OK", "version"),
            (b"", "empty"),
            (b"SEP/1 200 O\0K", "nul"),
        ] {
            let result = StatusLine::parse(line);
            let ok = match check {
                "code" => matches!(result, Err(SepError::BadStatusCode { .. })),
                "reason" => matches!(result, Err(SepError::MissingReason { .. })),
                "version" => matches!(result, Err(SepError::NotSep { .. } | SepError::UnsupportedVersion { .. })),
                "empty" => matches!(result, Err(SepError::EmptyLine)),
                _ => matches!(result, Err(SepError::NulByte { .. })),
            };
            assert!(ok, "{:?} gave {result:?}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn status_line_output_cannot_smuggle_lines() {
        let hostile = StatusLine::with_detail(Status::NotFound, "x\nSEP/1 200 OK\r");
        let line = hostile.to_line();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.ends_with('\n'));
        assert_eq!(StatusLine::parse(line.as_bytes()).unwrap().message, "no such service: x?SEP/1 200 OK?");
    }

    #[test]
    fn status_line_output_is_bounded_and_repaired() {
        let huge = StatusLine::with_detail(Status::Internal, &"\u{e9}".repeat(5000));
        let line = huge.to_line();
        assert!(line.len() <= MAX_REQUEST_LINE);
        assert!(StatusLine::parse(line.as_bytes()).is_ok());
        let empty = StatusLine { status: Status::Forbidden, message: String::new() };
        assert_eq!(empty.to_line(), "SEP/1 403 forbidden\n");
        let absurd = StatusLine { status: Status::Other(7), message: "x".into() };
        assert_eq!(absurd.to_line(), "SEP/1 500 x\n");
    }

    // ---- watch events and list lines ----

    #[test]
    fn parses_events() {
        let cases: [(&[u8], Event); 7] = [
            (b"+ text/plain/a.h..0\n", Event::Added("text/plain/a.h..0".into())),
            (b"- text/plain/a.h..0", Event::Removed("text/plain/a.h..0".into())),
            (b"= synced\n", Event::Synced),
            (b".\n", Event::Keepalive),
            (b". \n", Event::Keepalive),
            (b".\r\n", Event::Keepalive),
            (b"+ local/text/x.h..1\r\n", Event::Added("local/text/x.h..1".into())),
        ];
        for (line, expected) in cases {
            assert_eq!(Event::parse(line).unwrap(), expected);
        }
    }

    #[test]
    fn rejects_bad_events() {
        for line in [&b"+"[..], b"+text/a", b"+  text/a", b"* text/a", b"= Synced", b"=synced", b"..", b".  ", b"OK"] {
            assert!(
                matches!(Event::parse(line), Err(SepError::UnknownEvent { .. } | SepError::InvalidPath { .. })),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        assert!(matches!(Event::parse(b""), Err(SepError::EmptyLine)));
        assert!(matches!(Event::parse(b"+ ../etc"), Err(SepError::InvalidPath { .. })));
        assert!(matches!(Event::parse(b"- /abs"), Err(SepError::InvalidPath { .. })));
        assert!(matches!(Event::parse(b"+ a b"), Err(SepError::InvalidPath { .. })));
    }

    #[test]
    fn events_round_trip() {
        for event in [
            Event::Added("text/plain/a.h..0".into()),
            Event::Removed("b/c.h..12".into()),
            Event::Synced,
            Event::Keepalive,
        ] {
            assert_eq!(Event::parse(event.to_line().as_bytes()).unwrap(), event);
        }
    }

    #[test]
    fn list_lines() {
        assert_eq!(parse_list_line(b"text/plain/sorter.hosta..0\n").unwrap(), "text/plain/sorter.hosta..0");
        assert_eq!(parse_list_line(b"a\r\n").unwrap(), "a");
        assert!(matches!(parse_list_line(b"\n"), Err(SepError::EmptyLine)));
        assert!(matches!(parse_list_line(b"/abs\n"), Err(SepError::InvalidPath { .. })));
        assert!(matches!(parse_list_line(b"a/../b"), Err(SepError::InvalidPath { .. })));
        let line = format_list_line("x/y.h..0");
        assert_eq!(line, "x/y.h..0\n");
        assert_eq!(parse_list_line(line.as_bytes()).unwrap(), "x/y.h..0");
    }

    // ---- LineReader ----

    #[test]
    fn line_reader_leaves_payload_after_the_line() {
        let mut reader = LineReader::new();
        let segment = b"SEP/1 CONNECT a/b.h..0\n\x00\x01payload";
        let taken = reader.feed(segment);
        assert_eq!(&segment[taken..], b"\x00\x01payload");
        let line = reader.next_line().unwrap().unwrap();
        assert_eq!(line, b"SEP/1 CONNECT a/b.h..0\n");
        assert_eq!(Request::parse(&line).unwrap(), Request::Connect("a/b.h..0".into()));
        assert_eq!(reader.next_line().unwrap(), None);
    }

    #[test]
    fn line_reader_assembles_byte_by_byte() {
        let mut reader = LineReader::new();
        let stream = b"+ a\n= synced\n.\n";
        let mut lines = Vec::new();
        for byte in stream {
            assert_eq!(reader.feed(std::slice::from_ref(byte)), 1);
            if let Some(line) = reader.next_line().unwrap() {
                lines.push(line);
            }
        }
        assert_eq!(lines, [&b"+ a\n"[..], b"= synced\n", b".\n"]);
        assert!(reader.partial().is_empty());
        assert!(reader.finish().is_ok());
    }

    #[test]
    fn line_reader_holds_a_pending_line() {
        let mut reader = LineReader::new();
        assert_eq!(reader.feed(b"one\ntwo\n"), 4);
        // Nothing more is taken until the complete line is collected.
        assert_eq!(reader.feed(b"two\n"), 0);
        assert!(reader.partial().is_empty());
        assert_eq!(reader.next_line().unwrap().unwrap(), b"one\n");
        assert_eq!(reader.feed(b"two\n"), 4);
        assert_eq!(reader.next_line().unwrap().unwrap(), b"two\n");
        assert_eq!(reader.feed(b""), 0);
        assert_eq!(reader.next_line().unwrap(), None);
    }

    #[test]
    fn line_reader_limit_boundary() {
        let mut reader = LineReader::with_limit(5);
        assert_eq!(reader.limit(), 5);
        assert_eq!(reader.feed(b"abcd\nrest"), 5);
        assert_eq!(reader.next_line().unwrap().unwrap(), b"abcd\n");

        let mut reader = LineReader::with_limit(5);
        assert_eq!(reader.feed(b"abcd"), 4);
        assert_eq!(reader.next_line().unwrap(), None);
        assert_eq!(reader.partial(), b"abcd");
        // The fifth byte is not a newline: too long, known immediately.
        assert_eq!(reader.feed(b"e\n"), 1);
        assert!(matches!(reader.next_line(), Err(SepError::LineTooLong { limit: 5, .. })));
        assert!(matches!(reader.next_line(), Err(SepError::LineTooLong { .. })));
        assert_eq!(reader.feed(b"\n"), 0);
        assert!(matches!(reader.finish(), Err(SepError::LineTooLong { .. })));
    }

    #[test]
    fn line_reader_default_limit_and_memory_bound() {
        let mut reader = LineReader::default();
        assert_eq!(reader.limit(), MAX_REQUEST_LINE);
        let flood = vec![b'x'; 100_000];
        assert_eq!(reader.feed(&flood), MAX_REQUEST_LINE);
        assert!(reader.buffer.capacity() <= MAX_REQUEST_LINE);
        assert!(matches!(reader.next_line(), Err(SepError::LineTooLong { .. })));

        let mut reader = LineReader::with_limit(0);
        assert_eq!(reader.limit(), 1);
        assert_eq!(reader.feed(b"\n"), 1);
        assert_eq!(reader.next_line().unwrap().unwrap(), b"\n");
    }

    #[test]
    fn line_reader_reports_cut_off_lines() {
        let mut reader = LineReader::new();
        reader.feed(b"SEP/1 LI");
        assert!(matches!(reader.finish(), Err(SepError::UnexpectedEof { received: 8 })));
        assert!(LineReader::new().finish().is_ok());
    }

    // ---- read_line ----

    /// A reader that hands out one scripted chunk per call, to show that
    /// `read_line` neither over-reads nor gives up on `Interrupted`.
    struct Script(Vec<std::io::Result<Vec<u8>>>);

    impl Read for Script {
        fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Ok(0);
            }
            match self.0.remove(0) {
                Ok(mut chunk) => {
                    let count = chunk.len().min(buffer.len());
                    buffer[..count].copy_from_slice(&chunk[..count]);
                    if count < chunk.len() {
                        self.0.insert(0, Ok(chunk.split_off(count)));
                    }
                    Ok(count)
                }
                Err(error) => Err(error),
            }
        }
    }

    #[test]
    fn read_line_does_not_over_read() {
        let mut source: &[u8] = b"SEP/1 200 OK\npayload";
        let line = read_line(&mut source, MAX_REQUEST_LINE).unwrap();
        assert_eq!(line, b"SEP/1 200 OK\n");
        assert_eq!(source, b"payload");
        assert_eq!(StatusLine::parse(&line).unwrap(), StatusLine::new(Status::Ok));
    }

    #[test]
    fn read_line_retries_interrupted_reads() {
        let mut script = Script(vec![
            Ok(b"SEP/".to_vec()),
            Err(std::io::ErrorKind::Interrupted.into()),
            Ok(b"1 200 OK\nx".to_vec()),
        ]);
        assert_eq!(read_line(&mut script, 100).unwrap(), b"SEP/1 200 OK\n");
    }

    #[test]
    fn read_line_errors() {
        let mut source: &[u8] = b"SEP/1 2";
        assert!(matches!(read_line(&mut source, 100), Err(SepError::UnexpectedEof { received: 7 })));
        let mut source: &[u8] = b"";
        assert!(matches!(read_line(&mut source, 100), Err(SepError::UnexpectedEof { received: 0 })));
        let mut source: &[u8] = b"abcd\n";
        assert!(matches!(read_line(&mut source, 4), Err(SepError::LineTooLong { limit: 4, .. })));
        let mut source: &[u8] = b"abc\n";
        assert_eq!(read_line(&mut source, 4).unwrap(), b"abc\n");
        let mut script = Script(vec![Err(std::io::ErrorKind::ConnectionReset.into())]);
        assert!(matches!(
            read_line(&mut script, 100),
            Err(SepError::Io(error)) if error.kind() == std::io::ErrorKind::ConnectionReset
        ));
    }

    // ---- deterministic fuzzing ----

    use crate::test_random::XorShift;

    const PREFIXES: &[&[u8]] =
        &[b"", b"SEP/1 ", b"SEP/1 LIST ", b"SEP/1 CONNECT ", b"SEP/1 WATCH ", b"SEP/1 200 ", b"+ ", b"- "];

    const PIECES: &[&[u8]] = &[
        b"SEP/1",
        b"SEP/2",
        b" ",
        b" ",
        b"LIST",
        b"CONNECT",
        b"WATCH",
        b"PING",
        b"text",
        b"/",
        b"/",
        b"plain",
        b"sorter.hosta..0",
        b".",
        b"..",
        b"\r",
        b"\n",
        b"\0",
        b"\t",
        b"\xc3\xa9",
        b"\xff",
        b"\xc2\x85",
        b"*",
        b"200",
        b"404",
        b"OK",
        b"+",
        b"-",
        b"=",
        b"synced",
        b"x",
    ];

    fn random_line(random: &mut XorShift) -> Vec<u8> {
        let mut line = PREFIXES[random.below(PREFIXES.len())].to_vec();
        for _ in 0..random.below(7) {
            if random.below(12) == 0 {
                line.push(random.next() as u8);
            } else {
                line.extend_from_slice(PIECES[random.below(PIECES.len())]);
            }
        }
        if random.below(20) == 0 {
            line.extend(std::iter::repeat_n(b'a', random.below(2 * MAX_REQUEST_LINE)));
        }
        line
    }

    /// What `to_line` should produce for an accepted line: the same text
    /// with a plain `\n` ending.
    fn canonical(line: &[u8]) -> Vec<u8> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let mut line = line.strip_suffix(b"\r").unwrap_or(line).to_vec();
        line.push(b'\n');
        line
    }

    #[test]
    fn fuzz_parsers_never_panic_and_accepted_lines_round_trip() {
        let mut random = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut accepted = [0usize; 4];
        for _ in 0..40_000 {
            let line = random_line(&mut random);
            if let Ok(value) = Request::parse(&line) {
                accepted[0] += 1;
                assert_eq!(value.to_line().as_bytes(), canonical(&line));
                assert!(value.validate().is_ok());
                assert_eq!(Request::parse(value.to_line().as_bytes()).unwrap(), value);
            }
            if let Ok(value) = StatusLine::parse(&line) {
                accepted[1] += 1;
                assert_eq!(value.to_line().as_bytes(), canonical(&line));
                assert_eq!(StatusLine::parse(value.to_line().as_bytes()).unwrap(), value);
            }
            if let Ok(value) = Event::parse(&line) {
                accepted[2] += 1;
                assert_eq!(Event::parse(value.to_line().as_bytes()).unwrap(), value);
            }
            if let Ok(path) = parse_list_line(&line) {
                accepted[3] += 1;
                assert!(check_path(&path).is_ok());
                assert_eq!(parse_list_line(format_list_line(&path).as_bytes()).unwrap(), path);
            }
        }
        // Guard against a generator that never reaches the accepting paths.
        for count in accepted {
            assert!(count > 100, "{accepted:?}");
        }
    }

    #[test]
    fn fuzz_line_reader_loses_and_invents_nothing() {
        let mut random = XorShift(0x2545_f491_4f6c_dd1d);
        for _ in 0..2_000 {
            let limit = 1 + random.below(40);
            let stream: Vec<u8> = (0..random.below(300))
                .map(|_| match random.below(6) {
                    0 => b'\n',
                    _ => random.next() as u8,
                })
                .collect();
            let mut reader = LineReader::with_limit(limit);
            let mut rebuilt = Vec::new();
            let mut offset = 0;
            let mut failed = false;
            while offset < stream.len() && !failed {
                let end = (offset + 1 + random.below(50)).min(stream.len());
                let mut position = offset;
                while position < end {
                    let taken = reader.feed(&stream[position..end]);
                    position += taken;
                    match reader.next_line() {
                        Ok(Some(line)) => {
                            assert!(line.len() <= limit);
                            assert_eq!(line.last(), Some(&b'\n'));
                            assert_eq!(line.iter().filter(|&&byte| byte == b'\n').count(), 1);
                            rebuilt.extend_from_slice(&line);
                        }
                        Ok(None) => assert!(taken > 0 || position == end),
                        Err(SepError::LineTooLong { .. }) => {
                            failed = true;
                            break;
                        }
                        Err(error) => panic!("unexpected {error:?}"),
                    }
                }
                offset = position;
            }
            if failed {
                // The overflowing line really had no newline within the limit.
                let start = rebuilt.len();
                let window = &stream[start..(start + limit).min(stream.len())];
                assert_eq!(window.len(), limit);
                assert!(!window.contains(&b'\n'));
            } else {
                rebuilt.extend_from_slice(reader.partial());
                assert_eq!(rebuilt, stream);
            }
        }
    }
}
