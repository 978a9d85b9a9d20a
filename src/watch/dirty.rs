//! The event → dirty-set step of watch mode, a pure function (issue 13). Events never
//! replay a change: they only say where to look. *Shallow* means list this directory pair
//! again and look at the entries the events named; *deep* means walk its whole subtree. A
//! partial pass runs the normal pipeline over the dirty pairs, so whatever happened in
//! between (a file written twice, created and deleted, renamed back) is judged by what is
//! there at pass time.
//!
//! In a shallow directory only the named entries are read (`lstat`, compare), without
//! listing it: every other entry is known unchanged since the pass that last looked at it,
//! because inotify reports every change made through the tree to the directory that holds
//! the name. (A directory one side lacks, or that holds a file with several names, is still
//! listed whole: see `scan::list_pair`.) So a partial pass costs what changed, not the size
//! of the directories it touched (one new mail in a 100,000-file maildir is one entry read,
//! not 200,000). What inotify does not report (a write through a hard link from outside the
//! tree, through mmap, by another host) is what the full pass is for.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::model::RelPath;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Depth {
    Shallow,
    Deep,
}

/// More names than this in one directory and the directory is read whole: its listing is
/// then about as cheap as the names, and a burst of creations cannot grow the set without
/// bound.
pub const MAX_NAMES: usize = 1024;

/// One inotify event, its directory resolved to a path relative to the source root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An entry named `name` in `dir` was created, deleted, moved in or out, modified,
    /// closed after writing, or had its attributes changed.
    Entry {
        dir: RelPath,
        name: OsString,
        is_dir: bool,
        what: What,
    },
    /// The watched directory itself changed attributes, was deleted or moved.
    Itself { dir: RelPath, what: What },
    /// The queue overflowed, the filesystem was unmounted, or the watcher failed: anything
    /// may have changed.
    Lost,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    Created,
    Deleted,
    MovedIn,
    MovedOut,
    Modified,
    Closed,
    Attrib,
}

/// One dirty directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub depth: Depth,
    /// Shallow: the entries to read, `None` for every entry.
    pub names: Option<BTreeSet<OsString>>,
}

/// Where the next partial pass must look.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtySet {
    /// Everything: the next pass is a full one.
    pub all: bool,
    pub dirs: BTreeMap<RelPath, Mark>,
}

/// How a scan treats one directory in a partial pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Nothing below it is dirty: left alone.
    Skip,
    /// Dirty itself, or an ancestor of something dirty: listed, and only the entries it
    /// `wants` are read (the others are as the cache knows them).
    List(Listed<'a>),
    /// Inside a deep subtree (or a full pass): walked whole.
    All,
}

/// What a listed directory of a partial pass reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed<'a> {
    /// Every entry (the directory was marked with too many names, or without any).
    every: bool,
    /// The entries events named in it.
    names: Option<&'a BTreeSet<OsString>>,
    /// Its sub-directories that lead to something dirty.
    subdirs: &'a BTreeSet<&'a OsStr>,
}

impl Listed<'_> {
    pub fn every(&self) -> bool {
        self.every
    }

    /// Whether the entry `name` must be read (the scan reads `names()`; the tests ask this).
    #[cfg(test)]
    pub fn wants(&self, name: &OsStr) -> bool {
        self.every || self.names.is_some_and(|n| n.contains(name)) || self.subdirs.contains(name)
    }

    /// The entries to read (unless `every`), sorted by name bytes.
    pub fn names(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = self.names.into_iter().flatten().cloned().collect();
        out.extend(self.subdirs.iter().map(|n| n.to_os_string()));
        out.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        out.dedup();
        out
    }
}

impl DirtySet {
    pub fn is_empty(&self) -> bool {
        !self.all && self.dirs.is_empty()
    }

    /// Marks `dir`: a deep mark absorbs the marks below it, and nothing is added below a
    /// deep mark. A shallow mark adds `name` to the entries to read (`None`: none, only
    /// the directory itself).
    pub fn mark(&mut self, dir: RelPath, depth: Depth, name: Option<&OsStr>) {
        if self.all || self.deep_above(&dir, false) {
            return;
        }
        if depth == Depth::Deep {
            self.dirs
                .retain(|d, _| !(d.as_path().starts_with(dir.as_path()) && *d != dir));
        }
        let m = self.dirs.entry(dir).or_insert(Mark {
            depth,
            names: Some(BTreeSet::new()),
        });
        m.depth = m.depth.max(depth);
        if let (Depth::Shallow, Some(names), Some(name)) = (m.depth, &mut m.names, name) {
            names.insert(name.to_os_string());
            if names.len() > MAX_NAMES {
                m.names = None;
            }
        }
    }

