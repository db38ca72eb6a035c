//! Mirroring a remote host's services as local proxy sockets, kept in sync.
//!
//! An [`Importer`] holds one WATCH session with an exporter. Every `+ PATH`
//! becomes a proxy socket at the same protocol path and name in the import
//! scope (`imported/` for LAN imports), every `- PATH` removes it again.
//! A client connecting to a proxy becomes a CONNECT to the exporter, and
//! from its status line on, the shared relay moves the bytes; all in the
//! caller's mio loop, without a thread or process per connection.
//!
//! The session is judged by what arrives: the exporter sends a keepalive
//! every 5 s, so [`SILENCE`] without a byte means the peer or the path is
//! gone (a pulled cable, a suspended laptop). Then every proxy is removed,
//! and the session is retried with capped exponential backoff; the proxies
//! come back with the next sync. Connections already relayed are not cut:
//! each has its own TCP connection and fails or finishes on its own.
//!
//! Over ssh (`ssh://`) the session is an ssh process on one shared ssh
//! connection (see `ssh`), the proxies live in the user's private scope,
//! and only the remote `local/` and `exported/` scopes are mirrored. Where
//! sshd forwards to UNIX sockets (it does by default), each proxy is a
//! socket the ssh master listens on and forwards itself, placed in the tree
//! by us; otherwise each connection is one more ssh process, and the bytes
//! are spliced between the client's socket and its pipes by the relay.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};

use crate::event_loop::{self, Timers};
use crate::forked::Forked;
use crate::linger::{Lingering, LINGER_CHECK};
use crate::name::{Scope, ServicePath};
use crate::net::DescriptorReserve;
use crate::relay::{Relay, Way};
use crate::resolve::{resolve, Lookup, Resolution};
use crate::sep::{self, Event, LineReader, Request, StatusLine};
use crate::sep_client::Server;
use crate::ssh::{SshChannel, SshTarget};
use crate::tree::{PlacedSocket, ServiceSocket, SocketOptions, Tree};

/// No byte from the exporter for this long: three keepalives missed.
pub const SILENCE: Duration = Duration::from_secs(3 * sep::KEEPALIVE_SECS);
/// How long a connection attempt or a CONNECT's status line may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A session lost sooner than this after its sync was a flap (see
/// [`Importer::flap_hold`]); one that lasted longer was a working import.
pub const STEADY: Duration = Duration::from_secs(60);
/// After a flap, the next session waits at least this many times as long
/// as the flapping session's sync took, announcements or not.
const FLAP_HOLD_FACTOR: u32 = 4;
/// The longest such wait.
const MAX_FLAP_HOLD: Duration = Duration::from_secs(300);
/// The wait after the exporter refused the session (a 4xx status: we are
/// not on its allow list, say), about one announcement interval, doubling
/// to [`MAX_REFUSAL_BACKOFF`]. A refusal is an answer, not a fault: it
/// stands until someone changes the exporter's configuration, so asking
/// again at every announcement (every 5 s, for ever) only fills two logs.
pub const FIRST_REFUSAL_BACKOFF: Duration = Duration::from_secs(5);
pub const MAX_REFUSAL_BACKOFF: Duration = Duration::from_secs(300);
/// A refusal that goes on is warned of again after this long, so that a
/// log read later still says why the host is missing.
pub const REFUSAL_REWARN: Duration = Duration::from_secs(3600);

const SESSION: usize = 0;
const TIMER_SESSION: usize = usize::MAX;
/// When lingering ssh processes are looked at again (see [`LINGER_CHECK`]).
const TIMER_LINGER: usize = usize::MAX - 1;
/// Most bytes of the session read in one turn of the event loop. An
/// exporter that sends without a pause never lets a read say EAGAIN:
/// unbounded, the loop (which dipusd's exporter and relays share) would
/// never get back to them, and the lines read but not yet applied would
/// fill memory. The rest is read on the next turn.
const SESSION_READ_BUDGET: usize = 256 * 1024;
/// Most session lines read in one turn (the few KiB of one read past it
/// still count): each `+` makes a proxy socket, some 0.5 ms of work, and
/// an exporter announcing 17,000 services held dipusd's whole loop (its
/// exporter, discovery, every other import) for 10 s in one turn.
const SESSION_LINES_PER_TURN: usize = 256;
const PROXY_BASE: usize = 1;
const LINK_BASE: usize = 1 << 40;
/// Tokens per link: the remote's read side, the client, the remote's
/// write side (ssh's stdin).
const LINK_STRIDE: usize = 4;

/// How the exporter is reached.
#[derive(Debug, Clone)]
pub enum Dialer {
    Sep(Server),
    Ssh(SshTarget),
}

impl Dialer {
    pub fn uri(&self) -> String {
        match self {
            Dialer::Sep(server) => format!("sep://{}", server.authority()),
            Dialer::Ssh(ssh) => ssh.uri(),
        }
    }

    /// The local path (relative to the import scope) for a remote one, if
    /// it is imported at all.
    fn local_path<'a>(&self, wire: &'a str) -> Option<&'a str> {
        match self {
            Dialer::Sep(_) => Some(wire),
            Dialer::Ssh(_) => crate::ssh::importable(wire),
        }
    }

    /// The other remote paths that have `wire`'s local path: over ssh the
    /// remote `local/` and `exported/` meet in one scope here.
    fn namesakes(&self, wire: &str) -> Vec<String> {
        match (self, self.local_path(wire)) {
            (Dialer::Ssh(_), Some(local)) => crate::ssh::IMPORTED_SCOPES
                .iter()
                .map(|scope| format!("{scope}/{local}"))
                .filter(|other| other != wire)
                .collect(),
            _ => Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ImportConfig {
    pub dialer: Dialer,
    /// Which services to mirror (a selector, sent with WATCH).
    pub selector: Option<String>,
    pub scope: Scope,
    pub options: SocketOptions,
    /// This host's name, as its own services carry it (`NAME.HOST..N`):
    /// a sep:// exporter whose services all carry it is this very host
    /// (`sep://localhost`, say), and is not imported. Over ssh the remote
    /// tree is the user's to choose, and is not judged.
    pub own_host: Option<String>,
}

enum Session {
    /// Waiting to try again.
    Idle { retry_at: Instant },
    /// The exporter's host name being looked up (by a child process).
    Resolving { lookup: Lookup },
    /// TCP connect in progress.
    Connecting { tcp: TcpStream, address: SocketAddr, since: Instant },
    /// WATCH sent; reading the status line and events.
    Watching { stream: Remote, lines: LineReader, status_read: bool, last_heard: Instant },
}

/// The far end of a session or a connection: a TCP socket to the exporter
/// (`address` is where further connections go), or an ssh process.
enum Remote {
    Tcp { tcp: TcpStream, address: SocketAddr },
    Ssh(Box<SshChannel>),
}

impl Remote {
    /// The descriptor replies are read from.
    fn read_fd(&self) -> RawFd {
        match self {
            Remote::Tcp { tcp, .. } => tcp.as_raw_fd(),
            Remote::Ssh(channel) => channel.output.as_raw_fd(),
        }
    }

    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Remote::Tcp { tcp, .. } => tcp.read(buffer),
            Remote::Ssh(channel) => {
                // SAFETY: reading into our buffer from our own pipe.
                let count = unsafe { libc::read(channel.output.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
                if count < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(count as usize)
                }
            }
        }
    }

    fn deregister(&mut self, registry: &Registry) {
        match self {
            Remote::Tcp { tcp, .. } => {
                let _ = registry.deregister(tcp);
            }
            Remote::Ssh(channel) => {
                let _ = registry.deregister(&mut mio::unix::SourceFd(&channel.output.as_raw_fd()));
                if let Some(input) = &channel.input {
                    let _ = registry.deregister(&mut mio::unix::SourceFd(&input.as_raw_fd()));
                }
            }
        }
    }
}

/// Where a proxied connection is.
enum LinkState {
    Connecting,
    ReadingStatus,
    Relaying(Box<Relay>),
}

struct Link {
    client: UnixStream,
    remote: Remote,
    path: String,
    state: LinkState,
    /// Over ssh: the status line as it arrives, a byte at a time (a pipe
    /// cannot be peeked, and what follows it belongs to the relay).
    status: Vec<u8>,
    since: Instant,
}

/// A mirrored service: our own listener, each client a CONNECT (or an
/// ssh session); or, over ssh where sshd allows it, a socket the shared
/// connection's master listens on and forwards by itself, as `ssh -L`
/// does, with no process of ours in the path.
enum Proxy {
    Listening { socket: ServiceSocket, id: usize, _slot: ProxySlot },
    Forwarded { socket: PlacedSocket, remote: String },
}

/// Most services one import mirrors: a bound on what an exporter (any
/// host on the allowed networks, for dipusd) can make an importer create.
pub const MAX_PROXIES: usize = sep::MAX_SERVICES;

/// Listening proxies of this process, all imports together: each holds a
/// descriptor, and connections need theirs too.
static LISTENING_PROXIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One listening proxy's share of [`LISTENING_PROXIES`], given back when
/// the proxy goes, however it goes.
struct ProxySlot;

impl ProxySlot {
    /// A slot, unless proxies already hold three quarters of the
    /// descriptor limit: the last quarter is for connections (two
    /// descriptors each) and everything else, which an exporter
    /// announcing without end would otherwise leave none of.
    fn take() -> Option<ProxySlot> {
        use std::sync::atomic::Ordering;
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft.min(usize::MAX as u64) as usize);
        let most = limit / 4 * 3;
        LISTENING_PROXIES
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |live| (live < most).then_some(live + 1))
            .ok()
            .map(|_| ProxySlot)
    }
}

