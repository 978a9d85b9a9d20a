//! The parallel merge-walk of source and replica. One directory pair at a time: both sides
//! are listed (one `lstat` per entry, never repeated), names are merged in byte order, each
//! name is decided (see `compare`), and sub-directories are walked in parallel with rayon.
//! Work is split per directory and per entry, so both wide and deep trees keep every core
//! busy, and only differences are kept: memory follows the number of changes, not the tree.
//!
//! A source directory that cannot be read is *unknown*, never empty: its replica twin is
//! left alone, nothing below it is deleted. Excluded names are invisible on both sides.
//! Leftover temp files of an interrupted pass are removed when met.
//!
//! With moves on, the replica files the plan deletes (alone, or below a deleted directory)
//! are listed with their cached hashes (`Plan::gone`), for `moves` to pair with new files.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

use rayon::prelude::*;

use crate::cancel;
use crate::compare::{Compare, FileVerdict};
use crate::config::Excludes;
use crate::error::{EntryError, MountPoint, Side};
use crate::model::{is_temp_name, Entry, Kind, Meta, RelPath, RepEntry, SrcEntry};
use crate::plan::{Action, Gone, LinkSpec, Op, Plan, Reason, RepLink, SrcLink};
use crate::state::cache::{CachedFile, Delta, DirRecord, Recall};
use crate::watch::dirty::Scope;

/// Everything a scan reads; shared by all scan threads.
pub struct Ctx<'a> {
    pub compare: Compare<'a>,
    pub excludes: &'a Excludes,
    /// The hash cache as it was when the pass started.
    pub recall: &'a dyn Recall,
    /// `--one-file-system`: the source root's device; a source directory on another one is
    /// a mount point, mirrored as an empty directory, never walked.
    pub one_fs_dev: Option<u64>,
    /// Mirror hard links: files with several names are noted for `Plan::resolve_links`.
    pub hard_links: bool,
    /// Watch mode: each source directory is watched before it is listed.
    pub watch: Option<&'a crate::watch::Watcher>,
    /// A partial pass: only the dirty directories (and what leads to them) are walked.
    pub scope: Option<&'a crate::watch::dirty::Scopes<'a>>,
    /// Look for moves: replica files the plan deletes are noted (`Plan::gone`) for
    /// `moves::Finder` (the replica can rename, and `--no-moves` was not given).
    pub moves: bool,
    /// Where actions go as they are found, so that the plan's memory does not grow with the
    /// number of changes (`None`: they stay in memory).
    pub spill: Option<&'a crate::spill::Spill>,
    /// Where the drafts of directories the pass copies and fixes nothing in go as they are
    /// found (`None`: they stay in the plan until the pass ends).
    pub settled: Option<&'a crate::state::cache::Settled<'a>>,
}

/// How a directory's cache record must change after the pass, as far as the scan knows:
/// only the entries that differ from the stored record and the names that left it, so
/// memory follows the number of changes, not the size of the changed directories. Files
/// copied by this pass are added from their outcomes.
#[derive(Debug)]
pub struct Draft {
    pub dir: RelPath,
    pub delta: Delta,
}

/// What a scan found: the plan, and the cache drafts to apply once the pass is durable.
#[derive(Debug, Default)]
pub struct Scanned {
    pub plan: Plan,
    pub drafts: Vec<Draft>,
    /// Names whose replica inode a hard link changes (see `Plan::resolve_links`): their
    /// cache entries are forgotten once the pass is durable.
    pub relinked: Vec<RelPath>,
    /// The walked directory's extended attributes were found in sync (for its parent's
    /// cache record).
    pub dir_xattrs_in_sync: bool,
}

impl Scanned {
    fn merge(mut self, other: Scanned) -> Scanned {
        self.plan = self.plan.merge(other.plan);
        self.drafts.extend(other.drafts);
        self
    }
}

