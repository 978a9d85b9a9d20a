//! A local directory tree reached only through a handle on its root: the ground both the
//! local source and the local replica stand on, and the reason running as root is safe.
//!
//! The root is opened once (its last component must be a directory, not a symlink). Every
//! relative path is then resolved beneath that handle without following a symlink in any
//! component: `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` where the kernel has it
//! (Linux 5.6+), otherwise a walk of `openat(O_NOFOLLOW | O_DIRECTORY)` one component at a
//! time. A user who owns a directory inside the tree and swaps it for a symlink to
//! `/etc/cron.d` mid-pass makes the resolution fail (`ELOOP`/`ENOTDIR`), which becomes a
//! [`PathChanged`] error naming the component; nothing is read or written through the link.
//! Callers create, rename, remove and set metadata only through the handles this returns or
//! `*at` calls relative to them.
//!
//! What this deliberately does not do: decide anything. It opens, lists, stats and hashes.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use sha2::{Digest, Sha256};

use crate::cancel;
use crate::error::{PathChanged, Side};
use crate::model::{Hash, HashCounters, Kind, LinkKey, Meta, RelPath, Stamp, Token, Xattrs};

/// Read in chunks of this size: large enough for disk speed, small enough that a cancelled
/// pass stops within milliseconds and that the per-thread buffer stays small.
pub const CHUNK: usize = 1 << 20;

thread_local! {
    pub static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; CHUNK]);
}

/// False once `openat2` is known to be unusable: `ENOSYS` (a kernel older than 5.6) or
/// `EPERM` (a seccomp filter that does not know it, as older container profiles do). Every
/// later resolution then walks component by component. Probed on the first root opened.
static HAVE_OPENAT2: AtomicBool = AtomicBool::new(true);
static PROBED: std::sync::Once = std::sync::Once::new();

fn probe_openat2(root: &OwnedFd) {
    PROBED.call_once(|| {
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS;
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        if let Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) =
            rustix::fs::openat2(root, ".", flags, Mode::empty(), how)
        {
            HAVE_OPENAT2.store(false, Ordering::Relaxed);
        }
    });
}

/// Opens the absolute path of a root, component by component from `/`, never following a
/// symlink: the path was made canonical when the command started, so a symlink in it now
/// was put there since. With `create`, missing directories are made on the way (mode 0777
/// less the umask, as `mkdir -p` does).
pub fn open_root(path: &Path, create: bool) -> io::Result<OwnedFd> {
    let not_a_dir = |prefix: &Path| {
        io::Error::other(format!(
            "'{}' is no longer a directory (a symlink or something else took its place)",
            crate::model::show(prefix)
        ))
    };
    let mut cur = rustix::fs::open(
        "/",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut prefix = std::path::PathBuf::from("/");
    for c in path.components() {
        let name = match c {
            Component::RootDir => continue,
            Component::Normal(n) => n,
            _ => return Err(io::Error::other("the root path is not canonical")),
        };
        prefix.push(name);
        if create {
            match rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(0o777)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
        cur = match subdir(&cur, name, OFlags::PATH) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                return Err(not_a_dir(&prefix))
            }
            Err(e) => return Err(e.into()),
        };
    }
    reopen(&cur, OFlags::RDONLY)
}

/// How paths are resolved beneath the root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolver {
    /// `openat2` when the kernel has it, else the walk.
    Auto,
    /// Always the component walk (what an old kernel gets; tests pin it too).
    Walk,
}

/// A tree's root handle.
pub struct Anchor {
    root: OwnedFd,
    side: Side,
    dev: u64,
    resolver: Resolver,
}

