//! Selectors: what `dcat`, `dls`, the monitor and the SEP server accept to
//! pick services, and the URIs that point at another host.
//!
//! | form | example |
//! |---|---|
//! | NAME | `lame` |
//! | NAME.HOST (HOST exact or a dotted prefix) | `madplay.stereo` |
//! | one instance | `lame.encode..1` |
//! | protocol prefix (component-wise) | `audio/x-wav/to/audio/mpeg`, `http/` |
//! | protocol + file | `audio/mpeg/to/audio/out/madplay.stereo..0` |
//! | absolute path | `/tmp/dipus/local/x/y.h..0` |
//! | URI | `sep://HOST[:PORT][/SELECTOR]`, `ssh://[USER@]HOST[:PORT][/SELECTOR]` |
//!
//! A selector with a `/` means both "protocol prefix" and "protocol + file";
//! a service matching either is selected, since `text/plain/sorter` reads
//! naturally either way. Ordering of matches is the caller's (see
//! `tree::Service`), by scope, then protocol, name, host and index.

use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::name::{self, parse_index, Protocol, ServicePath};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SelectorError {
    /// Not a selector, where only a selector may be given (the monitor,
    /// a SEP request).
    #[error("invalid selector {0:?}: expected NAME[.HOST[..N]], PROTOCOL[/NAME…] or an absolute path")]
    Invalid(String),
    /// Neither a selector nor a URI, where either may be given.
    #[error("invalid selector {0:?}: expected NAME[.HOST[..N]], PROTOCOL[/NAME…], an absolute path or a sep:// or ssh:// URI")]
    InvalidTarget(String),
    /// A URI whose selector part is no selector: the URI itself is fine.
    #[error("invalid selector {selector:?} in {uri:?}: expected NAME[.HOST[..N]] or PROTOCOL[/NAME…]")]
    InvalidInUri { uri: String, selector: String },
    #[error("invalid URI {uri:?}: {why}")]
    Uri { uri: String, why: &'static str },
    /// An absolute path that no socket could have (too long for sun_path).
    #[error(transparent)]
    Path(#[from] name::NameError),
}

/// Matches the file part `NAME[.HOST[..N]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSelector {
    pub name: String,
    pub host: Option<String>,
    pub index: Option<u32>,
}

impl FileSelector {
    pub fn parse(text: &str) -> Option<FileSelector> {
        let (front, index) = match text.rsplit_once("..") {
            Some((front, index)) => (front, Some(parse_index(index)?)),
            None => (text, None),
        };
        let (name, host) = match front.split_once('.') {
            Some((name, host)) => (name, Some(host)),
            None => (front, None),
        };
        name::validate_name(name).ok()?;
        if let Some(host) = host {
            name::validate_host(host).ok()?;
        }
        if index.is_some() && host.is_none() {
            return None;
        }
        Some(FileSelector { name: name.to_string(), host: host.map(str::to_string), index })
    }

    pub fn matches(&self, file: &name::ServiceFile) -> bool {
        // With an index the selector spells out one file name, so its host
        // is exact: `lame.encode..1` is not also `lame.encode.lan..1`.
        let host_matches = |host: &String| match self.index {
            Some(_) => *host == file.host,
            None => host_matches(host, &file.host),
        };
        self.name == file.name
            && self.host.as_ref().is_none_or(host_matches)
            && self.index.is_none_or(|index| index == file.index)
    }
}

/// `stereo` matches the host `stereo` and `stereo.lan`, not `stereophonic`.
fn host_matches(wanted: &str, host: &str) -> bool {
    host == wanted || (host.len() > wanted.len() && host.starts_with(wanted) && host.as_bytes()[wanted.len()] == b'.')
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Everything.
    All,
    File(FileSelector),
    /// `a/b/c`: protocol prefix `a/b/c`, or protocol `a/b` with file `c`.
    Protocol {
        components: Vec<String>,
        file: Option<FileSelector>,
    },
    Path(PathBuf),
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let bad = || SelectorError::Invalid(text.to_string());
        if text.is_empty() {
            return Ok(Selector::All);
        }
        if text.starts_with('/') {
            let path = Path::new(text);
            if path.components().any(|c| c == std::path::Component::ParentDir) {
                return Err(bad());
            }
            name::check_socket_path(path)?;
            return Ok(Selector::Path(path.to_path_buf()));
        }
        if let Some(protocol) = text.strip_suffix('/') {
            // `http/`: the protocol `http` and everything under it, for
            // one-component protocols a bare word would read as a NAME.
            let protocol = Protocol::parse(protocol).map_err(|_| bad())?;
            return Ok(Selector::Protocol { components: protocol.components().to_vec(), file: None });
        }
        if !text.contains('/') {
            return FileSelector::parse(text).map(Selector::File).ok_or_else(bad);
        }
        let (front, last) = text.rsplit_once('/').ok_or_else(bad)?;
        let file = FileSelector::parse(last);
        // The whole text may be a protocol prefix; if it is not (a host with
        // dots, an index), it must be a protocol followed by a file.
        match Protocol::parse(text) {
            Ok(protocol) => Ok(Selector::Protocol {
                components: protocol.components().to_vec(),
                file: file.filter(|_| Protocol::parse(front).is_ok()),
            }),
            Err(_) => {
                let protocol = Protocol::parse(front).map_err(|_| bad())?;
                let file = file.ok_or_else(bad)?;
                let mut components = protocol.components().to_vec();
                components.push(last.to_string());
                Ok(Selector::Protocol { components, file: Some(file) })
            }
        }
    }

    /// Whether the service at `path` (relative to its scope) and `full` (on
    /// disk) is selected.
    pub fn matches(&self, path: &ServicePath, full: &Path) -> bool {
        match self {
            Selector::All => true,
            Selector::File(file) => file.matches(&path.file),
            Selector::Path(wanted) => wanted == full,
            Selector::Protocol { components, file } => {
                let prefix_match =
                    Protocol::parse(&components.join("/")).is_ok() && path.protocol.starts_with(components);
                let file_match = file.as_ref().is_some_and(|file| {
                    let protocol = &components[..components.len() - 1];
                    path.protocol.components() == protocol && file.matches(&path.file)
                });
                prefix_match || file_match
            }
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => Ok(()),
            Selector::File(file) => {
                f.write_str(&file.name)?;
                if let Some(host) = &file.host {
                    write!(f, ".{host}")?;
                }
                if let Some(index) = file.index {
                    write!(f, "..{index}")?;
                }
                Ok(())
            }
            Selector::Protocol { components, file } => {
                f.write_str(&components.join("/"))?;
                // Without a file reading, only the trailing slash keeps it
                // a protocol when parsed again (`http/`, not the NAME `http`).
                if file.is_none() {
                    f.write_str("/")?;
                }
                Ok(())
            }
            Selector::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Where a remote host is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    Sep { host: String, port: Option<u16> },
    Ssh { user: Option<String>, host: String, port: Option<u16> },
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, user, host, port) = match self {
            Remote::Sep { host, port } => ("sep", None, host, port),
            Remote::Ssh { user, host, port } => ("ssh", user.as_ref(), host, port),
        };
        write!(f, "{scheme}://")?;
        if let Some(user) = user {
            write!(f, "{user}@")?;
        }
        if host.contains(':') {
            write!(f, "[{host}]")?;
        } else {
            f.write_str(host)?;
        }
        if let Some(port) = port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

/// A command-line argument: a selector, on this host or on a remote one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub remote: Option<Remote>,
    pub selector: Selector,
}

impl Target {
    pub fn parse(text: &str) -> Result<Target, SelectorError> {
        let Some((scheme, rest)) = text.split_once("://") else {
            let selector = Selector::parse(text).map_err(|error| match error {
                SelectorError::Invalid(text) => SelectorError::InvalidTarget(text),
                error => error,
            })?;
            return Ok(Target { remote: None, selector });
        };
        let uri_error = |why| SelectorError::Uri { uri: text.to_string(), why };
        let (authority, selector) = rest.split_once('/').unwrap_or((rest, ""));
        let (user, host_port) = match authority.rsplit_once('@') {
            Some((user, host_port)) => (Some(user), host_port),
            None => (None, authority),
        };
        let (host, port) = split_host_port(host_port).ok_or_else(|| uri_error("bad host or port"))?;
        if host.is_empty() {
            return Err(uri_error("no host"));
        }
        let remote = match scheme {
            "sep" if user.is_some() => return Err(uri_error("sep:// takes no user")),
            "sep" => Remote::Sep { host, port },
            "ssh" => {
                if let Some(user) = user {
                    // `-l ''` would have ssh log in as a user named ''.
                    let alphanumeric = !user.is_empty() && user.bytes().all(|c| c.is_ascii_alphanumeric());
                    if !name::valid_user_name(user) && !alphanumeric {
                        return Err(uri_error("bad user name"));
                    }
                }
                Remote::Ssh { user: user.map(str::to_string), host, port }
            }
            _ => return Err(uri_error("unknown scheme, expected sep:// or ssh://")),
        };
        let selector = Selector::parse(selector).map_err(|error| match error {
            SelectorError::Invalid(selector) => SelectorError::InvalidInUri { uri: text.to_string(), selector },
            error => error,
        })?;
        if matches!(selector, Selector::Path(_)) {
            return Err(uri_error("a remote selector cannot be an absolute path"));
        }
        Ok(Target { remote: Some(remote), selector })
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`. Hosts are DNS names or
/// addresses: no spaces, slashes or shell metacharacters, since ssh gets them
/// as an argument.
fn split_host_port(text: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        let (host, port) = match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        };
        // An IPv6 address needs its brackets: `::1` is no host `:` with
        // the port 1.
        if host.contains(':') {
            return None;
        }
        (host, port)
    };
    let host_ok = host.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_' | b':'))
        && !host.starts_with('-');
    if !host_ok || host.len() > 253 {
        return None;
    }
    let port = match port {
        // Digits only: `parse` would also take `+22`.
        Some(port) if port.bytes().all(|c| c.is_ascii_digit()) => Some(port.parse::<u16>().ok().filter(|&p| p != 0)?),
        Some(_) => return None,
        None => None,
    };
    Some((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(path: &str) -> ServicePath {
        ServicePath::parse(path).unwrap()
    }

    fn selects(selector: &str, path: &str) -> bool {
        Selector::parse(selector).unwrap().matches(&service(path), Path::new("/nowhere"))
    }

    #[test]
    fn names_hosts_and_instances() {
        assert!(selects("lame", "audio/x-wav/to/audio/mpeg/lame.encode..0"));
        assert!(!selects("lam", "audio/lame.encode..0"));
        assert!(selects("madplay.stereo", "audio/madplay.stereo..0"));
        assert!(selects("madplay.stereo", "audio/madplay.stereo.lan..2"));
        assert!(!selects("madplay.stereo", "audio/madplay.stereophonic..0"));
        assert!(!selects("madplay.stereo.lan", "audio/madplay.stereo..0"));
        assert!(selects("lame.encode..1", "a/lame.encode..1"));
        assert!(!selects("lame.encode..1", "a/lame.encode..0"));
        assert!(!selects("lame.encode..1", "a/lame.encode.lan..1"));
        assert!(!selects("a/lame.encode..1", "a/lame.encode.lan..1"));
    }

    #[test]
    fn protocols_and_files() {
        assert!(selects("audio/x-wav", "audio/x-wav/to/audio/mpeg/lame.e..0"));
        assert!(!selects("audio/x", "audio/x-wav/lame.e..0"));
        assert!(selects("audio/mpeg/madplay.stereo..0", "audio/mpeg/madplay.stereo..0"));
        assert!(!selects("audio/mpeg/madplay.stereo..0", "audio/mpeg/madplay.stereo..1"));
        assert!(selects("text/plain/sorter", "text/plain/sorter.a..0"));
        assert!(selects("text/plain/sorter", "text/plain/sorter/x/y.a..0"));
        assert!(selects("http/", "http/web.a..0"));
        assert!(selects("http/", "http/v2/web.a..0"));
        assert!(!selects("http/", "https/web.a..0"));
        for text in ["http/", "audio/x.y/", "text/plain/sorter", "lame.encode..1", "madplay.stereo"] {
            let selector = Selector::parse(text).unwrap();
            assert_eq!(Selector::parse(&selector.to_string()).unwrap(), selector, "{text} round-trips");
        }
        assert!(!selects("text/plain/sorter", "text/sorter.a..0"));
    }

    #[test]
    fn paths_and_everything() {
        let path = service("a/b.c..0");
        assert!(Selector::parse("").unwrap().matches(&path, Path::new("/x")));
        let absolute = Selector::parse("/tmp/dipus/local/a/b.c..0").unwrap();
        assert!(absolute.matches(&path, Path::new("/tmp/dipus/local/a/b.c..0")));
        assert!(!absolute.matches(&path, Path::new("/tmp/dipus/exported/a/b.c..0")));
    }

    #[test]
    fn bad_selectors() {
        for bad in ["a b", "..", "a/../b", "lame..1", "/tmp/../etc", "x.y..z", "a//b", "../", "a b/"] {
            assert!(Selector::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn uris() {
        let target = Target::parse("sep://hosta:7000/sorter").unwrap();
        assert_eq!(target.remote, Some(Remote::Sep { host: "hosta".into(), port: Some(7000) }));
        assert_eq!(target.selector, Selector::parse("sorter").unwrap());
        let target = Target::parse("ssh://bob@[::1]:22").unwrap();
        assert_eq!(target.remote, Some(Remote::Ssh { user: Some("bob".into()), host: "::1".into(), port: Some(22) }));
        assert_eq!(target.selector, Selector::All);
        assert_eq!(target.remote.unwrap().to_string(), "ssh://bob@[::1]:22");
        for bad in [
            "sep://",
            "sep://h:0",
            "sep://h:99999",
            "ftp://h",
            "sep://u@h",
            "sep://-oProxy/x",
            "ssh://h;rm/x",
            "sep://h//etc",
            "ssh://a b@h",
            "ssh://@h",
            "ssh://u@::1",
            "sep://fe80::1",
            "ssh://h:+22",
            "sep://[]:22",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
