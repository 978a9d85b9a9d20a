//! The replica interface: the ONLY code that writes to the replica. Every access scan, compare
//! and apply make to the replica goes through [`Replica`] (list a directory, hash a file, read a
//! link, install a file or link atomically, set metadata, remove, back up, make durable), so a
//! replica that is not a local directory (SFTP, object store through OpenDAL) can later be a
//! second implementation of these few methods. Source-side reads that several stages share
//! (listing, hashing) live here too, as free functions.
//!
//! Files land atomically: content goes to an exclusive `.syncer-*.tmp` file in the target's
//! directory, is hashed as it is written, gets its mode, owner and times, and is renamed over
//! the target. A reader of the replica sees the old file or the new one, never a torn one.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::fs::{self, File, FileTimes, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::cancel;
use crate::model::{Entry, Hash, Kind, Meta, RelPath, Stamp, Token};

/// Read and write in chunks of this size: large enough for disk speed, small enough that a
/// cancelled pass stops within milliseconds and that the per-thread buffer stays small.
const CHUNK: usize = 1 << 20;

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; CHUNK]);
}

/// Counts of content actually read to hash it: the proof that the cache works.
#[derive(Default)]
pub struct HashCounters {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
}

/// Lists a directory: every entry with its `lstat`, sorted by name bytes. An entry that
/// vanishes between `readdir` and `lstat` is left out, as if it had never been there.
pub fn list_dir(dir: &Path) -> io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for item in fs::read_dir(dir)? {
        let item = item?;
        match item.metadata() {
            Ok(m) => out.push(Entry {
                name: item.file_name(),
                meta: Meta::of(&m),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    out.sort_unstable_by(|a, b| {
        use std::os::unix::ffi::OsStrExt;
        a.name.as_bytes().cmp(b.name.as_bytes())
    });
    Ok(out)
}

fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
}

/// Hashes a regular file without following a symlink. Returns the digest and the stat token
/// the file had while it was read; fails if the file changed during the read.
pub fn hash_file(path: &Path, counters: &HashCounters) -> io::Result<(Hash, Token)> {
    let mut file = open_nofollow(path)?;
    let before = Token::of(&file.metadata()?);
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    BUF.with(|buf| -> io::Result<()> {
        let mut buf = buf.borrow_mut();
        // Read up to the size fstat gave, not to EOF: a file that grew or shrank changes
        // its token, which the check after the loop catches, and this saves a read per file.
        while total < before.size {
            if cancel::requested() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
            }
            let n = match file.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        Ok(())
    })?;
    let after = Token::of(&file.metadata()?);
    if after != before || total != before.size {
        return Err(io::Error::other("file changed while it was read"));
    }
    counters.files.fetch_add(1, Ordering::Relaxed);
    counters.bytes.fetch_add(total, Ordering::Relaxed);
    Ok((Hash(hasher.finalize().into()), before))
}

pub fn system_time(stamp: Stamp) -> SystemTime {
    if stamp.sec >= 0 {
        UNIX_EPOCH + Duration::new(stamp.sec as u64, stamp.nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(stamp.sec.unsigned_abs())
            + Duration::from_nanos(stamp.nsec as u64)
    }
}

fn file_time(stamp: Stamp) -> filetime::FileTime {
    filetime::FileTime::from_unix_time(stamp.sec, stamp.nsec as u32)
}

/// Files at least this large are copied with hashing on a second thread (read and write on
/// one, sha256 on the other): sha256 alone runs at ~1.6 GB/s per core, about as fast as the
/// copy itself, so overlapping them nearly halves the time of a large file.
pub const PIPELINE_MIN: u64 = 8 << 20;

/// What this pass already knows about a file it is about to copy.
#[derive(Clone, Copy, Debug)]
pub enum Hint {
    /// The source's token and hash, hashed by this pass: if the token still matches, the
    /// content is copied in the kernel (`copy_file_range`) without hashing it again.
    Known(Token, Hash),
    /// The replica already holds content with this hash (a large file whose source token
    /// changed): the copy hashes the source as it goes, and if the hash turns out equal the
    /// temp file is dropped, because only metadata changed.
    /// The token is the replica file's, as scanned: the copy is only dropped if the replica
    /// file still has it (otherwise it changed meanwhile and is replaced).
    Unless(Hash, Token),
}

/// The result of installing one file into the replica.
#[derive(Clone, Copy, Debug)]
pub struct Copied {
    /// The source's token while it was copied (what the cache records for the source).
    pub src: Token,
    /// The replica file's token after the rename.
    pub rep: Token,
    pub hash: Hash,
    pub bytes: u64,
    /// The source's metadata at the copy (what was applied to the replica file).
    pub meta: Meta,
    /// `Hint::Unless` matched: nothing was installed, the replica's content is already equal
    /// (and `rep` is the replica file's unchanged token).
    pub unchanged: bool,
}

#[derive(Debug)]
pub enum CopyError {
    /// The source changed while it was copied; the temp file was dropped.
    Changed,
    /// Reading the source failed (it may have vanished).
    Source(io::Error),
    /// Writing into the replica failed.
    Replica(io::Error),
}

/// A local replica directory.
pub struct Replica {
    root: PathBuf,
    /// Running as root: owners and groups are mirrored too.
    pub chown: bool,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Replica {
    pub fn new(root: PathBuf) -> Replica {
        Replica {
            root,
            chown: nix::unistd::geteuid().is_root(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn abs(&self, rel: &RelPath) -> PathBuf {
        rel.under(&self.root)
    }

    /// Creates the replica root (and missing parents) if it does not exist yet.
    pub fn create_root(&self) -> io::Result<()> {
        fs::create_dir_all(&self.root)
    }

    pub fn list(&self, rel: &RelPath) -> io::Result<Vec<Entry>> {
        list_dir(&self.abs(rel))
    }

    pub fn hash(&self, rel: &RelPath, counters: &HashCounters) -> io::Result<(Hash, Token)> {
        hash_file(&self.abs(rel), counters)
    }

    pub fn read_link(&self, rel: &RelPath) -> io::Result<PathBuf> {
        fs::read_link(self.abs(rel))
    }

    /// Removes a leftover temp file of an interrupted pass.
    pub fn remove_temp(&self, rel: &RelPath) -> io::Result<()> {
        fs::remove_file(self.abs(rel))
    }

    /// Creates a directory, private until its final mode is set after its children.
    pub fn mkdir(&self, rel: &RelPath) -> io::Result<()> {
        fs::DirBuilder::new().mode(0o700).create(self.abs(rel))
    }

    /// Copies `src` to `rel` atomically; see the module documentation and [`Hint`].
    pub fn install_file(
        &self,
        rel: &RelPath,
        src: &Path,
        hint: Option<Hint>,
    ) -> Result<Copied, CopyError> {
        let mut input = open_nofollow(src).map_err(CopyError::Source)?;
        let m1 = input.metadata().map_err(CopyError::Source)?;
        let meta = Meta::of(&m1);
        if meta.kind != Kind::File {
            return Err(CopyError::Source(io::Error::other(
                "no longer a regular file",
            )));
        }
        let target = self.abs(rel);
        let dir = target.parent().unwrap_or(&self.root);
        let mut tmp = tempfile::Builder::new()
            .prefix(".syncer-")
            .suffix(".tmp")
            .rand_bytes(10)
            .tempfile_in(dir)
            .map_err(CopyError::Replica)?;
        let (hash, bytes) = match hint {
            Some(Hint::Known(token, hash)) if token == meta.token => {
                let n = io::copy(&mut input, tmp.as_file_mut()).map_err(classify)?;
                (hash, n)
            }
            _ => copy_hashing(&mut input, tmp.as_file_mut(), meta.size)?,
        };
        if let Some(Hint::Unless(old, rep_token)) = hint {
            let replica_unchanged =
                fs::symlink_metadata(self.abs(rel)).is_ok_and(|m| Token::of(&m) == rep_token);
            if old == hash && bytes == meta.size && replica_unchanged {
                let m2 = input.metadata().map_err(CopyError::Source)?;
                if Token::of(&m2) != meta.token {
                    return Err(CopyError::Changed);
                }
                return Ok(Copied {
                    src: meta.token,
                    rep: rep_token,
                    hash,
                    bytes: 0,
                    meta,
                    unchanged: true,
                });
            }
        }
        if bytes != meta.size {
            return Err(CopyError::Changed);
        }
        let out = tmp.as_file();
        if self.chown {
            std::os::unix::fs::fchown(out, Some(meta.uid), Some(meta.gid))
                .map_err(CopyError::Replica)?;
        }
        out.set_permissions(Permissions::from_mode(meta.perm))
            .map_err(CopyError::Replica)?;
        out.set_times(
            FileTimes::new()
                .set_accessed(system_time(meta.atime))
                .set_modified(system_time(meta.mtime)),
        )
        .map_err(CopyError::Replica)?;
        let m2 = input.metadata().map_err(CopyError::Source)?;
        if Token::of(&m2) != meta.token {
            return Err(CopyError::Changed);
        }
        let file = tmp
            .persist(&target)
            .map_err(|e| CopyError::Replica(e.error))?;
        let rep = Token::of(&file.metadata().map_err(CopyError::Replica)?);
        Ok(Copied {
            src: meta.token,
            rep,
            hash,
            bytes,
            meta,
            unchanged: false,
        })
    }

    /// Creates or replaces the symlink `rel` atomically (made under a temp name, renamed).
    pub fn install_link(&self, rel: &RelPath, target: &Path, meta: &Meta) -> io::Result<()> {
        let dest = self.abs(rel);
        let dir = dest.parent().unwrap_or(&self.root);
        let tmp = dir.join(format!(
            ".syncer-{}-{}.tmp",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::os::unix::fs::symlink(target, &tmp)?;
        let finish = || -> io::Result<()> {
            self.set_meta(&tmp, meta)?;
            fs::rename(&tmp, &dest)
        };
        finish().inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    /// Sets owner (when root), mode and times of `rel` without following a symlink, and
    /// returns its new token. A file or directory is changed through a descriptor opened with
    /// `O_NOFOLLOW`; with `expect`, a file whose token is no longer the scanned one is left
    /// alone (`Ok(None)`): it changed during the pass, and recording the old hash for it would
    /// let the cache vouch for content it never saw.
    pub fn fix_meta(
        &self,
        rel: &RelPath,
        meta: &Meta,
        expect: Option<Token>,
    ) -> io::Result<Option<Token>> {
        let path = self.abs(rel);
        if meta.kind == Kind::Symlink {
            self.set_meta(&path, meta)?;
            return Ok(Some(Token::of(&fs::symlink_metadata(&path)?)));
        }
        let mut flags = nix::fcntl::OFlag::O_NOFOLLOW;
        if meta.kind == Kind::Dir {
            flags |= nix::fcntl::OFlag::O_DIRECTORY;
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(flags.bits())
            .open(&path)?;
        if let Some(token) = expect {
            if Token::of(&file.metadata()?) != token {
                return Ok(None);
            }
        }
        if self.chown {
            std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid))?;
        }
        file.set_permissions(Permissions::from_mode(meta.perm))?;
        file.set_times(
            FileTimes::new()
                .set_accessed(system_time(meta.atime))
                .set_modified(system_time(meta.mtime)),
        )?;
        Ok(Some(Token::of(&file.metadata()?)))
    }

    /// Owner and times of a symlink (its mode means nothing on Linux), never following it.
    fn set_meta(&self, path: &Path, meta: &Meta) -> io::Result<()> {
        if self.chown {
            std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))?;
        }
        filetime::set_symlink_file_times(path, file_time(meta.atime), file_time(meta.mtime))
    }

    /// Removes an entry without following symlinks: a file, link or special file is
    /// unlinked, a directory is removed with everything below it.
    pub fn remove(&self, rel: &RelPath, kind: Kind) -> io::Result<()> {
        let path = self.abs(rel);
        match kind {
            Kind::Dir => fs::remove_dir_all(path),
            _ => fs::remove_file(path),
        }
    }

    /// Moves `rel` to `backup/rel`: a rename that never replaces an existing backup, or
    /// across filesystems a copy, made durable (`syncfs` of the backup's filesystem) before
    /// the replica entry is removed.
    pub fn backup(&self, rel: &RelPath, backup: &Path) -> io::Result<()> {
        let from = self.abs(rel);
        let to = rel.under(backup);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        let moved = nix::fcntl::renameat2(
            None,
            &from,
            None,
            &to,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        );
        match moved {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EXDEV) => {
                copy_tree(&from, &to)?;
                sync_fs_of(&to)?;
                let kind = Kind::of(&fs::symlink_metadata(&from)?);
                self.remove(rel, kind)
            }
            Err(e) => Err(io::Error::from(e)),
        }
    }

    /// Makes everything written under `rel` durable: `syncfs` of the filesystem holding it
    /// (differs from the root's when a filesystem is mounted inside the replica).
    pub fn sync_at(&self, rel: &RelPath) -> io::Result<()> {
        sync_fs_of(&self.abs(rel))
    }

    /// Makes everything written to the replica's filesystem durable (`syncfs`).
    pub fn sync(&self) -> io::Result<()> {
        sync_fs_of(&self.root)
    }
}

/// `syncfs` of the filesystem holding `path`.
fn sync_fs_of(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    nix::unistd::syncfs(file.as_raw_fd()).map_err(io::Error::from)
}

/// Read errors come from the source, write errors from the replica; `io::copy` does both.
fn classify(e: io::Error) -> CopyError {
    CopyError::Replica(e)
}

fn copy_hashing(input: &mut File, out: &mut File, size: u64) -> Result<(Hash, u64), CopyError> {
    if size >= PIPELINE_MIN {
        return copy_hashing_pipelined(input, out);
    }
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    BUF.with(|buf| -> Result<(), CopyError> {
        let mut buf = buf.borrow_mut();
        // Up to the size fstat gave (see `hash_file`); the token check after the copy
        // catches a file that changed size meanwhile.
        while total < size {
            if cancel::requested() {
                return Err(CopyError::Replica(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "interrupted",
                )));
            }
            let n = match input.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CopyError::Source(e)),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(CopyError::Replica)?;
            total += n as u64;
        }
        Ok(())
    })?;
    Ok((Hash(hasher.finalize().into()), total))
}

/// `copy_hashing` for large files: this thread reads and writes, a scoped thread hashes the
/// same buffers; buffers cycle between the two through channels (4 MiB in flight at most).
fn copy_hashing_pipelined(input: &mut File, out: &mut File) -> Result<(Hash, u64), CopyError> {
    use std::sync::mpsc;
    let (to_hasher, hasher_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(4);
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..4 {
        back_tx.send(vec![0u8; CHUNK]).expect("receiver alive");
    }
    std::thread::scope(|scope| {
        let hasher = scope.spawn(move || {
            let mut h = Sha256::new();
            for (buf, n) in hasher_rx {
                h.update(&buf[..n]);
                let _ = back_tx.send(buf);
            }
            h.finalize()
        });
        let mut total = 0u64;
        let copied = loop {
            if cancel::requested() {
                break Err(CopyError::Replica(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "interrupted",
                )));
            }
            let Ok(mut buf) = back_rx.recv() else {
                break Err(CopyError::Replica(io::Error::other(
                    "hashing thread stopped",
                )));
            };
            let n = match input.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    let _ = to_hasher.send((buf, 0));
                    continue;
                }
                Err(e) => break Err(CopyError::Source(e)),
            };
            if let Err(e) = out.write_all(&buf[..n]) {
                break Err(CopyError::Replica(e));
            }
            total += n as u64;
            if to_hasher.send((buf, n)).is_err() {
                break Err(CopyError::Replica(io::Error::other(
                    "hashing thread stopped",
                )));
            }
        };
        drop(to_hasher);
        let digest = hasher.join().expect("the hashing thread does not panic");
        copied.map(|()| (Hash(digest.into()), total))
    })
}

/// Recursive copy preserving links, used only for a backup across filesystems.
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    match Kind::of(&meta) {
        Kind::Dir => {
            fs::create_dir_all(to)?;
            for entry in list_dir(from)? {
                copy_tree(&from.join(&entry.name), &to.join(&entry.name))?;
            }
            Ok(())
        }
        Kind::Symlink => std::os::unix::fs::symlink(fs::read_link(from)?, to),
        Kind::File => fs::copy(from, to).map(|_| ()),
        Kind::Special => Ok(()),
    }
}

/// True when a name is syncer's temp name (used by the scan to skip and clean them).
pub fn is_temp(name: &OsStr) -> bool {
    crate::model::is_temp_name(name)
}

impl Replica {
    /// Keeps a copy of the replica file `rel` at `backup/rel` before it is overwritten: a
    /// hard link on the same filesystem (the replica file stays in place until the atomic
    /// rename replaces it), a copy otherwise.
    pub fn backup_copy(&self, rel: &RelPath, backup: &Path) -> io::Result<()> {
        let from = self.abs(rel);
        let to = rel.under(backup);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        // `link` never replaces an existing backup; the copy across filesystems is created
        // exclusively too, and made durable before the original can be replaced.
        match fs::hard_link(&from, &to) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
                let mut input = open_nofollow(&from)?;
                let mut out = OpenOptions::new().write(true).create_new(true).open(&to)?;
                io::copy(&mut input, &mut out)?;
                out.sync_all()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}
