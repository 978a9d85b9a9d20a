//! In-process tests of the decisions a pass makes, against the in-memory fake for both the
//! source and the replica: what is copied, what is only a metadata fix, what is drift, what a
//! racy token costs, what is deleted, what the guard refuses and what a replica's
//! capabilities suppress. No filesystem, no clock, no sleep.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::apply::{describe, Applied, Applier};
use crate::compare::Compare;
use crate::config::Excludes;
use crate::model::{HashCounters, Kind, Racy, RelPath};
use crate::plan::Guard;
use crate::replica::fake::{full_caps, rel, Fake};
use crate::replica::{Capabilities, Replica};
use crate::scan::{self, Ctx, Scanned};
use crate::source::SourceTree;
use crate::state::cache::{CachedFile, DirRecord, Recall};

/// A cache in memory, updated the way `state::cache` does after a durable pass.
#[derive(Default)]
struct Memory(Mutex<HashMap<RelPath, Vec<CachedFile>>>);

impl Recall for Memory {
    fn dir(&self, rel: &RelPath) -> Option<DirRecord> {
        let mut files = self.0.lock().expect("lock").get(rel)?.clone();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Some(DirRecord { files })
    }
}

struct Run {
    /// The plan as `WORD path` lines.
    plan: Vec<String>,
    applied: Applied,
    hashed_files: u64,
}

struct Harness {
    src: Fake,
    rep: Fake,
    memory: Memory,
    /// Which source tokens are racy.
    racy: Racy,
    guard: Guard,
    /// Look for moves (as without `--no-moves`, on a replica that can rename).
    moves: bool,
}

impl Harness {
    fn new(caps: Capabilities) -> Harness {
        Harness {
            src: Fake::new(full_caps()),
            rep: Fake::new(caps),
            memory: Memory::default(),
            racy: Racy {
                after_ns: 1_000,
                fine: None,
            },
            guard: Guard::Default,
            moves: true,
        }
    }

    fn scan(&self) -> (Scanned, u64) {
        let counters = HashCounters::default();
        let excludes = Excludes::new(Vec::new()).expect("no patterns");
        let ctx = Ctx {
            watch: None,
            scope: None,
            compare: Compare {
                source: &self.src,
                replica: &self.rep,
                caps: self.rep.capabilities(),
                counters: &counters,
                checksum: false,
                racy: self.racy,
            },
            excludes: &excludes,
            recall: &self.memory,
            one_fs_dev: None,
            hard_links: false,
            moves: self.moves && self.rep.capabilities().rename,
            spill: None,
            settled: None,
        };
        let src_root = SourceTree::root(&self.src).expect("root");
        let rep_root = Replica::root(&self.rep).expect("root");
        let mut scanned = scan::scan(&ctx, &src_root, rep_root.as_ref());
        crate::moves::Finder {
            source: &self.src,
            replica: &self.rep,
            counters: &counters,
        }
        .find(&mut scanned.plan, &Default::default());
        let hashed = counters.files.load(std::sync::atomic::Ordering::Relaxed);
        (scanned, hashed)
    }

    /// One pass: scan, guard, apply, then record in the memory cache. `None`: refused.
    fn pass(&self) -> Option<Run> {
        let (scanned, hashed_files) = self.scan();
        self.apply(scanned, hashed_files)
    }

