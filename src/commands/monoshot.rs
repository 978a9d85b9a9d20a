//! `syncer monoshot`: one pass under the replica lock, then exit with the pass's code.

use crate::cli::SyncArgs;
use crate::config::Config;
use crate::error::{ExitCode, Result};
use crate::state::{lock, status};
use crate::{cancel, job, journal, pass};

pub fn run(args: &SyncArgs) -> Result<ExitCode> {
    let cfg = Config::from_args(args, None)?;
    journal::init(Some(cfg.verbosity));
    job::check_pair(&cfg)?;
    let who = format!("monoshot pid {} job {}", std::process::id(), cfg.name);
    let _lock = lock::lock_replica(&cfg.state_dir, &cfg.replica, &who)?;
    if !cfg.dry_run {
        journal::open_files(&cfg.io_log, &cfg.schedule_log);
    }
    cancel::on_signals().map_err(|e| crate::error::Error::io("install signal handlers", "/", e))?;
    job::build_pool(cfg.threads);
    let cache = if cfg.dry_run {
        crate::state::cache::Cache::disabled()
    } else {
        job::open_cache(&cfg)?
    };
    let outcome = pass::run(&cfg, &cache, job::wants_progress(&cfg));
    if !cfg.dry_run {
        let mut st =
            status::read(&cfg.state_dir, &cfg.name).unwrap_or_else(|| job::base_status(&cfg));
        let base = job::base_status(&cfg);
        st.source = base.source;
        st.replica = base.replica;
        job::record_pass(&mut st, &outcome.record);
        if let Err(e) = status::write(&cfg.state_dir, &st) {
            log::warn!("could not write the job status: {e}");
        }
    }
    Ok(outcome.exit)
}
