//! A replica in an S3-compatible bucket, through Apache OpenDAL's S3 service (issue 12).
//!
//! Layout under `s3://BUCKET/PREFIX`:
//! - a regular file is one object at `PREFIX/<path>`, written by one PUT (a multipart upload
//!   above [`MULTIPART_MIN`]), so a key never holds a torn file. Its user metadata carries
//!   what rclone's `--metadata` keeps (`mtime` as seconds with a fraction, `mode` in octal
//!   with the file type, `uid`, `gid`) and the content's `sha256`;
//! - a symlink is an object `<path>.rclonelink` whose content is the target (rclone's `-l`
//!   convention), with the same metadata;
//! - a directory is a zero-byte marker `<path>/` (rclone's `--s3-directory-markers`), and the
//!   attributes of every directory are kept in one object, [`DIRS_OBJECT`];
//! - a name byte that S3 or its XML listing cannot carry (not UTF-8, a control character) is
//!   written as `%XX`, and so is `%` itself; a file name that would read as a symlink or as
//!   the directory object gets its `.` escaped the same way. Decoding reverses it exactly.
//!
//! An object's version is its ETag and size, both given by the listing. What syncer wrote is
//! kept in a local index beside the state (key, ETag and size → metadata and sha256), so an
//! idle pass is one recursive listing: no HEAD and no GET. A key whose ETag or size is not
//! in the index (a lost index, or someone else's write) costs one HEAD, never a download.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opendal::Operator;
use rayon::prelude::*;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::{Capabilities, Content, CopyError, Installed, Options, Replica, Sink};
use crate::model::{
    Entry, Hash, HashCounters, Kind, Meta, RelPath, RepEntry, Stamp, Version, Xattrs,
};

mod address;
mod deletes;
mod errors;
mod keys;
mod source;
mod uploads;

pub use address::{Endpoint, Target, DEFAULT_TIMEOUT};
use deletes::Deletes;
pub use errors::one_line;
use errors::{describe, interrupted, is_timeout, other};
pub use keys::{escape, unescape};
use keys::{escape_path, unescape_path};

/// Files above this size go up as multipart uploads, several parts in flight; smaller ones
/// are read into memory once (hashed on the way) and sent with one PUT.
pub const MULTIPART_MIN: u64 = 16 << 20;
/// Part size of a multipart upload, and parts in flight.
const PART: usize = 8 << 20;
const PARTS_IN_FLIGHT: usize = 4;
/// The object holding every directory's attributes (a name escaped in the tree).
pub const DIRS_OBJECT: &str = ".syncer-dirs.json";
const LINK_SUFFIX: &str = ".rclonelink";
/// Listing entries read under one budget (a ListObjectsV2 page holds 1,000).
const LIST_BATCH: usize = 1000;
/// Keys per DeleteObjects request.
const DELETE_BATCH: usize = 1000;

/// After SIGTERM, how long a multipart writer's call in flight may take to finish, and then
/// how long the upload's abort may take (SIGTERM must end a pass within seconds, whatever
/// the server does).
const GRACE: Duration = Duration::from_secs(2);
const ABORT_BUDGET: Duration = Duration::from_millis(1500);

/// A body (an upload, a ranged download) gets `--timeout` more for each MiB it carries, on
/// top of the three of any request: a slow link is not a dead one (1 MiB a minute, 17 KiB/s,
/// at the default), while a stalled transfer still ends in bounded time.
const BODY_UNIT: u64 = 1 << 20;

/// The bytes one call on a multipart writer may have to move before it returns (the parts
/// in flight).
const WRITER_CALL_BYTES: u64 = (PART * PARTS_IN_FLIGHT) as u64;

/// What the index knows of one object syncer wrote (or HEADed).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Known {
    etag: String,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    sha256: Option<[u8; 32]>,
    /// A symlink's target.
    link: Option<Vec<u8>>,
}

impl Known {
    /// An object of syncer's own (the directory object): only its version matters.
    fn plain(etag: String, size: u64) -> Known {
        Known {
            etag,
            size,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            sha256: None,
            link: None,
        }
    }
}

/// The attributes of one directory, as kept in [`DIRS_OBJECT`].
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct DirAttrs {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
}

impl DirAttrs {
    fn of(meta: &Meta) -> DirAttrs {
        DirAttrs {
            mode: meta.perm,
            uid: meta.uid,
            gid: meta.gid,
            mtime: (meta.mtime.sec, meta.mtime.nsec),
        }
    }
}

/// One object (or directory) of the listing.
#[derive(Clone, Debug)]
struct Listed {
    name: OsString,
    kind: Kind,
    key: String,
    size: u64,
    etag: String,
}

const OBJECTS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("objects");
const INFO: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("info");

/// Requests made by this replica, for the pass summary and the tests.
#[derive(Debug, Default)]
pub struct Requests {
    pub list: AtomicU64,
    pub head: AtomicU64,
    pub get: AtomicU64,
    pub put: AtomicU64,
    pub delete: AtomicU64,
}

impl std::fmt::Display for Requests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        write!(
            f,
            "list {}, head {}, get {}, put {}, delete {}",
            n(&self.list),
            n(&self.head),
            n(&self.get),
            n(&self.put),
            n(&self.delete)
        )
    }
}

pub struct S3Replica {
    /// Dropped before the runtime (see `Drop`).
    op: Option<Operator>,
    /// With `--backup-dir`: an operator on the whole bucket, and this pass's backup prefix.
    backup: Option<String>,
    /// An operator on the whole bucket (backups, and the directory attributes of an
    /// enclosing prefix). Dropped before the runtime, as `op`.
    bucket: Option<Operator>,
    /// The operator that moves bodies (uploads, ranged downloads): as `op`, but its timeout
    /// layer does not cut a body that is still moving (see [`BODY_UNIT`]).
    bulk: Option<Operator>,
    rt: Option<tokio::runtime::Runtime>,
    target: Target,
    /// Directory → its children, from the one listing made when the replica was opened.
    tree: BTreeMap<RelPath, Vec<Listed>>,
    /// Whether anything exists under the prefix.
    exists: Mutex<bool>,
    index: Option<redb::Database>,
    /// Index changes not yet written (`None`: forget the key).
    pending: Mutex<HashMap<String, Option<Known>>>,
    dirs: Mutex<BTreeMap<Vec<u8>, DirAttrs>>,
    dirs_changed: Mutex<bool>,
    /// Deletions batched into DeleteObjects requests; see [`Deletes`].
    deletes: Mutex<Deletes>,
    pub requests: Arc<Requests>,
    dry: bool,
    /// `--checksum`: stored hashes come from a HEAD of each object, not from the index.
    checksum: bool,
    /// The endpoint's URL (for errors) and `--timeout`.
    url: String,
    timeout: Duration,
    /// Set when a request timed out with its retries spent: the server is taken for down
    /// for the rest of the pass, and every later request fails at once with this reason
    /// instead of waiting out its own timeout.
    down: OnceLock<String>,
}

