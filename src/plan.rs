//! A pass's plan: the ordered list of actions that converge the replica, the counts the
//! deletion guard needs, and the cache records to rewrite. Pure data and pure checks, no I/O:
//! the scan builds a `Plan`, hard links and moves are resolved over the whole of it (the
//! pairs of a move are found by `moves`, which reads), `guard` decides whether it may run,
//! `apply` executes it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::EntryError;
use crate::model::{path_bytes, Hash, Hint, Kind, LinkKey, Meta, RelPath, Token, Version};
use crate::spill::{Spill, Spilled, BATCH};

/// Why a file is copied; also the word written to the file-I/O log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// Not in the replica yet (`CREATE`).
    Create,
    /// Different content in the source (`UPDATE`).
    Update,
    /// The replica file was changed behind syncer's back (`DRIFT`).
    Drift,
}

impl Reason {
    pub fn word(self) -> &'static str {
        match self {
            Reason::Create => "CREATE",
            Reason::Update => "UPDATE",
            Reason::Drift => "DRIFT",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Op {
    /// Remove a replica entry (a directory with everything below it, `entries` in all).
    Delete { kind: Kind, entries: u64 },
    /// Create a directory (private until its `DirMeta` runs).
    Mkdir,
    /// Copy a source file over. `hint` is what this pass already knows of its content
    /// (see `model::Hint`); `size` is the scanned size (for progress).
    Copy {
        reason: Reason,
        size: u64,
        hint: Option<Box<Hint>>,
        /// A replica file exists at this path and is overwritten (backed up first).
        overwrites: bool,
    },
    /// Create or retarget a symlink.
    Link(Box<LinkSpec>),
    /// Fix mode, owner and times of a file or symlink whose content is already equal.
    /// `rep` is the replica file's version that equality was established for: a file that
    /// no longer has it is left for the next pass.
    Meta {
        meta: Box<Meta>,
        rep: Option<Box<Version>>,
    },
    /// Set a directory's mode, owner and times, after everything below it.
    DirMeta { meta: Box<Meta> },
    /// Make this name a hard link to `to` (the first name of its source link group), after
    /// every file was copied. `overwrites`: a replica entry is replaced (backed up first).
    HardLink { to: Box<RelPath>, overwrites: bool },
    /// Rename a replica file the source no longer has to this name, where the source has a
    /// new file with the same content (see `moves`): no byte is copied.
    Move(Box<MoveSpec>),
    /// Rename a whole replica directory the source no longer has to this name, where the
    /// source has a new directory holding the same files under the same names (see `moves`).
    MoveDir(Box<DirMove>),
}

/// A renamed directory: the replica directory `from` becomes the action's path. `files` are
/// the moves of each of its files (their new paths and what was checked), which is all it
/// holds; the directory is created and each file moved on its own if either side changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirMove {
    pub from: RelPath,
    pub files: Vec<(RelPath, MoveSpec)>,
}

/// A move: which replica file goes where the source's new file is, and what both were when
/// the pass found them equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveSpec {
    /// The replica file that is renamed (its source is gone).
    pub from: RelPath,
    /// Its replica version when its content was known: a file that no longer has it is
    /// not moved (a copy and a delete run instead).
    pub rep: Version,
    /// The source file's token when it was hashed: a source that no longer has it is
    /// copied instead.
    pub src: Token,
    /// The content both have.
    pub hash: Hash,
    pub size: u64,
    /// The cache vouches that the replica file's metadata and extended attributes were in
    /// sync with this very source token (a file inside a renamed directory keeps its token):
    /// nothing but the rename is needed.
    pub in_sync: bool,
}

/// A replica file the plan deletes, alone or inside a deleted directory, as the scan met it:
/// what a move may reuse (see `moves`).
#[derive(Clone, Debug)]
pub struct Gone {
    pub rel: RelPath,
    pub size: u64,
    pub version: Version,
    /// Its sha256, when the cache vouches for this version.
    pub hash: Option<Hash>,
    /// The source token its metadata and extended attributes were last in sync with, when
    /// the cache vouches for that.
    pub synced: Option<Token>,
}

