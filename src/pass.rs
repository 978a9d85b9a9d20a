//! One pass, end to end, one method per stage: check the roots, scan and compare, guard,
//! apply, commit. Returns a `PassRecord` and the exit code; never panics on bad input and
//! never exits the process. Shared by `monoshot` and the daemon loop.
//!
//! The source is reached through `source::LocalSource` and the replica through the
//! `replica::Replica` interface only; this file never touches either tree itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::apply::{self, Applied, Applier, Fixed, Written};
use crate::cancel;
use crate::compare::Compare;
use crate::config::Config;
use crate::error::{reason, ExitCode};
use crate::journal;
use crate::model::{show, HashCounters, Meta, Racy, RelPath};
use crate::moves;
use crate::plan::{Op, Plan};
use crate::replica::s3::S3Replica;
use crate::replica::{self, Replica};
use crate::scan::{self, Ctx, Scanned};
use crate::source::{LocalSource, SourceTree};
use crate::state::cache::{Cache, CachedFile, ChunkError, Delta, DirChange};
use crate::state::status::{PassRecord, PassResult};

/// A source token whose ctime is within this window before the pass started is racy (see
/// `model::Racy`), unless the narrow window applies. Wider than any timestamp granularity in
/// use (FAT keeps 2 s), with a margin for clock skew (a network filesystem stamps files with
/// the server's clock).
const WIDE_RACY_WINDOW_NS: i64 = 3_000_000_000;

/// The racy window for files on the source root's filesystem when it keeps nanosecond
/// timestamps (`source::fine_timestamps_type`). The kernel stamps inode times from its coarse
/// clock, which lags the clock the pass start is read from by at most one tick (1 to 10 ms);
/// a write in the same tick as the hash therefore has a ctime later than the pass start
/// minus one tick. Five ticks at HZ=100 leave a margin, and keep a pass that follows another
/// within a fraction of a second from re-hashing what the first one copied.
const FINE_RACY_WINDOW_NS: i64 = 50_000_000;

pub struct Outcome {
    pub record: PassRecord,
    pub exit: ExitCode,
    /// Replica entries the scan saw (a full pass: the whole replica).
    pub replica_entries: u64,
}

/// Runs one pass. `progress`: show a progress bar (the caller checked for a TTY).
pub fn run(cfg: &Config, cache: &Cache, progress: bool) -> Outcome {
    Pass::new(cfg).run(cache, progress)
}

/// A pass whose first stage passed: the roots are checked and both trees are open.
pub struct Checked<'a> {
    pass: Pass<'a>,
    trees: Trees,
}

/// Why the first stage did not pass.
pub enum NotChecked<'a> {
    /// A bad root: the one-line reason (exit 2), not yet logged.
    Failed(String),
    /// SIGTERM/SIGINT while a root was being reached (a stalled server): the pass, to be
    /// recorded as interrupted (`Interrupted::record`).
    Interrupted(Interrupted<'a>),
}

/// A pass interrupted in its first stage.
pub struct Interrupted<'a>(Box<Pass<'a>>);

impl Interrupted<'_> {
    /// Logs the pass as started and interrupted; its outcome (exit 1).
    pub fn record(self) -> Outcome {
        let pass = *self.0;
        pass.start_line();
        pass.interrupted()
    }
}

/// Runs the first stage of a pass on its own, for a caller that opens the job's state only
/// once the roots are known to be good (monoshot: a run that fails here touches no state
/// file).
pub fn check(cfg: &Config) -> Result<Checked<'_>, NotChecked<'_>> {
    let mut pass = Pass::new(cfg);
    match pass.check() {
        Ok(trees) => Ok(Checked { pass, trees }),
        Err(_) if cancel::requested() => Err(NotChecked::Interrupted(Interrupted(Box::new(pass)))),
        Err(msg) => Err(NotChecked::Failed(msg)),
    }
}

impl Checked<'_> {
    /// Runs the rest of the pass.
    pub fn run(self, cache: &Cache, progress: bool) -> Outcome {
        self.pass.start_line();
        self.pass.run_checked(self.trees, cache, progress)
    }
}

