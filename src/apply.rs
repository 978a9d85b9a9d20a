//! Executes a `Plan` in parallel while honouring order, in these phases:
//! 1. deletions (a replaced entry goes before its successor is created; frees space first),
//!    except those of directories that still hold a move's source,
//! 2. directory creation, parents before children,
//! 3. moves (renames within the replica): their sources still exist and their targets'
//!    directories do now,
//! 4. the deletions held back for them, of what is left of those directories,
//! 5. files, links and metadata fixes, all in parallel, then hard links,
//! 6. directory metadata, deepest first, so that no later write disturbs a parent's mtime.
//!
//! A move that cannot be done as planned (the source or the replica file changed since it
//! was hashed, the rename fails) becomes what the plan had before it: a copy of the new file
//! and the deletion of the old one. Nothing is lost either way.
//!
//! Source files are opened through the source module and handed to the replica as content;
//! every change goes through the replica interface. A failed action is reported once with its
//! path (`journal::report`, which counts it) and never stops the batch (the pass ends with
//! exit code 1). Every action writes one line to the file-I/O log.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::cancel;
use crate::error::{EntryError, Side, WriteOp};
use crate::journal;
use crate::model::{show, Counts, Entry, Hash, Hint, Kind, Meta, RelPath, Token, Version, Xattrs};
use crate::plan::{Action, DirMove, MoveSpec, Op, Plan, Reason};
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
        Op::Move(m) => ("MOVE", format!(" size={} sha256={}", m.size, m.hash)),
        Op::MoveDir(d) => ("MOVE", format!(" files={}", d.files.len())),
    }
}