/// Scans both trees from their roots. `src_root` is the source root's metadata; `rep_root`
/// the replica root's, if it exists.
pub fn scan(ctx: &Ctx, src_root: &Meta, rep_root: Option<&Meta>) -> Scanned {
    walk(ctx, &RelPath::root(), Some(src_root), rep_root, false)
}

/// Entries of one directory decided at a time: 4,096, unless the test hook
/// `SYNCER_TEST_DECIDE_AT` sets it (the integration tests set 2, so that their small
/// directories take the path a large one takes).
fn decide_batch() -> usize {
    static AT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *AT.get_or_init(|| {
        std::env::var("SYNCER_TEST_DECIDE_AT")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or(4096)
    })
}

/// What one name contributes to its directory.
#[derive(Default)]
struct Child {
    plan: Scanned,
    cached: Option<CachedFile>,
    /// Something is created, replaced or removed directly in this directory.
    changed: bool,
    /// A file is copied or fixed in this directory (its cache entry comes from the outcome).
    copies: bool,
}

/// Walks one directory pair. `src` is `None` for a replica directory whose source is gone
/// but which holds excluded entries (only its non-excluded entries are deleted).
/// `xattrs_known`: the parent's cache record says this directory's extended attributes were
/// in sync at the versions both sides have now (so they are not read).
fn walk(
    ctx: &Ctx,
    rel: &RelPath,
    src: Option<&Meta>,
    rep: Option<&Meta>,
    xattrs_known: bool,
) -> Scanned {
    let mut out = Scanned::default();
    if cancel::requested() {
        return out;
    }
    let cx = &ctx.compare;
    if let (Some(w), Some(_)) = (ctx.watch, src) {
        w.watch(rel);
    }
    let (src_entries, rep_entries, only) = match list_pair(ctx, rel, src, rep) {
        Ok(v) => v,
        Err(problem) => {
            out.plan.problems.extend(problem);
            return out;
        }
    };
    out.plan.entries_read += (src_entries.len() + rep_entries.len()) as u64;
    let mut touched = rep.is_none();
    let src_entries: Vec<_> = src_entries
        .into_iter()
        .filter(|e| {
            if ctx
                .excludes
                .excludes(rel, &e.name, e.meta.kind == Kind::Dir)
            {
                return false;
            }
            if is_temp_name(&e.name) {
                log::warn!(
                    "not mirroring '{}': names like .syncer-*.tmp are syncer's temp files",
                    rel.join(&e.name)
                );
                return false;
            }
            true
        })
        .collect();
    let mut rep_kept = Vec::with_capacity(rep_entries.len());
    for e in rep_entries {
        if ctx
            .excludes
            .excludes(rel, &e.name, e.meta.kind == Kind::Dir)
        {
            continue;
        }
        if is_temp_name(&e.name) {
            // Left over by an interrupted pass (this pass holds the replica lock): removed
            // by apply, so that a refused pass still changes nothing.
            if matches!(e.meta.kind, Kind::File | Kind::Symlink) {
                out.plan.stale_temps.push(rel.join(&e.name));
                touched = true;
            }
            continue;
        }
        rep_kept.push(e);
    }
    // The record vouches for files on both sides, and for deleted ones that a move may reuse.
    let record = if !rep_kept.is_empty() && (!src_entries.is_empty() || ctx.moves) {
        match &only {
            None => ctx.recall.dir(rel),
            Some(names) => {
                let names: Vec<Vec<u8>> = names.iter().map(|n| n.as_bytes().to_vec()).collect();
                ctx.recall.dir_only(rel, &names)
            }
        }
        .unwrap_or_default()
    } else {
        DirRecord::default()
    };
    let mut pairs = merge(src_entries, rep_kept);
    // The record's changes, found as the entries come, in name order.
    let mut delta = crate::state::cache::DeltaBuilder::new(&record.files);
    let mut copies = false;
    // Decided in batches, so that a directory of a million entries never holds a decision
    // (about 450 bytes) for each at once.
    loop {
        let batch: Vec<_> = pairs.by_ref().take(decide_batch()).collect();
        if batch.is_empty() {
            break;
        }
        let children: Vec<Child> = batch
            .into_par_iter()
            .map(|(name, s, r)| decide(ctx, rel, name, s, r, &record))
            .collect();
        for child in children {
            touched |= child.changed;
            copies |= child.copies;
            if let Some(c) = child.cached {
                delta.push(c);
            }
            out = out.merge(child.plan);
            spill(ctx, &mut out, crate::spill::batch());
        }
    }
    if src.is_some() {
        // Entries a partial pass did not read keep their cache entries.
        // (A partial pass's record holds only the entries it read.)
        let delta = delta.finish();
        match ctx.settled {
            Some(settled) if !copies && !delta.is_empty() => settled.add(rel.clone(), delta),
            _ if copies || !delta.is_empty() => out.drafts.push(Draft {
                dir: rel.clone(),
                delta,
            }),
            _ => {}
        }
    }
    if let Some(src) = src {
        // Directory attributes are read unless the parent's record vouches for them (an
        // attribute change changes a directory's ctime, as a file's).
        let mut xattrs_differ = || {
            cx.caps.xattrs
                && rep.is_some()
                && !xattrs_known
                && match cx.xattrs_differ(rel, Kind::Dir) {
                    Ok(d) => d,
                    Err(e) => {
                        out.plan.problems.push(e);
                        false
                    }
                }
        };
        let differs = xattrs_differ();
        out.dir_xattrs_in_sync = cx.caps.xattrs && !differs;
        if touched || rep.is_none_or(|r| cx.caps.meta_differs(src, r)) || differs {
            out.plan.actions.push(Action {
                rel: rel.clone(),
                op: Op::DirMeta {
                    meta: Box::new(*src),
                },
            });
        }
    }
    spill(ctx, &mut out, crate::spill::batch() / 4);
    out
}

