//! Advisory locks (`flock`) in the state directory. A lock belongs to an open file, so the
//! kernel releases it when its process dies, however it dies: no stale lock can outlive a
//! crash, and a leftover lock file is harmless.
//!
//! - The replica lock (`locks/<id>.lock`, id from the replica's canonical path): one writer
//!   per replica. monoshot holds it for its pass; a daemon for its whole life.
//! - The PID file (`<name>.pid`): one daemon per job; locked by the daemon while it runs.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::model::show;

/// A held lock; released when dropped (or when the process exits).
pub struct Held {
    file: File,
    path: PathBuf,
    /// The replica's own lock (see `lock_replica`).
    _replica: Option<Box<dyn Send>>,
}

impl Held {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the lock file's text (who holds it).
    pub fn describe(&mut self, text: &str) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(text.as_bytes())?;
        self.file.flush()
    }
}

/// Tries to take the lock at `path`. `Ok(Err(text))` means another process holds it, with
/// the text the holder wrote into the file.
pub fn try_lock(path: &Path) -> std::io::Result<std::result::Result<Held, String>> {
    if let Some(parent) = path.parent() {
        super::create_dir(parent)?;
    }
    let mut file = super::private()
        .read(true)
        .write(true)
        .truncate(false)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Ok(Held {
            file,
            path: path.to_path_buf(),
            _replica: None,
        })),
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            Ok(Err(text.trim().to_string()))
        }
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// Who holds the lock at `path`, if anyone (the holder's text). Only looks: never creates
/// the file (or its directory), so polling a PID file its daemon just removed cannot leave
/// an empty one behind.
pub fn holder(path: &Path) -> Option<String> {
    let mut file = OpenOptions::new().read(true).open(path).ok()?;
    match file.try_lock() {
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            Some(text.trim().to_string())
        }
        _ => None,
    }
}

pub fn replica_lock_path(state_dir: &Path, replica: &Path) -> PathBuf {
    let digest = Sha256::digest(std::os::unix::ffi::OsStrExt::as_bytes(replica.as_os_str()));
    let id: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    state_dir.join("locks").join(format!("{id}.lock"))
}

/// The exit-4 error for a replica whose lock `holder` holds (its text).
fn busy(replica: &Path, holder: &str) -> Error {
    let holder = if holder.is_empty() {
        "holder unknown"
    } else {
        holder
    };
    Error::Busy(format!(
        "replica '{}' is busy: another pass holds its lock ({holder})",
        show(replica)
    ))
}

/// Fails with exit code 4, as `lock_replica` would, if a process holds the replica's lock
/// file; takes nothing. For a caller that opens the replica before it takes the lock (an
/// object store's index would otherwise be found open by the pass that holds it).
pub fn probe_replica(state_dir: &Path, replica: &Path) -> Result<()> {
    match holder(&replica_lock_path(state_dir, replica)) {
        Some(text) => Err(busy(replica, &text)),
        None => Ok(()),
    }
}

/// Takes the replica lock or fails with exit code 4 naming the holder. Besides the lock file
/// in the state directory, the replica takes its own lock (a local replica: `flock` of its
/// root directory, which writes nothing into it), so two runs with different `--state-dir`s
/// cannot write one replica at the same time either.
pub fn lock_replica(state_dir: &Path, replica: &Path, who: &str) -> Result<Held> {
    let path = replica_lock_path(state_dir, replica);
    // `holder` (a probe by `start`, a dry run, another monoshot) holds the lock for an
    // instant: a refusal is retried for a short while, as the daemon's PID file is.
    let mut tries = 0;
    let mut held = loop {
        match try_lock(&path).map_err(|e| Error::io("lock", &path, e))? {
            Ok(held) => break held,
            Err(_) if tries < 10 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(text) => return Err(busy(replica, &text)),
        }
    };
    let text = format!("{who} replica {}\n", show(replica));
    held.describe(&text)
        .map_err(|e| Error::io("write lock file", &path, e))?;
    if crate::replica::s3::Target::parse(replica.as_os_str()).is_some() {
        // An object store has no lock of its own: the lock file, keyed by its URL, keeps
        // the passes of this machine apart.
        return Ok(held);
    }
    let target = crate::replica::open(replica, crate::replica::Options::default());
    // A replica that cannot be opened yet (missing) has nothing to lock; the pass reports
    // any other problem with it.
    if let Ok(target) = target {
        match target.lock() {
            Ok(guard) => held._replica = guard,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(busy(
                    replica,
                    "a syncer process using another state directory",
                ));
            }
            Err(e) => return Err(Error::io("lock", replica, e)),
        }
    }
    Ok(held)
}
