//! Executes a `Plan` in parallel while honouring order, in four phases:
//! 1. deletions (a replaced entry goes before its successor is created; frees space first),
//! 2. directory creation, parents before children,
//! 3. files, links and metadata fixes, all in parallel,
//! 4. directory metadata, deepest first, so that no later write disturbs a parent's mtime.
//!
//! Source files are opened through the source module and handed to the replica as content;
//! every change goes through the replica interface. A failed action is reported once with its
//! path (`journal::report`, which counts it) and never stops the batch (the pass ends with
//! exit code 1). Every action writes one line to the file-I/O log.

use std::io;
use std::path::PathBuf;

use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::cancel;
use crate::error::{EntryError, Side, WriteOp};
use crate::journal;
use crate::model::{show, Counts, Hash, Hint, Kind, RelPath, Token, Version, Xattrs};
use crate::plan::{Action, Op, Plan, Reason};
use crate::replica::{CopyError, Installed, Replica};
use crate::source::SourceTree;

/// Files applied between two cache commits (each preceded by a commit of the replica).
const CHUNK_ACTIONS: usize = 4096;

pub struct Applier<'a> {
    pub source: &'a dyn SourceTree,
    pub replica: &'a dyn Replica,
    /// `<backup-dir>/<pass start>` when `--backup-dir` is set (for the log lines; the
    /// replica was opened with it).
    pub backup: Option<PathBuf>,
    pub bar: Option<ProgressBar>,
    /// Mirror extended attributes (the replica keeps them and they were not turned off).
    pub xattrs: bool,
}

/// A file this pass wrote: what the cache records for it.
#[derive(Clone, Debug)]
pub struct Written {
    pub src: Token,
    pub rep: Version,
    pub hash: Hash,
    /// Its extended attributes were mirrored too.
    pub xattrs: bool,
}

/// A file whose metadata was fixed: its new replica version, and whether its extended
/// attributes were mirrored too.
pub type Fixed = (RelPath, Version, bool);

#[derive(Default, Debug)]
pub struct Applied {
    pub counts: Counts,
    pub written: Vec<(RelPath, Written)>,
    /// Replica versions changed by a metadata fix.
    pub fixed: Vec<Fixed>,
    /// Directory trees removed from the replica.
    pub dropped: Vec<RelPath>,
}

impl Applied {
    fn merge(mut self, o: Applied) -> Applied {
        self.counts += o.counts;
        self.written.extend(o.written);
        self.fixed.extend(o.fixed);
        self.dropped.extend(o.dropped);
        self
    }

    fn counted(counts: Counts) -> Applied {
        Applied {
            counts,
            ..Applied::default()
        }
    }

    /// A per-entry failure or skip: reported once, counted.
    fn problem(e: EntryError) -> Applied {
        Applied::counted(journal::report(&e))
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
        Op::Link(l) => ("LINK", format!(" -> {}", show(&l.target))),
        Op::Meta { .. } | Op::DirMeta { .. } => ("META", String::new()),
        Op::HardLink { to, .. } => ("LINK", format!(" => {to}")),
    }
}