    /// Whether a strict ancestor of `dir` (or `dir` itself, with `inclusive`) is deep.
    fn deep_above(&self, dir: &RelPath, inclusive: bool) -> bool {
        dir.as_path()
            .ancestors()
            .skip(usize::from(!inclusive))
            .any(|d| self.dirs.get(d).is_some_and(|m| m.depth == Depth::Deep))
    }

    pub fn everything(&mut self) {
        self.all = true;
        self.dirs.clear();
    }

    /// Takes the set, leaving it empty (done before a pass lists anything, so a change
    /// made during the pass lands in the next one).
    pub fn take(&mut self) -> DirtySet {
        std::mem::take(self)
    }

    /// The index a partial pass asks how to treat each directory, built once when the
    /// pass starts (the set does not change during a pass).
    pub fn scopes(&self) -> Scopes<'_> {
        let mut nodes: HashMap<&Path, Node<'_>> = HashMap::new();
        let mut deep = HashSet::new();
        for (dir, mark) in &self.dirs {
            if mark.depth == Depth::Deep {
                deep.insert(dir.as_path());
            }
            nodes.entry(dir.as_path()).or_default().own = Some(mark);
            // Link it to the root: each ancestor leads to it through one sub-directory. An
            // ancestor already in the index is already linked.
            let mut child = dir.as_path();
            while let (Some(parent), Some(name)) = (child.parent(), child.file_name()) {
                let known = nodes.contains_key(parent);
                nodes.entry(parent).or_default().subdirs.insert(name);
                if known {
                    break;
                }
                child = parent;
            }
        }
        Scopes {
            all: self.all,
            nodes,
            deep,
        }
    }
}

/// What the index knows of one directory.
#[derive(Debug, Default)]
struct Node<'a> {
    /// Its own mark, if it is dirty itself.
    own: Option<&'a Mark>,
    /// Its sub-directories that lead to something dirty.
    subdirs: BTreeSet<&'a OsStr>,
}

/// How a partial pass treats each directory (see `DirtySet::scopes`): one hash lookup per
/// directory, and one per ancestor only when some mark is deep.
#[derive(Debug)]
pub struct Scopes<'a> {
    all: bool,
    nodes: HashMap<&'a Path, Node<'a>>,
    deep: HashSet<&'a Path>,
}

impl Scopes<'_> {
    /// How a partial pass treats `dir`.
    pub fn scope(&self, dir: &RelPath) -> Scope<'_> {
        if self.all
            || (!self.deep.is_empty() && dir.as_path().ancestors().any(|d| self.deep.contains(d)))
        {
            return Scope::All;
        }
        match self.nodes.get(dir.as_path()) {
            None => Scope::Skip,
            Some(n) => Scope::List(Listed {
                every: n.own.is_some_and(|m| m.names.is_none()),
                names: n.own.and_then(|m| m.names.as_ref()),
                subdirs: &n.subdirs,
            }),
        }
    }
}

