//! Reading the source tree: list a directory, hash a file, read a link, and open a file as
//! the [`Content`] a replica installs. [`SourceTree`] is the interface scan, compare and apply
//! use; [`LocalSource`] reads a local directory through its root handle (`anchor`), so a
//! source directory swapped for a symlink mid-pass is never followed out of the source.
//!
//! A file's content is hashed while it is copied; when this pass already hashed it and its
//! token still matches, the bytes are copied in the kernel (`copy_file_range`) instead. A
//! file with holes is copied extent by extent (`SEEK_DATA`/`SEEK_HOLE`), so its holes stay
//! holes and are hashed as zeros, never read. A file is opened once per copy and its token
//! checked again once everything was written, so a file that changed meanwhile is reported
//! (`CopyError::Changed`), never installed torn.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use sha2::{Digest, Sha256};

use crate::anchor::{self, Anchor, Resolver, BUF, CHUNK};
use crate::cancel;
use crate::error::Side;
use crate::model::{
    among, Entry, Hash, HashCounters, Kind, Meta, RelPath, SrcEntry, Token, Xattrs,
};
use crate::replica::{Content, CopyError, Sink};

/// Files at least this large are copied with hashing on a second thread (read and write on
/// one, sha256 on the other): sha256 alone runs at ~1.6 GB/s per core, about as fast as the
/// copy itself, so overlapping them nearly halves the time of a large file.
pub const PIPELINE_MIN: u64 = 8 << 20;

/// What scan, compare and apply read from the source.
pub trait SourceTree: Send + Sync {
    /// The root's metadata.
    fn root(&self) -> io::Result<Meta>;
    /// The device of the root's filesystem (what `--one-file-system` stays on).
    fn root_dev(&self) -> u64;
    /// Whether the root's filesystem is known to keep fine timestamps (see
    /// [`fine_timestamps_type`]). Unknown: no.
    fn fine_timestamps(&self) -> bool {
        false
    }
    /// Lists a directory, sorted by name bytes.
    fn list(&self, dir: &RelPath) -> io::Result<Vec<SrcEntry>>;
    /// The entries of a directory among `names` (sorted by name bytes), read one by one
    /// where that is cheaper than listing it; a name that does not exist is left out.
    fn list_only(&self, dir: &RelPath, names: &[OsString]) -> io::Result<Vec<SrcEntry>> {
        Ok(among(self.list(dir)?, names))
    }
    /// Hashes a file: its sha256 and the token it had while it was read.
    fn hash(&self, rel: &RelPath, counters: &HashCounters) -> io::Result<(Hash, Token)>;
    /// The target of a symlink.
    fn read_link(&self, rel: &RelPath) -> io::Result<PathBuf>;
    /// The extended attributes of a file or directory (all this process may read).
    fn xattrs(&self, rel: &RelPath, kind: Kind) -> io::Result<Xattrs>;
    /// Opens a file to copy it. `known`: this pass's hash of it, trusted while the token is
    /// still the one given.
    fn open_file(
        &self,
        rel: &RelPath,
        known: Option<(Token, Hash)>,
    ) -> io::Result<Box<dyn Content + '_>>;
}

/// Whether a filesystem type (`statfs`'s `f_type`) is one known to keep inode times to the
/// nanosecond, stamped by the kernel from its own clock: ext4 (and ext2/ext3, which share
/// its magic number), xfs, btrfs and tmpfs. The kernel takes those times from its coarse
/// clock, which moves once a tick (every 1 to 10 ms, at HZ=1000 to 100), so a write after a
/// file was hashed shows in its ctime unless it falls in the same tick. Every other type
/// gets no for an answer: FAT keeps 2 s, exFAT 10 ms, a network filesystem stamps with the
/// server's clock, FUSE with whatever its daemon says, and the rest are not vouched for.
/// An ext2/3/4 filesystem with 128-byte inodes keeps whole seconds; its ctimes have no
/// sub-second part, which is how `model::Racy` tells.
pub fn fine_timestamps_type(f_type: u32) -> bool {
    const EXT4: u32 = 0xEF53;
    const XFS: u32 = 0x5846_5342;
    const BTRFS: u32 = 0x9123_683E;
    const TMPFS: u32 = 0x0102_1994;
    matches!(f_type, EXT4 | XFS | BTRFS | TMPFS)
}

