//! LAN discovery by UDP broadcast (DESIGN §5): the advertiser tells the LAN
//! "host H exports on port P for T seconds", the discoverer keeps the table
//! of exporters heard of and reports joins and leaves.
//!
//! Sockets: one bound to the discovery port (7347) with SO_REUSEADDR, so
//! that dipusd and a `dipus-discoverer` on the same host both hear the
//! broadcasts; it sends ANNOUNCE and BYE to every IPv4 broadcast address of
//! the host's interfaces (never 255.255.255.255) and answers QUERY by
//! unicast. QUERY goes out from a second socket on an ephemeral port, so
//! the answers come back to whoever asked and not to another process
//! sharing port 7347.
//!
//! Announcements go out at start, 1 s and 2 s later (a returning host is
//! seen at once even if the first datagram is lost), then every ttl/3 with
//! ±10 % jitter. Nothing in a datagram is trusted: the wire module
//! validates it, malformed ones are dropped and counted by reason, each
//! source is rate-limited, and the address used is the datagram's source,
//! never one it claims.
//!
//! A host heard from a new address has moved only once its old address
//! has stopped announcing (its entry expired): while both announce, they
//! are two hosts with one name (a cloned VM, a copied configuration), and
//! the first one heard is kept. Following each announcement instead made
//! every peer's import of that name flip between the two, its proxies
//! going and coming every few seconds. A real move (DHCP renumbering, a
//! laptop changing networks) is then followed within one ttl.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};

use crate::datagram::{Datagram, RateLimiter, MAX_DATAGRAM};

/// An exporter heard of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub host: String,
    pub address: IpAddr,
    pub port: u16,
    pub expires: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    Joined(Peer),
    Left {
        host: String,
        why: &'static str,
    },
    /// A known exporter announced itself again.
    Heard {
        host: String,
    },
}

/// What this host announces.
#[derive(Debug, Clone)]
pub struct Announcement {
    pub host: String,
    pub port: u16,
    pub ttl: u32,
}

/// The IPv4 broadcast addresses of the interfaces that have one.
pub fn broadcast_addresses() -> Vec<Ipv4Addr> {
    let mut addresses: Vec<Ipv4Addr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|interface| !interface.is_loopback())
        .filter_map(|interface| match interface.addr {
            if_addrs::IfAddr::V4(v4) => v4.broadcast,
            if_addrs::IfAddr::V6(_) => None,
        })
        .filter(|address| !address.is_broadcast())
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// This host's own addresses (to recognise our own datagrams).
fn own_addresses() -> Vec<IpAddr> {
    if_addrs::get_if_addrs().unwrap_or_default().into_iter().map(|interface| interface.ip()).collect()
}

fn udp_socket(port: u16) -> io::Result<UdpSocket> {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)
        .map_err(io::Error::from)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(io::Error::from)?;
    setsockopt(&fd, sockopt::Broadcast, &true).map_err(io::Error::from)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))).map_err(io::Error::from)?;
    Ok(UdpSocket::from(fd))
}

/// A small xorshift for announce jitter: spreading hosts' timers is all it
/// is for, so no entropy source is needed.
struct Jitter(u64);

impl Jitter {
    fn new() -> Jitter {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(std::process::id()) << 32);
        Jitter(seed | 1)
    }

    /// `base` ± 10 %.
    fn spread(&mut self, base: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let permille = 900 + (self.0 % 201);
        base * permille as u32 / 1000
    }
}

/// Exporters a discoverer keeps at once: far more than a LAN has, few
/// enough that a flood of made-up host names (each a valid announcement)
/// cannot grow the table, or the daemon's scans of it, without bound.
pub const MAX_PEERS: usize = 1024;
/// Host names one address may hold in the table: a machine runs one
/// exporter, or a few under other names (tests, containers sharing an
/// address); a source announcing more is making names up.
pub const MAX_HOSTS_PER_ADDRESS: usize = 16;

/// Addresses warned of for announcing our own name; announcements from
/// further ones are logged at debug only (and counted, as all are).
const MAX_OWN_NAME_WARNINGS: usize = 16;

/// Counters of dropped datagrams, by reason.
#[derive(Debug, Default, Clone)]
pub struct Drops {
    pub by_reason: BTreeMap<&'static str, u64>,
}

impl Drops {
    /// Every reason counted from zero, so a report lists them all.
    fn new() -> Drops {
        let reasons = crate::datagram::DatagramError::REASONS.iter().copied().chain([
            "rate-limited",
            "own-name",
            "too-many-peers",
            "too-many-hosts-per-address",
            "not-allowed",
            "name-in-use",
        ]);
        Drops { by_reason: reasons.map(|reason| (reason, 0)).collect() }
    }

