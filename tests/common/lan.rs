//! A LAN of dipus hosts: network namespaces on one bridge (`netns::Net`),
//! each with its own tree named after the host, and a way to run an applet
//! on a host with that tree and name. Tests add their own methods in an
//! `impl Lan` of their own.

use std::process::Command;

use super::netns::{Host, Net};
use super::root::TestRoot;

/// Fields drop in order: the namespaces and every process in them go
/// first, then the trees.
pub struct Lan {
    pub net: Net,
    pub roots: Vec<TestRoot>,
}

impl Lan {
    /// One host per name; None (after a loud skip) without root or ip(8).
    pub fn new(names: &[&str]) -> Option<Lan> {
        let net = Net::new(names.len())?;
        Some(Lan { net, roots: names.iter().map(|name| TestRoot::new().with_host(name)).collect() })
    }

    pub fn host(&self, index: usize) -> &Host {
        self.net.host(index)
    }

    pub fn root(&self, index: usize) -> &TestRoot {
        &self.roots[index]
    }

    /// `ip netns exec HOST APPLET ARGS…` with that host's tree and name.
    pub fn on(&self, index: usize, applet: &str, args: &[&str]) -> Command {
        let root = self.root(index);
        let mut cmd = self.host(index).cmd(super::applet_bin(applet), args);
        cmd.env("DIPUS_ROOT", root.tree())
            .env("DIPUS_HOSTNAME", &root.host)
            .env_remove("DIPUS_PORT")
            .env_remove("DIPUS_DISCOVERY_PORT")
            .env_remove("RUST_LOG");
        if let Some(level) = std::env::var_os("DIPUS_TEST_LOG") {
            cmd.env("RUST_LOG", level);
        }
        cmd
    }
}
