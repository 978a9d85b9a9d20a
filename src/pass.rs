//! One pass, end to end: check the roots, scan and compare, guard, apply, commit. Returns a
//! `PassRecord` and the exit code; never panics on bad input and never exits the process.
//! Shared by `monoshot` and the daemon loop.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::apply::{describe, Applier, Written};
use crate::cancel;
use crate::config::Config;
use crate::error::{reason, ExitCode};
use crate::fsops::{HashCounters, Replica};
use crate::journal;
use crate::model::{show, Meta, RelPath, Token};
use crate::plan::{Op, Plan};
use crate::scan::{self, Ctx};
use crate::state::cache::{Cache, CachedFile, Delta, DirChange};
use crate::state::status::PassRecord;

/// A source token whose ctime is within this window before the scan started is racy. Wider
/// than any timestamp granularity in use (FAT keeps 2 s), with a margin for clock skew.
const RACY_WINDOW_NS: i64 = 3_000_000_000;

pub struct Outcome {
    pub record: PassRecord,
    pub exit: ExitCode,
}

fn finish(
    mut record: PassRecord,
    t0: Instant,
    result: &str,
    exit: ExitCode,
    why: Option<String>,
) -> Outcome {
    record.duration_ms = t0.elapsed().as_millis() as u64;
    record.result = result.to_string();
    record.reason = why;
    Outcome { record, exit }
}

/// Ends a pass that could not start (a root is missing or unusable): exit 2, nothing changed.
fn failed(record: PassRecord, t0: Instant, msg: String) -> Outcome {
    log::error!("{msg}");
    end(finish(record, t0, "failed", ExitCode::Usage, Some(msg)))
}