/// The entries of a directory pair, source and replica, and in a partial pass, where only the
/// entries that events named are read (see `watch::dirty`), those names (`None`: the pair was
/// listed whole). `Err(None)`: the replica directory is a mount point (`--one-file-system`),
/// unknown, already warned of.
type PairListing = (Vec<SrcEntry>, Vec<RepEntry>, Option<Vec<OsString>>);

fn list_pair(
    ctx: &Ctx,
    rel: &RelPath,
    src: Option<&Meta>,
    rep: Option<&Meta>,
) -> Result<PairListing, Option<EntryError>> {
    let cx = &ctx.compare;
    let src_list = |names: Option<&[OsString]>| match src {
        None => Ok(Vec::new()),
        Some(_) => match names {
            None => cx.source.list(rel),
            Some(n) => cx.source.list_only(rel, n),
        }
        .map_err(|e| {
            Some(EntryError::Read {
                side: Side::Source,
                what: Kind::Dir,
                rel: rel.clone(),
                cause: e,
            })
        }),
    };
    let rep_list = |names: Option<&[OsString]>| match rep {
        None => Ok(Vec::new()),
        Some(_) => match names {
            None => cx.replica.list(rel),
            Some(n) => cx.replica.list_only(rel, n),
        }
        .map_err(|e| {
            if MountPoint::of(&e).is_some() {
                // Unknown, like an unreadable source directory: nothing below it changes.
                log::warn!("{}", crate::error::reason(&e));
                None
            } else {
                Some(EntryError::Read {
                    side: Side::Replica,
                    what: Kind::Dir,
                    rel: rel.clone(),
                    cause: e,
                })
            }
        }),
    };
    // A directory one side lacks is listed whole: it is created or deleted with all it
    // holds.
    let names = match ctx.scope.map(|d| d.scope(rel)) {
        Some(Scope::List(l)) if !l.every() && src.is_some() && rep.is_some() => l.names(),
        _ => return Ok((src_list(None)?, rep_list(None)?, None)),
    };
    let src_entries = src_list(Some(&names))?;
    // With hard links mirrored, a source file with several names means the pair is listed
    // whole: a write through one name changes the others, and inotify names only the one
    // written.
    if ctx.hard_links
        && src_entries
            .iter()
            .any(|e| e.meta.kind == Kind::File && e.meta.link.is_some())
    {
        return Ok((src_list(None)?, rep_list(None)?, None));
    }
    Ok((src_entries, rep_list(Some(&names))?, Some(names)))
}