    /// Guards and applies what `scan` found, then records it in the memory cache.
    fn apply(&self, scanned: Scanned, hashed_files: u64) -> Option<Run> {
        let plan: Vec<String> = scanned
            .plan
            .iter()
            .filter(|a| !matches!(a.op, crate::plan::Op::DirMeta { .. }))
            .map(|a| match &a.op {
                crate::plan::Op::Move(m) => format!("MOVE {} -> {}", m.from, a.rel),
                crate::plan::Op::MoveDir(d) => {
                    format!("MOVE DIR {} -> {} ({} files)", d.from, a.rel, d.files.len())
                }
                _ => format!("{} {}", describe(&a).0, a.rel),
            })
            .collect();
        if self.guard.check(&scanned.plan).is_err() {
            return None;
        }
        let applier = Applier {
            source: &self.src,
            replica: &self.rep,
            backup: None,
            bar: None,
            xattrs: self.rep.capabilities().xattrs,
        };
        let mut mem = self.memory.0.lock().expect("lock");
        for d in scanned.drafts {
            d.delta.apply(mem.entry(d.dir).or_default());
        }
        let racy = self.racy;
        let applied = applier.apply(&scanned.plan, |written, fixed| {
            for (dir, change) in crate::pass::group_by_dir(written, fixed, racy) {
                change.apply(mem.entry(dir).or_default());
            }
        });
        Some(Run {
            plan,
            applied,
            hashed_files,
        })
    }
}

fn installs(calls: &[String]) -> Vec<&String> {
    calls.iter().filter(|c| c.starts_with("install ")).collect()
}

#[test]
fn new_files_are_copied_then_an_idle_pass_reads_nothing() {
    let h = Harness::new(full_caps());
    h.src.dir("d");
    h.src.file("d/a", b"alpha", 0o644, 10);
    h.src.link("l", "d/a");
    let run = h.pass().expect("not refused");
    assert_eq!(run.plan, ["MKDIR d", "CREATE d/a", "LINK l"]);
    assert_eq!(run.applied.counts.created, 2);
    assert_eq!(h.rep.get("d/a").expect("copied").data, b"alpha");
    assert_eq!(h.rep.get("d/a").expect("copied").meta.perm, 0o644);
    h.rep.take_calls();

    let idle = h.pass().expect("not refused");
    assert!(idle.plan.is_empty(), "{:?}", idle.plan);
    assert_eq!(idle.hashed_files, 0, "the cache vouches for both sides");
    assert!(installs(&h.rep.take_calls()).is_empty());
}

#[test]
fn a_mode_or_mtime_change_is_a_metadata_fix_never_a_copy() {
    let h = Harness::new(full_caps());
    h.src.file("f", b"same", 0o644, 10);
    h.pass().expect("first pass");
    h.rep.take_calls();
    h.src.edit("f", |n| {
        n.meta.perm = 0o600;
        n.meta.mtime.sec = 20;
    });
    let run = h.pass().expect("not refused");
    assert_eq!(run.plan, ["META f"]);
    assert_eq!(run.applied.counts.meta, 1);
    let calls = h.rep.take_calls();
    assert!(installs(&calls).is_empty(), "{calls:?}");
    let f = h.rep.get("f").expect("kept");
    assert_eq!((f.meta.perm, f.meta.mtime.sec), (0o600, 20));
}

#[test]
fn a_content_change_of_the_same_size_is_copied() {
    let h = Harness::new(full_caps());
    h.src.file("f", b"one", 0o644, 10);
    h.pass().expect("first pass");
    h.src.edit("f", |n| n.data = b"two".to_vec());
    let run = h.pass().expect("not refused");
    assert_eq!(run.plan, ["UPDATE f"]);
    assert_eq!(h.rep.get("f").expect("kept").data, b"two");
}

#[test]
fn a_replica_file_changed_behind_syncer_is_drift_and_restored() {
    let h = Harness::new(full_caps());
    h.src.file("f", b"original", 0o644, 10);
    h.pass().expect("first pass");
    h.rep.edit("f", |n| n.data = b"tampered".to_vec());
    let run = h.pass().expect("not refused");
    assert_eq!(run.plan, ["DRIFT f"]);
    assert_eq!(run.applied.counts.drifted, 1);
    assert_eq!(h.rep.get("f").expect("kept").data, b"original");
}

