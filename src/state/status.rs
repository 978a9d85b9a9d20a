//! The job status file (`<name>.status.json`): what `syncer status` shows. Written
//! atomically (temp file + rename) after every pass and when a daemon starts or stops.
//! The JSON shape is documented in the README and kept stable.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::Counts;

/// How a pass ended (written as a lowercase word in the status and the logs).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PassResult {
    /// The replica equals the source.
    #[default]
    Ok,
    /// Some entries could not be mirrored (or the replica could not be made durable).
    Partial,
    /// A safety guard refused it; nothing was changed.
    Refused,
    /// It could not start (a root check failed); nothing was changed.
    Failed,
    /// SIGTERM, SIGINT or `stop` ended it.
    Interrupted,
}

impl std::fmt::Display for PassResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PassResult::Ok => "ok",
            PassResult::Partial => "partial",
            PassResult::Refused => "refused",
            PassResult::Failed => "failed",
            PassResult::Interrupted => "interrupted",
        })
    }
}

/// Summary of one pass.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PassRecord {
    /// Start time, RFC 3339 UTC.
    pub started: String,
    pub duration_ms: u64,
    /// Of which the scan (listing, comparing, planning), in microseconds. Absent from a
    /// status written before it was measured.
    #[serde(default)]
    pub scan_us: u64,
    pub result: PassResult,
    /// What the pass did (flattened: the JSON keeps one flat object).
    #[serde(flatten)]
    pub counts: Counts,
    /// Why the pass failed or was refused.
    pub reason: Option<String>,
    pub dry_run: bool,
    /// Requests made to an object-store replica (`list N, head N, get N, put N, delete N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct JobStatus {
    pub name: String,
    pub running: bool,
    pub pid: Option<u32>,
    /// `null` for a job that never ran (as every field nothing is known of).
    pub source: Option<String>,
    pub replica: Option<String>,
    pub interval_seconds: Option<u64>,
    pub last_pass: Option<PassRecord>,
    /// RFC 3339 UTC time of the next pass (daemon only).
    pub next_pass: Option<String>,
    /// The reason of the last refused pass, until a pass succeeds.
    pub refused_reason: Option<String>,
    /// Watch mode: what the watcher sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<crate::watch::WatchState>,
    /// When this status was written, RFC 3339 UTC; `null` for a job that never ran.
    pub updated: Option<String>,
}

impl JobStatus {
    /// Nothing was ever recorded for this job (no status file, no daemon).
    pub fn never_ran(&self) -> bool {
        !self.running && self.updated.is_none() && self.last_pass.is_none()
    }
}

pub fn path(state_dir: &Path, name: &str) -> PathBuf {
    super::file(state_dir, name, "status.json")
}

pub fn read(state_dir: &Path, name: &str) -> Option<JobStatus> {
    let text = fs::read_to_string(path(state_dir, name)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn write(state_dir: &Path, status: &JobStatus) -> std::io::Result<()> {
    super::create_dir(state_dir)?;
    // tempfile creates its files 0600: the status lists the job's paths.
    let mut tmp = tempfile::Builder::new()
        .prefix(".status-")
        .suffix(".tmp")
        .tempfile_in(state_dir)?;
    let text = serde_json::to_string_pretty(status).map_err(std::io::Error::other)?;
    tmp.write_all(text.as_bytes())?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path(state_dir, &status.name))
        .map_err(|e| e.error)?;
    Ok(())
}