/// Resolves once SIGTERM/SIGINT (or `stop`) asked the pass to end.
async fn cancelled() {
    while !crate::cancel::requested() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Why [`S3Replica::drive`] gave no answer.
enum Stopped {
    /// Not sent: the server is down for this pass, or SIGTERM came first.
    Before(io::Error),
    /// Dropped for SIGTERM.
    Signal,
    /// Dropped when its budget ran out.
    Budget,
}

impl S3Replica {
    /// Connects, checks the bucket and lists everything under the prefix. `index`: the local
    /// index file (beside the state). Errors are one line naming the cause (exit 2).
    pub fn open(
        target: &Target,
        endpoint: &Endpoint,
        opts: &Options,
        index: Option<&Path>,
    ) -> io::Result<S3Replica> {
        let started = std::time::SystemTime::now();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let backup = match &opts.backup {
            None => None,
            Some(path) => Some(
                Target::parse(path.as_os_str())
                    .and_then(Result::ok)
                    .filter(|b| b.bucket == target.bucket)
                    .ok_or_else(|| {
                        io::Error::other("--backup-dir must be in the replica's bucket")
                    })?
                    .prefix,
            ),
        };
        let (op, bucket, bulk) = {
            let _guard = rt.enter();
            let whole = Target {
                bucket: target.bucket.clone(),
                prefix: String::new(),
            };
            let t = endpoint.timeout;
            // A body call may run as long as `run` lets it (`body_budget`).
            let body = t.saturating_mul(3 + (WRITER_CALL_BYTES / BODY_UNIT) as u32);
            (
                build_operator(target, endpoint, t).map_err(|e| other(&e))?,
                build_operator(&whole, endpoint, t).map_err(|e| other(&e))?,
                build_operator(target, endpoint, body).map_err(|e| other(&e))?,
            )
        };
        let mut me = S3Replica {
            op: Some(op),
            backup,
            bucket: Some(bucket),
            bulk: Some(bulk),
            rt: Some(rt),
            target: target.clone(),
            tree: BTreeMap::new(),
            exists: Mutex::new(false),
            index: None,
            pending: Mutex::new(HashMap::new()),
            dirs: Mutex::new(BTreeMap::new()),
            dirs_changed: Mutex::new(false),
            deletes: Mutex::new(Deletes::default()),
            requests: Arc::new(Requests::default()),
            dry: !opts.create,
            checksum: opts.checksum,
            url: endpoint.url(),
            timeout: endpoint.timeout,
            down: OnceLock::new(),
        };
        // A missing index is created only once the bucket answered: a run against a wrong
        // or unreachable bucket leaves no state file behind.
        let fresh = index.filter(|p| !opts.dry_run && !p.exists());
        if let Some(path) = index.filter(|_| fresh.is_none()) {
            me.index = match opts.dry_run {
                // A private copy (its writes stay in memory): the file is never created or
                // changed, and an index of another bucket is not used.
                true => crate::state::peek::copy(path)
                    .ok()
                    .flatten()
                    .filter(|db| index_url(db).as_deref() == Some(target.url().as_str())),
                false => Some(open_index(path, &target.url())?),
            };
        }
        me.list_all()?;
        if let Some(path) = fresh {
            me.index = Some(open_index(path, &target.url())?);
            let dirs = me.dirs.lock().expect("dirs").clone();
            if !dirs.is_empty() {
                me.save_index_dirs(&dirs);
            }
        }
        if let (Some(db), false) = (&me.index, me.dry) {
            uploads::sweep(&me, db, target, endpoint, started);
        }
        Ok(me)
    }

    fn op(&self) -> &Operator {
        self.op.as_ref().expect("operator")
    }

    fn bucket(&self) -> &Operator {
        self.bucket.as_ref().expect("operator")
    }

    fn bulk(&self) -> &Operator {
        self.bulk.as_ref().expect("operator")
    }

    /// How long a call that moves `bytes` of body may take in all, retries included.
    fn body_budget(&self, bytes: u64) -> Duration {
        let units = bytes.div_ceil(BODY_UNIT).min(u32::MAX as u64) as u32;
        self.timeout
            .saturating_mul(3)
            .saturating_add(self.timeout.saturating_mul(units))
    }

    /// A sub-prefix of a mirror (the restore of one folder, `s3://BUCKET/PREFIX/SUB`) has no
    /// directory object of its own: its directories' attributes are in the nearest enclosing
    /// prefix's, under `SUB/`. One GET a level up until one is found; `None` if none is.
    fn inherited_dirs(&self) -> io::Result<Option<BTreeMap<Vec<u8>, DirAttrs>>> {
        let parts: Vec<&str> = self.target.prefix.split('/').collect();
        for up in (0..parts.len()).rev() {
            let (above, below) = (parts[..up].join("/"), parts[up..].join("/"));
            let key = match above.is_empty() {
                true => DIRS_OBJECT.to_string(),
                false => format!("{above}/{DIRS_OBJECT}"),
            };
            self.requests.get.fetch_add(1, Ordering::Relaxed);
            let buf = match self.attempt(self.bucket().read(&key))? {
                Ok(buf) => buf,
                Err(e) if e.kind() == opendal::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.describe(&e)),
            };
            let parsed: Vec<(String, DirAttrs)> =
                serde_json::from_slice(&buf.to_vec()).unwrap_or_default();
            let sub = unescape_path(&below);
            let mut inner = sub.clone();
            inner.push(b'/');
            let map = parsed
                .into_iter()
                .filter_map(|(k, a)| {
                    let k = unescape_path(&k);
                    let rel = match k == sub {
                        true => Vec::new(),
                        false => k.strip_prefix(inner.as_slice())?.to_vec(),
                    };
                    Some((rel, a))
                })
                .collect();
            return Ok(Some(map));
        }
        Ok(None)
    }

    /// Runs one request (with the retry layer's attempts) to its end, bounded and
    /// cancellable: it fails with `TimedOut` after three times `--timeout` in all (each
    /// attempt is bounded by the timeout layer too), and with `Interrupted` within 50 ms of
    /// SIGTERM/SIGINT or `stop`. Either way the request's future is dropped, which cancels
    /// it on the wire. Once a request has timed out, the server is down for this pass: later
    /// requests fail at once. The outer `Result` is syncer's verdict; the inner one the
    /// server's answer.
    fn attempt<T>(
        &self,
        f: impl std::future::IntoFuture<Output = opendal::Result<T>>,
    ) -> io::Result<opendal::Result<T>> {
        self.run(f, "a request", Duration::ZERO, 0).0
    }

    /// [`attempt`](Self::attempt) for a call on a multipart writer. A writer whose call was
    /// dropped half-way cannot be aborted any more (the retry layer refuses it), so after
    /// SIGTERM the call in flight gets [`GRACE`] to finish; `usable` is cleared when it
    /// did not (the upload is then left to the server's own expiry).
    fn attempt_writer<T>(
        &self,
        f: impl std::future::IntoFuture<Output = opendal::Result<T>>,
        usable: &mut bool,
    ) -> io::Result<T> {
        let (outcome, settled) = self.run(f, "an upload", GRACE, WRITER_CALL_BYTES);
        *usable &= settled;
        outcome?.map_err(|e| self.describe(&e))
    }

    /// An OpenDAL request through [`drive`](Self::drive), bounded by three times
    /// `--timeout` (its retries included), plus one for each MiB of `body` it moves. A timeout marks the server down for the pass.
    fn run<T>(
        &self,
        f: impl std::future::IntoFuture<Output = opendal::Result<T>>,
        what: &str,
        grace: Duration,
        body: u64,
    ) -> (io::Result<opendal::Result<T>>, bool) {
        let budget = self.body_budget(body);
        let (outcome, settled) = self.drive(f.into_future(), what, budget, grace);
        let verdict = match outcome {
            Err(Stopped::Before(e)) => Err(e),
            Err(Stopped::Signal) => Err(interrupted()),
            Err(Stopped::Budget) => Err(self.went_down()),
            Ok(Err(e)) if is_timeout(&e) => Err(self.went_down()),
            Ok(r) => Ok(r),
        };
        (verdict, settled)
    }

    /// The one place a request runs, on this replica's runtime: not at all when the server
    /// is down or SIGTERM came; else until it ends, `budget` passes, or SIGTERM comes,
    /// after which the call in flight may still finish within `grace`. The second value
    /// says whether the call ran to its end (neither dropped for the signal nor for the
    /// budget). Dropping a call cancels its request on the wire.
    fn drive<O>(
        &self,
        f: impl std::future::Future<Output = O>,
        what: &str,
        budget: Duration,
        grace: Duration,
    ) -> (Result<O, Stopped>, bool) {
        if let Some(why) = self.down.get() {
            let e = io::Error::new(io::ErrorKind::TimedOut, why.clone());
            return (Err(Stopped::Before(e)), true);
        }
        if crate::cancel::requested() {
            return (Err(Stopped::Before(interrupted())), true);
        }
        let rt = self.rt.as_ref().expect("runtime");
        let _doing = crate::cancel::doing(format!("{what} to {}", self.url));
        rt.block_on(async {
            let call = tokio::time::timeout(budget, f);
            tokio::pin!(call);
            tokio::select! {
                r = &mut call => match r {
                    Ok(o) => (Ok(o), true),
                    Err(_) => (Err(Stopped::Budget), false),
                },
                () = cancelled() => (Err(Stopped::Signal), !grace.is_zero()
                    && matches!(tokio::time::timeout(grace, &mut call).await, Ok(Ok(_)))),
            }
        })
    }

    /// [`call`](Self::call) for a request that moves `body` bytes.
    fn call_sized<T>(
        &self,
        f: impl std::future::IntoFuture<Output = opendal::Result<T>>,
        body: u64,
    ) -> io::Result<T> {
        self.run(f, "a transfer", Duration::ZERO, body)
            .0?
            .map_err(|e| self.describe(&e))
    }

    /// [`attempt`](Self::attempt), with the server's error as an `io::Error` in words.
    fn call<T>(
        &self,
        f: impl std::future::IntoFuture<Output = opendal::Result<T>>,
    ) -> io::Result<T> {
        self.attempt(f)?.map_err(|e| self.describe(&e))
    }

    /// Runs a clean-up request (the abort of a failed upload) that must happen even after
    /// SIGTERM, bounded by [`ABORT_BUDGET`]. True when the server did it.
    fn clean_up<T>(&self, f: impl std::future::IntoFuture<Output = opendal::Result<T>>) -> bool {
        if self.down.get().is_some() {
            return false;
        }
        let rt = self.rt.as_ref().expect("runtime");
        let budget = ABORT_BUDGET.min(self.timeout);
        let done = rt.block_on(async { tokio::time::timeout(budget, f.into_future()).await });
        if let Ok(Err(e)) = &done {
            log::debug!("clean-up request failed: {}", one_line(e));
        }
        matches!(done, Ok(Ok(_)))
    }

    /// Runs a request syncer sends itself (`s3_uploads`: the calls OpenDAL lacks) as
    /// [`attempt`](Self::attempt) does, but one attempt bounded by `--timeout`, no retries;
    /// its timeout fails only it.
    pub(super) fn run_own<T>(&self, f: impl std::future::Future<Output = T>) -> io::Result<T> {
        match self.drive(f, "a request", self.timeout, Duration::ZERO).0 {
            Ok(r) => Ok(r),
            Err(Stopped::Before(e)) => Err(e),
            Err(Stopped::Signal) => Err(interrupted()),
            Err(Stopped::Budget) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} timed out after {}",
                    self.url,
                    humantime::format_duration(self.timeout)
                ),
            )),
        }
    }

    fn went_down(&self) -> io::Error {
        let why = self
            .down
            .get_or_init(|| {
                format!(
                    "{} timed out after {}",
                    self.url,
                    humantime::format_duration(self.timeout)
                )
            })
            .clone();
        io::Error::new(io::ErrorKind::TimedOut, why)
    }

    /// An error from the server, in words that say what to do about it.
    fn describe(&self, e: &opendal::Error) -> io::Error {
        describe(e, &self.target, &self.url)
    }

    /// The key of `rel` (relative to the prefix, which is the operator's root).
    fn key(&self, rel: &RelPath, kind: Kind) -> String {
        let mut key = String::new();
        let bytes = rel.as_bytes();
        let parts: Vec<&[u8]> = bytes
            .split(|b| *b == b'/')
            .filter(|p| !p.is_empty())
            .collect();
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let k = if last { kind } else { Kind::Dir };
            key.push_str(&escape(part, k, i == 0));
            if !last {
                key.push('/');
            }
        }
        if kind == Kind::Dir {
            key.push('/');
        }
        key
    }

    fn list_all(&mut self) -> io::Result<()> {
        self.requests.list.fetch_add(1, Ordering::Relaxed);
        // Read a page's worth at a time, each bounded on its own: a bucket of millions of
        // objects is a long listing, not a stalled one.
        let mut lister = self.call(self.op().lister_with("").recursive(true))?;
        let mut entries = Vec::new();
        loop {
            let batch = self.call(async {
                use futures::StreamExt;
                let mut got = Vec::with_capacity(LIST_BATCH);
                while got.len() < LIST_BATCH {
                    match lister.next().await {
                        Some(e) => got.push(e?),
                        None => break,
                    }
                }
                Ok(got)
            })?;
            let last = batch.len() < LIST_BATCH;
            entries.extend(batch);
            if last {
                break;
            }
        }
        let mut tree: BTreeMap<RelPath, BTreeMap<Vec<u8>, Listed>> = BTreeMap::new();
        let mut dirs_etag = None;
        let mut any = false;
        for e in entries {
            let path = e.path().to_string();
            if path.is_empty() || path == "/" {
                continue;
            }
            any = true;
            if path == DIRS_OBJECT {
                dirs_etag = Some(e.metadata().etag().unwrap_or("").to_string());
                continue;
            }
            let is_dir = path.ends_with('/');
            let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
            let mut parent = RelPath::root();
            for (i, seg) in segments.iter().enumerate() {
                let (name, link) = unescape(seg);
                let last = i + 1 == segments.len();
                let kind = match (last, is_dir, link) {
                    (false, _, _) | (true, true, _) => Kind::Dir,
                    (true, false, true) => Kind::Symlink,
                    (true, false, false) => Kind::File,
                };
                let children = tree.entry(parent.clone()).or_default();
                let here = parent.join(OsStr::from_bytes(&name));
                if kind == Kind::Dir {
                    children.entry(name.clone()).or_insert_with(|| Listed {
                        name: OsString::from_vec(name.clone()),
                        kind: Kind::Dir,
                        key: format!("{}/", segments[..=i].join("/")),
                        size: 0,
                        etag: String::new(),
                    });
                } else {
                    let md = e.metadata();
                    children.insert(
                        name.clone(),
                        Listed {
                            name: OsString::from_vec(name.clone()),
                            kind,
                            key: path.clone(),
                            size: md.content_length(),
                            etag: md.etag().unwrap_or("").trim_matches('"').to_string(),
                        },
                    );
                }
                parent = here;
            }
        }
        self.tree = tree
            .into_iter()
            .map(|(k, v)| (k, v.into_values().collect()))
            .collect();
        *self.exists.lock().expect("exists") = any;
        // Directory attributes: from the index when it has this very object, else one GET.
        if let Some(etag) = dirs_etag {
            let etag = etag.trim_matches('"').to_string();
            let known = self.index_get(DIRS_OBJECT);
            let attrs = match known {
                Some(k) if k.etag == etag => self.index_dirs(),
                _ => {
                    self.requests.get.fetch_add(1, Ordering::Relaxed);
                    let buf = self.call(self.op().read(DIRS_OBJECT))?;
                    let parsed: Vec<(String, DirAttrs)> =
                        serde_json::from_slice(&buf.to_vec()).unwrap_or_default();
                    let map: BTreeMap<Vec<u8>, DirAttrs> = parsed
                        .into_iter()
                        .map(|(k, a)| (unescape_path(&k), a))
                        .collect();
                    self.pending.lock().expect("pending").insert(
                        DIRS_OBJECT.into(),
                        Some(Known::plain(etag, buf.len() as u64)),
                    );
                    *self.dirs_changed.lock().expect("dirs") = false;
                    self.save_index_dirs(&map);
                    map
                }
            };
            *self.dirs.lock().expect("dirs") = attrs;
        } else if any && !self.target.prefix.is_empty() {
            if let Some(map) = self.inherited_dirs()? {
                *self.dirs.lock().expect("dirs") = map;
            }
        }
        Ok(())
    }

    fn index_get(&self, key: &str) -> Option<Known> {
        if let Some(p) = self.pending.lock().expect("pending").get(key) {
            return p.clone();
        }
        let db = self.index.as_ref()?;
        let txn = db.begin_read().ok()?;
        let table = txn.open_table(OBJECTS).ok()?;
        let value = table.get(key).ok()??;
        serde_json::from_slice(value.value()).ok()
    }

    fn index_put(&self, key: &str, known: Option<Known>) {
        self.pending
            .lock()
            .expect("pending")
            .insert(key.to_string(), known);
    }

    fn index_dirs(&self) -> BTreeMap<Vec<u8>, DirAttrs> {
        let Some(db) = &self.index else {
            return BTreeMap::new();
        };
        let read = || -> Option<BTreeMap<Vec<u8>, DirAttrs>> {
            let txn = db.begin_read().ok()?;
            let table = txn.open_table(INFO).ok()?;
            let v = table.get("dirs").ok()??;
            let parsed: Vec<(String, DirAttrs)> = serde_json::from_str(v.value()).ok()?;
            Some(
                parsed
                    .into_iter()
                    .map(|(k, a)| (unescape_path(&k), a))
                    .collect(),
            )
        };
        read().unwrap_or_default()
    }

    fn save_index_dirs(&self, map: &BTreeMap<Vec<u8>, DirAttrs>) {
        let Some(db) = &self.index else { return };
        let json = dirs_json(map);
        #[allow(clippy::result_large_err)] // redb's own error, converted once below
        let write = || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(INFO)?.insert("dirs", json.as_str())?;
            txn.commit()?;
            Ok(())
        };
        if let Err(e) = write() {
            log::warn!("index of '{}': {e}", self.target.url());
        }
    }

    /// Metadata of a listed object: from the index when it knows this ETag and size, else
    /// from one HEAD (recorded in the index).
    fn resolve(&self, l: &Listed) -> io::Result<(Meta, Known)> {
        let known = match self.index_get(&l.key) {
            Some(k) if k.etag == l.etag && k.size == l.size && !l.etag.is_empty() => k,
            _ => {
                let k = self.head(&l.key, l.kind)?;
                self.index_put(&l.key, Some(k.clone()));
                k
            }
        };
        let size = if l.kind == Kind::Symlink {
            known.link.as_ref().map_or(l.size, |t| t.len() as u64)
        } else {
            l.size
        };
        Ok((meta_of(l.kind, &known, size), known))
    }

    fn head(&self, key: &str, kind: Kind) -> io::Result<Known> {
        self.requests.head.fetch_add(1, Ordering::Relaxed);
        let md = self.call(self.op().stat(key))?;
        let user = md.user_metadata();
        let get = |k: &str| user.as_ref().and_then(|u| u.get(k)).map(str::to_string);
        let mut known = Known {
            etag: md.etag().unwrap_or("").trim_matches('"').to_string(),
            size: md.content_length(),
            mode: get("mode")
                .and_then(|m| u32::from_str_radix(&m, 8).ok())
                .map_or(default_perm(kind), |m| m & 0o7777),
            uid: get("uid").and_then(|v| v.parse().ok()).unwrap_or(0),
            gid: get("gid").and_then(|v| v.parse().ok()).unwrap_or(0),
            mtime: get("mtime").and_then(|v| parse_mtime(&v)).unwrap_or((0, 0)),
            sha256: get("sha256").and_then(|v| v.parse::<Hash>().ok().map(|h| h.0)),
            link: None,
        };
        if kind == Kind::Symlink {
            self.requests.get.fetch_add(1, Ordering::Relaxed);
            let buf = self.call(self.op().read(key))?;
            known.link = Some(buf.to_vec());
        }
        Ok(known)
    }

    fn listed(&self, rel: &RelPath) -> Option<&Listed> {
        let parent = rel.parent()?;
        let name = rel.file_name()?;
        self.tree
            .get(&parent)?
            .iter()
            .find(|l| l.name.as_os_str() == name)
    }

    /// User metadata for an object with `meta` (rclone's keys and formats) and `hash`.
    fn user_meta(meta: &Meta, hash: Option<&Hash>) -> Vec<(String, String)> {
        let type_bits = match meta.kind {
            Kind::Symlink => 0o120000,
            Kind::Dir => 0o040000,
            _ => 0o100000,
        };
        let mut m = vec![
            (
                "mtime".to_string(),
                format!("{}.{:09}", meta.mtime.sec, meta.mtime.nsec),
            ),
            ("mode".to_string(), format!("{:o}", type_bits | meta.perm)),
            ("uid".to_string(), meta.uid.to_string()),
            ("gid".to_string(), meta.gid.to_string()),
        ];
        if let Some(h) = hash {
            m.push(("sha256".to_string(), h.to_string()));
        }
        m
    }

    fn put_small(
        &self,
        key: &str,
        body: Vec<u8>,
        meta: &Meta,
        hash: Option<&Hash>,
    ) -> io::Result<String> {
        self.requests.put.fetch_add(1, Ordering::Relaxed);
        self.forget_delete(key);
        self.free_name(key)?;
        let size = body.len() as u64;
        let md = self.call_sized(
            self.bulk()
                .write_with(key, body)
                .user_metadata(Self::user_meta(meta, hash)),
            size,
        )?;
        self.etag_after(key, md)
    }

    /// The ETag of what was just written (from the response, else one HEAD).
    fn etag_after(&self, key: &str, md: opendal::Metadata) -> io::Result<String> {
        match md.etag() {
            Some(e) if !e.is_empty() => Ok(e.trim_matches('"').to_string()),
            _ => {
                self.requests.head.fetch_add(1, Ordering::Relaxed);
                let md = self.call(self.op().stat(key))?;
                Ok(md.etag().unwrap_or("").trim_matches('"').to_string())
            }
        }
    }

    fn forget_delete(&self, key: &str) {
        self.deletes.lock().expect("deletes").forget(key);
    }

    /// Sends the pending deletions that hold a name `key` is about to take (see
    /// [`Deletes::holds`]) before anything is created there.
    fn free_name(&self, key: &str) -> io::Result<()> {
        let held = self.deletes.lock().expect("deletes").holds(key);
        if held {
            self.flush_deletes(true)?;
        }
        Ok(())
    }

    /// Sends pending deletions: every one with `all`, else only full batches. The lock is
    /// held while a batch is on the wire, so no thread sees a name as free before the server
    /// has freed it.
    fn flush_deletes(&self, all: bool) -> io::Result<()> {
        let mut d = self.deletes.lock().expect("deletes");
        while !d.keys.is_empty() && (all || d.keys.len() >= DELETE_BATCH) {
            let n = d.keys.len().min(DELETE_BATCH);
            let batch: Vec<String> = d.keys.drain(..n).collect();
            self.requests.delete.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.call(self.op().delete_iter(batch.clone())) {
                // Not deleted: still pending (and still holding their names).
                d.keys.splice(0..0, batch);
                return Err(e);
            }
            for k in batch {
                self.index_put(&k, None);
            }
        }
        if d.keys.is_empty() {
            d.names.clear();
            d.above.clear();
        }
        Ok(())
    }

    fn version(etag: &str, size: u64) -> Version {
        let mut v = Vec::with_capacity(etag.len() + 8);
        v.extend_from_slice(&size.to_le_bytes());
        v.extend_from_slice(etag.as_bytes());
        Version::from_bytes(&v)
    }

    /// Every key at or below `key` (a directory key ends with `/`).
    fn keys_below(&self, rel: &RelPath) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![rel.clone()];
        while let Some(dir) = stack.pop() {
            if let Some(children) = self.tree.get(&dir) {
                for c in children {
                    if c.kind == Kind::Dir {
                        stack.push(dir.join(&c.name));
                    }
                    out.push(c.key.clone());
                }
            }
        }
        out
    }

    fn set_dir_attrs(&self, rel: &RelPath, meta: &Meta) {
        let attrs = DirAttrs::of(meta);
        let old = self
            .dirs
            .lock()
            .expect("dirs")
            .insert(rel.as_bytes().to_vec(), attrs);
        if old != Some(attrs) {
            *self.dirs_changed.lock().expect("dirs") = true;
        }
    }
}

