//! The persistent hash cache, in an embedded database (redb). One record per directory that
//! holds files: for each file, the stat token of the source and of the replica when it was
//! last hashed or written, and the sha256 of the content. A record per directory (not per
//! file) makes an idle pass cost one lookup per directory, and lets a record be rebuilt from
//! one directory scan, so names that disappeared simply drop out.
//!
//! A token is trusted only when it matches exactly. A source file whose ctime is too close to
//! the moment it was hashed is "racy" (a second write within the same clock tick would leave
//! the token unchanged) and is re-hashed by the next pass, as git does for its index.
//!
//! Records are encoded with postcard: integers as varints, so a file's entry is about 90
//! bytes plus its name (bincode 1, unmaintained, took 135; with a local replica's version in
//! fixed-width integers, 105).
//!
//! The database also records which source and replica it belongs to, and one summary per
//! pass. That pair is the job's: a run that names another pair under the same job is refused
//! before it touches anything (`job::check_pair`, which reads it with `recorded_pair`), and
//! `Cache::open` refuses it too rather than clear the cache. A cache of another format (an
//! older syncer) is cleared and rebuilt by hashing. It is written only after the pass's data
//! is durable. A database that cannot be opened is replaced, with a warning, by a new one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::model::{show, Hash, Kind, RelPath, Token, Version};

const DIRS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dirs");
const INFO: TableDefinition<&str, &[u8]> = TableDefinition::new("info");
const PASSES: TableDefinition<u64, &str> = TableDefinition::new("passes");

/// Bumped whenever the record encoding changes; a database of another version is rebuilt.
/// 5: postcard records (4 was bincode 1). 6: a local replica's versions as varints. 7: each
/// record in chunks of at most one page. 8: chunks keyed by their first name.
const FORMAT: &[u8] = b"syncer-cache-8";

/// How many pass summaries the database keeps.
const KEEP_PASSES: u64 = 1000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedFile {
    pub name: Vec<u8>,
    /// A regular file (token, version and hash). A directory or symlink entry only records
    /// that its extended attributes were in sync at these versions (its hash is unused).
    pub kind: Kind,
    /// The source file's stat token.
    pub src: Token,
    /// The replica's version of the file, stored as the replica reported it.
    pub rep: Version,
    pub hash: Hash,
    /// The source token may hide a later write in the same clock tick: do not trust it.
    pub src_racy: bool,
    /// The extended attributes were mirrored (or found equal) at these versions.
    pub xattrs: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DirRecord {
    /// Sorted by name.
    pub files: Vec<CachedFile>,
}

impl DirRecord {
    pub fn find(&self, name: &[u8]) -> Option<&CachedFile> {
        self.files
            .binary_search_by(|f| f.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.files[i])
    }
}

pub struct Cache {
    db: Option<Database>,
    path: PathBuf,
}

/// What a scan may ask the cache: the stored record of one directory.
pub trait Recall: Sync {
    fn dir(&self, rel: &RelPath) -> Option<DirRecord>;

    /// The entries of `names` (sorted by name bytes) in the record of `rel`, reading only
    /// the chunks that hold them.
    fn dir_only(&self, rel: &RelPath, names: &[Vec<u8>]) -> Option<DirRecord> {
        let all = self.dir(rel)?;
        Some(DirRecord {
            files: all
                .files
                .into_iter()
                .filter(|f| names.binary_search(&f.name).is_ok())
                .collect(),
        })
    }
}

/// A consistent read view of the cache for one scan, shared by all scan threads.
pub struct Snapshot {
    table: Option<redb::ReadOnlyTable<&'static [u8], &'static [u8]>>,
}

impl Snapshot {
    pub fn empty() -> Snapshot {
        Snapshot { table: None }
    }
}

impl Recall for Snapshot {
    fn dir(&self, rel: &RelPath) -> Option<DirRecord> {
        let table = self.table.as_ref()?;
        read_record(table, rel.as_bytes())
            .ok()?
            .map(|files| DirRecord { files })
    }

    fn dir_only(&self, rel: &RelPath, names: &[Vec<u8>]) -> Option<DirRecord> {
        let table = self.table.as_ref()?;
        let dir = rel.as_bytes();
        if names.is_empty() {
            return Some(DirRecord::default());
        }
        // One lookup per chunk that holds a wanted name (`find_chunk`); the chunks between
        // them are neither read nor decoded. Both in name order: a wanted name below a
        // stored one is not stored, and decoding stops at the last name wanted.
        let mut want = names.iter().peekable();
        let mut files = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        while let Some(&name) = want.peek() {
            let read = find_chunk(table, dir, name, |key, bytes| {
                if last.as_deref() == Some(key) {
                    // The chunk just read: the name sorts after its last entry.
                    return Some(false);
                }
                last = Some(key.to_vec());
                for_each_ref(bytes, |f| {
                    while want.next_if(|n| n.as_slice() < f.name).is_some() {}
                    if want.next_if(|n| n.as_slice() == f.name).is_some() {
                        files.push(f.owned());
                    }
                    want.peek().is_some()
                })
                .map(|()| true)
            })
            .ok()?;
            match read {
                // No chunk at all: the directory has no record.
                None => return None,
                // A chunk that cannot be decoded: no record (the files are hashed again).
                Some(None) => return None,
                Some(Some(true)) => {}
                Some(Some(false)) => {
                    want.next();
                }
            }
        }
        Some(DirRecord { files })
    }
}

/// Why an applied chunk was not recorded.
pub enum ChunkError {
    /// The replica could not be made durable.
    Durable(std::io::Error),
    /// The cache could not be written.
    Cache(String),
}

/// A stored chunk: its key and its bytes.
type Chunk = (Vec<u8>, Vec<u8>);

/// The chunk of directory `dir`'s record that holds `name`, or would: the last whose key is
/// not above `name`'s, else the first. `None`: the directory has no record.
fn chunk_of(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    dir: &[u8],
    name: &[u8],
) -> Result<Option<Chunk>, String> {
    find_chunk(table, dir, name, |k, v| (k.to_vec(), v.to_vec()))
}

/// As `chunk_of`, through `take(key, bytes)`. The ranges are open at one end: their open
/// ends are the table's first and last leaves, which every lookup reads (so they stay in
/// redb's cache), where a range closed at `dir\0` or `dir\1` would also read the pages of
/// the directory's first or last chunk.
fn find_chunk<T>(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    dir: &[u8],
    name: &[u8],
    take: impl FnOnce(&[u8], &[u8]) -> T,
) -> Result<Option<T>, String> {
    let (lo, hi) = chunk_range(dir);
    let at = chunk_key(dir, name);
    let floor = table
        .range::<&[u8]>(..=at.as_slice())
        .map_err(db_err)?
        .next_back()
        .transpose()
        .map_err(db_err)?
        .filter(|(k, _)| k.value() >= lo.as_slice());
    match floor {
        Some((k, v)) => Ok(Some(take(k.value(), v.value()))),
        None => next_chunk(table, &at, true, &hi, take),
    }
}

/// The first chunk at or after key `from` (`inclusive`) or strictly after it, if it is below
/// `hi` (the end of its directory's chunks), through `take(key, bytes)`.
fn next_chunk<T>(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    from: &[u8],
    inclusive: bool,
    hi: &[u8],
    take: impl FnOnce(&[u8], &[u8]) -> T,
) -> Result<Option<T>, String> {
    let bound = match inclusive {
        true => std::ops::Bound::Included(from),
        false => std::ops::Bound::Excluded(from),
    };
    let first = table
        .range::<&[u8]>((bound, std::ops::Bound::Unbounded))
        .map_err(db_err)?
        .next()
        .transpose()
        .map_err(db_err)?;
    Ok(first
        .filter(|(k, _)| k.value() < hi)
        .map(|(k, v)| take(k.value(), v.value())))
}

/// A directory's record is stored in chunks of about this many bytes at most, each under
/// its own key (`chunk_key`), so that a chunk fits one of redb's 4 KiB pages: a whole
/// record of 100 files (about 9.3 KB) took a 16 KiB page, most of it empty.
const CHUNK_BYTES: usize = 3800;

/// The key of a chunk of directory `dir`'s record: its path, a NUL (which no path holds),
/// and the name of the chunk's first file. A directory's chunks sort together, in name
/// order, and before the keys of its sub-directories (`dir/...`); the chunk that holds (or
/// would hold) a name is the last one whose key is not above the name's (`chunk_of`), so
/// one file is found, or changed, by reading and writing one chunk, whatever the size of
/// its directory.
fn chunk_key(dir: &[u8], first: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(dir.len() + 1 + first.len());
    k.extend_from_slice(dir);
    k.push(0);
    k.extend_from_slice(first);
    k
}

/// All chunk keys of directory `dir`: from `dir\0` up to (not including) `dir\1`.
fn chunk_range(dir: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut lo = dir.to_vec();
    lo.push(0);
    let mut hi = dir.to_vec();
    hi.push(1);
    (lo, hi)
}

/// A directory's stored files, in name order: `None` when it has no record, or when a chunk
/// cannot be decoded (the directory is then simply hashed again).
fn read_record(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    dir: &[u8],
) -> Result<Option<Vec<CachedFile>>, String> {
    let (lo, hi) = chunk_range(dir);
    let mut files = Vec::new();
    let mut any = false;
    for entry in table
        .range::<&[u8]>(lo.as_slice()..hi.as_slice())
        .map_err(db_err)?
    {
        let (_, chunk) = entry.map_err(db_err)?;
        any = true;
        match decode(chunk.value()) {
            Some(mut part) => files.append(&mut part),
            None => return Ok(None),
        }
    }
    Ok(any.then_some(files))
}

/// One stored chunk, or `None` if it cannot be decoded.
fn decode(bytes: &[u8]) -> Option<Vec<CachedFile>> {
    postcard::from_bytes(bytes).ok()
}

/// A `CachedFile` decoded in place: its name borrowed from the chunk, so that reading the
/// few entries a partial pass wants does not copy every name of the chunk. Fields in the
/// order of `CachedFile` (postcard encodes a `Vec<u8>` and a `&[u8]` alike).
#[derive(Deserialize)]
struct CachedFileRef<'a> {
    name: &'a [u8],
    kind: Kind,
    src: Token,
    rep: Version,
    hash: Hash,
    src_racy: bool,
    xattrs: bool,
}