/// A source file with several names, as the scan met it.
#[derive(Clone, Debug)]
pub struct SrcLink {
    pub key: LinkKey,
    pub rel: RelPath,
    pub size: u64,
    /// The replica twin's link identity, when it is a file with several names.
    pub rep: Option<LinkKey>,
    /// A replica entry exists at this name.
    pub rep_exists: bool,
}

/// A replica file with several names whose source twin is a file, as the scan met it.
#[derive(Clone, Debug)]
pub struct RepLink {
    pub key: LinkKey,
    pub rel: RelPath,
    /// The source twin's link identity, `None` for a file with one name.
    pub src: Option<LinkKey>,
    pub size: u64,
}

/// A symlink to create: boxed in `Op` because links are rare and `Op` is held per change.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkSpec {
    pub reason: Reason,
    #[serde(with = "path_bytes")]
    pub target: PathBuf,
    pub meta: Meta,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Action {
    pub rel: RelPath,
    pub op: Op,
}

#[derive(Debug, Default)]
pub struct Plan {
    /// Actions held in memory. The scan moves them to `spilled` as it goes; read them all
    /// with `iter`. Their order carries no meaning: `apply` orders what must be ordered.
    pub actions: Vec<Action>,
    /// Actions written to disk by the scan (see `spill`), read back by `iter`.
    pub spilled: Option<Spilled>,
    /// A read of an earlier spill failed while the plan was rewritten (`read_failed`).
    pub cut_short: bool,
    /// Entries the scan could not read (each reported once, exit code 1 or a skip).
    pub problems: Vec<EntryError>,
    /// Leftover `.syncer-*.tmp` files of an interrupted pass, removed first by apply.
    pub stale_temps: Vec<RelPath>,
    /// Entries the replica holds now, outside excluded and unknown subtrees.
    pub replica_entries: u64,
    /// Entries whose metadata the scan read, on both sides.
    pub entries_read: u64,
    /// Entries the plan creates in the replica.
    pub creates: u64,
    /// Entries the plan deletes from the replica (each entry of a deleted tree counts).
    pub deletes: u64,
    /// Special files (fifos, sockets, devices) skipped.
    pub specials: u64,
    /// Source files with several names (`resolve_links` turns them into hard links).
    pub src_links: Vec<SrcLink>,
    /// Replica files with several names (to break links the source no longer has).
    pub rep_links: Vec<RepLink>,
    /// Replica files the plan deletes that a move may reuse (only when moves are on).
    pub gone: Vec<Gone>,
}

impl Plan {
    pub fn merge(mut self, other: Plan) -> Plan {
        debug_assert!(other.spilled.is_none(), "a spilled plan is never merged");
        self.actions.extend(other.actions);
        self.problems.extend(other.problems);
        self.stale_temps.extend(other.stale_temps);
        self.replica_entries += other.replica_entries;
        self.entries_read += other.entries_read;
        self.creates += other.creates;
        self.deletes += other.deletes;
        self.specials += other.specials;
        self.src_links.extend(other.src_links);
        self.rep_links.extend(other.rep_links);
        self.gone.extend(other.gone);
        self
    }