fn default_perm(kind: Kind) -> u32 {
    match kind {
        Kind::Dir => 0o755,
        Kind::Symlink => 0o777,
        _ => 0o644,
    }
}

fn meta_of(kind: Kind, k: &Known, size: u64) -> Meta {
    Meta {
        kind,
        perm: k.mode,
        uid: k.uid,
        gid: k.gid,
        size,
        mtime: Stamp {
            sec: k.mtime.0,
            nsec: k.mtime.1,
        },
        atime: Stamp::default(),
        link: None,
    }
}

fn dir_meta(a: Option<&DirAttrs>) -> Meta {
    let a = a.copied().unwrap_or(DirAttrs {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: (0, 0),
    });
    Meta {
        kind: Kind::Dir,
        perm: a.mode,
        uid: a.uid,
        gid: a.gid,
        size: 0,
        mtime: Stamp {
            sec: a.mtime.0,
            nsec: a.mtime.1,
        },
        atime: Stamp::default(),
        link: None,
    }
}

/// rclone's mtime: seconds since the epoch with a fraction.
fn parse_mtime(v: &str) -> Option<(i64, i64)> {
    let (s, f) = v.split_once('.').unwrap_or((v, "0"));
    let sec: i64 = s.parse().ok()?;
    let mut frac = f.chars().take(9).collect::<String>();
    while frac.len() < 9 {
        frac.push('0');
    }
    Some((sec, frac.parse().ok()?))
}