/// Moves the actions found so far to the spill once there are at least `at` of them.
fn spill(ctx: &Ctx, out: &mut Scanned, at: usize) {
    if let Some(s) = ctx.spill {
        if out.plan.actions.len() >= at {
            s.append(&mut out.plan.actions);
        }
    }
}

type Pair<S, R> = (OsString, Option<S>, Option<R>);

/// Merges two name-sorted listings into (name, source entry, replica entry) triples, as
/// they are asked for.
fn merge<V, W>(
    src: Vec<Entry<V>>,
    rep: Vec<Entry<W>>,
) -> impl Iterator<Item = Pair<Entry<V>, Entry<W>>> {
    let mut s = src.into_iter().peekable();
    let mut r = rep.into_iter().peekable();
    std::iter::from_fn(move || {
        let order = match (s.peek(), r.peek()) {
            (None, None) => return None,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(a), Some(b)) => a.name.as_bytes().cmp(b.name.as_bytes()),
        };
        Some(match order {
            std::cmp::Ordering::Less => {
                let a = s.next().expect("peeked");
                (a.name.clone(), Some(a), None)
            }
            std::cmp::Ordering::Greater => {
                let b = r.next().expect("peeked");
                (b.name.clone(), None, Some(b))
            }
            std::cmp::Ordering::Equal => {
                let a = s.next().expect("peeked");
                let b = r.next().expect("peeked");
                (a.name.clone(), Some(a), Some(b))
            }
        })
    })
}