/// What `start` checks before it forks, so that a job that cannot run fails on the caller's
/// terminal (exit 2) instead of in every pass of a daemon: everything a pass checks first
/// (the source readable, the replica creatable or reachable, the backup directory), and that
/// the replica can be written (one transient entry made and removed). Reads and writes no
/// state file.
pub fn preflight(cfg: &Config) -> Result<(), String> {
    let mut pass = Pass::new(cfg);
    pass.probing = true;
    let trees = pass.check()?;
    trees.replica.probe().map_err(|e| {
        format!(
            "could not write into replica '{}': {}",
            show(&cfg.replica),
            reason(&e)
        )
    })
}

/// Watch mode's view of a pass: the watcher (every listed source directory is watched
/// first) and, for a partial pass, the dirty set and the size of the whole replica (so the
/// deletion guard judges the whole replica, not the part walked).
pub struct Watching<'a> {
    pub watcher: &'a crate::watch::Watcher,
    pub partial: Option<(crate::watch::dirty::DirtySet, u64)>,
}

/// Runs a pass in watch mode.
pub fn run_watching(cfg: &Config, cache: &Cache, progress: bool, w: Watching<'_>) -> Outcome {
    let mut pass = Pass::new(cfg);
    pass.watcher = Some(w.watcher);
    if let Some((dirty, whole)) = w.partial {
        pass.scope = Some(dirty);
        pass.whole_replica = whole;
    }
    pass.run(cache, progress)
}

/// The two trees, opened for this pass.
struct Trees {
    source: Box<dyn SourceTree>,
    replica: Box<dyn Replica>,
    src_root: Meta,
    /// The source root's device (`--one-file-system` stays on it).
    src_dev: u64,
    /// `None`: the replica does not exist yet (a dry run of a first pass).
    rep_root: Option<Meta>,
    /// Which source tokens are racy in this pass.
    racy: Racy,
}

struct Pass<'a> {
    cfg: &'a Config,
    t0: Instant,
    started: SystemTime,
    started_ns: i64,
    record: PassRecord,
    /// An object-store replica's request counters, read when the pass ends.
    requests: Option<std::sync::Arc<crate::replica::s3::Requests>>,
    watcher: Option<&'a crate::watch::Watcher>,
    /// A partial pass: what is dirty.
    scope: Option<crate::watch::dirty::DirtySet>,
    /// A partial pass: replica entries at the last full pass.
    whole_replica: u64,
    replica_entries: u64,
    /// `start`'s preflight: no state file is opened (an object store's index stays shut).
    probing: bool,
}

impl<'a> Pass<'a> {
    fn new(cfg: &'a Config) -> Pass<'a> {
        let started = SystemTime::now();
        Pass {
            cfg,
            t0: Instant::now(),
            started,
            started_ns: started
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64),
            record: PassRecord {
                started: humantime::format_rfc3339_millis(started).to_string(),
                dry_run: cfg.dry_run,
                ..PassRecord::default()
            },
            requests: None,
            watcher: None,
            scope: None,
            whole_replica: 0,
            replica_entries: 0,
            probing: false,
        }
    }

    fn start_line(&self) {
        let cfg = self.cfg;
        journal::schedule(format_args!(
            "PASS START source '{}' replica '{}'{}",
            show(&cfg.source),
            show(&cfg.replica),
            if cfg.dry_run { " (dry run)" } else { "" }
        ));
    }

    fn run(mut self, cache: &Cache, progress: bool) -> Outcome {
        self.start_line();
        match self.check() {
            Ok(trees) => self.run_checked(trees, cache, progress),
            // SIGTERM while a root was being reached (a stalled server): not a bad root.
            Err(_) if cancel::requested() => self.interrupted(),
            Err(msg) => {
                log::error!("{msg}");
                self.end(PassResult::Failed, ExitCode::Usage, Some(msg))
            }
        }
    }