impl Anchor {
    /// Opens `path` as a root (see [`open_root`]): the user's path, validated and made
    /// canonical when the command started; no component of it may be a symlink now.
    pub fn open(path: &Path, side: Side, resolver: Resolver, create: bool) -> io::Result<Anchor> {
        let root = open_root(path, create)?;
        probe_openat2(&root);
        let dev = rustix::fs::fstat(&root)?.st_dev;
        Ok(Anchor {
            root,
            side,
            dev,
            resolver,
        })
    }

    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The device of the root's filesystem.
    pub fn dev(&self) -> u64 {
        self.dev
    }

    /// The root's metadata and token.
    pub fn stat_root(&self) -> io::Result<(Meta, Token)> {
        Ok(from_stat(&rustix::fs::fstat(&self.root)?))
    }

    /// Opens `rel` beneath the root with `flags` (`O_NOFOLLOW` and `O_CLOEXEC` are added).
    /// `last` is what the final component must be, for the error when it is not.
    pub fn open_at(&self, rel: &RelPath, flags: OFlags, last: Kind) -> io::Result<OwnedFd> {
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let path: &Path = if rel.is_root() {
            Path::new(".")
        } else {
            rel.as_path()
        };
        if self.resolver == Resolver::Auto && HAVE_OPENAT2.load(Ordering::Relaxed) {
            let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS;
            // EAGAIN: a rename or mount raced with the lookup; the kernel asks to retry.
            for _ in 0..8 {
                match rustix::fs::openat2(&self.root, path, flags, Mode::empty(), how) {
                    Ok(fd) => return Ok(fd),
                    Err(rustix::io::Errno::AGAIN) => continue,
                    Err(rustix::io::Errno::NOSYS) => {
                        HAVE_OPENAT2.store(false, Ordering::Relaxed);
                        break;
                    }
                    Err(e) => return Err(self.explain(rel, e, last)),
                }
            }
        }
        self.walk(rel, flags, last)
    }

    /// The component walk: every directory opened `O_PATH | O_DIRECTORY | O_NOFOLLOW`
    /// relative to the previous one, the last component with `flags`.
    fn walk(&self, rel: &RelPath, flags: OFlags, last: Kind) -> io::Result<OwnedFd> {
        let names = components(rel);
        let Some((final_name, dirs)) = names.split_last() else {
            return rustix::fs::openat(&self.root, ".", flags, Mode::empty())
                .map_err(io::Error::from);
        };
        let mut cur: Option<OwnedFd> = None;
        for name in dirs {
            let at = cur.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let next = subdir(at, name, OFlags::PATH).map_err(|e| self.explain(rel, e, last))?;
            cur = Some(next);
        }
        let at = cur.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
        rustix::fs::openat(at, *final_name, flags, Mode::empty())
            .map_err(|e| self.explain(rel, e, last))
    }

    /// Turns a resolution error into a `PathChanged` naming the component that is no longer
    /// a directory (or the entry itself when it is no longer of kind `last`).
    fn explain(&self, rel: &RelPath, e: rustix::io::Errno, last: Kind) -> io::Error {
        use rustix::io::Errno;
        if !matches!(e, Errno::LOOP | Errno::NOTDIR | Errno::XDEV) {
            return e.into();
        }
        let names = components(rel);
        let mut cur: Option<OwnedFd> = None;
        let mut so_far = RelPath::root();
        for (i, name) in names.iter().enumerate() {
            so_far = so_far.join(name);
            let at = cur.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let is_last = i + 1 == names.len();
            let kind = rustix::fs::statat(at, *name, AtFlags::SYMLINK_NOFOLLOW)
                .map(|s| Kind::of_mode(s.st_mode));
            match kind {
                Ok(Kind::Dir) if !is_last => match subdir(at, name, OFlags::PATH) {
                    Ok(fd) => cur = Some(fd),
                    Err(_) => break,
                },
                Ok(_) if !is_last => {
                    return self.changed(so_far, Kind::Dir);
                }
                _ => break,
            }
        }
        self.changed(rel.clone(), last)
    }

    fn changed(&self, component: RelPath, expected: Kind) -> io::Error {
        PathChanged {
            side: self.side,
            component,
            expected,
        }
        .into_io()
    }

