//! A plan's actions on disk, so that a pass's memory does not grow with the number of
//! changes: the scan appends each directory's actions to an unlinked temporary file in the
//! state directory (a dry run's: in the system's temporary directory) as it goes, and the later stages read them back, one streaming read per
//! phase (see `apply`). A first mirror of a million files holds a few thousand actions in
//! memory at a time instead of a million.
//!
//! Records are postcard-encoded `Action`s, each after its length (4 bytes, little-endian).
//! The file is unlinked from the start (`O_TMPFILE` where the filesystem has it), so nothing
//! is left behind by a pass that is killed.
//!
//! A failed write (a full disk in the state directory) keeps the actions in memory instead:
//! the pass is then as it was before the spill existed, never wrong. A failed read (an I/O
//! error on the state disk) ends the read early, so later stages do less, never something
//! unplanned; the pass reports it and exits 1.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::plan::Action;

/// Actions kept in memory by a directory's scan before they go to the spill.
pub const BATCH: usize = 1024;

/// No action is this long (a whole-directory move of a million files is about 150 MB): a
/// longer length is a corrupt file, refused before anything is allocated for it.
const MAX_RECORD: usize = 1 << 30;

/// `BATCH`, unless the test hook `SYNCER_TEST_SPILL_AT` sets it (the integration tests set 1,
/// so that their small trees take the path a large one takes).
pub fn batch() -> usize {
    static AT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *AT.get_or_init(|| {
        std::env::var("SYNCER_TEST_SPILL_AT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(BATCH)
    })
}

/// The writing end, shared by the scan threads.
pub struct Spill {
    dir: PathBuf,
    inner: Mutex<Writer>,
    /// A write failed: everything after stays in memory.
    failed: AtomicBool,
}

struct Writer {
    file: File,
    /// Bytes written, all of them whole records.
    len: u64,
    count: u64,
}

impl Spill {
    /// An unlinked file in `dir`.
    pub fn new(dir: &Path) -> io::Result<Spill> {
        Ok(Spill {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Writer {
                file: tempfile::tempfile_in(dir)?,
                len: 0,
                count: 0,
            }),
            failed: AtomicBool::new(false),
        })
    }

    /// Moves `actions` to the file, with one write. On an error they stay in `actions` (the
    /// caller keeps them in memory), and so do all later ones: the file then ends with the
    /// last batch written whole.
    pub fn append(&self, actions: &mut Vec<Action>) {
        if actions.is_empty() || self.failed.load(Ordering::Relaxed) {
            return;
        }
        let mut bytes = Vec::with_capacity(actions.len() * 64);
        for a in actions.iter() {
            let at = bytes.len();
            bytes.extend_from_slice(&[0; 4]);
            bytes = match postcard::to_extend(a, bytes) {
                Ok(b) => b,
                Err(e) => return self.fail(&io::Error::other(e.to_string())),
            };
            let n = (bytes.len() - at - 4) as u32;
            bytes[at..at + 4].copy_from_slice(&n.to_le_bytes());
        }
        let mut w = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match w.file.write_all_at(&bytes, w.len) {
            Ok(()) => {
                w.len += bytes.len() as u64;
                w.count += actions.len() as u64;
                actions.clear();
            }
            Err(e) => self.fail(&e),
        }
    }

    fn fail(&self, e: &io::Error) {
        if !self.failed.swap(true, Ordering::Relaxed) {
            log::warn!(
                "could not write the plan to '{}' ({}); keeping it in memory",
                crate::model::show(&self.dir),
                crate::error::reason(e)
            );
        }
    }

    /// Ends writing.
    pub fn finish(self) -> Spilled {
        let w = self.inner.into_inner().unwrap_or_else(|p| p.into_inner());
        Spilled {
            dir: self.dir,
            file: w.file,
            count: w.count,
            read_failed: AtomicBool::new(false),
            readable: AtomicU64::new(u64::MAX),
        }
    }
}

/// The written file, read back as often as needed.
#[derive(Debug)]
pub struct Spilled {
    dir: PathBuf,
    file: File,
    count: u64,
    read_failed: AtomicBool,
    /// After a failed read, how many actions every later read yields (the ones before the
    /// failure), so that every phase of apply sees the same plan.
    readable: AtomicU64,
}

impl Spilled {
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Where it lives (a rewrite goes beside it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A read ended early (see the module comment).
    pub fn read_failed(&self) -> bool {
        self.read_failed.load(Ordering::Relaxed)
    }

    /// Every action, in the order written. Reads with `pread`, so reads never share an
    /// offset.
    pub fn iter(&self) -> impl Iterator<Item = Action> + '_ {
        let mut r = BufReader::with_capacity(
            256 << 10,
            At {
                file: &self.file,
                pos: 0,
            },
        );
        let mut left = self.count.min(self.readable.load(Ordering::Relaxed));
        let mut at = 0u64;
        let mut buf = Vec::new();
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            left -= 1;
            at += 1;
            let mut len = [0u8; 4];
            let read = r.read_exact(&mut len).and_then(|()| {
                let len = u32::from_le_bytes(len) as usize;
                if len > MAX_RECORD {
                    return Err(io::Error::other(format!("a record of {len} bytes")));
                }
                buf.resize(len, 0);
                r.read_exact(&mut buf)?;
                postcard::from_bytes::<Action>(&buf).map_err(|e| io::Error::other(e.to_string()))
            });
            match read {
                Ok(a) => Some(a),
                Err(e) => {
                    self.readable.fetch_min(at - 1, Ordering::Relaxed);
                    if !self.read_failed.swap(true, Ordering::Relaxed) {
                        log::error!(
                            "could not read the plan back from the state directory: {}",
                            crate::error::reason(&e)
                        );
                    }
                    left = 0;
                    None
                }
            }
        })
    }
}