#[test]
fn a_racy_source_token_is_hashed_again_but_not_copied() {
    let h = Harness::new(full_caps());
    h.src.file("f", b"content", 0o644, 10);
    h.src.edit("f", |n| n.ctime_ns = 5_000);
    h.pass().expect("first pass");
    h.rep.take_calls();
    let run = h.pass().expect("not refused");
    assert!(run.plan.is_empty(), "{:?}", run.plan);
    assert_eq!(run.hashed_files, 1, "a racy token is not trusted");
    assert!(installs(&h.rep.take_calls()).is_empty());
    // Once the token is no longer racy (the pass started long after), it is trusted.
    let later = Harness {
        racy: Racy {
            after_ns: 10_000,
            fine: None,
        },
        ..h
    };
    later.pass().expect("records a trusted token");
    assert_eq!(later.pass().expect("idle").hashed_files, 0);
}

#[test]
fn entries_gone_from_the_source_are_deleted() {
    let h = Harness::new(full_caps());
    h.src.dir("d");
    h.src.file("d/a", b"a", 0o644, 1);
    h.src.file("b", b"b", 0o644, 1);
    h.pass().expect("first pass");
    h.rep.file("extra", b"x", 0o644, 1);
    h.rep.dir("olddir");
    h.rep.file("olddir/x", b"x", 0o644, 1);
    let run = h.pass().expect("not refused");
    assert_eq!(run.plan, ["DELETE extra", "RMDIR olddir"]);
    assert_eq!(run.applied.counts.deleted, 3);
    assert_eq!(h.rep.paths(), ["b", "d", "d/a"]);
}

#[test]
fn the_guard_refuses_emptying_a_large_replica_and_nothing_changes() {
    let h = Harness::new(full_caps());
    for i in 0..150 {
        h.src.file(&format!("f{i:03}"), b"x", 0o644, 1);
    }
    h.pass().expect("first pass");
    for i in 0..150 {
        let path = rel(&format!("f{i:03}"));
        SourceTree::list(&h.src, &RelPath::root()).expect("list");
        Replica::remove(&h.src, &path, Kind::File).expect("remove from the source");
    }
    h.rep.take_calls();
    assert!(h.pass().is_none(), "the default guard refuses");
    assert_eq!(h.rep.paths().len(), 150);
    assert!(
        h.rep.take_calls().is_empty(),
        "a refused pass changes nothing"
    );
}

#[test]
fn what_a_replica_cannot_keep_is_never_a_difference() {
    let caps = Capabilities {
        mode: false,
        owner: false,
        mtime_ns: None,
        ..full_caps()
    };
    let h = Harness::new(caps);
    h.src.file("f", b"data", 0o751, 10);
    h.pass().expect("first pass");
    h.rep.take_calls();
    let again = h.pass().expect("not refused");
    assert!(again.plan.is_empty(), "{:?}", again.plan);
    h.src.edit("f", |n| {
        n.meta.perm = 0o600;
        n.meta.uid = 42;
        n.meta.mtime.sec = 99;
    });
    let run = h.pass().expect("not refused");
    assert!(run.plan.is_empty(), "{:?}", run.plan);
    assert!(h.rep.take_calls().is_empty());
    // The same change on a replica that keeps everything is a fix.
    let full = Harness::new(full_caps());
    full.src.file("f", b"data", 0o751, 10);
    full.pass().expect("first pass");
    full.src.edit("f", |n| n.meta.uid = 42);
    assert_eq!(full.pass().expect("not refused").plan, ["META f"]);
}

#[test]
fn coarse_mtime_precision_hides_sub_granularity_differences() {
    let caps = Capabilities {
        mtime_ns: Some(1_000_000_000),
        ..full_caps()
    };
    let h = Harness::new(caps);
    h.src.file("f", b"data", 0o644, 10);
    h.pass().expect("first pass");
    h.src.edit("f", |n| n.meta.mtime.nsec = 500);
    assert!(h.pass().expect("not refused").plan.is_empty());
    h.src.edit("f", |n| n.meta.mtime.sec = 11);
    assert_eq!(h.pass().expect("not refused").plan, ["META f"]);
}

