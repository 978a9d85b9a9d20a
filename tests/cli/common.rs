//! Shared test helpers: a seeded random tree generator that mixes every entry kind, an
//! independent tree comparison (our own walk, plus `rsync -anic --delete`), byte-for-byte
//! snapshots, and runners for the binary (as root or unprivileged).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

pub fn bin() -> PathBuf {
    // SYNCER_TEST_BIN=/path/to/syncer runs the tests against another build (e.g. an old one).
    std::env::var_os("SYNCER_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_syncer")))
}

/// The binary, with every plan action going through the on-disk spill, every settled cache
/// draft written during the scan and every directory decided two entries at a time (the
/// paths a large tree takes), however small the test tree.
pub fn syncer() -> Command {
    let mut c = Command::new(bin());
    c.env("SYNCER_TEST_SPILL_AT", "1");
    c.env("SYNCER_TEST_SETTLED_AT", "1");
    c.env("SYNCER_TEST_DECIDE_AT", "2");
    c
}

/// A scratch area with a source, a replica and a state directory.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub src: PathBuf,
    pub rep: PathBuf,
    pub state: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("syncer-test-")
            .tempdir()
            .expect("tempdir");
        let src = tmp.path().join("src");
        let rep = tmp.path().join("rep");
        let state = tmp.path().join("state");
        fs::create_dir(&src).expect("mkdir src");
        Env {
            tmp,
            src,
            rep,
            state,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `syncer SUB --source S --replica R --state-dir T`.
    pub fn command(&self, sub: &str) -> Command {
        let mut c = syncer();
        c.arg(sub)
            .arg("--source")
            .arg(&self.src)
            .arg("--replica")
            .arg(&self.rep)
            .arg("--state-dir")
            .arg(&self.state);
        c
    }

    /// `syncer monoshot --source S --replica R --state-dir T` plus `extra`.
    pub fn monoshot_cmd(&self, extra: &[&str]) -> Command {
        let mut c = self.command("monoshot");
        c.args(extra);
        c
    }

    pub fn monoshot(&self, extra: &[&str]) -> Output {
        self.monoshot_cmd(extra).output().expect("run syncer")
    }

    /// Runs a monoshot and asserts exit 0 and an exact replica.
    pub fn mirror_ok(&self, extra: &[&str]) -> Output {
        let out = self.monoshot(extra);
        assert_eq!(code(&out), 0, "monoshot failed:\n{}", text(&out));
        assert_trees_equal(&self.src, &self.rep);
        out
    }

    pub fn schedule_log(&self) -> String {
        fs::read_to_string(self.state.join("default.schedule.log")).unwrap_or_default()
    }

    pub fn io_log(&self) -> String {
        fs::read_to_string(self.state.join("default.io.log")).unwrap_or_default()
    }
}

/// The last `PASS END` line of the job's schedule log.
pub fn last_pass_end(env: &Env) -> String {
    env.schedule_log()
        .lines()
        .rev()
        .find(|l| l.contains("PASS END"))
        .unwrap_or_else(|| panic!("no PASS END in the schedule log:\n{}", env.schedule_log()))
        .to_string()
}

pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

pub fn text(out: &Output) -> String {
    format!(
        "status: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A tiny deterministic PRNG (xorshift64*), so trees are reproducible from a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

pub fn write(path: &Path, content: &[u8]) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).expect("mkdir parent");
    }
    fs::write(path, content).expect("write file");
}

pub fn set_mtime(path: &Path, sec: i64, nsec: u32) {
    let t = filetime::FileTime::from_unix_time(sec, nsec);
    filetime::set_symlink_file_times(path, t, t).expect("set mtime");
}

pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Generates a seeded tree under `root` mixing every kind syncer mirrors: nested and empty
/// directories, files of varied sizes, exec and private modes, sub-second and very old
/// mtimes, unicode and non-UTF-8 names, symlinks (relative, absolute, dangling, to a dir).
pub fn gen_tree(root: &Path, seed: u64, files: usize) {
    let mut rng = Rng::new(seed);
    let mut dirs = vec![root.to_path_buf()];
    for i in 0..files / 4 + 1 {
        let parent = dirs[rng.below(dirs.len() as u64) as usize].clone();
        let name = match i % 5 {
            0 => format!("dir{i}"),
            1 => format!("ünïcødé-{i}"),
            2 => format!("deep{i}/a/b/c/d"),
            _ => format!("d {i}"),
        };
        let d = parent.join(name);
        fs::create_dir_all(&d).expect("mkdir");
        dirs.push(d);
    }
    fs::create_dir_all(root.join("empty/also-empty")).expect("mkdir empty");
    for i in 0..files {
        let dir = dirs[rng.below(dirs.len() as u64) as usize].clone();
        let name: OsString = match i % 7 {
            0 => OsString::from_vec(
                format!("raw-\u{fffd}-{i}")
                    .into_bytes()
                    .into_iter()
                    .map(|b| if b == 0xbd { 0xff } else { b })
                    .collect(),
            ),
            1 => OsString::from(format!("файл-{i}.txt")),
            _ => OsString::from(format!("f{i}.bin")),
        };
        let size = match rng.below(10) {
            0 => 0,
            1..=6 => rng.below(4096) as usize,
            7 | 8 => rng.below(200_000) as usize,
            _ => 1 << 20,
        };
        let p = dir.join(&name);
        write(&p, &rng.bytes(size));
        match rng.below(5) {
            0 => chmod(&p, 0o755),
            1 => chmod(&p, 0o600),
            2 => chmod(&p, 0o640),
            _ => {}
        }
        match rng.below(4) {
            0 => set_mtime(&p, 86_400 * 365, 0),
            1 => set_mtime(
                &p,
                1_600_000_000 + rng.below(1000) as i64,
                rng.below(1_000_000_000) as u32,
            ),
            _ => set_mtime(&p, 1_700_000_000, 123_456_789),
        }
    }
    std::os::unix::fs::symlink("f1.bin", root.join("rel-link")).expect("symlink");
    std::os::unix::fs::symlink("/etc/hostname", root.join("abs-link")).expect("symlink");
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling-link")).expect("symlink");
    std::os::unix::fs::symlink("empty", root.join("dir-link")).expect("symlink");
    let bad = OsString::from_vec(b"non-utf8-\xff\xfe-dir".to_vec());
    fs::create_dir_all(root.join(&bad).join("inner")).expect("mkdir bad");
    write(
        &root
            .join(&bad)
            .join("inner")
            .join(OsString::from_vec(b"x\x80y".to_vec())),
        b"bytes",
    );
    // Directories get their own modes and mtimes last.
    for (i, d) in dirs.iter().enumerate().skip(1) {
        if i % 3 == 0 {
            chmod(d, 0o750);
        }
    }
    for d in dirs.iter().rev() {
        set_mtime(d, 1_650_000_000 + (seed as i64 % 1000), 987_654_321);
    }
}

/// What one entry is, for comparison: kind, content hash, mode, mtime, link target, owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    pub kind: &'static str,
    pub hash: Option<[u8; 32]>,
    pub mode: u32,
    pub mtime: (i64, i64),
    pub target: Option<PathBuf>,
    pub owner: (u32, u32),
}

/// Every entry under `root` (relative path → snapshot), never following symlinks, leaving
/// out syncer's temp files only if `skip_temps`.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Snap> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).follow_links(false).min_depth(0) {
        let e = e.expect("walk");
        let rel = e.path().strip_prefix(root).expect("prefix").to_path_buf();
        let m = fs::symlink_metadata(e.path()).expect("lstat");
        let ft = m.file_type();
        let (kind, hash, target) = if ft.is_symlink() {
            (
                "link",
                None,
                Some(fs::read_link(e.path()).expect("readlink")),
            )
        } else if ft.is_dir() {
            ("dir", None, None)
        } else if ft.is_file() {
            let data = fs::read(e.path()).expect("read");
            ("file", Some(Sha256::digest(&data).into()), None)
        } else {
            ("special", None, None)
        };
        out.insert(
            rel,
            Snap {
                kind,
                hash,
                mode: if kind == "link" { 0 } else { m.mode() & 0o7777 },
                mtime: (m.mtime(), m.mtime_nsec()),
                target,
                owner: (m.uid(), m.gid()),
            },
        );
    }
    out
}