fn src_entry((name, meta, version): (OsString, Meta, Token)) -> SrcEntry {
    Entry {
        name,
        meta,
        version,
    }
}

/// A local source directory.
pub struct LocalSource {
    anchor: Anchor,
}

impl LocalSource {
    pub fn open(path: &Path) -> io::Result<LocalSource> {
        Ok(LocalSource {
            anchor: Anchor::open(path, Side::Source, Resolver::Auto, false)?,
        })
    }
}

impl SourceTree for LocalSource {
    fn root(&self) -> io::Result<Meta> {
        Ok(self.anchor.stat_root()?.0)
    }

    fn root_dev(&self) -> u64 {
        self.anchor.dev()
    }

    fn fine_timestamps(&self) -> bool {
        rustix::fs::fstatfs(self.anchor.root_fd())
            .is_ok_and(|st| fine_timestamps_type(st.f_type as u32))
    }

    fn list(&self, dir: &RelPath) -> io::Result<Vec<SrcEntry>> {
        Ok(self.anchor.list(dir)?.into_iter().map(src_entry).collect())
    }

    fn list_only(&self, dir: &RelPath, names: &[OsString]) -> io::Result<Vec<SrcEntry>> {
        Ok(self
            .anchor
            .list_only(dir, names)?
            .into_iter()
            .map(src_entry)
            .collect())
    }

    fn hash(&self, rel: &RelPath, counters: &HashCounters) -> io::Result<(Hash, Token)> {
        self.anchor.hash(rel, counters)
    }

    fn read_link(&self, rel: &RelPath) -> io::Result<PathBuf> {
        self.anchor.read_link(rel)
    }

    fn xattrs(&self, rel: &RelPath, kind: Kind) -> io::Result<Xattrs> {
        self.anchor.xattrs(rel, kind)
    }

    fn open_file(
        &self,
        rel: &RelPath,
        known: Option<(Token, Hash)>,
    ) -> io::Result<Box<dyn Content + '_>> {
        let opened = self.anchor.open_file(rel)?;
        let token = opened.token;
        Ok(Box::new(SourceFile {
            known: known.and_then(|(t, h)| (t == token).then_some(h)),
            file: opened.file,
            meta: opened.meta,
            token,
            sparse: opened.sparse,
            digest: None,
            copied: 0,
        }))
    }
}

/// An open source file on its way into the replica.
pub struct SourceFile {
    file: File,
    meta: Meta,
    token: Token,
    /// It may have holes: copied extent by extent, holes left as holes.
    sparse: bool,
    /// The hash this pass computed for exactly this token: no need to hash again.
    known: Option<Hash>,
    /// The hash computed while writing.
    digest: Option<Hash>,
    copied: u64,
}

fn interrupted() -> CopyError {
    CopyError::Replica(io::Error::new(io::ErrorKind::Interrupted, "interrupted"))
}

/// Read `input` up to `size` bytes (the size fstat gave; the token check after the copy
/// catches a file that changed size meanwhile) into `out`, hashing when `hasher` is given.
/// The copy of small files: one thread, one reused buffer.
fn copy_loop(
    input: &mut File,
    out: &mut dyn Write,
    size: u64,
    mut hasher: Option<&mut Sha256>,
) -> Result<u64, CopyError> {
    let mut total = 0u64;
    BUF.with(|buf| -> Result<(), CopyError> {
        let mut buf = buf.borrow_mut();
        while total < size {
            if cancel::requested() {
                return Err(interrupted());
            }
            let n = match input.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CopyError::Source(e)),
            };
            if let Some(h) = hasher.as_deref_mut() {
                h.update(&buf[..n]);
            }
            out.write_all(&buf[..n]).map_err(CopyError::Replica)?;
            total += n as u64;
        }
        Ok(())
    })?;
    Ok(total)
}

/// What the hashing thread is fed: a buffer of data (sent back once hashed), or a run of
/// zeros (a hole, never read).
enum Piece {
    Data(Vec<u8>, usize),
    Zeros(u64),
}

/// sha256 on a second thread, fed the buffers the copying thread has written: sha256 alone
/// runs at ~1.6 GB/s per core, about as fast as the copy itself, so overlapping them nearly
/// halves the time of a large file, and a sparse file's holes are hashed while its data is
/// copied. Four buffers of `CHUNK` cycle between the threads (4 MiB in flight at most).
struct BgHasher {
    tx: Option<mpsc::SyncSender<Piece>>,
    back: mpsc::Receiver<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<[u8; 32]>>,
}