    /// 2–7, once the roots are checked and the trees open.
    fn run_checked(mut self, trees: Trees, cache: &Cache, progress: bool) -> Outcome {
        let cfg = self.cfg;
        let mut scanned = self.scan(&trees, cache);
        if cancel::requested() {
            return self.interrupted();
        }
        self.replica_entries = scanned.plan.replica_entries;
        if self.scope.is_some() {
            // A partial pass saw only part of the replica; the guard judges all of it.
            scanned.plan.replica_entries = scanned.plan.replica_entries.max(self.whole_replica);
        }
        if let Err(why) = cfg.guard.check(&scanned.plan) {
            log::error!("{why}");
            journal::schedule(format_args!("PASS REFUSED {why}"));
            return self.end(PassResult::Refused, ExitCode::Refused, Some(why));
        }
        if cfg.dry_run {
            return self.dry_run(&scanned.plan);
        }
        self.apply_and_commit(&trees, cache, scanned, progress)
    }

    /// The backup folder of this pass: milliseconds, so two passes within one second never
    /// share one.
    fn backup_dir(&self) -> Option<std::path::PathBuf> {
        let stamp = humantime::format_rfc3339_millis(self.started)
            .to_string()
            .replace(':', "-");
        self.cfg.backup_dir.as_ref().map(|d| d.join(stamp))
    }

    /// 1. Check the roots and open both trees. `Err` is the one-line reason (exit 2).
    fn check(&mut self) -> Result<Trees, String> {
        let cfg = self.cfg;
        cfg.recheck_roots().map_err(|e| e.to_string())?;
        let index =
            (!self.probing).then(|| cfg.state_dir.join(format!("{}.s3index.redb", cfg.name)));
        let source: Box<dyn SourceTree> = match &cfg.source_s3 {
            Some((target, endpoint)) => {
                let opts = replica::Options {
                    index: index.clone(),
                    dry_run: cfg.dry_run,
                    ..replica::Options::default()
                };
                let s3 = S3Replica::open(target, endpoint, &opts, opts.index.as_deref()).map_err(
                    |e| {
                        format!(
                            "could not read source '{}': {}",
                            show(&cfg.source),
                            reason(&e)
                        )
                    },
                )?;
                self.requests = Some(s3.requests.clone());
                Box::new(s3)
            }
            None => Box::new(LocalSource::open(&cfg.source).map_err(|e| {
                format!(
                    "could not read source '{}': {}",
                    show(&cfg.source),
                    reason(&e)
                )
            })?),
        };
        let src_root = source.root().map_err(|e| {
            format!(
                "could not read source '{}': {}",
                show(&cfg.source),
                reason(&e)
            )
        })?;
        // Only a replica that does not exist is planned as empty: any other error (EIO, a
        // stale NFS handle) would make every file a create and bypass --backup-dir.
        let verb = match (replica::is_remote(&cfg.replica), cfg.dry_run) {
            (true, _) => "reach",
            (false, true) => "read",
            (false, false) => "create",
        };
        let opts = replica::Options {
            create: !cfg.dry_run,
            backup: self.backup_dir(),
            xattrs: cfg.xattrs,
            one_file_system: cfg.one_file_system,
            hard_links: cfg.hard_links,
            endpoint: cfg.s3.as_ref().map(|s| s.1.clone()).unwrap_or_default(),
            index,
            checksum: cfg.checksum,
            dry_run: cfg.dry_run,
        };
        let replica = replica::open(&cfg.replica, opts).map_err(|e| {
            format!(
                "could not {verb} replica '{}': {}",
                show(&cfg.replica),
                reason(&e)
            )
        })?;
        if cfg.source_s3.is_none() {
            self.requests = replica.requests();
        }
        let rep_root = replica.root().map_err(|e| {
            format!(
                "could not read replica '{}': {}",
                show(&cfg.replica),
                reason(&e)
            )
        })?;
        let racy = Racy {
            after_ns: self.started_ns - WIDE_RACY_WINDOW_NS,
            fine: source
                .fine_timestamps()
                .then(|| (source.root_dev(), self.started_ns - FINE_RACY_WINDOW_NS)),
        };
        Ok(Trees {
            racy,
            src_dev: source.root_dev(),
            source,
            replica,
            src_root,
            rep_root,
        })
    }

