//! An in-memory tree for in-process tests: a [`Replica`] and a [`SourceTree`] at once, so
//! scan, compare, plan and apply can run without a filesystem, a clock or a sleep. It keeps
//! what the capabilities it was given say it keeps, numbers versions with a counter, and
//! records every call that changes it, so a test can assert what a pass did and did not do.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::{Capabilities, Content, CopyError, Installed, Replica, Sink};
use crate::model::{
    Entry, Hash, HashCounters, Kind, Meta, RelPath, RepEntry, SrcEntry, Stamp, Token, Version,
    Xattrs,
};
use crate::source::SourceTree;

/// One entry of the tree.
#[derive(Clone, Debug)]
pub struct Node {
    pub meta: Meta,
    pub data: Vec<u8>,
    pub target: PathBuf,
    /// Bumped by every change, like a local file's ctime.
    pub version: u64,
    /// The status-change time a source token reports (ns); a test sets it to make a token
    /// racy.
    pub ctime_ns: i64,
    pub xattrs: Xattrs,
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<RelPath, Node>,
    next: u64,
}

pub struct Fake {
    state: Mutex<State>,
    caps: Capabilities,
    /// Every call that changed the tree, as `"<op> <path>"`.
    pub calls: Mutex<Vec<String>>,
}

/// Everything a local replica keeps when running as root.
pub fn full_caps() -> Capabilities {
    super::local::capabilities(true)
}

pub fn rel(s: &str) -> RelPath {
    RelPath::from_bytes(s.as_bytes())
}

pub fn meta(kind: Kind, perm: u32, mtime: i64, size: u64) -> Meta {
    Meta {
        kind,
        perm,
        uid: 1000,
        gid: 1000,
        size,
        mtime: Stamp {
            sec: mtime,
            nsec: 0,
        },
        atime: Stamp {
            sec: mtime,
            nsec: 0,
        },
        link: None,
    }
}

fn version_of(n: u64) -> Version {
    Version::from_bytes(&n.to_le_bytes())
}

impl Fake {
    pub fn new(caps: Capabilities) -> Fake {
        let fake = Fake {
            state: Mutex::new(State::default()),
            caps,
            calls: Mutex::new(Vec::new()),
        };
        fake.put(
            &RelPath::root(),
            meta(Kind::Dir, 0o755, 1, 0),
            Vec::new(),
            "",
        );
        fake
    }

    fn put(&self, rel: &RelPath, meta: Meta, data: Vec<u8>, target: &str) {
        let mut st = self.state.lock().expect("fake lock");
        st.next += 1;
        let version = st.next;
        st.nodes.insert(
            rel.clone(),
            Node {
                meta,
                data,
                target: PathBuf::from(target),
                version,
                ctime_ns: 0,
                xattrs: Xattrs::default(),
            },
        );
    }

    /// Adds (or replaces) a file, as a user would.
    pub fn file(&self, path: &str, data: &[u8], perm: u32, mtime: i64) {
        let m = meta(Kind::File, perm, mtime, data.len() as u64);
        self.put(&rel(path), m, data.to_vec(), "");
    }

    pub fn dir(&self, path: &str) {
        self.put(&rel(path), meta(Kind::Dir, 0o755, 1, 0), Vec::new(), "");
    }

    pub fn link(&self, path: &str, target: &str) {
        self.put(
            &rel(path),
            meta(Kind::Symlink, 0o777, 1, 0),
            Vec::new(),
            target,
        );
    }

    /// Changes an entry in place (a new version), as a user would.
    pub fn edit(&self, path: &str, f: impl FnOnce(&mut Node)) {
        self.edit_rel(&rel(path), f)
    }

    fn edit_rel(&self, rel: &RelPath, f: impl FnOnce(&mut Node)) {
        let mut st = self.state.lock().expect("fake lock");
        st.next += 1;
        let version = st.next;
        let node = st.nodes.get_mut(rel).expect("the entry exists");
        f(node);
        node.meta.size = node.data.len() as u64;
        node.version = version;
    }