/// An action as one line: `WORD path detail`, a move as `MOVE old -> new detail` (dry runs
/// print it; the file-I/O log has the same shape). A renamed directory is one line per file.
pub fn line(action: &Action) -> String {
    let (word, detail) = describe(action);
    match &action.op {
        Op::Move(m) => format!("{word} {} -> {}{detail}", m.from, action.rel),
        Op::MoveDir(d) => d
            .files
            .iter()
            .map(|(to, m)| {
                format!(
                    "{word} {} -> {to} size={} sha256={}",
                    m.from, m.size, m.hash
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => format!("{word} {}{detail}", action.rel),
    }
}

/// What applying `action` would count, as `one` and its helpers count it when it succeeds
/// (a dry run's summary).
pub fn would(action: &Action) -> Counts {
    let mut c = Counts::default();
    match &action.op {
        Op::Copy { reason, size, .. } => {
            match reason {
                Reason::Create => c.created = 1,
                Reason::Update => c.updated = 1,
                Reason::Drift => c.drifted = 1,
            }
            c.bytes_copied = *size;
        }
        Op::Link(l) => {
            c.links = 1;
            c.created = u64::from(l.reason == Reason::Create);
        }
        Op::Meta { .. } => c.meta = 1,
        Op::HardLink { overwrites, .. } => {
            c.hard_links = 1;
            c.created = u64::from(!overwrites);
        }
        Op::Delete { entries, .. } => c.deleted = *entries,
        Op::Mkdir => c.dirs_created = 1,
        Op::Move(_) => c.moved = 1,
        Op::MoveDir(d) => c.moved = d.files.len() as u64,
        Op::DirMeta { .. } => {}
    }
    c
}

/// A file renamed into place: its `MOVE old -> new` line, and its count.
fn moved(to: &RelPath, m: &MoveSpec) -> Applied {
    journal::action(
        "MOVE",
        &m.from,
        format_args!(" -> {to} size={} sha256={}", m.size, m.hash),
    );
    Applied::counted(Counts {
        moved: 1,
        ..Counts::default()
    })
}

/// The phase an action runs in (see the module comment); also orders a dry run's lines for
/// one path.
pub fn phase(action: &Action) -> u8 {
    match action.op {
        Op::Delete { .. } => 0,
        Op::Mkdir => 1,
        Op::Move(_) | Op::MoveDir(_) => 2,
        Op::Copy { .. } | Op::Link(_) | Op::Meta { .. } => 3,
        Op::HardLink { .. } => 4,
        Op::DirMeta { .. } => 5,
    }
}

impl Applier<'_> {
    /// Applies the plan, reading it once per phase (it may be on disk, see `spill`): what is
    /// numerous (deletions, moves, files) streams through in chunks of `CHUNK_ACTIONS`, what
    /// must be sorted (directories) or is rare (hard links, deletions held for moves) is
    /// collected. After each chunk of moves or files, `commit` receives what it wrote (and
    /// drains it), so memory does not grow with the number of files copied and the cache can
    /// record each chunk once it is durable.
    pub fn apply(
        &self,
        plan: &Plan,
        mut commit: impl FnMut(Vec<(RelPath, Written)>, Vec<Fixed>),
    ) -> Applied {
        // Directories that hold a move's source: deleted only after the moves.
        let mut holding: HashSet<PathBuf> = HashSet::new();
        let mut mkdirs = Vec::new();
        let mut dir_metas = Vec::new();
        let mut hard_links = Vec::new();
        let mut dir_deletes = Vec::new();
        let (mut file_deletes, mut moves, mut work) = (0usize, 0usize, 0usize);
        for a in plan.iter() {
            match &a.op {
                Op::Move(m) => {
                    moves += 1;
                    holding.extend(m.from.as_path().ancestors().skip(1).map(Path::to_path_buf));
                }
                Op::MoveDir(d) => {
                    moves += 1;
                    holding.extend(d.from.as_path().ancestors().skip(1).map(Path::to_path_buf));
                }
                Op::Delete {
                    kind: Kind::Dir, ..
                } => dir_deletes.push(a.into_owned()),
                Op::Delete { .. } => file_deletes += 1,
                Op::Mkdir => mkdirs.push(a.into_owned()),
                Op::DirMeta { .. } => dir_metas.push(a.into_owned()),
                Op::HardLink { .. } => hard_links.push(a.into_owned()),
                Op::Copy { .. } | Op::Link(_) | Op::Meta { .. } => work += 1,
            }
        }
        let (held, deletes): (Vec<Action>, Vec<Action>) = dir_deletes
            .into_iter()
            .partition(|a| holding.contains(a.rel.as_path()));
        drop(holding);
        let run = |list: &[Action]| {
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
        drop(deletes);
        // The actions of one phase, read from the plan and run chunk by chunk, each chunk's
        // cache entries handed to `commit`.
        let mut stream = |pick: fn(&Op) -> bool, done: Applied| {
            let mut chunk = Vec::with_capacity(CHUNK_ACTIONS);
            let mut done = done;
            let mut flush = |chunk: &mut Vec<Action>, done: Applied| {
                let mut part = run(chunk);
                chunk.clear();
                commit(
                    std::mem::take(&mut part.written),
                    std::mem::take(&mut part.fixed),
                );
                done.merge(part)
            };
            for a in plan.iter().filter(|a| pick(&a.op)) {
                if cancel::requested() {
                    break;
                }
                chunk.push(a.into_owned());
                if chunk.len() == CHUNK_ACTIONS {
                    done = flush(&mut chunk, done);
                }
            }
            if !chunk.is_empty() {
                done = flush(&mut chunk, done);
            }
            done
        };
        if file_deletes > 0 {
            done = stream(
                |op| {
                    matches!(
                        op,
                        Op::Delete {
                            kind: Kind::File | Kind::Symlink | Kind::Special,
                            ..
                        }
                    )
                },
                done,
            );
        }
        mkdirs.sort_by(|a, b| a.rel.cmp(&b.rel));
        for a in &mkdirs {
            done = done.merge(self.one(a));
        }
        drop(mkdirs);
        if moves > 0 {
            done = stream(|op| matches!(op, Op::Move(_) | Op::MoveDir(_)), done);
        }
        // What is left of a directory whose files all moved out is only directories: no
        // backup keeps those (nothing is lost; the files live on under their new names).
        done = held
            .par_iter()
            .map(|a| match a.op {
                Op::Delete { kind, entries } if !cancel::requested() => {
                    let keep = self.backup.is_some() && !self.only_dirs(&a.rel);
                    self.delete(&a.rel, kind, entries, keep)
                }
                _ => self.one(a),
            })
            .reduce(Applied::default, Applied::merge)
            .merge(done);
        if work > 0 {
            done = stream(
                |op| matches!(op, Op::Copy { .. } | Op::Link(_) | Op::Meta { .. }),
                done,
            );
        }
        // Hard links once every file is in place (a group's first name may be copied in any
        // chunk).
        done = done.merge(run(&hard_links));
        dir_metas.sort_by_key(|a| std::cmp::Reverse(a.rel.depth()));
        for a in &dir_metas {
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
                return self.delete(rel, *kind, *entries, self.backup.is_some())
            }
            Op::Move(m) => return self.move_file(rel, m),
            Op::MoveDir(d) => return self.move_dir(rel, d),
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

    /// Removes a replica entry; with `keep` (`--backup-dir`), moves it into the backup.
    fn delete(&self, rel: &RelPath, kind: Kind, entries: u64, keep: bool) -> Applied {
        let result = if keep {
            self.replica
                .backup(rel, false)
                .inspect(|_| self.backup_line(rel))
        } else {
            self.replica.remove(rel, kind)
        };
        let mut out = Applied::default();
        match result {
            Ok(()) => {
                let (word, detail) = describe(&Action {
                    rel: rel.clone(),
                    op: Op::Delete { kind, entries },
                });
                journal::action(word, rel, format_args!("{detail}"));
                out.counts.deleted += entries;
                if kind == Kind::Dir {
                    out.dropped.push(rel.clone());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Applied::problem(EntryError::write(WriteOp::Delete, rel, e)),
        }
        out
    }

    /// Renames the replica file `m.from` to `to` and gives it the source's metadata. Both
    /// sides must still be what the scan hashed: the source its token, the replica file its
    /// version (a rename changes neither content nor mtime). Nothing is kept in the backup
    /// directory: nothing is lost.
    fn move_file(&self, to: &RelPath, m: &MoveSpec) -> Applied {
        let content = match self.source.open_file(to, Some((m.src, m.hash))) {
            Ok(c) => c,
            Err(e) => return self.move_fallback(to, m, &crate::error::reason(&e)),
        };
        if content.token() != m.src {
            return self.move_fallback(to, m, "the source changed since it was hashed");
        }
        let meta = *content.meta();
        // Read through the open file: one lookup of the source path, not two.
        let xattrs = match self.xattrs {
            true => match content.xattrs() {
                Ok(x) => Some(x),
                Err(e) => return self.move_fallback(to, m, &crate::error::reason(&e)),
            },
            false => None,
        };
        drop(content);
        match self.replica.stat(&m.from) {
            Ok(Some((found, version))) if found.kind == Kind::File && version == m.rep => {}
            Ok(_) => {
                return self.move_fallback(to, m, "the replica file changed since it was hashed")
            }
            Err(e) => return self.move_fallback(to, m, &crate::error::reason(&e)),
        }
        if let Err(e) = self.replica.rename(&m.from, to) {
            return self.move_fallback(to, m, &crate::error::reason(&e));
        }
        let mut out = moved(to, m);
        // The rename kept the old name's mode, owner, times and attributes: the source's
        // may differ, and the metadata is set whatever it was (it also gives the version the
        // cache records).
        match self.replica.set_meta(to, &meta, xattrs.as_ref(), None) {
            Ok(Some(rep)) => out.written.push((to.clone(), self.moved_entry(m, rep))),
            Ok(None) => {
                return out.merge(Applied::problem(EntryError::ChangedInReplica {
                    rel: to.clone(),
                }))
            }
            Err(e) => return out.merge(Applied::problem(EntryError::write(WriteOp::Meta, to, e))),
        }
        out
    }

    /// Renames the replica directory `d.from` to `to`, after checking that both sides are
    /// still what the scan paired: the replica directory holds exactly the files of `d`, each
    /// at its version, and each source file has its token. Each file then gets the source's
    /// metadata (at the version checked) unless it has it: the same mode, owner and times,
    /// and extended attributes the cache vouched for (`MoveSpec::in_sync`). Otherwise, or
    /// if the rename fails, the directory is made and each file moved on its own, and what is
    /// left of the old directory is deleted, as the plan would have done without moves.
    fn move_dir(&self, to: &RelPath, d: &DirMove) -> Applied {
        let checked = self.check_dir_move(to, d);
        let renamed = checked.and_then(|sources| {
            self.replica
                .rename(&d.from, to)
                .map(|()| sources)
                .map_err(|e| crate::error::reason(&e))
        });
        let sources = match renamed {
            Ok(s) => s,
            Err(why) => {
                log::debug!(
                    "could not move directory '{}' to '{to}' ({why}); moving its files one by one",
                    d.from
                );
                return self.move_dir_by_files(to, d);
            }
        };
        let mut done = Applied::default();
        done.dropped.push(d.from.clone());
        d.files
            .par_iter()
            .zip(sources.par_iter())
            .map(|((to, m), (meta, rep_meta, rep))| {
                let mut out = moved(to, m);
                // The cache vouches for the extended attributes (`in_sync`); mode, owner
                // and times are compared here, as in any pass (a metadata fix that failed
                // leaves a cache entry at the source's token).
                let rep = if m.in_sync && !self.replica.capabilities().meta_differs(meta, rep_meta)
                {
                    rep.clone()
                } else {
                    let xattrs = match self.source_xattrs(to, Kind::File) {
                        Ok(x) => x,
                        Err(e) => return out.merge(Applied::problem(e)),
                    };
                    // A directory's rename changes no file's version: the file must still be
                    // at the version checked, or it changed in the replica meanwhile.
                    match self.replica.set_meta(to, meta, xattrs.as_ref(), Some(rep)) {
                        Ok(Some(rep)) => rep,
                        Ok(None) => {
                            return out.merge(Applied::problem(EntryError::ChangedInReplica {
                                rel: to.clone(),
                            }))
                        }
                        Err(e) => {
                            return out.merge(Applied::problem(EntryError::write(
                                WriteOp::Meta,
                                to,
                                e,
                            )))
                        }
                    }
                };
                out.written.push((to.clone(), self.moved_entry(m, rep)));
                out
            })
            .reduce(Applied::default, Applied::merge)
            .merge(done)
    }

    /// The source metadata, the replica metadata and the replica version of each file of a
    /// directory move, in the order of `d.files`, if both sides are still what the scan
    /// paired.
    fn check_dir_move(
        &self,
        to: &RelPath,
        d: &DirMove,
    ) -> Result<Vec<(Meta, Meta, Version)>, String> {
        let reason = |e: io::Error| crate::error::reason(&e);
        let rep = self.replica.list(&d.from).map_err(reason)?;
        if rep.len() != d.files.len() {
            return Err("the replica directory changed since it was listed".into());
        }
        let src = self.source.list(to).map_err(reason)?;
        // Both listings are sorted by name (bytes).
        fn find<'e, V>(list: &'e [Entry<V>], name: &std::ffi::OsStr) -> Option<&'e Entry<V>> {
            use std::os::unix::ffi::OsStrExt;
            list.binary_search_by(|e| e.name.as_bytes().cmp(name.as_bytes()))
                .ok()
                .map(|i| &list[i])
        }
        let mut out = Vec::with_capacity(d.files.len());
        for (to, m) in &d.files {
            let name = to.file_name().unwrap_or_default();
            let r = find(&rep, m.from.file_name().unwrap_or_default())
                .filter(|r| r.meta.kind == Kind::File && r.version == m.rep);
            let s = find(&src, name).filter(|s| s.meta.kind == Kind::File && s.version == m.src);
            match (s, r) {
                (Some(s), Some(r)) => out.push((s.meta, r.meta, r.version.clone())),
                _ => {
                    return Err(format!(
                        "'{to}' or '{}' changed since it was hashed",
                        m.from
                    ))
                }
            }
        }
        Ok(out)
    }

    /// A directory move that cannot be done whole: the directory is made, each file moved
    /// (or copied) on its own, and the old directory deleted.
    fn move_dir_by_files(&self, to: &RelPath, d: &DirMove) -> Applied {
        let made = self.one(&Action {
            rel: to.clone(),
            op: Op::Mkdir,
        });
        let moved = d
            .files
            .par_iter()
            .map(|(to, m)| self.move_file(to, m))
            .reduce(Applied::default, Applied::merge);
        let keep = self.backup.is_some() && !self.only_dirs(&d.from);
        made.merge(moved)
            .merge(self.delete(&d.from, Kind::Dir, 1, keep))
    }

    /// What the cache records for a file moved into place, at its replica version `rep`.
    fn moved_entry(&self, m: &MoveSpec, rep: Version) -> Written {
        Written {
            src: m.src,
            rep,
            hash: m.hash,
            xattrs: self.xattrs,
        }
    }

    /// A move that cannot be done: what the plan had before it, a copy of the new file and
    /// the deletion of the old one.
    fn move_fallback(&self, to: &RelPath, m: &MoveSpec, why: &str) -> Applied {
        log::debug!(
            "could not move '{}' to '{to}' ({why}); copying it instead",
            m.from
        );
        let copied = self.copy(to, Reason::Create, Some(&Hint::Known(m.src, m.hash)));
        copied.merge(self.delete(&m.from, Kind::File, 1, self.backup.is_some()))
    }

    /// True when the replica directory `rel` holds nothing but directories (or cannot be
    /// listed: then the backup keeps it, to be safe).
    fn only_dirs(&self, rel: &RelPath) -> bool {
        match self.replica.list(rel) {
            Ok(entries) => entries
                .iter()
                .all(|e| e.meta.kind == Kind::Dir && self.only_dirs(&rel.join(&e.name))),
            Err(_) => false,
        }
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
