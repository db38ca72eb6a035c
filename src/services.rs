//! Default services: the services file that dipusd runs, inetd.conf-like.
//!
//! ```text
//! # NAME/PROTOCOL        SCOPE     COMMAND…
//! sorter/text/plain      exported  sort
//! upper/text/plain       local     tr a-z A-Z
//! ```
//!
//! One service a line: `NAME/PROTOCOL`, `local` or `exported`, and the rest
//! of the line as the command, run with `sh -c` per connection exactly like
//! `dipus-local-pipe` / `dipus-export-pipe`. Blank lines and lines starting
//! with `#` are ignored. A bad line is an error naming the file and line.
//! The sockets are mode 0666: default services are there for everyone.

use std::path::Path;

use thiserror::Error;

use crate::name::{Scope, ServiceSpec};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLine {
    pub spec: ServiceSpec,
    pub scope: Scope,
    pub command: String,
}

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
        let (scope, command) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
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
        services.push(ServiceLine { spec, scope, command });
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
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        for (text, why) in [
            ("x/y nowhere cat", "scope"),
            ("x/y local", "no command"),
            ("bad.name/y local cat", "invalid service name"),
            ("x local cat", "NAME/PROTOCOL"),
        ] {
            let message = parse(&format!("\n{text}\n"), "/etc/dipus/services").unwrap_err().to_string();
            assert!(message.starts_with("/etc/dipus/services:2: "), "{message}");
            assert!(message.contains(why), "{message}");
        }
    }
}