impl Drop for ProxySlot {
    fn drop(&mut self) {
        LISTENING_PROXIES.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether ssh may carry connections by itself (`SshTarget::probe_forwarding`).
enum Forwarding {
    /// Not known yet (and never asked for sep://).
    Unknown,
    /// Asked by a child process, which reports its answer, one line, on a
    /// pipe the loop watches: the probe waits on ssh, the loop must not.
    Probing {
        probe: Forked,
        since: Instant,
    },
    /// Yes, to sockets under this remote root.
    Yes(String),
    No,
}

/// The probe's answer pipe, among the importer's tokens.
const PROBE: usize = LINK_BASE - 1;
/// A probe without an answer by then is stuck (its own bounds are 20 s
/// for the session and 10 s for each `ssh -O`): killed, and the session
/// counts as failed.
const PROBE_LIMIT: Duration = Duration::from_secs(60);

/// Forks a child that runs [`SshTarget::probe_forwarding`] and writes one
/// line, `yes ROOT`, `no` or `error MESSAGE`, before it exits. Before it,
/// a line `forward LISTEN<tab>REMOTE` for each forward it asks ssh for,
/// which it withdraws before it answers: a child stopped before its answer
/// cannot, and [`stop_probe`] does it instead.
fn start_probe(ssh: &SshTarget, tree: &Tree) -> io::Result<Forked> {
    Forked::start(|report| {
        // Paths that ssh may forward hold no control characters.
        let mut making = |listen: &std::path::Path, remote: &str| {
            let _ = (&*report).write_all(format!("forward {}\t{remote}\n", listen.display()).as_bytes());
        };
        let text = match ssh.probe_forwarding(tree, None, &mut making) {
            Ok(Some(forwarding)) => format!("yes {}", forwarding.root),
            Ok(None) => "no".to_string(),
            Err(error) => format!("error {}", error.to_string().replace('\n', " ")),
        };
        // One write of a short line: it arrives whole.
        let _ = (&*report).write_all(format!("{text}\n").as_bytes());
    })
}

/// What a probe child has reported so far: the forwards it made, and its
/// answer line once that has come.
fn probe_report(text: &[u8]) -> (Vec<(std::path::PathBuf, String)>, Option<String>) {
    let text = String::from_utf8_lossy(text);
    let mut forwards = Vec::new();
    for line in text.split_inclusive('\n').filter(|line| line.ends_with('\n')) {
        let line = line.trim_end_matches('\n');
        match line.strip_prefix("forward ").and_then(|rest| rest.split_once('\t')) {
            Some((listen, remote)) => forwards.push((std::path::PathBuf::from(listen), remote.to_string())),
            None => return (forwards, Some(line.to_string())),
        }
    }
    (forwards, None)
}

/// Ends a probe child. One that has not answered is killed, and the
/// forwards it reported are withdrawn for it (killed, it cannot): else
/// ssh's master would listen on them, and their sockets stay in the
/// user's scope, for as long as the master lives.
fn stop_probe(ssh: &SshTarget, tree: &Tree, mut probe: Forked) {
    probe.read();
    let (forwards, answer) = probe_report(probe.text());
    // It has answered and is leaving, or is killed now.
    drop(probe);
    if answer.is_none() && !forwards.is_empty() {
        let forwards: Vec<(&std::path::Path, &str)> =
            forwards.iter().map(|(listen, remote)| (listen.as_path(), remote.as_str())).collect();
        ssh.withdraw(tree, &forwards);
    }
}

/// Holds `.import-HOST-PORT.lock` in the import scope locked while the
/// importer runs, so a second importer of the same host is refused. For
/// sep:// there is one lock per address the host name resolves to, so
/// `sep://localhost:P` and `sep://127.0.0.1:P` are the same exporter; an
/// ssh:// host is taken as spelled (ssh's own configuration may alias it).
pub struct HostLock {
    files: Vec<LockFile>,
}

struct LockFile {
    _file: std::fs::File,
    path: std::path::PathBuf,
}

impl HostLock {
    /// Takes the lock files for `dialer`'s host, or says who holds one:
    /// for sep://, one for each of `addresses` (where its name leads; by
    /// name if there are none).
    pub fn acquire(
        directory: &std::path::Path,
        dialer: &Dialer,
        addresses: &[SocketAddr],
    ) -> Result<HostLock, ImportError> {
        let uri = dialer.uri();
        let mut keys: Vec<String> = match dialer {
            Dialer::Sep(_) => addresses.iter().map(SocketAddr::to_string).collect(),
            Dialer::Ssh(_) => Vec::new(),
        };
        if keys.is_empty() {
            keys.push(uri.trim_start_matches("sep://").to_string());
        }
        keys.sort();
        keys.dedup();
        let mut files = Vec::with_capacity(keys.len());
        for key in keys {
            let key = lock_key(&key);
            // Taken ones are let go again (and removed) if a later one is held.
            files.push(LockFile::take(&directory.join(format!(".import-{key}.lock")), &uri)?);
        }
        Ok(HostLock { files })
    }
}

/// `key` as a file name, one to one: letters, digits, '.' and '-' as they
/// are, any other byte as `_` and two hex digits. (Mapping them all to
/// '_' made `ssh://a_b@c` and `ssh://a@b_c` one lock, and refused the
/// second import of two different hosts.)
fn lock_key(key: &str) -> String {
    use std::fmt::Write;
    let mut name = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'.' || byte == b'-' {
            name.push(byte as char);
        } else {
            let _ = write!(name, "_{byte:02x}");
        }
    }
    name
}

impl HostLock {
    /// Whether the lock file at `path` is one of these.
    pub fn holds(&self, path: &std::path::Path) -> bool {
        self.files.iter().any(|file| file.path == path)
    }
}

impl LockFile {
    /// The file is removed again on drop; a taker that locked a file just
    /// removed (its path now names another file, or none) tries again, so
    /// two importers never both hold "the" lock.
    fn take(path: &std::path::Path, uri: &str) -> Result<LockFile, ImportError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .map_err(|source| ImportError::Lock { path: path.to_path_buf(), source })?;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                return Err(ImportError::AlreadyImported { uri: uri.to_string(), lock: path.to_path_buf() });
            }
            let locked = file.metadata().map(|meta| (meta.dev(), meta.ino())).ok();
            let named = std::fs::symlink_metadata(path).map(|meta| (meta.dev(), meta.ino())).ok();
            if locked.is_some() && locked == named {
                return Ok(LockFile { _file: file, path: path.to_path_buf() });
            }
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        // Removed while still locked, so nobody can lock this file after us
        // and believe it is the current one; but only if the path still
        // names it: the tree may have been removed and made again (see
        // `TreeWatcher::keep_root`), and the lock at that path now be
        // another importer's.
        let ours = self._file.metadata().map(|meta| (meta.dev(), meta.ino())).ok();
        let named = std::fs::symlink_metadata(&self.path).map(|meta| (meta.dev(), meta.ino())).ok();
        if ours.is_some() && ours == named {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{uri} is already being imported (lock {} is held)", lock.display())]
    AlreadyImported { uri: String, lock: std::path::PathBuf },
    #[error("cannot open the import lock {}: {source}", path.display())]
    Lock { path: std::path::PathBuf, source: io::Error },
    #[error("too many imports at once; not importing {uri}")]
    TooMany { uri: String },
    #[error("{uri} is this host ({host}): importing it would mirror its own services")]
    ThisHost { uri: String, host: String },
}

/// Why a session ended, which decides when the next one is tried.
enum Ending {
    /// Lost, or never made (unreachable, silent, cut off): the usual
    /// backoff, cut short when the host announces itself again.
    Failed(String),
    /// The exporter answered, and refused: see [`Refusals`].
    Refused(String),
}

impl From<String> for Ending {
    fn from(message: String) -> Ending {
        Ending::Failed(message)
    }
}

/// The exporter's refusals in a row: each one waits twice as long as the
/// last, up to [`MAX_REFUSAL_BACKOFF`]; the first is warned of, the rest
/// only if [`REFUSAL_REWARN`] has passed since. A complete sync ends the
/// episode.
#[derive(Debug, Default)]
struct Refusals {
    backoff: Option<Duration>,
    warned_at: Option<Instant>,
}

impl Refusals {
    /// One more refusal, at `now`: how long to wait, and whether to warn.
    fn refused(&mut self, now: Instant) -> (Duration, bool) {
        let backoff = self.backoff.map_or(FIRST_REFUSAL_BACKOFF, |last| (last * 2).min(MAX_REFUSAL_BACKOFF));
        self.backoff = Some(backoff);
        let warn = self.warned_at.is_none_or(|at| now.duration_since(at) >= REFUSAL_REWARN);
        if warn {
            self.warned_at = Some(now);
        }
        (backoff, warn)
    }

