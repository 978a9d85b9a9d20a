//! `syncer status`: per job, whether its daemon runs (the PID file's lock is the truth) and
//! what the status file says about the last and next pass.

use std::path::Path;

use crate::cli::StatusArgs;
use crate::config;
use crate::daemon;
use crate::error::{ExitCode, Result};
use crate::state::status::{self, JobStatus};
use crate::state::{self, lock};
use crate::term;

/// Job names known in a state directory (from status and PID files), sorted.
pub fn job_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.strip_suffix(".status.json")
                .or_else(|| n.strip_suffix(".pid"))
                .map(String::from)
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The status of one job with `running` and `pid` taken from the live PID file.
pub fn live(dir: &Path, name: &str) -> JobStatus {
    let mut st = status::read(dir, name).unwrap_or_else(|| JobStatus {
        name: name.to_string(),
        ..JobStatus::default()
    });
    match lock::holder(&state::file(dir, name, "pid")) {
        Some(text) => {
            st.running = true;
            st.pid = daemon::pid_of(&text);
        }
        None => {
            st.running = false;
            st.pid = None;
            st.next_pass = None;
        }
    }
    st
}

pub fn run(args: &StatusArgs) -> Result<ExitCode> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let dir = config::state_dir(args.job.state_dir.as_deref(), &cwd);
    let names = if args.job.all {
        job_names(&dir)
    } else {
        vec![args.job.name.clone()]
    };
    for n in &names {
        config::check_name(n)?;
    }
    let jobs: Vec<JobStatus> = names.iter().map(|n| live(&dir, n)).collect();
    if args.json {
        let text = if args.job.all {
            serde_json::to_string_pretty(&jobs)
        } else {
            serde_json::to_string_pretty(&jobs[0])
        };
        term::out(format_args!("{}", text.unwrap_or_default()))?;
        return Ok(ExitCode::Ok);
    }
    if jobs.is_empty() {
        term::out(format_args!("no jobs in '{}'", crate::model::show(&dir)))?;
    }
    for st in jobs {
        print_human(&st, &dir)?;
    }
    Ok(ExitCode::Ok)
}

fn print_human(st: &JobStatus, dir: &Path) -> std::result::Result<(), term::Closed> {
    match st.pid {
        Some(pid) if st.running => {
            term::out(format_args!("job '{}': running (pid {pid})", st.name))?
        }
        _ if st.never_ran() => {
            return term::out(format_args!(
                "job '{}': never ran (nothing recorded in '{}')",
                st.name,
                crate::model::show(dir)
            ))
        }
        _ => term::out(format_args!("job '{}': not running", st.name))?,
    }
    if let (Some(s), Some(r)) = (&st.source, &st.replica) {
        term::out(format_args!("  source:    {s}"))?;
        term::out(format_args!("  replica:   {r}"))?;
    }
    if let Some(i) = st.interval_seconds {
        term::out(format_args!(
            "  interval:  {}",
            humantime::format_duration(std::time::Duration::from_secs(i))
        ))?;
    }
    match &st.last_pass {
        Some(p) => term::out(format_args!(
            "  last pass: {} {} in {:.3}s: created {}, updated {}, drift {}, deleted {}, moved {}, meta {}, \
             copied {} bytes, hashed {} files, errors {}, skipped {}",
            p.started,
            p.result,
            p.duration_ms as f64 / 1000.0,
            p.counts.created,
            p.counts.updated,
            p.counts.drifted,
            p.counts.deleted,
            p.counts.moved,
            p.counts.meta,
            p.counts.bytes_copied,
            p.counts.hashed_files,
            p.counts.errors,
            p.counts.skipped
        ))?,
        None => term::out(format_args!("  last pass: none"))?,
    }
    if let Some(r) = st.last_pass.as_ref().and_then(|p| p.reason.as_ref()) {
        term::out(format_args!("  reason:    {r}"))?;
    }
    if let Some(n) = &st.next_pass {
        term::out(format_args!("  next pass: {n}"))?;
    }
    if let Some(r) = &st.refused_reason {
        term::out(format_args!("  refused:   {r}"))?;
    }
    Ok(())
}