impl CachedFileRef<'_> {
    fn owned(self) -> CachedFile {
        CachedFile {
            name: self.name.to_vec(),
            kind: self.kind,
            src: self.src,
            rep: self.rep,
            hash: self.hash,
            src_racy: self.src_racy,
            xattrs: self.xattrs,
        }
    }
}

/// Decodes a stored chunk one file at a time, in name order, while `each` returns true.
/// `None`: the chunk cannot be decoded (as far as it was read).
fn for_each_ref<'a>(
    bytes: &'a [u8],
    mut each: impl FnMut(CachedFileRef<'a>) -> bool,
) -> Option<()> {
    let (n, mut rest) = postcard::take_from_bytes::<usize>(bytes).ok()?;
    for _ in 0..n {
        let (file, more) = postcard::take_from_bytes::<CachedFileRef>(rest).ok()?;
        rest = more;
        if !each(file) {
            break;
        }
    }
    Some(())
}

/// The chunks of a record, each with the number of files it holds: a postcard sequence of
/// files (its length, then the files), at most `CHUNK_BYTES` long unless one file alone is
/// longer.
fn encode(files: &[CachedFile]) -> Result<Vec<(usize, Vec<u8>)>, String> {
    let mut chunks = Vec::new();
    let mut body = Vec::new();
    let mut n = 0usize;
    let mut close = |body: &mut Vec<u8>, n: &mut usize| -> Result<(), String> {
        let mut chunk = postcard::to_allocvec(n).map_err(db_err)?;
        chunk.append(body);
        chunks.push((*n, chunk));
        *n = 0;
        Ok(())
    };
    // One file's bytes, in a buffer reused for every file (a name is at most 255 bytes on
    // Linux; a longer one, from elsewhere, takes the allocating path).
    let mut buf = [0u8; 1024];
    for f in files {
        let spilled;
        let one: &[u8] = match postcard::to_slice(f, &mut buf) {
            Ok(one) => one,
            Err(_) => {
                spilled = postcard::to_allocvec(f).map_err(db_err)?;
                &spilled
            }
        };
        if n > 0 && body.len() + one.len() + 10 > CHUNK_BYTES {
            close(&mut body, &mut n)?;
        }
        body.extend_from_slice(one);
        n += 1;
    }
    if n > 0 {
        close(&mut body, &mut n)?;
    }
    Ok(chunks)
}