    fn refusing(&self) -> bool {
        self.backoff.is_some()
    }
}

/// What happened to the session, for the caller (the applet waits for the
/// first sync; dipusd only logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    Synced,
    Lost(String),
    /// The exporter is this very host (see [`ImportConfig::own_host`]);
    /// a `Lost` follows.
    ThisHost(String),
}

pub struct Importer {
    tree: Tree,
    config: ImportConfig,
    component: u8,
    session: Session,
    backoff: Duration,
    synced: bool,
    /// When the current session's answer came (its sync began).
    sync_began: Option<Instant>,
    /// When the current session synced, and how long its sync took.
    synced_at: Option<(Instant, Duration)>,
    /// No session before this, even if the host announces itself (see
    /// [`Importer::flap_hold`]).
    hold_until: Option<Instant>,
    proxies: HashMap<String, Proxy>,
    proxy_paths: HashMap<usize, String>,
    next_proxy: usize,
    links: HashMap<usize, Link>,
    next_link: usize,
    timers: Timers,
    events: Vec<SessionEvent>,
    reserve: DescriptorReserve,
    /// What the current session has announced.
    announced: std::collections::HashSet<String>,
    /// This session announced more than the importer takes, and was told.
    over_cap: bool,
    /// [`MAX_PROXIES`], smaller in tests.
    proxy_limit: usize,
    /// How many of `announced` carry this host's own name: never
    /// mirrored, and if they are all there is, the exporter is this host.
    own_named: usize,
    forwarding: Forwarding,
    /// The session's one deadline ([`TIMER_SESSION`]); entries of the
    /// timer heap for any other instant are stale and ignored, so a
    /// session never keeps more than one timer going.
    session_deadline: Option<Instant>,
    /// The session's read stopped at [`SESSION_READ_BUDGET`] with more
    /// maybe waiting: mio's edge has been used, so read again next turn.
    read_pending: bool,
    /// ssh processes of finished connections, still passing bytes on.
    lingering: Lingering,
    /// No more sessions: only the links left run on (see [`Importer::retire`]).
    retired: bool,
    /// Where the host's name led a moment ago, for the first session (see
    /// [`Importer::start_at`]).
    first_addresses: Option<Vec<SocketAddr>>,
    refusals: Refusals,
    /// Until the first sync, a failure is the caller's to report (see
    /// [`Importer::caller_reports_first_failure`]).
    caller_reports: bool,
}

/// Whether `fd` has something to read (data or its end) right now.
fn readable_now(fd: RawFd) -> bool {
    let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one live pollfd, without waiting.
    unsafe { libc::poll(&mut poll, 1, 0) == 1 && poll.revents & libc::POLLIN != 0 }
}

fn would_block(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::WouldBlock
}

impl Importer {
    pub fn new(tree: Tree, config: ImportConfig, component: u8) -> Importer {
        Importer {
            tree,
            config,
            component,
            session: Session::Idle { retry_at: Instant::now() },
            backoff: FIRST_BACKOFF,
            synced: false,
            sync_began: None,
            synced_at: None,
            hold_until: None,
            proxies: HashMap::new(),
            proxy_paths: HashMap::new(),
            next_proxy: 0,
            links: HashMap::new(),
            next_link: 0,
            timers: Timers::default(),
            events: Vec::new(),
            reserve: DescriptorReserve::new(),
            announced: std::collections::HashSet::new(),
            over_cap: false,
            proxy_limit: MAX_PROXIES,
            own_named: 0,
            forwarding: Forwarding::Unknown,
            session_deadline: None,
            read_pending: false,
            lingering: Lingering::default(),
            retired: false,
            first_addresses: None,
            refusals: Refusals::default(),
            caller_reports: false,
        }
    }

    /// The caller gives up when the session fails before its first sync,
    /// and says why itself (dipus-import exits with the reason): the
    /// importer does not log that failure as well.
    pub fn caller_reports_first_failure(&mut self) {
        self.caller_reports = true;
    }

    /// The first session goes to `addresses`, where the caller found the
    /// host's name leads (it looked the name up to take the host's lock),
    /// instead of asking the resolver again: one lookup at start, not two.
    /// Later sessions look the name up afresh, since a host can move.
    pub fn start_at(&mut self, addresses: &[SocketAddr]) {
        if matches!(self.config.dialer, Dialer::Sep(_)) && !addresses.is_empty() {
            self.first_addresses = Some(addresses.to_vec());
        }
    }

    /// Whether the session waits for a lookup of the host's name.
    #[cfg(test)]
    pub(crate) fn is_looking_up(&self) -> bool {
        matches!(self.session, Session::Resolving { .. })
    }

    fn token(&self, id: usize) -> Token {
        event_loop::token(self.component, id)
    }

    pub fn uri(&self) -> String {
        self.config.dialer.uri()
    }

    /// What this importer was started with.
    pub fn config(&self) -> &ImportConfig {
        &self.config
    }

    pub fn proxy_count(&self) -> usize {
        self.proxies.len()
    }

    /// Replaces a live session with a new one without removing the
    /// proxies: the next sync confirms them, and removes those the
    /// exporter no longer offers. Only ssh sessions hold anything worth
    /// renewing for (their process's stdio).
    pub fn renew_session(&mut self, registry: &Registry) {
        if !matches!(self.config.dialer, Dialer::Ssh(_)) {
            return;
        }
        if let Session::Watching { mut stream, .. } =
            std::mem::replace(&mut self.session, Session::Idle { retry_at: Instant::now() })
        {
            stream.deregister(registry);
        }
    }

    /// Ends the session as it stands; the next is due at `retry_at`.
    fn end_session(&mut self, registry: &Registry, retry_at: Instant) {
        match std::mem::replace(&mut self.session, Session::Idle { retry_at }) {
            Session::Connecting { mut tcp, .. } => {
                let _ = registry.deregister(&mut tcp);
            }
            Session::Watching { mut stream, .. } => stream.deregister(registry),
            Session::Resolving { lookup } => {
                let _ = registry.deregister(&mut mio::unix::SourceFd(&lookup.fd()));
            }
            Session::Idle { .. } => {}
        }
    }

    /// Tries again at once if the session is waiting out its backoff (the
    /// host announced itself again: it may have restarted), unless the
    /// exporter refused us: being heard of again does not change its mind.
    /// Nor, after a flap, before the flap's hold is over.
    pub fn retry_now(&mut self) {
        if self.refusals.refusing() {
            return;
        }
        let now = Instant::now();
        if let Session::Idle { retry_at } = &mut self.session {
            *retry_at = self.hold_until.map_or(now, |hold| hold.max(now)).min(*retry_at);
        }
    }

    fn retry_at_once(&mut self) {
        if let Session::Idle { retry_at } = &mut self.session {
            *retry_at = Instant::now();
        }
    }

    /// Session events since the last call.
    pub fn take_events(&mut self) -> Vec<SessionEvent> {
        std::mem::take(&mut self.events)
    }