    /// Opens the directory `rel` for listing.
    pub fn open_dir(&self, rel: &RelPath) -> io::Result<OwnedFd> {
        self.open_at(rel, OFlags::RDONLY | OFlags::DIRECTORY, Kind::Dir)
    }

    /// The parent directory of `rel` (an `O_PATH` handle, for `*at` calls) and its name.
    pub fn parent<'r>(&self, rel: &'r RelPath) -> io::Result<(OwnedFd, &'r OsStr)> {
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the root has no parent",
            ));
        };
        let fd = self.open_at(&parent, OFlags::PATH | OFlags::DIRECTORY, Kind::Dir)?;
        Ok((fd, name))
    }

    /// Opens the regular file `rel` for reading, with its metadata and token as the open
    /// descriptor has them. `O_NONBLOCK` keeps a fifo swapped in for it from blocking the
    /// pass; the kind is checked on the open descriptor.
    pub fn open_file(&self, rel: &RelPath) -> io::Result<Opened> {
        let fd = self.open_at(rel, OFlags::RDONLY | OFlags::NONBLOCK, Kind::File)?;
        let st = rustix::fs::fstat(&fd)?;
        let (meta, token) = from_stat(&st);
        if meta.kind != Kind::File {
            return Err(self.changed(rel.clone(), Kind::File));
        }
        Ok(Opened {
            file: File::from(fd),
            meta,
            token,
            sparse: may_have_holes(&st),
        })
    }

    /// Lists the directory `rel`: every entry with its `lstat`, sorted by name bytes. An
    /// entry that vanishes between `getdents` and `lstat` is left out.
    pub fn list(&self, rel: &RelPath) -> io::Result<Vec<(OsString, Meta, Token)>> {
        let fd = self.open_dir(rel)?;
        list_fd(fd)
    }

    /// The entries of the directory `rel` among `names` (sorted by name bytes), each read
    /// with one `lstat`, without listing the directory; a name that does not exist is
    /// left out.
    pub fn list_only(
        &self,
        rel: &RelPath,
        names: &[OsString],
    ) -> io::Result<Vec<(OsString, Meta, Token)>> {
        stat_names(self.open_dir(rel)?.as_fd(), names.iter().cloned())
    }

    /// `lstat` of `rel` (never following it), `None` when it does not exist.
    pub fn stat(&self, rel: &RelPath) -> io::Result<Option<(Meta, Token)>> {
        if rel.is_root() {
            return self.stat_root().map(Some);
        }
        let (dir, name) = match self.parent(rel) {
            Ok(v) => v,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(from_stat(&st))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The extended attributes of the file or directory `rel` (a symlink has none here:
    /// Linux allows no `user.*` attribute on one, and reading the others needs a path).
    pub fn xattrs(&self, rel: &RelPath, kind: Kind) -> io::Result<Xattrs> {
        match kind {
            Kind::File => read_xattrs(&self.open_file(rel)?.file),
            Kind::Dir => read_xattrs(self.open_dir(rel)?),
            Kind::Symlink => read_xattrs_at(XTarget::Link(self.open_link(rel)?.as_fd())),
            Kind::Special => Ok(Xattrs::default()),
        }
    }

    /// An `O_PATH` handle on the symlink `rel` itself (checked to be one).
    pub fn open_link(&self, rel: &RelPath) -> io::Result<OwnedFd> {
        let (dir, name) = self.parent(rel)?;
        link_handle(dir.as_fd(), name).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => self.changed(rel.clone(), Kind::Symlink),
            _ => e,
        })
    }

    /// The target of the symlink `rel`, never following it.
    pub fn read_link(&self, rel: &RelPath) -> io::Result<std::path::PathBuf> {
        let (dir, name) = self.parent(rel)?;
        match rustix::fs::readlinkat(&dir, name, Vec::new()) {
            Ok(target) => Ok(OsString::from_vec(target.into_bytes()).into()),
            // EINVAL: something else than a symlink took its place.
            Err(rustix::io::Errno::INVAL) => Err(self.changed(rel.clone(), Kind::Symlink)),
            Err(e) => Err(e.into()),
        }
    }

    /// Hashes the regular file `rel`: the digest and the token it had while it was read.
    pub fn hash(&self, rel: &RelPath, counters: &HashCounters) -> io::Result<(Hash, Token)> {
        let mut f = self.open_file(rel)?;
        hash_file(&mut f.file, f.token, f.sparse, counters)
    }
}