fn db_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The cache belongs to another source/replica pair (the paths as recorded).
#[derive(Debug)]
pub struct Foreign {
    pub source: PathBuf,
    pub replica: PathBuf,
}

/// Why a database could not be claimed for a pair.
enum Claim {
    Foreign(Foreign),
    Db(String),
}

/// The source/replica pair the cache at `path` records, read without writing the file or
/// waiting for it (see `peek::in_place`). `Ok(None)`: no cache, or one that records no pair;
/// an error of kind `WouldBlock`: a process has it open.
pub fn recorded_pair(path: &Path) -> std::io::Result<Option<(PathBuf, PathBuf)>> {
    let Some(db) = super::peek::in_place(path)? else {
        return Ok(None);
    };
    let (_, owner) = read_info(&db).map_err(std::io::Error::other)?;
    Ok(owner.as_deref().and_then(split_owner))
}

/// The `format` and `owner` the database records (`None` each when it records none).
#[allow(clippy::type_complexity)]
fn read_info(db: &Database) -> Result<(Option<Vec<u8>>, Option<Vec<u8>>), String> {
    let txn = db.begin_read().map_err(db_err)?;
    match txn.open_table(INFO) {
        Ok(t) => {
            let fmt = t.get("format").map_err(db_err)?.map(|v| v.value().to_vec());
            let own = t.get("owner").map_err(db_err)?.map(|v| v.value().to_vec());
            Ok((fmt, own))
        }
        Err(redb::TableError::TableDoesNotExist(_)) => Ok((None, None)),
        Err(e) => Err(db_err(e)),
    }
}

impl Cache {
    /// A cache that remembers nothing (no database, or one held elsewhere).
    pub fn disabled() -> Cache {
        Cache {
            db: None,
            path: PathBuf::new(),
        }
    }

    /// Opens (or creates) the cache at `path` for this source and replica. Returns the
    /// cache and the warnings to log (corrupt database, older format, database busy), or
    /// `Foreign` if it belongs to another pair (left as it is).
    pub fn open(
        path: &Path,
        source: &Path,
        replica: &Path,
    ) -> Result<(Cache, Vec<String>), Foreign> {
        let mut warnings = Vec::new();
        // Another syncer's pair check (`recorded_pair`) holds a shared lock for an instant:
        // worth a short wait, where running without the cache would hash everything.
        let mut tries = 0;
        let opened = loop {
            match Self::open_db(path) {
                Err(OpenError::Busy) if tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other,
            }
        };
        let db = match opened {
            Ok(db) => Some(db),
            Err(OpenError::Busy) => {
                warnings.push(format!(
                    "hash cache '{}' is in use by another syncer process; this pass hashes without it",
                    show(path)
                ));
                return Ok((Cache::disabled(), warnings));
            }
            Err(OpenError::Other(e)) => {
                warnings.push(format!(
                    "hash cache '{}' is unreadable ({e}); rebuilding it by hashing",
                    show(path)
                ));
                let _ = std::fs::remove_file(path);
                match Self::open_db(path) {
                    Ok(db) => Some(db),
                    Err(_) => {
                        warnings.push(format!("could not create hash cache '{}'", show(path)));
                        None
                    }
                }
            }
        };
        Cache {
            db,
            path: path.to_path_buf(),
        }
        .claimed(source, replica, warnings)
    }

    /// A dry run's cache: a private copy of the database at `path`, read like the real one
    /// and never written (see `peek::copy`: its writes stay in memory), so the file is
    /// neither created nor changed, and it works while the job's daemon holds the cache.
    /// No file: an empty cache. A cache of another pair is refused as by `open`.
    pub fn open_copy(
        path: &Path,
        source: &Path,
        replica: &Path,
    ) -> Result<(Cache, Vec<String>), Foreign> {
        let mut warnings = Vec::new();
        let db = super::peek::copy(path).unwrap_or_else(|e| {
            warnings.push(format!(
                "hash cache '{}' could not be read ({e}); this dry run hashes without it",
                show(path)
            ));
            None
        });
        Cache {
            db,
            path: path.to_path_buf(),
        }
        .claimed(source, replica, warnings)
    }

    /// The cache once `claim`ed, with the warnings to log; or `Foreign`.
    fn claimed(
        mut self,
        source: &Path,
        replica: &Path,
        mut warnings: Vec<String>,
    ) -> Result<(Cache, Vec<String>), Foreign> {
        match self.claim(source, replica, &mut warnings) {
            Ok(()) => {}
            Err(Claim::Foreign(f)) => return Err(f),
            Err(Claim::Db(e)) => {
                warnings.push(format!(
                    "hash cache '{}': {e}; running without it",
                    show(&self.path)
                ));
                self.db = None;
            }
        }
        Ok((self, warnings))
    }