/// Folds one event into the set.
pub fn reduce(set: &mut DirtySet, ev: &Event) {
    match ev {
        Event::Lost => set.everything(),
        Event::Entry {
            dir,
            name,
            is_dir,
            what,
        } => {
            set.mark(dir.clone(), Depth::Shallow, Some(name));
            // A directory that appears may hold entries made before its watch was added:
            // it is walked whole.
            if *is_dir && matches!(what, What::Created | What::MovedIn) {
                set.mark(dir.join(name), Depth::Deep, None);
            }
        }
        Event::Itself { dir, what } => match dir.parent() {
            // The root itself moved or went away: only a full pass can tell.
            None if matches!(what, What::Deleted | What::MovedOut) => set.everything(),
            None => set.mark(RelPath::root(), Depth::Shallow, None),
            Some(parent) => {
                set.mark(parent, Depth::Shallow, dir.as_path().file_name());
                if *what == What::Attrib {
                    set.mark(dir.clone(), Depth::Shallow, None);
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes())
    }

    fn entry(dir: &str, name: &str, is_dir: bool, what: What) -> Event {
        Event::Entry {
            dir: rel(dir),
            name: name.into(),
            is_dir,
            what,
        }
    }

    fn run(events: &[Event]) -> DirtySet {
        let mut set = DirtySet::default();
        for e in events {
            reduce(&mut set, e);
        }
        set
    }

    /// Which of `names` a partial pass reads in `dir` (`None`: the directory is skipped
    /// or walked whole).
    fn wanted<'a>(set: &DirtySet, dir: &str, names: &[&'a str]) -> Option<Vec<&'a str>> {
        match set.scopes().scope(&rel(dir)) {
            Scope::List(l) => Some(
                names
                    .iter()
                    .copied()
                    .filter(|n| l.wants(OsStr::new(n)))
                    .collect(),
            ),
            _ => None,
        }
    }

    fn dirs(set: &DirtySet) -> Vec<(String, Depth)> {
        set.dirs
            .iter()
            .map(|(d, m)| (d.as_path().display().to_string(), m.depth))
            .collect()
    }

    #[test]
    fn a_new_directory_is_walked_whole_and_absorbs_what_happens_below_it() {
        // mkdir -p a/b/c && echo x > a/b/c/f: only `a` may be reported before its watch.
        let set = run(&[
            entry("", "a", true, What::Created),
            entry("a", "b", true, What::Created),
            entry("a/b/c", "f", false, What::Closed),
        ]);
        assert_eq!(
            dirs(&set),
            vec![("".into(), Depth::Shallow), ("a".into(), Depth::Deep)]
        );
        assert_eq!(set.scopes().scope(&rel("a/b/c")), Scope::All);
        assert_eq!(wanted(&set, "", &["a", "b", "z"]), Some(vec!["a"]));
        assert_eq!(set.scopes().scope(&rel("z")), Scope::Skip);
    }

    #[test]
    fn file_events_mark_their_directory_shallow_once() {
        let set = run(&[
            entry("d/e", "f", false, What::Modified),
            entry("d/e", "f", false, What::Modified),
            entry("d/e", "f", false, What::Closed),
            entry("d/e", "g", false, What::Deleted),
        ]);
        assert_eq!(dirs(&set), vec![("d/e".into(), Depth::Shallow)]);
        // Ancestors are listed to reach it, and read only the way down; in the directory,
        // only the named entries are read; siblings are skipped.
        assert_eq!(wanted(&set, "", &["a", "d", "e"]), Some(vec!["d"]));
        assert_eq!(wanted(&set, "d", &["d", "e", "f"]), Some(vec!["e"]));
        assert_eq!(
            wanted(&set, "d/e", &["e", "f", "g", "h", "sub"]),
            Some(vec!["f", "g"])
        );
        assert_eq!(set.scopes().scope(&rel("d/e/sub")), Scope::Skip);
        match set.scopes().scope(&rel("d")) {
            Scope::List(l) => assert_eq!(l.names(), vec![OsString::from("e")]),
            s => panic!("{s:?}"),
        }
        match set.scopes().scope(&rel("d/e")) {
            Scope::List(l) => assert_eq!(l.names(), vec![OsString::from("f"), "g".into()]),
            s => panic!("{s:?}"),
        }
        assert_eq!(set.scopes().scope(&rel("d/x")), Scope::Skip);
    }

    #[test]
    fn a_directory_moved_out_and_one_moved_in() {
        let set = run(&[
            entry("src", "old", true, What::MovedOut),
            entry("dst", "new", true, What::MovedIn),
        ]);
        assert_eq!(
            dirs(&set),
            vec![
                ("dst".into(), Depth::Shallow),
                ("dst/new".into(), Depth::Deep),
                ("src".into(), Depth::Shallow),
            ]
        );
    }

    #[test]
    fn a_deep_mark_replaces_the_marks_below_it() {
        let set = run(&[
            entry("a/b", "f", false, What::Closed),
            entry("a/b/c", "g", false, What::Closed),
            entry("", "a", true, What::MovedIn),
        ]);
        assert_eq!(
            dirs(&set),
            vec![("".into(), Depth::Shallow), ("a".into(), Depth::Deep)]
        );
    }

    #[test]
    fn overflow_and_the_root_going_away_mean_a_full_pass() {
        let mut set = run(&[entry("a", "f", false, What::Closed), Event::Lost]);
        assert!(set.all && set.dirs.is_empty());
        assert_eq!(set.scopes().scope(&rel("anything")), Scope::All);
        let taken = set.take();
        assert!(taken.all && set.is_empty());
        let set = run(&[Event::Itself {
            dir: rel(""),
            what: What::MovedOut,
        }]);
        assert!(set.all);
    }

    #[test]
    fn a_directory_deleted_or_renamed_marks_its_parent() {
        let set = run(&[
            Event::Itself {
                dir: rel("a/b"),
                what: What::Deleted,
            },
            Event::Itself {
                dir: rel("x/y"),
                what: What::Attrib,
            },
        ]);
        assert_eq!(
            dirs(&set),
            vec![
                ("a".into(), Depth::Shallow),
                ("x".into(), Depth::Shallow),
                ("x/y".into(), Depth::Shallow),
            ]
        );
    }

    #[test]
    fn too_many_names_in_one_directory_mean_every_entry_is_read() {
        let names: Vec<String> = (0..=MAX_NAMES).map(|i| format!("f{i}")).collect();
        let mut set = DirtySet::default();
        for n in &names[..MAX_NAMES] {
            reduce(&mut set, &entry("d", n, false, What::Closed));
        }
        match set.scopes().scope(&rel("d")) {
            Scope::List(l) => assert!(!l.every() && !l.wants(OsStr::new("other"))),
            s => panic!("{s:?}"),
        }
        reduce(
            &mut set,
            &entry("d", &names[MAX_NAMES], false, What::Closed),
        );
        match set.scopes().scope(&rel("d")) {
            Scope::List(l) => assert!(l.every() && l.wants(OsStr::new("other"))),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn a_directory_whose_attributes_changed_is_read_in_its_parent_and_listed() {
        let set = run(&[Event::Itself {
            dir: rel("x/y"),
            what: What::Attrib,
        }]);
        assert_eq!(wanted(&set, "x", &["a", "y", "z"]), Some(vec!["y"]));
        // Listed (its own attributes are compared), but none of its entries is read.
        assert_eq!(wanted(&set, "x/y", &["a", "b"]), Some(vec![]));
        assert_eq!(set.scopes().scope(&rel("x/y/z")), Scope::Skip);
    }

    #[test]
    fn a_mark_under_a_deep_one_changes_nothing() {
        let set = run(&[
            entry("", "a", true, What::Created),
            entry("a/b", "f", false, What::Closed),
        ]);
        assert_eq!(
            dirs(&set),
            vec![("".into(), Depth::Shallow), ("a".into(), Depth::Deep)]
        );
        assert_eq!(set.scopes().scope(&rel("a/b")), Scope::All);
        // A sibling whose name starts like it is not below it.
        assert_eq!(set.scopes().scope(&rel("a-b")), Scope::Skip);
    }

    #[test]
    fn a_directory_reads_each_dirty_subdirectory_once_whatever_lies_below_it() {
        let mut set = DirtySet::default();
        // Names that sort around `a` byte by byte (' ' and '-' before '/', 'b' after it):
        // path order still keeps `a`'s subtree together, and each one is found.
        for d in ["p/a/x/y", "p/a/z", "p/a b", "p/a-1/q", "p/ab", "p/b", "q"] {
            set.mark(rel(d), Depth::Shallow, Some(OsStr::new("f")));
        }
        set.mark(rel("p"), Depth::Shallow, Some(OsStr::new("g")));
        match set.scopes().scope(&rel("p")) {
            Scope::List(l) => assert_eq!(
                l.names(),
                ["a", "a b", "a-1", "ab", "b", "g"]
                    .map(OsString::from)
                    .to_vec()
            ),
            s => panic!("{s:?}"),
        }
        match set.scopes().scope(&rel("")) {
            Scope::List(l) => assert_eq!(l.names(), ["p", "q"].map(OsString::from).to_vec()),
            s => panic!("{s:?}"),
        }
        match set.scopes().scope(&rel("p/a")) {
            Scope::List(l) => assert_eq!(l.names(), ["x", "z"].map(OsString::from).to_vec()),
            s => panic!("{s:?}"),
        }
        assert_eq!(set.scopes().scope(&rel("p/a/x/y/deeper")), Scope::Skip);
    }
}
