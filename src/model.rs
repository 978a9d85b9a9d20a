//! Plain data shared by every stage of a pass: relative paths, entry kinds, source stat
//! tokens and opaque replica versions, metadata, content hashes and copy hints. Nothing here
//! does I/O beyond converting a `std::fs::Metadata`.

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A path relative to a tree root (the empty path is the root itself). Kept as raw bytes
/// (`PathBuf`), never converted lossily to UTF-8.
/// A boxed path (16 bytes, not `PathBuf`'s 24): a plan holds one per change.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(Box<Path>);

/// As raw bytes (a plan spilled to disk, see `spill`): never through UTF-8.
impl Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.as_bytes())
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: &[u8] = Deserialize::deserialize(d)?;
        Ok(RelPath::from_bytes(bytes))
    }
}

/// A `PathBuf` as raw bytes, for `#[serde(with = "path_bytes")]` (serde's own impl refuses
/// a path that is not UTF-8).
pub mod path_bytes {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

    pub fn serialize<S: serde::Serializer>(p: &std::path::Path, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(p.as_os_str().as_bytes())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        let bytes: &[u8] = serde::Deserialize::deserialize(d)?;
        Ok(PathBuf::from(OsStr::from_bytes(bytes)))
    }
}

/// Lookups by `&Path` in maps keyed by `RelPath` (equality, order and hash are the path's).
impl std::borrow::Borrow<Path> for RelPath {
    fn borrow(&self) -> &Path {
        &self.0
    }
}

impl Default for RelPath {
    fn default() -> Self {
        RelPath::root()
    }
}

impl RelPath {
    pub fn root() -> Self {
        RelPath(PathBuf::new().into_boxed_path())
    }
    pub fn join(&self, name: &OsStr) -> Self {
        RelPath(self.0.join(name).into_boxed_path())
    }
    pub fn as_path(&self) -> &Path {
        &self.0
    }
    pub fn is_root(&self) -> bool {
        self.0.as_os_str().is_empty()
    }
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_os_str().as_bytes()
    }
    pub fn from_bytes(bytes: &[u8]) -> Self {
        RelPath(PathBuf::from(OsStr::from_bytes(bytes)).into_boxed_path())
    }
    /// Number of components; the root has depth 0.
    pub fn depth(&self) -> usize {
        self.0.components().count()
    }
    pub fn parent(&self) -> Option<RelPath> {
        if self.is_root() {
            None
        } else {
            Some(RelPath(
                self.0
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default()
                    .into_boxed_path(),
            ))
        }
    }
    pub fn file_name(&self) -> Option<&OsStr> {
        self.0.file_name()
    }
    /// The absolute path of this entry under `root`.
    pub fn under(&self, root: &Path) -> PathBuf {
        if self.is_root() {
            root.to_path_buf()
        } else {
            root.join(&self.0)
        }
    }
}

impl fmt::Display for RelPath {
    /// Printable form for logs: UTF-8 is shown as is, every other byte as `\xNN`, and a
    /// backslash or control character is escaped too, so one entry is always one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            return f.write_str(".");
        }
        f.write_str(&escape_bytes(self.as_bytes()))
    }
}

/// Escapes bytes for a one-line log field (see `RelPath`'s `Display`).
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Escapes an absolute or user-given path for messages.
pub fn show(path: &Path) -> String {
    escape_bytes(path.as_os_str().as_bytes())
}

/// What an entry is. `Special` covers fifos, sockets and devices, which are never mirrored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Special,
}

impl Kind {
    /// The kind of a `st_mode` value.
    pub fn of_mode(mode: u32) -> Kind {
        match mode & 0o170000 {
            0o100000 => Kind::File,
            0o040000 => Kind::Dir,
            0o120000 => Kind::Symlink,
            _ => Kind::Special,
        }
    }

    pub fn of(meta: &Metadata) -> Kind {
        Kind::of_mode(meta.mode())
    }

    /// The word messages use for it.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::File => "regular file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::Special => "special file",
        }
    }
}

/// A local file's identity and version as the kernel reports it. Any write to a file changes
/// its ctime, so an equal token means the content has not changed since it was last hashed.
/// This is the source side's version of a file, and what a local replica's [`Version`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Token {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Status-change time in nanoseconds since the epoch.
    pub ctime_ns: i64,
}

impl Token {
    pub fn of(meta: &Metadata) -> Token {
        Token {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        }
    }

    /// The token as an opaque replica version (what a local replica reports).
    pub fn to_version(&self) -> Version {
        // Varints (postcard): about 27 bytes instead of 40, in every cache entry.
        let mut buf = [0u8; 50];
        let fields = (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns);
        let used = postcard::to_slice(&fields, &mut buf).map_or(0, |b| b.len());
        Version::from_bytes(&buf[..used])
    }
}