    /// Turns the scan's per-name decisions into hard links (rsync's `-H`), after the scan,
    /// when every name of every group is known however the directories were walked:
    ///
    /// 1. A replica inode shared by names whose sources are not one link group (a name left
    ///    its group, or never was in it) is broken up: each name that does not belong is
    ///    copied afresh (a new inode), unless it is linked to its own group below anyway.
    /// 2. In each source group, the first name (by path) is the leader: it keeps its own
    ///    decision (copy, fix or nothing). Every other name drops its copy or fix and, unless
    ///    it already shares the leader's replica inode and the leader is not re-copied, is
    ///    linked to the leader after the copies.
    ///
    /// Returns the names whose replica inode changes by a link, leaders included: their cache
    /// entries are forgotten (the next pass hashes them once) because a link changes the
    /// inode's ctime, so their recorded versions would look like drift.
    pub fn resolve_links(&mut self) -> Vec<RelPath> {
        if self.src_links.is_empty() && self.rep_links.is_empty() {
            return Vec::new();
        }
        let mut groups: BTreeMap<LinkKey, Vec<SrcLink>> = BTreeMap::new();
        for l in std::mem::take(&mut self.src_links) {
            groups.entry(l.key).or_default().push(l);
        }
        groups.retain(|_, g| g.len() > 1);
        for g in groups.values_mut() {
            g.sort_by(|a, b| a.rel.cmp(&b.rel));
        }
        // Which group each linked name belongs to, and whether it leads it.
        let mut member: HashMap<RelPath, (LinkKey, bool)> = HashMap::new();
        for (key, g) in &groups {
            for (i, l) in g.iter().enumerate() {
                member.insert(l.rel.clone(), (*key, i == 0));
            }
        }
        // 1. Replica inodes shared by names that do not belong together.
        let mut rep_groups: BTreeMap<LinkKey, Vec<RepLink>> = BTreeMap::new();
        for l in std::mem::take(&mut self.rep_links) {
            rep_groups.entry(l.key).or_default().push(l);
        }
        let mut force_copy: BTreeMap<RelPath, u64> = BTreeMap::new();
        for mut names in rep_groups.into_values().filter(|g| g.len() > 1) {
            names.sort_by(|a, b| a.rel.cmp(&b.rel));
            let group_of = |l: &RepLink| member.get(&l.rel).map(|m| m.0);
            let owner = names.iter().find_map(group_of);
            for (i, l) in names.iter().enumerate() {
                // No name is linked in the source any more: the first keeps the inode.
                let belongs = match owner {
                    Some(_) => group_of(l) == owner,
                    None => i == 0,
                };
                let linked_anyway = member.get(&l.rel).is_some_and(|m| !m.1);
                if !belongs && !linked_anyway {
                    force_copy.insert(l.rel.clone(), l.size);
                }
            }
        }
        // 2. Source groups. Which of the names that matter are copied (the plan may be on
        // disk and large: only these are kept).
        let copied: HashSet<RelPath> = self
            .iter()
            .filter(|a| {
                matches!(a.op, Op::Copy { .. })
                    && (member.contains_key(&a.rel) || force_copy.contains_key(&a.rel))
            })
            .map(|a| a.rel.clone())
            .chain(force_copy.keys().cloned())
            .collect();
        let mut replaced: HashSet<RelPath> = HashSet::new();
        let mut links = Vec::new();
        let mut touched = Vec::new();
        for g in groups.values() {
            let leader = &g[0];
            let leader_copied = copied.contains(&leader.rel);
            let mut any = false;
            for m in &g[1..] {
                replaced.insert(m.rel.clone());
                force_copy.remove(&m.rel);
                let already = !leader_copied && m.rep.is_some() && m.rep == leader.rep;
                if !already {
                    any = true;
                    links.push(Action {
                        rel: m.rel.clone(),
                        op: Op::HardLink {
                            to: Box::new(leader.rel.clone()),
                            overwrites: m.rep_exists,
                        },
                    });
                }
            }
            if any {
                touched.extend(g.iter().map(|l| l.rel.clone()));
            }
        }
        // A replaced name drops its copy or fix; a name that must get an inode of its own is
        // copied (its fix becomes a copy, or a copy is added).
        let mut has_copy: HashSet<RelPath> = HashSet::new();
        self.rewrite(|a| {
            if replaced.contains(&a.rel) && matches!(a.op, Op::Copy { .. } | Op::Meta { .. }) {
                return false;
            }
            if let (Op::Meta { meta, .. }, Some(size)) = (&a.op, force_copy.get(&a.rel)) {
                if meta.kind == Kind::File {
                    a.op = copy_op(*size);
                    force_copy.remove(&a.rel);
                    return true;
                }
            }
            if matches!(a.op, Op::Copy { .. }) && force_copy.contains_key(&a.rel) {
                has_copy.insert(a.rel.clone());
            }
            true
        });
        for (rel, size) in force_copy {
            if !has_copy.contains(&rel) {
                self.actions.push(Action {
                    rel,
                    op: copy_op(size),
                });
            }
        }
        self.actions.extend(links);
        touched
    }

