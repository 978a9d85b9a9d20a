//! A plain, validated `Config` built from the command line: paths resolved against the
//! caller's working directory (before any fork), roots checked, excludes compiled, options
//! parsed. Everything that can be wrong with the arguments is found here, exit code 2.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use ignore::gitignore::{Gitignore, GitignoreBuilder};

use crate::cli::SyncArgs;
use crate::error::{reason, Error, Result};
use crate::model::{show, RelPath};
use crate::plan::Guard;

/// How much goes to the terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    /// `-q`: errors only.
    Quiet,
    /// Every action and pass summary.
    Normal,
    /// `-v`: also debug detail.
    Verbose,
}

/// Compiled `--exclude` / `--exclude-from` patterns (gitignore syntax, relative to the roots).
pub struct Excludes {
    matcher: Option<Gitignore>,
    /// The patterns as given, for status and logs.
    pub patterns: Vec<String>,
}

impl Excludes {
    pub fn new(patterns: Vec<String>) -> Result<Excludes> {
        if patterns.is_empty() {
            return Ok(Excludes {
                matcher: None,
                patterns,
            });
        }
        let mut b = GitignoreBuilder::new("");
        // gitignore(5) leaves an unclosed `[` undefined (git's matcher then matches nothing,
        // the `ignore` crate a literal `[`); either way the user meant something else, so
        // such a pattern is refused. `\[` matches a literal `[`.
        b.allow_unclosed_class(false);
        for p in &patterns {
            b.add_line(None, p).map_err(|e| {
                Error::Usage(format!("invalid exclude pattern '{p}': {}", glob_error(&e)))
            })?;
        }
        let matcher = b
            .build()
            .map_err(|e| Error::Usage(format!("invalid exclude patterns: {e}")))?;
        Ok(Excludes {
            matcher: Some(matcher),
            patterns,
        })
    }

    /// Whether `dir/name` is excluded. Joins the path only when there are patterns: the
    /// scan asks this for every entry of both trees.
    pub fn excludes(&self, dir: &RelPath, name: &std::ffi::OsStr, is_dir: bool) -> bool {
        self.matcher.is_some() && self.is_excluded(&dir.join(name), is_dir)
    }

    pub fn is_excluded(&self, rel: &RelPath, is_dir: bool) -> bool {
        self.matcher
            .as_ref()
            .is_some_and(|m| m.matched(rel.as_path(), is_dir).is_ignore())
    }
}

/// What is wrong with a pattern, without the `ignore` crate's "error parsing glob '...'"
/// prefix (the message names the pattern as the user wrote it).
fn glob_error(e: &ignore::Error) -> String {
    match e {
        ignore::Error::Glob { err, .. } => err.clone(),
        other => other.to_string(),
    }
}

/// Default worker threads with an `s3://` replica or source: requests in flight.
pub const S3_THREADS: usize = 16;

/// The most `--threads` accepts (and the most the default takes on a machine with more
/// cores). Each worker has its own stack and the pool is built before the first pass: far
/// beyond this many threads a typo (`--threads 1000000`) would exhaust the machine before
/// syncer could say anything, and no disk or network gains from more requests in flight.
pub const MAX_THREADS: usize = 256;

pub struct Config {
    /// Job name (`--name`, default `default`); names the PID, status, cache and log files.
    pub name: String,
    /// Source root, canonical (symlinks resolved).
    pub source: PathBuf,
    /// Replica root, absolute; canonical as far as it exists.
    pub replica: PathBuf,
    /// State directory (`--state-dir`, default `$XDG_STATE_HOME/syncer` or
    /// `~/.local/state/syncer`).
    pub state_dir: PathBuf,
    /// File-I/O log (default `<state>/<name>.io.log`).
    pub io_log: PathBuf,
    /// Schedule log (default `<state>/<name>.schedule.log`).
    pub schedule_log: PathBuf,
    pub excludes: Excludes,
    /// `--checksum`: re-hash both sides, ignoring the cache.
    pub checksum: bool,
    /// `--dry-run`: print the plan, change nothing.
    pub dry_run: bool,
    /// `--max-delete`; default: the half-the-replica guard.
    pub guard: Guard,
    /// `--backup-dir`, absolute.
    pub backup_dir: Option<PathBuf>,
    /// `--threads`, 1 to `MAX_THREADS`; default: one per core (at most `MAX_THREADS`), or
    /// `S3_THREADS` with an object store on either side.
    pub threads: usize,
    /// Mirror extended attributes, ACLs and file capabilities (default; `--no-xattrs`).
    pub xattrs: bool,
    /// `-x, --one-file-system`: do not cross mount points on either side.
    pub one_file_system: bool,
    /// Mirror hard links (default; `--no-hard-links`).
    pub hard_links: bool,
    /// Turn a file moved in the source into a rename in the replica (default; `--no-moves`).
    pub moves: bool,
    pub verbosity: Verbosity,
    /// `--interval` (daemon only).
    pub interval: Option<Duration>,
    /// An `s3://` replica: where it is and how to reach it.
    pub s3: Option<(crate::replica::s3::Target, crate::replica::s3::Endpoint)>,
    /// `start --watch`: inotify on the source, partial passes.
    pub watch: bool,
    /// An `s3://` source (a restore from a bucket).
    pub source_s3: Option<(crate::replica::s3::Target, crate::replica::s3::Endpoint)>,
}

