//! Watch mode (`syncer start --watch`, issue 13): inotify on the source marks directories
//! dirty, and the daemon runs partial passes over them. See `../shared/notes/watching.md`
//! for the rules followed here: watch, then list; a new directory is walked whole; the dirty
//! set is taken before a pass lists anything; overflow means a full pass; running out of
//! watches degrades, never exits; watches are keyed by descriptor, not by path.

pub mod dirty;

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::model::RelPath;
use dirty::{DirtySet, Event, What};

/// A file modified without a close yet waits this long without a modify...
pub const HOT_QUIET: Duration = Duration::from_secs(5);
/// ... but never longer than this in all.
pub const HOT_CAP: Duration = Duration::from_secs(30);

struct Node {
    parent: Option<WatchDescriptor>,
    name: OsString,
}

#[derive(Default)]
struct Tree {
    nodes: HashMap<WatchDescriptor, Node>,
    /// The descriptor of each path as last watched (only to find a parent's descriptor when
    /// a child is added; events resolve paths through `nodes`, which follow renames).
    by_path: HashMap<RelPath, WatchDescriptor>,
    /// Subtrees left unwatched because the watch limit was reached.
    degraded: BTreeSet<RelPath>,
}

impl Tree {
    fn path_of(&self, wd: WatchDescriptor) -> Option<RelPath> {
        let mut names: Vec<OsString> = Vec::new();
        let mut at = wd;
        for _ in 0..4096 {
            let node = self.nodes.get(&at)?;
            match node.parent {
                None => {
                    let mut rel = RelPath::root();
                    for n in names.iter().rev() {
                        rel = rel.join(n.as_os_str());
                    }
                    return Some(rel);
                }
                Some(p) => {
                    names.push(node.name.clone());
                    at = p;
                }
            }
        }
        None
    }
}

/// What the daemon shows in `status`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct WatchState {
    pub watched_dirs: u64,
    pub events: u64,
    pub partial_passes: u64,
    pub overflows: u64,
    /// Subtrees not watched (the watch limit was reached); the full pass covers them.
    pub degraded: Vec<String>,
}

/// Dirty directories and files still being written.
#[derive(Default)]
pub struct Pending {
    pub dirty: DirtySet,
    /// Files modified and not yet closed: (first, last) modify.
    hot: HashMap<RelPath, (Instant, Instant)>,
    /// First and last event of the current batch.
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

impl Pending {
    /// When a partial pass may start (`None`: nothing to do): 100 ms after the last event,
    /// at most 1 s after the first, and not while a file is still being written (until its
    /// close, 5 s without a modify, or 30 s).
    pub fn due(&self) -> Option<Instant> {
        if self.dirty.is_empty() {
            return None;
        }
        let (first, last) = (self.first?, self.last?);
        let mut at = (last + Duration::from_millis(100)).min(first + Duration::from_secs(1));
        for (start, recent) in self.hot.values() {
            at = at.max((*recent + HOT_QUIET).min(*start + HOT_CAP));
        }
        Some(at)
    }
}

pub struct Watcher {
    ino: Inotify,
    root: PathBuf,
    tree: Mutex<Tree>,
    pub pending: Mutex<Pending>,
    events: AtomicU64,
    overflows: AtomicU64,
    /// Written (one byte) whenever something becomes dirty: the daemon polls it.
    wake_tx: OwnedFd,
    pub wake_rx: OwnedFd,
    /// Test hook (`SYNCER_TEST_WATCH_CAP`): at most this many watches, as if the limit were
    /// reached.
    cap: Option<usize>,
}

fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
        | AddWatchFlags::IN_DONT_FOLLOW
}

