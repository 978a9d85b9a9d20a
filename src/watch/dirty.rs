//! The event → dirty-set step of watch mode, a pure function (issue 13). Events never
//! replay a change: they only say where to look. *Shallow* means list this directory pair
//! again; *deep* means walk its whole subtree. A partial pass runs the normal pipeline over
//! the dirty pairs, so whatever happened in between (a file written twice, created and
//! deleted, renamed back) is judged by what is there at pass time.

use std::collections::BTreeMap;
use std::ffi::OsString;

use crate::model::RelPath;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Depth {
    Shallow,
    Deep,
}

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

/// Where the next partial pass must look.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtySet {
    /// Everything: the next pass is a full one.
    pub all: bool,
    pub dirs: BTreeMap<RelPath, Depth>,
}

/// How a scan treats one directory in a partial pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Nothing below it is dirty: left alone.
    Skip,
    /// An ancestor of something dirty, or dirty itself: listed, and its subdirectories are
    /// entered only as far as they are in scope.
    List,
    /// Inside a deep subtree (or a full pass): walked whole.
    All,
}

impl DirtySet {
    pub fn is_empty(&self) -> bool {
        !self.all && self.dirs.is_empty()
    }

    /// Marks `dir`: a deep mark absorbs the marks below it, and nothing is added below a
    /// deep mark.
    pub fn mark(&mut self, dir: RelPath, depth: Depth) {
        if self.all {
            return;
        }
        let covered = self
            .dirs
            .iter()
            .any(|(d, k)| *k == Depth::Deep && dir.as_path().starts_with(d.as_path()) && *d != dir);
        if covered {
            return;
        }
        if depth == Depth::Deep {
            self.dirs
                .retain(|d, _| !(d.as_path().starts_with(dir.as_path()) && *d != dir));
        }
        let e = self.dirs.entry(dir).or_insert(depth);
        *e = (*e).max(depth);
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

    /// How a partial pass treats `dir`.
    pub fn scope(&self, dir: &RelPath) -> Scope {
        if self.all {
            return Scope::All;
        }
        let mut listed = false;
        for (d, depth) in &self.dirs {
            if dir.as_path().starts_with(d.as_path()) {
                if *depth == Depth::Deep {
                    return Scope::All;
                }
                if d == dir {
                    listed = true;
                }
            } else if d.as_path().starts_with(dir.as_path()) {
                listed = true;
            }
        }
        if listed {
            Scope::List
        } else {
            Scope::Skip
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
            set.mark(dir.clone(), Depth::Shallow);
            // A directory that appears may hold entries made before its watch was added:
            // it is walked whole.
            if *is_dir && matches!(what, What::Created | What::MovedIn) {
                set.mark(dir.join(name), Depth::Deep);
            }
        }
        Event::Itself { dir, what } => match dir.parent() {
            // The root itself moved or went away: only a full pass can tell.
            None if matches!(what, What::Deleted | What::MovedOut) => set.everything(),
            None => set.mark(RelPath::root(), Depth::Shallow),
            Some(parent) => {
                set.mark(parent, Depth::Shallow);
                if *what == What::Attrib {
                    set.mark(dir.clone(), Depth::Shallow);
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

    fn dirs(set: &DirtySet) -> Vec<(String, Depth)> {
        set.dirs
            .iter()
            .map(|(d, k)| (d.as_path().display().to_string(), *k))
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
        assert_eq!(set.scope(&rel("a/b/c")), Scope::All);
        assert_eq!(set.scope(&rel("")), Scope::List);
        assert_eq!(set.scope(&rel("z")), Scope::Skip);
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
        // Ancestors are listed to reach it; siblings are skipped.
        assert_eq!(set.scope(&rel("")), Scope::List);
        assert_eq!(set.scope(&rel("d")), Scope::List);
        assert_eq!(set.scope(&rel("d/e")), Scope::List);
        assert_eq!(set.scope(&rel("d/e/sub")), Scope::Skip);
        assert_eq!(set.scope(&rel("d/x")), Scope::Skip);
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
        assert_eq!(set.scope(&rel("anything")), Scope::All);
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
}
