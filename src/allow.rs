//! Who may talk to the exporter: a list of networks (`--allow CIDR`), by
//! default the networks of this host's own interfaces plus loopback, read
//! with if-addrs.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid network {0:?}: expected ADDRESS/PREFIX, e.g. 192.168.1.0/24 or fd00::/8")]
pub struct CidrError(String);

/// One network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    address: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, CidrError> {
        let bad = || CidrError(text.to_string());
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address.parse().map_err(|_| bad())?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { address, prefix })
    }

    pub fn new(address: IpAddr, prefix: u8) -> Cidr {
        Cidr { address, prefix }
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        // A v4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(address),
            v4 => v4,
        };
        match (self.address, address) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(network) & mask == u32::from(address) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(network) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

fn prefix_of_mask(mask: IpAddr) -> u8 {
    match mask {
        IpAddr::V4(mask) => u32::from(mask).count_ones() as u8,
        IpAddr::V6(mask) => u128::from(mask).count_ones() as u8,
    }
}

/// The networks of this host's interfaces, and loopback.
pub fn local_networks() -> Vec<Cidr> {
    let mut networks =
        vec![Cidr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8), Cidr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128)];
    for interface in if_addrs::get_if_addrs().unwrap_or_default() {
        let (address, mask) = match &interface.addr {
            if_addrs::IfAddr::V4(v4) => (IpAddr::V4(v4.ip), IpAddr::V4(v4.netmask)),
            if_addrs::IfAddr::V6(v6) => (IpAddr::V6(v6.ip), IpAddr::V6(v6.netmask)),
        };
        let network = Cidr::new(address, prefix_of_mask(mask));
        if !networks.contains(&network) {
            networks.push(network);
        }
    }
    networks
}

/// The peers an exporter serves.
#[derive(Debug, Clone)]
pub enum AllowList {
    /// Given with `--allow`: fixed.
    Fixed(Vec<Cidr>),
    /// The host's own networks, re-read when interfaces change.
    LocalNetworks(Vec<Cidr>),
}

impl AllowList {
    pub fn from_args(allow: &[String]) -> Result<AllowList, CidrError> {
        if allow.is_empty() {
            return Ok(AllowList::LocalNetworks(local_networks()));
        }
        allow.iter().map(|text| Cidr::parse(text)).collect::<Result<_, _>>().map(AllowList::Fixed)
    }

    pub fn allows(&self, address: IpAddr) -> bool {
        match self {
            AllowList::Fixed(networks) | AllowList::LocalNetworks(networks) => {
                networks.iter().any(|network| network.contains(address))
            }
        }
    }

    /// Interfaces changed: the default list follows them.
    pub fn refresh(&mut self) {
        if let AllowList::LocalNetworks(networks) = self {
            *networks = local_networks();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_contain_their_addresses() {
        let lan = Cidr::parse("198.18.3.0/24").unwrap();
        assert!(lan.contains("198.18.3.77".parse().unwrap()));
        assert!(!lan.contains("198.18.4.1".parse().unwrap()));
        assert!(lan.contains("::ffff:198.18.3.9".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
        assert!(!Cidr::parse("fd00::/8").unwrap().contains("fe80::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.1").unwrap().contains("10.0.0.1".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "x/8", "10.0.0.0/", "::/129", "10.0.0.0/-1"] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_default_allows_loopback() {
        let list = AllowList::from_args(&[]).unwrap();
        assert!(list.allows("127.0.0.1".parse().unwrap()));
        assert!(list.allows("::1".parse().unwrap()));
    }
}
