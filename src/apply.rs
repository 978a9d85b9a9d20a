//! Executes a `Plan` in parallel while honouring order, in four phases:
//! 1. deletions (a replaced entry goes before its successor is created; frees space first),
//! 2. directory creation, parents before children,
//! 3. files, links and metadata fixes, all in parallel,
//! 4. directory metadata, deepest first, so that no later write disturbs a parent's mtime.
//!
//! A failed action is logged with its path and counted, and never stops the batch (the pass
//! ends with exit code 1). Every action writes one line to the file-I/O log.

use std::io;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::cancel;
use crate::error::reason;
use crate::fsops::{Copied, CopyError, Hint, Replica};
use crate::journal;
use crate::model::{Hash, Kind, RelPath, Token};
use crate::plan::{Action, Op, Plan, Reason};

/// Files applied between two cache commits (each preceded by a `syncfs`).
const CHUNK_ACTIONS: usize = 4096;

pub struct Applier<'a> {
    pub source: &'a Path,
    pub replica: &'a Replica,
    /// `<backup-dir>/<pass start>` when `--backup-dir` is set.
    pub backup: Option<PathBuf>,
    pub bar: Option<ProgressBar>,
}

/// A file this pass wrote: what the cache records for it.
#[derive(Clone, Copy, Debug)]
pub struct Written {
    pub src: Token,
    pub rep: Token,
    pub hash: Hash,
}

#[derive(Default, Debug)]
pub struct Applied {
    pub created: u64,
    pub updated: u64,
    pub drifted: u64,
    pub deleted: u64,
    pub meta: u64,
    pub links: u64,
    pub dirs_created: u64,
    pub bytes: u64,
    pub errors: u64,
    pub skipped: u64,
    pub written: Vec<(RelPath, Written)>,
    /// Replica tokens changed by a metadata fix.
    pub fixed: Vec<(RelPath, Token)>,
    /// Directory trees removed from the replica.
    pub dropped: Vec<RelPath>,
}

impl Applied {
    fn merge(mut self, o: Applied) -> Applied {
        self.created += o.created;
        self.updated += o.updated;
        self.drifted += o.drifted;
        self.deleted += o.deleted;
        self.meta += o.meta;
        self.links += o.links;
        self.dirs_created += o.dirs_created;
        self.bytes += o.bytes;
        self.errors += o.errors;
        self.skipped += o.skipped;
        self.written.extend(o.written);
        self.fixed.extend(o.fixed);
        self.dropped.extend(o.dropped);
        self
    }

    fn error(rel: &RelPath, message: String) -> Applied {
        journal::entry_error(rel, &message);
        Applied {
            errors: 1,
            ..Applied::default()
        }
    }
}

/// The log word and detail of an action, for the file-I/O log and dry runs.
pub fn describe(action: &Action) -> (&'static str, String) {
    match &action.op {
        Op::Delete {
            kind: Kind::Dir,
            entries,
        } => ("RMDIR", format!(" entries={entries}")),
        Op::Delete { .. } => ("DELETE", String::new()),
        Op::Mkdir => ("MKDIR", String::new()),
        Op::Copy { reason, size, .. } => (reason.word(), format!(" size={size}")),
        Op::Link(l) => ("LINK", format!(" -> {}", crate::model::show(&l.target))),
        Op::Meta { .. } | Op::DirMeta { .. } => ("META", String::new()),
    }
}