    pub fn get(&self, path: &str) -> Option<Node> {
        self.state
            .lock()
            .expect("fake lock")
            .nodes
            .get(&rel(path))
            .cloned()
    }

    /// Paths of all entries below the root, sorted.
    pub fn paths(&self) -> Vec<String> {
        self.state
            .lock()
            .expect("fake lock")
            .nodes
            .keys()
            .filter(|k| !k.is_root())
            .map(|k| k.to_string())
            .collect()
    }

    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().expect("calls lock"))
    }

    fn call(&self, op: &str, rel: &RelPath) {
        self.calls
            .lock()
            .expect("calls lock")
            .push(format!("{op} {rel}"));
    }

    fn node(&self, rel: &RelPath) -> io::Result<Node> {
        self.state
            .lock()
            .expect("fake lock")
            .nodes
            .get(rel)
            .cloned()
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    fn children(&self, dir: &RelPath) -> io::Result<Vec<(RelPath, Node)>> {
        let st = self.state.lock().expect("fake lock");
        match st.nodes.get(dir) {
            Some(n) if n.meta.kind == Kind::Dir => {}
            Some(_) => return Err(io::Error::other("not a directory")),
            None => return Err(io::ErrorKind::NotFound.into()),
        }
        let mut out: Vec<(RelPath, Node)> = st
            .nodes
            .iter()
            .filter(|(k, _)| !k.is_root() && k.parent().as_ref() == Some(dir))
            .map(|(k, n)| (k.clone(), n.clone()))
            .collect();
        out.sort_by(|a, b| a.0.file_name().cmp(&b.0.file_name()));
        Ok(out)
    }

    /// A directory's entries, each with the version `version` makes of its node.
    fn entries<V>(&self, dir: &RelPath, version: impl Fn(&Node) -> V) -> io::Result<Vec<Entry<V>>> {
        Ok(self
            .children(dir)?
            .into_iter()
            .map(|(k, n)| Entry {
                name: k.file_name().expect("not the root").to_os_string(),
                meta: n.meta,
                version: version(&n),
            })
            .collect())
    }

    fn token(n: &Node) -> Token {
        Token {
            dev: 1,
            ino: n.version,
            size: n.meta.size,
            mtime_ns: n.meta.mtime.sec * 1_000_000_000 + n.meta.mtime.nsec,
            ctime_ns: n.ctime_ns,
        }
    }

    /// What this fake keeps of `meta`.
    fn kept(&self, mut meta: Meta) -> Meta {
        if !self.caps.mode {
            meta.perm = 0o644;
        }
        if !self.caps.owner {
            meta.uid = 0;
            meta.gid = 0;
        }
        if self.caps.mtime_ns.is_none() {
            meta.mtime = Stamp::default();
        }
        meta
    }

    fn parent_is_dir(&self, rel: &RelPath) -> io::Result<()> {
        let parent = rel.parent().unwrap_or_default();
        match self.node(&parent)?.meta.kind {
            Kind::Dir => Ok(()),
            _ => Err(io::Error::other("parent is not a directory")),
        }
    }
}

/// A file of the fake on its way into a replica.
struct FakeContent {
    xattrs: Xattrs,
    data: Vec<u8>,
    meta: Meta,
    token: Token,
    known: Option<Hash>,
    written: u64,
}

impl Content for FakeContent {
    fn meta(&self) -> &Meta {
        &self.meta
    }
    fn token(&self) -> Token {
        self.token
    }
    fn write_into(&mut self, out: Sink<'_>) -> Result<u64, CopyError> {
        let w: &mut dyn io::Write = match out {
            Sink::File(f) => f,
            Sink::Stream(w) => w,
        };
        w.write_all(&self.data).map_err(CopyError::Replica)?;
        self.written = self.data.len() as u64;
        Ok(self.written)
    }
    fn xattrs(&self) -> io::Result<Xattrs> {
        Ok(self.xattrs.clone())
    }
    fn finish(&mut self) -> Result<Hash, CopyError> {
        if self.written != self.meta.size {
            return Err(CopyError::Changed);
        }
        Ok(self
            .known
            .unwrap_or_else(|| Hash(Sha256::digest(&self.data).into())))
    }
}