/// Which source tokens the hash cache may not trust yet: "racy" ones, whose ctime is so
/// close to the start of the pass that read them that a second write in the same timestamp
/// tick could have left the token unchanged (see `state::cache`). The window is wide in
/// general, and narrow for files that sit on a filesystem known to keep fine timestamps
/// (the source root's, given by its device) and whose ctime has a sub-second part: a
/// filesystem that keeps whole seconds (ext2/ext3/ext4 with 128-byte inodes) has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Racy {
    /// A ctime at or after this (ns since the epoch) is racy on any filesystem.
    pub after_ns: i64,
    /// `(device, moment)`: on that device, a sub-second ctime is racy only at or after that
    /// later moment.
    pub fine: Option<(u64, i64)>,
}

impl Racy {
    pub fn is_racy(&self, token: &Token) -> bool {
        let after = match self.fine {
            Some((dev, after)) if token.dev == dev && token.ctime_ns % 1_000_000_000 != 0 => after,
            _ => self.after_ns,
        };
        token.ctime_ns >= after
    }
}

/// A replica's version of an entry: opaque bytes that only the replica implementation
/// interprets (a local replica: device, inode, size, mtime and ctime; an object store: ETag
/// and size). Two equal versions mean the entry was not changed in between; the cache stores
/// the version it last saw, so a different one is drift. Inline up to 40 bytes: an idle pass
/// reads one per replica file, and must not allocate for each.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default, Hash)]
pub struct Version(pub SmallVec<[u8; 40]>);

impl Version {
    pub fn from_bytes(b: &[u8]) -> Version {
        Version(SmallVec::from_slice(b))
    }
}

/// A moment as seconds and nanoseconds since the epoch, as `stat` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Stamp {
    pub sec: i64,
    pub nsec: i64,
}

impl Stamp {
    pub fn as_ns(self) -> i128 {
        self.sec as i128 * 1_000_000_000 + self.nsec as i128
    }
}

/// The metadata syncer mirrors, as either side reports it. Portable: nothing here is
/// specific to a local filesystem (the source's stat token travels beside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits, including setuid/setgid/sticky (`mode & 0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Stamp,
    pub atime: Stamp,
    /// A regular file with more than one name: its identity on its side (device, inode),
    /// shared by every name of the inode. `None` for a file with one name.
    pub link: Option<LinkKey>,
}

/// The identity of a file with several names (hard links) on one side: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LinkKey(pub u64, pub u64);

impl Meta {
    pub fn of(meta: &Metadata) -> Meta {
        Meta {
            kind: Kind::of(meta),
            perm: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            size: meta.size(),
            mtime: Stamp {
                sec: meta.mtime(),
                nsec: meta.mtime_nsec(),
            },
            atime: Stamp {
                sec: meta.atime(),
                nsec: meta.atime_nsec(),
            },
            link: (meta.is_file() && meta.nlink() > 1).then(|| LinkKey(meta.dev(), meta.ino())),
        }
    }
}

/// A sha256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Hash(pub [u8; 32]);

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// 64 hex digits (either case), as `Display` writes them.
impl std::str::FromStr for Hash {
    type Err = String;

    fn from_str(text: &str) -> Result<Hash, String> {
        let bad = || format!("not a sha256 in hex: '{text}'");
        if text.len() != 64 || !text.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(text.as_bytes().chunks(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            *o = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Hash(out))
    }
}

/// One directory entry as a side lists it: its name, its metadata (never following a
/// symlink) and that side's version of it (`Token` for the source, `Version` for a replica).
#[derive(Clone, Debug)]
pub struct Entry<V> {
    pub name: OsString,
    pub meta: Meta,
    pub version: V,
}

/// A source entry: its version is the local stat token.
pub type SrcEntry = Entry<Token>;
/// A replica entry: its version is what the replica implementation reports.
pub type RepEntry = Entry<Version>;

/// The entries of a whole listing among `names` (both sorted by name bytes).
pub fn among<V>(all: Vec<Entry<V>>, names: &[OsString]) -> Vec<Entry<V>> {
    all.into_iter()
        .filter(|e| {
            names
                .binary_search_by(|n| n.as_bytes().cmp(e.name.as_bytes()))
                .is_ok()
        })
        .collect()
}

/// What this pass already knows about a file it is about to copy (plain data for the plan).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Hint {
    /// The source's token and hash, hashed by this pass: if the token still matches, the
    /// content is copied without hashing it again (in the kernel, for a local replica).
    Known(Token, Hash),
    /// The replica already holds content with this hash (a large file whose source token
    /// changed): the copy hashes the source as it goes, and if the hash turns out equal and
    /// the replica entry still has this version, nothing is installed and only metadata is
    /// fixed.
    Unless(Hash, Version),
}