    fn open_db(path: &Path) -> Result<Database, OpenError> {
        // The file is created here, owner-only (it lists every path of the job), and handed
        // to redb, which would create it with the umask's mode.
        let file = path
            .parent()
            .map_or(Ok(()), super::create_dir)
            .and_then(|()| {
                super::private()
                    .read(true)
                    .write(true)
                    .truncate(false)
                    .open(path)
            })
            .map_err(|e| OpenError::Other(e.to_string()))?;
        match Database::builder()
            .set_cache_size(4 << 20)
            .create_file(file)
        {
            Ok(db) => Ok(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(OpenError::Busy),
            Err(e) => Err(OpenError::Other(e.to_string())),
        }
    }

    /// Makes sure the database belongs to this source and replica: refuses one that records
    /// another pair (whatever its format: the owner record never changed), and clears one of
    /// another format or that records no pair.
    fn claim(
        &mut self,
        source: &Path,
        replica: &Path,
        warnings: &mut Vec<String>,
    ) -> Result<(), Claim> {
        let Some(db) = &self.db else { return Ok(()) };
        let owner = owner_key(source, replica);
        let (fmt, own) = read_info(db).map_err(Claim::Db)?;
        if let Some(other) = own.as_deref().filter(|o| *o != owner.as_slice()) {
            return match split_owner(other) {
                Some((source, replica)) => Err(Claim::Foreign(Foreign { source, replica })),
                None => Err(Claim::Db("its owner record is unreadable".into())),
            };
        }
        let fresh = fmt.as_deref() != Some(FORMAT) || own.is_none();
        if fresh && fmt.is_some() {
            warnings.push(format!(
                "hash cache '{}' was written by another version of syncer; rebuilding it by hashing",
                show(&self.path)
            ));
        }
        if fresh {
            let reset = || -> Result<(), String> {
                let txn = db.begin_write().map_err(db_err)?;
                let _ = txn.delete_table(DIRS);
                {
                    let mut info = txn.open_table(INFO).map_err(db_err)?;
                    info.insert("format", FORMAT).map_err(db_err)?;
                    info.insert("owner", owner.as_slice()).map_err(db_err)?;
                    txn.open_table(DIRS).map_err(db_err)?;
                    txn.open_table(PASSES).map_err(db_err)?;
                }
                txn.commit().map_err(db_err)
            };
            reset().map_err(Claim::Db)?;
        }
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.db.is_some()
    }

    pub fn snapshot(&self) -> Snapshot {
        let Some(db) = &self.db else {
            return Snapshot::empty();
        };
        let table = db.begin_read().ok().and_then(|t| t.open_table(DIRS).ok());
        Snapshot { table }
    }

    /// Records files written or fixed by one applied chunk (call only once they are
    /// durable). The first time this pass touches a directory, its scan delta is applied to
    /// the stored record too (and consumed).
    #[cfg(test)]
    pub fn record_chunk(
        &self,
        changes: BTreeMap<RelPath, DirChange>,
        drafts: &mut HashMap<RelPath, Delta>,
    ) -> Result<(), String> {
        self.record_chunk_after(changes, drafts, || Ok(()))
            .map_err(|e| match e {
                ChunkError::Durable(e) => e.to_string(),
                ChunkError::Cache(e) => e,
            })
    }

    /// As `record_chunk`, for a chunk not yet durable: `durable` (the replica's commit)
    /// runs on a second thread while the records are prepared, and they are committed only
    /// once it has returned `Ok`. If it fails, nothing is recorded.
    pub fn record_chunk_after(
        &self,
        changes: BTreeMap<RelPath, DirChange>,
        drafts: &mut HashMap<RelPath, Delta>,
        durable: impl Fn() -> std::io::Result<()> + Sync,
    ) -> Result<(), ChunkError> {
        let Some(db) = &self.db else {
            return durable().map_err(ChunkError::Durable);
        };
        std::thread::scope(|scope| {
            // Without a second thread (none could be made), the commit runs first, here.
            let synced = std::thread::Builder::new()
                .spawn_scoped(scope, &durable)
                .map_err(|_| durable());
            let staged = (|| {
                let txn = db.begin_write().map_err(db_err)?;
                {
                    let mut dirs = txn.open_table(DIRS).map_err(db_err)?;
                    for (dir, change) in changes {
                        let mut edits = Edits::default();
                        if let Some(delta) = drafts.remove(&dir) {
                            edits.delta(delta);
                        }
                        edits.change(change);
                        edit(&mut dirs, &dir, edits)?;
                    }
                }
                Ok(txn)
            })();
            let synced = match synced {
                Ok(thread) => thread.join().expect("the replica's commit does not panic"),
                Err(done) => done,
            };
            match (synced, staged) {
                (Err(e), Ok(txn)) => {
                    let _ = txn.abort();
                    Err(ChunkError::Durable(e))
                }
                (Err(e), Err(_)) => Err(ChunkError::Durable(e)),
                (Ok(()), Err(e)) => Err(ChunkError::Cache(e)),
                (Ok(()), Ok(txn)) => txn.commit().map_err(|e| ChunkError::Cache(db_err(e))),
            }
        })
    }

    /// Writes drafts (see `Settled`) in one transaction.
    pub fn record_drafts(&self, drafts: Vec<(RelPath, Delta)>) -> Result<(), String> {
        let Some(db) = &self.db else { return Ok(()) };
        let txn = db.begin_write().map_err(db_err)?;
        {
            let mut dirs = txn.open_table(DIRS).map_err(db_err)?;
            for (dir, delta) in drafts {
                let mut edits = Edits::default();
                edits.delta(delta);
                edit(&mut dirs, &dir, edits)?;
            }
        }
        txn.commit().map_err(db_err)
    }

    /// Ends a pass: writes the remaining drafts, drops the records of deleted trees and of
    /// the `forget` files (relinked: their versions changed) and stores the pass summary, in
    /// one durable transaction.
    pub fn finish(
        &self,
        drafts: HashMap<RelPath, Delta>,
        dropped_trees: &[RelPath],
        forget: &[RelPath],
        pass_key: u64,
        pass_json: &str,
    ) -> Result<(), String> {
        let Some(db) = &self.db else { return Ok(()) };
        let txn = db.begin_write().map_err(db_err)?;
        {
            let mut dirs = txn.open_table(DIRS).map_err(db_err)?;
            for tree in dropped_trees {
                let key = tree.as_bytes();
                for (lo, hi) in [chunk_range(key), child_range(key)] {
                    dirs.retain_in::<&[u8], _>(lo.as_slice()..hi.as_slice(), |_, _| false)
                        .map_err(db_err)?;
                }
            }
            for (dir, delta) in drafts {
                let mut edits = Edits::default();
                edits.delta(delta);
                edit(&mut dirs, &dir, edits)?;
            }
            let mut by_dir: BTreeMap<RelPath, Vec<Vec<u8>>> = BTreeMap::new();
            for rel in forget {
                if let (Some(dir), Some(name)) = (rel.parent(), rel.file_name()) {
                    use std::os::unix::ffi::OsStrExt;
                    by_dir
                        .entry(dir)
                        .or_default()
                        .push(name.as_bytes().to_vec());
                }
            }
            for (dir, names) in by_dir {
                let mut edits = Edits::default();
                for n in names {
                    edits.0.insert(n, Edit::Remove);
                }
                edit(&mut dirs, &dir, edits)?;
            }
            let mut passes = txn.open_table(PASSES).map_err(db_err)?;
            passes.insert(pass_key, pass_json).map_err(db_err)?;
            let old: Vec<u64> = passes
                .iter()
                .map_err(db_err)?
                .filter_map(|e| e.ok().map(|(k, _)| k.value()))
                .collect();
            if old.len() as u64 > KEEP_PASSES {
                for k in &old[..old.len() - KEEP_PASSES as usize] {
                    passes.remove(k).map_err(db_err)?;
                }
            }
        }
        txn.commit().map_err(db_err)
    }
}

/// Scan drafts of directories where the pass copies and fixes nothing (their records only
/// learn hashes the scan read, and forget names that are gone), written while the scan still
/// runs, so that a pass over a large tree without a cache (the first after an upgrade, or
/// after the cache was lost) does not hold a record for every file until it ends. Each batch
/// is written after the replica is made durable (`commit`), as any cache write is.
pub struct Settled<'a> {
    cache: &'a Cache,
    commit: &'a (dyn Fn() -> std::io::Result<()> + Sync),
    pending: std::sync::Mutex<(Vec<(RelPath, Delta)>, usize)>,
}

