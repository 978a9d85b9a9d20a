//! A bucket as the source of a pass (a restore, `--source s3://…`): its objects' versions
//! as source tokens, and their content read in ranges that must all come from one ETag,
//! hashed on the way and checked against the stored sha256.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Discard, S3Replica, PART};
use crate::model::{
    Entry, Hash, HashCounters, Kind, Meta, RelPath, SrcEntry, Token, Version, Xattrs,
};
use crate::replica::{Content, CopyError, Replica, Sink};
use crate::source::SourceTree;

/// The device number a bucket's source tokens carry (no local file has it).
pub(super) const S3_DEV: u64 = 0x5333_0000_0000_0000;

/// A bucket object's source token: its version (size and ETag) folded into the inode field,
/// its mtime; never racy (ctime 0), since an object changes only by a new ETag. The fold is
/// the first 8 bytes of the version's sha256: the token is kept in the hash cache, so it must
/// come out the same from every build (std's `DefaultHasher` is documented as unstable
/// across releases: a toolchain upgrade would have made every cached token look changed).
pub(super) fn token_of(version: &Version, meta: &Meta) -> Token {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(version.0.as_slice());
    let mut ino = [0u8; 8];
    ino.copy_from_slice(&digest[..8]);
    Token {
        dev: S3_DEV,
        ino: u64::from_le_bytes(ino),
        size: meta.size,
        mtime_ns: meta.mtime.as_ns() as i64,
        ctime_ns: 0,
    }
}

/// A bucket as the source of a pass: a restore (`--source s3://…`).
impl SourceTree for S3Replica {
    fn root(&self) -> io::Result<Meta> {
        Replica::root(self)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "nothing is stored under it"))
    }

    fn root_dev(&self) -> u64 {
        S3_DEV
    }

    fn list(&self, dir: &RelPath) -> io::Result<Vec<SrcEntry>> {
        Ok(Replica::list(self, dir)?
            .into_iter()
            .map(|e| Entry {
                version: match e.meta.kind {
                    Kind::Dir => Token::default(),
                    _ => token_of(&e.version, &e.meta),
                },
                name: e.name,
                meta: e.meta,
            })
            .collect())
    }

    /// The stored sha256 (never a download); an object without one is read and hashed.
    fn hash(&self, rel: &RelPath, counters: &HashCounters) -> io::Result<(Hash, Token)> {
        let (meta, version) = Replica::stat(self, rel)?.ok_or(io::ErrorKind::NotFound)?;
        let token = token_of(&version, &meta);
        match Replica::hash(self, rel, counters)? {
            (Some(h), _) => Ok((h, token)),
            (None, _) => {
                let mut content = self.object(rel, meta, token)?;
                let mut sink = Discard;
                content
                    .write_into(Sink::Stream(&mut sink))
                    .map_err(copy_to_io)?;
                counters.add(meta.size);
                Ok((content.finish().map_err(copy_to_io)?, token))
            }
        }
    }

    fn read_link(&self, rel: &RelPath) -> io::Result<PathBuf> {
        Replica::read_link(self, rel)
    }

    fn xattrs(&self, _rel: &RelPath, _kind: Kind) -> io::Result<Xattrs> {
        Ok(Xattrs::default())
    }

    fn open_file(
        &self,
        rel: &RelPath,
        _known: Option<(Token, Hash)>,
    ) -> io::Result<Box<dyn Content + '_>> {
        let (meta, version) = Replica::stat(self, rel)?.ok_or(io::ErrorKind::NotFound)?;
        let token = token_of(&version, &meta);
        Ok(Box::new(self.object(rel, meta, token)?))
    }
}

fn copy_to_io(e: CopyError) -> io::Error {
    match e {
        CopyError::Changed => io::Error::other("the object changed while it was read"),
        CopyError::Source(e) | CopyError::Replica(e) => e,
    }
}

impl S3Replica {
    fn object(&self, rel: &RelPath, meta: Meta, token: Token) -> io::Result<Object<'_>> {
        let l = self.listed(rel).ok_or(io::ErrorKind::NotFound)?;
        let (_, known) = self.resolve(l)?;
        Ok(Object {
            rep: self,
            key: l.key.clone(),
            etag: known.etag.clone(),
            stored: known.sha256.map(Hash),
            meta,
            token,
            digest: None,
            copied: 0,
        })
    }
}

/// One object's content on its way out of the bucket, read in ranges that must all come
/// from the same ETag, hashed on the way and checked against the stored sha256.
struct Object<'a> {
    rep: &'a S3Replica,
    key: String,
    etag: String,
    stored: Option<Hash>,
    meta: Meta,
    token: Token,
    digest: Option<Hash>,
    copied: u64,
}

impl Content for Object<'_> {
    fn meta(&self) -> &Meta {
        &self.meta
    }

    fn token(&self) -> Token {
        self.token
    }

    fn write_into(&mut self, out: Sink<'_>) -> Result<u64, CopyError> {
        use sha2::Digest;
        let out: &mut dyn Write = match out {
            Sink::File(f) => f,
            Sink::Stream(w) => w,
        };
        let mut hasher = sha2::Sha256::new();
        let size = self.meta.size;
        let mut off = 0u64;
        while off < size {
            if crate::cancel::requested() {
                return Err(CopyError::Source(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "interrupted",
                )));
            }
            let end = (off + PART as u64).min(size);
            self.rep.requests.get.fetch_add(1, Ordering::Relaxed);
            let mut read = self.rep.bulk().read_with(&self.key).range(off..end);
            if !self.etag.is_empty() {
                read = read.if_match(&format!("\"{}\"", self.etag));
            }
            let (answer, _) = self.rep.run(read, "a download", Duration::ZERO, end - off);
            let buf = match answer.map_err(CopyError::Source)? {
                Ok(b) => b,
                Err(e) if e.kind() == opendal::ErrorKind::ConditionNotMatch => {
                    return Err(CopyError::Changed)
                }
                Err(e) => return Err(CopyError::Source(self.rep.describe(&e))),
            };
            if buf.is_empty() {
                return Err(CopyError::Changed);
            }
            for chunk in buf {
                hasher.update(&chunk);
                out.write_all(&chunk).map_err(CopyError::Replica)?;
                off += chunk.len() as u64;
            }
        }
        self.digest = Some(Hash(hasher.finalize().into()));
        self.copied = off;
        Ok(off)
    }

    fn finish(&mut self) -> Result<Hash, CopyError> {
        let digest = self
            .digest
            .ok_or_else(|| CopyError::Source(io::Error::other("finished before it was read")))?;
        if self.copied != self.meta.size {
            return Err(CopyError::Changed);
        }
        match self.stored {
            Some(s) if s != digest => Err(CopyError::Source(io::Error::other(format!(
                "its content does not match the sha256 stored with it ({s})"
            )))),
            _ => Ok(digest),
        }
    }

    fn xattrs(&self) -> io::Result<Xattrs> {
        Ok(Xattrs::default())
    }
}
