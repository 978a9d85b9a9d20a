//! A replica that is a local directory, reached only through its root handle (`anchor`):
//! every write is an `*at` call relative to a directory handle resolved without following a
//! symlink, or a call on the descriptor of the entry itself, so a user who owns a directory
//! of the replica cannot redirect a root-run pass out of it by swapping that directory for a
//! symlink. Such a swap makes the entry's operation fail with a `PathChanged` error; the next
//! pass repairs the replica.
//!
//! Files land atomically: content goes to an exclusive `.syncer-*.tmp` file in the target's
//! directory, gets its owner (when root), mode and times, and is renamed over the target.
//! The version of an entry is its stat token (device, inode, size, mtime, ctime).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags, RenameFlags, Timespec, Timestamps};

use super::{Capabilities, Content, CopyError, Installed, Options, Replica, Sink};
use crate::anchor::{self, Anchor, Resolver, XTarget};
use crate::error::{MountPoint, PathChanged, Side};
use crate::model::{
    show, Entry, Hash, HashCounters, Kind, Meta, RelPath, RepEntry, Stamp, Version, Xattrs,
};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A local replica directory.
pub struct LocalReplica {
    path: PathBuf,
    /// `None` when the root does not exist (and was not to be created).
    anchor: Option<Anchor>,
    caps: Capabilities,
    backup: Option<Backup>,
    /// Directories on other filesystems (mounted inside the replica) written since the last
    /// commit, by device: `syncfs` of the root's filesystem does not reach them.
    foreign: Mutex<HashMap<u64, OwnedFd>>,
    /// Running as root: every xattr namespace may be set, owners too.
    root: bool,
    /// `--one-file-system`: directories on other filesystems are not listed.
    one_file_system: bool,
    /// An attribute the replica's filesystem refused was already warned about this pass.
    warned_xattr: std::sync::atomic::AtomicBool,
}

/// This pass's backup folder, created on first use.
struct Backup {
    path: PathBuf,
    root: OnceLock<Anchor>,
}

fn not_found() -> io::Error {
    io::Error::from(io::ErrorKind::NotFound)
}

fn timestamps(meta: &Meta) -> Timestamps {
    let ts = |s: Stamp| Timespec {
        tv_sec: s.sec,
        tv_nsec: s.nsec,
    };
    Timestamps {
        last_access: ts(meta.atime),
        last_modification: ts(meta.mtime),
    }
}

fn ids(meta: &Meta) -> (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>) {
    (
        Some(rustix::fs::Uid::from_raw(meta.uid)),
        Some(rustix::fs::Gid::from_raw(meta.gid)),
    )
}

