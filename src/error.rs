//! The error every applet returns, and how it maps to an exit status
//! (sysexits: usage 64, no such service 69, I/O 74; anything else 1).

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::name::NameError;
use crate::selector::SelectorError;
use crate::tree::TreeError;

pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 64;
pub const EXIT_NO_SERVICE: i32 = 69;
pub const EXIT_IO: i32 = 74;

#[derive(Debug, Error)]
pub enum Error {
    /// Bad command line; the message says what was wrong.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Selector(#[from] SelectorError),
    #[error("no service matches {0:?} (dls lists what there is)")]
    NoService(String),
    #[error("no service matching {selector:?} accepted a connection: {last}")]
    NoneAccepted { selector: String, last: String },
    #[error(
        "{count} FILEs are more than the {limit} files this process may hold open (ulimit -Hn), and each is \
         opened before anything is sent: send them through one pipe instead (cat FILE… | dcat SERVICE)"
    )]
    TooManyFiles { count: usize, limit: u64 },
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    Remote(#[from] crate::sep_client::ClientError),
    #[error(transparent)]
    Ssh(#[from] crate::ssh::SshError),
    #[error(transparent)]
    Import(#[from] crate::import::ImportError),
    #[error(transparent)]
    Setting(#[from] crate::settings::SettingError),
    #[error("{0}")]
    Failed(String),
}

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io { what: what.into(), source }
    }

    pub fn exit_status(&self) -> i32 {
        match self {
            // A name that cannot be (too long for sun_path, bad characters)
            // is the caller's to fix, wherever it was found.
            Error::Usage(_)
            | Error::Name(_)
            | Error::Selector(_)
            | Error::Tree(TreeError::Name(_) | TreeError::NoRoom { .. })
            | Error::Setting(_)
            | Error::Ssh(crate::ssh::SshError::NoRoom { .. } | crate::ssh::SshError::Setting(_)) => EXIT_USAGE,
            Error::NoService(_) | Error::NoneAccepted { .. } => EXIT_NO_SERVICE,
            Error::Open { .. } | Error::TooManyFiles { .. } | Error::Io { .. } | Error::Remote(_) | Error::Ssh(_) => {
                EXIT_IO
            }
            Error::Tree(_) | Error::Failed(_) | Error::Import(_) => EXIT_FAILURE,
        }
    }
}