/// Whether this process runs as root (asked once: `geteuid` is a system call, and the
/// attribute comparison asks per entry).
pub fn running_as_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| nix::unistd::geteuid().is_root())
}

/// A regular file opened for reading.
pub struct Opened {
    pub file: File,
    pub meta: Meta,
    pub token: Token,
    /// It has fewer blocks than its size needs: it may have holes (see [`data_extents`]).
    pub sparse: bool,
}

/// Fewer 512-byte blocks allocated than the size needs: the file may have holes (or be
/// compressed; either way its data extents are worth asking for).
#[allow(clippy::unnecessary_cast)]
fn may_have_holes(st: &rustix::fs::Stat) -> bool {
    (st.st_blocks as u64).saturating_mul(512) < st.st_size as u64
}

/// The data extents of an open file of `size` bytes, as `(start, end)` ranges in order
/// (`SEEK_DATA`/`SEEK_HOLE`); everything between them is a hole. A filesystem that does
/// not track holes reports the whole file as data.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::SeekFrom;
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(s) => s,
            // No data after `pos`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = rustix::fs::seek(file, SeekFrom::Hole(start))?.min(size);
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

thread_local! {
    /// Room for a list of attribute names or one value: Linux caps both at 64 KiB.
    static XBUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 64 << 10]);
}

/// Where extended attributes are read and written: an open file or directory, or a symlink
/// through an `O_PATH` handle on the link itself. A symlink's own attributes are reached as
/// `/proc/self/fd/N` (the kernel resolves that magic link to the link, never to its target),
/// the way libselinux does, since `fgetxattr` refuses `O_PATH` descriptors and the
/// `*xattrat` calls are only in Linux 6.13 and later.
#[derive(Clone, Copy)]
pub enum XTarget<'a> {
    Fd(BorrowedFd<'a>),
    Link(BorrowedFd<'a>),
}

impl XTarget<'_> {
    fn proc_path(fd: BorrowedFd<'_>) -> String {
        use std::os::fd::AsRawFd;
        format!("/proc/self/fd/{}", fd.as_raw_fd())
    }

    fn list(self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            XTarget::Fd(fd) => rustix::fs::flistxattr(fd, buf),
            XTarget::Link(fd) => rustix::fs::listxattr(Self::proc_path(fd), buf),
        }
    }

    fn get(self, name: &[u8], buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            XTarget::Fd(fd) => rustix::fs::fgetxattr(fd, name, buf),
            XTarget::Link(fd) => rustix::fs::getxattr(Self::proc_path(fd), name, buf),
        }
    }

    fn set(self, name: &[u8], value: &[u8]) -> rustix::io::Result<()> {
        let flags = rustix::fs::XattrFlags::empty();
        match self {
            XTarget::Fd(fd) => rustix::fs::fsetxattr(fd, name, value, flags),
            XTarget::Link(fd) => rustix::fs::setxattr(Self::proc_path(fd), name, value, flags),
        }
    }

    fn remove(self, name: &[u8]) -> rustix::io::Result<()> {
        match self {
            XTarget::Fd(fd) => rustix::fs::fremovexattr(fd, name),
            XTarget::Link(fd) => rustix::fs::removexattr(Self::proc_path(fd), name),
        }
    }
}

