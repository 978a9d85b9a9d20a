//! The per-entry decision for a regular file present on both sides: copy, fix metadata only,
//! or nothing. Content equality is decided by sha256, taken from the cache when a side's
//! version matches the recorded one (the source's stat token, the replica's opaque
//! version), read and hashed otherwise. Metadata is compared only as far as the replica's
//! capabilities keep it. Reads, never writes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::error::{EntryError, Side};
use crate::model::{HashCounters, Hint, Kind, Racy, RelPath, RepEntry, SrcEntry};
use crate::plan::Reason;
use crate::replica::{Capabilities, Replica};
use crate::source::{SourceTree, PIPELINE_MIN};
use crate::state::cache::CachedFile;

/// What comparing needs: both sides, the replica's capabilities and the pass's options.
pub struct Compare<'a> {
    pub source: &'a dyn SourceTree,
    pub replica: &'a dyn Replica,
    pub caps: Capabilities,
    pub counters: &'a HashCounters,
    /// `--checksum`: ignore the cache.
    pub checksum: bool,
    /// Which source tokens are racy (see `state::cache`).
    pub racy: Racy,
}

/// What to do with a regular file present on both sides.
#[derive(Debug)]
pub enum FileVerdict {
    /// Content differs: copy (with what this pass learned of the content).
    Copy { reason: Reason, hint: Option<Hint> },
    /// Content equal, metadata differs: fix metadata only.
    Meta(CachedFile),
    /// Nothing to do.
    Same(CachedFile),
    /// A side could not be read; nothing is changed for this entry.
    Error(EntryError),
}

impl Compare<'_> {
    pub fn file(
        &self,
        rel: &RelPath,
        name: &OsStr,
        src: &SrcEntry,
        rep: &RepEntry,
        cached: Option<&CachedFile>,
    ) -> FileVerdict {
        // A replica file that no longer has the version syncer recorded was changed by
        // someone else.
        let drifted = cached.is_some_and(|c| c.rep != rep.version);
        let changed = if drifted {
            Reason::Drift
        } else {
            Reason::Update
        };
        if src.meta.size != rep.meta.size {
            return FileVerdict::Copy {
                reason: changed,
                hint: None,
            };
        }
        let src_hit = cached.filter(|c| !self.checksum && !c.src_racy && c.src == src.version);
        let rep_hit = cached.filter(|c| !self.checksum && c.rep == rep.version);
        // A large file whose source changed while the replica is known: copy it right away,
        // hashing as it is copied, instead of reading it once to hash and again to copy. If
        // the content turns out unchanged, the copy is dropped and only metadata is fixed.
        // Only a token that really changed counts: a racy but equal one just wants a re-hash.
        if let (None, Some(c)) = (src_hit, rep_hit) {
            if src.meta.size >= PIPELINE_MIN && c.src != src.version {
                return FileVerdict::Copy {
                    reason: changed,
                    hint: Some(Hint::Unless(c.hash, c.rep.clone())),
                };
            }
        }
        let (src_hash, src_token) = match src_hit {
            Some(c) => (c.hash, c.src),
            None => match self.source.hash(rel, self.counters) {
                Ok(v) => v,
                Err(e) => {
                    return FileVerdict::Error(EntryError::read(Side::Source, Kind::File, rel, e))
                }
            },
        };
        let (rep_hash, rep_version) = match rep_hit {
            Some(c) => (c.hash, c.rep.clone()),
            None => match self.replica.hash(rel, self.counters) {
                Ok((Some(hash), version)) => (hash, version),
                // An object store's object that carries no hash: its content is unknown.
                Ok((None, _)) => {
                    return FileVerdict::Copy {
                        reason: changed,
                        hint: Some(Hint::Known(src_token, src_hash)),
                    }
                }
                Err(e) => {
                    return FileVerdict::Error(EntryError::read(Side::Replica, Kind::File, rel, e))
                }
            },
        };
        if src_hash != rep_hash {
            return FileVerdict::Copy {
                reason: changed,
                hint: Some(Hint::Known(src_token, src_hash)),
            };
        }
        // Extended attributes: any change to them changes the file's ctime, so when both
        // sides still have the versions the cache recorded with attributes in sync, they
        // still are, and nothing is read.
        let xattrs_known =
            cached.is_some_and(|c| c.xattrs) && src_hit.is_some() && rep_hit.is_some();
        let xattrs_differ = match self.caps.xattrs && !xattrs_known {
            false => false,
            true => match self.xattrs_differ(rel, Kind::File) {
                Ok(d) => d,
                Err(e) => return FileVerdict::Error(e),
            },
        };
        let entry = CachedFile {
            name: name.as_bytes().to_vec(),
            kind: Kind::File,
            src: src_token,
            rep: rep_version,
            hash: src_hash,
            src_racy: self.racy.is_racy(&src_token),
            xattrs: self.caps.xattrs && !xattrs_differ,
        };
        let meta_differs = self.caps.meta_differs(&src.meta, &rep.meta);
        if meta_differs && !self.caps.meta_in_place {
            // Metadata that only a new upload changes (an object store).
            FileVerdict::Copy {
                reason: Reason::Update,
                hint: Some(Hint::Known(src_token, src_hash)),
            }
        } else if xattrs_differ || meta_differs {
            FileVerdict::Meta(entry)
        } else {
            FileVerdict::Same(entry)
        }
    }

    /// Whether the extended attributes of `rel` differ (only those the replica may set
    /// count: the replica reports only those, and the source's are limited the same way).
    pub fn xattrs_differ(&self, rel: &RelPath, kind: Kind) -> Result<bool, EntryError> {
        let src = self
            .source
            .xattrs(rel, kind)
            .map_err(|e| EntryError::read(Side::Source, kind, rel, e))?;
        let rep = self
            .replica
            .xattrs(rel, kind)
            .map_err(|e| EntryError::read(Side::Replica, kind, rel, e))?;
        Ok(src.settable(crate::anchor::running_as_root()) != rep)
    }
}