impl Applier<'_> {
    /// Applies the plan. Files are applied in chunks of `CHUNK_ACTIONS`; after each chunk,
    /// `commit` receives what it wrote (and drains it), so memory does not grow with the
    /// number of files copied and the cache can record each chunk once it is durable.
    pub fn apply(
        &self,
        plan: &Plan,
        mut commit: impl FnMut(Vec<(RelPath, Written)>, Vec<(RelPath, Token)>),
    ) -> Applied {
        let mut deletes = Vec::new();
        let mut mkdirs = Vec::new();
        let mut work = Vec::new();
        let mut dir_metas = Vec::new();
        for a in &plan.actions {
            match a.op {
                Op::Delete { .. } => deletes.push(a),
                Op::Mkdir => mkdirs.push(a),
                Op::DirMeta { .. } => dir_metas.push(a),
                _ => work.push(a),
            }
        }
        let run = |list: &[&Action]| {
            list.par_iter()
                .map(|a| self.one(a))
                .reduce(Applied::default, Applied::merge)
        };
        for temp in &plan.stale_temps {
            match self.replica.remove_temp(temp) {
                Ok(()) => log::debug!("removed leftover temp file '{temp}'"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!(
                    "could not remove leftover temp file '{temp}': {}",
                    reason(&e)
                ),
            }
        }
        let mut done = run(&deletes);
        mkdirs.sort_by(|a, b| a.rel.cmp(&b.rel));
        for a in mkdirs {
            done = done.merge(self.one(a));
        }
        for chunk in work.chunks(CHUNK_ACTIONS) {
            let mut part = run(chunk);
            commit(
                std::mem::take(&mut part.written),
                std::mem::take(&mut part.fixed),
            );
            done = done.merge(part);
        }
        dir_metas.sort_by_key(|a| std::cmp::Reverse(a.rel.depth()));
        for a in dir_metas {
            done = done.merge(self.one(a));
        }
        done
    }

    fn one(&self, action: &Action) -> Applied {
        if cancel::requested() {
            return Applied::default();
        }
        let rel = &action.rel;
        let (word, detail) = describe(action);
        let mut out = Applied::default();
        match &action.op {
            Op::Delete { kind, entries } => {
                let result = match &self.backup {
                    Some(dir) => self.replica.backup(rel, dir).inspect(|_| {
                        journal::action(
                            "BACKUP",
                            rel,
                            format_args!(" -> {}", crate::model::show(&rel.under(dir))),
                        )
                    }),
                    None => self.replica.remove(rel, *kind),
                };
                match result {
                    Ok(()) => {
                        journal::action(word, rel, format_args!("{detail}"));
                        out.deleted += entries;
                        if *kind == Kind::Dir {
                            out.dropped.push(rel.clone());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Applied::error(
                            rel,
                            format!("could not delete '{rel}' from the replica: {}", reason(&e)),
                        )
                    }
                }
            }
            Op::Mkdir => match self.replica.mkdir(rel) {
                Ok(()) => {
                    journal::action(word, rel, format_args!(""));
                    out.dirs_created += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Applied::error(
                        rel,
                        format!(
                            "could not create directory '{rel}' in the replica: {}",
                            reason(&e)
                        ),
                    )
                }
            },
            Op::Copy {
                reason: why,
                hint,
                overwrites,
                size,
            } => {
                if *overwrites {
                    if let Some(dir) = &self.backup {
                        if let Err(e) = self.replica.backup_copy(rel, dir) {
                            return Applied::error(
                                rel,
                                format!(
                                    "could not back up '{rel}' before overwriting it: {}",
                                    reason(&e)
                                ),
                            );
                        }
                        journal::action(
                            "BACKUP",
                            rel,
                            format_args!(" -> {}", crate::model::show(&rel.under(dir))),
                        );
                    }
                }
                out = self.copy(rel, *why, hint.as_deref().copied());
                if let Some(bar) = &self.bar {
                    bar.inc(*size);
                }
            }
            Op::Link(l) => match self.replica.install_link(rel, &l.target, &l.meta) {
                Ok(()) => {
                    journal::action(word, rel, format_args!("{detail}"));
                    out.links += 1;
                    if l.reason == Reason::Create {
                        out.created += 1;
                    }
                }
                Err(e) => {
                    return Applied::error(
                        rel,
                        format!(
                            "could not create symlink '{rel}' in the replica: {}",
                            reason(&e)
                        ),
                    )
                }
            },
            Op::Meta { meta, rep } => {
                match self.replica.fix_meta(rel, meta, rep.as_deref().copied()) {
                    Ok(Some(token)) => {
                        journal::action(word, rel, format_args!(""));
                        out.meta += 1;
                        if meta.kind == Kind::File {
                            out.fixed.push((rel.clone(), token));
                        }
                    }
                    Ok(None) => return changed_in_replica(rel),
                    Err(e) => return meta_error(rel, &e),
                }
            }
            Op::DirMeta { meta } => match self.replica.fix_meta(rel, meta, None) {
                Ok(_) => journal::action(word, rel, format_args!("")),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return meta_error(rel, &e),
            },
        }
        out
    }

    /// The copy found the content equal to the replica's: fix metadata only.
    fn unchanged(&self, rel: &RelPath, c: Copied) -> Applied {
        match self.replica.fix_meta(rel, &c.meta, Some(c.rep)) {
            Ok(None) => changed_in_replica(rel),
            Ok(Some(rep)) => {
                journal::action("META", rel, format_args!(""));
                Applied {
                    meta: 1,
                    written: vec![(
                        rel.clone(),
                        Written {
                            src: c.src,
                            rep,
                            hash: c.hash,
                        },
                    )],
                    ..Applied::default()
                }
            }
            Err(e) => meta_error(rel, &e),
        }
    }

    /// Copies one file, retrying once if the source changes during the copy.
    fn copy(&self, rel: &RelPath, why: Reason, hint: Option<Hint>) -> Applied {
        let src = rel.under(self.source);
        let mut hint = hint;
        for _ in 0..2 {
            match self.replica.install_file(rel, &src, hint) {
                Ok(c) if c.unchanged => return self.unchanged(rel, c),
                Ok(c) => {
                    journal::action(
                        why.word(),
                        rel,
                        format_args!(" size={} sha256={}", c.bytes, c.hash),
                    );
                    let mut out = Applied {
                        bytes: c.bytes,
                        ..Applied::default()
                    };
                    match why {
                        Reason::Create => out.created = 1,
                        Reason::Update => out.updated = 1,
                        Reason::Drift => out.drifted = 1,
                    }
                    out.written.push((
                        rel.clone(),
                        Written {
                            src: c.src,
                            rep: c.rep,
                            hash: c.hash,
                        },
                    ));
                    return out;
                }
                // A changed source invalidates a known hash, not the replica's.
                Err(CopyError::Changed) => hint = hint.filter(|h| matches!(h, Hint::Unless(..))),
                Err(CopyError::Source(e)) if e.kind() == io::ErrorKind::NotFound => {
                    journal::entry_skip(rel, "vanished from the source before it could be copied");
                    return Applied {
                        skipped: 1,
                        ..Applied::default()
                    };
                }
                Err(CopyError::Source(e)) => {
                    return Applied::error(
                        rel,
                        format!("could not read source file '{rel}': {}", reason(&e)),
                    )
                }
                Err(CopyError::Replica(e)) => {
                    return Applied::error(
                        rel,
                        format!("could not copy '{rel}' into the replica: {}", reason(&e)),
                    )
                }
            }
        }
        journal::entry_skip(
            rel,
            "changed while it was copied (tried twice); the next pass takes it",
        );
        Applied {
            skipped: 1,
            ..Applied::default()
        }
    }
}

/// A replica file changed between the scan and its metadata fix: leave it to the next pass.
fn changed_in_replica(rel: &RelPath) -> Applied {
    journal::entry_skip(
        rel,
        "changed in the replica during the pass; the next pass takes it",
    );
    Applied {
        skipped: 1,
        ..Applied::default()
    }
}

fn meta_error(rel: &RelPath, e: &io::Error) -> Applied {
    Applied::error(
        rel,
        format!(
            "could not set metadata of '{rel}' in the replica: {}",
            reason(e)
        ),
    )
}
