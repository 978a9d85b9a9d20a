//! Moves: after the scan, a source file the plan would create and a replica file it would
//! delete that have the same size and sha256 become one rename of the replica file
//! (`Op::Move`), so a renamed directory or a reorganised tree costs no copy.
//!
//! Only candidates of equal size are hashed, never a file for its own sake: a new source file
//! is hashed when some deleted replica file has its size (the hash then travels with its copy
//! if no partner is found, so it is never read twice), and a deleted replica file's hash comes
//! from the cache when the cache vouches for its version, otherwise it is hashed through the
//! replica, and only when a new file of its size still lacks a partner. Size alone never
//! pairs two files.
//!
//! Deliberately left out, so that every move is a plain rename into a free name: names whose
//! replica entry is replaced by another kind (the old entry must go first, or the new one
//! take its place), files with several names on either side (hard links are
//! `Plan::resolve_links`'s), and replicas that cannot rename (an object store). Excluded
//! entries never reach the plan, so they are never paired either.

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;

use crate::cancel;
use crate::model::{Hash, HashCounters, Hint, RelPath, Token};
use crate::plan::{DirMove, Gone, MoveSpec, Op, Plan, Reason};
use crate::replica::Replica;
use crate::source::SourceTree;

/// What pairing reads: both sides, to hash candidates.
pub struct Finder<'a> {
    pub source: &'a dyn SourceTree,
    pub replica: &'a dyn Replica,
    pub counters: &'a HashCounters,
}

/// A new source file that may be a moved one, and its content once hashed.
struct Want {
    rel: RelPath,
    size: u64,
    token: Token,
    hash: Hash,
}

