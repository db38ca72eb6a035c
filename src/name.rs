//! Service names: `NAME.HOST..N` file names, protocol paths and the scopes
//! they live in. Pure parsing, validation and formatting; no I/O.
//!
//! A service lives at `<root>/<scope>/<protocol…>/<NAME>.<HOST>..<N>`.
//! Everything a peer, a datagram or the command line says passes through
//! here before it can become part of a path, so the rules are strict:
//! character classes, no `.`/`..` components, and lengths that keep the
//! whole path inside `sun_path`.

use std::fmt;
use std::path::Path;

use thiserror::Error;

/// Bytes of a socket path, without its NUL, that fit in `sockaddr_un.sun_path`.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub const SUN_PATH_LIMIT: usize = 107;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub const SUN_PATH_LIMIT: usize = 103;

/// Longest NAME and longest protocol component.
pub const MAX_COMPONENT: usize = 64;
/// Longest HOST: one DNS label's worth plus a little, since the whole path
/// must still fit in `sun_path`.
pub const MAX_HOST: usize = 64;
/// Most components in a protocol path.
pub const MAX_PROTOCOL_COMPONENTS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error(
        "invalid service name {0:?}: use letters, digits, '_', '+' and '-' (no dots), at most {MAX_COMPONENT} bytes"
    )]
    Name(String),
    #[error("invalid host name {0:?}: use labels of letters, digits, '_' and '-' separated by single dots, at most {MAX_HOST} bytes")]
    Host(String),
    #[error("invalid protocol {0:?}: use '/'-separated components of letters, digits, '.', '_', '+' and '-', never '.' or '..', at most {MAX_PROTOCOL_COMPONENTS} components")]
    Protocol(String),
    #[error("invalid service file name {0:?}: expected NAME.HOST..N")]
    File(String),
    #[error("invalid service {0:?}: expected NAME/PROTOCOL, e.g. sorter/text/plain")]
    Spec(String),
    /// A part of a `NAME/PROTOCOL` is bad: the message names the whole
    /// argument, then the part.
    #[error("invalid service {spec:?}: {reason}")]
    SpecPart { spec: String, reason: Box<NameError> },
    #[error("invalid service path {0:?}: expected PROTOCOL/NAME.HOST..N")]
    Path(String),
    #[error("socket path {path} is {length} bytes, more than the {limit} that fit in a UNIX socket address; use a shorter DIPUS_ROOT, protocol or name")]
    TooLong { path: String, length: usize, limit: usize },
    #[error("socket path {path} is {length} bytes, more than the {limit} that fit in a UNIX socket address; give a shorter path (a symlink to its directory, say)")]
    GivenPathTooLong { path: String, length: usize, limit: usize },
}

fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'+' | b'-')
}

fn is_protocol_char(c: u8) -> bool {
    is_name_char(c) || c == b'.'
}

/// NAME: `[A-Za-z0-9_+-]+`, no dots (the first dot ends it in a file name).
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > MAX_COMPONENT || !name.bytes().all(is_name_char) {
        return Err(NameError::Name(name.to_string()));
    }
    Ok(())
}

/// HOST: dot-separated labels of `[A-Za-z0-9_-]+`.
pub fn validate_host(host: &str) -> Result<(), NameError> {
    let labels_ok = host
        .split('.')
        .all(|label| !label.is_empty() && label.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-')));
    if host.is_empty() || host.len() > MAX_HOST || !labels_ok {
        return Err(NameError::Host(host.to_string()));
    }
    Ok(())
}

/// A component never starts with a dot: names starting with one (`.`,
/// `..`, and dipus's own temporary sockets and import locks, which share
/// the directories) are not services' to take. Nor has it the shape of a
/// service's file name: its directory would take that service's place
/// (an exporter announcing `text/plain/sorter.b..0/x.evil..0` would keep
/// host b's sorter out of every importer's tree).
fn validate_protocol_component(component: &str) -> bool {
    !component.is_empty()
        && !component.starts_with('.')
        && component.len() <= MAX_COMPONENT
        && component.bytes().all(is_protocol_char)
        && ServiceFile::parse(component).is_err()
}

/// A protocol path such as `audio/x-wav/to/audio/mpeg`: one or more components.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Protocol(Vec<String>);

impl Protocol {
    pub fn parse(text: &str) -> Result<Protocol, NameError> {
        let components: Vec<String> = text.split('/').map(str::to_string).collect();
        Protocol::from_components(components).map_err(|_| NameError::Protocol(text.to_string()))
    }

    pub fn from_components(components: Vec<String>) -> Result<Protocol, NameError> {
        if components.is_empty()
            || components.len() > MAX_PROTOCOL_COMPONENTS
            || !components.iter().all(|c| validate_protocol_component(c))
        {
            return Err(NameError::Protocol(components.join("/")));
        }
        Ok(Protocol(components))
    }

    pub fn components(&self) -> &[String] {
        &self.0
    }

    /// Component-wise prefix: `audio/x-wav` is a prefix of `audio/x-wav/to/x`,
    /// `audio/x` is not.
    pub fn starts_with(&self, prefix: &[String]) -> bool {
        self.0.len() >= prefix.len() && self.0.iter().zip(prefix).all(|(a, b)| a == b)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("/"))
    }
}