/// The extended attributes of an open file or directory, sorted by name.
pub fn read_xattrs(fd: impl AsFd) -> io::Result<Xattrs> {
    read_xattrs_at(XTarget::Fd(fd.as_fd()))
}

/// The extended attributes of a target, sorted by name. A filesystem without them has
/// none (so has a symlink when `/proc` is not mounted); an attribute removed meanwhile is
/// left out.
pub fn read_xattrs_at(target: XTarget<'_>) -> io::Result<Xattrs> {
    XBUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let names: Vec<Vec<u8>> = match target.list(&mut buf[..]) {
            Ok(n) => buf[..n]
                .split(|b| *b == 0)
                .filter(|n| !n.is_empty())
                .map(<[u8]>::to_vec)
                .collect(),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Xattrs::default()),
            Err(rustix::io::Errno::NOENT) if matches!(target, XTarget::Link(_)) => {
                return Ok(Xattrs::default())
            }
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            match target.get(&name, &mut buf[..]) {
                Ok(n) => out.push((name, buf[..n].to_vec())),
                Err(rustix::io::Errno::NODATA) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        out.sort();
        Ok(Xattrs(out))
    })
}

/// Makes the attributes of a target `want`, given that it has `have` (both already limited
/// to what this process may set): sets what is new or different, removes what `want` lacks.
/// `security.selinux` is never removed: the system labels new files itself. An attribute the
/// filesystem cannot keep (an ACL on a filesystem mounted `noacl`, `user.*` on a symlink) is
/// skipped and returned, for one warning per pass.
pub fn write_xattrs(target: XTarget<'_>, want: &Xattrs, have: &Xattrs) -> io::Result<Vec<Vec<u8>>> {
    let mut refused = Vec::new();
    for (name, value) in &want.0 {
        if have.get(name) == Some(value.as_slice()) {
            continue;
        }
        match target.set(name, value) {
            Ok(()) => {}
            Err(rustix::io::Errno::NOTSUP | rustix::io::Errno::PERM) => refused.push(name.clone()),
            Err(e) => return Err(e.into()),
        }
    }
    for (name, _) in &have.0 {
        if want.get(name).is_none() && name.as_slice() != b"security.selinux" {
            match target.remove(name) {
                Ok(()) | Err(rustix::io::Errno::NODATA) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(refused)
}

/// Zeros for hashing holes without reading them.
pub static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Feeds `n` zero bytes to `hasher` (a hole, never read from disk).
pub fn hash_zeros(hasher: &mut Sha256, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// An `O_PATH` handle on the symlink `name` in `dir`; `InvalidData` when it is not one.
pub fn link_handle(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if Kind::of_mode(rustix::fs::fstat(&fd)?.st_mode) != Kind::Symlink {
        return Err(io::ErrorKind::InvalidData.into());
    }
    Ok(fd)
}

/// `fd`'s directory opened again (`.`) with `flags`: a readable descriptor from an `O_PATH`
/// one, or a descriptor of one's own that outlives the first.
pub fn reopen(fd: impl AsFd, flags: OFlags) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        fd,
        ".",
        flags | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The directory `name` in `dir`, with `flags`, never following a symlink (`ELOOP` or
/// `ENOTDIR` when `name` is not a directory).
pub fn subdir(dir: impl AsFd, name: &OsStr, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        flags | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Lists an open directory (see [`Anchor::list`]).
pub fn list_fd(fd: OwnedFd) -> io::Result<Vec<(OsString, Meta, Token)>> {
    let mut dir = rustix::fs::Dir::new(fd)?;
    let mut names = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        names.push(OsStr::from_bytes(name).to_os_string());
    }
    let mut out = stat_names(dir.fd()?, names)?;
    out.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(out)
}

/// `lstat` of each name in the directory `at`, in the order given; a name that does not
/// exist is left out.
pub fn stat_names(
    at: BorrowedFd<'_>,
    names: impl IntoIterator<Item = OsString>,
) -> io::Result<Vec<(OsString, Meta, Token)>> {
    let mut out = Vec::new();
    for name in names {
        match rustix::fs::statat(at, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let (meta, token) = from_stat(&st);
                out.push((name, meta, token));
            }
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// The relative path's components as names (a `RelPath` never holds `..` or `.`).
fn components(rel: &RelPath) -> Vec<&OsStr> {
    rel.as_path()
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect()
}

/// Metadata and token of a `stat` result. (The field types of `struct stat` differ between
/// architectures, hence casts that are no-ops on some.)
#[allow(clippy::unnecessary_cast)]
pub fn from_stat(st: &rustix::fs::Stat) -> (Meta, Token) {
    let mtime = Stamp {
        sec: st.st_mtime as i64,
        nsec: st.st_mtime_nsec as i64,
    };
    let meta = Meta {
        kind: Kind::of_mode(st.st_mode),
        perm: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        mtime,
        atime: Stamp {
            sec: st.st_atime as i64,
            nsec: st.st_atime_nsec as i64,
        },
        link: (Kind::of_mode(st.st_mode) == Kind::File && st.st_nlink as u64 > 1)
            .then_some(LinkKey(st.st_dev as u64, st.st_ino as u64)),
    };
    let token = Token {
        dev: st.st_dev,
        ino: st.st_ino,
        size: st.st_size as u64,
        mtime_ns: mtime.sec * 1_000_000_000 + mtime.nsec,
        ctime_ns: st.st_ctime as i64 * 1_000_000_000 + st.st_ctime_nsec as i64,
    };
    (meta, token)
}

/// The token of an open file.
pub fn token_of(file: &impl AsFd) -> io::Result<Token> {
    Ok(from_stat(&rustix::fs::fstat(file)?).1)
}

/// Hashes an open regular file from its start; `before` is its token when it was opened.
/// Returns the digest and that token; fails if the file changed during the read. A `sparse`
/// file's holes are hashed as the zeros they read as, without reading them.
pub fn hash_file(
    file: &mut File,
    before: Token,
    sparse: bool,
    counters: &HashCounters,
) -> io::Result<(Hash, Token)> {
    if sparse {
        return hash_sparse(file, before, counters);
    }
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
    let after = token_of(file)?;
    if after != before || total != before.size {
        return Err(io::Error::other("file changed while it was read"));
    }
    counters.add(total);
    Ok((Hash(hasher.finalize().into()), before))
}

/// `hash_file` for a file with holes: data extents are read (`pread`), holes are zeros.
fn hash_sparse(file: &File, before: Token, counters: &HashCounters) -> io::Result<(Hash, Token)> {
    use std::os::unix::fs::FileExt;
    let mut hasher = Sha256::new();
    let mut pos = 0u64;
    let mut read = 0u64;
    let extents = data_extents(file, before.size)?;
    BUF.with(|buf| -> io::Result<()> {
        let mut buf = buf.borrow_mut();
        for (start, end) in extents {
            hash_zeros(&mut hasher, start - pos);
            let mut off = start;
            while off < end {
                if cancel::requested() {
                    return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
                }
                let want = (end - off).min(buf.len() as u64) as usize;
                let n = file.read_at(&mut buf[..want], off)?;
                if n == 0 {
                    return Err(io::Error::other("file changed while it was read"));
                }
                hasher.update(&buf[..n]);
                off += n as u64;
                read += n as u64;
            }
            pos = end;
        }
        hash_zeros(&mut hasher, before.size - pos);
        Ok(())
    })?;
    if token_of(file)? != before {
        return Err(io::Error::other("file changed while it was read"));
    }
    counters.add(read);
    Ok((Hash(hasher.finalize().into()), before))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(t.path().join("root/a/b")).expect("mkdir");
        std::fs::write(t.path().join("root/a/b/f"), b"hello").expect("write");
        std::fs::create_dir_all(t.path().join("outside")).expect("mkdir");
        std::fs::write(t.path().join("outside/secret"), b"secret").expect("write");
        t
    }

    fn rel(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes())
    }

    #[test]
    fn both_resolvers_open_paths_beneath_the_root() {
        let t = tree();
        for r in [Resolver::Auto, Resolver::Walk] {
            let a = Anchor::open(&t.path().join("root"), Side::Replica, r, false).expect("open");
            let names: Vec<_> = a
                .list(&rel("a"))
                .expect("list")
                .into_iter()
                .map(|e| e.0)
                .collect();
            assert_eq!(names, vec![OsString::from("b")]);
            let (hash, _) = a
                .hash(&rel("a/b/f"), &HashCounters::default())
                .expect("hash");
            assert_eq!(hash.0, <[u8; 32]>::from(Sha256::digest(b"hello")));
        }
    }

    #[test]
    fn both_resolvers_refuse_a_directory_swapped_for_a_symlink_and_name_it() {
        let t = tree();
        let root = t.path().join("root");
        std::fs::rename(root.join("a/b"), root.join("a/b-old")).expect("rename");
        std::os::unix::fs::symlink(t.path().join("outside"), root.join("a/b")).expect("symlink");
        for r in [Resolver::Auto, Resolver::Walk] {
            let a = Anchor::open(&root, Side::Replica, r, false).expect("open");
            let err = a
                .hash(&rel("a/b/secret"), &HashCounters::default())
                .unwrap_err();
            let changed = PathChanged::of(&err).expect("a PathChanged error");
            assert_eq!(changed.component, rel("a/b"), "{r:?}");
            assert_eq!(
                changed.to_string(),
                "replica path changed during the pass: 'a/b' is no longer a directory"
            );
            assert!(a.list(&rel("a/b")).is_err());
            assert!(a.parent(&rel("a/b/new")).is_err());
            // A symlink as the last component is not opened either.
            let err = a.open_file(&rel("a/b")).map(|_| ()).unwrap_err();
            assert!(PathChanged::of(&err).is_some(), "{err}");
        }
    }

    #[test]
    fn a_relative_symlink_into_another_directory_of_the_tree_is_not_followed_either() {
        let t = tree();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("v")).expect("mkdir");
        std::fs::write(root.join("v/victim"), b"v").expect("write");
        std::fs::rename(root.join("a/b"), root.join("a/b-old")).expect("rename");
        std::os::unix::fs::symlink("../v", root.join("a/b")).expect("symlink");
        for r in [Resolver::Auto, Resolver::Walk] {
            let a = Anchor::open(&root, Side::Replica, r, false).expect("open");
            let err = a
                .hash(&rel("a/b/victim"), &HashCounters::default())
                .unwrap_err();
            let changed = PathChanged::of(&err).expect("a PathChanged error");
            assert_eq!(changed.component, rel("a/b"), "{r:?}");
        }
    }

    #[test]
    fn a_root_path_with_a_symlink_component_is_refused_and_created_without_following() {
        let t = tree();
        std::os::unix::fs::symlink(t.path().join("outside"), t.path().join("via")).expect("ln");
        let err = open_root(&t.path().join("via/new"), true).unwrap_err();
        assert!(err.to_string().contains("no longer a directory"), "{err}");
        assert!(
            !t.path().join("outside/new").exists(),
            "created through the link"
        );
        open_root(&t.path().join("made/deep"), true).expect("created");
        assert!(t.path().join("made/deep").is_dir());
    }

    #[test]
    fn the_root_itself_must_not_be_a_symlink() {
        let t = tree();
        std::os::unix::fs::symlink(t.path().join("root"), t.path().join("link")).expect("ln");
        assert!(Anchor::open(&t.path().join("link"), Side::Source, Resolver::Auto, false).is_err());
    }
}