/// The directory object's content: each directory's attributes under its escaped path.
fn dirs_json(map: &BTreeMap<Vec<u8>, DirAttrs>) -> String {
    let list: Vec<(String, &DirAttrs)> = map.iter().map(|(k, a)| (escape_path(k), a)).collect();
    serde_json::to_string(&list).expect("json")
}

/// An operator on `target` whose timeout layer gives a request `--timeout` and a body call
/// (a page of a listing, a read or write of a body) `io_timeout`.
fn build_operator(
    target: &Target,
    endpoint: &Endpoint,
    io_timeout: Duration,
) -> opendal::Result<Operator> {
    let mut b = opendal::services::S3::default()
        .bucket(&target.bucket)
        .root(&format!("/{}", target.prefix))
        .disable_ec2_metadata();
    b = b.region(&endpoint.region_name());
    if let Some(url) = endpoint.given() {
        // Path-style addressing (OpenDAL's default) with an explicit endpoint.
        b = b.endpoint(&url);
    } else {
        b = b.enable_virtual_host_style();
    }
    opendal::install_default();
    let op = Operator::new(b)?
        // Each attempt is bounded: `--timeout` for a request, and for every read or write
        // of a body that stops making progress. Inside the retry layer, so a stalled
        // attempt is retried like a cut connection (`S3Replica::attempt` bounds the whole).
        .layer(
            opendal::layers::TimeoutLayer::new()
                .with_timeout(endpoint.timeout)
                .with_io_timeout(io_timeout),
        )
        // Throttling (503 SlowDown), 5xx, cut connections and stalled attempts: 5 retries,
        // backing off exponentially from 250 ms (with jitter), about 8 s in all.
        .layer(
            opendal::layers::RetryLayer::new()
                .with_max_times(5)
                .with_min_delay(Duration::from_millis(250))
                .with_max_delay(Duration::from_secs(8))
                .with_jitter(),
        );
    Ok(op)
}

