//! Settings read from the environment (`DIPUS_PORT`, `DIPUS_SSH`, …): one
//! reader, so that a value that cannot be used is an error everywhere
//! rather than a silent fall back to the default, which would put a
//! service or an exporter where the user did not ask for it, or run
//! another command than the one named.

use std::ffi::OsString;

#[derive(Debug, thiserror::Error)]
pub enum SettingError {
    #[error("{name}={raw:?} is not valid UTF-8")]
    NotUnicode { name: String, raw: OsString },
    #[error("{name}={text:?} is not a port number")]
    NotPort { name: String, text: String },
}

/// The environment variable `name`: None when unset or empty.
pub fn text(name: &str) -> Result<Option<String>, SettingError> {
    match std::env::var(name) {
        Ok(text) if text.is_empty() => Ok(None),
        Ok(text) => Ok(Some(text)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(raw)) => Err(SettingError::NotUnicode { name: name.to_string(), raw }),
    }
}

/// A port from the environment variable `name`, else `default`.
pub fn port(name: &str, default: u16) -> Result<u16, SettingError> {
    match text(name)? {
        Some(text) => text.parse().map_err(|_| SettingError::NotPort { name: name.to_string(), text }),
        None => Ok(default),
    }
}
