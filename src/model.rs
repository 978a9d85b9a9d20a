//! Plain data shared by every stage of a pass: relative paths, entry kinds, stat tokens,
//! metadata and content hashes. Nothing here does I/O beyond converting a `std::fs::Metadata`.

use serde::{Deserialize, Serialize};
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
    pub fn of(meta: &Metadata) -> Kind {
        let ft = meta.file_type();
        if ft.is_file() {
            Kind::File
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else {
            Kind::Special
        }
    }
}

/// A file's identity and version as the kernel reports it. Any write to a file changes its
/// ctime, so an equal token means the content has not changed since it was last hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
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
}

/// A moment as seconds and nanoseconds since the epoch, as `stat` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub sec: i64,
    pub nsec: i64,
}

/// The metadata syncer mirrors, plus the stat token used by the hash cache.
#[derive(Clone, Copy, Debug)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits, including setuid/setgid/sticky (`mode & 0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Stamp,
    pub atime: Stamp,
    pub token: Token,
}

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
            token: Token::of(meta),
        }
    }
}

/// A sha256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
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

/// One directory entry as seen by the scan: its name and its `lstat`.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: OsString,
    pub meta: Meta,
}

/// True for syncer's own temporary files (`.syncer-*.tmp`), which are never mirrored.
pub fn is_temp_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b".syncer-") && b.ends_with(b".tmp")
}