/// The bucket URL an index was made for.
fn index_url(db: &redb::Database) -> Option<String> {
    let txn = db.begin_read().ok()?;
    let info = txn.open_table(INFO).ok()?;
    let url = info.get("url").ok()??;
    Some(url.value().to_string())
}

fn open_index(path: &Path, url: &str) -> io::Result<redb::Database> {
    // Created owner-only: the index names every object of the replica.
    let file = crate::state::private()
        .read(true)
        .write(true)
        .truncate(false)
        .open(path)?;
    let db = redb::Builder::new()
        .create_file(file)
        .map_err(io::Error::other)?;
    let txn = db.begin_write().map_err(io::Error::other)?;
    {
        let info = txn.open_table(INFO).map_err(io::Error::other)?;
        let recorded = info
            .get("url")
            .map_err(io::Error::other)?
            .map(|v| v.value().to_string());
        // The index belongs to the job's replica: one of another replica is never cleared
        // here (a run naming another pair is refused before; this is the second line).
        if let Some(other) = recorded.as_ref().filter(|r| r.as_str() != url) {
            return Err(io::Error::other(format!(
                "the index '{}' belongs to replica '{other}'",
                path.display()
            )));
        }
        if recorded.is_none() {
            drop(info);
            let _ = txn.delete_table(OBJECTS);
            let mut info = txn.open_table(INFO).map_err(io::Error::other)?;
            let _ = info.remove("dirs");
            info.insert("url", url).map_err(io::Error::other)?;
        }
        txn.open_table(OBJECTS).map_err(io::Error::other)?;
    }
    txn.commit().map_err(io::Error::other)?;
    Ok(db)
}

