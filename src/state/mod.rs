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
//! <name>.cache.redb     hash cache and pass history
//! <name>.io.log         file-I/O log          <name>.schedule.log   schedule log
//! <name>.daemon.log     the daemon's stdout/stderr
//! locks/<id>.lock       one per replica (id derived from its canonical path)
//! ```

pub mod cache;
pub mod lock;
pub mod status;

use std::path::{Path, PathBuf};

pub fn file(state_dir: &Path, name: &str, suffix: &str) -> PathBuf {
    state_dir.join(format!("{name}.{suffix}"))
}