/// The socket's file name: `NAME.HOST..N`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceFile {
    pub name: String,
    pub host: String,
    pub index: u32,
}

impl ServiceFile {
    pub fn new(name: &str, host: &str, index: u32) -> Result<ServiceFile, NameError> {
        validate_name(name)?;
        validate_host(host)?;
        Ok(ServiceFile { name: name.to_string(), host: host.to_string(), index })
    }

    pub fn parse(file: &str) -> Result<ServiceFile, NameError> {
        let bad = || NameError::File(file.to_string());
        let (front, index) = file.rsplit_once("..").ok_or_else(bad)?;
        let (name, host) = front.split_once('.').ok_or_else(bad)?;
        let index = parse_index(index).ok_or_else(bad)?;
        ServiceFile::new(name, host, index).map_err(|_| bad())
    }
}

/// Decimal without sign or leading zeros, so every index has one spelling.
pub fn parse_index(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if text.len() > 1 && text.starts_with('0') {
        return None;
    }
    text.parse().ok()
}

impl fmt::Display for ServiceFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}..{}", self.name, self.host, self.index)
    }
}

/// What a server is asked to create on its command line: `NAME/PROTOCOL`,
/// e.g. `sorter/text/plain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub protocol: Protocol,
}

impl ServiceSpec {
    pub fn parse(text: &str) -> Result<ServiceSpec, NameError> {
        let (name, protocol) = text.split_once('/').ok_or_else(|| NameError::Spec(text.to_string()))?;
        let in_spec = |reason| NameError::SpecPart { spec: text.to_string(), reason: Box::new(reason) };
        validate_name(name).map_err(in_spec)?;
        Ok(ServiceSpec { name: name.to_string(), protocol: Protocol::parse(protocol).map_err(in_spec)? })
    }
}

impl fmt::Display for ServiceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.name, self.protocol)
    }
}

/// A service relative to its scope: `PROTOCOL/NAME.HOST..N`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServicePath {
    pub protocol: Protocol,
    pub file: ServiceFile,
}

impl ServicePath {
    pub fn parse(relative: &str) -> Result<ServicePath, NameError> {
        let bad = || NameError::Path(relative.to_string());
        let (protocol, file) = relative.rsplit_once('/').ok_or_else(bad)?;
        Ok(ServicePath {
            protocol: Protocol::parse(protocol).map_err(|_| bad())?,
            file: ServiceFile::parse(file).map_err(|_| bad())?,
        })
    }

    /// The order of DESIGN §2 within one scope: protocol, name, host, index.
    pub fn sort_key(&self) -> (&Protocol, &str, &str, u32) {
        (&self.protocol, &self.file.name, &self.file.host, self.file.index)
    }
}

impl fmt::Display for ServicePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol, self.file)
    }
}

/// The top-level directories of the tree. Their order of preference
/// depends on who asks (their own scope comes before LAN imports, other
/// users' after): `tree::scope_preference`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Local,
    Exported,
    /// A user's private ssh imports: `<root>/<user>/`.
    User(String),
    Imported,
}

impl Scope {
    pub fn dir_name(&self) -> &str {
        match self {
            Scope::Local => "local",
            Scope::Exported => "exported",
            Scope::Imported => "imported",
            Scope::User(user) => user,
        }
    }

    /// The scope a top-level directory name stands for. User names follow the
    /// portable user name rules, so nothing odd becomes a scope.
    pub fn from_dir_name(name: &str) -> Option<Scope> {
        match name {
            "local" => Some(Scope::Local),
            "exported" => Some(Scope::Exported),
            "imported" => Some(Scope::Imported),
            user if valid_user_name(user) => Some(Scope::User(user.to_string())),
            _ => None,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.dir_name())
    }
}

/// POSIX portable user names (`[A-Za-z0-9._-]`, not starting with '-'),
/// minus the ones that would be confused with `.`/`..` or hidden files.
pub fn valid_user_name(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 32
        && !user.starts_with(['-', '.'])
        && user.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && !matches!(user, "local" | "exported" | "imported")
}

