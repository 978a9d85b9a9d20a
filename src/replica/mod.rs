//! The replica interface: the only way any stage reaches the replica. [`Replica`] lists,
//! stats, hashes (a local replica reads the file; an object store gives the hash it
//! stored), installs files atomically from a [`Content`] stream plus metadata (never from a
//! source path), makes directories and symlinks, sets metadata, removes, renames, backs up,
//! commits (durability) and locks. Reading a replica back (a restore) goes through the
//! source side, which each backend also implements. [`Capabilities`] says which metadata a
//! replica keeps, so compare never reports a difference the replica cannot hold, and a
//! replica's version of an entry ([`Version`]) is opaque: only its implementation reads it.
//!
//! Implementations: `local` (a directory, anchored on a handle so no symlink can redirect a
//! write), `s3/` (an S3-compatible bucket through OpenDAL: address, key codec, errors,
//! batched deletions, the bucket as a restore's source, unfinished-upload clean-up, and the
//! replica in `s3/mod.rs`) and, for in-process tests, `fake` (memory).

pub mod local;
pub mod s3;

#[cfg(test)]
pub mod fake;

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::model::{Hash, HashCounters, Kind, Meta, RelPath, RepEntry, Token, Version, Xattrs};

/// Which metadata a replica keeps, and what it can do. Compare consults it: what a replica
/// cannot keep is never a difference. Every backend keeps symlinks and empty directories,
/// replaces a file atomically and can be read back (a restore); a flag exists only for what
/// some backend lacks and a stage asks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Permission bits (with setuid/setgid/sticky).
    pub mode: bool,
    /// Owner and group (a local replica: only when running as root).
    pub owner: bool,
    /// Modification times, to this many nanoseconds (1: exact); `None`: not kept.
    pub mtime_ns: Option<u64>,
    /// Hard links (`rsync -H`): a group of names shares one file.
    pub hard_links: bool,
    /// Extended attributes (so POSIX ACLs and file capabilities) of files and directories.
    pub xattrs: bool,
    /// An entry can be renamed within the replica without copying it (`rename`): a file
    /// moved in the source is then moved, not copied again.
    pub rename: bool,
    /// A file's metadata can be changed without writing its content again (an object
    /// store's cannot: compare then asks for a copy).
    pub meta_in_place: bool,
}

impl Capabilities {
    /// True when `src` and `rep` differ in metadata this replica keeps. Symlink modes are
    /// never compared (they mean nothing on Linux).
    pub fn meta_differs(&self, src: &Meta, rep: &Meta) -> bool {
        let mode = self.mode && src.kind != Kind::Symlink && src.perm != rep.perm;
        let owner = self.owner && (src.uid != rep.uid || src.gid != rep.gid);
        let mtime = self.mtime_ns.is_some_and(|g| {
            let g = g.max(1) as i128;
            src.mtime.as_ns().div_euclid(g) != rep.mtime.as_ns().div_euclid(g)
        });
        mode || owner || mtime
    }
}