    /// Turns each whole directory found by `moves::Finder` into one `MoveDir`: the new
    /// directory is not made, the old one not deleted, and none of its files copied. The guard
    /// counts none of it.
    pub fn take_dir_moves(&mut self, moves: Vec<(RelPath, DirMove)>) {
        if moves.is_empty() {
            return;
        }
        let dirs: HashSet<RelPath> = moves.iter().map(|(to, _)| to.clone()).collect();
        let froms: HashSet<RelPath> = moves.iter().map(|(_, d)| d.from.clone()).collect();
        let targets: HashSet<RelPath> = moves
            .iter()
            .flat_map(|(_, d)| d.files.iter().map(|(to, _)| to.clone()))
            .collect();
        self.rewrite(|a| match a.op {
            Op::Mkdir => !dirs.contains(&a.rel),
            Op::Delete {
                kind: Kind::Dir, ..
            } => !froms.contains(&a.rel),
            Op::Copy { .. } => !targets.contains(&a.rel),
            _ => true,
        });
        for (to, d) in moves {
            let n = d.files.len() as u64 + 1;
            self.deletes = self.deletes.saturating_sub(n);
            self.creates = self.creates.saturating_sub(n);
            self.actions.push(Action {
                rel: to,
                op: Op::MoveDir(Box::new(d)),
            });
        }
    }

    /// Turns each pair found by `moves::Finder` into a move: the create at `to` becomes a
    /// rename of `spec.from`, whose own deletion is dropped (a deleted directory that held it
    /// counts one entry fewer). The guard then counts a move as neither a deletion nor a
    /// creation.
    pub fn take_moves(&mut self, pairs: Vec<(RelPath, MoveSpec)>) {
        if pairs.is_empty() {
            return;
        }
        let n = pairs.len() as u64;
        let mut moved: HashMap<RelPath, MoveSpec> = pairs.into_iter().collect();
        let froms: HashSet<RelPath> = moved.values().map(|m| m.from.clone()).collect();
        // Deleted directories, and how many of their entries move out.
        let mut out_of: HashMap<RelPath, u64> = self
            .iter()
            .filter(|a| {
                matches!(
                    a.op,
                    Op::Delete {
                        kind: Kind::Dir,
                        ..
                    }
                )
            })
            .map(|a| (a.rel.clone(), 0))
            .collect();
        for from in &froms {
            let mut up = from.parent();
            while let Some(dir) = up {
                if let Some(n) = out_of.get_mut(&dir) {
                    *n += 1;
                    break;
                }
                up = dir.parent();
            }
        }
        self.rewrite(|a| match &mut a.op {
            Op::Delete {
                kind: Kind::Dir,
                entries,
            } => {
                *entries = entries.saturating_sub(out_of.get(&a.rel).copied().unwrap_or(0));
                true
            }
            Op::Delete { .. } => !froms.contains(&a.rel),
            Op::Copy { .. } => {
                if let Some(spec) = moved.remove(&a.rel) {
                    a.op = Op::Move(Box::new(spec));
                }
                true
            }
            _ => true,
        });
        self.deletes = self.deletes.saturating_sub(n);
        self.creates = self.creates.saturating_sub(n);
    }

    /// True when the plan changes nothing in the replica.
    pub fn is_empty(&self) -> bool {
        self.len() == 0 && self.stale_temps.is_empty()
    }

    /// Number of actions, on disk and in memory.
    pub fn len(&self) -> u64 {
        self.spilled.as_ref().map_or(0, Spilled::len) + self.actions.len() as u64
    }

    /// Every action: those on disk (read as they are needed), then those in memory.
    pub fn iter(&self) -> impl Iterator<Item = Cow<'_, Action>> {
        self.spilled
            .iter()
            .flat_map(Spilled::iter)
            .map(Cow::Owned)
            .chain(self.actions.iter().map(Cow::Borrowed))
    }

    /// A read of the spilled actions failed (logged once): the pass did less than planned.
    pub fn read_failed(&self) -> bool {
        self.cut_short || self.spilled.as_ref().is_some_and(Spilled::read_failed)
    }

    /// Keeps the actions for which `f` is true, as `f` changed them: the spilled ones are
    /// streamed into a new spill in the same directory.
    pub fn rewrite(&mut self, mut f: impl FnMut(&mut Action) -> bool) {
        if let Some(old) = self.spilled.take() {
            let new = Spill::new(old.dir());
            let mut batch = Vec::new();
            let mut kept = Vec::new();
            for mut a in old.iter() {
                if f(&mut a) {
                    batch.push(a);
                }
                if batch.len() >= BATCH {
                    if let Ok(new) = &new {
                        new.append(&mut batch);
                    }
                    kept.append(&mut batch);
                }
            }
            if let Ok(new) = &new {
                new.append(&mut batch);
            }
            kept.append(&mut batch);
            self.cut_short |= old.read_failed();
            drop(old);
            match new {
                Ok(new) => self.spilled = Some(new.finish()),
                Err(e) => log::warn!(
                    "could not write the plan to the state directory ({}); keeping it in memory",
                    crate::error::reason(&e)
                ),
            }
            self.actions.retain_mut(&mut f);
            self.actions.extend(kept);
        } else {
            self.actions.retain_mut(f);
        }
    }
}

