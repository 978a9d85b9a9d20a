//! Reading a redb database without writing its file. redb 2 has no read-only mode: opening a
//! database sets a "recovery required" flag in its header and closing it writes the allocator
//! state back (the file changes even when no transaction committed), and it holds an
//! exclusive `flock` for as long as it is open, so a daemon that keeps its cache open keeps
//! every other opener out. Here redb runs on a storage backend of our own, `Overlay`: it
//! reads the file and keeps whatever redb writes in memory, so the file is never changed,
//! whatever redb does, and redb's own lock is never taken.
//!
//! Two ways to open, for two kinds of reader:
//! - [`in_place`] reads the file as redb asks, under a shared `flock` held for as long as the
//!   database is open, which a writer's exclusive one excludes: refused (`WouldBlock`) while
//!   a process has the database open, and a writer that starts meanwhile finds it busy. For a
//!   look that lasts a moment (which pair a job belongs to).
//! - [`copy`] reads the whole file into memory first (again, while it changes under the
//!   read), so it works while a writer has the database open, and everything read later
//!   comes from one moment of it. For a dry run, which reads the cache for as long as it
//!   scans, while the job's daemon may be committing. It costs memory: the file's size.

use std::collections::HashMap;
use std::fs::{File, TryLockError};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use redb::{Database, StorageBackend};

/// The unit in which redb's writes are kept (its pages are 4 KiB and multiples).
const BLOCK: u64 = 4096;

/// Opens the database at `path` in place, without writing it. `Ok(None)`: there is no file;
/// `Err` of kind `WouldBlock`: a process has the database open.
pub fn in_place(path: &Path) -> io::Result<Option<Database>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match file.try_lock_shared() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(io::ErrorKind::WouldBlock.into()),
        Err(TryLockError::Error(e)) => return Err(e),
    }
    let len = file.metadata()?.len();
    open(Base::File(file), len).map(Some)
}