#[test]
fn a_metadata_fix_leaves_a_replica_file_that_changed_since_the_scan() {
    let h = Harness::new(full_caps());
    h.src.file("f", b"same", 0o644, 10);
    h.pass().expect("first pass");
    h.src.edit("f", |n| n.meta.perm = 0o600);
    let (scanned, _) = h.scan();
    // Someone rewrites the replica file between the scan and the fix.
    h.rep.edit("f", |n| n.data = b"SAME".to_vec());
    let applier = Applier {
        source: &h.src,
        replica: &h.rep,
        backup: None,
        bar: None,
        xattrs: true,
    };
    let applied = applier.apply(&scanned.plan, |_, _| {});
    assert_eq!(applied.counts.skipped, 1);
    assert_eq!(applied.counts.meta, 0);
    assert_eq!(h.rep.get("f").expect("kept").meta.perm, 0o644);
}

#[test]
fn a_large_file_touched_without_a_content_change_is_copied_speculatively_then_only_fixed() {
    let h = Harness::new(full_caps());
    let big = vec![7u8; crate::source::PIPELINE_MIN as usize];
    h.src.file("big", &big, 0o644, 10);
    h.pass().expect("first pass");
    h.rep.take_calls();
    // A new source token (a touch), the same bytes: the plan copies at once, hashing as it
    // goes, and the replica keeps its file because the hash and its version still match.
    h.src.edit("big", |n| n.meta.mtime.sec = 20);
    let run = h.pass().expect("not refused");
    assert_eq!(run.plan, ["UPDATE big"]);
    assert_eq!(run.hashed_files, 0, "nothing is read twice");
    assert_eq!(run.applied.counts.meta, 1);
    assert_eq!(run.applied.counts.bytes_copied, 0);
    let calls = h.rep.take_calls();
    assert!(installs(&calls).is_empty(), "{calls:?}");
    assert_eq!(h.rep.get("big").expect("kept").meta.mtime.sec, 20);
    // A real edit of the same size is installed.
    h.src.edit("big", |n| n.data[4096] = 8);
    let run = h.pass().expect("not refused");
    assert_eq!(run.plan, ["UPDATE big"]);
    assert_eq!(run.applied.counts.updated, 1);
    assert_eq!(h.rep.get("big").expect("kept").data[4096], 8);
}

fn xattr(pairs: &[(&str, &[u8])]) -> crate::model::Xattrs {
    let mut v: Vec<(Vec<u8>, Vec<u8>)> = pairs
        .iter()
        .map(|(n, x)| (n.as_bytes().to_vec(), x.to_vec()))
        .collect();
    v.sort();
    crate::model::Xattrs(v)
}

#[test]
fn an_xattr_only_change_is_a_metadata_fix_and_an_idle_pass_reads_no_xattr() {
    let h = Harness::new(full_caps());
    h.src.dir("d");
    h.src.file("d/f", b"same", 0o644, 10);
    h.src.edit("d/f", |n| n.xattrs = xattr(&[("user.a", b"1")]));
    h.src.edit("d", |n| n.xattrs = xattr(&[("user.dir", b"x")]));
    h.pass().expect("first pass");
    assert_eq!(
        h.rep.get("d/f").expect("copied").xattrs,
        xattr(&[("user.a", b"1")])
    );
    assert_eq!(
        h.rep.get("d").expect("made").xattrs,
        xattr(&[("user.dir", b"x")])
    );
    h.rep.take_calls();
    assert!(h.pass().expect("idle").plan.is_empty());

    h.src.edit("d/f", |n| {
        n.xattrs = xattr(&[("user.a", b"2"), ("user.b", b"")])
    });
    let run = h.pass().expect("not refused");
    assert_eq!(run.plan, ["META d/f"]);
    let calls = h.rep.take_calls();
    assert!(installs(&calls).is_empty(), "{calls:?}");
    assert_eq!(
        h.rep.get("d/f").expect("kept").xattrs,
        xattr(&[("user.a", b"2"), ("user.b", b"")])
    );
    // A directory's attribute removed.
    h.src.edit("d", |n| n.xattrs = xattr(&[]));
    let run = h.pass().expect("not refused");
    assert!(
        run.plan.is_empty(),
        "directory fixes are not listed: {:?}",
        run.plan
    );
    assert_eq!(h.rep.get("d").expect("kept").xattrs, xattr(&[]));
}