impl Finder<'_> {
    /// Pairs the plan's new files with its deleted ones (see the module comment) and turns
    /// the pairs into moves. `skip`: names that must be copied (members of hard-link
    /// groups). Uses up `plan.gone`.
    pub fn find(&self, plan: &mut Plan, skip: &HashSet<RelPath>) {
        let mut gone = std::mem::take(&mut plan.gone);
        if gone.is_empty() {
            return;
        }
        let sizes: HashSet<u64> = gone.iter().map(|g| g.size).collect();
        let replaced: HashSet<RelPath> = plan
            .iter()
            .filter(|a| matches!(a.op, Op::Delete { .. }))
            .map(|a| a.rel.clone())
            .collect();
        let mut made: HashSet<RelPath> = HashSet::new();
        let candidates: Vec<(RelPath, u64)> = plan
            .iter()
            .filter_map(|a| match a.op {
                Op::Mkdir => {
                    made.insert(a.rel.clone());
                    None
                }
                Op::Copy {
                    reason: Reason::Create,
                    size,
                    ..
                } if sizes.contains(&size)
                    && !replaced.contains(&a.rel)
                    && !skip.contains(&a.rel) =>
                {
                    Some((a.rel.clone(), size))
                }
                _ => None,
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        // A file inside a renamed directory keeps its token (a directory's rename changes
        // no file's ctime): when the cache vouched for a deleted file with that very token,
        // its hash is the new file's, and the file need not be read. The tokens come from
        // one listing of each candidate's directory.
        let known: HashMap<Token, Hash> = gone
            .iter()
            .filter_map(|g| Some((g.synced?, g.hash?)))
            .collect();
        let listed: HashMap<RelPath, Token> = match known.is_empty() {
            true => HashMap::new(),
            false => {
                // Only new directories can be renamed ones.
                let wanted: HashSet<&RelPath> = candidates.iter().map(|(rel, _)| rel).collect();
                let dirs: HashSet<RelPath> = candidates
                    .iter()
                    .filter_map(|(rel, _)| rel.parent())
                    .filter(|dir| made.contains(dir))
                    .collect();
                dirs.into_par_iter()
                    .flat_map_iter(|dir| {
                        let entries = self.source.list(&dir).unwrap_or_default();
                        let wanted = &wanted;
                        entries.into_iter().filter_map(move |e| {
                            let rel = dir.join(&e.name);
                            wanted.contains(&rel).then_some((rel, e.version))
                        })
                    })
                    .collect()
            }
        };
        let wants: Vec<Want> = candidates
            .into_par_iter()
            .filter_map(|(rel, size)| {
                if cancel::requested() {
                    return None;
                }
                if let Some((token, hash)) = listed
                    .get(&rel)
                    .and_then(|t| Some((*t, *known.get(t)?)))
                    .filter(|(t, _)| t.size == size)
                {
                    return Some(Want {
                        rel,
                        size,
                        token,
                        hash,
                    });
                }
                match self.source.hash(&rel, self.counters) {
                    Ok((hash, token)) if token.size == size => Some(Want {
                        rel,
                        size,
                        token,
                        hash,
                    }),
                    Ok(_) => None,
                    // The copy meets the same error and reports it.
                    Err(e) => {
                        log::debug!("not looking for a move of '{rel}': {e}");
                        None
                    }
                }
            })
            .collect();
        self.hash_unknown(&mut gone, &wants);
        let pairs = pair(&wants, &gone);
        // A new file that found no partner keeps what was learned: its copy need not hash it.
        let paired: HashSet<usize> = pairs.iter().map(|(w, _)| *w).collect();
        let mut learned: HashMap<&RelPath, Hint> = wants
            .iter()
            .enumerate()
            .filter(|(i, _)| !paired.contains(i))
            .map(|(_, w)| (&w.rel, Hint::Known(w.token, w.hash)))
            .collect();
        if !learned.is_empty() {
            plan.rewrite(|a| {
                if let Op::Copy { hint, .. } = &mut a.op {
                    if let Some(h) = learned.remove(&a.rel) {
                        *hint = Some(Box::new(h));
                    }
                }
                true
            });
        }
        let moves: Vec<(RelPath, MoveSpec)> = pairs
            .into_iter()
            .map(|(w, g)| {
                let (w, g) = (&wants[w], &gone[g]);
                (
                    w.rel.clone(),
                    MoveSpec {
                        from: g.rel.clone(),
                        rep: g.version.clone(),
                        src: w.token,
                        hash: w.hash,
                        size: w.size,
                        in_sync: g.synced == Some(w.token),
                    },
                )
            })
            .collect();
        let (dirs, files) = whole_dirs(plan, moves);
        plan.take_dir_moves(dirs);
        plan.take_moves(files);
    }

    /// Hashes the deleted files the cache does not vouch for, but only those of a size for
    /// which a new file still lacks a partner among the vouched-for ones. A file that cannot
    /// be hashed, or changed while it was, stays unknown (never paired).
    fn hash_unknown(&self, gone: &mut [Gone], wants: &[Want]) {
        let mut supply: HashMap<(u64, Hash), usize> = HashMap::new();
        for g in gone.iter() {
            if let Some(h) = g.hash {
                *supply.entry((g.size, h)).or_default() += 1;
            }
        }
        let mut short: HashSet<u64> = HashSet::new();
        for w in wants {
            match supply.get_mut(&(w.size, w.hash)) {
                Some(n) if *n > 0 => *n -= 1,
                _ => {
                    short.insert(w.size);
                }
            }
        }
        if short.is_empty() {
            return;
        }
        gone.par_iter_mut()
            .filter(|g| g.hash.is_none() && short.contains(&g.size))
            .for_each(|g| {
                if cancel::requested() {
                    return;
                }
                match self.replica.hash(&g.rel, self.counters) {
                    Ok((Some(hash), version)) if version == g.version => g.hash = Some(hash),
                    Ok(_) => {}
                    Err(e) => log::debug!("not moving '{}': {e}", g.rel),
                }
            });
    }
}

/// Moves of single files: each new path and its move.
type Moves = Vec<(RelPath, MoveSpec)>;

/// Finds the renamed directories among the moves: a directory the plan creates whose every
/// new entry is a file moved from one directory the plan deletes, under the same name, and
/// which takes every entry of that directory. Each becomes one `DirMove` (returned with the
/// new directory's path); the other moves are returned as they were.
///
/// Only such whole, flat directories qualify: one with sub-directories, or whose files went
/// to several places or came with new ones, is moved file by file.
fn whole_dirs(plan: &Plan, moves: Moves) -> (Vec<(RelPath, DirMove)>, Moves) {
    // Moves that keep their name, by (new directory, old directory).
    let mut groups: HashMap<(RelPath, RelPath), Vec<(RelPath, MoveSpec)>> = HashMap::new();
    let mut single = Vec::new();
    for (to, m) in moves {
        match (to.parent(), m.from.parent()) {
            (Some(dn), Some(dold)) if to.file_name() == m.from.file_name() => {
                groups.entry((dn, dold)).or_default().push((to, m))
            }
            _ => single.push((to, m)),
        }
    }
    if groups.is_empty() {
        return (Vec::new(), single);
    }
    // Each directory may take part in one group only.
    let mut per_new: HashMap<RelPath, usize> = HashMap::new();
    let mut per_old: HashMap<RelPath, usize> = HashMap::new();
    for (dn, dold) in groups.keys() {
        *per_new.entry(dn.clone()).or_default() += 1;
        *per_old.entry(dold.clone()).or_default() += 1;
    }
    // What the plan does in and to those directories.
    let mut made: HashSet<RelPath> = HashSet::new();
    let mut deleted: HashMap<RelPath, u64> = HashMap::new();
    let mut below: HashMap<RelPath, usize> = HashMap::new();
    for a in plan.iter() {
        match a.op {
            Op::Mkdir if per_new.contains_key(&a.rel) => {
                made.insert(a.rel.clone());
            }
            Op::Delete {
                kind: crate::model::Kind::Dir,
                entries,
            } if per_old.contains_key(&a.rel) => {
                deleted.insert(a.rel.clone(), entries);
            }
            _ => {}
        }
        let mut up = a.rel.parent();
        while let Some(dir) = up {
            if per_new.contains_key(&dir) {
                *below.entry(dir.clone()).or_default() += 1;
            }
            up = dir.parent();
        }
    }
    let mut dirs = Vec::new();
    for ((dn, dold), files) in groups {
        let n = files.len();
        let whole = per_new[&dn] == 1
            && per_old[&dold] == 1
            && made.contains(&dn)
            && deleted.get(&dold) == Some(&(n as u64 + 1))
            && below.get(&dn) == Some(&n);
        if whole {
            dirs.push((dn, DirMove { from: dold, files }));
        } else {
            single.extend(files);
        }
    }
    (dirs, single)
}

/// Pairs new files with deleted ones of the same size and hash; returns `(want, gone)`
/// indices. Deterministic: new files are taken by path, and each takes a deleted file of its
/// own name if there is one (a moved file usually keeps its name), else the first by path.
fn pair(wants: &[Want], gone: &[Gone]) -> Vec<(usize, usize)> {
    let mut pool: HashMap<(u64, Hash), Vec<usize>> = HashMap::new();
    for (i, g) in gone.iter().enumerate() {
        if let Some(h) = g.hash {
            pool.entry((g.size, h)).or_default().push(i);
        }
    }
    for v in pool.values_mut() {
        v.sort_by(|a, b| gone[*a].rel.cmp(&gone[*b].rel));
    }
    let mut order: Vec<usize> = (0..wants.len()).collect();
    order.sort_by(|a, b| wants[*a].rel.cmp(&wants[*b].rel));
    let mut out = Vec::new();
    for w in order {
        let want = &wants[w];
        let Some(bucket) = pool.get_mut(&(want.size, want.hash)) else {
            continue;
        };
        if bucket.is_empty() {
            continue;
        }
        let name = want.rel.file_name();
        let at = bucket
            .iter()
            .position(|g| gone[*g].rel.file_name() == name)
            .unwrap_or(0);
        out.push((w, bucket.remove(at)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Version;

    fn want(rel: &str, size: u64, h: u8) -> Want {
        Want {
            rel: RelPath::from_bytes(rel.as_bytes()),
            size,
            token: Token::default(),
            hash: Hash([h; 32]),
        }
    }

    fn gone(rel: &str, size: u64, h: Option<u8>) -> Gone {
        Gone {
            rel: RelPath::from_bytes(rel.as_bytes()),
            size,
            version: Version::default(),
            hash: h.map(|h| Hash([h; 32])),
            synced: None,
        }
    }

    #[test]
    fn pairs_need_equal_size_and_hash_and_prefer_the_same_name() {
        let wants = [
            want("new/b", 10, 1),
            want("new/a", 10, 1),
            want("new/c", 10, 2),
            want("new/d", 20, 3),
        ];
        let gone = [
            gone("old/x", 10, Some(1)),
            gone("old/a", 10, Some(1)),
            gone("old/c", 11, Some(2)),
            gone("old/d", 20, None),
        ];
        let got: Vec<(&str, &str)> = pair(&wants, &gone)
            .into_iter()
            .map(|(w, g)| {
                (
                    std::str::from_utf8(wants[w].rel.as_bytes()).expect("utf-8"),
                    std::str::from_utf8(gone[g].rel.as_bytes()).expect("utf-8"),
                )
            })
            .collect();
        // new/a takes old/a (its name); new/b the other one of equal content; new/c's size
        // differs from old/c's; old/d's content is unknown.
        assert_eq!(got, [("new/a", "old/a"), ("new/b", "old/x")]);
    }
}