impl BgHasher {
    fn start() -> BgHasher {
        let (tx, rx) = mpsc::sync_channel::<Piece>(4);
        let (back_tx, back) = mpsc::channel::<Vec<u8>>();
        for _ in 0..4 {
            back_tx.send(vec![0u8; CHUNK]).expect("receiver alive");
        }
        let thread = std::thread::spawn(move || {
            let mut h = Sha256::new();
            for piece in rx {
                match piece {
                    Piece::Data(buf, n) => {
                        h.update(&buf[..n]);
                        let _ = back_tx.send(buf);
                    }
                    Piece::Zeros(n) => anchor::hash_zeros(&mut h, n),
                }
            }
            h.finalize().into()
        });
        BgHasher {
            tx: Some(tx),
            back,
            thread: Some(thread),
        }
    }

    fn stopped() -> CopyError {
        CopyError::Replica(io::Error::other("hashing thread stopped"))
    }

    fn send(&self, piece: Piece) -> Result<(), CopyError> {
        let tx = self.tx.as_ref().ok_or_else(Self::stopped)?;
        tx.send(piece).map_err(|_| Self::stopped())
    }

    /// A free buffer (waits while all four are being hashed).
    fn buffer(&self) -> Result<Vec<u8>, CopyError> {
        self.back.recv().map_err(|_| Self::stopped())
    }

    fn finish(mut self) -> Result<Hash, CopyError> {
        drop(self.tx.take());
        let thread = self.thread.take().ok_or_else(Self::stopped)?;
        thread.join().map(Hash).map_err(|_| Self::stopped())
    }
}

impl Drop for BgHasher {
    fn drop(&mut self) {
        // An abandoned copy: close the channel so the thread ends; it is not waited for.
        drop(self.tx.take());
    }
}

/// Writes `n` zero bytes to a stream (a hole, for a replica that cannot keep holes).
fn write_zeros(w: &mut dyn Write, mut n: u64) -> Result<(), CopyError> {
    while n > 0 {
        let k = n.min(anchor::ZEROS.len() as u64) as usize;
        w.write_all(&anchor::ZEROS[..k])
            .map_err(CopyError::Replica)?;
        n -= k as u64;
    }
    Ok(())
}

/// Copies the data `extents` of `input` (`size` bytes in all) into `out`, hashing on a
/// second thread when `hash`: into a file, each extent at its own offset, so the holes
/// between them stay holes, and the file is then given its size; into a stream, holes as
/// zeros. Returns the digest (when hashing) and the data bytes read.
fn copy_extents(
    input: &File,
    out: Sink<'_>,
    size: u64,
    extents: &[(u64, u64)],
    hash: bool,
) -> Result<(Option<Hash>, u64), CopyError> {
    use std::os::unix::fs::FileExt;
    let hasher = hash.then(BgHasher::start);
    let mut spare: Option<Vec<u8>> = None;
    let (file, mut stream) = match out {
        Sink::File(f) => (Some(f), None),
        Sink::Stream(w) => (None, Some(w)),
    };
    let mut pos = 0u64;
    let mut data = 0u64;
    for &(start, end) in extents.iter().chain(std::iter::once(&(size, size))) {
        if start > pos {
            if let Some(h) = &hasher {
                h.send(Piece::Zeros(start - pos))?;
            }
            if let Some(w) = stream.as_mut() {
                write_zeros(*w, start - pos)?;
            }
        }
        let mut off = start;
        while off < end {
            if cancel::requested() {
                return Err(interrupted());
            }
            let mut buf = match &hasher {
                Some(h) => h.buffer()?,
                None => spare.take().unwrap_or_else(|| vec![0u8; CHUNK]),
            };
            let want = (end - off).min(CHUNK as u64) as usize;
            let n = match input.read_at(&mut buf[..want], off) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CopyError::Source(e)),
            };
            let written = match (&file, stream.as_mut()) {
                (Some(f), _) => f.write_all_at(&buf[..n], off),
                (None, Some(w)) => w.write_all(&buf[..n]),
                (None, None) => Ok(()),
            };
            written.map_err(CopyError::Replica)?;
            match &hasher {
                Some(h) => h.send(Piece::Data(buf, n))?,
                None => spare = Some(buf),
            }
            off += n as u64;
            data += n as u64;
        }
        pos = pos.max(end);
    }
    if let Some(f) = file {
        f.set_len(size).map_err(CopyError::Replica)?;
    }
    let digest = match hasher {
        Some(h) => Some(h.finish()?),
        None => None,
    };
    Ok((digest, data))
}