/// A reader at its own offset of a shared file.
struct At<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, Meta, RelPath, Stamp};
    use crate::plan::{LinkSpec, Op, Plan, Reason};
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    fn copy(name: &[u8], size: u64) -> Action {
        Action {
            rel: RelPath::from_bytes(name),
            op: Op::Copy {
                reason: Reason::Create,
                size,
                hint: None,
                overwrites: false,
            },
        }
    }

    fn names(plan: &Plan) -> Vec<Vec<u8>> {
        plan.iter().map(|a| a.rel.as_bytes().to_vec()).collect()
    }

    #[test]
    fn actions_come_back_whole_with_names_and_targets_that_are_not_utf8() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spill = Spill::new(dir.path()).expect("spill");
        let meta = Meta {
            kind: Kind::Symlink,
            perm: 0o777,
            uid: 1,
            gid: 2,
            size: 3,
            mtime: Stamp { sec: 4, nsec: 5 },
            atime: Stamp { sec: 6, nsec: 7 },
            link: None,
        };
        let mut batch = vec![
            copy(b"d/caf\xe9", 7),
            Action {
                rel: RelPath::from_bytes(b"l\xff"),
                op: Op::Link(Box::new(LinkSpec {
                    reason: Reason::Update,
                    target: OsStr::from_bytes(b"../t\xfe").into(),
                    meta,
                })),
            },
        ];
        spill.append(&mut batch);
        assert!(batch.is_empty(), "appended actions leave memory");
        let mut second = vec![copy(b"z", 9)];
        spill.append(&mut second);
        let plan = Plan {
            spilled: Some(spill.finish()),
            actions: vec![copy(b"in-memory", 1)],
            ..Plan::default()
        };
        assert_eq!(plan.len(), 4);
        assert_eq!(
            names(&plan),
            [&b"d/caf\xe9"[..], b"l\xff", b"z", b"in-memory"]
        );
        // Read twice: every read starts at the beginning.
        assert_eq!(names(&plan).len(), 4);
        match &plan.iter().nth(1).expect("link").op {
            Op::Link(l) => {
                assert_eq!(l.target.as_os_str().as_bytes(), b"../t\xfe");
                assert_eq!(l.meta, meta);
            }
            op => panic!("not a link: {op:?}"),
        }
        assert!(!plan.read_failed());
    }

    #[test]
    fn a_rewrite_keeps_changes_and_drops_on_disk_and_in_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spill = Spill::new(dir.path()).expect("spill");
        let mut batch: Vec<Action> = (0..3000u64)
            .map(|i| copy(format!("f{i}").as_bytes(), i))
            .collect();
        spill.append(&mut batch);
        let mut plan = Plan {
            spilled: Some(spill.finish()),
            actions: vec![copy(b"m1", 1), copy(b"m2", 2)],
            ..Plan::default()
        };
        plan.rewrite(|a| {
            let Op::Copy { size, reason, .. } = &mut a.op else {
                return true;
            };
            *reason = Reason::Update;
            *size % 2 == 0
        });
        assert_eq!(plan.len(), 1501, "evens on disk, m2 in memory");
        assert!(plan.iter().all(
            |a| matches!(a.op, Op::Copy { reason: Reason::Update, size, .. } if size % 2 == 0)
        ));
        assert_eq!(plan.spilled.as_ref().map(Spilled::len), Some(1500));
    }

    #[test]
    fn a_write_that_fails_keeps_the_actions_in_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ro");
        std::fs::write(&path, b"").expect("file");
        // A file opened read-only: every write fails, as on a full disk.
        let spill = Spill {
            dir: dir.path().to_path_buf(),
            inner: Mutex::new(Writer {
                file: File::open(&path).expect("open"),
                len: 0,
                count: 0,
            }),
            failed: AtomicBool::new(false),
        };
        let mut batch = vec![copy(b"a", 1), copy(b"b", 2)];
        spill.append(&mut batch);
        assert_eq!(batch.len(), 2, "nothing is lost");
        let mut later = vec![copy(b"c", 3)];
        spill.append(&mut later);
        assert_eq!(later.len(), 1, "later actions stay in memory too");
        assert_eq!(spill.finish().len(), 0);
    }

    #[test]
    fn a_read_that_fails_ends_early_and_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spill = Spill::new(dir.path()).expect("spill");
        spill.append(&mut vec![copy(b"a", 1), copy(b"b", 2)]);
        let mut cut = spill.finish();
        // The file ends before the last record it claims (an I/O error reading it back).
        cut.count = 3;
        let plan = Plan {
            spilled: Some(cut),
            ..Plan::default()
        };
        assert_eq!(names(&plan), [&b"a"[..], b"b"]);
        assert!(plan.read_failed());
    }

    #[test]
    fn a_corrupt_length_is_refused_and_every_later_read_stops_at_the_same_place() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let spill = Spill::new(dir.path()).expect("spill");
        spill.append(&mut vec![copy(b"a", 1), copy(b"b", 2)]);
        let mut cut = spill.finish();
        // A third record whose length says 4 GiB: refused, nothing allocated for it.
        let end = cut.file.metadata().expect("stat").len();
        cut.file.write_at(&[0xff; 4], end).expect("write");
        cut.count = 3;
        let plan = Plan {
            spilled: Some(cut),
            ..Plan::default()
        };
        assert_eq!(names(&plan), [&b"a"[..], b"b"]);
        assert!(plan.read_failed());
        // Each phase of apply reads the plan again: it sees the same two actions.
        assert_eq!(names(&plan), [&b"a"[..], b"b"]);
        assert_eq!(
            plan.spilled
                .as_ref()
                .expect("spilled")
                .readable
                .load(Ordering::Relaxed),
            2
        );
    }
}