/// Opens a private copy of the database at `path`, read into memory whole. `Ok(None)`: there
/// is no file.
pub fn copy(path: &Path) -> io::Result<Option<Database>> {
    for _ in 0..10 {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let before = file.metadata()?;
        let mut bytes = Vec::with_capacity(before.len() as usize);
        file.read_to_end(&mut bytes)?;
        // A writer that committed during the read changed the file's length or ctime; the
        // copy could then mix two moments, so it is made again.
        let after = file.metadata()?;
        let same = |m: &std::fs::Metadata| (m.len(), m.ctime(), m.ctime_nsec(), m.mtime_nsec());
        if same(&before) == same(&after) && bytes.len() as u64 == after.len() {
            let len = bytes.len() as u64;
            return open(Base::Bytes(bytes), len).map(Some);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(io::Error::other("it kept changing while it was read"))
}

fn open(base: Base, len: u64) -> io::Result<Database> {
    let backend = Overlay {
        base,
        state: Mutex::new(State {
            len,
            visible: len,
            blocks: HashMap::new(),
        }),
    };
    Database::builder()
        .set_cache_size(1 << 20)
        .create_with_backend(backend)
        .map_err(io::Error::other)
}

/// The file redb reads: the file itself, or a copy of it.
#[derive(Debug)]
enum Base {
    File(File),
    Bytes(Vec<u8>),
}

impl Base {
    /// Reads `buf.len()` bytes at `offset` (the caller keeps within the base's length).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Base::File(f) => f.read_exact_at(buf, offset),
            Base::Bytes(b) => {
                let start = offset as usize;
                let src = b
                    .get(start..start + buf.len())
                    .ok_or(io::ErrorKind::UnexpectedEof)?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }
    }
}

/// The file as redb sees it: the base, with redb's own writes laid over it.
#[derive(Debug)]
struct Overlay {
    base: Base,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The length redb set.
    len: u64,
    /// The base shows through below this offset only: redb may shrink the file and grow it
    /// again, and what it grows must read as zeros.
    visible: u64,
    /// The blocks redb wrote, by index.
    blocks: HashMap<u64, Vec<u8>>,
}

/// Fills `buf` with the base's bytes at `offset`, zeros past `visible`.
fn base_read(base: &Base, visible: u64, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let end = (offset + buf.len() as u64).min(visible);
    let shown = end.saturating_sub(offset) as usize;
    buf[shown..].fill(0);
    if shown > 0 {
        base.read_at(&mut buf[..shown], offset)?;
    }
    Ok(())
}

impl Overlay {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StorageBackend for Overlay {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state().len)
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let st = self.state();
        let end = offset + len as u64;
        if end > st.len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut out = vec![0u8; len];
        // Runs of blocks redb never wrote are read from the base in one call.
        let mut run: Option<u64> = None;
        let mut at = offset;
        while at < end {
            let block = at / BLOCK;
            let next = ((block + 1) * BLOCK).min(end);
            if let Some(written) = st.blocks.get(&block) {
                if let Some(from) = run.take() {
                    let dst = &mut out[(from - offset) as usize..(at - offset) as usize];
                    base_read(&self.base, st.visible, dst, from)?;
                }
                let within = (at % BLOCK) as usize;
                out[(at - offset) as usize..(next - offset) as usize]
                    .copy_from_slice(&written[within..within + (next - at) as usize]);
            } else if run.is_none() {
                run = Some(at);
            }
            at = next;
        }
        if let Some(from) = run {
            base_read(
                &self.base,
                st.visible,
                &mut out[(from - offset) as usize..],
                from,
            )?;
        }
        Ok(out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.state();
        if len < st.len {
            st.visible = st.visible.min(len);
            st.blocks.retain(|b, _| b * BLOCK < len);
            let cut = (len % BLOCK) as usize;
            if let Some(last) = st.blocks.get_mut(&(len / BLOCK)) {
                last[cut..].fill(0);
            }
        }
        st.len = len;
        Ok(())
    }

    fn sync_data(&self, _eventual: bool) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut st = self.state();
        let end = offset + data.len() as u64;
        st.len = st.len.max(end);
        let mut at = offset;
        while at < end {
            let block = at / BLOCK;
            let next = ((block + 1) * BLOCK).min(end);
            if !st.blocks.contains_key(&block) {
                let mut fresh = vec![0u8; BLOCK as usize];
                base_read(&self.base, st.visible, &mut fresh, block * BLOCK)?;
                st.blocks.insert(block, fresh);
            }
            let within = (at % BLOCK) as usize;
            let src = &data[(at - offset) as usize..(next - offset) as usize];
            if let Some(b) = st.blocks.get_mut(&block) {
                b[within..within + src.len()].copy_from_slice(src);
            }
            at = next;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableTable, TableDefinition};

    const T: TableDefinition<&str, u64> = TableDefinition::new("t");

    fn write_db(path: &Path, n: u64) {
        let db = Database::create(path).expect("create");
        let txn = db.begin_write().expect("write");
        {
            let mut t = txn.open_table(T).expect("table");
            for i in 0..n {
                t.insert(format!("key-{i:06}").as_str(), i).expect("insert");
            }
        }
        txn.commit().expect("commit");
    }

    fn read_all(db: &Database) -> Vec<(String, u64)> {
        let txn = db.begin_read().expect("read");
        let t = txn.open_table(T).expect("table");
        t.iter()
            .expect("iter")
            .map(|e| {
                let (k, v) = e.expect("entry");
                (k.value().to_string(), v.value())
            })
            .collect()
    }

    #[test]
    fn a_database_is_read_and_written_without_its_file_changing() {
        let t = tempfile::tempdir().expect("tempdir");
        let path = t.path().join("db.redb");
        write_db(&path, 5000);
        let bytes = std::fs::read(&path).expect("read");
        let mtime = std::fs::metadata(&path).expect("stat").modified().ok();
        for db in [
            in_place(&path).expect("in place").expect("exists"),
            copy(&path).expect("copy").expect("exists"),
        ] {
            assert_eq!(read_all(&db).len(), 5000);
            assert_eq!(read_all(&db)[1234], ("key-001234".to_string(), 1234));
            // redb may write what it likes: the writes stay in memory, and read back.
            let txn = db.begin_write().expect("write");
            {
                let mut t = txn.open_table(T).expect("table");
                t.remove("key-000000").expect("remove");
                for i in 0..3000u64 {
                    t.insert(format!("new-{i:06}").as_str(), i).expect("insert");
                }
            }
            txn.commit().expect("commit");
            assert_eq!(read_all(&db).len(), 7999);
            drop(db);
            assert!(std::fs::read(&path).expect("read") == bytes, "file changed");
        }
        assert_eq!(
            std::fs::metadata(&path).expect("stat").modified().ok(),
            mtime
        );
    }

    #[test]
    fn a_database_open_elsewhere_is_refused_in_place_and_copied_whole() {
        let t = tempfile::tempdir().expect("tempdir");
        let path = t.path().join("db.redb");
        write_db(&path, 100);
        let writer = Database::create(&path).expect("open");
        let e = in_place(&path).expect_err("refused while open");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let db = copy(&path).expect("copy").expect("exists");
        assert_eq!(read_all(&db).len(), 100);
        drop(writer);
        assert!(in_place(&path.with_extension("none"))
            .expect("ok")
            .is_none());
        assert!(copy(&path.with_extension("none")).expect("ok").is_none());
    }

    #[test]
    fn an_overlay_reads_the_base_through_what_was_written_and_shrunk() {
        let o = Overlay {
            base: Base::Bytes((0..3 * BLOCK).map(|i| (i % 251) as u8).collect()),
            state: Mutex::new(State {
                len: 3 * BLOCK,
                visible: 3 * BLOCK,
                blocks: HashMap::new(),
            }),
        };
        o.write(BLOCK - 2, &[1, 2, 3, 4]).expect("write");
        let got = o.read(BLOCK - 4, 8).expect("read");
        let base = |i: u64| (i % 251) as u8;
        assert_eq!(
            got,
            vec![
                base(BLOCK - 4),
                base(BLOCK - 3),
                1,
                2,
                3,
                4,
                base(BLOCK + 2),
                base(BLOCK + 3)
            ]
        );
        o.set_len(BLOCK + 1).expect("shrink");
        o.set_len(3 * BLOCK).expect("grow");
        let got = o.read(BLOCK - 2, 8).expect("read");
        // The byte kept by the shrink stays; what grew back reads as zeros.
        assert_eq!(got, vec![1, 2, 3, 0, 0, 0, 0, 0]);
        assert!(o.read(3 * BLOCK - 1, 2).is_err());
    }
}
