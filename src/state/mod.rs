//! Job state in the state directory: the hash cache (`cache`, the only user of the embedded
//! database), the job status file that `status` reads (`status`), and the locks that make one
//! writer per replica and one daemon per job (`lock`).
//!
//! Layout of a state directory:
//! ```text
//! <name>.pid            daemon PID file: the pid and a newline; locked while the daemon runs
//! <name>.start          `<pid> <nonce>` of a forked daemon, for the `start` waiting on it
//! <name>.start-error    why a forked daemon did not start, for that same `start`
//! <name>.status.json    last pass, next pass, refusal reason (written atomically)
//! <name>.cache.redb     hash cache and pass history; records the job's source/replica pair
//! <name>.s3index.redb   an s3:// replica's index (see `replica::s3`)
//! <name>.io.log         file-I/O log          <name>.schedule.log   schedule log
//! <name>.daemon.log     the daemon's stdout/stderr
//! locks/<id>.lock       one per replica (id derived from its canonical path)
//! ```
//!
//! The cache, the logs and the status list every path a job backs up, so syncer creates the
//! state directory owner-only (0700) and every file in it 0600 (`create_dir`, `private`).
//! What already exists keeps its mode: a directory a user made 0755 on purpose still works.

pub mod cache;
pub mod lock;
pub mod peek;
pub mod status;

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub fn file(state_dir: &Path, name: &str, suffix: &str) -> PathBuf {
    state_dir.join(format!("{name}.{suffix}"))
}

/// Creates `dir` and its missing parents owner-only (0700, less what the umask takes). An
/// existing directory is left as it is.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Options that create a missing file owner-only (0600, less what the umask takes); an
/// existing file keeps its mode. The caller adds read, write, append, truncate...
pub fn private() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.create(true).mode(0o600);
    o
}

/// Replaces the content of `path` (created 0600 if missing).
pub fn write_private(path: &Path, text: &str) -> io::Result<()> {
    use std::io::Write;
    let mut f: File = private().write(true).truncate(true).open(path)?;
    f.write_all(text.as_bytes())
}