/// A `Write` into an OpenDAL multipart writer (bytes are copied into owned buffers).
struct Upload<'a> {
    rep: &'a S3Replica,
    w: opendal::Writer,
    /// The writer can still be aborted (see `S3Replica::attempt_writer`).
    usable: bool,
}

impl Write for Upload<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.rep
            .attempt_writer(self.w.write(buf.to_vec()), &mut self.usable)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes into nothing (the hashing read of a large file before its upload).
struct Discard;
impl Write for Discard {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Replica for S3Replica {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            mode: true,
            owner: true,
            mtime_ns: Some(1),
            hard_links: false,
            xattrs: false,
            rename: false,
            meta_in_place: false,
        }
    }

    fn root(&self) -> io::Result<Option<Meta>> {
        if !*self.exists.lock().expect("exists") {
            return Ok(None);
        }
        Ok(Some(dir_meta(
            self.dirs.lock().expect("dirs").get(&b""[..]),
        )))
    }

    fn list(&self, dir: &RelPath) -> io::Result<Vec<RepEntry>> {
        let Some(children) = self.tree.get(dir) else {
            return Ok(Vec::new());
        };
        let dirs = self.dirs.lock().expect("dirs").clone();
        children
            .par_iter()
            .map(|l| {
                let rel = dir.join(&l.name);
                Ok(match l.kind {
                    Kind::Dir => Entry {
                        name: l.name.clone(),
                        meta: dir_meta(dirs.get(rel.as_bytes())),
                        version: Version::default(),
                    },
                    _ => {
                        let (meta, known) = self.resolve(l)?;
                        Entry {
                            name: l.name.clone(),
                            meta,
                            version: Self::version(&known.etag, l.size),
                        }
                    }
                })
            })
            .collect()
    }

    fn stat(&self, rel: &RelPath) -> io::Result<Option<(Meta, Version)>> {
        let Some(l) = self.listed(rel) else {
            return Ok(None);
        };
        if l.kind == Kind::Dir {
            let dirs = self.dirs.lock().expect("dirs");
            return Ok(Some((
                dir_meta(dirs.get(rel.as_bytes())),
                Version::default(),
            )));
        }
        let (meta, known) = self.resolve(l)?;
        Ok(Some((meta, Self::version(&known.etag, l.size))))
    }

    /// The sha256 syncer stored with the object (index, else one HEAD); never a download.
    /// An object without one (written by someone else) has none: its content is unknown, so
    /// it is replaced.
    fn hash(&self, rel: &RelPath, _counters: &HashCounters) -> io::Result<(Option<Hash>, Version)> {
        let l = self.listed(rel).ok_or(io::ErrorKind::NotFound)?;
        let known = match self.checksum {
            true => {
                let k = self.head(&l.key, l.kind)?;
                self.index_put(&l.key, Some(k.clone()));
                k
            }
            false => self.resolve(l)?.1,
        };
        let version = Self::version(&known.etag, l.size);
        Ok((known.sha256.map(Hash), version))
    }

    fn read_link(&self, rel: &RelPath) -> io::Result<PathBuf> {
        let l = self.listed(rel).ok_or(io::ErrorKind::NotFound)?;
        let (_, known) = self.resolve(l)?;
        let target = known.link.ok_or(io::ErrorKind::NotFound)?;
        Ok(PathBuf::from(OsString::from_vec(target)))
    }

    fn xattrs(&self, _rel: &RelPath, _kind: Kind) -> io::Result<Xattrs> {
        Ok(Xattrs::default())
    }

    fn install_file(
        &self,
        rel: &RelPath,
        content: &mut dyn Content,
        unless: Option<(&Hash, &Version)>,
    ) -> Result<Installed, CopyError> {
        let key = self.key(rel, Kind::File);
        let meta = *content.meta();
        let size = meta.size;
        let current = self
            .listed(rel)
            .filter(|l| l.kind == Kind::File)
            .map(|l| Self::version(&l.etag, l.size));
        let unchanged =
            |hash: &Hash| unless.is_some_and(|(h, v)| h == hash && current.as_ref() == Some(v));
        let unchanged_result = |hash: Hash| Installed {
            version: current.clone().expect("checked"),
            hash,
            bytes: 0,
            unchanged: true,
        };
        let (etag, hash) = if size < MULTIPART_MIN {
            let mut body = Vec::with_capacity(size as usize);
            content.write_into(Sink::Stream(&mut body))?;
            let hash = content.finish()?;
            if unchanged(&hash) {
                return Ok(unchanged_result(hash));
            }
            let etag = self
                .put_small(&key, body, &meta, Some(&hash))
                .map_err(CopyError::Replica)?;
            (etag, hash)
        } else {
            // The sha256 goes in the upload's headers, so it is known first: from this
            // pass, or from one read of the source (the page cache serves the second).
            let hash = match content.known_hash() {
                Some(h) => h,
                None => {
                    content.write_into(Sink::Stream(&mut Discard))?;
                    let h = content.finish()?;
                    content.rewind().map_err(CopyError::Source)?;
                    h
                }
            };
            if unchanged(&hash) {
                return Ok(unchanged_result(hash));
            }
            (self.upload(&key, content, &meta, hash)?, hash)
        };
        self.record(&key, &etag, &meta, hash, None);
        Ok(Installed {
            version: Self::version(&etag, size),
            hash,
            bytes: size,
            unchanged: false,
        })
    }

    fn mkdir(&self, rel: &RelPath) -> io::Result<()> {
        let key = self.key(rel, Kind::Dir);
        self.requests.put.fetch_add(1, Ordering::Relaxed);
        self.forget_delete(&key);
        self.free_name(&key)?;
        self.call(self.op().create_dir(&key))?;
        *self.exists.lock().expect("exists") = true;
        Ok(())
    }

    fn symlink(
        &self,
        rel: &RelPath,
        target: &Path,
        meta: &Meta,
        _xattrs: Option<&Xattrs>,
    ) -> io::Result<()> {
        let key = self.key(rel, Kind::Symlink);
        let body = target.as_os_str().as_bytes().to_vec();
        let etag = self.put_small(&key, body.clone(), meta, None)?;
        let mut k = known_of(&etag, body.len() as u64, meta, None);
        k.link = Some(body);
        self.index_put(&key, Some(k));
        Ok(())
    }

    fn set_meta(
        &self,
        rel: &RelPath,
        meta: &Meta,
        _xattrs: Option<&Xattrs>,
        _expect: Option<&Version>,
    ) -> io::Result<Option<Version>> {
        match meta.kind {
            Kind::Dir => {
                if rel.is_root() && !self.target.prefix.is_empty() {
                    *self.exists.lock().expect("exists") = true;
                }
                self.set_dir_attrs(rel, meta);
                Ok(Some(Version::default()))
            }
            Kind::Symlink => {
                let target = Replica::read_link(self, rel)?;
                self.symlink(rel, &target, meta, None)?;
                Ok(Some(Version::default()))
            }
            // A file's attributes change only with a new PUT: compare asks for a copy
            // instead (`meta_in_place` is false).
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "an object's metadata is changed by uploading it again",
            )),
        }
    }

    fn hard_link(&self, _rel: &RelPath, _to: &RelPath) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn remove(&self, rel: &RelPath, kind: Kind) -> io::Result<()> {
        let mut keys = Vec::new();
        if kind == Kind::Dir {
            keys.extend(self.keys_below(rel));
            let mut dirs = self.dirs.lock().expect("dirs");
            let prefix = rel.as_bytes().to_vec();
            dirs.retain(|k, _| {
                !(k == &prefix || k.starts_with(&[prefix.as_slice(), b"/"].concat()))
            });
            *self.dirs_changed.lock().expect("dirs") = true;
        }
        keys.push(match self.listed(rel) {
            Some(l) => l.key.clone(),
            None => self.key(rel, kind),
        });
        self.deletes.lock().expect("deletes").add(keys);
        self.flush_deletes(false)
    }

    fn rename(&self, _from: &RelPath, _to: &RelPath) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "an object store has no rename",
        ))
    }

    /// Keeps the objects of `rel` (everything below it, for a directory) under the pass's
    /// backup prefix by server-side copy; then, unless `keep`, removes them. An existing
    /// backup object is never replaced.
    fn backup(&self, rel: &RelPath, keep: bool) -> io::Result<()> {
        let prefix = self
            .backup
            .as_ref()
            .ok_or_else(|| io::Error::other("no --backup-dir"))?;
        let whole = self.bucket();
        let l = self.listed(rel).ok_or(io::ErrorKind::NotFound)?;
        let mut keys = vec![l.key.clone()];
        if l.kind == Kind::Dir {
            keys.extend(self.keys_below(rel));
        }
        let here = |k: &str| match self.target.prefix.is_empty() {
            true => k.to_string(),
            false => format!("{}/{k}", self.target.prefix),
        };
        keys.par_iter()
            .filter(|k| !k.ends_with('/'))
            .try_for_each(|k| -> io::Result<()> {
                let to = format!("{prefix}/{k}");
                self.requests.head.fetch_add(1, Ordering::Relaxed);
                match self.attempt(whole.stat(&to))? {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == opendal::ErrorKind::NotFound => {}
                    Err(e) => return Err(self.describe(&e)),
                }
                self.requests.put.fetch_add(1, Ordering::Relaxed);
                self.call(whole.copy(&here(k), &to))?;
                Ok(())
            })?;
        if !keep {
            self.remove(rel, l.kind)?;
        }
        Ok(())
    }

    /// The listing made at open proved the bucket exists and may be listed; one small
    /// object written under the prefix and deleted proves the credentials may write there.
    fn probe(&self) -> io::Result<()> {
        let key = format!(".syncer-probe-{}", std::process::id());
        self.requests.put.fetch_add(1, Ordering::Relaxed);
        self.call(self.op().write(&key, b"probe".to_vec()))?;
        self.requests.delete.fetch_add(1, Ordering::Relaxed);
        self.call(self.op().delete(&key))
    }

    fn commit(&self) -> io::Result<()> {
        if self.dry {
            return Ok(());
        }
        self.flush_deletes(true)?;
        let changed = std::mem::take(&mut *self.dirs_changed.lock().expect("dirs"));
        if changed {
            let map = self.dirs.lock().expect("dirs").clone();
            let json = dirs_json(&map);
            self.requests.put.fetch_add(1, Ordering::Relaxed);
            let md = self.call(self.op().write(DIRS_OBJECT, json.clone().into_bytes()))?;
            let etag = self.etag_after(DIRS_OBJECT, md)?;
            self.index_put(DIRS_OBJECT, Some(Known::plain(etag, json.len() as u64)));
            self.save_index_dirs(&map);
        }
        self.save_index()
    }

    fn requests(&self) -> Option<Arc<Requests>> {
        Some(self.requests.clone())
    }

    fn lock(&self) -> io::Result<Option<Box<dyn Send>>> {
        // The replica lock for an object store is the state-dir lock keyed by its URL
        // (taken by the command before the pass).
        Ok(None)
    }
}

