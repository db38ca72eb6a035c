//! Default services: the services file that dipusd runs, inetd.conf-like.
//!
//! ```text
//! # NAME/PROTOCOL        SCOPE     COMMAND…
//! sorter/text/plain      exported  sort
//! upper/text/plain       local     tr a-z A-Z
//! ```
//!
//! One service a line: `NAME/PROTOCOL`, `local` or `exported`, optionally
//! `-c N`, and the rest of the line as the command, run with `sh -c` per
//! connection exactly like `dipus-local-pipe` / `dipus-export-pipe`. Blank
//! lines and lines starting with `#` are ignored. A bad line is an error
//! naming the file and line. The sockets are mode 0666: default services
//! are there for everyone.
//!
//! A service runs at most `-c N` children at once, [`DEFAULT_CHILDREN`]
//! unless the line says otherwise; further connections wait in the
//! backlog. Without a cap, anyone who may connect (with `exported`, the
//! LAN) could start one process per connection until the host runs out.

use std::path::Path;

use thiserror::Error;

use crate::name::{Scope, ServiceSpec};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLine {
    pub spec: ServiceSpec,
    pub scope: Scope,
    /// Most children at once.
    pub children: usize,
    pub command: String,
}

impl ServiceLine {
    /// The same socket and command, whatever the cap.
    pub fn same_service(&self, other: &ServiceLine) -> bool {
        (&self.spec, &self.scope, &self.command) == (&other.spec, &other.scope, &other.command)
    }
}

/// Children a default service runs at once unless its line says `-c N`:
/// xinetd's shipped `instances` default, enough for a household's clients.
pub const DEFAULT_CHILDREN: usize = 50;

#[derive(Debug, Error)]
pub enum ServicesError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}:{line}: {why}")]
    Line { path: String, line: usize, why: String },
}

pub fn parse(text: &str, path: &str) -> Result<Vec<ServiceLine>, ServicesError> {
    let mut services = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let error = |why: String| ServicesError::Line { path: path.to_string(), line: number + 1, why };
        let (spec, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim_start();
        let (scope, mut command) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        command = command.trim_start();
        let mut children = DEFAULT_CHILDREN;
        if let Some(after) = command.strip_prefix("-c").filter(|after| after.starts_with(char::is_whitespace)) {
            let after = after.trim_start();
            let (count, rest) = after.split_once(char::is_whitespace).unwrap_or((after, ""));
            children = match count.parse::<usize>() {
                Ok(count) if count >= 1 => count,
                _ => return Err(error(format!("-c {count:?}: expected a number of children, at least 1"))),
            };
            command = rest;
        }
        let command = command.trim().to_string();
        let spec = ServiceSpec::parse(spec).map_err(|e| error(e.to_string()))?;
        let scope = match scope {
            "local" => Scope::Local,
            "exported" => Scope::Exported,
            other => return Err(error(format!("scope {other:?}: expected local or exported"))),
        };
        if command.is_empty() {
            return Err(error("no command".into()));
        }
        services.push(ServiceLine { spec, scope, children, command });
    }
    Ok(services)
}

/// Reads a services file. A missing file is empty when `optional` (the
/// default path need not exist).
pub fn load(path: &Path, optional: bool) -> Result<Vec<ServiceLine>, ServicesError> {
    let display = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &display),
        Err(error) if optional && error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(ServicesError::Read { path: display, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_with_commands_verbatim() {
        let text = "# comment\n\nsorter/text/plain  exported  sort -r\nupper/text local tr a-z   A-Z\n";
        let services = parse(text, "f").unwrap();
        assert_eq!(services.len(), 2);
        assert_eq!(services[0].spec.to_string(), "sorter/text/plain");
        assert_eq!(services[0].scope, Scope::Exported);
        assert_eq!(services[0].command, "sort -r");
        assert_eq!(services[1].command, "tr a-z   A-Z");
        assert_eq!(services[0].children, DEFAULT_CHILDREN);
    }

    #[test]
    fn the_example_in_contrib_parses() {
        let services = parse(include_str!("../contrib/services.example"), "services.example").unwrap();
        assert!(services.len() >= 5, "{services:?}");
    }

    #[test]
    fn dash_c_after_the_scope_caps_the_children() {
        let services = parse("a/p local -c 3 sort -r\nb/p exported   -c\t1  cat\nc/p local -cat\n", "f").unwrap();
        assert_eq!((services[0].children, services[0].command.as_str()), (3, "sort -r"));
        assert_eq!((services[1].children, services[1].command.as_str()), (1, "cat"));
        // Only `-c` standing alone is the option.
        assert_eq!((services[2].children, services[2].command.as_str()), (DEFAULT_CHILDREN, "-cat"));
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        for (text, why) in [
            ("x/y nowhere cat", "scope"),
            ("x/y local", "no command"),
            ("bad.name/y local cat", "invalid service name"),
            ("x local cat", "NAME/PROTOCOL"),
            ("x/y local -c 0 cat", "-c \"0\": expected a number of children, at least 1"),
            ("x/y local -c many cat", "-c \"many\""),
            ("x/y local -c 2", "no command"),
        ] {
            let message = parse(&format!("\n{text}\n"), "/etc/dipus/services").unwrap_err().to_string();
            assert!(message.starts_with("/etc/dipus/services:2: "), "{message}");
            assert!(message.contains(why), "{message}");
        }
    }
}