    fn count(&mut self, reason: &'static str) {
        *self.by_reason.entry(reason).or_insert(0) += 1;
    }

    pub fn total(&self) -> u64 {
        self.by_reason.values().sum()
    }
}

pub struct Discovery {
    /// Bound to the discovery port: broadcasts in, ANNOUNCE/BYE out.
    shared: UdpSocket,
    /// Ephemeral: QUERY out, their answers in.
    private: UdpSocket,
    discovery_port: u16,
    announcement: Option<Announcement>,
    /// Our own host name, whose datagrams are ours (even without an
    /// announcement, a discoverer must not list itself).
    own_host: String,
    peers: HashMap<String, Peer>,
    /// For a host whose name is also announced from another address while
    /// it still announces, that other address, warned of once (see the
    /// module docs). Only names in `peers` have an entry.
    rivals: HashMap<String, IpAddr>,
    /// Addresses warned of for announcing our own name (a clone of this
    /// host does so at every announcement): each is warned of once.
    own_name_warned: std::collections::HashSet<IpAddr>,
    next_announce: Option<Instant>,
    /// Announcements still due at 1 s and 2 s after start.
    probes_left: u32,
    jitter: Jitter,
    limiter: RateLimiter,
    pub drops: Drops,
    events: Vec<PeerEvent>,
    /// Whose datagrams are heard at all (dipusd: the exporter's allow
    /// list). A datagram from elsewhere must not reach the peer table: an
    /// ANNOUNCE of a known host from another address would move it, and
    /// its import would be stopped before the new address is refused.
    allowed: Option<crate::allow::AllowList>,
    /// A read stopped at [`DATAGRAMS_PER_TURN`]: more may wait, and
    /// their edge is spent, so the next turn reads on.
    read_pending: bool,
}

/// Datagrams read from each socket in one turn of the loop. A flood
/// (spoofed sources, so the rate limit has a new one to judge each time)
/// must not keep dipusd's loop, which its exporter, imports and signals
/// share, from coming back to them.
const DATAGRAMS_PER_TURN: usize = 64;