/// Refuses a socket path given by the user (a path selector, a proxy's
/// SOCKET) that `bind`/`connect` could not take, naming it.
pub fn check_socket_path(path: &Path) -> Result<(), NameError> {
    let length = path.as_os_str().len();
    if length > SUN_PATH_LIMIT {
        return Err(NameError::GivenPathTooLong { path: path.display().to_string(), length, limit: SUN_PATH_LIMIT });
    }
    Ok(())
}

/// Refuses a path in the tree that `bind`/`connect` could not take,
/// naming it and what makes it long.
pub fn check_tree_socket_path(path: &Path) -> Result<(), NameError> {
    let length = path.as_os_str().len();
    if length > SUN_PATH_LIMIT {
        return Err(NameError::TooLong { path: path.display().to_string(), length, limit: SUN_PATH_LIMIT });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        for text in ["lame.encode..0", "madplay.stereo.lan..12", "a-b_c+d.h..4294967295"] {
            assert_eq!(ServiceFile::parse(text).unwrap().to_string(), text);
        }
        let file = ServiceFile::parse("madplay.stereo.lan..3").unwrap();
        assert_eq!((file.name.as_str(), file.host.as_str(), file.index), ("madplay", "stereo.lan", 3));
    }

    #[test]
    fn bad_file_names_are_refused() {
        for text in [
            "",
            "lame",
            "lame.h",
            "lame.h..",
            "lame..0",
            ".h..0",
            "lame.h..01",
            "lame.h..-1",
            "lame.h..4294967296",
            "la me.h..0",
            "lame.h...0",
            "lame.h/x..0",
            "lame..h..0",
            "lame.h..0 ",
            "lame.h..+1",
        ] {
            assert!(ServiceFile::parse(text).is_err(), "{text:?} accepted");
        }
    }

    #[test]
    fn host_rules() {
        assert!(validate_host("stereo").is_ok());
        assert!(validate_host("stereo.lan").is_ok());
        for bad in ["", ".", "..", "a..b", ".a", "a.", "a/b", "a b", &"h".repeat(65)] {
            assert!(validate_host(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn protocols_are_component_wise() {
        let protocol = Protocol::parse("audio/x-wav/to/audio/mpeg").unwrap();
        assert!(protocol.starts_with(&["audio".into(), "x-wav".into()]));
        assert!(!protocol.starts_with(&["audio".into(), "x".into()]));
        for bad in [
            "",
            "/",
            "a//b",
            "a/../b",
            "./a",
            "a/.",
            "/a",
            "a/",
            "a b",
            "a\0b",
            ".hidden",
            "a/.import-h_1.lock",
            "a/.new-1-0",
            "text/plain/sorter.b..0",
        ] {
            assert!(Protocol::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Protocol::parse(&vec!["a"; 17].join("/")).is_err());
        assert!(Protocol::parse("text/x.y+z").is_ok());
        // Shaped like a service's file name only in part: a protocol.
        assert!(Protocol::parse("a..1/b.c..x/d.e..01").is_ok());
        assert!(ServicePath::parse("text/plain/sorter.b..0/x.evil..0").is_err());
    }

    #[test]
    fn specs_and_paths() {
        let spec = ServiceSpec::parse("sorter/text/plain").unwrap();
        assert_eq!(spec.name, "sorter");
        assert_eq!(spec.protocol.to_string(), "text/plain");
        for bad in ["sorter", "sorter/", "/text", "sor.ter/text", "sorter/../x"] {
            let message = ServiceSpec::parse(bad).expect_err(bad).to_string();
            assert!(message.starts_with(&format!("invalid service {bad:?}: ")), "{message}");
        }
        let path = ServicePath::parse("text/plain/sorter.a..0").unwrap();
        assert_eq!(path.to_string(), "text/plain/sorter.a..0");
        for bad in ["sorter.a..0", "../sorter.a..0", "text/sorter", "/text/sorter.a..0"] {
            assert!(ServicePath::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn scopes_and_users() {
        assert_eq!(Scope::from_dir_name("alice"), Some(Scope::User("alice".into())));
        for bad in ["", ".", "..", ".hidden", "-x", "a/b"] {
            assert_eq!(Scope::from_dir_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn long_paths_are_named_in_the_error() {
        let long = format!("/tmp/{}", "x".repeat(200));
        let error = check_socket_path(Path::new(&long)).unwrap_err();
        let message = error.to_string();
        assert!(message.contains(&long) && message.contains("205 bytes"), "{message}");
        assert!(message.ends_with("give a shorter path (a symlink to its directory, say)"), "{message}");
        assert!(check_socket_path(Path::new("/tmp/dipus/local/x/a.b..0")).is_ok());
        let message = check_tree_socket_path(Path::new(&long)).unwrap_err().to_string();
        assert!(message.ends_with("use a shorter DIPUS_ROOT, protocol or name"), "{message}");
    }
}