/// Makes `p` absolute against `cwd` and removes `.` and `..` lexically.
pub fn absolute(p: &Path, cwd: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Canonicalizes the longest existing prefix of an absolute path and appends the rest.
pub fn resolve_existing_prefix(p: &Path) -> PathBuf {
    let mut existing = p.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = fs::canonicalize(&existing) {
            let mut out = c;
            for r in rest.iter().rev() {
                out.push(r);
            }
            return out;
        }
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return p.to_path_buf(),
        }
    }
}

pub fn default_state_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("syncer");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"));
    home.join(".local/state/syncer")
}

/// Resolves `--state-dir` against `cwd`, or the default.
pub fn state_dir(arg: Option<&Path>, cwd: &Path) -> PathBuf {
    arg.map(|p| absolute(p, cwd))
        .unwrap_or_else(default_state_dir)
}

pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(Error::Usage(format!(
            "invalid job name '{name}': use letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

impl Config {
    pub fn from_args(args: &SyncArgs, interval: Option<Duration>) -> Result<Config> {
        let cwd =
            std::env::current_dir().map_err(|e| Error::io("read the working directory", ".", e))?;
        check_name(&args.name)?;
        let endpoint = crate::replica::s3::Endpoint {
            endpoint: args.s3_endpoint.clone(),
            region: args.s3_region.clone(),
            timeout: args.timeout,
        };
        let source_s3 = match crate::replica::s3::Target::parse(args.source.as_os_str()) {
            None => None,
            Some(Err(e)) => return Err(Error::Usage(e)),
            Some(Ok(t)) => Some((t, endpoint.clone())),
        };
        let source = match &source_s3 {
            Some((t, _)) => PathBuf::from(t.url()),
            None => check_source(&absolute(&args.source, &cwd))?,
        };
        let s3 = match crate::replica::s3::Target::parse(args.replica.as_os_str()) {
            None => None,
            Some(Err(e)) => return Err(Error::Usage(e)),
            Some(Ok(_)) if source_s3.is_some() => {
                return Err(Error::Usage(
                    "source and replica cannot both be s3:// addresses".into(),
                ))
            }
            Some(Ok(t)) if t.prefix.is_empty() && !args.allow_bucket_root => {
                return Err(Error::Usage(format!(
                    "replica '{}' is a whole bucket: a mirror deletes whatever else it holds; \
                     name a prefix (s3://{}/PREFIX) or pass --allow-bucket-root",
                    t.url(),
                    t.bucket
                )))
            }
            Some(Ok(t)) => Some((t, endpoint)),
        };
        let replica = match &s3 {
            Some((t, _)) => PathBuf::from(t.url()),
            None if source_s3.is_some() => {
                crate::replica::check_root(&absolute(&args.replica, &cwd)).map_err(Error::Usage)?
            }
            None => check_replica(&absolute(&args.replica, &cwd), &source)?,
        };
        let state_dir = state_dir(args.state_dir.as_deref(), &cwd);
        let in_state = |file: &str| state_dir.join(format!("{}.{file}", args.name));
        let io_log = args
            .io_log
            .as_ref()
            .map(|p| absolute(p, &cwd))
            .unwrap_or_else(|| in_state("io.log"));
        let schedule_log = args
            .schedule_log
            .as_ref()
            .map(|p| absolute(p, &cwd))
            .unwrap_or_else(|| in_state("schedule.log"));

        let mut patterns = args.exclude.clone();
        for file in &args.exclude_from {
            let path = absolute(file, &cwd);
            let text =
                fs::read_to_string(&path).map_err(|e| Error::io("read exclude file", &path, e))?;
            patterns.extend(
                text.lines()
                    .map(str::trim_end)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        let excludes = Excludes::new(patterns)?;
        let guard = match &args.max_delete {
            Some(text) => Guard::parse(text).map_err(Error::Usage)?,
            None => Guard::Default,
        };
        let backup_dir = match &args.backup_dir {
            None => None,
            Some(_) if source_s3.is_some() => {
                return Err(Error::Usage(
                    "--backup-dir is not supported with an s3:// source yet".into(),
                ))
            }
            Some(p) if s3.is_some() => {
                let (rep, _) = s3.as_ref().expect("checked");
                Some(check_s3_backup(p, rep)?)
            }
            Some(p) => Some(check_backup(
                &absolute(p, &cwd),
                &source,
                &replica,
                &excludes,
            )?),
        };
        // `--threads` is 1 to MAX_THREADS: `cli` refuses anything else before this runs.
        let threads = match args.threads {
            Some(n) => n,
            // An object store is reached over the network: requests wait, not cores.
            None if s3.is_some() || source_s3.is_some() => S3_THREADS,
            None => std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(MAX_THREADS),
        };
        let verbosity = if args.quiet {
            Verbosity::Quiet
        } else if args.verbose > 0 {
            Verbosity::Verbose
        } else {
            Verbosity::Normal
        };
        if let Some(i) = interval {
            if i.is_zero() {
                return Err(Error::Usage("--interval must be greater than zero".into()));
            }
        }
        Ok(Config {
            name: args.name.clone(),
            source,
            replica,
            state_dir,
            io_log,
            schedule_log,
            excludes,
            checksum: args.checksum,
            dry_run: args.dry_run,
            guard,
            backup_dir,
            threads,
            xattrs: !args.no_xattrs,
            one_file_system: args.one_file_system,
            hard_links: !args.no_hard_links,
            moves: !args.no_moves,
            verbosity,
            interval,
            s3,
            source_s3,
            watch: false,
        })
    }

    /// Re-checks the roots at the start of a pass (a daemon's source may vanish later).
    pub fn recheck_roots(&self) -> Result<()> {
        if self.source_s3.is_some() {
            // A bucket is checked when the pass opens it.
            return Ok(());
        }
        check_source(&self.source)?;
        if self.s3.is_none() {
            check_replica(&self.replica, &self.source)?;
        }
        Ok(())
    }
}

/// `--backup-dir` of an `s3://` replica: another prefix of the same bucket (objects are kept
/// by server-side copy), neither inside the replica's prefix nor containing it.
fn check_s3_backup(path: &Path, rep: &crate::replica::s3::Target) -> Result<PathBuf> {
    let b = match crate::replica::s3::Target::parse(path.as_os_str()) {
        Some(Ok(b)) => b,
        Some(Err(e)) => return Err(Error::Usage(e)),
        None => {
            return Err(Error::Usage(format!(
                "--backup-dir '{}' must be an s3:// prefix in the replica's bucket",
                show(path)
            )))
        }
    };
    if b.bucket != rep.bucket {
        return Err(Error::Usage(format!(
            "--backup-dir '{}' must be in the replica's bucket '{}' (objects are kept by server-side copy)",
            b.url(),
            rep.bucket
        )));
    }
    let inside = |a: &str, b: &str| a == b || b.is_empty() || a.starts_with(&format!("{b}/"));
    if inside(&b.prefix, &rep.prefix) || inside(&rep.prefix, &b.prefix) {
        return Err(Error::Usage(format!(
            "--backup-dir '{}' cannot be inside the replica '{}' or contain it",
            b.url(),
            rep.url()
        )));
    }
    Ok(PathBuf::from(b.url()))
}

fn check_source(path: &Path) -> Result<PathBuf> {
    let canon = fs::canonicalize(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Usage(format!("source '{}' does not exist", show(path)))
        } else {
            Error::Usage(format!(
                "source '{}' cannot be used: {}",
                show(path),
                reason(&e)
            ))
        }
    })?;
    let meta = fs::metadata(&canon).map_err(|e| Error::io("read source", path, e))?;
    if !meta.is_dir() {
        return Err(Error::Usage(format!(
            "source '{}' is not a directory",
            show(path)
        )));
    }
    fs::read_dir(&canon).map_err(|e| {
        Error::Usage(format!(
            "source '{}' cannot be read: {}",
            show(path),
            reason(&e)
        ))
    })?;
    Ok(canon)
}

fn check_replica(path: &Path, source: &Path) -> Result<PathBuf> {
    let canon = crate::replica::check_root(path).map_err(Error::Usage)?;
    if canon == source {
        return Err(Error::Usage(format!(
            "source and replica are the same directory '{}'",
            show(source)
        )));
    }
    if canon.starts_with(source) {
        return Err(Error::Usage(format!(
            "replica '{}' is inside source '{}'",
            show(path),
            show(source)
        )));
    }
    if source.starts_with(&canon) {
        return Err(Error::Usage(format!(
            "source '{}' is inside replica '{}'",
            show(source),
            show(path)
        )));
    }
    Ok(canon)
}

fn check_backup(
    path: &Path,
    source: &Path,
    replica: &Path,
    excludes: &Excludes,
) -> Result<PathBuf> {
    let canon = resolve_existing_prefix(path);
    for (root, what) in [(source, "source"), (replica, "replica")] {
        if canon == root || root.starts_with(&canon) {
            return Err(Error::Usage(format!(
                "--backup-dir '{}' cannot contain or be the {what}",
                show(path)
            )));
        }
        if let Ok(inside) = canon.strip_prefix(root) {
            let rel =
                RelPath::from_bytes(std::os::unix::ffi::OsStrExt::as_bytes(inside.as_os_str()));
            let excluded = rel
                .as_path()
                .ancestors()
                .filter(|a| !a.as_os_str().is_empty())
                .any(|a| {
                    excludes.is_excluded(
                        &RelPath::from_bytes(std::os::unix::ffi::OsStrExt::as_bytes(a.as_os_str())),
                        true,
                    )
                });
            if !excluded {
                return Err(Error::Usage(format!(
                    "--backup-dir '{}' is inside the {what}; exclude it (--exclude '/{}/') or choose another place",
                    show(path),
                    rel
                )));
            }
        }
    }
    Ok(canon)
}