/// Entries held before a batch of settled drafts is written, unless the test hook
/// `SYNCER_TEST_SETTLED_AT` sets it (the integration tests set 1, so that their small trees
/// take the path a large one takes).
fn settled_batch() -> usize {
    static AT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *AT.get_or_init(|| {
        std::env::var("SYNCER_TEST_SETTLED_AT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16_384)
    })
}

impl<'a> Settled<'a> {
    pub fn new(cache: &'a Cache, commit: &'a (dyn Fn() -> std::io::Result<()> + Sync)) -> Self {
        Settled {
            cache,
            commit,
            pending: std::sync::Mutex::new((Vec::new(), 0)),
        }
    }

    /// Takes a settled directory's draft; writes the batch once it is large enough.
    pub fn add(&self, dir: RelPath, delta: Delta) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.1 += delta.upserts.len() + delta.removed.len() + 1;
        p.0.push((dir, delta));
        if p.1 < settled_batch() || !self.cache.enabled() {
            return;
        }
        let batch = std::mem::take(&mut p.0);
        p.1 = 0;
        let written = (self.commit)()
            .map_err(|e| crate::error::reason(&e))
            .and_then(|()| self.cache.record_drafts(batch));
        if let Err(e) = written {
            log::warn!("could not update the hash cache: {e}; the next pass hashes again");
        }
    }

    /// What is left, for the end of the pass.
    pub fn finish(self) -> Vec<(RelPath, Delta)> {
        self.pending
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .0
    }
}

/// The difference between a directory's stored record and what a scan found.
#[derive(Debug, Default)]
pub struct Delta {
    /// Entries that are new or differ from the stored ones.
    pub upserts: Vec<CachedFile>,
    /// Names in the stored record that the scan no longer vouches for.
    pub removed: Vec<Vec<u8>>,
}

/// Builds the delta between a stored record and the entries a scan finds, as it finds them
/// (in name order), holding only the differences.
pub struct DeltaBuilder<'a> {
    old: std::iter::Peekable<std::slice::Iter<'a, CachedFile>>,
    delta: Delta,
}

impl<'a> DeltaBuilder<'a> {
    /// `old` is sorted by name.
    pub fn new(old: &'a [CachedFile]) -> Self {
        DeltaBuilder {
            old: old.iter().peekable(),
            delta: Delta::default(),
        }
    }

    /// The next entry found (after every earlier one by name).
    pub fn push(&mut self, n: CachedFile) {
        while let Some(prev) = self.old.next_if(|p| p.name < n.name) {
            self.delta.removed.push(prev.name.clone());
        }
        match self.old.next_if(|p| p.name == n.name) {
            Some(prev) if *prev == n => {}
            _ => self.delta.upserts.push(n),
        }
    }

    /// The delta: what was pushed and differs, and the stored names never pushed.
    pub fn finish(mut self) -> Delta {
        self.delta.removed.extend(self.old.map(|p| p.name.clone()));
        self.delta
    }
}

impl Delta {
    /// `old` and `new` are both sorted by name (the scan builds its deltas with
    /// `DeltaBuilder` as entries come; the tests use this).
    #[cfg(test)]
    pub fn between(old: &[CachedFile], new: Vec<CachedFile>) -> Delta {
        let mut b = DeltaBuilder::new(old);
        for n in new {
            b.push(n);
        }
        b.finish()
    }

    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removed.is_empty()
    }

    /// Applies the delta to a whole record's files, sorted by name (a record in memory).
    pub fn apply(self, files: &mut Vec<CachedFile>) {
        let mut e = Edits::default();
        e.delta(self);
        *files = Edits::apply(e.0.into_iter().collect(), std::mem::take(files));
    }
}

/// What one applied chunk changed in one directory.
#[derive(Default, Debug)]
pub struct DirChange {
    pub written: Vec<CachedFile>,
    /// (name, new replica version, extended attributes mirrored) of files whose metadata
    /// was fixed.
    pub fixed: Vec<(Vec<u8>, Version, bool)>,
}

impl DirChange {
    /// Applies the change to a whole record's files, sorted by name (a record in memory).
    pub fn apply(self, files: &mut Vec<CachedFile>) {
        let mut e = Edits::default();
        e.change(self);
        *files = Edits::apply(e.0.into_iter().collect(), std::mem::take(files));
    }
}

/// What happens to one name of a directory's record.
#[derive(Debug)]
enum Edit {
    Put(CachedFile),
    Remove,
    /// Metadata fixed: the new replica version, and whether the extended attributes were
    /// mirrored.
    Fix(Version, bool),
}

/// The edits of one directory's record, by name, in the order they were made (a later edit
/// of a name builds on the earlier one).
#[derive(Debug, Default)]
struct Edits(BTreeMap<Vec<u8>, Edit>);

impl Edits {
    fn delta(&mut self, delta: Delta) {
        for f in delta.upserts {
            self.0.insert(f.name.clone(), Edit::Put(f));
        }
        for n in delta.removed {
            self.0.insert(n, Edit::Remove);
        }
    }

    /// Written files replace their entries, fixed ones get their new replica version.
    fn change(&mut self, change: DirChange) {
        for f in change.written {
            self.0.insert(f.name.clone(), Edit::Put(f));
        }
        for (name, version, xattrs) in change.fixed {
            match self.0.get_mut(&name) {
                Some(Edit::Put(f)) => {
                    f.rep = version;
                    f.xattrs = xattrs;
                }
                Some(Edit::Remove) => {}
                _ => {
                    self.0.insert(name, Edit::Fix(version, xattrs));
                }
            }
        }
    }