impl SourceFile {
    /// Copies in the kernel; on any failure, the caller goes on with the read/write loop
    /// from the current offsets, which tells a read error from a write error.
    fn kernel_copy(&mut self, out: &File) -> u64 {
        let mut total = 0u64;
        while total < self.meta.size && !cancel::requested() {
            let want = (self.meta.size - total).min(CHUNK as u64 * 64) as usize;
            match rustix::fs::copy_file_range(&self.file, None, out, None, want) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        total
    }

    /// Copies the data extents in the kernel, each at its offset (a known hash: nothing to
    /// read here). An extent the kernel does not copy whole is finished by `copy_extents`.
    fn kernel_copy_extents(
        &mut self,
        out: &mut File,
        extents: &[(u64, u64)],
    ) -> Result<u64, CopyError> {
        let mut data = 0u64;
        for &(start, end) in extents {
            let (mut off_in, mut off_out) = (start, start);
            while off_in < end && !cancel::requested() {
                let want = (end - off_in).min(CHUNK as u64 * 64) as usize;
                match rustix::fs::copy_file_range(
                    &self.file,
                    Some(&mut off_in),
                    &*out,
                    Some(&mut off_out),
                    want,
                ) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => data += n as u64,
                }
            }
            if off_in < end {
                let (_, n) =
                    copy_extents(&self.file, Sink::File(out), end, &[(off_in, end)], false)?;
                data += n;
            }
        }
        out.set_len(self.meta.size).map_err(CopyError::Replica)?;
        Ok(data)
    }
}

impl Content for SourceFile {
    fn meta(&self) -> &Meta {
        &self.meta
    }

    fn token(&self) -> Token {
        self.token
    }

    fn known_hash(&self) -> Option<Hash> {
        self.known
    }

    fn rewind(&mut self) -> io::Result<()> {
        use std::io::Seek;
        self.file.seek(io::SeekFrom::Start(0))?;
        self.digest = None;
        self.copied = 0;
        Ok(())
    }

    fn write_into(&mut self, out: Sink<'_>) -> Result<u64, CopyError> {
        let size = self.meta.size;
        let extents = if self.sparse {
            Some(anchor::data_extents(&self.file, size).map_err(CopyError::Source)?)
        } else {
            None
        };
        let hash = self.known.is_none();
        let total = match (out, extents) {
            // Holes: only the data extents are read and written.
            (Sink::File(f), Some(ext)) if !hash => {
                self.kernel_copy_extents(f, &ext)?;
                size
            }
            (out, Some(ext)) => {
                let (digest, _) = copy_extents(&self.file, out, size, &ext, hash)?;
                self.digest = digest;
                size
            }
            // A known hash: the kernel copies, nothing is read here.
            (Sink::File(f), None) if !hash => {
                let done = self.kernel_copy(f);
                done + copy_loop(&mut self.file, f, size - done.min(size), None)?
            }
            // Large: hashed on a second thread while copied.
            (out, None) if size >= PIPELINE_MIN => {
                let (digest, n) = copy_extents(&self.file, out, size, &[(0, size)], hash)?;
                self.digest = digest;
                n
            }
            (sink, None) => {
                let out: &mut dyn Write = match sink {
                    Sink::File(f) => f,
                    Sink::Stream(w) => w,
                };
                let mut hasher = Sha256::new();
                let n = copy_loop(&mut self.file, out, size, hash.then_some(&mut hasher))?;
                if hash {
                    self.digest = Some(Hash(hasher.finalize().into()));
                }
                n
            }
        };
        if cancel::requested() {
            return Err(interrupted());
        }
        self.copied = total;
        Ok(total)
    }

    fn xattrs(&self) -> io::Result<Xattrs> {
        anchor::read_xattrs(&self.file)
    }

    fn finish(&mut self) -> Result<Hash, CopyError> {
        let now = anchor::token_of(&self.file).map_err(CopyError::Source)?;
        if now != self.token || self.copied != self.meta.size {
            return Err(CopyError::Changed);
        }
        self.known
            .or(self.digest)
            .ok_or_else(|| CopyError::Source(io::Error::other("finished before it was written")))
    }
}