#[test]
fn a_replica_without_xattrs_never_shows_an_xattr_difference() {
    let caps = Capabilities {
        xattrs: false,
        ..full_caps()
    };
    let h = Harness::new(caps);
    h.src.file("f", b"data", 0o644, 10);
    h.src.edit("f", |n| n.xattrs = xattr(&[("user.a", b"1")]));
    h.pass().expect("first pass");
    h.src.edit("f", |n| n.xattrs = xattr(&[("user.a", b"2")]));
    assert!(h.pass().expect("not refused").plan.is_empty());
    assert!(h.pass().expect("idle").plan.is_empty());
}

/// Moves `from` to `to` in the fake source, as `mv` would (the node keeps its content,
/// metadata and attributes; a directory takes everything below it).
fn move_in_source(h: &Harness, from: &str, to: &str) {
    let below: Vec<String> = h
        .src
        .paths()
        .into_iter()
        .filter(|p| p == from || p.starts_with(&format!("{from}/")))
        .collect();
    for p in &below {
        let n = h.src.get(p).expect("listed");
        let dest = format!("{to}{}", &p[from.len()..]);
        match n.meta.kind {
            Kind::Dir => h.src.dir(&dest),
            _ => h.src.file(&dest, &n.data, n.meta.perm, n.meta.mtime.sec),
        }
    }
    Replica::remove(&h.src, &rel(from), Kind::Dir).expect("remove from the source");
}

fn renames(calls: &[String]) -> Vec<&String> {
    calls.iter().filter(|c| c.starts_with("rename ")).collect()
}

#[test]
fn a_renamed_directory_that_gained_a_file_becomes_renames_and_the_next_pass_reads_nothing() {
    let h = Harness::new(full_caps());
    h.src.dir("d");
    h.src.file("d/a", b"alpha", 0o644, 10);
    h.src.file("d/b", b"bravo", 0o644, 10);
    h.src.file("keep", b"keep", 0o644, 10);
    h.pass().expect("first pass");
    h.rep.take_calls();
    move_in_source(&h, "d", "e");
    // A move may come with a new mode: the renamed file gets the source's metadata.
    h.src.edit("e/b", |n| n.meta.perm = 0o600);
    // A new file in it: the directory is not renamed whole, its files are.
    h.src.file("e/c", b"charlie", 0o644, 10);
    let run = h.pass().expect("a move deletes nothing the guard counts");
    assert_eq!(
        run.plan,
        [
            "RMDIR d",
            "MKDIR e",
            "MOVE d/a -> e/a",
            "MOVE d/b -> e/b",
            "CREATE e/c"
        ]
    );
    let c = run.applied.counts;
    assert_eq!((c.moved, c.created, c.bytes_copied), (2, 1, 7));
    assert_eq!(c.deleted, 1, "only the emptied directory is deleted");
    assert_eq!(
        run.hashed_files, 2,
        "the new files of a size some deleted file has, not the cached replica ones"
    );
    let calls = h.rep.take_calls();
    assert_eq!(installs(&calls).len(), 1, "{calls:?}");
    // The two renames run in parallel: which comes first is the thread pool's choice, not
    // part of the contract. What the plan requires is the set of renames...
    let mut moved = renames(&calls);
    moved.sort();
    assert_eq!(moved, ["rename d/a", "rename d/b"], "{calls:?}");
    // ...and the order around them: the new directory before either rename, both renames
    // before the old directory's removal.
    let at = |c: &str| calls.iter().position(|x| x == c).expect(c);
    for r in ["rename d/a", "rename d/b"] {
        assert!(at("mkdir e") < at(r), "{calls:?}");
        assert!(at(r) < at("remove d"), "{calls:?}");
    }
    assert_eq!(h.rep.paths(), ["e", "e/a", "e/b", "e/c", "keep"]);
    assert_eq!(h.rep.get("e/b").expect("moved").meta.perm, 0o600);
    assert_eq!(h.rep.get("e/a").expect("moved").data, b"alpha");
    let idle = h.pass().expect("idle");
    assert!(idle.plan.is_empty(), "{:?}", idle.plan);
    assert_eq!(
        idle.hashed_files, 0,
        "the cache knows the moved files by their new names"
    );
}