/// True for syncer's own temporary files (`.syncer-*.tmp`), which are never mirrored.
pub fn is_temp_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b".syncer-") && b.ends_with(b".tmp")
}

/// What a pass did, counted: shared by the pass's outcome, its summary line and the job
/// status (flattened into `PassRecord`, so the JSON keeps one flat object).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub created: u64,
    pub updated: u64,
    pub drifted: u64,
    pub deleted: u64,
    /// Files moved within the replica by a rename (neither created nor deleted). Absent
    /// from a status written before moves existed.
    #[serde(default)]
    pub moved: u64,
    pub meta: u64,
    pub links: u64,
    /// Names made hard links to their group's first name.
    pub hard_links: u64,
    pub dirs_created: u64,
    pub bytes_copied: u64,
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    pub errors: u64,
    pub skipped: u64,
    /// Entries whose metadata the scan read, on both sides (a partial pass of watch mode
    /// reads only what changed). Absent from a status written before it was counted.
    #[serde(default)]
    pub entries_read: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.created += o.created;
        self.updated += o.updated;
        self.drifted += o.drifted;
        self.deleted += o.deleted;
        self.moved += o.moved;
        self.meta += o.meta;
        self.links += o.links;
        self.hard_links += o.hard_links;
        self.dirs_created += o.dirs_created;
        self.bytes_copied += o.bytes_copied;
        self.hashed_files += o.hashed_files;
        self.hashed_bytes += o.hashed_bytes;
        self.errors += o.errors;
        self.skipped += o.skipped;
        self.entries_read += o.entries_read;
    }
}

/// Counts of content actually read to hash it: the proof that the cache works.
#[derive(Default)]
pub struct HashCounters {
    pub files: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
}

impl HashCounters {
    /// Counts one file of `bytes` bytes read and hashed.
    pub fn add(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.files.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }
}

/// Extended attributes of an entry, sorted by name: `(name, value)`. POSIX ACLs travel as
/// `system.posix_acl_access` and `system.posix_acl_default`, file capabilities as
/// `security.capability`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Xattrs(pub Vec<(Vec<u8>, Vec<u8>)>);

impl Xattrs {
    /// Only the attributes a process (`root` or not) may set, so that what it cannot set is
    /// never a difference: as root every namespace; otherwise `user.*` and the ACLs.
    pub fn settable(mut self, root: bool) -> Xattrs {
        if !root {
            self.0.retain(|(name, _)| {
                name.starts_with(b"user.") || name.starts_with(b"system.posix_acl_")
            });
        }
        self
    }

    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.0
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .ok()
            .map(|i| self.0[i].1.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_reads_back_what_it_writes() {
        let h = Hash(std::array::from_fn(|i| (i * 37) as u8));
        assert_eq!(h.to_string().parse::<Hash>(), Ok(h));
        assert_eq!(h.to_string().to_uppercase().parse::<Hash>(), Ok(h));
        assert!("abc".parse::<Hash>().is_err());
        assert!("zz".repeat(32).parse::<Hash>().is_err());
        assert!("é".repeat(32).parse::<Hash>().is_err());
    }

    fn token(dev: u64, ctime_ns: i64) -> Token {
        Token {
            dev,
            ctime_ns,
            ..Token::default()
        }
    }

    #[test]
    fn the_narrow_racy_window_applies_only_to_sub_second_ctimes_on_the_fine_device() {
        let s = 1_000_000_000;
        let racy = Racy {
            after_ns: 100 * s,
            fine: Some((7, 103 * s)),
        };
        // Between the two cut-offs: trusted on the fine device, racy anywhere else.
        assert!(!racy.is_racy(&token(7, 102 * s + 5)));
        assert!(racy.is_racy(&token(8, 102 * s + 5)));
        // A ctime of whole seconds: the filesystem may keep nothing finer.
        assert!(racy.is_racy(&token(7, 102 * s)));
        // At or after the narrow cut-off: racy everywhere; before the wide one: nowhere.
        assert!(racy.is_racy(&token(7, 103 * s + 5)));
        assert!(!racy.is_racy(&token(8, 99 * s + 5)));
        let coarse = Racy {
            after_ns: 100 * s,
            fine: None,
        };
        assert!(coarse.is_racy(&token(7, 102 * s + 5)));
    }
}
