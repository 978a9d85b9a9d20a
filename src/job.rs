//! What every way of running a job shares, whether `monoshot`, a forked daemon or one in the
//! foreground: which source/replica pair the job belongs to, its hash cache, its status
//! record, the progress decision and the worker pool. Both `commands` and `daemon` use it,
//! and it uses neither.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use crate::config::{Config, Verbosity};
use crate::error::{Error, Result};
use crate::model::show;
use crate::state::cache::{self, Cache, Foreign};
use crate::state::status::{self, JobStatus, PassRecord, PassResult};
use crate::{journal, state};

/// The source/replica pair a job's state belongs to, as recorded.
///
/// The hash cache is the authority: it records the two canonical paths byte for byte, it is
/// what a wrong pair would spoil, and it exists for every job that ever ran a pass. The
/// status file stands in when there is no cache to ask: a job whose cache is missing,
/// unreadable, or held open by the job's running daemon (it records the paths as shown,
/// and `start` writes it before the first pass). Neither is written by a refused run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pair {
    /// From the cache.
    Exact { source: PathBuf, replica: PathBuf },
    /// From the status file.
    Shown { source: String, replica: String },
}

impl Pair {
    /// The two paths, as messages show them.
    pub fn shown(&self) -> (String, String) {
        match self {
            Pair::Exact { source, replica } => (show(source), show(replica)),
            Pair::Shown { source, replica } => (source.clone(), replica.clone()),
        }
    }

    pub fn is(&self, source: &Path, replica: &Path) -> bool {
        match self {
            Pair::Exact {
                source: s,
                replica: r,
            } => s == source && r == replica,
            Pair::Shown {
                source: s,
                replica: r,
            } => *s == show(source) && *r == show(replica),
        }
    }
}

/// The pair job `name` of state directory `dir` belongs to, if it recorded one. Reads only:
/// no file is created or written, and nothing waits.
pub fn recorded_pair(dir: &Path, name: &str) -> Option<Pair> {
    if let Ok(Some((source, replica))) = cache::recorded_pair(&state::file(dir, name, "cache.redb"))
    {
        return Some(Pair::Exact { source, replica });
    }
    let st = status::read(dir, name)?;
    Some(Pair::Shown {
        source: st.source?,
        replica: st.replica?,
    })
}

/// Refuses (exit 2) a run whose source/replica pair is not the one its job's state belongs
/// to, before anything is opened or written.
pub fn check_pair(cfg: &Config) -> Result<()> {
    match recorded_pair(&cfg.state_dir, &cfg.name) {
        Some(p) if !p.is(&cfg.source, &cfg.replica) => Err(foreign(cfg, p.shown())),
        _ => Ok(()),
    }
}

fn foreign(cfg: &Config, (source, replica): (String, String)) -> Error {
    let mut forget = format!("syncer forget --name {}", cfg.name);
    if cfg.state_dir != crate::config::default_state_dir() {
        forget.push_str(&format!(
            " --state-dir {}",
            shell_word(&show(&cfg.state_dir))
        ));
    }
    Error::ForeignJob {
        name: cfg.name.clone(),
        recorded_source: source,
        recorded_replica: replica,
        forget,
    }
}

/// `text` as one shell word: as it is when it holds nothing a shell would act on, else in
/// double quotes (the command is shown inside single quotes).
fn shell_word(text: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,:=@%".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        return text.to_string();
    }
    let mut out = String::from("\"");
    for c in text.chars() {
        if "\"\\$`".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Opens the job's hash cache, logging any warning about it: a dry run reads a private
/// copy, never the file itself. A cache of another pair is refused (exit 2) and left as it
/// is.
pub fn open_cache(cfg: &Config) -> Result<Cache> {
    let open = match cfg.dry_run {
        true => Cache::open_copy,
        false => Cache::open,
    };
    let (cache, warnings) = open(
        &state::file(&cfg.state_dir, &cfg.name, "cache.redb"),
        &cfg.source,
        &cfg.replica,
    )
    .map_err(|Foreign { source, replica }| foreign(cfg, (show(&source), show(&replica))))?;
    for w in warnings {
        log::warn!("{w}");
    }
    Ok(cache)
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
    status.refused_reason = if pass.result == PassResult::Refused {
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