/// A fresh temp name in a directory: `.syncer-<pid>-<n>.tmp`. (The pid is read once:
/// `getpid` is a system call, and this runs once per file.)
fn temp_name() -> OsString {
    static PID: OnceLock<u32> = OnceLock::new();
    OsString::from(format!(
        ".syncer-{}-{}.tmp",
        PID.get_or_init(std::process::id),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// See `replica::check_root`: the root may be missing (it is created by the first pass),
/// but what exists must be a directory.
pub fn check_root(path: &Path) -> Result<PathBuf, String> {
    let canon = crate::config::resolve_existing_prefix(path);
    match std::fs::symlink_metadata(&canon) {
        Ok(m) if !m.is_dir() => Err(format!(
            "replica '{}' exists and is not a directory",
            crate::model::show(path)
        )),
        Ok(_) => Ok(canon),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(canon),
        Err(e) => Err(format!(
            "replica '{}' cannot be used: {}",
            crate::model::show(path),
            crate::error::reason(&e)
        )),
    }
}

/// What a local directory keeps. `owner`: chown works (syncer runs as root).
pub fn capabilities(owner: bool) -> Capabilities {
    Capabilities {
        mode: true,
        owner,
        mtime_ns: Some(1),
        hard_links: true,
        xattrs: true,
        rename: true,
        meta_in_place: true,
    }
}

fn rep_entry((name, meta, token): (OsString, Meta, super::Token)) -> RepEntry {
    Entry {
        name,
        meta,
        version: token.to_version(),
    }
}

impl LocalReplica {
    /// Opens the directory `dir` to list it; with `--one-file-system`, one on another
    /// filesystem is a mount point, left alone.
    fn open_listed(&self, dir: &RelPath) -> io::Result<OwnedFd> {
        let anchor = self.anchor()?;
        let fd = anchor.open_dir(dir)?;
        if self.one_file_system && rustix::fs::fstat(&fd)?.st_dev != anchor.dev() {
            return Err(MountPoint {
                side: Side::Replica,
                rel: dir.clone(),
            }
            .into_io());
        }
        Ok(fd)
    }

    /// Opens the replica at `path` (absolute, canonical as far as it exists). With `create`,
    /// a missing root (and its missing parents) is created first.
    pub fn open(path: &Path, opts: Options) -> io::Result<LocalReplica> {
        let anchor = match Anchor::open(path, Side::Replica, Resolver::Auto, opts.create) {
            Ok(a) => Some(a),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !opts.create => None,
            Err(e) => return Err(e),
        };
        let root = anchor::running_as_root();
        let mut caps = capabilities(root);
        caps.xattrs = opts.xattrs;
        caps.hard_links = opts.hard_links;
        if let (true, Some(a)) = (opts.xattrs, &anchor) {
            // A filesystem without extended attributes answers ENOTSUP for any name; one
            // that has them, ENODATA for a name nobody set.
            if let Err(rustix::io::Errno::NOTSUP) =
                rustix::fs::fgetxattr(a.root_fd(), "user.syncer-probe", &mut [0u8; 1][..])
            {
                caps.xattrs = false;
                log::warn!(
                    "replica '{}' is on a filesystem without extended attributes: xattrs, ACLs \
                     and file capabilities are not mirrored (content is)",
                    show(path)
                );
            }
        }
        Ok(LocalReplica {
            path: path.to_path_buf(),
            anchor,
            caps,
            backup: opts.backup.map(|path| Backup {
                path,
                root: OnceLock::new(),
            }),
            foreign: Mutex::new(HashMap::new()),
            root,
            one_file_system: opts.one_file_system,
            warned_xattr: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Makes the open entry's attributes `want` (limited to what may be set), warning once
    /// per pass about what the filesystem refuses.
    fn sync_xattrs(&self, target: XTarget<'_>, want: &Xattrs) -> io::Result<()> {
        let want = want.clone().settable(self.root);
        let have = anchor::read_xattrs_at(target)?.settable(self.root);
        if want == have {
            return Ok(());
        }
        let refused = anchor::write_xattrs(target, &want, &have)?;
        if !refused.is_empty() && !self.warned_xattr.swap(true, Ordering::Relaxed) {
            let names: Vec<String> = refused
                .iter()
                .map(|n| crate::model::escape_bytes(n))
                .collect();
            log::warn!(
                "the filesystem of replica '{}' does not keep {}: not mirrored (content is)",
                show(&self.path),
                names.join(", ")
            );
        }
        Ok(())
    }

    /// The same, with a chosen path resolver (tests pin the component walk).
    #[cfg(test)]
    pub fn open_with(path: &Path, resolver: Resolver) -> io::Result<LocalReplica> {
        let opts = Options {
            create: true,
            backup: None,
            xattrs: true,
            one_file_system: false,
            hard_links: true,
            ..Options::default()
        };
        let mut r = LocalReplica::open(path, opts)?;
        r.anchor = Some(Anchor::open(path, Side::Replica, resolver, false)?);
        Ok(r)
    }

    fn anchor(&self) -> io::Result<&Anchor> {
        self.anchor.as_ref().ok_or_else(not_found)
    }

    /// Remembers that a file was written on another filesystem than the root's.
    fn note_dev(&self, dev: u64, dir: BorrowedFd<'_>) {
        let Ok(anchor) = self.anchor() else { return };
        if dev == anchor.dev() {
            return;
        }
        let mut foreign = self.foreign.lock().expect("foreign lock");
        if let std::collections::hash_map::Entry::Vacant(v) = foreign.entry(dev) {
            if let Ok(fd) = anchor::reopen(dir, OFlags::RDONLY) {
                v.insert(fd);
            }
        }
    }

    /// Owner (when kept), mode, extended attributes (when given) and times of an open file
    /// or directory. The order matters: `chown` clears `security.capability` and setuid
    /// bits, so owner first; an ACL's mask follows the group bits, so the ACL after the mode.
    fn apply_meta_fd(
        &self,
        fd: BorrowedFd<'_>,
        meta: &Meta,
        xattrs: Option<&Xattrs>,
    ) -> io::Result<()> {
        if self.caps.owner {
            let (u, g) = ids(meta);
            rustix::fs::fchown(fd, u, g)?;
        }
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.perm))?;
        if let (Some(x), true) = (xattrs, self.caps.xattrs) {
            self.sync_xattrs(XTarget::Fd(fd), x)?;
        }
        rustix::fs::futimens(fd, &timestamps(meta))?;
        Ok(())
    }

    /// Owner (when kept) and times of the symlink `name` in `dir` (`rel` names it in
    /// errors), set through an `O_PATH` handle on the link itself after checking that it is
    /// one (and, with `expect`, that it still has that version). Setting them by name would
    /// let a user who replaced their link with a hard link to someone else's file have that
    /// file's owner changed. Returns the new version, `None` if `expect` did not match.
    fn link_meta(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        rel: &RelPath,
        meta: &Meta,
        xattrs: Option<&Xattrs>,
        expect: Option<&Version>,
    ) -> io::Result<Option<Version>> {
        let fd = anchor::link_handle(dir, name).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => PathChanged {
                side: Side::Replica,
                component: rel.clone(),
                expected: Kind::Symlink,
            }
            .into_io(),
            _ => e,
        })?;
        let token = anchor::token_of(&fd)?;
        if expect.is_some_and(|v| *v != token.to_version()) {
            return Ok(None);
        }
        if self.caps.owner {
            let (u, g) = ids(meta);
            rustix::fs::chownat(&fd, "", u, g, AtFlags::EMPTY_PATH)?;
        }
        if let (Some(x), true) = (xattrs, self.caps.xattrs) {
            self.sync_xattrs(XTarget::Link(fd.as_fd()), x)?;
        }
        rustix::fs::utimensat(&fd, "", &timestamps(meta), AtFlags::EMPTY_PATH)?;
        Ok(Some(anchor::token_of(&fd)?.to_version()))
    }

    fn version_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<Version>> {
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(anchor::from_stat(&st).1.to_version())),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The install after the temp file exists: fill it, give it its metadata, check the
    /// source did not change, rename it over the target. Errors leave the temp to the caller.
    fn fill_and_rename(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        tmp_name: &OsStr,
        tmp: &mut File,
        content: &mut dyn Content,
        unless: Option<(&Hash, &Version)>,
    ) -> Result<Installed, CopyError> {
        let bytes = content.write_into(Sink::File(tmp))?;
        let meta = *content.meta();
        let xattrs = match self.caps.xattrs {
            true => Some(content.xattrs().map_err(CopyError::Source)?),
            false => None,
        };
        self.apply_meta_fd(tmp.as_fd(), &meta, xattrs.as_ref())
            .map_err(CopyError::Replica)?;
        let hash = content.finish()?;
        if let Some((old, version)) = unless {
            if *old == hash {
                let now = Self::version_at(dir, name).map_err(CopyError::Replica)?;
                if now.as_ref() == Some(version) {
                    return Ok(Installed {
                        version: version.clone(),
                        hash,
                        bytes: 0,
                        unchanged: true,
                    });
                }
            }
        }
        rustix::fs::renameat(dir, tmp_name, dir, name).map_err(|e| CopyError::Replica(e.into()))?;
        let (_, token) =
            anchor::from_stat(&rustix::fs::fstat(&*tmp).map_err(|e| CopyError::Replica(e.into()))?);
        self.note_dev(token.dev, dir);
        Ok(Installed {
            version: token.to_version(),
            hash,
            bytes,
            unchanged: false,
        })
    }

    /// Removes the directory `name` in `dir` with everything below it, through handles only.
    /// A directory below that turns into something else meanwhile is unlinked itself, never
    /// entered.
    fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), RemoveError> {
        let fd = anchor::subdir(dir, name, OFlags::RDONLY).map_err(RemoveError::Top)?;
        let below = |e: rustix::io::Errno| RemoveError::Below(e.into());
        // Never into another filesystem mounted below: its content is not the replica's.
        let here = rustix::fs::fstat(&fd).map_err(below)?.st_dev;
        let parent = rustix::fs::fstat(dir).map_err(below)?.st_dev;
        if here != parent {
            return Err(RemoveError::Mount);
        }
        let sub = anchor::reopen(&fd, OFlags::PATH).map_err(RemoveError::Below)?;
        for (child, meta, _) in anchor::list_fd(fd).map_err(RemoveError::Below)? {
            let gone = if meta.kind == Kind::Dir {
                match Self::remove_tree(sub.as_fd(), &child) {
                    Err(RemoveError::Top(e)) if is_redirect(e) => {
                        rustix::fs::unlinkat(&sub, child.as_os_str(), AtFlags::empty())
                    }
                    Err(RemoveError::Top(e)) => Err(e),
                    Err(other) => return Err(other),
                    Ok(()) => Ok(()),
                }
            } else {
                rustix::fs::unlinkat(&sub, child.as_os_str(), AtFlags::empty())
            };
            match gone {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(below(e)),
            }
        }
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(RemoveError::Top)
    }

    /// The backup folder's handle on the parent of `rel`, creating the folders on the way
    /// (component by component, never following a symlink).
    fn backup_parent(&self, rel: &RelPath) -> io::Result<OwnedFd> {
        let backup = self.backup.as_ref().ok_or_else(not_found)?;
        let root = match backup.root.get() {
            Some(a) => a,
            None => {
                let a = Anchor::open(&backup.path, Side::Replica, Resolver::Auto, true)?;
                let _ = backup.root.set(a);
                backup.root.get().expect("just set")
            }
        };
        let mut cur = anchor::reopen(root.root_fd(), OFlags::PATH)?;
        let Some(parent) = rel.parent() else {
            return Ok(cur);
        };
        for c in parent.as_path().iter() {
            match rustix::fs::mkdirat(&cur, c, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            cur = anchor::subdir(&cur, c, OFlags::PATH)?;
        }
        Ok(cur)
    }

    fn sync_backup(&self) -> io::Result<()> {
        if let Some(root) = self.backup.as_ref().and_then(|b| b.root.get()) {
            rustix::fs::syncfs(anchor::reopen(root.root_fd(), OFlags::RDONLY)?)?;
        }
        Ok(())
    }
}

/// Why a tree removal failed: at the tree's own entry, somewhere below it, or because it
/// reached a directory on another filesystem.
enum RemoveError {
    Top(rustix::io::Errno),
    Below(io::Error),
    Mount,
}

/// The entry is not (or no longer) a directory: a symlink or a file took its place.
fn is_redirect(e: rustix::io::Errno) -> bool {
    matches!(e, rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR)
}

/// Copies `name` in `from` to `name` in `to` (a backup across filesystems): files by content,
/// links as links, directories recursively; never follows a symlink, never replaces.
fn copy_tree(from: BorrowedFd<'_>, to: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let st = rustix::fs::statat(from, name, AtFlags::SYMLINK_NOFOLLOW)?;
    match Kind::of_mode(st.st_mode) {
        Kind::Dir => {
            match rustix::fs::mkdirat(to, name, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            let src = anchor::subdir(from, name, OFlags::RDONLY)?;
            let src_path = anchor::reopen(&src, OFlags::PATH)?;
            let dst = anchor::subdir(to, name, OFlags::PATH)?;
            for (child, _, _) in anchor::list_fd(src)? {
                copy_tree(src_path.as_fd(), dst.as_fd(), &child)?;
            }
            keep_meta(
                anchor::reopen(&dst, OFlags::RDONLY)?.as_fd(),
                &anchor::from_stat(&st).0,
            )
        }
        Kind::Symlink => {
            let target = rustix::fs::readlinkat(from, name, Vec::new())?;
            rustix::fs::symlinkat(target.as_bytes(), to, name)?;
            Ok(())
        }
        Kind::File => copy_file_at(from, to, name),
        Kind::Special => Ok(()),
    }
}

fn copy_file_at(from: BorrowedFd<'_>, to: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let mut input = File::from(rustix::fs::openat(
        from,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?);
    let (meta, _) = anchor::from_stat(&rustix::fs::fstat(&input)?);
    if meta.kind != Kind::File {
        return Err(io::Error::other("no longer a regular file"));
    }
    let mut out = File::from(rustix::fs::openat(
        to,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?);
    io::copy(&mut input, &mut out)?;
    keep_meta(out.as_fd(), &meta)?;
    out.flush()?;
    out.sync_all()
}

/// Gives a backup copy the original's owner (when root), mode and times.
fn keep_meta(fd: BorrowedFd<'_>, meta: &Meta) -> io::Result<()> {
    if anchor::running_as_root() {
        let (u, g) = ids(meta);
        rustix::fs::fchown(fd, u, g)?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.perm))?;
    rustix::fs::futimens(fd, &timestamps(meta))?;
    Ok(())
}

impl Replica for LocalReplica {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn root(&self) -> io::Result<Option<Meta>> {
        match &self.anchor {
            None => Ok(None),
            Some(a) => Ok(Some(a.stat_root()?.0)),
        }
    }

    fn list(&self, dir: &RelPath) -> io::Result<Vec<RepEntry>> {
        Ok(anchor::list_fd(self.open_listed(dir)?)?
            .into_iter()
            .map(rep_entry)
            .collect())
    }

    fn list_only(&self, dir: &RelPath, names: &[OsString]) -> io::Result<Vec<RepEntry>> {
        let fd = self.open_listed(dir)?;
        Ok(anchor::stat_names(fd.as_fd(), names.iter().cloned())?
            .into_iter()
            .map(rep_entry)
            .collect())
    }

    fn stat(&self, rel: &RelPath) -> io::Result<Option<(Meta, Version)>> {
        Ok(self
            .anchor()?
            .stat(rel)?
            .map(|(meta, token)| (meta, token.to_version())))
    }

    fn hash(&self, rel: &RelPath, counters: &HashCounters) -> io::Result<(Option<Hash>, Version)> {
        let (hash, token) = self.anchor()?.hash(rel, counters)?;
        Ok((Some(hash), token.to_version()))
    }

    fn read_link(&self, rel: &RelPath) -> io::Result<PathBuf> {
        self.anchor()?.read_link(rel)
    }

    fn xattrs(&self, rel: &RelPath, kind: Kind) -> io::Result<Xattrs> {
        Ok(self.anchor()?.xattrs(rel, kind)?.settable(self.root))
    }

    /// A temp file made and removed in the root, as an install makes one.
    fn probe(&self) -> io::Result<()> {
        let anchor = self.anchor()?;
        let name = temp_name();
        let fd = rustix::fs::openat(
            anchor.root_fd(),
            name.as_os_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        drop(fd);
        rustix::fs::unlinkat(anchor.root_fd(), name.as_os_str(), AtFlags::empty())?;
        Ok(())
    }

    fn install_file(
        &self,
        rel: &RelPath,
        content: &mut dyn Content,
        unless: Option<(&Hash, &Version)>,
    ) -> Result<Installed, CopyError> {
        let anchor = self.anchor().map_err(CopyError::Replica)?;
        let (dir, name) = anchor.parent(rel).map_err(CopyError::Replica)?;
        let (fd, tmp_name) = loop {
            let tmp_name = temp_name();
            match rustix::fs::openat(
                &dir,
                tmp_name.as_os_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            ) {
                Ok(fd) => break (fd, tmp_name),
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(CopyError::Replica(e.into())),
            }
        };
        let mut tmp = File::from(fd);
        let result = self.fill_and_rename(dir.as_fd(), name, &tmp_name, &mut tmp, content, unless);
        if !matches!(
            result,
            Ok(Installed {
                unchanged: false,
                ..
            })
        ) {
            let _ = rustix::fs::unlinkat(&dir, tmp_name.as_os_str(), AtFlags::empty());
        }
        result
    }

    fn mkdir(&self, rel: &RelPath) -> io::Result<()> {
        let (dir, name) = self.anchor()?.parent(rel)?;
        rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))?;
        Ok(())
    }

    fn symlink(
        &self,
        rel: &RelPath,
        target: &Path,
        meta: &Meta,
        xattrs: Option<&Xattrs>,
    ) -> io::Result<()> {
        let (dir, name) = self.anchor()?.parent(rel)?;
        let tmp = loop {
            let tmp = temp_name();
            match rustix::fs::symlinkat(target, &dir, tmp.as_os_str()) {
                Ok(()) => break tmp,
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let finish = || -> io::Result<()> {
            self.link_meta(dir.as_fd(), &tmp, rel, meta, xattrs, None)?;
            rustix::fs::renameat(&dir, tmp.as_os_str(), &dir, name)?;
            Ok(())
        };
        finish().inspect_err(|_| {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_os_str(), AtFlags::empty());
        })
    }

    fn set_meta(
        &self,
        rel: &RelPath,
        meta: &Meta,
        xattrs: Option<&Xattrs>,
        expect: Option<&Version>,
    ) -> io::Result<Option<Version>> {
        let anchor = self.anchor()?;
        if meta.kind == Kind::Symlink {
            let (dir, name) = anchor.parent(rel)?;
            return self.link_meta(dir.as_fd(), name, rel, meta, xattrs, expect);
        }
        let mut flags = OFlags::RDONLY | OFlags::NONBLOCK;
        if meta.kind == Kind::Dir {
            flags |= OFlags::DIRECTORY;
        }
        let fd = anchor.open_at(rel, flags, meta.kind)?;
        let (found, token) = anchor::from_stat(&rustix::fs::fstat(&fd)?);
        if found.kind != meta.kind {
            return Err(PathChanged {
                side: Side::Replica,
                component: rel.clone(),
                expected: meta.kind,
            }
            .into_io());
        }
        if expect.is_some_and(|v| *v != token.to_version()) {
            return Ok(None);
        }
        self.apply_meta_fd(fd.as_fd(), meta, xattrs)?;
        if token.dev != anchor.dev() {
            // On a filesystem mounted inside the replica: the commit must sync that one too.
            match meta.kind {
                Kind::Dir => self.note_dev(token.dev, fd.as_fd()),
                _ => {
                    if let Ok((dir, _)) = anchor.parent(rel) {
                        self.note_dev(token.dev, dir.as_fd());
                    }
                }
            }
        }
        Ok(Some(anchor::token_of(&fd)?.to_version()))
    }

    fn remove(&self, rel: &RelPath, kind: Kind) -> io::Result<()> {
        let (dir, name) = self.anchor()?.parent(rel)?;
        if kind != Kind::Dir {
            return match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
                Ok(()) => Ok(()),
                // A directory took its place: not what the plan saw; the next pass decides.
                Err(rustix::io::Errno::ISDIR) => Err(PathChanged {
                    side: Side::Replica,
                    component: rel.clone(),
                    expected: kind,
                }
                .into_io()),
                Err(e) => Err(e.into()),
            };
        }
        match Self::remove_tree(dir.as_fd(), name) {
            Err(RemoveError::Top(e)) if is_redirect(e) => Err(PathChanged {
                side: Side::Replica,
                component: rel.clone(),
                expected: Kind::Dir,
            }
            .into_io()),
            Err(RemoveError::Top(e)) => Err(e.into()),
            Err(RemoveError::Below(e)) => Err(e),
            Err(RemoveError::Mount) => Err(io::Error::other(format!(
                "a filesystem is mounted at or below '{}'; nothing on it is deleted",
                rel
            ))),
            Ok(()) => Ok(()),
        }
    }

    fn hard_link(&self, rel: &RelPath, to: &RelPath) -> io::Result<()> {
        let anchor = self.anchor()?;
        let (from_dir, from_name) = anchor.parent(to)?;
        let (dir, name) = anchor.parent(rel)?;
        let tmp = loop {
            let tmp = temp_name();
            // No AT_SYMLINK_FOLLOW: a symlink swapped in for the leader is linked itself.
            match rustix::fs::linkat(
                &from_dir,
                from_name,
                &dir,
                tmp.as_os_str(),
                AtFlags::empty(),
            ) {
                Ok(()) => break tmp,
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let result = rustix::fs::renameat(&dir, tmp.as_os_str(), &dir, name);
        // A rename onto another name of the same inode does nothing and leaves the temp.
        let _ = rustix::fs::unlinkat(&dir, tmp.as_os_str(), AtFlags::empty());
        result?;
        if let Ok(st) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            self.note_dev(st.st_dev, dir.as_fd());
        }
        Ok(())
    }

    fn rename(&self, from: &RelPath, to: &RelPath) -> io::Result<()> {
        let anchor = self.anchor()?;
        let (a, an) = anchor.parent(from)?;
        let (b, bn) = anchor.parent(to)?;
        rustix::fs::renameat_with(&a, an, &b, bn, RenameFlags::NOREPLACE)?;
        Ok(())
    }

    fn backup(&self, rel: &RelPath, keep: bool) -> io::Result<()> {
        let (dir, name) = self.anchor()?.parent(rel)?;
        let to = self.backup_parent(rel)?;
        if keep {
            // A hard link keeps the replica file in place until the install's rename
            // replaces it; `linkat` never replaces an existing backup.
            return match rustix::fs::linkat(&dir, name, &to, name, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                Err(rustix::io::Errno::XDEV) => copy_file_at(dir.as_fd(), to.as_fd(), name),
                Err(e) => Err(e.into()),
            };
        }
        match rustix::fs::renameat_with(&dir, name, &to, name, RenameFlags::NOREPLACE) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::XDEV) => {
                // Across filesystems: a durable copy first, then the replica entry goes.
                copy_tree(dir.as_fd(), to.as_fd(), name)?;
                self.sync_backup()?;
                let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
                self.remove(rel, Kind::of_mode(st.st_mode))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn commit(&self) -> io::Result<()> {
        let anchor = self.anchor()?;
        rustix::fs::syncfs(anchor.root_fd())?;
        let foreign: Vec<OwnedFd> = self
            .foreign
            .lock()
            .expect("foreign lock")
            .drain()
            .map(|(_, fd)| fd)
            .collect();
        for fd in foreign {
            rustix::fs::syncfs(&fd)?;
        }
        Ok(())
    }

    fn lock(&self) -> io::Result<Option<Box<dyn Send>>> {
        let Some(anchor) = &self.anchor else {
            return Ok(None);
        };
        // A descriptor of its own: the lock must outlive this replica object.
        let fd = anchor::reopen(anchor.root_fd(), OFlags::RDONLY)?;
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(Box::new(fd))),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(io::ErrorKind::WouldBlock.into()),
            Err(e) => Err(e.into()),
        }
    }
}

impl std::fmt::Debug for LocalReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalReplica({})", crate::model::show(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn rel(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes())
    }

    /// Mode, owner, mtime, ctime and content of `dir` and every entry in it.
    fn fingerprint(dir: &Path) -> Vec<(OsString, u32, u32, i64, i64, Vec<u8>)> {
        use std::os::unix::fs::MetadataExt;
        let print = |name: OsString, p: &Path| {
            let m = std::fs::symlink_metadata(p).expect("lstat");
            let data = if m.is_file() {
                std::fs::read(p).expect("read")
            } else {
                Vec::new()
            };
            (
                name,
                m.mode(),
                m.uid(),
                m.mtime_nsec() + m.mtime() * 1_000_000_000,
                m.ctime(),
                data,
            )
        };
        let mut out = vec![print(OsString::from("."), dir)];
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        for n in names {
            out.push(print(n.clone(), &dir.join(&n)));
        }
        out
    }

    fn dir_meta() -> Meta {
        Meta {
            kind: Kind::Dir,
            perm: 0o777,
            uid: 65534,
            gid: 65534,
            size: 0,
            mtime: Stamp { sec: 1, nsec: 0 },
            atime: Stamp { sec: 1, nsec: 0 },
            link: None,
        }
    }

    fn assert_changed(result: io::Result<impl std::fmt::Debug>, what: &str) {
        let err = result.expect_err(what);
        assert!(PathChanged::of(&err).is_some(), "{what}: {err}");
    }

    #[test]
    fn no_write_goes_through_a_directory_swapped_for_a_symlink() {
        // An absolute link out of the replica, and a relative one into another directory of
        // the replica (which RESOLVE_BENEATH alone would allow).
        for (target, victim) in [("OUTSIDE", "outside"), ("../v", "rep/v")] {
            for resolver in [Resolver::Auto, Resolver::Walk] {
                let t = tempfile::tempdir().expect("tempdir");
                let root = t.path().join("rep");
                let victim = t.path().join(victim);
                std::fs::create_dir_all(root.join("u/d")).expect("mkdir");
                std::fs::create_dir_all(&victim).expect("mkdir");
                std::fs::write(victim.join("f"), b"keep").expect("write");
                std::fs::write(root.join("u/x"), b"x").expect("write");
                let r = LocalReplica::open_with(&root, resolver).expect("open");
                std::fs::remove_dir(root.join("u/d")).expect("rmdir");
                let link = if target == "OUTSIDE" {
                    victim.clone()
                } else {
                    PathBuf::from(target)
                };
                symlink(&link, root.join("u/d")).expect("symlink");
                let before = fingerprint(&victim);
                let meta = dir_meta();
                let file_meta = Meta {
                    kind: Kind::File,
                    ..meta
                };
                let link_meta = Meta {
                    kind: Kind::Symlink,
                    ..meta
                };
                assert_changed(r.mkdir(&rel("u/d/new")), "mkdir below");
                assert_changed(r.set_meta(&rel("u/d"), &meta, None, None), "set_meta of it");
                assert_changed(
                    r.set_meta(&rel("u/d/f"), &file_meta, None, None),
                    "set_meta below",
                );
                assert_changed(r.remove(&rel("u/d/f"), Kind::File), "remove below");
                assert_changed(
                    r.symlink(&rel("u/d/l"), Path::new("x"), &link_meta, None),
                    "symlink",
                );
                assert_changed(r.rename(&rel("u/x"), &rel("u/d/y")), "rename into it");
                assert_changed(r.remove(&rel("u/d"), Kind::Dir), "remove it as a tree");
                assert_eq!(fingerprint(&victim), before, "{target} {resolver:?}");
                assert!(root.join("u/x").exists());
            }
        }
    }

    #[test]
    fn symlink_metadata_is_never_set_through_a_hard_link_swapped_in() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("rep");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::write(root.join("victim"), b"root's").expect("write");
        let r = LocalReplica::open(&root, Options::default()).expect("open");
        let meta = Meta {
            kind: Kind::Symlink,
            ..dir_meta()
        };
        r.symlink(&rel("l"), Path::new("target"), &meta, None)
            .expect("symlink");
        // The link's owner replaces it with a hard link to a file it may not own.
        std::fs::remove_file(root.join("l")).expect("rm");
        std::fs::hard_link(root.join("victim"), root.join("l")).expect("ln");
        let before = fingerprint(&root);
        assert_changed(
            r.set_meta(&rel("l"), &meta, None, None),
            "set_meta of a swapped link",
        );
        assert_eq!(fingerprint(&root), before);
    }

    #[test]
    fn removing_a_tree_unlinks_a_symlink_below_it_and_never_enters_it() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("rep");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("f"), b"keep").expect("write");
        std::fs::remove_dir(root.join("a/b")).expect("rmdir");
        symlink(&outside, root.join("a/b")).expect("symlink");
        let before = fingerprint(&outside);
        let r = LocalReplica::open(&root, Options::default()).expect("open");
        r.remove(&rel("a"), Kind::Dir).expect("remove");
        assert!(!root.join("a").exists());
        assert_eq!(fingerprint(&outside), before);
    }

    #[test]
    fn rename_never_replaces_and_removes_trees_through_handles() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("rep");
        std::fs::create_dir_all(root.join("a/b/c")).expect("mkdir");
        std::fs::write(root.join("a/b/c/f"), b"x").expect("write");
        std::fs::write(root.join("g"), b"y").expect("write");
        std::fs::write(root.join("h"), b"z").expect("write");
        let r = LocalReplica::open(&root, Options::default()).expect("open");
        assert!(r.rename(&rel("g"), &rel("h")).is_err());
        r.rename(&rel("g"), &rel("a/g")).expect("rename");
        assert_eq!(std::fs::read(root.join("a/g")).expect("read"), b"y");
        r.remove(&rel("a"), Kind::Dir).expect("remove");
        assert!(!root.join("a").exists());
    }

    #[test]
    fn lock_is_exclusive_between_two_handles() {
        let t = tempfile::tempdir().expect("tempdir");
        let a = LocalReplica::open(t.path(), Options::default()).expect("open");
        let b = LocalReplica::open(t.path(), Options::default()).expect("open");
        let held = a.lock().expect("lock");
        assert!(held.is_some());
        assert_eq!(
            b.lock().map(|_| ()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(held);
        assert!(b.lock().expect("lock").is_some());
    }
}