/// Asserts that `rep` mirrors `src` exactly (fifos, sockets and devices aside): same
/// names, kinds, content, modes, mtimes (ns), link targets and owners; then asks rsync too.
pub fn assert_trees_equal(src: &Path, rep: &Path) {
    let mut a = snapshot(src);
    a.retain(|_, s| s.kind != "special");
    let b = snapshot(rep);
    let mut diffs = Vec::new();
    for (k, sa) in &a {
        match b.get(k) {
            None => diffs.push(format!("missing in replica: {}", k.display())),
            Some(sb) if sa != sb => diffs.push(format!(
                "differs: {}\n  src {sa:?}\n  rep {sb:?}",
                k.display()
            )),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            diffs.push(format!("extra in replica: {}", k.display()));
        }
    }
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
    assert_rsync_agrees(src, rep);
}

/// What `rsync -anic --delete S/ R/` lists as different (specials excluded, as syncer skips
/// them): `Ok("")` when the trees agree, `Err` when rsync itself failed (for example a
/// replica that does not exist yet). Never panics, so it can be polled.
pub fn rsync_differences(src: &Path, rep: &Path) -> Result<String, String> {
    let mut s = src.as_os_str().to_owned();
    s.push("/");
    let mut r = rep.as_os_str().to_owned();
    r.push("/");
    let out = Command::new("rsync")
        .args(["-anic", "--delete", "--no-specials", "--no-devices"])
        .arg(&s)
        .arg(&r)
        .output()
        .map_err(|e| format!("rsync is required by the tests (apt-get install rsync): {e}"))?;
    if !out.status.success() {
        return Err(format!("rsync failed: {}", text(&out)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// True when rsync sees no difference (see `rsync_differences`).
pub fn rsync_quiet(src: &Path, rep: &Path) -> bool {
    rep.is_dir() && rsync_differences(src, rep).is_ok_and(|d| d.is_empty())
}

/// `rsync -anic --delete S/ R/` must print nothing.
pub fn assert_rsync_agrees(src: &Path, rep: &Path) {
    let listing = rsync_differences(src, rep).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        listing.is_empty(),
        "rsync -anic sees differences:\n{listing}"
    );
}

/// No syncer temp file anywhere under `root`.
pub fn assert_no_temps(root: &Path) {
    let temps: Vec<_> = walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().as_bytes();
            n.starts_with(b".syncer-") && n.ends_with(b".tmp")
        })
        .map(|e| e.path().to_path_buf())
        .collect();
    assert!(temps.is_empty(), "temp files left: {temps:?}");
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Wraps a command to run as the unprivileged user `nobody` (tests run as root, and root
/// ignores permissions). Every path it touches must be accessible to that user.
pub fn unprivileged(cmd: &Command) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    if let Some(d) = cmd.get_current_dir() {
        c.current_dir(d);
    }
    c
}

/// Hands `path` and everything below it to `nobody`.
pub fn give_to_nobody(path: &Path) {
    let st = Command::new("chown")
        .args(["-R", "-h", "65534:65534"])
        .arg(path)
        .status()
        .expect("chown");
    assert!(st.success());
}

pub fn os(bytes: &[u8]) -> OsString {
    OsString::from_vec(bytes.to_vec())
}

pub fn name_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

/// Unmounts a mount point when dropped (before the scratch directory is removed).
pub struct Mount(PathBuf);

impl Mount {
    pub fn tmpfs(dir: &Path, size: &str) -> Mount {
        Mount::with(
            dir,
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
        )
    }

    /// `mount ARGS DIR`.
    pub fn with(dir: &Path, args: &[&str]) -> Mount {
        fs::create_dir_all(dir).expect("mkdir mount point");
        let st = Command::new("mount")
            .args(args)
            .arg(dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount {args:?} failed (tests run as root)");
        Mount(dir.to_path_buf())
    }

    /// A fresh ext4 filesystem of `size` in the image file `image`, loop-mounted at `dir`, made
    /// with `mkfs_args` (e.g. `-I 128`).
    pub fn ext4_image(image: &Path, size: &str, mkfs_args: &[&str], dir: &Path) -> Mount {
        let st = Command::new("truncate")
            .args(["-s", size])
            .arg(image)
            .status()
            .expect("truncate");
        assert!(st.success(), "truncate -s {size} failed");
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .args(mkfs_args)
            .arg(image)
            .output()
            .expect("mkfs.ext4 (e2fsprogs)");
        assert!(out.status.success(), "mkfs.ext4 failed: {}", text(&out));
        let image = image.to_str().expect("utf-8 image path");
        Mount::with(dir, &["-o", "loop", image])
    }
}

/// Whether syncer gives the filesystem at `path` the narrow racy window (its type is ext2/3/4,
/// xfs, btrfs or tmpfs: `statfs`'s magic number, as `stat -f` prints it).
pub fn fine_timestamps(path: &Path) -> bool {
    let out = Command::new("stat")
        .args(["-f", "-c", "%t"])
        .arg(path)
        .output()
        .expect("stat -f");
    let magic = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ["ef53", "58465342", "9123683e", "1021994"].contains(&magic.as_str())
}

/// How long a freshly written source must age before a pass can vouch for its files (their
/// ctimes out of syncer's racy window, with a margin): 200 ms where the window is 50 ms, on
/// ext2/3/4, xfs, btrfs and tmpfs; 3.1 s on any other filesystem, where it is 3 s.
pub fn racy_margin(src: &Path) -> Duration {
    if fine_timestamps(src) {
        Duration::from_millis(200)
    } else {
        Duration::from_millis(3100)
    }
}

/// Lets the files just written under `src` age past syncer's racy window (see `racy_margin`),
/// so that the next pass records tokens the pass after it can trust.
pub fn let_source_age_past_racy_window(src: &Path) {
    std::thread::sleep(racy_margin(src));
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Kills (SIGKILL, after SIGCONT) and reaps a child process when dropped, unless it has
/// already been waited for, so a failing test leaves no process behind.
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn spawn(mut cmd: Command) -> ChildGuard {
        ChildGuard(Some(cmd.spawn().expect("spawn")))
    }
    pub fn pid(&self) -> u32 {
        self.0.as_ref().expect("child").id()
    }
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child")
    }
    /// Waits for the child to exit, killing it (and failing) after `timeout`.
    pub fn wait(mut self, timeout: Duration, what: &str) -> Output {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.child().try_wait().expect("try_wait").is_some() {
                return self
                    .0
                    .take()
                    .expect("child")
                    .wait_with_output()
                    .expect("output");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{what} did not finish within {timeout:?}");
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `cmd` to completion, failing (and killing it) after `timeout`.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    ChildGuard::spawn(cmd).wait(timeout, "command")
}

/// `scripts/churn`, which keeps mutating a tree with self-checking files.
pub fn churn() -> Command {
    let mut c = Command::new("python3");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/churn"));
    c
}

/// syncer's temp files (`.syncer-*.tmp`) anywhere below `root`.
pub fn temps_in_tree(root: &Path) -> usize {
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy();
            n.starts_with(".syncer-") && n.ends_with(".tmp")
        })
        .count()
}

/// `scripts/churn` mutating `src` for `seconds`, and a reader checking every file it finds
/// in `rep` for as long; both with their output captured.
pub fn churn_and_read(src: &Path, rep: &Path, seconds: u32, seed: u32) -> (ChildGuard, ChildGuard) {
    let secs = seconds.to_string();
    let churner = ChildGuard::spawn({
        let mut c = churn();
        c.arg("--root")
            .arg(src)
            .args(["--seconds", &secs, "--seed", &seed.to_string()]);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    });
    let reader = ChildGuard::spawn({
        let mut c = churn();
        c.arg("--reader").arg(rep).args(["--seconds", &secs]);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    });
    (churner, reader)
}

/// How many replica files the churn reader checked (its last line says).
pub fn reads_checked(r: &Output) -> u64 {
    String::from_utf8_lossy(&r.stdout)
        .split("reader: checked ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("odd reader output:\n{}", text(r)))
}