/// Mirrored: `p/d/a`, `p/d/b` (0644) and an empty `q`.
fn mirrored_p_d() -> Harness {
    let h = Harness::new(full_caps());
    h.src.dir("p");
    h.src.dir("p/d");
    h.src.file("p/d/a", b"alpha", 0o644, 10);
    h.src.file("p/d/b", b"bravo", 0o644, 10);
    h.src.dir("q");
    h.pass().expect("first pass");
    h
}

#[test]
fn a_renamed_directory_is_one_rename_and_the_next_pass_reads_nothing() {
    let h = mirrored_p_d();
    h.rep.take_calls();
    move_in_source(&h, "p/d", "q/e");
    h.src.edit("q/e/b", |n| n.meta.perm = 0o600);
    let run = h.pass().expect("a move deletes nothing the guard counts");
    assert_eq!(run.plan, ["MOVE DIR p/d -> q/e (2 files)"]);
    let c = run.applied.counts;
    assert_eq!(
        (c.moved, c.created, c.deleted, c.bytes_copied),
        (2, 0, 0, 0)
    );
    let calls = h.rep.take_calls();
    assert!(installs(&calls).is_empty(), "{calls:?}");
    assert_eq!(renames(&calls), ["rename p/d"]);
    assert_eq!(h.rep.paths(), ["p", "q", "q/e", "q/e/a", "q/e/b"]);
    assert_eq!(h.rep.get("q/e/b").expect("moved").meta.perm, 0o600);
    assert_eq!(h.rep.get("q/e/a").expect("moved").data, b"alpha");
    let idle = h.pass().expect("idle");
    assert!(idle.plan.is_empty(), "{:?}", idle.plan);
    assert_eq!(
        idle.hashed_files, 0,
        "the cache knows the files by their new path"
    );
}

#[test]
fn a_directory_move_whose_replica_file_changed_meanwhile_moves_file_by_file() {
    let h = Harness::new(full_caps());
    h.src.dir("d");
    h.src.file("d/a", b"alpha", 0o644, 10);
    h.src.file("d/b", b"bravo", 0o644, 10);
    h.pass().expect("first pass");
    move_in_source(&h, "d", "e");
    let (scanned, hashed) = h.scan();
    // After the scan paired them, someone rewrites a replica file.
    h.rep.file("d/a", b"ALPHA", 0o644, 10);
    h.rep.take_calls();
    let run = h.apply(scanned, hashed).expect("not refused");
    assert_eq!(run.plan, ["MOVE DIR d -> e (2 files)"]);
    let calls = h.rep.take_calls();
    assert_eq!(
        renames(&calls),
        ["rename d/b"],
        "only the file that is unchanged"
    );
    assert_eq!(installs(&calls).len(), 1, "the other is copied: {calls:?}");
    assert_eq!(h.rep.paths(), ["e", "e/a", "e/b"]);
    assert_eq!(h.rep.get("e/a").expect("copied").data, b"alpha");
}

#[test]
fn size_alone_never_pairs_two_files() {
    let h = Harness::new(full_caps());
    h.src.file("old", b"12345", 0o644, 10);
    h.pass().expect("first pass");
    Replica::remove(&h.src, &rel("old"), Kind::File).expect("remove");
    h.src.file("new", b"54321", 0o644, 10);
    let run = h.pass().expect("not refused");
    assert_eq!(run.plan, ["CREATE new", "DELETE old"]);
    assert!(renames(&h.rep.take_calls()).is_empty());
    assert_eq!(h.rep.get("new").expect("copied").data, b"54321");
}