fn decide(
    ctx: &Ctx,
    dir: &RelPath,
    name: OsString,
    src: Option<crate::model::SrcEntry>,
    rep: Option<crate::model::RepEntry>,
    record: &DirRecord,
) -> Child {
    let rel = dir.join(&name);
    let mut c = Child::default();
    if cancel::requested() {
        return c;
    }
    match (src, rep) {
        (None, None) => {}
        (None, Some(r)) => delete(ctx, &rel, &r, Some(record), &mut c),
        (Some(s), None) => {
            note_links(ctx, &rel, &s.meta, None, &mut c);
            create(ctx, &rel, &s.meta, is_mount(ctx, &s), &mut c)
        }
        (Some(s), Some(r)) => {
            c.plan.plan.replica_entries += 1;
            let (sk, rk) = (s.meta.kind, r.meta.kind);
            if sk == Kind::Special {
                skip_special(&rel, &mut c);
            } else if sk != rk {
                // Replace: the old entry goes first (apply runs deletions before creations).
                // A file replaced by another kind is not a move's source: the new entry
                // may need its name before any move runs.
                delete(ctx, &rel, &r, None, &mut c);
                c.plan.plan.replica_entries -= 1;
                create(ctx, &rel, &s.meta, is_mount(ctx, &s), &mut c);
            } else {
                match sk {
                    Kind::Dir if is_mount(ctx, &s) => {
                        // Its metadata only: what is below it is neither copied nor deleted.
                        if ctx.compare.caps.meta_differs(&s.meta, &r.meta) {
                            c.plan.plan.actions.push(Action {
                                rel,
                                op: Op::DirMeta {
                                    meta: Box::new(s.meta),
                                },
                            });
                        }
                    }
                    Kind::Dir if ctx.scope.is_some_and(|d| d.scope(&rel) == Scope::Skip) => {
                        // Outside a partial pass's dirty set: left as the cache knows it.
                        c.cached = record.find(name.as_bytes()).cloned();
                    }
                    Kind::Dir => {
                        let known = vouched(ctx, record, &name, Kind::Dir, &s, &r);
                        let sub = walk(ctx, &rel, Some(&s.meta), Some(&r.meta), known);
                        if sub.dir_xattrs_in_sync {
                            c.cached = Some(in_sync(ctx, &name, Kind::Dir, &s, &r));
                        }
                        c.plan = std::mem::take(&mut c.plan).merge(sub);
                    }
                    Kind::Symlink => {
                        let known = vouched(ctx, record, &name, Kind::Symlink, &s, &r);
                        if symlinks(ctx, &rel, &s.meta, &r.meta, known, &mut c) {
                            c.cached = Some(in_sync(ctx, &name, Kind::Symlink, &s, &r));
                        }
                    }
                    Kind::File => {
                        note_links(ctx, &rel, &s.meta, Some(&r.meta), &mut c);
                        let cached = record
                            .find(name.as_bytes())
                            .filter(|c| c.kind == Kind::File);
                        match ctx.compare.file(&rel, &name, &s, &r, cached) {
                            FileVerdict::Copy { reason, hint } => {
                                c.changed = true;
                                c.copies = true;
                                c.plan.plan.actions.push(Action {
                                    rel,
                                    op: Op::Copy {
                                        reason,
                                        size: s.meta.size,
                                        hint: hint.map(Box::new),
                                        overwrites: true,
                                    },
                                });
                            }
                            FileVerdict::Meta(entry) => {
                                let rep_version = entry.rep.clone();
                                // The fix changes the replica's version: rewrite the record.
                                c.copies = true;
                                c.cached = Some(entry);
                                c.plan.plan.actions.push(Action {
                                    rel,
                                    op: Op::Meta {
                                        meta: Box::new(s.meta),
                                        rep: Some(Box::new(rep_version)),
                                    },
                                });
                            }
                            FileVerdict::Same(entry) => c.cached = Some(entry),
                            FileVerdict::Error(problem) => c.plan.plan.problems.push(problem),
                        }
                    }
                    Kind::Special => unreachable!("handled above"),
                }
            }
        }
    }
    c
}

fn skip_special(rel: &RelPath, c: &mut Child) {
    log::warn!("skipping '{rel}': fifos, sockets and devices are not mirrored");
    c.plan.plan.specials += 1;
}

/// Notes a source file with several names, and a replica file with several names, for
/// `Plan::resolve_links` (which needs every name of a group, from whatever directory).
fn note_links(ctx: &Ctx, rel: &RelPath, src: &Meta, rep: Option<&Meta>, c: &mut Child) {
    if !ctx.hard_links || src.kind != Kind::File {
        return;
    }
    let rep_link = rep.filter(|r| r.kind == Kind::File).and_then(|r| r.link);
    if let Some(key) = src.link {
        c.plan.plan.src_links.push(SrcLink {
            key,
            rel: rel.clone(),
            size: src.size,
            rep: rep_link,
            rep_exists: rep.is_some(),
        });
    }
    if let Some(key) = rep_link {
        c.plan.plan.rep_links.push(RepLink {
            key,
            rel: rel.clone(),
            src: src.link,
            size: src.size,
        });
    }
}

/// A source directory on another filesystem than the root's, with `--one-file-system`.
fn is_mount(ctx: &Ctx, s: &crate::model::SrcEntry) -> bool {
    s.meta.kind == Kind::Dir && ctx.one_fs_dev.is_some_and(|dev| s.version.dev != dev)
}