    /// Applies the edits to the sorted files of one chunk.
    fn apply(edits: Vec<(Vec<u8>, Edit)>, files: Vec<CachedFile>) -> Vec<CachedFile> {
        let mut out = Vec::with_capacity(files.len() + edits.len());
        let mut e = edits.into_iter().peekable();
        for f in files {
            while let Some((_, edit)) = e.next_if(|(n, _)| *n < f.name) {
                if let Edit::Put(new) = edit {
                    out.push(new);
                }
            }
            match e.next_if(|(n, _)| *n == f.name) {
                None => out.push(f),
                Some((_, Edit::Put(new))) => out.push(new),
                Some((_, Edit::Remove)) => {}
                Some((_, Edit::Fix(version, xattrs))) => out.push(CachedFile {
                    rep: version,
                    xattrs,
                    ..f
                }),
            }
        }
        out.extend(e.filter_map(|(_, edit)| match edit {
            Edit::Put(new) => Some(new),
            _ => None,
        }));
        out
    }
}

/// Applies `edits` to directory `dir`'s record, rewriting only the chunks that hold (or
/// would hold) the names edited: one new file in a directory of 100,000 is one chunk read
/// and written, not the whole record.
fn edit(dirs: &mut redb::Table<&[u8], &[u8]>, dir: &RelPath, edits: Edits) -> Result<(), String> {
    let dir = dir.as_bytes();
    let (_, hi) = chunk_range(dir);
    let mut names = edits.0.into_iter().peekable();
    while let Some(first) = names.next() {
        // The chunk the first name falls in, and where the next chunk starts: every name
        // before that falls in this chunk too (one lookup per chunk, not per name).
        let chunk = chunk_of(&*dirs, dir, &first.0)?;
        let next = match &chunk {
            Some((key, _)) => next_chunk(&*dirs, key, false, &hi, |k, _| k.to_vec())?,
            None => None,
        };
        let mut list = vec![first];
        while let Some(e) =
            names.next_if(|(n, _)| next.as_ref().is_none_or(|k| chunk_key(dir, n) < *k))
        {
            list.push(e);
        }
        // A chunk that cannot be decoded is dropped: its files are hashed again.
        let files = chunk
            .as_ref()
            .and_then(|(_, bytes)| decode(bytes))
            .unwrap_or_default();
        let files = Edits::apply(list, files);
        let pieces = encode(&files)?;
        let mut at = 0;
        for (i, (n, piece)) in pieces.iter().enumerate() {
            let key = chunk_key(dir, &files[at].name);
            at += n;
            // The old chunk goes, unless the first piece keeps its key (the insert then
            // replaces it); the other pieces' keys fall between it and the next chunk.
            if let (0, Some((old, _))) = (i, &chunk) {
                if *old != key {
                    dirs.remove(old.as_slice()).map_err(db_err)?;
                }
            }
            dirs.insert(key.as_slice(), piece.as_slice())
                .map_err(db_err)?;
        }
        if let (true, Some((old, _))) = (pieces.is_empty(), &chunk) {
            dirs.remove(old.as_slice()).map_err(db_err)?;
        }
    }
    Ok(())
}

enum OpenError {
    Busy,
    Other(String),
}

/// The owner record: the source's path, a NUL (which no path holds), the replica's.
fn owner_key(source: &Path, replica: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut k = source.as_os_str().as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(replica.as_os_str().as_bytes());
    k
}

/// The pair of an owner record.
fn split_owner(key: &[u8]) -> Option<(PathBuf, PathBuf)> {
    use std::os::unix::ffi::OsStrExt;
    let at = key.iter().position(|b| *b == 0)?;
    let path = |b: &[u8]| PathBuf::from(std::ffi::OsStr::from_bytes(b));
    Some((path(&key[..at]), path(&key[at + 1..])))
}

