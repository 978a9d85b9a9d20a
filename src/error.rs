//! The error type of fatal conditions and the process exit codes. Per-entry failures are not
//! errors of this kind: they become outcomes of the pass (see `apply`) and exit code 1.

use std::path::PathBuf;

use crate::model::show;

/// Process exit codes, as documented in the README.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    /// The replica equals the source.
    Ok = 0,
    /// Partial: some entries could not be mirrored.
    Partial = 1,
    /// Usage or configuration error: nothing was changed.
    Usage = 2,
    /// Refused by a safety guard: nothing was changed.
    Refused = 3,
    /// Busy: another process holds the lock.
    Busy = 4,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("could not {op} '{}': {source}", show(path))]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Refused(String),
}

impl Error {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Usage(_) | Error::Io { .. } => ExitCode::Usage,
            Error::Busy(_) => ExitCode::Busy,
            Error::Refused(_) => ExitCode::Refused,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Short text for an I/O error: the OS message without the "(os error N)" suffix.
pub fn reason(err: &std::io::Error) -> String {
    let s = err.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_lowercase(),
        None => s,
    }
}