    pub fn timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let session = match &self.session {
            Session::Idle { .. } if self.retired => None,
            Session::Idle { retry_at } => Some(retry_at.saturating_duration_since(now)),
            Session::Watching { .. } if self.read_pending => Some(Duration::ZERO),
            _ => None,
        };
        event_loop::earliest(session, self.timers.timeout(now))
    }

    /// Starts (or retries) the session when it is due.
    pub fn handle_timers(&mut self, registry: &Registry) {
        self.handle_timers_at(registry, Instant::now());
    }

    fn handle_timers_at(&mut self, registry: &Registry, now: Instant) {
        if let Session::Idle { retry_at } = self.session {
            if now >= retry_at && !self.retired {
                self.connect_session(registry);
            }
        }
        if std::mem::take(&mut self.read_pending) {
            self.session_ready(registry);
        }
        for key in self.timers.expired(now) {
            if key == TIMER_SESSION {
                if self.session_deadline.is_some_and(|deadline| deadline <= now) {
                    self.session_deadline = None;
                    self.check_session(registry, now);
                }
            } else if key == TIMER_LINGER {
                self.lingering.sweep(now);
                if !self.lingering.is_empty() {
                    self.timers.after(LINGER_CHECK, TIMER_LINGER);
                }
            } else if key >= LINK_BASE {
                self.check_link(registry, key, now);
            }
        }
    }

    /// A link's timer: a CONNECT that took too long ends; a relayed TCP
    /// link whose exporter answers nothing any more ends (see
    /// [`Relay::check_peers`]), else it is looked at again later.
    fn check_link(&mut self, registry: &Registry, key: usize, now: Instant) {
        let Some(link) = self.links.get_mut(&key) else {
            return;
        };
        let relay = match &mut link.state {
            LinkState::Relaying(relay) => relay,
            _ if now.duration_since(link.since) >= CONNECT_TIMEOUT => {
                log::info!("{}: CONNECT timed out", self.config.dialer.uri());
                self.close_link(registry, key);
                return;
            }
            _ => return,
        };
        if !matches!(link.remote, Remote::Tcp { .. }) {
            return;
        }
        match relay.check_peers() {
            Ok(()) => self.timers.after(crate::net::PEER_CHECK_EVERY, key),
            Err(error) => {
                log::warn!("{}: {error}; ending the connection", link.path);
                self.close_link(registry, key);
            }
        }
    }

    pub fn handle_event(&mut self, registry: &Registry, event: &mio::event::Event) {
        let id = event_loop::id(event.token());
        let (readable, writable) = event_loop::readiness(event);
        let ready = [readable, writable, event_loop::read_closed(event)];
        if id == SESSION {
            self.session_ready(registry);
        } else if id == PROBE {
            // The probe answered (or ended): the session goes on at once.
            self.retry_at_once();
        } else if id >= LINK_BASE {
            let link = LINK_BASE + (id - LINK_BASE) / LINK_STRIDE * LINK_STRIDE;
            let side = (id - LINK_BASE) % LINK_STRIDE;
            self.link_ready(registry, link, side, ready);
        } else if let Some(path) = self.proxy_paths.get(&id).cloned() {
            self.accept(registry, &path);
        }
    }

    fn connect_session(&mut self, registry: &Registry) {
        if matches!(self.config.dialer, Dialer::Ssh(_)) && !self.forwarding_known(registry) {
            return;
        }
        let server = match &self.config.dialer {
            Dialer::Sep(server) => server.clone(),
            Dialer::Ssh(ssh) => {
                let request = Request::Watch(self.config.selector.clone());
                match ssh.open(&self.tree, &request) {
                    Ok(channel) => {
                        let fd = channel.output.as_raw_fd();
                        let _ = crate::net::set_nonblocking(fd);
                        let token = self.token(SESSION);
                        if let Err(error) = registry.register(&mut mio::unix::SourceFd(&fd), token, Interest::READABLE)
                        {
                            return self.session_failed(registry, error.to_string());
                        }
                        self.session = Session::Watching {
                            stream: Remote::Ssh(Box::new(channel)),
                            lines: LineReader::new(),
                            status_read: false,
                            last_heard: Instant::now(),
                        };
                        // The first answer includes ssh's handshake.
                        self.arm_session_timer(Instant::now() + SILENCE);
                    }
                    Err(error) => self.session_failed(registry, error.to_string()),
                }
                return;
            }
        };
        if let Some(addresses) = self.first_addresses.take() {
            return self.connect_tcp(registry, &addresses);
        }
        match resolve(&server.host, server.port) {
            Ok(Resolution::Done(addresses)) => self.connect_tcp(registry, &addresses),
            Ok(Resolution::Pending(lookup)) => {
                let fd = lookup.fd();
                if let Err(error) =
                    registry.register(&mut mio::unix::SourceFd(&fd), self.token(SESSION), Interest::READABLE)
                {
                    return self.session_failed(registry, format!("cannot look up {}: {error}", server.host));
                }
                self.arm_session_timer(lookup.deadline());
                self.session = Session::Resolving { lookup };
            }
            Err(error) => self.session_failed(registry, format!("cannot look up {}: {error}", server.host)),
        }
    }

    /// The session's TCP connection, to the first of the host's addresses.
    fn connect_tcp(&mut self, registry: &Registry, addresses: &[SocketAddr]) {
        let Some(&address) = addresses.first() else {
            return self.session_failed(registry, format!("{}: no address", self.uri()));
        };
        match TcpStream::connect(address) {
            Ok(mut tcp) => {
                if let Err(error) =
                    registry.register(&mut tcp, self.token(SESSION), Interest::READABLE | Interest::WRITABLE)
                {
                    return self.session_failed(registry, error.to_string());
                }
                self.session = Session::Connecting { tcp, address, since: Instant::now() };
                self.arm_session_timer(Instant::now() + CONNECT_TIMEOUT);
            }
            Err(error) => self.session_failed(registry, format!("cannot connect to {}: {error}", self.uri())),
        }
    }

    /// Whether the lookup has answered; on an answer the session goes on
    /// (or fails).
    fn lookup_answered(&mut self, registry: &Registry, now: Instant) {
        let Session::Resolving { lookup } = &mut self.session else { return };
        let Some(answer) = lookup.answer(now) else { return };
        let _ = registry.deregister(&mut mio::unix::SourceFd(&lookup.fd()));
        self.session = Session::Idle { retry_at: now };
        match answer {
            Ok(addresses) => self.connect_tcp(registry, &addresses),
            Err(message) => self.session_failed(registry, format!("{}: {message}", self.uri())),
        }
    }

    /// Whether ssh may forward is known (asking first if not; the session
    /// waits for the answer, which the loop sees arrive). A probe that
    /// failed counts as a failed session.
    fn forwarding_known(&mut self, registry: &Registry) -> bool {
        match std::mem::replace(&mut self.forwarding, Forwarding::Unknown) {
            Forwarding::Unknown => {
                let Dialer::Ssh(ssh) = &self.config.dialer else {
                    return true;
                };
                let started = start_probe(ssh, &self.tree).and_then(|probe| {
                    let fd = probe.fd();
                    registry.register(&mut mio::unix::SourceFd(&fd), self.token(PROBE), Interest::READABLE)?;
                    Ok(probe)
                });
                match started {
                    Ok(probe) => {
                        let since = Instant::now();
                        self.forwarding = Forwarding::Probing { probe, since };
                        self.session = Session::Idle { retry_at: since + PROBE_LIMIT };
                        false
                    }
                    Err(error) => {
                        log::info!("{}: cannot start the forwarding probe: {error}", self.uri());
                        self.forwarding = Forwarding::No;
                        true
                    }
                }
            }
            Forwarding::Probing { mut probe, since } => {
                let ended = probe.read();
                let line = probe_report(probe.text()).1;
                let complete = line.is_some();
                if !complete && !ended && since.elapsed() < PROBE_LIMIT {
                    self.forwarding = Forwarding::Probing { probe, since };
                    self.session = Session::Idle { retry_at: since + PROBE_LIMIT };
                    return false;
                }
                let _ = registry.deregister(&mut mio::unix::SourceFd(&probe.fd()));
                if let Dialer::Ssh(ssh) = &self.config.dialer {
                    stop_probe(ssh, &self.tree, probe);
                }
                let line = line.unwrap_or_default();
                let line = line.as_str();
                match line.split_once(' ') {
                    Some(("yes", root)) if complete => {
                        log::info!("{}: ssh forwards connections itself (remote tree {root})", self.uri());
                        self.forwarding = Forwarding::Yes(root.to_string());
                        true
                    }
                    Some(("error", message)) if complete => {
                        self.session_failed(registry, message.to_string());
                        false
                    }
                    _ if complete && line == "no" => {
                        self.forwarding = Forwarding::No;
                        true
                    }
                    _ => {
                        self.session_failed(registry, format!("{}: the forwarding probe failed", self.uri()));
                        false
                    }
                }
            }
            known => {
                self.forwarding = known;
                true
            }
        }
    }

    fn session_ready(&mut self, registry: &Registry) {
        if matches!(self.session, Session::Resolving { .. }) {
            return self.lookup_answered(registry, Instant::now());
        }
        if let Session::Connecting { tcp, address, .. } = &mut self.session {
            match tcp.take_error() {
                Ok(None) => {}
                Ok(Some(error)) | Err(error) => {
                    let message = format!("cannot connect to {}: {error}", self.uri());
                    return self.session_failed(registry, message);
                }
            }
            if let Err(error) = tcp.peer_addr() {
                if error.kind() == io::ErrorKind::NotConnected {
                    return; // still connecting
                }
                let message = format!("cannot connect to {}: {error}", self.uri());
                return self.session_failed(registry, message);
            }
            let _ = crate::net::tune_tcp(tcp.as_raw_fd());
            let request = Request::Watch(self.config.selector.clone()).to_line();
            // A fresh socket's send buffer takes one short line whole.
            if let Err(error) = tcp.write_all(request.as_bytes()) {
                let message = format!("{}: {error}", self.uri());
                return self.session_failed(registry, message);
            }
            let address = *address;
            let Session::Connecting { tcp, .. } =
                std::mem::replace(&mut self.session, Session::Idle { retry_at: Instant::now() })
            else {
                unreachable!()
            };
            self.session = Session::Watching {
                stream: Remote::Tcp { tcp, address },
                lines: LineReader::new(),
                status_read: false,
                last_heard: Instant::now(),
            };
            self.arm_session_timer(Instant::now() + SILENCE);
        }
        if matches!(self.session, Session::Watching { .. }) {
            if let Err(ending) = self.read_session(registry) {
                self.session_ended(registry, ending);
            }
        }
    }

    /// Reads and applies everything the exporter sent.
    fn read_session(&mut self, registry: &Registry) -> Result<(), Ending> {
        let authority = self.uri();
        let mut lines = Vec::new();
        // How the stream ended, if it did: reported after the lines that
        // came before the end, so a refusal's status line is not lost.
        let mut ended = None;
        {
            let Session::Watching { stream, lines: reader, last_heard, .. } = &mut self.session else {
                return Ok(());
            };
            let mut buffer = [0u8; 4 * 1024];
            let mut taken = 0;
            loop {
                if taken >= SESSION_READ_BUDGET || lines.len() >= SESSION_LINES_PER_TURN {
                    self.read_pending = true;
                    break;
                }
                match stream.read(&mut buffer) {
                    Ok(0) => {
                        ended = Some(match reader.finish() {
                            Ok(()) => format!("{authority}: the exporter closed the session"),
                            Err(error) => format!("{authority}: the session ended mid-line: {error}"),
                        });
                        break;
                    }
                    Ok(count) => {
                        *last_heard = Instant::now();
                        taken += count;
                        let mut offset = 0;
                        while offset < count {
                            offset += reader.feed(&buffer[offset..count]);
                            match reader.next_line() {
                                Ok(Some(line)) => lines.push(line),
                                Ok(None) => {}
                                Err(error) => return Err(format!("{authority}: {error}").into()),
                            }
                        }
                    }
                    Err(error) if would_block(&error) => break,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(error) => {
                        ended = Some(format!("{authority}: {error}"));
                        break;
                    }
                }
            }
        }
        for line in lines {
            self.apply_line(registry, &line)?;
        }
        ended.map_or(Ok(()), |message| Err(message.into()))
    }

    fn apply_line(&mut self, registry: &Registry, line: &[u8]) -> Result<(), Ending> {
        let authority = self.uri();
        let Session::Watching { status_read, .. } = &mut self.session else {
            return Ok(());
        };
        if !*status_read {
            let status = StatusLine::parse(line).map_err(|e| format!("{authority}: {e}"))?;
            if !status.status.is_success() {
                let line = status.to_line();
                // 4xx: this request, from this address, is not served
                // (503 and other 5xx are the exporter's own trouble).
                return Err(match status.status.code() {
                    400..=499 => Ending::Refused(format!("{authority} refused the import: {}", line.trim_end())),
                    _ => Ending::Failed(format!("{authority} answered: {}", line.trim_end())),
                });
            }
            *status_read = true;
            self.sync_began = Some(Instant::now());
            self.announced.clear();
            self.over_cap = false;
            self.own_named = 0;
            return Ok(());
        }
        match Event::parse(line).map_err(|e| format!("{authority}: {e}"))? {
            Event::Keepalive => {}
            Event::Synced => {
                self.check_not_this_host()?;
                // What this session did not announce is gone (a renewed
                // session keeps its proxies until now).
                let stale: Vec<String> =
                    self.proxies.keys().filter(|wire| !self.announced.contains(*wire)).cloned().collect();
                for wire in &stale {
                    self.remove_proxy(registry, wire);
                }
                // Heirs only once every stale name is gone: an heir that
                // fails ends the session, and must not keep the rest.
                for wire in &stale {
                    self.add_heir(registry, wire)?;
                }
                // Clients that came while there was no session found
                // nobody to accept them, and their edge has passed.
                let listening: Vec<String> = self
                    .proxies
                    .iter()
                    .filter(|(_, proxy)| matches!(proxy, Proxy::Listening { .. }))
                    .map(|(wire, _)| wire.clone())
                    .collect();
                for wire in listening {
                    self.accept(registry, &wire);
                }
                if !self.synced {
                    log::info!("{authority}: synced, {} services", self.proxies.len());
                }
                if let Some(began) = self.sync_began.take() {
                    let now = Instant::now();
                    self.synced_at = Some((now, now.duration_since(began)));
                }
                self.synced = true;
                self.backoff = FIRST_BACKOFF;
                self.refusals = Refusals::default();
                self.caller_reports = false;
                self.events.push(SessionEvent::Synced);
            }
            Event::Added(path) => {
                let new = self.announced.insert(path.clone());
                if self.own_host_of(&path).is_none() {
                    self.add_proxy(registry, &path)?
                } else if new {
                    self.own_named += 1;
                    if self.synced {
                        self.check_not_this_host()?;
                    }
                    log::debug!("{}: not importing {path}: it carries this host's own name", self.uri());
                }
            }
            Event::Removed(path) => {
                if self.announced.remove(&path) && self.own_host_of(&path).is_some() {
                    self.own_named -= 1;
                }
                if self.proxies.contains_key(&path) {
                    self.remove_proxy(registry, &path);
                    self.add_heir(registry, &path)?;
                }
            }
        }
        Ok(())
    }

    /// This host's name, if `wire` is a sep:// service that carries it:
    /// one of this host's own services, or one made up in its name. It is
    /// here already, or has no business being here.
    fn own_host_of(&self, wire: &str) -> Option<&str> {
        let own = self.config.own_host.as_deref()?;
        let Dialer::Sep(_) = self.config.dialer else { return None };
        let path = ServicePath::parse(wire).ok()?;
        (path.file.host == own).then_some(own)
    }

    /// Ends the session if every service it announced carries this host's
    /// name: the exporter is this very host, and the session would only
    /// mirror its own services back into it.
    fn check_not_this_host(&mut self) -> Result<(), Ending> {
        if self.own_named == 0 || self.own_named < self.announced.len() {
            return Ok(());
        }
        let host = self.config.own_host.clone().unwrap_or_default();
        self.events.push(SessionEvent::ThisHost(host.clone()));
        Err(Ending::Refused(ImportError::ThisHost { uri: self.uri(), host }.to_string()))
    }

    /// Makes the proxy of `wire`. `Err` when ssh's master will not
    /// forward (its control socket gone, say): the session is then
    /// started over, on a new connection, rather than go on without the
    /// service.
    fn add_proxy(&mut self, registry: &Registry, wire: &str) -> Result<(), String> {
        if self.proxies.contains_key(wire) {
            return Ok(());
        }
        let Some(local) = self.config.dialer.local_path(wire) else {
            return Ok(());
        };
        let Ok(path) = ServicePath::parse(local) else {
            log::warn!("{}: ignoring invalid service path {wire:?}", self.uri());
            return Ok(());
        };
        if self.proxies.len() >= self.proxy_limit {
            let limit = self.proxy_limit;
            self.over_cap(wire, &format!("it offers more than {limit} services"));
            return Ok(());
        }
        if let (Dialer::Ssh(ssh), Forwarding::Yes(root)) = (&self.config.dialer, &self.forwarding) {
            let remote = format!("{root}/{wire}");
            let tree = &self.tree;
            let mut refused = None;
            let mut forward = |listen: &std::path::Path| {
                ssh.forward(tree, listen, &remote).map_err(|error| {
                    let message = error.to_string();
                    refused = Some(error);
                    io::Error::other(message)
                })
            };
            match PlacedSocket::place_exact(tree, &self.config.scope, &path, &self.config.options, &mut forward) {
                Ok(socket) => {
                    log::debug!("imported {} (forwarded by ssh)", socket.path().display());
                    self.proxies.insert(wire.to_string(), Proxy::Forwarded { socket, remote });
                }
                // The same master forwards every service: the next ones
                // would fail alike.
                Err(_) if refused.is_some() => {
                    return Err(format!("cannot import {wire}: {}", refused.expect("checked")));
                }
                // This name alone (taken here by a live socket, say).
                Err(error) => self.not_imported(wire, &error),
            }
            return Ok(());
        }
        let Some(slot) = ProxySlot::take() else {
            self.over_cap(
                wire,
                "this process's imported services hold three quarters of its descriptor limit (ulimit -n)",
            );
            return Ok(());
        };
        let socket = match ServiceSocket::bind_exact(&self.tree, &self.config.scope, &path, &self.config.options) {
            Ok(socket) => socket,
            Err(error) => {
                self.not_imported(wire, &error);
                return Ok(());
            }
        };
        let id = PROXY_BASE + self.next_proxy;
        self.next_proxy += 1;
        let fd = socket.listener().as_raw_fd();
        if let Err(error) = registry.register(&mut mio::unix::SourceFd(&fd), self.token(id), Interest::READABLE) {
            log::warn!("cannot import {wire}: {error}");
            return Ok(());
        }
        log::debug!("imported {}", socket.path().display());
        self.proxy_paths.insert(id, wire.to_string());
        self.proxies.insert(wire.to_string(), Proxy::Listening { socket, id, _slot: slot });
        // Clients may already be waiting on a socket we just made.
        self.accept(registry, wire);
        Ok(())
    }

    /// Says, once a session, that `wire` and the services announced after
    /// it are not imported, and why.
    fn over_cap(&mut self, wire: &str, why: &str) {
        if !self.over_cap {
            self.over_cap = true;
            log::warn!("{}: {why}; not importing {wire} and the services announced after it", self.uri());
        }
    }

    /// Says why `wire` has no proxy: a warning, unless a namesake of it
    /// holds the name (see [`Importer::add_heir`]).
    fn not_imported(&self, wire: &str, error: &dyn std::fmt::Display) {
        let namesakes = self.config.dialer.namesakes(wire);
        match namesakes.iter().find(|other| self.proxies.contains_key(*other)) {
            Some(holder) => log::info!("{wire} has the name of {holder} here; it is mirrored if that one goes"),
            None => log::warn!("cannot import {wire}: {error}"),
        }
    }

    /// Gives the name `gone` had to an announced namesake, which could
    /// not have it while `gone` held it.
    fn add_heir(&mut self, registry: &Registry, gone: &str) -> Result<(), String> {
        let heir = self
            .config
            .dialer
            .namesakes(gone)
            .into_iter()
            .find(|other| self.announced.contains(other) && !self.proxies.contains_key(other));
        match heir {
            Some(heir) => self.add_proxy(registry, &heir),
            None => Ok(()),
        }
    }

    fn remove_proxy(&mut self, registry: &Registry, wire: &str) {
        match self.proxies.remove(wire) {
            Some(Proxy::Listening { socket, id, .. }) => {
                let fd = socket.listener().as_raw_fd();
                let _ = registry.deregister(&mut mio::unix::SourceFd(&fd));
                self.proxy_paths.remove(&id);
                log::debug!("removed {}", socket.path().display());
            }
            Some(Proxy::Forwarded { socket, remote }) => {
                // Out of the tree first, so no new client finds it; then
                // ssh stops listening (connections it carries go on).
                let bound_at = socket.bound_at().to_path_buf();
                log::debug!("removed {}", socket.path().display());
                drop(socket);
                if let Dialer::Ssh(ssh) = &self.config.dialer {
                    if let Err(error) = ssh.cancel(&self.tree, &bound_at, &remote) {
                        log::debug!("{error}");
                    }
                }
            }
            None => {}
        }
    }

    fn remove_all_proxies(&mut self, registry: &Registry) {
        let paths: Vec<String> = self.proxies.keys().cloned().collect();
        for path in paths {
            self.remove_proxy(registry, &path);
        }
    }

    fn arm_session_timer(&mut self, when: Instant) {
        self.session_deadline = Some(when);
        self.timers.at(when, TIMER_SESSION);
    }

    fn check_session(&mut self, registry: &Registry, now: Instant) {
        match &self.session {
            Session::Connecting { since, .. } if now.duration_since(*since) >= CONNECT_TIMEOUT => {
                let message = format!("{}: connection timed out", self.uri());
                self.session_failed(registry, message);
            }
            // Words already waiting (we were stopped, SIGSTOP or a
            // suspend, and the loop runs its timers before its events):
            // not silence. The event that brings them is next.
            Session::Watching { stream, last_heard, .. }
                if now.duration_since(*last_heard) >= SILENCE && readable_now(stream.read_fd()) =>
            {
                self.arm_session_timer(now + Duration::from_secs(1));
            }
            Session::Watching { last_heard, .. } if now.duration_since(*last_heard) >= SILENCE => {
                let message = format!("{}: silent for {} s, session lost", self.uri(), SILENCE.as_secs());
                self.session_failed(registry, message);
            }
            Session::Watching { last_heard, .. } => {
                let deadline = *last_heard + SILENCE;
                self.arm_session_timer(deadline);
            }
            Session::Connecting { since, .. } => {
                let deadline = *since + CONNECT_TIMEOUT;
                self.arm_session_timer(deadline);
            }
            Session::Resolving { .. } => self.lookup_answered(registry, now),
            Session::Idle { .. } => {}
        }
    }

    /// The session is gone: its proxies go, and a retry is scheduled.
    fn session_failed(&mut self, registry: &Registry, message: String) {
        self.session_ended(registry, Ending::Failed(message));
    }

    fn session_ended(&mut self, registry: &Registry, ending: Ending) {
        let now = Instant::now();
        let message = match ending {
            Ending::Failed(message) => {
                let hold = self.flap_hold(now);
                let wait = self.backoff.max(hold);
                self.end_session(registry, now + wait);
                self.hold_until = (!hold.is_zero()).then(|| now + hold);
                if self.synced || !self.proxies.is_empty() {
                    log::warn!("{message}; removing its {} services, retrying in {wait:?}", self.proxies.len());
                } else {
                    log::info!("{message}; retrying in {wait:?}");
                }
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                message
            }
            Ending::Refused(message) => {
                let (wait, warn) = self.refusals.refused(now);
                let removing = match self.proxies.len() {
                    0 => String::new(),
                    count => format!("; removing its {count} services"),
                };
                self.end_session(registry, now + wait);
                if warn && !self.caller_reports {
                    log::warn!("{message}{removing}; trying again in {wait:?}, then less and less often");
                } else {
                    log::debug!("{message}{removing}; trying again in {wait:?}");
                }
                message
            }
        };
        self.remove_all_proxies(registry);
        // Ask again with the next session: the remote tree, or sshd's
        // mind about forwarding, may have changed meanwhile.
        if matches!(self.forwarding, Forwarding::Yes(_) | Forwarding::No) {
            self.forwarding = Forwarding::Unknown;
        }
        self.synced = false;
        self.sync_began = None;
        self.events.push(SessionEvent::Lost(message));
    }

    /// How long to wait at least after a session lost at `now`. A session
    /// that synced and was lost within [`STEADY`] is a flap (an exporter
    /// that restarts, or closes each watch, over and over): the next one
    /// waits [`FLAP_HOLD_FACTOR`] times as long as its sync took. The
    /// backoff alone would not do: a complete sync resets it, and every
    /// announcement cuts it short, so an exporter with thousands of
    /// services that flapped had its importer making and removing a proxy
    /// for each of them all the time. For a small exporter the hold is
    /// milliseconds, and nothing changes.
    fn flap_hold(&mut self, now: Instant) -> Duration {
        match self.synced_at.take() {
            Some((at, took)) if now.duration_since(at) < STEADY => (took * FLAP_HOLD_FACTOR).min(MAX_FLAP_HOLD),
            _ => Duration::ZERO,
        }
    }

    /// Takes every pending client of a proxy and starts its CONNECT.
    fn accept(&mut self, registry: &Registry, wire: &str) {
        // Over ssh each connection makes its own way, so a session being
        // renewed does not hold clients back; over TCP they go where the
        // session is, and wait for the next sync (which accepts again).
        let address = match (&self.session, &self.config.dialer) {
            (Session::Watching { stream: Remote::Tcp { address, .. }, .. }, _) => Some(*address),
            (_, Dialer::Ssh(_)) => None,
            _ => return,
        };
        loop {
            let Some(Proxy::Listening { socket, .. }) = self.proxies.get(wire) else {
                return;
            };
            let client = match socket.listener().accept() {
                Ok((client, _)) => client,
                Err(error) if would_block(&error) => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) if DescriptorReserve::is_exhaustion(&error) => {
                    // Out of descriptors: refuse the client cleanly (it
                    // sees EOF) and go on serving the links we have.
                    let listener = socket.listener();
                    let refused = self.reserve.refuse_one(|| listener.accept().is_ok());
                    log::warn!("out of descriptors: refusing a client of {}", socket.path().display());
                    if !refused {
                        return;
                    }
                    continue;
                }
                Err(error) => {
                    log::warn!("cannot accept on {}: {error}", socket.path().display());
                    return;
                }
            };
            if client.set_nonblocking(true).is_err() {
                continue;
            }
            let id = LINK_BASE + self.next_link * LINK_STRIDE;
            self.next_link += 1;
            let (remote, state) = match (address, &self.config.dialer) {
                (Some(address), _) => match TcpStream::connect(address) {
                    Ok(tcp) => (Remote::Tcp { tcp, address }, LinkState::Connecting),
                    Err(error) => {
                        log::warn!("cannot reach {address}: {error}");
                        continue;
                    }
                },
                (None, Dialer::Ssh(ssh)) => match ssh.open(&self.tree, &Request::Connect(wire.to_string())) {
                    Ok(channel) => {
                        let _ = crate::net::set_nonblocking(channel.output.as_raw_fd());
                        if let Some(input) = &channel.input {
                            let _ = crate::net::set_nonblocking(input.as_raw_fd());
                        }
                        (Remote::Ssh(Box::new(channel)), LinkState::ReadingStatus)
                    }
                    Err(error) => {
                        log::warn!("{error}");
                        continue;
                    }
                },
                (None, Dialer::Sep(_)) => return,
            };
            let mut link = Link {
                client: UnixStream::from_std(client),
                remote,
                path: wire.to_string(),
                state,
                status: Vec::new(),
                since: Instant::now(),
            };
            let registered = match &mut link.remote {
                Remote::Tcp { tcp, .. } => {
                    registry.register(tcp, self.token(id), Interest::READABLE | Interest::WRITABLE)
                }
                Remote::Ssh(channel) => registry.register(
                    &mut mio::unix::SourceFd(&channel.output.as_raw_fd()),
                    self.token(id),
                    Interest::READABLE,
                ),
            };
            if registered.is_err() {
                continue;
            }
            log::debug!("{wire}: a client, connecting");
            self.links.insert(id, link);
            self.timers.after(CONNECT_TIMEOUT, id);
        }
    }

    fn close_link(&mut self, registry: &Registry, id: usize) {
        if let Some(mut link) = self.links.remove(&id) {
            let mut handed_over = false;
            if let LinkState::Relaying(relay) = link.state {
                log::debug!(
                    "{}: closed after {} bytes out, {} back",
                    link.path,
                    relay.bytes(Way::Forward),
                    relay.bytes(Way::Backward)
                );
                handed_over = relay.way_done(Way::Forward) && relay.broken(Way::Forward).is_none();
                drop(relay);
                let _ = registry.deregister(&mut link.client);
            }
            link.remote.deregister(registry);
            // A client that sent everything and went (closed without
            // waiting for a reply) has had its bytes handed to ssh, not
            // yet delivered: ssh is left to finish.
            if let (true, Remote::Ssh(channel)) = (handed_over, link.remote) {
                if let Some(child) = channel.let_finish() {
                    self.linger(child);
                }
            }
        }
    }

    fn linger(&mut self, child: std::process::Child) {
        if self.lingering.is_empty() {
            self.timers.after(LINGER_CHECK, TIMER_LINGER);
        }
        self.lingering.add(child, Instant::now());
    }

    /// `ready`: readable, writable, and read closed (see `Relay::set_read_closed`).
    fn link_ready(&mut self, registry: &Registry, id: usize, side: usize, ready: [bool; 3]) {
        let tokens = [self.token(id), self.token(id + 1), self.token(id + 2)];
        let Some(link) = self.links.get_mut(&id) else {
            return;
        };
        let result = advance_link(link, registry, tokens, side, ready);
        match result {
            Ok(true) => {}
            Ok(false) => self.close_link(registry, id),
            Err(error) => {
                let path = self.links.get(&id).map(|l| l.path.as_str()).unwrap_or("");
                // A link cut (the exporter's host silent, a route gone)
                // leaves its client with less than was sent: said at the
                // default level. A peer that reset or left is ordinary.
                if crate::relay::link_failed(&error) {
                    log::warn!("{path}: {error}; ending the connection");
                } else {
                    log::debug!("{path}: {error}");
                }
                self.close_link(registry, id);
            }
        }
    }

    /// Stops importing, but lets the connections already relayed finish
    /// on their own, as when a session is lost (dipusd, when a host leaves
    /// or moves: cutting them would end their clients' replies early,
    /// which looks to them like the end): the proxies and the session go,
    /// the links stay until they end. See [`Importer::is_finished`].
    pub fn retire(&mut self, registry: &Registry) {
        self.retired = true;
        self.stop_probe(registry);
        self.end_session(registry, Instant::now());
        self.remove_all_proxies(registry);
    }

    /// Retired, with nothing left running.
    pub fn is_finished(&self) -> bool {
        self.retired && self.links.is_empty() && self.lingering.is_empty()
    }

    fn stop_probe(&mut self, registry: &Registry) {
        if let Forwarding::Probing { probe, .. } = std::mem::replace(&mut self.forwarding, Forwarding::Unknown) {
            let _ = registry.deregister(&mut mio::unix::SourceFd(&probe.fd()));
            if let Dialer::Ssh(ssh) = &self.config.dialer {
                stop_probe(ssh, &self.tree, probe);
            }
        }
    }

    /// Everything this importer made is removed (also on drop), its
    /// connections cut.
    pub fn shutdown(&mut self, registry: &Registry) {
        self.stop_probe(registry);
        self.remove_all_proxies(registry);
        let links: Vec<usize> = self.links.keys().copied().collect();
        for id in links {
            self.close_link(registry, id);
        }
        self.lingering.clear();
    }
}