/// Plans the creation of a source entry that the replica lacks. `mount`: a mount point
/// (`--one-file-system`), made as an empty directory with its metadata.
fn create(ctx: &Ctx, rel: &RelPath, meta: &Meta, mount: bool, c: &mut Child) {
    let plan = &mut c.plan.plan;
    match meta.kind {
        Kind::Special => skip_special(rel, c),
        Kind::File => {
            c.changed = true;
            c.copies = true;
            plan.creates += 1;
            plan.actions.push(Action {
                rel: rel.clone(),
                op: Op::Copy {
                    reason: Reason::Create,
                    size: meta.size,
                    hint: None,
                    overwrites: false,
                },
            });
        }
        Kind::Symlink => match ctx.compare.source.read_link(rel) {
            Ok(target) => {
                c.changed = true;
                plan.creates += 1;
                plan.actions.push(Action {
                    rel: rel.clone(),
                    op: Op::Link(Box::new(LinkSpec {
                        reason: Reason::Create,
                        target,
                        meta: *meta,
                    })),
                });
            }
            Err(e) => plan
                .problems
                .push(EntryError::read(Side::Source, Kind::Symlink, rel, e)),
        },
        Kind::Dir => {
            c.changed = true;
            plan.creates += 1;
            plan.actions.push(Action {
                rel: rel.clone(),
                op: Op::Mkdir,
            });
            if mount {
                plan.actions.push(Action {
                    rel: rel.clone(),
                    op: Op::DirMeta {
                        meta: Box::new(*meta),
                    },
                });
                return;
            }
            let sub = walk(ctx, rel, Some(meta), None, false);
            c.plan = std::mem::take(&mut c.plan).merge(sub);
        }
    }
}

/// Plans the removal of a replica entry whose source is gone. `record`: its directory's
/// cache record when the entry, a file, may be a move's source (its name is free in the
/// source).
fn delete(
    ctx: &Ctx,
    rel: &RelPath,
    rep: &crate::model::RepEntry,
    record: Option<&DirRecord>,
    c: &mut Child,
) {
    c.changed = true;
    let meta = &rep.meta;
    if meta.kind == Kind::Dir {
        let (entries, excluded, gone) = count_tree(ctx, rel);
        if excluded {
            // Excluded entries (and mount points) are never deleted: remove the rest, keep
            // the directory.
            c.plan.plan.replica_entries += 1;
            let sub = walk(ctx, rel, None, Some(meta), false);
            c.plan = std::mem::take(&mut c.plan).merge(sub);
            return;
        }
        let plan = &mut c.plan.plan;
        plan.gone.extend(gone);
        plan.replica_entries += entries + 1;
        plan.deletes += entries + 1;
        plan.actions.push(Action {
            rel: rel.clone(),
            op: Op::Delete {
                kind: Kind::Dir,
                entries: entries + 1,
            },
        });
    } else {
        let plan = &mut c.plan.plan;
        if let Some(record) = record.filter(|_| ctx.moves) {
            plan.gone.extend(gone(ctx, rel, rep, record));
        }
        plan.replica_entries += 1;
        plan.deletes += 1;
        plan.actions.push(Action {
            rel: rel.clone(),
            op: Op::Delete {
                kind: meta.kind,
                entries: 1,
            },
        });
    }
}

/// A deleted replica file as a move may reuse it (see `moves`): a regular file with one
/// name, with its hash when the record vouches for its version.
fn gone(
    ctx: &Ctx,
    rel: &RelPath,
    rep: &crate::model::RepEntry,
    record: &DirRecord,
) -> Option<Gone> {
    if rep.meta.kind != Kind::File || rep.meta.link.is_some() {
        return None;
    }
    let name = rel.file_name()?;
    let cached = record
        .find(name.as_bytes())
        .filter(|c| c.kind == Kind::File && !ctx.compare.checksum && c.rep == rep.version);
    Some(Gone {
        rel: rel.clone(),
        size: rep.meta.size,
        version: rep.version.clone(),
        hash: cached.map(|c| c.hash),
        synced: cached
            .filter(|c| !c.src_racy && (c.xattrs || !ctx.compare.caps.xattrs))
            .map(|c| c.src),
    })
}

