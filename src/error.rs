//! The error types and the process exit codes. [`Error`] is fatal (the command stops, exit
//! 2, 3 or 4). [`EntryError`] is a per-entry failure or skip: the pass goes on, the entry is
//! reported once (`journal::report`, which also counts it) and the pass ends with exit 1.
//! [`PathChanged`] is the cause carried by an I/O error when a path component stopped being a
//! directory during the pass (a swapped-in symlink is never followed).

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::model::{show, Kind, RelPath};

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
    /// The job's state belongs to another source/replica pair (exit 2): nothing was touched.
    #[error(
        "job '{name}' mirrors '{recorded_source}' -> '{recorded_replica}'; use --name to start another job, or '{forget}'"
    )]
    ForeignJob {
        name: String,
        recorded_source: String,
        recorded_replica: String,
        /// The command that frees the name.
        forget: String,
    },
    #[error("{0}")]
    Refused(String),
    /// stdout was closed by its reader: the command stopped writing (see `term`); no message.
    #[error("")]
    Closed,
}

impl From<crate::term::Closed> for Error {
    fn from(_: crate::term::Closed) -> Error {
        Error::Closed
    }
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
            Error::Usage(_) | Error::Io { .. } | Error::ForeignJob { .. } => ExitCode::Usage,
            Error::Busy(_) => ExitCode::Busy,
            Error::Refused(_) => ExitCode::Refused,
            Error::Closed => ExitCode::Ok,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl ExitCode {
    /// The code as a number, and back (the daemon reports a start-up failure to its parent
    /// as a number, never as text to parse).
    pub fn from_number(n: i32) -> Option<ExitCode> {
        [
            ExitCode::Ok,
            ExitCode::Partial,
            ExitCode::Usage,
            ExitCode::Refused,
            ExitCode::Busy,
        ]
        .into_iter()
        .find(|c| *c as i32 == n)
    }
}

impl Error {
    /// The error a code stands for, with its message (the inverse of `exit_code`).
    pub fn with_code(code: ExitCode, msg: String) -> Error {
        match code {
            ExitCode::Busy => Error::Busy(msg),
            ExitCode::Refused => Error::Refused(msg),
            _ => Error::Usage(msg),
        }
    }
}

/// Which tree a per-entry problem concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Replica,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Replica => "replica",
        })
    }
}

/// A path component that stopped being what the pass saw (typically a directory swapped for
/// a symlink). Nothing is read or written through it; the next pass repairs the replica.
#[derive(Debug)]
pub struct PathChanged {
    pub side: Side,
    /// The component, relative to its root.
    pub component: RelPath,
    /// What it was expected to be.
    pub expected: Kind,
}

impl fmt::Display for PathChanged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} path changed during the pass: '{}' is no longer a {}",
            self.side,
            self.component,
            self.expected.noun()
        )
    }
}

impl std::error::Error for PathChanged {}

impl PathChanged {
    pub fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// The `PathChanged` an I/O error carries, if any.
    pub fn of(err: &io::Error) -> Option<&PathChanged> {
        err.get_ref()?.downcast_ref::<PathChanged>()
    }
}

/// A directory on another filesystem than its tree's root, met with `--one-file-system`
/// (or below a tree being removed): it is not descended into.
#[derive(Debug)]
pub struct MountPoint {
    pub side: Side,
    pub rel: RelPath,
}

impl fmt::Display for MountPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "'{}' is a mount point (another filesystem) in the {}: not descended into",
            self.rel, self.side
        )
    }
}

impl std::error::Error for MountPoint {}

impl MountPoint {
    pub fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    pub fn of(err: &io::Error) -> Option<&MountPoint> {
        err.get_ref()?.downcast_ref::<MountPoint>()
    }
}

/// What was being done to the replica when a per-entry write failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOp {
    Copy,
    Delete,
    Mkdir,
    Symlink,
    Link,
    Meta,
    Backup,
}

