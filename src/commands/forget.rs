//! `syncer forget`: removes a stopped job's state (hash cache, S3 index, status, start and
//! stopping files, a stale PID file), so that its name can serve another source/replica pair. A running job
//! is refused (exit 4), whether it is a daemon (its PID file is locked) or a monoshot (it
//! holds its cache open). Logs are the job's history, not its state: they are kept unless
//! `--logs` is given, and a log outside the state directory is never touched.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::ErrorKind;
use std::path::PathBuf;

use crate::cli::ForgetArgs;
use crate::config;
use crate::daemon;
use crate::error::{Error, ExitCode, Result};
use crate::model::show;
use crate::state::{self, lock};
use crate::{job, term};

/// The job's state, by suffix: what `forget` removes.
const STATE: [&str; 7] = [
    "cache.redb",
    "s3index.redb",
    "status.json",
    "start",
    "start-error",
    "stopping",
    "pid",
];

/// The job's logs at their default places.
const LOGS: [&str; 3] = ["io.log", "schedule.log", "daemon.log"];

pub fn run(args: &ForgetArgs) -> Result<ExitCode> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let dir = config::state_dir(args.state_dir.as_deref(), &cwd);
    let name = args.name.as_str();
    config::check_name(name)?;
    if let Some(text) = lock::holder(&state::file(&dir, name, "pid")) {
        let pid = daemon::pid_of(&text).map_or("unknown".into(), |p| p.to_string());
        return Err(Error::Busy(format!(
            "job '{name}' is running (pid {pid}); stop it first ('syncer stop --name {name}')"
        )));
    }
    let pair = job::recorded_pair(&dir, name);
    // A monoshot holds the job's databases open, under redb's exclusive lock: taking that
    // lock refuses a job in use, and keeps it from starting while they are removed.
    let mut held: Vec<File> = Vec::new();
    for suffix in ["cache.redb", "s3index.redb"] {
        let path = state::file(&dir, name, suffix);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        match file.try_lock() {
            Ok(()) => held.push(file),
            Err(TryLockError::WouldBlock) => {
                return Err(Error::Busy(format!(
                    "job '{name}' is in use: another syncer process has '{}' open",
                    show(&path)
                )))
            }
            Err(TryLockError::Error(e)) => return Err(Error::io("lock", &path, e)),
        }
    }
    let mut remove: Vec<&str> = STATE.to_vec();
    if args.logs {
        remove.extend(LOGS);
    }
    let mut removed: Vec<PathBuf> = Vec::new();
    for suffix in remove {
        let path = state::file(&dir, name, suffix);
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &path, e)),
        }
    }
    drop(held);
    let kept: Vec<PathBuf> = LOGS
        .iter()
        .map(|s| state::file(&dir, name, s))
        .filter(|p| p.exists())
        .collect();
    if removed.is_empty() {
        term::out(format_args!(
            "job '{name}' has no state in '{}'",
            show(&dir)
        ))?;
    } else {
        match pair.map(|p| p.shown()) {
            Some((s, r)) => term::out(format_args!("forgot job '{name}' ('{s}' -> '{r}')"))?,
            None => term::out(format_args!("forgot job '{name}'"))?,
        }
        for p in &removed {
            term::out(format_args!("  removed '{}'", show(p)))?;
        }
    }
    for p in &kept {
        term::out(format_args!(
            "  kept log '{}' (remove it, or forget with --logs)",
            show(p)
        ))?;
    }
    Ok(ExitCode::Ok)
}