    /// 2–4. Scan, compare and plan; report what could not be read.
    fn scan(&mut self, trees: &Trees, cache: &Cache) -> Scanned {
        let t0 = Instant::now();
        let counters = HashCounters::default();
        let snapshot = cache.snapshot();
        // A dry run writes nothing into the state directory, not even an unlinked file: its
        // plan goes to the system's temporary directory.
        let spill_dir = match self.cfg.dry_run {
            true => std::env::temp_dir(),
            false => self.cfg.state_dir.clone(),
        };
        let spill = crate::spill::Spill::new(&spill_dir)
            .inspect_err(|e| {
                log::warn!(
                    "could not write the plan to '{}' ({}); keeping it in memory",
                    show(&spill_dir),
                    reason(e)
                )
            })
            .ok();
        // Settled drafts are written during the scan, except in a dry run (which writes
        // nothing) and into a replica that does not exist yet.
        let scopes = self.scope.as_ref().filter(|d| !d.all).map(|d| d.scopes());
        let commit = || trees.replica.commit();
        let settled = (!self.cfg.dry_run && trees.rep_root.is_some())
            .then(|| crate::state::cache::Settled::new(cache, &commit));
        let ctx = Ctx {
            compare: Compare {
                source: trees.source.as_ref(),
                replica: trees.replica.as_ref(),
                caps: trees.replica.capabilities(),
                counters: &counters,
                checksum: self.cfg.checksum,
                racy: trees.racy,
            },
            excludes: &self.cfg.excludes,
            recall: &snapshot,
            one_fs_dev: self.cfg.one_file_system.then_some(trees.src_dev),
            hard_links: trees.replica.capabilities().hard_links,
            watch: self.watcher,
            scope: scopes.as_ref(),
            moves: self.cfg.moves && trees.replica.capabilities().rename,
            spill: spill.as_ref(),
            settled: settled.as_ref(),
        };
        let mut scanned = scan::scan(&ctx, &trees.src_root, trees.rep_root.as_ref());
        scanned.plan.spilled = spill.map(crate::spill::Spill::finish);
        if let Some(settled) = settled {
            let left = settled.finish();
            scanned.drafts.extend(
                left.into_iter()
                    .map(|(dir, delta)| scan::Draft { dir, delta }),
            );
        }
        scanned.relinked = scanned.plan.resolve_links();
        // Moves after hard links: a name a link group needs is never a move's target.
        let linked: HashSet<RelPath> = scanned.relinked.iter().cloned().collect();
        moves::Finder {
            source: trees.source.as_ref(),
            replica: trees.replica.as_ref(),
            counters: &counters,
        }
        .find(&mut scanned.plan, &linked);
        let c = &mut self.record.counts;
        c.hashed_files = counters.files.load(std::sync::atomic::Ordering::Relaxed);
        c.hashed_bytes = counters.bytes.load(std::sync::atomic::Ordering::Relaxed);
        c.entries_read = scanned.plan.entries_read;
        for p in &scanned.plan.problems {
            *c += journal::report(p);
        }
        self.record.scan_us = t0.elapsed().as_micros() as u64;
        scanned
    }