impl Watcher {
    /// An inotify instance on `root` (nothing is watched until `watch` is called) and its
    /// reader thread.
    pub fn start(root: &Path) -> std::io::Result<Arc<Watcher>> {
        let ino = Inotify::init(InitFlags::IN_CLOEXEC)?;
        let (wake_rx, wake_tx) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )?;
        let w = Arc::new(Watcher {
            ino,
            root: root.to_path_buf(),
            tree: Mutex::new(Tree::default()),
            pending: Mutex::new(Pending::default()),
            events: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
            wake_tx,
            wake_rx,
            cap: std::env::var("SYNCER_TEST_WATCH_CAP")
                .ok()
                .and_then(|v| v.parse().ok()),
        });
        let reader = w.clone();
        std::thread::Builder::new()
            .name("inotify".into())
            .spawn(move || reader.read_loop())?;
        Ok(w)
    }

    /// Adds a watch on the source directory `rel` (called before it is listed).
    pub fn watch(&self, rel: &RelPath) {
        let mut tree = self.tree.lock().expect("tree");
        let full = self
            .cap
            .is_some_and(|c| tree.nodes.len() >= c && !tree.by_path.contains_key(rel));
        let added = if full {
            Err(nix::errno::Errno::ENOSPC)
        } else {
            self.ino.add_watch(&self.root.join(rel.as_path()), mask())
        };
        match added {
            Ok(wd) => {
                let parent = rel.parent().and_then(|p| tree.by_path.get(&p).copied());
                let name = rel
                    .file_name()
                    .map(|n| n.to_os_string())
                    .unwrap_or_default();
                if rel.is_root() || parent.is_some() {
                    tree.nodes.insert(wd, Node { parent, name });
                }
                tree.by_path.insert(rel.clone(), wd);
                tree.degraded.remove(rel);
            }
            Err(nix::errno::Errno::ENOSPC) | Err(nix::errno::Errno::ENOMEM) => {
                let covered = tree
                    .degraded
                    .iter()
                    .any(|d| rel.as_path().starts_with(d.as_path()));
                if !covered {
                    log::warn!(
                        "out of inotify watches: '{}' is not watched (the full pass covers it); \
                         raise fs.inotify.max_user_watches",
                        rel
                    );
                    tree.degraded.insert(rel.clone());
                }
            }
            // Gone already, or not a directory any more: its parent's events tell.
            Err(_) => {}
        }
    }

    pub fn state(&self) -> WatchState {
        let tree = self.tree.lock().expect("tree");
        WatchState {
            watched_dirs: tree.nodes.len() as u64,
            events: self.events.load(Ordering::Relaxed),
            partial_passes: 0,
            overflows: self.overflows.load(Ordering::Relaxed),
            degraded: tree.degraded.iter().map(|d| d.to_string()).collect(),
        }
    }

    /// Takes what is dirty (before the pass lists anything).
    pub fn take(&self) -> DirtySet {
        let mut p = self.pending.lock().expect("pending");
        p.first = None;
        p.last = None;
        p.dirty.take()
    }

    /// Drains the wake pipe.
    pub fn drain_wake(&self) {
        let mut buf = [0u8; 256];
        while matches!(rustix::io::read(&self.wake_rx, &mut buf), Ok(n) if n > 0) {}
    }

    fn read_loop(&self) {
        let pause = std::env::var_os("SYNCER_TEST_PAUSE_READER").map(PathBuf::from);
        loop {
            if let Some(p) = &pause {
                while p.exists() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let events = match self.ino.read_events() {
                Ok(e) => e,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::warn!("inotify read failed: {e}; a full pass follows");
                    self.push(&[Event::Lost], &[]);
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            let mut out = Vec::with_capacity(events.len());
            let mut hot = Vec::new();
            {
                let mut tree = self.tree.lock().expect("tree");
                let mut moved_from: HashMap<u32, (WatchDescriptor, OsString)> = HashMap::new();
                for ev in events {
                    let m = ev.mask;
                    if m.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                        self.overflows.fetch_add(1, Ordering::Relaxed);
                        log::warn!("inotify queue overflowed; a full pass follows");
                        out.push(Event::Lost);
                        continue;
                    }
                    if m.contains(AddWatchFlags::IN_IGNORED) {
                        tree.nodes.remove(&ev.wd);
                        continue;
                    }
                    if m.contains(AddWatchFlags::IN_UNMOUNT) {
                        out.push(Event::Lost);
                        continue;
                    }
                    let Some(dir) = tree.path_of(ev.wd) else {
                        continue;
                    };
                    let is_dir = m.contains(AddWatchFlags::IN_ISDIR);
                    let Some(name) = ev.name else {
                        let what = if m.contains(AddWatchFlags::IN_DELETE_SELF) {
                            What::Deleted
                        } else if m.contains(AddWatchFlags::IN_MOVE_SELF) {
                            What::MovedOut
                        } else {
                            What::Attrib
                        };
                        out.push(Event::Itself { dir, what });
                        continue;
                    };
                    let what = if m.contains(AddWatchFlags::IN_CREATE) {
                        What::Created
                    } else if m.contains(AddWatchFlags::IN_DELETE) {
                        What::Deleted
                    } else if m.contains(AddWatchFlags::IN_MOVED_FROM) {
                        if is_dir {
                            moved_from.insert(ev.cookie, (ev.wd, name.clone()));
                        }
                        What::MovedOut
                    } else if m.contains(AddWatchFlags::IN_MOVED_TO) {
                        // A directory renamed within the tree: its node follows.
                        if let Some((from_wd, from_name)) = moved_from.remove(&ev.cookie) {
                            let child = tree
                                .nodes
                                .iter()
                                .find(|(_, n)| n.parent == Some(from_wd) && n.name == from_name)
                                .map(|(wd, _)| *wd);
                            if let Some(c) = child {
                                if let Some(n) = tree.nodes.get_mut(&c) {
                                    n.parent = Some(ev.wd);
                                    n.name = name.clone();
                                }
                            }
                        }
                        What::MovedIn
                    } else if m.contains(AddWatchFlags::IN_MODIFY) {
                        What::Modified
                    } else if m.contains(AddWatchFlags::IN_CLOSE_WRITE) {
                        What::Closed
                    } else {
                        What::Attrib
                    };
                    if !is_dir {
                        hot.push((dir.join(&name), what));
                    }
                    out.push(Event::Entry {
                        dir,
                        name,
                        is_dir,
                        what,
                    });
                }
            }
            self.push(&out, &hot);
        }
    }

    fn push(&self, events: &[Event], hot: &[(RelPath, What)]) {
        if events.is_empty() {
            return;
        }
        self.events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let now = Instant::now();
        {
            let mut p = self.pending.lock().expect("pending");
            for e in events {
                dirty::reduce(&mut p.dirty, e);
            }
            for (file, what) in hot {
                match what {
                    What::Modified => {
                        let e = p.hot.entry(file.clone()).or_insert((now, now));
                        e.1 = now;
                    }
                    What::Closed | What::Deleted | What::MovedOut => {
                        p.hot.remove(file);
                    }
                    _ => {}
                }
            }
            // Forget hot files past their cap (a writer that never closes).
            p.hot
                .retain(|_, (first, last)| now < (*last + HOT_QUIET).min(*first + HOT_CAP));
            p.first.get_or_insert(now);
            p.last = Some(now);
        }
        let _ = rustix::io::write(&self.wake_tx, &[1]);
    }

    /// The descriptor to poll for "something is dirty".
    pub fn wake_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.wake_rx.as_fd()
    }
}
