//! `syncer monoshot`: one pass under the replica lock, then exit with the pass's code.
//!
//! The order is what keeps a bad run from touching the job's state: the arguments and roots
//! (`Config`), the job's source/replica pair, then the pass's first stage (the trees opened,
//! a missing replica created); only a run that got that far takes the replica lock, opens
//! the logs and the hash cache, and writes the status. A run stopped by a signal during that
//! first stage (a stalled server) is not a bad root: it is recorded as interrupted.
//!
//! A dry run writes nothing at all: it takes no lock (a dry run while the job's daemon
//! runs works, and says it may be out of date), opens no log, reads a private copy of the
//! hash cache (and of an object store's index), and writes no status.

use crate::cli::SyncArgs;
use crate::config::Config;
use crate::error::{Error, ExitCode, Result};
use crate::model::show;
use crate::pass::{NotChecked, Outcome};
use crate::state::{self, lock, status};
use crate::{cancel, job, journal, pass};

pub fn run(args: &SyncArgs) -> Result<ExitCode> {
    let cfg = Config::from_args(args, None)?;
    journal::init(Some(cfg.verbosity));
    job::check_pair(&cfg)?;
    cancel::on_signals().map_err(|e| Error::io("install signal handlers", "/", e))?;
    job::build_pool(cfg.threads);
    if cfg.dry_run {
        return dry_run(&cfg);
    }
    lock::probe_replica(&cfg.state_dir, &cfg.replica)?;
    // An object store's index is created in the state directory when the replica opens.
    state::create_dir(&cfg.state_dir)
        .map_err(|e| Error::io("create state directory", &cfg.state_dir, e))?;
    let checked = match pass::check(&cfg) {
        Ok(c) => c,
        Err(NotChecked::Failed(msg)) => return Err(Error::Usage(msg)),
        Err(NotChecked::Interrupted(pass)) => {
            journal::open_files(&cfg.io_log, &cfg.schedule_log);
            let outcome = pass.record();
            record(&cfg, &outcome);
            return Ok(outcome.exit);
        }
    };
    let who = format!("monoshot pid {} job {}", std::process::id(), cfg.name);
    let _lock = lock::lock_replica(&cfg.state_dir, &cfg.replica, &who)?;
    journal::open_files(&cfg.io_log, &cfg.schedule_log);
    let cache = job::open_cache(&cfg)?;
    let outcome = checked.run(&cache, job::wants_progress(&cfg));
    record(&cfg, &outcome);
    Ok(outcome.exit)
}

/// Writes the pass into the job's status.
fn record(cfg: &Config, outcome: &Outcome) {
    let mut st = status::read(&cfg.state_dir, &cfg.name).unwrap_or_else(|| job::base_status(cfg));
    let base = job::base_status(cfg);
    st.source = base.source;
    st.replica = base.replica;
    job::record_pass(&mut st, &outcome.record);
    if let Err(e) = status::write(&cfg.state_dir, &st) {
        log::warn!("could not write the job status: {e}");
    }
}

fn dry_run(cfg: &Config) -> Result<ExitCode> {
    if let Some(holder) = lock::holder(&lock::replica_lock_path(&cfg.state_dir, &cfg.replica)) {
        log::warn!(
            "replica '{}' is in use by another pass ({holder}); this dry run may be out of date",
            show(&cfg.replica)
        );
    }
    let checked = match pass::check(cfg) {
        Ok(c) => c,
        Err(NotChecked::Failed(msg)) => return Err(Error::Usage(msg)),
        Err(NotChecked::Interrupted(pass)) => return Ok(pass.record().exit),
    };
    let cache = job::open_cache(cfg)?;
    Ok(checked.run(&cache, false).exit)
}