impl Applier<'_> {
    /// Applies the plan. Files are applied in chunks of `CHUNK_ACTIONS`; after each chunk,
    /// `commit` receives what it wrote (and drains it), so memory does not grow with the
    /// number of files copied and the cache can record each chunk once it is durable.
    pub fn apply(
        &self,
        plan: &Plan,
        mut commit: impl FnMut(Vec<(RelPath, Written)>, Vec<Fixed>),
    ) -> Applied {
        let mut deletes = Vec::new();
        let mut mkdirs = Vec::new();
        let mut work = Vec::new();
        let mut dir_metas = Vec::new();
        let mut hard_links = Vec::new();
        for a in &plan.actions {
            match a.op {
                Op::Delete { .. } => deletes.push(a),
                Op::Mkdir => mkdirs.push(a),
                Op::DirMeta { .. } => dir_metas.push(a),
                Op::HardLink { .. } => hard_links.push(a),
                _ => work.push(a),
            }
        }
        let run = |list: &[&Action]| {
            list.par_iter()
                .map(|a| self.one(a))
                .reduce(Applied::default, Applied::merge)
        };
        for temp in &plan.stale_temps {
            match self.replica.remove(temp, Kind::File) {
                Ok(()) => log::debug!("removed leftover temp file '{temp}'"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!(
                    "could not remove leftover temp file '{temp}': {}",
                    crate::error::reason(&e)
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
        // Hard links once every file is in place (a group's first name may be copied in any
        // chunk).
        done = done.merge(run(&hard_links));
        dir_metas.sort_by_key(|a| std::cmp::Reverse(a.rel.depth()));
        for a in dir_metas {
            done = done.merge(self.one(a));
        }
        done
    }

    fn backup_line(&self, rel: &RelPath) {
        if let Some(dir) = &self.backup {
            journal::action("BACKUP", rel, format_args!(" -> {}", show(&rel.under(dir))));
        }
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
                let result = if self.backup.is_some() {
                    self.replica
                        .backup(rel, false)
                        .inspect(|_| self.backup_line(rel))
                } else {
                    self.replica.remove(rel, *kind)
                };
                match result {
                    Ok(()) => {
                        journal::action(word, rel, format_args!("{detail}"));
                        out.counts.deleted += entries;
                        if *kind == Kind::Dir {
                            out.dropped.push(rel.clone());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Applied::problem(EntryError::write(WriteOp::Delete, rel, e)),
                }
            }
            Op::Mkdir => match self.replica.mkdir(rel) {
                Ok(()) => {
                    journal::action(word, rel, format_args!(""));
                    out.counts.dirs_created += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Applied::problem(EntryError::write(WriteOp::Mkdir, rel, e)),
            },
            Op::Copy {
                reason: why,
                hint,
                overwrites,
                size,
            } => {
                if *overwrites && self.backup.is_some() {
                    if let Err(e) = self.replica.backup(rel, true) {
                        return Applied::problem(EntryError::write(WriteOp::Backup, rel, e));
                    }
                    self.backup_line(rel);
                }
                out = self.copy(rel, *why, hint.as_deref());
                if let Some(bar) = &self.bar {
                    bar.inc(*size);
                }
            }
            Op::Link(l) => match self.source_xattrs(rel, Kind::Symlink).and_then(|x| {
                self.replica
                    .symlink(rel, &l.target, &l.meta, x.as_ref())
                    .map_err(|e| EntryError::write(WriteOp::Symlink, rel, e))
            }) {
                Ok(()) => {
                    journal::action(word, rel, format_args!("{detail}"));
                    out.counts.links += 1;
                    if l.reason == Reason::Create {
                        out.counts.created += 1;
                    }
                }
                Err(e) => return Applied::problem(e),
            },
            Op::Meta { meta, rep } => {
                let xattrs = match self.source_xattrs(rel, meta.kind) {
                    Ok(x) => x,
                    Err(e) => return Applied::problem(e),
                };
                match self
                    .replica
                    .set_meta(rel, meta, xattrs.as_ref(), rep.as_deref())
                {
                    Ok(Some(version)) => {
                        journal::action(word, rel, format_args!(""));
                        out.counts.meta += 1;
                        if meta.kind == Kind::File {
                            out.fixed.push((rel.clone(), version, self.xattrs));
                        }
                    }
                    Ok(None) => {
                        return Applied::problem(EntryError::ChangedInReplica { rel: rel.clone() })
                    }
                    Err(e) => return Applied::problem(EntryError::write(WriteOp::Meta, rel, e)),
                }
            }
            Op::HardLink { to, overwrites } => {
                if *overwrites && self.backup.is_some() {
                    if let Err(e) = self.replica.backup(rel, true) {
                        return Applied::problem(EntryError::write(WriteOp::Backup, rel, e));
                    }
                    self.backup_line(rel);
                }
                match self.replica.hard_link(rel, to) {
                    Ok(()) => {
                        journal::action(word, rel, format_args!("{detail}"));
                        out.counts.hard_links += 1;
                        if !overwrites {
                            out.counts.created += 1;
                        }
                    }
                    Err(e) => return Applied::problem(EntryError::write(WriteOp::Link, rel, e)),
                }
            }
            Op::DirMeta { meta } => {
                let xattrs = match self.source_xattrs(rel, Kind::Dir) {
                    Ok(x) => x,
                    Err(e) => return Applied::problem(e),
                };
                match self.replica.set_meta(rel, meta, xattrs.as_ref(), None) {
                    Ok(_) => journal::action(word, rel, format_args!("")),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Applied::problem(EntryError::write(WriteOp::Meta, rel, e)),
                }
            }
        }
        out
    }

    /// The source's extended attributes of a file, directory or symlink, read now, when
    /// they are mirrored (`None`: they are not).
    fn source_xattrs(&self, rel: &RelPath, kind: Kind) -> Result<Option<Xattrs>, EntryError> {
        if !self.xattrs || kind == Kind::Special {
            return Ok(None);
        }
        match self.source.xattrs(rel, kind) {
            Ok(x) => Ok(Some(x)),
            Err(e) => Err(EntryError::read(Side::Source, kind, rel, e)),
        }
    }

    /// The copy found the content equal to the replica's: fix metadata only.
    fn unchanged(
        &self,
        rel: &RelPath,
        meta: &crate::model::Meta,
        src: Token,
        c: Installed,
    ) -> Applied {
        let xattrs = match self.source_xattrs(rel, Kind::File) {
            Ok(x) => x,
            Err(e) => return Applied::problem(e),
        };
        match self
            .replica
            .set_meta(rel, meta, xattrs.as_ref(), Some(&c.version))
        {
            Ok(None) => Applied::problem(EntryError::ChangedInReplica { rel: rel.clone() }),
            Ok(Some(rep)) => {
                journal::action("META", rel, format_args!(""));
                Applied {
                    counts: Counts {
                        meta: 1,
                        ..Counts::default()
                    },
                    written: vec![(
                        rel.clone(),
                        Written {
                            src,
                            rep,
                            hash: c.hash,
                            xattrs: self.xattrs,
                        },
                    )],
                    ..Applied::default()
                }
            }
            Err(e) => Applied::problem(EntryError::write(WriteOp::Meta, rel, e)),
        }
    }

    /// Copies one file, retrying once if the source changes during the copy.
    fn copy(&self, rel: &RelPath, why: Reason, hint: Option<&Hint>) -> Applied {
        let mut known = match hint {
            Some(Hint::Known(token, hash)) => Some((*token, *hash)),
            _ => None,
        };
        let unless = match hint {
            Some(Hint::Unless(hash, version)) => Some((hash, version)),
            _ => None,
        };
        for _ in 0..2 {
            let mut content = match self.source.open_file(rel, known) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Applied::problem(EntryError::Vanished {
                        side: Side::Source,
                        rel: rel.clone(),
                        copying: true,
                    })
                }
                Err(e) => {
                    return Applied::problem(EntryError::Read {
                        side: Side::Source,
                        what: Kind::File,
                        rel: rel.clone(),
                        cause: e,
                    })
                }
            };
            let meta = *content.meta();
            let src = content.token();
            match self.replica.install_file(rel, content.as_mut(), unless) {
                Ok(c) if c.unchanged => return self.unchanged(rel, &meta, src, c),
                Ok(c) => {
                    journal::action(
                        why.word(),
                        rel,
                        format_args!(" size={} sha256={}", c.bytes, c.hash),
                    );
                    let mut counts = Counts {
                        bytes_copied: c.bytes,
                        ..Counts::default()
                    };
                    match why {
                        Reason::Create => counts.created = 1,
                        Reason::Update => counts.updated = 1,
                        Reason::Drift => counts.drifted = 1,
                    }
                    return Applied {
                        counts,
                        written: vec![(
                            rel.clone(),
                            Written {
                                src,
                                rep: c.version,
                                hash: c.hash,
                                xattrs: self.xattrs,
                            },
                        )],
                        ..Applied::default()
                    };
                }
                // A changed source invalidates a known hash, not the replica's.
                Err(CopyError::Changed) => known = None,
                Err(CopyError::Source(e)) if e.kind() == io::ErrorKind::NotFound => {
                    return Applied::problem(EntryError::Vanished {
                        side: Side::Source,
                        rel: rel.clone(),
                        copying: true,
                    })
                }
                Err(CopyError::Source(e)) => {
                    return Applied::problem(EntryError::Read {
                        side: Side::Source,
                        what: Kind::File,
                        rel: rel.clone(),
                        cause: e,
                    })
                }
                Err(CopyError::Replica(e)) => {
                    return Applied::problem(EntryError::write(WriteOp::Copy, rel, e))
                }
            }
        }
        Applied::problem(EntryError::ChangedDuringCopy { rel: rel.clone() })
    }
}