#[test]
fn a_move_whose_replica_file_changed_after_the_scan_is_a_copy_and_a_delete() {
    let h = Harness::new(full_caps());
    h.src.file("a", b"alpha", 0o644, 10);
    h.pass().expect("first pass");
    h.rep.take_calls();
    move_in_source(&h, "a", "b");
    let (scanned, hashed) = h.scan();
    // Someone rewrites the replica file between the scan and the move.
    h.rep.edit("a", |n| n.data = b"ALPHA".to_vec());
    let run = h.apply(scanned, hashed).expect("not refused");
    assert_eq!(run.plan, ["MOVE a -> b"]);
    let c = run.applied.counts;
    assert_eq!((c.moved, c.created, c.deleted), (0, 1, 1));
    let calls = h.rep.take_calls();
    assert!(renames(&calls).is_empty(), "{calls:?}");
    assert_eq!(h.rep.paths(), ["b"]);
    assert_eq!(h.rep.get("b").expect("copied").data, b"alpha");
}

#[test]
fn a_replica_that_cannot_rename_copies_and_deletes() {
    let caps = Capabilities {
        rename: false,
        ..full_caps()
    };
    let h = Harness::new(caps);
    h.src.file("a", b"alpha", 0o644, 10);
    h.pass().expect("first pass");
    move_in_source(&h, "a", "b");
    let run = h.pass().expect("not refused");
    assert_eq!(run.plan, ["DELETE a", "CREATE b"]);
    assert_eq!(run.hashed_files, 0, "nothing is hashed to look for moves");
}

#[test]
fn the_guard_counts_a_move_as_neither_a_deletion_nor_a_creation() {
    let mut h = Harness::new(full_caps());
    h.src.dir("d");
    for i in 0..20 {
        h.src
            .file(&format!("d/f{i:02}"), format!("{i}").as_bytes(), 0o644, 1);
    }
    h.pass().expect("first pass");
    move_in_source(&h, "d", "e");
    h.guard = Guard::Count(1);
    // A new file keeps the directory from being renamed whole: its files are moved.
    h.src.file("e/new", b"new", 0o644, 1);
    let (scanned, _) = h.scan();
    assert_eq!((scanned.plan.deletes, scanned.plan.creates), (1, 2));
    h.moves = false;
    assert!(h.pass().is_none(), "without moves, 21 deletions exceed 1");
    h.moves = true;
    let run = h.pass().expect("one deletion: the emptied directory");
    assert_eq!(run.applied.counts.moved, 20);
}

#[test]
fn a_renamed_directory_still_gets_a_mode_its_file_lacks_though_the_cache_knows_the_file() {
    let h = mirrored_p_d();
    // A chmod whose fix never ran (it failed, or the pass was cut off), while the scan's
    // cache entry for the file, at its new source token, was written.
    h.src.edit("p/d/b", |n| n.meta.perm = 0o600);
    let (mut scanned, hashed) = h.scan();
    assert!(
        scanned
            .plan
            .iter()
            .any(|a| matches!(a.op, crate::plan::Op::Meta { .. })),
        "a metadata fix is planned"
    );
    scanned.plan = crate::plan::Plan::default();
    h.apply(scanned, hashed).expect("the cache drafts only");
    assert_eq!(h.rep.get("p/d/b").expect("kept").meta.perm, 0o644);
    // The directory renamed in the source: its files keep their tokens.
    Replica::rename(&h.src, &rel("p/d"), &rel("q/e")).expect("rename in the source");
    let run = h.pass().expect("a move deletes nothing the guard counts");
    assert_eq!(run.plan, ["MOVE DIR p/d -> q/e (2 files)"]);
    assert_eq!(h.rep.get("q/e/b").expect("moved").meta.perm, 0o600);
    assert_eq!(h.rep.get("q/e/a").expect("moved").meta.perm, 0o644);
}