impl SourceTree for Fake {
    fn xattrs(&self, rel: &RelPath, _kind: Kind) -> io::Result<Xattrs> {
        Ok(self.node(rel)?.xattrs)
    }

    fn root(&self) -> io::Result<Meta> {
        Ok(self.node(&RelPath::root())?.meta)
    }

    fn root_dev(&self) -> u64 {
        1
    }

    fn list(&self, dir: &RelPath) -> io::Result<Vec<SrcEntry>> {
        self.entries(dir, Fake::token)
    }

    fn hash(&self, rel: &RelPath, counters: &HashCounters) -> io::Result<(Hash, Token)> {
        let n = self.node(rel)?;
        counters.add(n.data.len() as u64);
        Ok((Hash(Sha256::digest(&n.data).into()), Fake::token(&n)))
    }

    fn read_link(&self, rel: &RelPath) -> io::Result<PathBuf> {
        Ok(self.node(rel)?.target)
    }

    fn open_file(
        &self,
        rel: &RelPath,
        known: Option<(Token, Hash)>,
    ) -> io::Result<Box<dyn Content + '_>> {
        let n = self.node(rel)?;
        let token = Fake::token(&n);
        Ok(Box::new(FakeContent {
            xattrs: n.xattrs.clone(),
            known: known.and_then(|(t, h)| (t == token).then_some(h)),
            data: n.data,
            meta: n.meta,
            token,
            written: 0,
        }))
    }
}