/// Runs one pass. `progress`: show a progress bar (the caller checked for a TTY).
pub fn run(cfg: &Config, cache: &Cache, progress: bool) -> Outcome {
    let t0 = Instant::now();
    let started = SystemTime::now();
    let started_ns = started
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let mut record = PassRecord {
        started: humantime::format_rfc3339_millis(started).to_string(),
        dry_run: cfg.dry_run,
        ..PassRecord::default()
    };
    journal::schedule(format_args!(
        "PASS START source '{}' replica '{}'{}",
        show(&cfg.source),
        show(&cfg.replica),
        if cfg.dry_run { " (dry run)" } else { "" }
    ));

    // 1. Check the roots.
    if let Err(e) = cfg.recheck_roots() {
        return failed(record, t0, e.to_string());
    }
    let replica = Replica::new(cfg.replica.clone());
    if !cfg.dry_run {
        if let Err(e) = replica.create_root() {
            let msg = format!(
                "could not create replica '{}': {}",
                show(&cfg.replica),
                reason(&e)
            );
            return failed(record, t0, msg);
        }
    }
    let src_root = match fs::metadata(&cfg.source) {
        Ok(m) => Meta::of(&m),
        Err(e) => {
            let msg = format!(
                "could not read source '{}': {}",
                show(&cfg.source),
                reason(&e)
            );
            return failed(record, t0, msg);
        }
    };
    // Only a replica that does not exist is planned as empty: any other error (EIO, a stale
    // NFS handle) would make every file a create and bypass --backup-dir.
    let rep_root = match fs::metadata(&cfg.replica) {
        Ok(m) => Some(Meta::of(&m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            let msg = format!(
                "could not read replica '{}': {}",
                show(&cfg.replica),
                reason(&e)
            );
            return failed(record, t0, msg);
        }
    };
    let root_dev = rep_root.map(|m| m.token.dev);

    // 2-4. Scan, compare, plan.
    let counters = HashCounters::default();
    let snapshot = cache.snapshot();
    let ctx = Ctx {
        source: &cfg.source,
        replica: &replica,
        excludes: &cfg.excludes,
        snapshot: &snapshot,
        counters: &counters,
        checksum: cfg.checksum,
        dry_run: cfg.dry_run,
        racy_after_ns: started_ns - RACY_WINDOW_NS,
    };
    let mut plan = scan::scan(&ctx, &src_root, rep_root.as_ref());
    drop(snapshot);
    record.hashed_files = counters.files.load(std::sync::atomic::Ordering::Relaxed);
    record.hashed_bytes = counters.bytes.load(std::sync::atomic::Ordering::Relaxed);
    for p in &plan.problems {
        if p.vanished {
            journal::entry_skip(&p.rel, &p.message);
            record.skipped += 1;
        } else {
            journal::entry_error(&p.rel, &p.message);
            record.errors += 1;
        }
    }
    if cancel::requested() {
        return end(finish(
            record,
            t0,
            "interrupted",
            ExitCode::Partial,
            Some("interrupted".into()),
        ));
    }

    // 5. Guard.
    if let Err(why) = cfg.guard.check(&plan) {
        log::error!("{why}");
        journal::schedule(format_args!("PASS REFUSED {why}"));
        return end(finish(record, t0, "refused", ExitCode::Refused, Some(why)));
    }

    if cfg.dry_run {
        for a in &plan.actions {
            let (word, detail) = describe(a);
            journal::plan_line(format_args!("would {word} {}{detail}", a.rel));
        }
        let exit = if plan.problems.is_empty() {
            ExitCode::Ok
        } else {
            ExitCode::Partial
        };
        let result = if exit == ExitCode::Ok {
            "ok"
        } else {
            "partial"
        };
        return end(finish(record, t0, result, exit, None));
    }

    // 6. Apply.
    // Milliseconds: two passes within one second must not share a backup folder.
    let pass_stamp = humantime::format_rfc3339_millis(started)
        .to_string()
        .replace(':', "-");
    let bar = progress.then(|| progress_bar(&plan));
    journal::set_bar(bar.clone());
    let applier = Applier {
        source: &cfg.source,
        replica: &replica,
        backup: cfg.backup_dir.as_ref().map(|d| d.join(&pass_stamp)),
        bar: bar.clone(),
    };
    // 7. Commit, chunk by chunk: data durable first (syncfs), then the cache may vouch for
    // it. Each chunk's commit runs on a second thread while the next chunk is copied, so the
    // copy never waits for the disk; at most one finished chunk waits for its commit.
    let racy_after_ns = started_ns - RACY_WINDOW_NS;
    let drafts: HashMap<RelPath, Delta> = std::mem::take(&mut plan.drafts)
        .into_iter()
        .map(|d| (d.dir, d.delta))
        .collect();
    let (tx, rx) =
        std::sync::mpsc::sync_channel::<(Vec<(RelPath, Written)>, Vec<(RelPath, Token)>)>(1);
    let (done, drafts, mut sync_error) = std::thread::scope(|scope| {
        let replica = &replica;
        let committer = scope.spawn(move || {
            let mut drafts = drafts;
            let mut sync_error: Option<String> = None;
            for (written, fixed) in rx {
                if sync_error.is_some() {
                    continue;
                }
                // The root's filesystem, and any other one mounted inside the replica that
                // this chunk wrote to.
                let mut others: BTreeMap<u64, RelPath> = BTreeMap::new();
                for (rel, w) in &written {
                    if Some(w.rep.dev) != root_dev {
                        others
                            .entry(w.rep.dev)
                            .or_insert_with(|| rel.parent().unwrap_or_default());
                    }
                }
                let synced = replica
                    .sync()
                    .and_then(|()| others.values().try_for_each(|dir| replica.sync_at(dir)));
                if let Err(e) = synced {
                    sync_error = Some(format!(
                        "could not flush the replica '{}' to disk: {}",
                        show(&cfg.replica),
                        reason(&e)
                    ));
                    continue;
                }
                if let Err(e) =
                    cache.record_chunk(group_by_dir(written, fixed, racy_after_ns), &mut drafts)
                {
                    log::warn!("could not update the hash cache: {e}; the next pass hashes again");
                }
            }
            (drafts, sync_error)
        });
        let done = applier.apply(&plan, |written, fixed| {
            if !(written.is_empty() && fixed.is_empty()) {
                let _ = tx.send((written, fixed));
            }
        });
        drop(tx);
        let (drafts, sync_error) = committer.join().expect("the commit thread does not panic");
        (done, drafts, sync_error)
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    journal::set_bar(None);
    record.created = done.created;
    record.updated = done.updated;
    record.drifted = done.drifted;
    record.deleted = done.deleted;
    record.meta = done.meta;
    record.links = done.links;
    record.dirs_created = done.dirs_created;
    record.bytes_copied = done.bytes;
    record.errors += done.errors;
    record.skipped += done.skipped;
    if cancel::requested() {
        return end(finish(
            record,
            t0,
            "interrupted",
            ExitCode::Partial,
            Some("interrupted".into()),
        ));
    }
    if sync_error.is_none() && !plan.is_empty() {
        if let Err(e) = replica.sync() {
            sync_error = Some(format!(
                "could not flush the replica '{}' to disk: {}",
                show(&cfg.replica),
                reason(&e)
            ));
        }
    }
    if let Some(msg) = sync_error {
        log::error!("{msg}");
        record.errors += 1;
        return end(finish(record, t0, "partial", ExitCode::Partial, Some(msg)));
    }
    let clean = record.errors == 0 && record.skipped == 0;
    let (result, exit) = if clean {
        ("ok", ExitCode::Ok)
    } else {
        ("partial", ExitCode::Partial)
    };
    let mut outcome = finish(record, t0, result, exit, None);
    let key = started_ns as u64 / 1_000_000;
    let json = serde_json::to_string(&outcome.record).unwrap_or_default();
    if let Err(e) = cache.finish(drafts, &done.dropped, key, &json) {
        log::warn!("could not update the hash cache: {e}; the next pass hashes again");
    }
    outcome.record.duration_ms = t0.elapsed().as_millis() as u64;
    end(outcome)
}

/// Logs the pass summary to the schedule log and returns the outcome.
fn end(o: Outcome) -> Outcome {
    let r = &o.record;
    journal::schedule(format_args!(
        "PASS END {} in {:.3}s: created {}, updated {}, drift {}, deleted {}, meta {}, links {}, dirs {}, \
         copied {} bytes, hashed {} files / {} bytes, errors {}, skipped {}{}",
        r.result,
        r.duration_ms as f64 / 1000.0,
        r.created,
        r.updated,
        r.drifted,
        r.deleted,
        r.meta,
        r.links,
        r.dirs_created,
        r.bytes_copied,
        r.hashed_files,
        r.hashed_bytes,
        r.errors,
        r.skipped,
        r.reason.as_ref().map(|m| format!(" ({m})")).unwrap_or_default()
    ));
    o
}

fn progress_bar(plan: &Plan) -> ProgressBar {
    let (files, bytes) = plan
        .actions
        .iter()
        .fold((0u64, 0u64), |(n, b), a| match a.op {
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
fn group_by_dir(
    written: Vec<(RelPath, Written)>,
    fixed: Vec<(RelPath, Token)>,
    racy_after_ns: i64,
) -> BTreeMap<RelPath, DirChange> {
    use std::os::unix::ffi::OsStrExt;
    let mut out: BTreeMap<RelPath, DirChange> = BTreeMap::new();
    for (rel, w) in written {
        let (Some(dir), Some(name)) = (rel.parent(), rel.file_name()) else {
            continue;
        };
        out.entry(dir).or_default().written.push(CachedFile {
            name: name.as_bytes().to_vec(),
            src: w.src,
            rep: w.rep,
            hash: w.hash,
            src_racy: w.src.ctime_ns >= racy_after_ns,
        });
    }
    for (rel, token) in fixed {
        let (Some(dir), Some(name)) = (rel.parent(), rel.file_name()) else {
            continue;
        };
        out.entry(dir)
            .or_default()
            .fixed
            .push((name.as_bytes().to_vec(), token));
    }
    out
}