/// Counts the entries below a replica directory (never following symlinks) and says whether
/// any of them must stay: an excluded entry, or a mount point (`--one-file-system`). With
/// moves on, also lists the files below it that a move may reuse.
fn count_tree(ctx: &Ctx, rel: &RelPath) -> (u64, bool, Vec<Gone>) {
    let entries = match ctx.compare.replica.list(rel) {
        Ok(v) => v,
        Err(e) if MountPoint::of(&e).is_some() => return (0, true, Vec::new()),
        Err(_) => return (0, false, Vec::new()),
    };
    let record = match ctx.moves && entries.iter().any(|e| e.meta.kind == Kind::File) {
        true => ctx.recall.dir(rel).unwrap_or_default(),
        false => DirRecord::default(),
    };
    entries
        .par_iter()
        .map(|e| {
            let is_dir = e.meta.kind == Kind::Dir;
            if ctx.excludes.excludes(rel, &e.name, is_dir) {
                return (0, true, Vec::new());
            }
            let child = rel.join(&e.name);
            if is_dir {
                let (n, x, gone) = count_tree(ctx, &child);
                (n + 1, x, gone)
            } else {
                let gone = match ctx.moves {
                    true => gone(ctx, &child, e, &record).into_iter().collect(),
                    false => Vec::new(),
                };
                (1, false, gone)
            }
        })
        .reduce(
            || (0, false, Vec::new()),
            |mut a, b| {
                a.2.extend(b.2);
                (a.0 + b.0, a.1 || b.1, a.2)
            },
        )
}

/// The record vouches that the attributes of the directory or symlink `name` were in sync
/// at the versions both sides have now.
fn vouched(
    ctx: &Ctx,
    record: &DirRecord,
    name: &std::ffi::OsStr,
    kind: Kind,
    s: &crate::model::SrcEntry,
    r: &crate::model::RepEntry,
) -> bool {
    ctx.compare.caps.xattrs
        && !ctx.compare.checksum
        && record.find(name.as_bytes()).is_some_and(|c| {
            c.kind == kind && c.xattrs && !c.src_racy && c.src == s.version && c.rep == r.version
        })
}

/// The record of a directory or symlink whose attributes are in sync.
fn in_sync(
    ctx: &Ctx,
    name: &std::ffi::OsStr,
    kind: Kind,
    s: &crate::model::SrcEntry,
    r: &crate::model::RepEntry,
) -> CachedFile {
    CachedFile {
        name: name.as_bytes().to_vec(),
        kind,
        src: s.version,
        rep: r.version.clone(),
        hash: crate::model::Hash::default(),
        src_racy: ctx.compare.racy.is_racy(&s.version),
        xattrs: true,
    }
}

/// Plans what a symlink pair needs; true when its attributes are in sync (for the record).
fn symlinks(
    ctx: &Ctx,
    rel: &RelPath,
    src: &Meta,
    rep: &Meta,
    xattrs_known: bool,
    c: &mut Child,
) -> bool {
    let cx = &ctx.compare;
    let plan = &mut c.plan.plan;
    let target = match cx.source.read_link(rel) {
        Ok(t) => t,
        Err(e) => {
            plan.problems
                .push(EntryError::read(Side::Source, Kind::Symlink, rel, e));
            return false;
        }
    };
    let same_target = cx.replica.read_link(rel).is_ok_and(|t| t == target);
    if !same_target {
        c.changed = true;
        plan.actions.push(Action {
            rel: rel.clone(),
            op: Op::Link(Box::new(LinkSpec {
                reason: Reason::Update,
                target,
                meta: *src,
            })),
        });
        return false;
    }
    let xattrs_differ = cx.caps.xattrs
        && !xattrs_known
        && match cx.xattrs_differ(rel, Kind::Symlink) {
            Ok(d) => d,
            Err(e) => {
                plan.problems.push(e);
                return false;
            }
        };
    if xattrs_differ || cx.caps.meta_differs(src, rep) {
        plan.actions.push(Action {
            rel: rel.clone(),
            op: Op::Meta {
                meta: Box::new(*src),
                rep: None,
            },
        });
    }
    cx.caps.xattrs && !xattrs_differ
}