/// A copy that replaces a replica file (to give it an inode of its own).
fn copy_op(size: u64) -> Op {
    Op::Copy {
        reason: Reason::Update,
        size,
        hint: None,
        overwrites: true,
    }
}

/// The deletion guard (`--max-delete`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Guard {
    /// Refuse a pass that would leave a replica of at least 100 entries with fewer than half.
    Default,
    /// Refuse a pass that deletes more than this many entries.
    Count(u64),
    /// Refuse a pass that deletes more than this percentage of the replica's entries.
    Percent(f64),
    /// No guard.
    Off,
}

/// Smallest replica the default guard protects: below it, emptying the replica is allowed.
pub const GUARD_MIN_ENTRIES: u64 = 100;

impl Guard {
    pub fn parse(text: &str) -> Result<Guard, String> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("none") {
            return Ok(Guard::Off);
        }
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<f64>() {
                Ok(v) if (0.0..=100.0).contains(&v) => Ok(Guard::Percent(v)),
                _ => Err(format!(
                    "--max-delete: '{text}' is not a percentage from 0% to 100%"
                )),
            };
        }
        t.parse::<u64>().map(Guard::Count).map_err(|_| {
            format!("--max-delete: '{text}' is not a count, a percentage (10%) or 'none'")
        })
    }

    /// Checks the whole plan before anything is changed; `Err` is the reason for refusing.
    pub fn check(self, plan: &Plan) -> Result<(), String> {
        let (have, del, add) = (plan.replica_entries, plan.deletes, plan.creates);
        match self {
            Guard::Off => Ok(()),
            Guard::Default => {
                let left = have.saturating_sub(del) + add;
                if have >= GUARD_MIN_ENTRIES && left * 2 < have {
                    Err(format!(
                        "refusing to delete {del} of the replica's {have} entries: it would keep only {left} \
                         (fewer than half; is the source mounted?); run with --max-delete none to allow it"
                    ))
                } else {
                    Ok(())
                }
            }
            Guard::Count(max) => {
                if del > max {
                    Err(format!(
                        "refusing to delete {del} entries: more than --max-delete {max}; raise it or use --max-delete none"
                    ))
                } else {
                    Ok(())
                }
            }
            Guard::Percent(p) => {
                let limit = (have as f64) * p / 100.0;
                if del as f64 > limit {
                    Err(format!(
                        "refusing to delete {del} of the replica's {have} entries: more than --max-delete {p}%; \
                         raise it or use --max-delete none"
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes())
    }

    fn src(key: u64, name: &str, rep: Option<u64>, exists: bool) -> SrcLink {
        SrcLink {
            key: LinkKey(1, key),
            rel: rel(name),
            size: 10,
            rep: rep.map(|r| LinkKey(2, r)),
            rep_exists: exists,
        }
    }

    fn rep(key: u64, name: &str, src: Option<u64>) -> RepLink {
        RepLink {
            key: LinkKey(2, key),
            rel: rel(name),
            src: src.map(|s| LinkKey(1, s)),
            size: 10,
        }
    }

    fn copy(name: &str) -> Action {
        Action {
            rel: rel(name),
            op: copy_op(10),
        }
    }

    /// The plan's actions as `WORD path[ => leader]`, sorted.
    fn lines(p: &Plan) -> Vec<String> {
        let mut v: Vec<String> = p
            .actions
            .iter()
            .map(|a| match &a.op {
                Op::Copy { .. } => format!("COPY {}", a.rel),
                Op::Meta { .. } => format!("META {}", a.rel),
                Op::HardLink { to, .. } => format!("LINK {} => {to}", a.rel),
                other => format!("{other:?} {}", a.rel),
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_new_group_is_one_copy_and_links_across_directories() {
        let mut p = Plan {
            actions: vec![copy("x/a"), copy("y/b"), copy("z/c")],
            src_links: vec![
                src(7, "z/c", None, false),
                src(7, "x/a", None, false),
                src(7, "y/b", None, false),
            ],
            ..Plan::default()
        };
        let touched = p.resolve_links();
        assert_eq!(
            lines(&p),
            ["COPY x/a", "LINK y/b => x/a", "LINK z/c => x/a"]
        );
        assert_eq!(touched.len(), 3);
    }

    #[test]
    fn an_intact_group_needs_nothing_and_a_recopied_leader_is_linked_again() {
        let intact = || vec![src(7, "a", Some(9), true), src(7, "b", Some(9), true)];
        let mut p = Plan {
            src_links: intact(),
            rep_links: vec![rep(9, "a", Some(7)), rep(9, "b", Some(7))],
            ..Plan::default()
        };
        assert!(p.resolve_links().is_empty());
        assert!(lines(&p).is_empty());
        let mut p = Plan {
            actions: vec![copy("a"), copy("b")],
            src_links: intact(),
            rep_links: vec![rep(9, "a", Some(7)), rep(9, "b", Some(7))],
            ..Plan::default()
        };
        p.resolve_links();
        assert_eq!(lines(&p), ["COPY a", "LINK b => a"]);
    }

    #[test]
    fn a_name_that_left_its_group_gets_an_inode_of_its_own_and_one_that_joined_is_linked() {
        // Source: a and c are linked, b is a file of its own now. Replica: a, b, c share 9.
        let mut p = Plan {
            src_links: vec![src(7, "a", Some(9), true), src(7, "c", Some(9), true)],
            rep_links: vec![
                rep(9, "a", Some(7)),
                rep(9, "b", None),
                rep(9, "c", Some(7)),
            ],
            ..Plan::default()
        };
        p.resolve_links();
        assert_eq!(lines(&p), ["COPY b"]);
        // Source: d joined the group of a; the replica has d as a separate file.
        let mut p = Plan {
            src_links: vec![src(7, "a", Some(9), true), src(7, "d", None, true)],
            rep_links: vec![rep(9, "a", Some(7))],
            ..Plan::default()
        };
        p.resolve_links();
        assert_eq!(lines(&p), ["LINK d => a"]);
        // No name is linked in the source any more: the first keeps the replica inode.
        let mut p = Plan {
            rep_links: vec![rep(9, "a", None), rep(9, "b", None)],
            ..Plan::default()
        };
        p.resolve_links();
        assert_eq!(lines(&p), ["COPY b"]);
    }

    fn plan(have: u64, del: u64, add: u64) -> Plan {
        Plan {
            replica_entries: have,
            deletes: del,
            creates: add,
            ..Plan::default()
        }
    }

    #[test]
    fn default_guard_refuses_emptying_a_large_replica() {
        assert!(Guard::Default.check(&plan(100, 100, 0)).is_err());
        assert!(Guard::Default.check(&plan(1000, 501, 0)).is_err());
    }

    #[test]
    fn default_guard_allows_small_replicas_and_renames() {
        assert!(Guard::Default.check(&plan(99, 99, 0)).is_ok());
        assert!(Guard::Default.check(&plan(1000, 900, 900)).is_ok());
        assert!(Guard::Default.check(&plan(1000, 500, 0)).is_ok());
    }

    #[test]
    fn count_and_percent_guards_count_deletions_only() {
        assert!(Guard::Count(10).check(&plan(1000, 11, 11)).is_err());
        assert!(Guard::Count(10).check(&plan(1000, 10, 0)).is_ok());
        assert!(Guard::Percent(10.0).check(&plan(1000, 101, 500)).is_err());
        assert!(Guard::Percent(10.0).check(&plan(1000, 100, 0)).is_ok());
    }

    #[test]
    fn parses_guard_options() {
        assert_eq!(Guard::parse("none"), Ok(Guard::Off));
        assert_eq!(Guard::parse("25"), Ok(Guard::Count(25)));
        assert_eq!(Guard::parse("10%"), Ok(Guard::Percent(10.0)));
        assert!(Guard::parse("ten").is_err());
        assert!(Guard::parse("150%").is_err());
    }
}
