//! Reading the source tree: list a directory, hash a file, read a link, and open a file as
//! the [`Content`] a replica installs. [`SourceTree`] is the interface scan, compare and apply
//! use; [`LocalSource`] reads a local directory through its root handle (`anchor`), so a
//! source directory swapped for a symlink mid-pass is never followed out of the source.
//!
//! A file's content is hashed while it is copied; when this pass already hashed it and its
//! token still matches, the bytes are copied in the kernel (`copy_file_range`) instead. A
//! file is opened once per copy and its token checked again once everything was written, so
//! a file that changed meanwhile is reported (`CopyError::Changed`), never installed torn.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::anchor::{self, Anchor, Resolver, BUF, CHUNK};
use crate::cancel;
use crate::error::Side;
use crate::model::{Entry, Hash, HashCounters, Meta, RelPath, SrcEntry, Token};
use crate::replica::{Content, CopyError, Sink};

/// Files at least this large are copied with hashing on a second thread (read and write on
/// one, sha256 on the other): sha256 alone runs at ~1.6 GB/s per core, about as fast as the
/// copy itself, so overlapping them nearly halves the time of a large file.
pub const PIPELINE_MIN: u64 = 8 << 20;

/// What scan, compare and apply read from the source.
pub trait SourceTree: Send + Sync {
    /// The root's metadata.
    fn root(&self) -> io::Result<Meta>;
    /// Lists a directory, sorted by name bytes.
    fn list(&self, dir: &RelPath) -> io::Result<Vec<SrcEntry>>;
    /// Hashes a file: its sha256 and the token it had while it was read.
    fn hash(&self, rel: &RelPath, counters: &HashCounters) -> io::Result<(Hash, Token)>;
    /// The target of a symlink.
    fn read_link(&self, rel: &RelPath) -> io::Result<PathBuf>;
    /// Opens a file to copy it. `known`: this pass's hash of it, trusted while the token is
    /// still the one given.
    fn open_file(
        &self,
        rel: &RelPath,
        known: Option<(Token, Hash)>,
    ) -> io::Result<Box<dyn Content + '_>>;
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

    fn list(&self, dir: &RelPath) -> io::Result<Vec<SrcEntry>> {
        Ok(self
            .anchor
            .list(dir)?
            .into_iter()
            .map(|(name, meta, version)| Entry {
                name,
                meta,
                version,
            })
            .collect())
    }

    fn hash(&self, rel: &RelPath, counters: &HashCounters) -> io::Result<(Hash, Token)> {
        self.anchor.hash(rel, counters)
    }

    fn read_link(&self, rel: &RelPath) -> io::Result<PathBuf> {
        self.anchor.read_link(rel)
    }

    fn open_file(
        &self,
        rel: &RelPath,
        known: Option<(Token, Hash)>,
    ) -> io::Result<Box<dyn Content + '_>> {
        let (file, meta, token) = self.anchor.open_file(rel)?;
        let known = known.and_then(|(t, h)| (t == token).then_some(h));
        Ok(Box::new(SourceFile {
            file,
            meta,
            token,
            known,
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
    /// The hash this pass computed for exactly this token: no need to hash again.
    known: Option<Hash>,
    /// The hash computed while writing.
    digest: Option<Hash>,
    copied: u64,
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
}

fn interrupted() -> CopyError {
    CopyError::Replica(io::Error::new(io::ErrorKind::Interrupted, "interrupted"))
}

/// Read `input` up to `size` bytes (the size fstat gave; the token check after the copy
/// catches a file that changed size meanwhile) into `out`, hashing when `hasher` is given.
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

/// `copy_loop` with hashing for large files: this thread reads and writes, a scoped thread
/// hashes the same buffers; buffers cycle between the two through channels (4 MiB in flight
/// at most).
fn copy_pipelined(input: &mut File, out: &mut dyn Write) -> Result<(Hash, u64), CopyError> {
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
                break Err(interrupted());
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

impl Content for SourceFile {
    fn meta(&self) -> &Meta {
        &self.meta
    }

    fn token(&self) -> Token {
        self.token
    }

    fn write_into(&mut self, out: Sink<'_>) -> Result<u64, CopyError> {
        let size = self.meta.size;
        let total = match (out, self.known) {
            (Sink::File(f), Some(_)) => {
                let done = self.kernel_copy(f);
                done + copy_loop(&mut self.file, f, size - done.min(size), None)?
            }
            (Sink::File(f), None) if size >= PIPELINE_MIN => {
                let (hash, n) = copy_pipelined(&mut self.file, f)?;
                self.digest = Some(hash);
                n
            }
            (Sink::Stream(w), None) if size >= PIPELINE_MIN => {
                let (hash, n) = copy_pipelined(&mut self.file, w)?;
                self.digest = Some(hash);
                n
            }
            (sink, known) => {
                let out: &mut dyn Write = match sink {
                    Sink::File(f) => f,
                    Sink::Stream(w) => w,
                };
                let mut hasher = Sha256::new();
                let hashing = known.is_none();
                let n = copy_loop(&mut self.file, out, size, hashing.then_some(&mut hasher))?;
                if hashing {
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