/// Where a copy's bytes go: a local file (the kernel may copy into it directly) or a stream.
pub enum Sink<'a> {
    File(&'a mut File),
    Stream(&'a mut dyn Write),
}

/// A file's content on its way into the replica, with the metadata it must get. The source
/// side implements it; the replica pulls the bytes and never learns where they came from.
pub trait Content: Send {
    /// The metadata the replica entry must get (the source's, as it was opened).
    fn meta(&self) -> &Meta;
    /// The source's version while it was copied (what the cache records for the source).
    fn token(&self) -> Token;
    /// The content's sha256 when this pass already knows it (it hashed the source and the
    /// token has not moved), before anything is written.
    fn known_hash(&self) -> Option<Hash> {
        None
    }
    /// Starts over, so that `write_into` can run again (a replica that needs the hash before
    /// the bytes reads the content twice).
    fn rewind(&mut self) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Writes the whole content into `out` and returns the number of bytes written. A read
    /// failure is `CopyError::Source`, a write failure `CopyError::Replica`.
    fn write_into(&mut self, out: Sink<'_>) -> Result<u64, CopyError>;
    /// Once everything was written: the content's sha256, or `CopyError::Changed` when the
    /// source changed since it was opened (the replica then drops what it wrote).
    fn finish(&mut self) -> Result<Hash, CopyError>;
    /// The source's extended attributes (asked only by a replica that keeps them).
    fn xattrs(&self) -> io::Result<Xattrs>;
}

#[derive(Debug)]
pub enum CopyError {
    /// The source changed while it was copied; nothing was installed.
    Changed,
    /// Reading the source failed (it may have vanished).
    Source(io::Error),
    /// Writing into the replica failed.
    Replica(io::Error),
}

/// The result of installing one file.
#[derive(Clone, Debug)]
pub struct Installed {
    /// The replica entry's version after the install.
    pub version: Version,
    pub hash: Hash,
    /// Bytes written (0 when `unchanged`).
    pub bytes: u64,
    /// The content equalled the `unless` hash and the entry still had its version: nothing
    /// was installed, only metadata may need fixing.
    pub unchanged: bool,
}

/// What a pass needs from a replica. Paths are relative to the replica's root; every method
/// is safe to call from many threads at once.
pub trait Replica: Send + Sync {
    fn capabilities(&self) -> Capabilities;

    /// The root's metadata, `None` when the replica does not exist yet (a dry run of a first
    /// pass).
    fn root(&self) -> io::Result<Option<Meta>>;

    /// Lists a directory, sorted by name bytes.
    fn list(&self, dir: &RelPath) -> io::Result<Vec<RepEntry>>;

    /// The entries of a directory among `names` (sorted by name bytes), read one by one
    /// where that is cheaper than listing it; a name that does not exist is left out. A
    /// replica whose listing costs nothing extra keeps this default.
    fn list_only(&self, dir: &RelPath, names: &[OsString]) -> io::Result<Vec<RepEntry>> {
        Ok(crate::model::among(self.list(dir)?, names))
    }

    /// Metadata and version of one entry, `None` if it does not exist.
    fn stat(&self, rel: &RelPath) -> io::Result<Option<(Meta, Version)>>;

    /// Hashes a file: its sha256 and the version it had while it was read (a local replica
    /// reads it; an object store gives the hash stored with the object). `None` for the hash:
    /// the replica keeps none for this file and does not read it (an object written by
    /// another tool): its content is unknown.
    fn hash(&self, rel: &RelPath, counters: &HashCounters) -> io::Result<(Option<Hash>, Version)>;

    /// The target of a symlink.
    fn read_link(&self, rel: &RelPath) -> io::Result<PathBuf>;

    /// The extended attributes of a file or directory that this process may set.
    fn xattrs(&self, rel: &RelPath, kind: Kind) -> io::Result<Xattrs>;

    /// Installs a file atomically: readers see the old entry or the new one, never a torn
    /// one. With `unless = (hash, version)`, a content whose hash equals `hash` while the
    /// entry still has `version` is not installed (`Installed::unchanged`).
    fn install_file(
        &self,
        rel: &RelPath,
        content: &mut dyn Content,
        unless: Option<(&Hash, &Version)>,
    ) -> Result<Installed, CopyError>;

    /// Makes a directory (private until `set_meta` gives it its mode, after its children).
    fn mkdir(&self, rel: &RelPath) -> io::Result<()>;

    /// Creates or replaces a symlink atomically, with the owner and times of `meta` and,
    /// given, the link's own extended attributes.
    fn symlink(
        &self,
        rel: &RelPath,
        target: &Path,
        meta: &Meta,
        xattrs: Option<&Xattrs>,
    ) -> io::Result<()>;

    /// Sets the metadata of an existing entry (and, given, its extended attributes) and
    /// returns its new version. With `expect`, an entry whose version is no longer that is
    /// left alone (`Ok(None)`).
    fn set_meta(
        &self,
        rel: &RelPath,
        meta: &Meta,
        xattrs: Option<&Xattrs>,
        expect: Option<&Version>,
    ) -> io::Result<Option<Version>>;

    /// Makes `rel` another name of the file `to`, atomically replacing what `rel` was.
    fn hard_link(&self, rel: &RelPath, to: &RelPath) -> io::Result<()>;

    /// Removes an entry; a directory with everything below it.
    fn remove(&self, rel: &RelPath, kind: Kind) -> io::Result<()>;

    /// Renames an entry; never replaces an existing `to`.
    fn rename(&self, from: &RelPath, to: &RelPath) -> io::Result<()>;

    /// Keeps the entry at `rel` in this pass's backup area (`--backup-dir`): moved there, or
    /// with `keep`, copied (the entry stays until an install replaces it). Never replaces an
    /// existing backup.
    fn backup(&self, rel: &RelPath, keep: bool) -> io::Result<()>;

    /// Checks that this process can write into the replica, as `start` must before it
    /// forks: creates one transient entry and removes it.
    fn probe(&self) -> io::Result<()>;

    /// Makes everything written so far durable.
    fn commit(&self) -> io::Result<()>;

    /// An object store's request counters (reported with the pass).
    fn requests(&self) -> Option<std::sync::Arc<s3::Requests>> {
        None
    }

    /// Takes the replica's own lock (one writer at a time), held until the guard is dropped;
    /// `Ok(None)` when there is nothing to lock yet. Busy: `ErrorKind::WouldBlock`.
    fn lock(&self) -> io::Result<Option<Box<dyn Send>>>;
}

/// Validates the replica the user named, before anything is written, and returns the form
/// every later step uses (a local directory: absolute, canonical as far as it exists). `Err`
/// is the one-line reason (exit 2).
pub fn check_root(path: &Path) -> Result<PathBuf, String> {
    local::check_root(path)
}

/// What a pass asks of the replica it opens.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Make the root if it is missing.
    pub create: bool,
    /// This pass's backup folder (`<backup-dir>/<pass time>`).
    pub backup: Option<PathBuf>,
    /// Mirror extended attributes (`--no-xattrs` turns it off).
    pub xattrs: bool,
    /// `--one-file-system`: a directory on another filesystem than the root's is not
    /// listed (a `MountPoint` error), so nothing below it is changed.
    pub one_file_system: bool,
    /// Mirror hard links (`--no-hard-links` turns it off).
    pub hard_links: bool,
    /// How to reach an `s3://` replica.
    pub endpoint: s3::Endpoint,
    /// An object store's local index of what syncer wrote (beside the state).
    pub index: Option<PathBuf>,
    /// `--checksum`: an object store's stored hashes are read from the objects themselves
    /// (one HEAD each), not from the local index.
    pub checksum: bool,
    /// A dry run: an object store's local index is read from a private copy, never created
    /// or written.
    pub dry_run: bool,
}

/// Whether `path` names a replica on another machine (reached over the network, so a
/// failure to open it is a failure to reach it).
pub fn is_remote(path: &Path) -> bool {
    s3::Target::parse(path.as_os_str()).is_some()
}

/// Opens the replica at `path` (a directory, or an `s3://` address) for one pass.
pub fn open(path: &Path, opts: Options) -> io::Result<Box<dyn Replica>> {
    if let Some(target) = s3::Target::parse(path.as_os_str()) {
        let target = target.map_err(io::Error::other)?;
        let index = opts.index.clone();
        return Ok(Box::new(s3::S3Replica::open(
            &target,
            &opts.endpoint.clone(),
            &opts,
            index.as_deref(),
        )?));
    }
    Ok(Box::new(local::LocalReplica::open(path, opts)?))
}