impl Discovery {
    /// `announcement`: what to advertise (None: only discover).
    pub fn new(own_host: &str, announcement: Option<Announcement>, discovery_port: u16) -> io::Result<Discovery> {
        if let Some(announcement) = &announcement {
            let datagram =
                Datagram::Announce { host: announcement.host.clone(), port: announcement.port, ttl: announcement.ttl };
            datagram.validate().map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error.to_string()))?;
        }
        let shared = udp_socket(discovery_port)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind UDP port {discovery_port}: {e}")))?;
        let private = udp_socket(0)?;
        let announcing = announcement.is_some();
        Ok(Discovery {
            shared,
            private,
            discovery_port,
            announcement,
            own_host: own_host.to_string(),
            peers: HashMap::new(),
            rivals: HashMap::new(),
            own_name_warned: std::collections::HashSet::new(),
            next_announce: announcing.then(Instant::now),
            probes_left: if announcing { 2 } else { 0 },
            jitter: Jitter::new(),
            // Generous for a LAN (an honest host sends one per ttl/3), tight
            // for a flood.
            limiter: RateLimiter::new(20, 40, 1024),
            drops: Drops::new(),
            allowed: None,
            read_pending: false,
            events: Vec::new(),
        })
    }

    pub fn fds(&self) -> [i32; 2] {
        [self.shared.as_raw_fd(), self.private.as_raw_fd()]
    }

    pub fn peers(&self) -> Vec<Peer> {
        let mut peers: Vec<Peer> = self.peers.values().cloned().collect();
        peers.sort_by(|a, b| a.host.cmp(&b.host));
        peers
    }

    pub fn take_events(&mut self) -> Vec<PeerEvent> {
        std::mem::take(&mut self.events)
    }

    fn broadcast(&self, datagram: &Datagram) {
        let bytes = datagram.to_bytes();
        for address in broadcast_addresses() {
            let target = SocketAddr::V4(SocketAddrV4::new(address, self.discovery_port));
            if let Err(error) = self.shared.send_to(&bytes, target) {
                log::debug!("cannot send to {target}: {error}");
            }
        }
    }

    /// Asks every exporter on the LAN to announce itself to us.
    pub fn query(&self) {
        let bytes = Datagram::Query.to_bytes();
        for address in broadcast_addresses() {
            let target = SocketAddr::V4(SocketAddrV4::new(address, self.discovery_port));
            if let Err(error) = self.private.send_to(&bytes, target) {
                log::debug!("cannot send to {target}: {error}");
            }
        }
    }

    fn announce_datagram(&self) -> Option<Datagram> {
        self.announcement.as_ref().map(|a| Datagram::Announce { host: a.host.clone(), port: a.port, ttl: a.ttl })
    }

    /// Announces now (start, interfaces changed) and restarts the schedule.
    pub fn announce(&mut self) {
        if let Some(datagram) = self.announce_datagram() {
            self.broadcast(&datagram);
            self.schedule_announce();
        }
    }

    fn schedule_announce(&mut self) {
        let Some(announcement) = &self.announcement else {
            return;
        };
        let delay = if self.probes_left > 0 {
            self.probes_left -= 1;
            Duration::from_secs(1)
        } else {
            self.jitter.spread(Duration::from_secs(u64::from(announcement.ttl)) / 3)
        };
        self.next_announce = Some(Instant::now() + delay);
    }

    /// Interfaces changed: announce on the new ones at once, with probes.
    /// Hears only datagrams from sources `allowed` admits (see the field).
    pub fn hear_only(&mut self, allowed: crate::allow::AllowList) {
        self.allowed = Some(allowed);
    }

    pub fn interfaces_changed(&mut self) {
        if let Some(allowed) = &mut self.allowed {
            allowed.refresh();
        }
        if self.announcement.is_some() {
            self.probes_left = 2;
            self.announce();
        }
    }

    /// Says goodbye (clean shutdown).
    pub fn bye(&mut self) {
        if let Some(announcement) = &self.announcement {
            self.broadcast(&Datagram::Bye { host: announcement.host.clone() });
        }
    }

    pub fn timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        if self.read_pending {
            return Some(Duration::ZERO);
        }
        let expiry = self.peers.values().map(|peer| peer.expires).min();
        [self.next_announce, expiry].into_iter().flatten().min().map(|when| when.saturating_duration_since(now))
    }

    pub fn handle_timers(&mut self) {
        if std::mem::take(&mut self.read_pending) {
            self.handle_readable();
        }
        let now = Instant::now();
        if self.next_announce.is_some_and(|when| now >= when) {
            self.announce();
        }
        let expired: Vec<String> =
            self.peers.values().filter(|peer| peer.expires <= now).map(|peer| peer.host.clone()).collect();
        for host in expired {
            self.peers.remove(&host);
            self.rivals.remove(&host);
            log::info!("{host}: announcements expired");
            self.events.push(PeerEvent::Left { host, why: "expired" });
        }
    }

    /// Reads the queued datagrams on both sockets, at most
    /// [`DATAGRAMS_PER_TURN`] from each.
    pub fn handle_readable(&mut self) {
        let own = own_addresses();
        let mut buffer = [0u8; MAX_DATAGRAM + 1];
        for socket in 0..2 {
            for read in 0.. {
                if read == DATAGRAMS_PER_TURN {
                    self.read_pending = true;
                    break;
                }
                let received =
                    if socket == 0 { self.shared.recv_from(&mut buffer) } else { self.private.recv_from(&mut buffer) };
                let (length, source) = match received {
                    Ok(received) => received,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(error) => {
                        log::debug!("discovery socket: {error}");
                        break;
                    }
                };
                self.datagram(&buffer[..length], source, &own);
            }
        }
    }

    fn datagram(&mut self, bytes: &[u8], source: SocketAddr, own: &[IpAddr]) {
        if self.allowed.as_ref().is_some_and(|allowed| !allowed.allows(source.ip())) {
            self.drops.count("not-allowed");
            return;
        }
        if !self.limiter.allow(source.ip(), Instant::now()) {
            self.drops.count("rate-limited");
            return;
        }
        let datagram = match Datagram::parse(bytes) {
            Ok(datagram) => datagram,
            Err(error) => {
                log::debug!("{source}: dropped: {error}");
                self.drops.count(error.reason());
                return;
            }
        };
        match datagram {
            Datagram::Query => {
                if let Some(answer) = self.announce_datagram() {
                    if let Err(error) = self.shared.send_to(&answer.to_bytes(), source) {
                        log::debug!("cannot answer {source}: {error}");
                    }
                }
            }
            Datagram::Announce { host, port, ttl } => {
                if host == self.own_host {
                    if !own.contains(&source.ip()) {
                        // Bounded: spoofed sources cannot grow the set.
                        let first = self.own_name_warned.len() < MAX_OWN_NAME_WARNINGS
                            && self.own_name_warned.insert(source.ip());
                        if first {
                            log::warn!(
                                "{source} announces our own host name {host}; ignored; two hosts have one name?"
                            );
                        } else {
                            log::debug!("{source} announces our own host name {host}; ignored");
                        }
                        self.drops.count("own-name");
                    }
                    return;
                }
                let peer = Peer {
                    host: host.clone(),
                    address: source.ip(),
                    port,
                    expires: Instant::now() + Duration::from_secs(ttl.into()),
                };
                if !self.peers.contains_key(&host) {
                    let full = if self.peers.len() >= MAX_PEERS {
                        Some("too-many-peers")
                    } else if self.peers.values().filter(|known| known.address == peer.address).count()
                        >= MAX_HOSTS_PER_ADDRESS
                    {
                        Some("too-many-hosts-per-address")
                    } else {
                        None
                    };
                    if let Some(reason) = full {
                        log::debug!("{source}: announces {host}: dropped ({reason})");
                        self.drops.count(reason);
                        return;
                    }
                }
                match self.peers.get_mut(&host) {
                    Some(known) if known.address == peer.address && known.port == peer.port => {
                        known.expires = peer.expires;
                        self.events.push(PeerEvent::Heard { host });
                    }
                    // Its address still announces: another host has its name.
                    Some(known) if known.address != peer.address && known.expires > Instant::now() => {
                        self.drops.count("name-in-use");
                        if self.rivals.get(&host) != Some(&peer.address) {
                            log::warn!(
                                "host {host} is announced from {} and {}; keeping {}; two hosts have one name?",
                                known.address,
                                peer.address,
                                known.address
                            );
                            self.rivals.insert(host, peer.address);
                        }
                    }
                    Some(known) => {
                        log::info!("{host}: moved from {}:{} to {source}", known.address, known.port);
                        *known = peer.clone();
                        self.rivals.remove(&host);
                        self.events.push(PeerEvent::Left { host: host.clone(), why: "moved" });
                        self.events.push(PeerEvent::Joined(peer));
                    }
                    None => {
                        log::info!("{host}: exporter at {}:{port}", source.ip());
                        self.peers.insert(host, peer.clone());
                        self.events.push(PeerEvent::Joined(peer));
                    }
                }
            }
            Datagram::Bye { host } => {
                // Only the address that announced the host may take it away.
                if self.peers.get(&host).is_some_and(|peer| peer.address == source.ip()) {
                    self.peers.remove(&host);
                    self.rivals.remove(&host);
                    log::info!("{host}: said bye");
                    self.events.push(PeerEvent::Left { host, why: "bye" });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announce(discovery: &mut Discovery, source: [u8; 4], host: &str) {
        let bytes = format!("DIPUS/1 ANNOUNCE host={host} port=7347 ttl=3600\n");
        let source = SocketAddr::from((source, 40000));
        discovery.datagram(bytes.as_bytes(), source, &[]);
    }

    /// Announcements of made-up host names, each one valid, cannot grow
    /// the table without bound, from one address or from many; hosts
    /// already known are still heard.
    #[test]
    fn the_peer_table_is_bounded() {
        let mut discovery = Discovery::new("me", None, 0).unwrap();
        for index in 0..20 {
            announce(&mut discovery, [10, 0, 0, 1], &format!("one{index}"));
        }
        assert_eq!(discovery.peers().len(), MAX_HOSTS_PER_ADDRESS);
        assert_eq!(discovery.drops.by_reason["too-many-hosts-per-address"], 20 - MAX_HOSTS_PER_ADDRESS as u64);

        for source in 0..80u8 {
            for index in 0..MAX_HOSTS_PER_ADDRESS {
                announce(&mut discovery, [10, 0, 1, source], &format!("many{source}-{index}"));
            }
        }
        assert_eq!(discovery.peers().len(), MAX_PEERS);
        let dropped = (MAX_HOSTS_PER_ADDRESS * 81 - MAX_PEERS) as u64;
        assert_eq!(discovery.drops.by_reason["too-many-peers"], dropped);

        discovery.events.clear();
        announce(&mut discovery, [10, 0, 0, 1], "one0");
        assert!(matches!(discovery.events.as_slice(), [PeerEvent::Heard { host }] if host == "one0"));
    }

    /// A turn reads at most DATAGRAMS_PER_TURN from a socket and asks for
    /// another turn at once; the next reads on.
    #[test]
    fn a_flood_is_read_a_bounded_batch_per_turn() {
        let mut discovery = Discovery::new("me", None, 0).unwrap();
        let port = discovery.shared.local_addr().unwrap().port();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sent = DATAGRAMS_PER_TURN + 40;
        for _ in 0..sent {
            sender.send_to(b"not a datagram", ("127.0.0.1", port)).unwrap();
        }
        discovery.handle_readable();
        assert_eq!(discovery.drops.total(), DATAGRAMS_PER_TURN as u64);
        assert_eq!(discovery.timeout(), Some(Duration::ZERO));
        discovery.handle_timers();
        // What the socket's buffer held of the rest (a few may not fit).
        let total = discovery.drops.total();
        assert!(total > DATAGRAMS_PER_TURN as u64 && total <= sent as u64, "{total}");
        assert!(!discovery.read_pending);
    }

    /// Two live hosts with one name (a cloned VM): the first heard keeps
    /// the name while it announces, and the other's announcements make
    /// no event (each one used to move the host, and every peer's import
    /// of it flipped between the two). Once the first's entry expires,
    /// the other takes the name: a real move costs at most one ttl.
    #[test]
    fn a_name_announced_from_two_addresses_stays_with_the_first_until_it_expires() {
        let mut discovery = Discovery::new("me", None, 0).unwrap();
        let (first, second) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        announce(&mut discovery, [10, 0, 0, 1], "twin");
        assert!(matches!(discovery.take_events().as_slice(), [PeerEvent::Joined(peer)] if peer.address == first));
        for _ in 0..3 {
            announce(&mut discovery, [10, 0, 0, 2], "twin");
            announce(&mut discovery, [10, 0, 0, 1], "twin");
        }
        let heard = PeerEvent::Heard { host: "twin".to_string() };
        assert_eq!(discovery.take_events(), [heard.clone(), heard.clone(), heard]);
        assert_eq!(discovery.peers().iter().map(|peer| peer.address).collect::<Vec<_>>(), [first]);
        assert_eq!(discovery.drops.by_reason["name-in-use"], 3);
        // Warned of once: the rival is remembered.
        assert_eq!(discovery.rivals, HashMap::from([("twin".to_string(), second)]));

        // The first stops announcing: its entry expires, and the name is
        // free for the other.
        discovery.peers.get_mut("twin").unwrap().expires = Instant::now();
        discovery.handle_timers();
        assert_eq!(discovery.take_events(), [PeerEvent::Left { host: "twin".to_string(), why: "expired" }]);
        assert!(discovery.rivals.is_empty());
        announce(&mut discovery, [10, 0, 0, 2], "twin");
        assert!(matches!(discovery.take_events().as_slice(), [PeerEvent::Joined(peer)] if peer.address == second));
    }

    /// A clone of this host announces our name at every announcement: it
    /// is ignored each time, and warned of once.
    #[test]
    fn our_own_name_from_another_address_is_warned_of_once() {
        let mut discovery = Discovery::new("me", None, 0).unwrap();
        for _ in 0..3 {
            announce(&mut discovery, [10, 0, 0, 9], "me");
        }
        assert!(discovery.take_events().is_empty());
        assert!(discovery.peers().is_empty());
        assert_eq!(discovery.drops.by_reason["own-name"], 3);
        assert_eq!(discovery.own_name_warned, std::collections::HashSet::from([IpAddr::from([10, 0, 0, 9])]));
    }

    /// dipusd hears only the networks it serves: a datagram from elsewhere
    /// naming a known host neither moves it (which stopped its import)
    /// nor says bye for it.
    #[test]
    fn a_source_outside_the_allow_list_cannot_move_or_remove_a_peer() {
        let mut discovery = Discovery::new("me", None, 0).unwrap();
        let allowed = crate::allow::AllowList::from_args(&["10.0.0.0/24".to_string()]).unwrap();
        discovery.hear_only(allowed);
        announce(&mut discovery, [10, 0, 0, 1], "legit");
        assert!(matches!(discovery.take_events().as_slice(), [PeerEvent::Joined(peer)] if peer.host == "legit"));
        announce(&mut discovery, [192, 0, 2, 7], "legit");
        let bye = SocketAddr::from(([192, 0, 2, 7], 40000));
        discovery.datagram(b"DIPUS/1 BYE host=legit\n", bye, &[]);
        announce(&mut discovery, [192, 0, 2, 7], "stranger");
        assert!(discovery.take_events().is_empty());
        assert_eq!(discovery.drops.by_reason["not-allowed"], 3);
        let peers = discovery.peers();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].address, IpAddr::from([10, 0, 0, 1]));
    }
}