/// One step of a proxied connection; false when it is over. `tokens`:
/// the remote's read side, the client, the remote's write side.
fn advance_link(
    link: &mut Link,
    registry: &Registry,
    tokens: [Token; 3],
    side: usize,
    ready: [bool; 3],
) -> io::Result<bool> {
    let [readable, writable, read_closed] = ready;
    loop {
        match &mut link.state {
            LinkState::Connecting => {
                let Remote::Tcp { tcp, .. } = &mut link.remote else {
                    return Ok(false);
                };
                if let Some(error) = tcp.take_error()? {
                    return Err(error);
                }
                match tcp.peer_addr() {
                    Ok(_) => {}
                    Err(error) if error.kind() == io::ErrorKind::NotConnected => return Ok(true),
                    Err(error) => return Err(error),
                }
                let _ = crate::net::tune_tcp(tcp.as_raw_fd());
                tcp.write_all(Request::Connect(link.path.clone()).to_line().as_bytes())?;
                link.state = LinkState::ReadingStatus;
            }
            LinkState::ReadingStatus => {
                let Some(line) = read_status_line(link)? else {
                    return Ok(true);
                };
                let status = StatusLine::parse(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if !status.status.is_success() {
                    log::info!("CONNECT {}: {}", link.path, status.to_line().trim_end());
                    return Ok(false);
                }
                registry.register(&mut link.client, tokens[1], Interest::READABLE | Interest::WRITABLE)?;
                let client = link.client.as_raw_fd();
                let relay = match &mut link.remote {
                    Remote::Tcp { tcp, .. } => Relay::between(client, tcp.as_raw_fd()),
                    Remote::Ssh(channel) => {
                        let input = channel.input.take().ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?;
                        registry.register(
                            &mut mio::unix::SourceFd(&input.as_raw_fd()),
                            tokens[2],
                            Interest::WRITABLE,
                        )?;
                        let mut relay = Relay::new(&[client], input.as_raw_fd(), channel.output.as_raw_fd(), client);
                        // Closing ssh's stdin is how the remote side sees EOF.
                        relay.adopt(input);
                        relay
                    }
                };
                log::debug!("{}: relaying", link.path);
                if let Remote::Tcp { tcp, .. } = &link.remote {
                    let _ = crate::net::relaying(tcp.as_raw_fd());
                }
                link.state = LinkState::Relaying(Box::new(relay));
            }
            LinkState::Relaying(relay) => {
                let fd = match side {
                    1 => Some(link.client.as_raw_fd()),
                    0 => Some(link.remote.read_fd()),
                    // ssh's stdin: the relay knows it by its number.
                    _ => None,
                };
                match fd {
                    Some(fd) => {
                        relay.set_ready(fd, readable, writable);
                        if read_closed {
                            relay.set_read_closed(fd);
                        }
                    }
                    None => relay.set_ready_all_writers(writable),
                }
                relay.pump()?;
                return Ok(!relay.is_done());
            }
        }
    }
}

/// The status line of a CONNECT, if it has all arrived, without taking a
/// byte after it: peeked from a socket, read a byte at a time from a pipe.
fn read_status_line(link: &mut Link) -> io::Result<Option<Vec<u8>>> {
    match &mut link.remote {
        Remote::Tcp { tcp, .. } => {
            let mut peeked = [0u8; sep::MAX_REQUEST_LINE];
            let available = match tcp.peek(&mut peeked) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(count) => count,
                Err(error) if would_block(&error) => return Ok(None),
                Err(error) => return Err(error),
            };
            let Some(end) = peeked[..available].iter().position(|&b| b == b'\n') else {
                return if available >= sep::MAX_REQUEST_LINE {
                    Err(io::Error::new(io::ErrorKind::InvalidData, "status line too long"))
                } else {
                    Ok(None)
                };
            };
            let mut line = vec![0u8; end + 1];
            tcp.read_exact(&mut line)?;
            Ok(Some(line))
        }
        Remote::Ssh(channel) => loop {
            let mut byte = 0u8;
            // SAFETY: one byte into a local from our own pipe.
            let count = unsafe { libc::read(channel.output.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
            match count {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                1 => {
                    link.status.push(byte);
                    if byte == b'\n' {
                        return Ok(Some(std::mem::take(&mut link.status)));
                    }
                    if link.status.len() >= sep::MAX_REQUEST_LINE {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "status line too long"));
                    }
                }
                _ => {
                    let error = io::Error::last_os_error();
                    if would_block(&error) {
                        return Ok(None);
                    }
                    if error.kind() != io::ErrorKind::Interrupted {
                        return Err(error);
                    }
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener on loopback, standing for an exporter, and an importer
    /// of it into a tree of its own (`dir`, for the test to remove).
    fn importer_of_a_listener(test: &str) -> (std::net::TcpListener, std::path::PathBuf, Importer, mio::Poll) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("dipus-import-{test}-{}", std::process::id()));
        let tree = Tree::at(dir.clone()).unwrap();
        tree.ensure_scope(&Scope::Imported).unwrap();
        let config = ImportConfig {
            dialer: Dialer::Sep(crate::sep_client::Server::new("127.0.0.1", Some(port))),
            selector: None,
            scope: Scope::Imported,
            options: SocketOptions::default(),
            own_host: Some("here".to_string()),
        };
        (listener, dir, Importer::new(tree, config, 1), mio::Poll::new().unwrap())
    }

    /// Starts `importer`'s session at `at`, has the exporter (the
    /// listener's end) send `text`, and runs the importer until it has
    /// synced (at most 5 s); returns the exporter's end.
    fn sync_from(
        listener: &std::net::TcpListener,
        importer: &mut Importer,
        poll: &mio::Poll,
        at: Instant,
        text: &str,
    ) -> std::net::TcpStream {
        use std::io::Write;
        importer.handle_timers_at(poll.registry(), at);
        let (mut exporter, _) = listener.accept().unwrap();
        exporter.write_all(text.as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !importer.synced && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            importer.read_pending = false;
            importer.session_ready(poll.registry());
        }
        assert!(importer.synced, "the session went on to its end of sync");
        exporter
    }

    /// The session is armed when it connects and again when it starts
    /// watching; when the first deadline passes, only the current one may
    /// go on (two chains used to go on forever, two more for each
    /// reconnection).
    #[test]
    fn a_session_keeps_one_timer_going() {
        let (listener, dir, mut importer, poll) = importer_of_a_listener("timer");
        let start = Instant::now();
        importer.handle_timers_at(poll.registry(), start);
        assert!(matches!(importer.session, Session::Connecting { .. }));
        // The kernel completes the connection from the listen queue.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches!(importer.session, Session::Watching { .. }) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            importer.session_ready(poll.registry());
        }
        assert!(matches!(importer.session, Session::Watching { .. }));
        assert_eq!(importer.timers.pending(TIMER_SESSION), 2, "armed on connecting and on watching");
        // Past the connect deadline, short of the silence limit.
        importer.handle_timers_at(poll.registry(), start + CONNECT_TIMEOUT + Duration::from_millis(500));
        assert!(matches!(importer.session, Session::Watching { .. }));
        assert_eq!(importer.timers.pending(TIMER_SESSION), 1);
        drop(listener);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// An exporter announcing thousands of services at once: each turn
    /// of the loop makes a bounded number of proxies, and says there is
    /// more to read (the loop's other work runs in between).
    #[test]
    fn a_long_sync_is_taken_a_bounded_part_per_turn() {
        use std::io::Write;
        let (listener, dir, mut importer, poll) = importer_of_a_listener("turns");
        importer.handle_timers_at(poll.registry(), Instant::now());
        let (mut exporter, _) = listener.accept().unwrap();
        let mut sync = String::from("SEP/1 200 OK\n");
        for n in 0..2000 {
            sync.push_str(&format!("+ text/plain/s{n}.hosta..0\n"));
        }
        sync.push_str("= synced\n");
        exporter.write_all(sync.as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches!(importer.session, Session::Watching { .. }) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            importer.session_ready(poll.registry());
        }
        let mut turns = 0;
        while !importer.synced && turns < 100 {
            let before = importer.proxies.len();
            importer.read_pending = false;
            importer.session_ready(poll.registry());
            let made = importer.proxies.len() - before;
            assert!(made <= SESSION_LINES_PER_TURN + 200, "{made} proxies made in one turn");
            assert!(importer.synced || importer.read_pending, "more to read, and not said");
            turns += 1;
        }
        assert!(importer.synced, "not synced after {turns} turns");
        assert_eq!(importer.proxies.len(), 2000);
        assert!(turns >= 2000 / (SESSION_LINES_PER_TURN + 200), "{turns} turns");
        importer.shutdown(poll.registry());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// An exporter announcing more services than an import mirrors: the
    /// first ones get proxies, the rest none, and the session goes on.
    #[test]
    fn an_import_mirrors_at_most_its_limit_of_services() {
        let (listener, dir, mut importer, poll) = importer_of_a_listener("cap");
        importer.proxy_limit = 100;
        let mut sync = String::from("SEP/1 200 OK\n");
        for n in 0..150 {
            sync.push_str(&format!("+ text/plain/s{n:03}.hosta..0\n"));
        }
        sync.push_str("= synced\n");
        let _exporter = sync_from(&listener, &mut importer, &poll, Instant::now(), &sync);
        assert_eq!(importer.proxies.len(), 100);
        assert!(importer.over_cap, "the cap was noticed (and warned of once)");
        assert!(importer.proxies.contains_key("text/plain/s099.hosta..0"));
        assert!(!importer.proxies.contains_key("text/plain/s100.hosta..0"));
        let sockets = std::fs::read_dir(dir.join("imported/text/plain")).unwrap().count();
        assert_eq!(sockets, 100, "a socket for each proxy, none for the rest");
        importer.shutdown(poll.registry());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// An exporter that syncs and then goes, over and over: the next
    /// session waits four times as long as the sync took, and the host
    /// announcing itself does not cut that short; a session that lasted
    /// [`STEADY`] is no flap, and an announcement brings it back at once.
    #[test]
    fn a_flapping_exporter_is_asked_again_only_after_a_hold() {
        let (listener, dir, mut importer, poll) = importer_of_a_listener("flap");
        let sync = "SEP/1 200 OK\n+ text/plain/a.hosta..0\n= synced\n";
        let exporter = sync_from(&listener, &mut importer, &poll, Instant::now(), sync);
        let (at, _) = importer.synced_at.expect("the sync was timed");
        // As if this sync had taken 2 s.
        importer.synced_at = Some((at, Duration::from_secs(2)));
        drop(exporter);
        let lost = |importer: &mut Importer| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !matches!(importer.session, Session::Idle { .. }) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
                importer.session_ready(poll.registry());
            }
            match importer.session {
                Session::Idle { retry_at } => retry_at,
                _ => panic!("the session was not lost"),
            }
        };
        let retry_at = lost(&mut importer);
        let hold = retry_at.saturating_duration_since(Instant::now());
        assert!(hold > Duration::from_secs(7) && hold <= Duration::from_secs(8), "{hold:?}");
        importer.retry_now();
        assert!(matches!(importer.session, Session::Idle { retry_at: now } if now == retry_at), "cut short");

        // A session that stayed up past STEADY: no hold, and the host
        // announcing itself brings the next one at once.
        let exporter = sync_from(&listener, &mut importer, &poll, retry_at, "SEP/1 200 OK\n= synced\n");
        let (at, _) = importer.synced_at.expect("the sync was timed");
        importer.synced_at = Some((at - STEADY, Duration::from_secs(2)));
        drop(exporter);
        let retry_at = lost(&mut importer);
        assert!(retry_at.saturating_duration_since(Instant::now()) <= FIRST_BACKOFF);
        importer.retry_now();
        assert!(matches!(importer.session, Session::Idle { retry_at: now } if now <= Instant::now()));
        importer.shutdown(poll.registry());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Refusals in a row wait 5 s, 10 s, … up to 5 min, and say so once;
    /// again only after a sync in between, or an hour after the last word.
    #[test]
    fn refusals_back_off_and_are_warned_of_once() {
        let mut refusals = Refusals::default();
        let start = Instant::now();
        let mut now = start;
        let mut waits = Vec::new();
        let mut warned_after = Vec::new();
        for _ in 0..20 {
            let (wait, warned) = refusals.refused(now);
            waits.push(wait.as_secs());
            if warned {
                warned_after.push(now.duration_since(start).as_secs());
            }
            now += wait;
        }
        assert_eq!(waits[..8], [5, 10, 20, 40, 80, 160, 300, 300]);
        assert!(waits[8..].iter().all(|&wait| wait == 300), "{waits:?}");
        // 5 + 10 + … + 160 = 315 s, then every 300 s: the first refusal an
        // hour or more after the first warning is at 315 + 11 × 300 s.
        assert_eq!(warned_after, [0, 3615]);
        refusals = Refusals::default();
        assert_eq!(refusals.refused(now), (FIRST_REFUSAL_BACKOFF, true));
    }

    /// An exporter that refuses the session is not asked again when it
    /// announces itself (dipusd's `retry_now`, about every 5 s), but after
    /// the refusal backoff, which grows.
    #[test]
    fn a_refusal_is_not_retried_at_every_announcement() {
        use std::io::Write;
        let (listener, dir, mut importer, poll) = importer_of_a_listener("refused");
        let mut refused_at = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..2 {
            importer.handle_timers_at(poll.registry(), refused_at);
            let (mut exporter, _) = listener.accept().unwrap();
            exporter.write_all(b"SEP/1 403 forbidden: address not allowed\n").unwrap();
            drop(exporter);
            let deadline = Instant::now() + Duration::from_secs(5);
            while !matches!(importer.session, Session::Idle { .. }) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
                importer.session_ready(poll.registry());
            }
            let Session::Idle { retry_at } = importer.session else { panic!("the refused session goes on") };
            importer.retry_now();
            assert!(matches!(importer.session, Session::Idle { retry_at: now } if now == retry_at));
            waits.push(retry_at.saturating_duration_since(Instant::now()));
            refused_at = retry_at;
        }
        let slack = Duration::from_secs(1);
        assert!(waits[0] > FIRST_REFUSAL_BACKOFF - slack && waits[0] <= FIRST_REFUSAL_BACKOFF, "{waits:?}");
        assert!(waits[1] > 2 * FIRST_REFUSAL_BACKOFF - slack && waits[1] <= 2 * FIRST_REFUSAL_BACKOFF, "{waits:?}");
        let port = listener.local_addr().unwrap().port();
        let lost = format!("sep://127.0.0.1:{port} refused the import: SEP/1 403 forbidden: address not allowed");
        assert_eq!(importer.take_events(), [SessionEvent::Lost(lost.clone()), SessionEvent::Lost(lost)]);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A lock file whose path was taken over (the tree removed and made
    /// again, another importer's lock there now) is not removed by the
    /// importer that held the old one.
    #[test]
    fn a_dropped_lock_leaves_a_file_that_took_its_path() {
        let dir = std::env::temp_dir().join(format!("dipus-import-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(".import-x.lock");
        let lock = LockFile::take(&path, "sep://x").unwrap();
        std::fs::remove_file(&path).unwrap();
        let other = LockFile::take(&path, "sep://x").expect("a new file at the path is free to lock");
        drop(lock);
        assert!(path.exists(), "the other importer's lock file was removed");
        drop(other);
        assert!(!path.exists(), "its own holder removes it");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn lock_names_are_one_to_one() {
        assert_eq!(lock_key("127.0.0.1:7347"), "127.0.0.1_3a7347");
        assert_eq!(lock_key("[::1]:7347"), "_5b_3a_3a1_5d_3a7347");
        assert_ne!(lock_key("ssh://a_b@c"), lock_key("ssh://a@b_c"));
        assert_ne!(lock_key("a_b"), lock_key("a:b"));
    }
}