/// Keys strictly below directory `key`: `key/` up to (not including) `key0` ('0' follows '/').
fn child_range(key: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if key.is_empty() {
        return (Vec::new(), vec![0xff; 8]);
    }
    let mut lo = key.to_vec();
    lo.push(b'/');
    let mut hi = key.to_vec();
    hi.push(b'0');
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, ino: u64) -> CachedFile {
        CachedFile {
            name: name.as_bytes().to_vec(),
            kind: Kind::File,
            src: Token {
                ino,
                ..Token::default()
            },
            rep: Version::default(),
            hash: Hash::default(),
            src_racy: false,
            xattrs: false,
        }
    }

    #[test]
    fn delta_keeps_only_changes_and_reproduces_the_new_record() {
        let old = vec![f("a", 1), f("b", 2), f("c", 3), f("e", 5)];
        let new = vec![f("a", 1), f("c", 30), f("d", 4)];
        let d = Delta::between(&old, new.clone());
        assert_eq!(d.upserts, vec![f("c", 30), f("d", 4)]);
        assert_eq!(d.removed, vec![b"b".to_vec(), b"e".to_vec()]);
        let mut files = old;
        d.apply(&mut files);
        assert_eq!(files, new);
    }

    #[test]
    fn a_record_survives_encoding_and_a_truncated_one_is_refused() {
        let mut a = f("a", 12_345_678);
        a.src = Token {
            dev: 64_768,
            ino: 12_345_678,
            size: 4_000,
            mtime_ns: 1_700_000_000_123_456_789,
            ctime_ns: 1_764_000_000_987_654_321,
        };
        a.rep = a.src.to_version();
        a.hash = Hash([7; 32]);
        a.xattrs = true;
        let record = DirRecord {
            files: vec![a, f("b", 2)],
        };
        let chunks = encode(&record.files).expect("encode");
        assert_eq!(chunks.len(), 1);
        assert_eq!(decode(&chunks[0].1).expect("decode"), record.files);
        // A file's entry: name, kind, token and version as varints, hash, two flags.
        let one = postcard::to_allocvec(&record.files[0]).expect("encode");
        assert!(one.len() <= 96, "{} bytes", one.len());
        assert!(decode(&chunks[0].1[..chunks[0].1.len() / 2]).is_none());
    }

    #[test]
    fn a_large_record_is_stored_in_chunks_of_a_page_and_read_back_whole() {
        let t = tempfile::tempdir().expect("tempdir");
        let (cache, _) = Cache::open(&t.path().join("c.redb"), t.path(), t.path()).expect("ours");
        let dir = RelPath::from_bytes(b"d");
        let files: Vec<CachedFile> = (0..300)
            .map(|i| {
                let mut c = f(&format!("file-{i:04}"), 1_000_000 + i);
                c.src.mtime_ns = 1_700_000_000_000_000_000 + i as i64;
                c.rep = c.src.to_version();
                c.hash = Hash([i as u8; 32]);
                c
            })
            .collect();
        let chunks = encode(&files).expect("encode");
        assert!(chunks.len() > 1, "300 files do not fit one page");
        assert!(chunks.iter().all(|c| c.1.len() <= CHUNK_BYTES));
        let mut drafts = HashMap::new();
        let mut change = BTreeMap::new();
        change.insert(
            dir.clone(),
            DirChange {
                written: files.clone(),
                fixed: Vec::new(),
            },
        );
        cache.record_chunk(change, &mut drafts).expect("record");
        // A neighbour whose name starts like it is not mixed in.
        let mut next = BTreeMap::new();
        next.insert(
            RelPath::from_bytes(b"d0"),
            DirChange {
                written: vec![f("x", 1)],
                fixed: Vec::new(),
            },
        );
        cache.record_chunk(next, &mut drafts).expect("record");
        let got = cache.snapshot().dir(&dir).expect("stored");
        assert_eq!(got.files, files);
        // Written again smaller, no chunk of the longer record is left behind.
        let mut shrink = BTreeMap::new();
        shrink.insert(
            dir.clone(),
            DirChange {
                written: Vec::new(),
                fixed: Vec::new(),
            },
        );
        let mut drafts: HashMap<RelPath, Delta> = HashMap::new();
        drafts.insert(
            dir.clone(),
            Delta {
                upserts: Vec::new(),
                removed: files[1..].iter().map(|c| c.name.clone()).collect(),
            },
        );
        cache.record_chunk(shrink, &mut drafts).expect("record");
        assert_eq!(
            cache.snapshot().dir(&dir).expect("stored").files,
            files[..1]
        );
        // A dropped tree takes its chunks and its sub-directories' with it.
        cache
            .finish(HashMap::new(), std::slice::from_ref(&dir), &[], 1, "{}")
            .expect("finish");
        assert!(cache.snapshot().dir(&dir).is_none());
        assert!(cache.snapshot().dir(&RelPath::from_bytes(b"d0")).is_some());
    }

    #[test]
    fn a_cache_of_another_pair_is_refused_and_left_as_it_is() {
        let t = tempfile::tempdir().expect("tempdir");
        let path = t.path().join("c.redb");
        let (a, b, c) = (Path::new("/src"), Path::new("/rep"), Path::new("/other"));
        assert_eq!(recorded_pair(&path).expect("read"), None);
        let (cache, _) = Cache::open(&path, a, b).expect("new");
        let mut change = BTreeMap::new();
        change.insert(
            RelPath::from_bytes(b"d"),
            DirChange {
                written: vec![f("x", 1)],
                fixed: Vec::new(),
            },
        );
        cache
            .record_chunk(change, &mut HashMap::new())
            .expect("record");
        drop(cache);
        let pair = Some((a.to_path_buf(), b.to_path_buf()));
        assert_eq!(recorded_pair(&path).expect("read"), pair);
        let bytes = std::fs::read(&path).expect("read");
        match Cache::open(&path, a, c) {
            Err(Foreign { source, replica }) => assert_eq!((source, replica), (a.into(), b.into())),
            Ok(_) => panic!("a cache of another pair was opened"),
        }
        assert!(
            std::fs::read(&path).expect("read") == bytes,
            "the cache was written"
        );
        // Its own pair still finds its records; another format (an older syncer) is cleared.
        let (cache, warnings) = Cache::open(&path, a, b).expect("ours");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(cache.snapshot().dir(&RelPath::from_bytes(b"d")).is_some());
        {
            let txn = cache.db.as_ref().expect("db").begin_write().expect("write");
            txn.open_table(INFO)
                .expect("info")
                .insert("format", b"syncer-cache-7".as_slice())
                .expect("insert");
            txn.commit().expect("commit");
        }
        drop(cache);
        let (cache, warnings) = Cache::open(&path, a, b).expect("ours");
        assert!(warnings[0].contains("another version"), "{warnings:?}");
        assert!(cache.snapshot().dir(&RelPath::from_bytes(b"d")).is_none());
        // While a process has it open, it cannot be read in place.
        let busy = recorded_pair(&path).expect_err("busy");
        assert_eq!(busy.kind(), std::io::ErrorKind::WouldBlock);
    }

    #[test]
    fn delta_of_an_unchanged_directory_is_empty() {
        let old = vec![f("a", 1), f("b", 2)];
        assert!(Delta::between(&old, old.clone()).is_empty());
    }

    /// The chunks (key, bytes) of `dir`'s record as stored.
    fn chunks_of(cache: &Cache, dir: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let txn = cache.db.as_ref().expect("db").begin_read().expect("read");
        let table = txn.open_table(DIRS).expect("table");
        let (lo, hi) = chunk_range(dir);
        table
            .range::<&[u8]>(lo.as_slice()..hi.as_slice())
            .expect("range")
            .map(|e| {
                let (k, v) = e.expect("entry");
                (k.value().to_vec(), v.value().to_vec())
            })
            .collect()
    }

    #[test]
    fn a_chunk_is_recorded_only_once_the_replica_is_durable() {
        let t = tempfile::tempdir().expect("tempdir");
        let (cache, _) = Cache::open(&t.path().join("c.redb"), t.path(), t.path()).expect("ours");
        let dir = RelPath::from_bytes(b"d");
        let change = |name: &str| {
            let mut c = BTreeMap::new();
            c.insert(
                dir.clone(),
                DirChange {
                    written: vec![f(name, 1)],
                    fixed: Vec::new(),
                },
            );
            c
        };
        let mut drafts = HashMap::new();
        // While the replica is being made durable, the cache does not vouch for the chunk,
        // however long that takes (the records are prepared meanwhile, on this thread).
        let recorded = || cache.snapshot().dir(&dir).map(|r| r.files.len());
        cache
            .record_chunk_after(change("a"), &mut drafts, || {
                for _ in 0..20 {
                    assert_eq!(recorded(), None);
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Ok(())
            })
            .map_err(|_| "not recorded")
            .expect("recorded");
        assert_eq!(recorded(), Some(1));
        // A replica that could not be made durable: nothing recorded, and the error says so.
        let failed = cache.record_chunk_after(change("b"), &mut drafts, || {
            Err(std::io::Error::from_raw_os_error(28))
        });
        assert!(matches!(failed, Err(ChunkError::Durable(e)) if e.raw_os_error() == Some(28)));
        assert_eq!(recorded(), Some(1));
    }

    #[test]
    fn an_edit_rewrites_only_the_chunks_of_the_names_it_touches() {
        let t = tempfile::tempdir().expect("tempdir");
        let (cache, _) = Cache::open(&t.path().join("c.redb"), t.path(), t.path()).expect("ours");
        let dir = RelPath::from_bytes(b"big");
        let file = |i: u64| {
            let mut c = f(&format!("m{i:05}"), 1_000_000 + i);
            c.hash = Hash([i as u8; 32]);
            c
        };
        let mut files: Vec<CachedFile> = (0..1000).map(|i| file(i * 2)).collect();
        let mut drafts = HashMap::new();
        let write = |written: Vec<CachedFile>, drafts: &mut HashMap<RelPath, Delta>| {
            let mut change = BTreeMap::new();
            change.insert(
                dir.clone(),
                DirChange {
                    written,
                    fixed: Vec::new(),
                },
            );
            cache.record_chunk(change, drafts).expect("record");
        };
        write(files.clone(), &mut drafts);
        let before = chunks_of(&cache, b"big");
        assert!(before.len() > 10, "{} chunks", before.len());
        // Each chunk is keyed by its first name.
        for (k, v) in &before {
            let first = &decode(v).expect("decode")[0].name;
            assert_eq!(k, &chunk_key(b"big", first));
        }

        // One new name in the middle: one chunk is rewritten, the others stay as they were.
        let new = file(1001);
        write(vec![new.clone()], &mut drafts);
        files.push(new);
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let after = chunks_of(&cache, b"big");
        let kept = after.iter().filter(|c| before.contains(c)).count();
        assert!(
            kept + 2 >= before.len(),
            "{kept} of {} chunks kept",
            before.len()
        );
        assert_eq!(cache.snapshot().dir(&dir).expect("stored").files, files);

        // A name before the first chunk's, a fix, and a removal, through one scan delta.
        let first = file(0);
        let mut early = f("a-first", 7);
        early.hash = Hash([9; 32]);
        drafts.insert(
            dir.clone(),
            Delta {
                upserts: vec![early.clone()],
                removed: vec![files[500].name.clone()],
            },
        );
        let mut change = BTreeMap::new();
        let fixed_version = Token {
            ino: 42,
            ..Token::default()
        }
        .to_version();
        change.insert(
            dir.clone(),
            DirChange {
                written: Vec::new(),
                fixed: vec![(first.name.clone(), fixed_version.clone(), true)],
            },
        );
        cache.record_chunk(change, &mut drafts).expect("record");
        files.remove(500);
        files[0].rep = fixed_version;
        files[0].xattrs = true;
        files.insert(0, early);
        assert_eq!(cache.snapshot().dir(&dir).expect("stored").files, files);
        assert_eq!(
            chunks_of(&cache, b"big")[0].0,
            chunk_key(b"big", b"a-first")
        );

        // Read back by name: only those entries, present or not, whichever chunks they fall
        // in: before the first name, several in one chunk, a chunk's first, the last, after it.
        let keys: Vec<Vec<u8>> = chunks_of(&cache, b"big")
            .into_iter()
            .map(|(k, _)| k[b"big".len() + 1..].to_vec())
            .collect();
        assert!(keys.len() > 10);
        let mut names = vec![
            b"0-before".to_vec(),
            files[1].name.clone(),
            files[2].name.clone(),
            b"m00777".to_vec(),
            files[900].name.clone(),
            keys[7].clone(),
            files.last().expect("files").name.clone(),
            b"zz-after".to_vec(),
        ];
        names.sort();
        let wanted: Vec<CachedFile> = files
            .iter()
            .filter(|c| names.contains(&c.name))
            .cloned()
            .collect();
        assert_eq!(wanted.len(), 5);
        assert_eq!(
            cache
                .snapshot()
                .dir_only(&dir, &names)
                .expect("stored")
                .files,
            wanted
        );
        assert_eq!(
            cache
                .snapshot()
                .dir_only(&dir, &[b"0-before".to_vec()])
                .expect("stored")
                .files,
            Vec::new()
        );
        // Chunks between the wanted names are not read: one that cannot be decoded there
        // changes nothing (it would turn the whole lookup into "no record").
        let chunks = chunks_of(&cache, b"big");
        let (head, tail) = (&chunks[1], &chunks[chunks.len() - 2]);
        let ends = vec![
            decode(&head.1).expect("decode")[0].name.clone(),
            decode(&tail.1).expect("decode")[0].name.clone(),
        ];
        let before = cache.snapshot().dir_only(&dir, &ends).expect("stored");
        assert_eq!(before.files.len(), 2);
        let put = |key: &[u8], bytes: &[u8]| {
            let txn = cache.db.as_ref().expect("db").begin_write().expect("write");
            {
                let mut t = txn.open_table(DIRS).expect("table");
                t.insert(key, bytes).expect("insert");
            }
            txn.commit().expect("commit");
        };
        put(&chunks[4].0, b"\xff\xff not postcard");
        assert_eq!(
            cache
                .snapshot()
                .dir_only(&dir, &ends)
                .expect("stored")
                .files,
            before.files
        );
        assert!(cache
            .snapshot()
            .dir_only(&dir, &[chunks[4].0[b"big".len() + 1..].to_vec()])
            .is_none());
        put(&chunks[4].0, &chunks[4].1);
        // A directory without a record (here one whose name sorts right after `big`'s).
        assert!(cache
            .snapshot()
            .dir_only(&RelPath::from_bytes(b"big0"), &[b"f".to_vec()])
            .is_none());

        // Every name of a middle chunk removed: that chunk is gone, no empty one is left.
        let middle = decode(&chunks_of(&cache, b"big")[5].1).expect("decode");
        drafts.insert(
            dir.clone(),
            Delta {
                upserts: Vec::new(),
                removed: middle.iter().map(|c| c.name.clone()).collect(),
            },
        );
        cache
            .record_chunk(BTreeMap::new(), &mut drafts)
            .expect("record");
        let mut change = BTreeMap::new();
        change.insert(dir.clone(), DirChange::default());
        cache.record_chunk(change, &mut drafts).expect("record");
        files.retain(|c| !middle.contains(c));
        assert_eq!(cache.snapshot().dir(&dir).expect("stored").files, files);
        assert!(chunks_of(&cache, b"big")
            .iter()
            .all(|(_, v)| !decode(v).expect("decode").is_empty()));
    }
}