    /// A dry run prints the plan instead of applying it, sorted by path (for one path: in
    /// the order apply runs its actions), and counts what applying it would do.
    fn dry_run(self, plan: &Plan) -> Outcome {
        let mut would = crate::model::Counts::default();
        let mut lines: Vec<(RelPath, u8, String)> = plan
            .iter()
            .flat_map(|a| {
                would += apply::would(&a);
                let (rel, phase) = (a.rel.clone(), apply::phase(&a));
                apply::line(&a)
                    .lines()
                    .map(|l| (rel.clone(), phase, l.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        lines.sort_unstable();
        for (_, _, line) in lines {
            journal::plan_line(format_args!("would {line}"));
        }
        let mut this = self;
        // The record of a dry run holds what applying the plan would have done.
        this.record.counts += would;
        if plan.read_failed() {
            // Logged when it happened: the plan printed is not the whole plan.
            this.record.counts.errors += 1;
        }
        this.conclude()
    }

    /// 6–7. Apply, chunk by chunk, each chunk made durable (the replica's commit) before the
    /// cache may vouch for it. Each chunk's commit runs on a second thread while the next
    /// chunk is copied, so the copy never waits for the disk; at most one finished chunk
    /// waits for its commit. The chunk's cache records are prepared during its commit and
    /// committed after it.
    fn apply_and_commit(
        mut self,
        trees: &Trees,
        cache: &Cache,
        mut scanned: Scanned,
        progress: bool,
    ) -> Outcome {
        let cfg = self.cfg;
        let replica = trees.replica.as_ref();
        let bar = progress.then(|| progress_bar(&scanned.plan));
        journal::set_bar(bar.clone());
        let applier = Applier {
            source: trees.source.as_ref(),
            replica,
            backup: self.backup_dir(),
            bar: bar.clone(),
            xattrs: replica.capabilities().xattrs,
        };
        let racy = trees.racy;
        let drafts: HashMap<RelPath, Delta> = std::mem::take(&mut scanned.drafts)
            .into_iter()
            .map(|d| (d.dir, d.delta))
            .collect();
        let flush_error = |e: std::io::Error| {
            format!(
                "could not flush the replica '{}' to disk: {}",
                show(&cfg.replica),
                reason(&e)
            )
        };
        type Chunk = (Vec<(RelPath, Written)>, Vec<Fixed>);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Chunk>(1);
        let (done, drafts, mut sync_error): (Applied, _, Option<String>) =
            std::thread::scope(|scope| {
                let committer = scope.spawn(move || {
                    let mut drafts = drafts;
                    let mut sync_error = None;
                    for (written, fixed) in rx {
                        if sync_error.is_some() {
                            continue;
                        }
                        // The cache's records are prepared while the replica is made
                        // durable, and committed only after.
                        let changes = group_by_dir(written, fixed, racy);
                        match cache.record_chunk_after(changes, &mut drafts, || replica.commit()) {
                            Ok(()) => {}
                            Err(ChunkError::Durable(e)) => sync_error = Some(flush_error(e)),
                            Err(ChunkError::Cache(e)) => log::warn!(
                                "could not update the hash cache: {e}; the next pass hashes again"
                            ),
                        }
                    }
                    (drafts, sync_error)
                });
                let done = applier.apply(&scanned.plan, |written, fixed| {
                    if !(written.is_empty() && fixed.is_empty()) {
                        let _ = tx.send((written, fixed));
                    }
                });
                drop(tx);
                let (drafts, sync_error) =
                    committer.join().expect("the commit thread does not panic");
                (done, drafts, sync_error)
            });
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        journal::set_bar(None);
        // Applying hashes nothing beyond the copies' own digests: its counts add up.
        self.record.counts += done.counts;
        if scanned.plan.read_failed() {
            // Logged when it happened; what was not read was not done.
            self.record.counts.errors += 1;
        }
        if cancel::requested() {
            return self.interrupted();
        }
        if sync_error.is_none() && !scanned.plan.is_empty() {
            sync_error = replica.commit().err().map(flush_error);
        }
        if let Some(msg) = sync_error {
            log::error!("{msg}");
            self.record.counts.errors += 1;
            return self.end(PassResult::Partial, ExitCode::Partial, Some(msg));
        }
        let mut outcome = self.conclude_record();
        let key = (self.started_ns / 1_000_000) as u64;
        let json = serde_json::to_string(&outcome.record).unwrap_or_default();
        if let Err(e) = cache.finish(drafts, &done.dropped, &scanned.relinked, key, &json) {
            log::warn!("could not update the hash cache: {e}; the next pass hashes again");
        }
        outcome.record.duration_ms = self.t0.elapsed().as_millis() as u64;
        summary(outcome)
    }

    /// The result of a pass that ran to its end: ok, or partial when an entry failed or was
    /// skipped. The one place that turns counts into an exit code.
    fn verdict(&self) -> (PassResult, ExitCode) {
        let c = &self.record.counts;
        if c.errors == 0 && c.skipped == 0 {
            (PassResult::Ok, ExitCode::Ok)
        } else {
            (PassResult::Partial, ExitCode::Partial)
        }
    }

    fn conclude_record(&mut self) -> Outcome {
        let (result, exit) = self.verdict();
        self.record.duration_ms = self.t0.elapsed().as_millis() as u64;
        self.record.result = result;
        self.record.reason = None;
        self.record.requests = self.requests.as_ref().map(|r| r.to_string());
        Outcome {
            record: self.record.clone(),
            exit,
            replica_entries: self.replica_entries,
        }
    }

    fn conclude(mut self) -> Outcome {
        let outcome = self.conclude_record();
        summary(outcome)
    }

    fn interrupted(self) -> Outcome {
        self.end(
            PassResult::Interrupted,
            ExitCode::Partial,
            Some("interrupted".into()),
        )
    }

    fn end(mut self, result: PassResult, exit: ExitCode, why: Option<String>) -> Outcome {
        self.record.duration_ms = self.t0.elapsed().as_millis() as u64;
        self.record.result = result;
        self.record.reason = why;
        self.record.requests = self.requests.as_ref().map(|r| r.to_string());
        summary(Outcome {
            record: self.record,
            exit,
            replica_entries: self.replica_entries,
        })
    }
}

/// Logs the pass summary to the schedule log and returns the outcome. A dry run's line
/// says what a pass would do (`would create 12, update 3, …`).
fn summary(o: Outcome) -> Outcome {
    let r = &o.record;
    let c = &r.counts;
    let (mode, [create, update, delete, moved, copy], sep) = match r.dry_run {
        true => (
            " (dry run)",
            ["would create", "update", "delete", "move", "copy"],
            ";",
        ),
        false => (
            "",
            ["created", "updated", "deleted", "moved", "copied"],
            ",",
        ),
    };
    journal::schedule(format_args!(
        "PASS END {}{mode} in {:.3}s (scan {:.3}s, {} entries read): {create} {}, {update} {}, \
         drift {}, {delete} {}, {moved} {}, meta {}, links {}, hard links {}, dirs {}, \
         {copy} {} bytes{sep} hashed {} files / {} bytes, errors {}, skipped {}{}{}",
        r.result,
        r.duration_ms as f64 / 1000.0,
        r.scan_us as f64 / 1e6,
        c.entries_read,
        c.created,
        c.updated,
        c.drifted,
        c.deleted,
        c.moved,
        c.meta,
        c.links,
        c.hard_links,
        c.dirs_created,
        c.bytes_copied,
        c.hashed_files,
        c.hashed_bytes,
        c.errors,
        c.skipped,
        r.requests
            .as_ref()
            .map(|q| format!(", requests {q}"))
            .unwrap_or_default(),
        r.reason
            .as_ref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default()
    ));
    o
}

fn progress_bar(plan: &Plan) -> ProgressBar {
    let (files, bytes) = plan.iter().fold((0u64, 0u64), |(n, b), a| match a.op {
        Op::Copy { size, .. } => (n + 1, b + size),
        _ => (n, b),
    });
    let bar = ProgressBar::with_draw_target(Some(bytes), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {bytes}/{total_bytes} {msg} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("{files} files"));
    bar
}

/// Groups one chunk's written files and metadata fixes by directory, as cache entries.
pub(crate) fn group_by_dir(
    written: Vec<(RelPath, Written)>,
    fixed: Vec<Fixed>,
    racy: Racy,
) -> BTreeMap<RelPath, DirChange> {
    use std::os::unix::ffi::OsStrExt;
    let mut out: BTreeMap<RelPath, DirChange> = BTreeMap::new();
    for (rel, w) in written {
        let (Some(dir), Some(name)) = (rel.parent(), rel.file_name()) else {
            continue;
        };
        out.entry(dir).or_default().written.push(CachedFile {
            name: name.as_bytes().to_vec(),
            kind: crate::model::Kind::File,
            src: w.src,
            rep: w.rep,
            hash: w.hash,
            src_racy: racy.is_racy(&w.src),
            xattrs: w.xattrs,
        });
    }
    for (rel, version, xattrs) in fixed {
        let (Some(dir), Some(name)) = (rel.parent(), rel.file_name()) else {
            continue;
        };
        out.entry(dir)
            .or_default()
            .fixed
            .push((name.as_bytes().to_vec(), version, xattrs));
    }
    out
}