/// A per-entry failure (exit 1) or skip (the next pass takes it). Every variant names its
/// path; `Display` is the one-line message users see.
#[derive(Debug)]
pub enum EntryError {
    /// Reading an entry (a directory, a file, a symlink) on one side failed.
    Read {
        side: Side,
        what: Kind,
        rel: RelPath,
        cause: io::Error,
    },
    /// Changing the replica failed.
    Write {
        op: WriteOp,
        rel: RelPath,
        cause: io::Error,
    },
    /// The entry vanished from a side while the pass looked at it (skip).
    Vanished {
        side: Side,
        rel: RelPath,
        /// `true`: during the copy; `false`: during the scan.
        copying: bool,
    },
    /// The source changed during both tries of its copy (skip).
    ChangedDuringCopy { rel: RelPath },
    /// The replica entry changed between the scan and its metadata fix (skip).
    ChangedInReplica { rel: RelPath },
}

impl EntryError {
    pub fn rel(&self) -> &RelPath {
        match self {
            EntryError::Read { rel, .. }
            | EntryError::Write { rel, .. }
            | EntryError::Vanished { rel, .. }
            | EntryError::ChangedDuringCopy { rel }
            | EntryError::ChangedInReplica { rel } => rel,
        }
    }

    /// A skip is not a failure of syncer: the entry moved under it, the next pass takes it.
    pub fn is_skip(&self) -> bool {
        matches!(
            self,
            EntryError::Vanished { .. }
                | EntryError::ChangedDuringCopy { .. }
                | EntryError::ChangedInReplica { .. }
        )
    }

    /// A read failure; a `NotFound` one is the entry vanishing, a skip.
    pub fn read(side: Side, what: Kind, rel: &RelPath, cause: io::Error) -> EntryError {
        if cause.kind() == io::ErrorKind::NotFound && what == Kind::File {
            EntryError::Vanished {
                side,
                rel: rel.clone(),
                copying: false,
            }
        } else {
            EntryError::Read {
                side,
                what,
                rel: rel.clone(),
                cause,
            }
        }
    }

    pub fn write(op: WriteOp, rel: &RelPath, cause: io::Error) -> EntryError {
        EntryError::Write {
            op,
            rel: rel.clone(),
            cause,
        }
    }
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryError::Read {
                side,
                what,
                rel,
                cause,
            } => {
                let noun = match what {
                    Kind::File => "file",
                    other => other.noun(),
                };
                write!(f, "could not read {side} {noun} '{rel}': {}", reason(cause))?;
                if *side == Side::Source && *what == Kind::Dir {
                    f.write_str("; nothing below its replica twin is deleted")?;
                }
                Ok(())
            }
            EntryError::Write { op, rel, cause } => {
                let why = reason(cause);
                match op {
                    WriteOp::Copy => write!(f, "could not copy '{rel}' into the replica: {why}"),
                    WriteOp::Delete => {
                        write!(f, "could not delete '{rel}' from the replica: {why}")
                    }
                    WriteOp::Mkdir => write!(
                        f,
                        "could not create directory '{rel}' in the replica: {why}"
                    ),
                    WriteOp::Symlink => {
                        write!(f, "could not create symlink '{rel}' in the replica: {why}")
                    }
                    WriteOp::Link => {
                        write!(f, "could not make hard link '{rel}' in the replica: {why}")
                    }
                    WriteOp::Meta => {
                        write!(f, "could not set metadata of '{rel}' in the replica: {why}")
                    }
                    WriteOp::Backup => {
                        write!(f, "could not back up '{rel}' before overwriting it: {why}")
                    }
                }
            }
            EntryError::Vanished {
                side,
                copying: false,
                ..
            } => write!(
                f,
                "vanished from the {side} during the scan; the next pass takes it"
            ),
            EntryError::Vanished { side, .. } => {
                write!(f, "vanished from the {side} before it could be copied")
            }
            EntryError::ChangedDuringCopy { .. } => {
                f.write_str("changed while it was copied (tried twice); the next pass takes it")
            }
            EntryError::ChangedInReplica { .. } => {
                f.write_str("changed in the replica during the pass; the next pass takes it")
            }
        }
    }
}

/// Short text for an I/O error: the OS message without the "(os error N)" suffix, or the
/// message of the `PathChanged` it carries.
pub fn reason(err: &std::io::Error) -> String {
    if let Some(changed) = PathChanged::of(err) {
        return changed.to_string();
    }
    if let Some(mount) = MountPoint::of(err) {
        return mount.to_string();
    }
    let s = err.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_lowercase(),
        None => s,
    }
}