impl Replica for Fake {
    fn xattrs(&self, rel: &RelPath, _kind: Kind) -> io::Result<Xattrs> {
        Ok(self.node(rel)?.xattrs)
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn root(&self) -> io::Result<Option<Meta>> {
        Ok(Some(self.node(&RelPath::root())?.meta))
    }

    fn list(&self, dir: &RelPath) -> io::Result<Vec<RepEntry>> {
        self.entries(dir, |n| version_of(n.version))
    }

    fn stat(&self, rel: &RelPath) -> io::Result<Option<(Meta, Version)>> {
        match self.node(rel) {
            Ok(n) => Ok(Some((n.meta, version_of(n.version)))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn hash(&self, rel: &RelPath, counters: &HashCounters) -> io::Result<(Option<Hash>, Version)> {
        let n = self.node(rel)?;
        counters.add(n.data.len() as u64);
        Ok((
            Some(Hash(Sha256::digest(&n.data).into())),
            version_of(n.version),
        ))
    }

    fn read_link(&self, rel: &RelPath) -> io::Result<PathBuf> {
        Ok(self.node(rel)?.target)
    }

    fn install_file(
        &self,
        rel: &RelPath,
        content: &mut dyn Content,
        unless: Option<(&Hash, &Version)>,
    ) -> Result<Installed, CopyError> {
        self.parent_is_dir(rel).map_err(CopyError::Replica)?;
        let mut data = Vec::new();
        let bytes = content.write_into(Sink::Stream(&mut data))?;
        let hash = content.finish()?;
        if let Some((old, version)) = unless {
            let now = self.stat(rel).map_err(CopyError::Replica)?;
            if *old == hash && now.as_ref().map(|n| &n.1) == Some(version) {
                return Ok(Installed {
                    version: version.clone(),
                    hash,
                    bytes: 0,
                    unchanged: true,
                });
            }
        }
        self.call("install", rel);
        let meta = self.kept(*content.meta());
        let xattrs = match self.caps.xattrs {
            true => content.xattrs().map_err(CopyError::Source)?,
            false => Xattrs::default(),
        };
        self.put(rel, meta, data, "");
        self.edit_rel(rel, |n| n.xattrs = xattrs);
        let version = version_of(self.node(rel).map_err(CopyError::Replica)?.version);
        Ok(Installed {
            version,
            hash,
            bytes,
            unchanged: false,
        })
    }

    fn mkdir(&self, rel: &RelPath) -> io::Result<()> {
        self.parent_is_dir(rel)?;
        if self.node(rel).is_ok() {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        self.call("mkdir", rel);
        self.put(rel, meta(Kind::Dir, 0o700, 0, 0), Vec::new(), "");
        Ok(())
    }

    fn symlink(
        &self,
        rel: &RelPath,
        target: &Path,
        meta: &Meta,
        _xattrs: Option<&Xattrs>,
    ) -> io::Result<()> {
        self.parent_is_dir(rel)?;
        self.call("symlink", rel);
        let kept = self.kept(*meta);
        self.put(rel, kept, Vec::new(), &target.to_string_lossy());
        Ok(())
    }

    fn set_meta(
        &self,
        rel: &RelPath,
        meta: &Meta,
        xattrs: Option<&Xattrs>,
        expect: Option<&Version>,
    ) -> io::Result<Option<Version>> {
        let n = self.node(rel)?;
        if expect.is_some_and(|v| *v != version_of(n.version)) {
            return Ok(None);
        }
        self.call("set_meta", rel);
        let kept = self.kept(*meta);
        let keep_xattrs = self.caps.xattrs;
        self.edit_rel(rel, |n| {
            n.meta = Meta {
                size: n.meta.size,
                kind: n.meta.kind,
                ..kept
            };
            if let (Some(x), true) = (xattrs, keep_xattrs) {
                n.xattrs = x.clone();
            }
        });
        Ok(Some(version_of(self.node(rel)?.version)))
    }

    fn remove(&self, rel: &RelPath, _kind: Kind) -> io::Result<()> {
        self.node(rel)?;
        self.call("remove", rel);
        let mut st = self.state.lock().expect("fake lock");
        st.nodes
            .retain(|k, _| k != rel && !k.as_path().starts_with(rel.as_path()));
        Ok(())
    }

    fn hard_link(&self, rel: &RelPath, to: &RelPath) -> io::Result<()> {
        let n = self.node(to)?;
        self.call("hard_link", rel);
        self.state
            .lock()
            .expect("fake lock")
            .nodes
            .insert(rel.clone(), n);
        Ok(())
    }

    fn rename(&self, from: &RelPath, to: &RelPath) -> io::Result<()> {
        if self.node(to).is_ok() {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        self.node(from)?;
        self.call("rename", from);
        let mut st = self.state.lock().expect("fake lock");
        // The entry and everything below it.
        let moved: Vec<RelPath> = st
            .nodes
            .keys()
            .filter(|k| k.as_path().starts_with(from.as_path()))
            .cloned()
            .collect();
        for old in moved {
            let n = st.nodes.remove(&old).expect("listed");
            let rest = old.as_path().strip_prefix(from.as_path()).expect("below");
            let new = match rest.as_os_str().is_empty() {
                true => to.clone(),
                false => {
                    RelPath::from_bytes(to.as_path().join(rest).as_os_str().as_encoded_bytes())
                }
            };
            st.nodes.insert(new, n);
        }
        Ok(())
    }

    fn backup(&self, rel: &RelPath, keep: bool) -> io::Result<()> {
        self.call("backup", rel);
        if !keep {
            let kind = self.node(rel)?.meta.kind;
            self.remove(rel, kind)?;
        }
        Ok(())
    }

    fn probe(&self) -> io::Result<()> {
        Ok(())
    }

    fn commit(&self) -> io::Result<()> {
        self.call("commit", &RelPath::root());
        Ok(())
    }

    fn lock(&self) -> io::Result<Option<Box<dyn Send>>> {
        Ok(None)
    }
}
