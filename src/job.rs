//! What every way of running a job shares, whether `monoshot`, a forked daemon or one in the
//! foreground: the job's hash cache, its status record, the progress decision and the
//! worker pool. Both `commands` and `daemon` use it, and it uses neither.

use std::io::IsTerminal;

use crate::config::{Config, Verbosity};
use crate::state::cache::Cache;
use crate::state::status::{JobStatus, PassRecord};
use crate::{journal, state};

/// Opens the job's hash cache, logging any warning about it.
pub fn open_cache(cfg: &Config) -> Cache {
    let (cache, warnings) = Cache::open(
        &state::file(&cfg.state_dir, &cfg.name, "cache.redb"),
        &cfg.source,
        &cfg.replica,
    );
    for w in warnings {
        log::warn!("{w}");
    }
    cache
}

/// A progress bar is shown only on a terminal and not with `-q`.
pub fn wants_progress(cfg: &Config) -> bool {
    cfg.verbosity != Verbosity::Quiet
        && std::io::stderr().is_terminal()
        && std::io::stdout().is_terminal()
}

pub fn base_status(cfg: &Config) -> JobStatus {
    JobStatus {
        name: cfg.name.clone(),
        source: Some(crate::model::show(&cfg.source)),
        replica: Some(crate::model::show(&cfg.replica)),
        interval_seconds: cfg.interval.map(|i| i.as_secs()),
        updated: Some(journal::now_rfc3339()),
        ..JobStatus::default()
    }
}

/// Records a pass in the status: a refusal's reason stays until a pass is not refused.
pub fn record_pass(status: &mut JobStatus, pass: &PassRecord) {
    status.refused_reason = if pass.result == "refused" {
        pass.reason.clone()
    } else {
        None
    };
    status.last_pass = Some(pass.clone());
    status.updated = Some(journal::now_rfc3339());
}

pub fn build_pool(threads: usize) {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
}
