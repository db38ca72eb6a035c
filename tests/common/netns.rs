//! A private LAN of hosts in network namespaces (needs root and `ip`).
//!
//! Topology of `Net::new(n)`: a bridge namespace `dp<pid>n<k>b` holding
//! bridge `br0`, and hosts `dp<pid>n<k>h<i>`, each with `eth0` (a veth whose
//! peer `p<i>` sits in the bridge namespace, enslaved to `br0`). Veths are
//! created inside the namespaces, so interface names never meet those of
//! other tests in the root namespace.
//!
//! Addresses: host i has 198.18.X.(i+1)/24 (RFC 2544 benchmarking range,
//! never routed), X = (pid*7 + k) % 250 with k the per-process Net counter.
//! Nets are isolated by their own bridges anyway; X only keeps concurrent
//! Nets (in one process or several) distinguishable in logs and captures.
//!
//! Drop kills every process in every namespace made here, then deletes the
//! namespaces, and never panics. Limit: at most 253 hosts per Net.

use super::child::{run_with_timeout, try_run_with_timeout};
use super::{have_command, have_root, next_id, require, wait_until, DEFAULT_TIMEOUT};
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

pub struct Net {
    pub hosts: Vec<Host>,
    bridge_ns: String,
    octet: u8,
    /// Every namespace created so far, for Drop (also after a failed setup).
    created: Vec<String>,
}

pub struct Host {
    ns: String,
    bridge_ns: String,
    /// The veth end in the bridge namespace.
    port: String,
    addr: Ipv4Addr,
}

/// Runs `ip` with `args`, panicking with its stderr on failure.
fn ip(args: &[&str]) -> Output {
    let out = run_with_timeout(Command::new("ip").args(args), None, DEFAULT_TIMEOUT);
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

/// Kills (SIGKILL) every process in namespace `ns` and deletes it; never
/// panics. Repeats the sweep since a process may fork while it runs.
fn destroy_ns(ns: &str) {
    for _ in 0..5 {
        let pids: Vec<u32> =
            try_run_with_timeout(Command::new("ip").args(["netns", "pids", ns]), None, DEFAULT_TIMEOUT)
                .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
                .unwrap_or_default();
        if pids.is_empty() {
            break;
        }
        super::proc::signal(&pids, "KILL");
    }
    let _ = try_run_with_timeout(Command::new("ip").args(["netns", "del", ns]), None, DEFAULT_TIMEOUT);
}

impl Net {
    /// Builds the LAN with `n` hosts; None (loud skip) without root or `ip`.
    /// Panics if setup fails, after cleaning up what it made.
    pub fn new(n: usize) -> Option<Net> {
        if !require(have_root() && have_command("ip"), "needs root and ip(8)") {
            return None;
        }
        assert!((1..=253).contains(&n), "Net::new({n}): 1 to 253 hosts");
        let pid = std::process::id();
        let k = next_id();
        let prefix = format!("dp{pid}n{k}");
        let octet = ((u64::from(pid) * 7 + k as u64) % 250) as u8;
        let mut net = Net { hosts: Vec::new(), bridge_ns: format!("{prefix}b"), octet, created: Vec::new() };
        let br = net.bridge_ns.clone();
        net.add_ns(&br);
        ip(&["-n", &br, "link", "set", "lo", "up"]);
        // STP off (the default) makes ports forward at once.
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge", "forward_delay", "0"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        for i in 0..n {
            let ns = format!("{prefix}h{i}");
            net.add_ns(&ns);
            let port = format!("p{i}");
            let addr = Ipv4Addr::new(198, 18, octet, i as u8 + 1);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &br]);
            // "brd +" so the subnet broadcast address works.
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "brd", "+", "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"]);
            net.hosts.push(Host { ns, bridge_ns: br.clone(), port, addr });
        }
        for h in &net.hosts {
            wait_until(Duration::from_secs(10), &format!("{} eth0 up", h.ns), || h.link_is_up());
        }
        Some(net)
    }

    fn add_ns(&mut self, ns: &str) {
        // Concurrent first-time `ip netns add` calls race while setting up
        // the /run/netns mount; serialise them within this process.
        static LOCK: Mutex<()> = Mutex::new(());
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        ip(&["netns", "add", ns]);
        self.created.push(ns.to_owned());
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// Name of the namespace holding the bridge.
    pub fn bridge_ns(&self) -> &str {
        &self.bridge_ns
    }

    /// The subnet's broadcast address, 198.18.X.255.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.octet, 255)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Hosts first: the bridge ports vanish with them.
        for ns in self.created.iter().rev() {
            destroy_ns(ns);
        }
    }
}

impl Host {
    /// The network namespace name.
    pub fn name(&self) -> &str {
        &self.ns
    }

    /// The address on eth0.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// `ip netns exec <ns> <program> <args...>`; ip execs the program, so
    /// the child's pid is the program's. Environment passes through.
    pub fn cmd<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program).args(args);
        cmd
    }

    /// True while eth0 has carrier and is up.
    pub fn link_is_up(&self) -> bool {
        try_run_with_timeout(
            Command::new("ip").args(["-n", &self.ns, "-o", "link", "show", "eth0"]),
            None,
            DEFAULT_TIMEOUT,
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("state UP"))
        .unwrap_or(false)
    }

    /// Simulates unplugging the cable: the bridge-side end goes down, so
    /// eth0 loses carrier but keeps its address and routes, as with a real
    /// cable pull (downing eth0 itself would delete its routes and make
    /// sends fail at once with ENETUNREACH, which a cable pull does not).
    pub fn link_down(&self) {
        ip(&["-n", &self.bridge_ns, "link", "set", &self.port, "down"]);
    }

    /// Plugs the cable back in and waits for carrier.
    pub fn link_up(&self) {
        ip(&["-n", &self.bridge_ns, "link", "set", &self.port, "up"]);
        wait_until(Duration::from_secs(10), &format!("{} eth0 up", self.ns), || self.link_is_up());
    }

    /// Adds a second address, e.g. "198.18.7.100/24", to eth0.
    pub fn add_addr(&self, cidr: &str) {
        ip(&["-n", &self.ns, "addr", "add", cidr, "brd", "+", "dev", "eth0"]);
    }

    /// Removes the host's network card for good: deletes the veth pair
    /// (eth0 disappears, with its addresses; only lo remains).
    pub fn pull_cable(&self) {
        ip(&["-n", &self.bridge_ns, "link", "del", &self.port]);
    }

    /// The host dies: SIGKILL for every process in its namespace, then the
    /// namespace is deleted (Net's Drop then finds nothing left to do).
    pub fn delete(&self) {
        destroy_ns(&self.ns);
    }
}