impl S3Replica {
    /// Writes what this pass learned of the bucket (uploads, HEADs) into the local index.
    fn save_index(&self) -> io::Result<()> {
        let pending = std::mem::take(&mut *self.pending.lock().expect("pending"));
        if let (Some(db), false) = (&self.index, pending.is_empty()) {
            #[allow(clippy::result_large_err)] // redb's own error, converted once below
            let write = || -> Result<(), redb::Error> {
                let txn = db.begin_write()?;
                {
                    let mut t = txn.open_table(OBJECTS)?;
                    for (k, v) in &pending {
                        match v {
                            Some(known) => {
                                let bytes = serde_json::to_vec(known).expect("json");
                                t.insert(k.as_str(), bytes.as_slice())?;
                            }
                            None => {
                                t.remove(k.as_str())?;
                            }
                        }
                    }
                }
                txn.commit()?;
                Ok(())
            };
            write().map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// A multipart upload of `content`, whose sha256 must come out as `hash`; on any
    /// failure (a timeout, a reset connection, SIGTERM) the upload is aborted, so the key
    /// keeps what it had and no parts are left to be billed.
    fn upload(
        &self,
        key: &str,
        content: &mut dyn Content,
        meta: &Meta,
        hash: Hash,
    ) -> Result<String, CopyError> {
        self.forget_delete(key);
        self.requests.put.fetch_add(1, Ordering::Relaxed);
        self.free_name(key).map_err(CopyError::Replica)?;
        // Recorded before the upload begins, so a process killed before it ends leaves a
        // trace the next pass follows (`s3_uploads`).
        let journal = self.index.as_ref().filter(|_| !self.dry);
        if let Some(db) = journal {
            uploads::begin(db, key);
        }
        let w = self
            .call(
                self.bulk()
                    .writer_with(key)
                    .chunk(PART)
                    .concurrent(PARTS_IN_FLIGHT)
                    .user_metadata(Self::user_meta(meta, Some(&hash))),
            )
            .map_err(CopyError::Replica)?;
        let mut up = Upload {
            rep: self,
            w,
            usable: true,
        };
        let finished = content
            .write_into(Sink::Stream(&mut up))
            .and_then(|_| content.finish());
        let closed = match finished {
            Ok(h) if h == hash => self
                .attempt_writer(up.w.close(), &mut up.usable)
                .map_err(CopyError::Replica),
            wrong => Err(wrong.err().unwrap_or(CopyError::Changed)),
        };
        let (ended, result) = match closed {
            Ok(md) => (true, self.etag_after(key, md).map_err(CopyError::Replica)),
            Err(e) => {
                let aborted = up.usable && self.clean_up(up.w.abort());
                if !aborted {
                    let later = match journal {
                        Some(_) => "the next pass aborts it",
                        None => "the server keeps its parts until it expires them",
                    };
                    log::warn!("the upload of '{key}' could not be aborted now; {later}");
                }
                (aborted, Err(e))
            }
        };
        if let (Some(db), true) = (journal, ended) {
            uploads::end(db, key);
        }
        result
    }

    fn record(&self, key: &str, etag: &str, meta: &Meta, hash: Hash, link: Option<Vec<u8>>) {
        let mut k = known_of(etag, meta.size, meta, Some(hash));
        k.link = link;
        self.index_put(key, Some(k));
    }
}

fn known_of(etag: &str, size: u64, meta: &Meta, hash: Option<Hash>) -> Known {
    Known {
        etag: etag.to_string(),
        size,
        mode: meta.perm,
        uid: meta.uid,
        gid: meta.gid,
        mtime: (meta.mtime.sec, meta.mtime.nsec),
        sha256: hash.map(|h| h.0),
        link: None,
    }
}

impl Drop for S3Replica {
    fn drop(&mut self) {
        // What HEADs taught is kept even when nothing was committed (an idle pass).
        if let Err(e) = self.save_index() {
            log::warn!("could not save the index of '{}': {e}", self.target.url());
        }
        // Connections are dropped inside the runtime, then the runtime is shut down.
        drop(self.op.take());
        drop(self.bucket.take());
        drop(self.bulk.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_millis(500));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::errors::s3_error;
    use super::source::{token_of, S3_DEV};
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_round_trip_through_keys() {
        let cases: Vec<(&[u8], Kind)> = vec![
            (b"plain.txt", Kind::File),
            (b"100%", Kind::File),
            (b"bad\xff\xfename", Kind::File),
            (b"tab\there", Kind::File),
            (b"x.rclonelink", Kind::File),
            (b"x.rclonelink", Kind::Symlink),
            (b"link", Kind::Symlink),
            (DIRS_OBJECT.as_bytes(), Kind::File),
            ("caf\u{e9} \u{1f600}".as_bytes(), Kind::File),
        ];
        let mut seen = HashSet::new();
        for (name, kind) in cases {
            let key = escape(name, kind, true);
            assert!(
                seen.insert((key.clone(), format!("{kind:?}"))),
                "{key} twice"
            );
            assert!(std::str::from_utf8(key.as_bytes()).is_ok());
            assert!(!key.chars().any(char::is_control), "{key:?}");
            assert_ne!(key, DIRS_OBJECT);
            let (back, link) = unescape(&key);
            assert_eq!(back, name, "{key}");
            assert_eq!(link, kind == Kind::Symlink, "{key}");
        }
        assert_eq!(escape(b"x.rclonelink", Kind::File, false), "x%2Erclonelink");
        assert_eq!(escape(b"a%b", Kind::File, false), "a%25b");
    }

    #[test]
    fn a_server_error_reads_as_its_code_and_message() {
        let text = r#"S3Error { code: "ExistingObjectIsFile", message: "Existing Object is a file.", resource: "/m/k/", request_id: "18E" }"#;
        assert_eq!(
            s3_error(text),
            Some(("ExistingObjectIsFile", "Existing Object is a file."))
        );
        assert_eq!(s3_error("connection closed"), None);
    }

    #[test]
    fn a_pending_deletion_holds_its_name_and_the_names_around_it() {
        let mut d = Deletes::default();
        d.add(vec![
            "f".into(),
            "dir/".into(),
            "dir/x".into(),
            "keep/gone".into(),
        ]);
        assert!(d.holds("f/"), "a file becomes a directory");
        assert!(d.holds("f/g"), "something below a file that is going");
        assert!(d.holds("dir"), "a directory becomes a file");
        assert!(d.holds("dir/"), "a directory made again");
        assert!(
            !d.holds("keep/new"),
            "a new file beside a deleted one waits for the batch"
        );
        assert!(
            !d.holds("f.rclonelink"),
            "a link beside nothing of its name"
        );
        let mut only_below = Deletes::default();
        only_below.add(vec!["d/a".into()]);
        assert!(only_below.holds("d"), "objects below a name a file takes");
        assert!(!only_below.holds("d/"), "the directory itself stays");
        d.forget("f");
        assert!(
            !d.holds("f/"),
            "written again: no deletion of it is pending"
        );
    }

    #[test]
    fn a_bucket_objects_token_is_the_same_from_every_build() {
        let version = S3Replica::version("9bb58f26192e4ba00f01e2e7b136bbd8", 42);
        let meta = meta_of(Kind::File, &Known::plain(String::new(), 42), 42);
        let token = token_of(&version, &meta);
        // Pinned (sha256 of the size in 8 little-endian bytes and the ETag, its first 8
        // bytes little-endian, as python3 hashlib gives them): it is persisted in caches.
        assert_eq!(token.ino, 0x4652_45e1_916d_a491, "{:#x}", token.ino);
        assert_eq!((token.dev, token.size, token.ctime_ns), (S3_DEV, 42, 0));
    }

    #[test]
    fn an_index_of_another_replica_is_refused_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.s3index.redb");
        {
            let db = open_index(&path, "s3://b/one").expect("new index");
            let txn = db.begin_write().expect("txn");
            txn.open_table(OBJECTS)
                .expect("table")
                .insert("k", b"v".as_slice())
                .expect("insert");
            txn.commit().expect("commit");
        }
        let err = open_index(&path, "s3://b/two")
            .map(|_| ())
            .expect_err("refused");
        assert!(err.to_string().contains("s3://b/one"), "{err}");
        let db = open_index(&path, "s3://b/one").expect("its own replica");
        let txn = db.begin_read().expect("txn");
        let table = txn.open_table(OBJECTS).expect("table");
        assert!(
            table.get("k").expect("get").is_some(),
            "the index was cleared"
        );
    }

    #[test]
    fn addresses_parse() {
        let t = Target::parse(OsStr::new("s3://bucket/a/b/"))
            .unwrap()
            .unwrap();
        assert_eq!((t.bucket.as_str(), t.prefix.as_str()), ("bucket", "a/b"));
        assert_eq!(t.url(), "s3://bucket/a/b");
        assert!(Target::parse(OsStr::new("/tmp/x")).is_none());
        assert!(Target::parse(OsStr::new("s3://")).unwrap().is_err());
        assert!(Target::parse(OsStr::new("s3://b/../x")).unwrap().is_err());
    }

    #[test]
    fn mtime_keeps_nanoseconds() {
        assert_eq!(parse_mtime("1700000000.000000123"), Some((1700000000, 123)));
        assert_eq!(parse_mtime("1700000000.5"), Some((1700000000, 500_000_000)));
        assert_eq!(parse_mtime("1700000000"), Some((1700000000, 0)));
    }
}
