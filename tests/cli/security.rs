//! Security: a root-run pass never follows a symlink out of its trees, even when an
//! unprivileged user who owns directories inside the source or the replica swaps them for
//! symlinks *while* passes run. An attacker process, running as `nobody`, atomically
//! exchanges (`renameat2(RENAME_EXCHANGE)`) real directories with symlinks to a root-owned
//! directory outside both trees, as fast as it can, during several passes that each have
//! real work to do. Nothing outside may change, nothing from outside may reach the replica,
//! and once the attacker stops a clean pass makes the replica exact again.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::common::*;

/// Directories `u/d00..` in the source.
const DIRS: usize = 8;
/// Files in each of them.
const FILES: usize = 40;
/// Passes run while the attacker is active.
const PASSES: u64 = 8;
/// A bound on one pass, so a hung pass fails the test instead of hanging it.
const PASS_TIMEOUT: Duration = Duration::from_secs(60);

/// The attacker, run as `nobody`: `python3 -c ATTACKER PARENT TARGET STOP DIRS`. Until the
/// file STOP exists, it exchanges each `PARENT/dXX` with a symlink `PARENT/.lnXX -> TARGET`
/// and back again, re-creating the symlink whenever a pass has removed it. It prints `ready`
/// once it has made its first exchange, and its counts when it stops.
const ATTACKER: &str = r#"
import ctypes, errno, os, sys

parent, target, stop = (os.fsencode(a) for a in sys.argv[1:4])
dirs = int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
renameat2 = getattr(libc, "renameat2", None)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
exchanges = failures = fallbacks = 0

def exchange(a, b, tmp):
    global renameat2, fallbacks
    if renameat2 is not None:
        if renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) == 0:
            return True
        if ctypes.get_errno() not in (errno.ENOSYS, errno.EINVAL):
            return False
        renameat2 = None
    # No renameat2 (old libc or kernel, or a filesystem without it): three plain renames.
    fallbacks += 1
    try:
        os.rename(a, tmp)
    except OSError:
        return False
    try:
        os.rename(b, a)
    except OSError:
        os.rename(tmp, a)
        return False
    os.rename(tmp, b)
    return True

slots = [
    (os.path.join(parent, b"d%02d" % i), os.path.join(parent, b".ln%02d" % i),
     os.path.join(parent, b".tm%02d" % i))
    for i in range(dirs)
]
ready = False
while not os.path.exists(stop):
    for d, ln, tmp in slots:
        if not os.path.lexists(ln):
            try:
                os.symlink(target, ln)
            except OSError:
                pass
    # Every directory becomes a symlink to TARGET, then every one becomes real again.
    for _ in range(2):
        for d, ln, tmp in slots:
            if exchange(d, ln, tmp):
                exchanges += 1
            else:
                failures += 1
    if not ready and exchanges:
        print("ready", flush=True)
        ready = True
if not ready:
    print("ready", flush=True)
print("attacker: %d exchanges, %d failed, %d fallbacks" % (exchanges, failures, fallbacks),
      flush=True)
"#;

// ---------------------------------------------------------------------------------------
// Helpers

/// The attacker process (as `nobody`); killed and reaped when dropped, so a failing test
/// leaves no process behind.
struct Attacker {
    child: Option<Child>,
    stdout: BufReader<ChildStdout>,
    stop: PathBuf,
}

impl Attacker {
    /// Starts swapping `parent/dXX` for symlinks to `target`; returns once it has swapped.
    fn start(parent: &Path, target: &Path, stop: &Path) -> Attacker {
        let mut py = Command::new(python_for_nobody());
        py.arg("-c")
            .arg(ATTACKER)
            .arg(parent)
            .arg(target)
            .arg(stop)
            .arg(DIRS.to_string());
        let mut cmd = unprivileged(&py);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the attacker (setpriv, python3)");
        let stdout = BufReader::new(child.stdout.take().expect("attacker stdout"));
        let mut attacker = Attacker {
            child: Some(child),
            stdout,
            stop: stop.to_path_buf(),
        };
        let mut line = String::new();
        attacker
            .stdout
            .read_line(&mut line)
            .expect("read the attacker's stdout");
        if line.trim() != "ready" {
            let err = attacker.kill_for_stderr();
            panic!("the attacker did not start: {line:?}\n{err}");
        }
        attacker
    }

    /// Kills the attacker and returns what it wrote on stderr (why it did not start).
    fn kill_for_stderr(&mut self) -> String {
        let child = self.child.as_mut().expect("attacker");
        let _ = child.kill();
        let _ = child.wait();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }

    /// Creates the stop file, waits for the attacker to exit and returns its exchange count.
    fn stop(mut self) -> u64 {
        fs::write(&self.stop, b"stop").expect("write the stop file");
        let mut child = self.child.take().expect("attacker");
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break st;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the attacker did not stop within 30 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut said = String::new();
        self.stdout
            .read_to_string(&mut said)
            .expect("read the attacker's report");
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut err).expect("attacker stderr");
        }
        assert!(
            status.success(),
            "the attacker failed: {status:?}\n{said}\n{err}"
        );
        eprintln!("{}", said.trim());
        said.split("attacker: ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("odd attacker report:\n{said}\n{err}"))
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `python3` that `nobody` can run: the first on PATH that starts as that user (a
/// pyenv shim under root's 0700 home does not), then the system's.
fn python_for_nobody() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::split_paths(&path)
        .map(|dir| dir.join("python3"))
        .chain([PathBuf::from("/usr/bin/python3")]);
    for py in candidates {
        let mut probe = Command::new(&py);
        probe.args(["-c", "import ctypes"]);
        let ok = unprivileged(&probe)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|st| st.success());
        if ok {
            return py;
        }
    }
    panic!("no python3 on PATH that the user nobody can run (the attacker needs one)");
}

/// Runs `cmd` to completion (its output read as it comes, so a chatty pass cannot block on
/// a full pipe); SIGKILLs it and fails after `timeout`.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn syncer");
    let pid = Pid::from_raw(child.id() as i32);
    let (done, finished) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let late = finished.recv_timeout(timeout) == Err(mpsc::RecvTimeoutError::Timeout);
        if late {
            let _ = kill(pid, Signal::SIGKILL);
        }
        late
    });
    let out = child.wait_with_output().expect("wait for syncer");
    let _ = done.send(());
    let late = watchdog.join().expect("watchdog");
    assert!(
        !late,
        "the pass did not finish within {timeout:?}:\n{}",
        text(&out)
    );
    out
}

/// One pass under attack: exit 0 (nothing noticed) or 1 (some entries failed) only.
/// Returns the exit code and whether the pass met a swapped directory (and said so).
fn pass_under_attack(env: &Env, n: u64) -> (i32, bool) {
    let out = run_bounded(env.monoshot_cmd(&["--max-delete", "none"]), PASS_TIMEOUT);
    let c = code(&out);
    assert!(
        c == 0 || c == 1,
        "pass {n} under attack exited {c} (0 or 1 expected):\n{}",
        text(&out)
    );
    (c, stderr(&out).contains("path changed during the pass"))
}

/// The attack must have hit: some pass under attack met a swapped directory mid-pass.
fn assert_some_pass_met_a_swap(met: &[bool], codes: &[i32]) {
    assert!(
        met.iter().any(|m| *m),
        "no pass under attack reported 'path changed during the pass' (exit codes {codes:?}): \
         the attack never raced a pass, so this run proved nothing"
    );
}

/// Clean passes after the attack: the last one exits 0 and the replica is exact. A pass
/// that still has the attacker's leftovers to repair may exit 1 once.
fn converge(env: &Env) {
    let first = run_bounded(env.monoshot_cmd(&["--max-delete", "none"]), PASS_TIMEOUT);
    if code(&first) == 0 {
        assert_trees_equal(&env.src, &env.rep);
        return;
    }
    eprintln!("first clean pass after the attack:\n{}", text(&first));
    let second = run_bounded(env.monoshot_cmd(&["--max-delete", "none"]), PASS_TIMEOUT);
    assert_eq!(
        code(&second),
        0,
        "no clean pass after the attack; first:\n{}\nsecond:\n{}",
        text(&first),
        text(&second)
    );
    assert_trees_equal(&env.src, &env.rep);
}

/// Writes (round 0: creates) `u/d00..` with `FILES` files each under `src`, new content of
/// varied sizes every round, then gives every directory below `src` a new mode and mtime.
fn fill_source(src: &Path, round: u64) {
    let u = src.join("u");
    let mut rng = Rng::new(1000 + round);
    for i in 0..DIRS {
        let d = u.join(format!("d{i:02}"));
        for j in 0..FILES {
            let size = 512 + rng.below(6 * 1024) as usize;
            let mut data = format!("round {round} dir {i} file {j}\n").into_bytes();
            data.extend(rng.bytes(size));
            write(&d.join(format!("f{j:02}.dat")), &data);
        }
    }
    let modes = [0o755, 0o750, 0o770];
    for (i, d) in source_dirs(src).iter().enumerate() {
        chmod(d, modes[(round as usize + i) % modes.len()]);
        set_mtime(
            d,
            1_600_000_000 + round as i64 * 10_000 + i as i64,
            (round as u32 * 7919 + i as u32) % 1_000_000_000,
        );
    }
}

/// `u` and `u/d00..` (not the source root itself, which stays root's 0755).
fn source_dirs(src: &Path) -> Vec<PathBuf> {
    let u = src.join("u");
    let mut dirs = vec![u.clone()];
    dirs.extend((0..DIRS).map(|i| u.join(format!("d{i:02}"))));
    dirs
}

/// What one entry of a watched directory looks like: the common snapshot (kind, content
/// hash, mode, mtime, link target, owner) plus size and ctime, so that even a change put
/// back (a chmod and a chmod back, a rewrite with the same bytes) is seen.
#[derive(Debug, PartialEq, Eq)]
struct Print {
    snap: Snap,
    size: u64,
    ctime: (i64, i64),
}

/// `root` itself and every entry below it, never following symlinks.
fn fingerprint(root: &Path) -> BTreeMap<PathBuf, Print> {
    snapshot(root)
        .into_iter()
        .map(|(rel, snap)| {
            let m = fs::symlink_metadata(root.join(&rel)).expect("lstat");
            let print = Print {
                snap,
                size: m.size(),
                ctime: (m.ctime(), m.ctime_nsec()),
            };
            (rel, print)
        })
        .collect()
}

/// Fails, naming every difference, unless `root` still matches `before`.
fn assert_unchanged(root: &Path, before: &BTreeMap<PathBuf, Print>, when: &str) {
    let now = fingerprint(root);
    let mut diffs = Vec::new();
    for (k, a) in before {
        match now.get(k) {
            None => diffs.push(format!("removed: '{}'", k.display())),
            Some(b) if a != b => diffs.push(format!(
                "changed: '{}'\n  before {a:?}\n  after  {b:?}",
                k.display()
            )),
            _ => {}
        }
    }
    for k in now.keys().filter(|k| !before.contains_key(*k)) {
        diffs.push(format!("created: '{}'", k.display()));
    }
    assert!(
        diffs.is_empty(),
        "{when}, '{}' (outside both trees) was changed:\n{}",
        root.display(),
        first_lines(&diffs)
    );
}

/// The first 20 findings, one a line, and how many more there were.
fn first_lines(findings: &[String]) -> String {
    let mut out = findings.iter().take(20).cloned().collect::<Vec<_>>();
    if findings.len() > 20 {
        out.push(format!("… and {} more", findings.len() - 20));
    }
    out.join("\n")
}

/// Lets `nobody` reach the scratch directory's children (tempdirs are 0700).
fn open_scratch(env: &Env) {
    chmod(env.tmp.path(), 0o755);
}

// ---------------------------------------------------------------------------------------
// Replica directories swapped for symlinks

#[test]
fn replica_directories_swapped_for_symlinks_mid_pass_never_redirect_a_write() {
    let env = Env::new();
    open_scratch(&env);
    fill_source(&env.src, 0);
    // Mirrored owners: `nobody` owns the replica's `u` and `u/dXX`, so it may rename them.
    give_to_nobody(&env.src.join("u"));
    env.mirror_ok(&["--max-delete", "none"]);
    let owner = fs::symlink_metadata(env.rep.join("u/d00")).expect("lstat replica d00");
    assert_eq!(
        (owner.uid(), owner.gid()),
        (65534, 65534),
        "replica directories must belong to nobody for the attack"
    );

    let outside = env.path("outside");
    fs::create_dir(&outside).expect("mkdir outside");
    chmod(&outside, 0o755);
    write(
        &outside.join("keep.txt"),
        b"outside the trees: syncer must never touch me\n",
    );
    set_mtime(&outside.join("keep.txt"), 1_500_000_000, 111);
    set_mtime(&outside, 1_500_000_000, 222);
    let before = fingerprint(&outside);

    let attacker = Attacker::start(&env.rep.join("u"), &outside, &env.path("stop"));
    let mut codes = Vec::new();
    let mut met = Vec::new();
    for n in 1..=PASSES {
        fill_source(&env.src, n);
        let (c, hit) = pass_under_attack(&env, n);
        codes.push(c);
        met.push(hit);
        assert_unchanged(&outside, &before, &format!("during pass {n} under attack"));
    }
    assert_some_pass_met_a_swap(&met, &codes);
    let exchanges = attacker.stop();
    eprintln!("exit codes of the passes under attack: {codes:?}");
    assert!(
        exchanges >= 100,
        "the attacker hardly swapped anything ({exchanges} exchanges)"
    );
    assert_unchanged(&outside, &before, "after the attack");

    converge(&env);
    assert_unchanged(&outside, &before, "after the clean pass");
}

// ---------------------------------------------------------------------------------------
// Source directories swapped for symlinks

const MARKER: &[u8] = b"TOP-SECRET-";

/// Names of the secret directory's entries, none of which the source has.
fn secret_names() -> Vec<String> {
    let mut names: Vec<String> = (0..10).map(|n| format!("s{n}")).collect();
    names.push("vault".to_string());
    names.push("vault-marker.txt".to_string());
    names
}

/// Walks the replica without following symlinks (a mirrored source symlink is fine):
/// no regular file may hold the marker, no entry may bear a secret file's name.
fn assert_no_secret_in(rep: &Path, when: &str) {
    let names = secret_names();
    let mut leaks = Vec::new();
    for e in walkdir::WalkDir::new(rep).follow_links(false) {
        let e = e.expect("walk the replica");
        let name = e.file_name().to_string_lossy().to_string();
        if names.contains(&name) {
            leaks.push(format!("secret name: '{}'", e.path().display()));
        }
        if e.file_type().is_file() {
            let data = fs::read(e.path()).expect("read a replica file");
            if data.windows(MARKER.len()).any(|w| w == MARKER) {
                leaks.push(format!("secret content: '{}'", e.path().display()));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "{when}, outside files reached the replica:\n{}",
        first_lines(&leaks)
    );
}

#[test]
fn source_directories_swapped_for_symlinks_never_bring_outside_files_into_the_replica() {
    let env = Env::new();
    open_scratch(&env);
    fill_source(&env.src, 0);
    // `nobody` owns `u` and `u/dXX` in the source, so it may rename them.
    give_to_nobody(&env.src.join("u"));
    let secret = env.path("secret");
    for n in 0..10 {
        write(
            &secret.join(format!("s{n}")),
            format!("TOP-SECRET-{n}: root's eyes only\n").as_bytes(),
        );
    }
    write(
        &secret.join("vault/vault-marker.txt"),
        b"TOP-SECRET-VAULT: deeper still\n",
    );
    chmod(&secret.join("vault"), 0o700);
    chmod(&secret, 0o700);
    env.mirror_ok(&["--max-delete", "none"]);
    let before = fingerprint(&secret);

    let attacker = Attacker::start(&env.src.join("u"), &secret, &env.path("stop"));
    let mut codes = Vec::new();
    let mut met = Vec::new();
    for n in 1..=PASSES {
        let (c, hit) = pass_under_attack(&env, n);
        codes.push(c);
        met.push(hit);
        assert_no_secret_in(&env.rep, &format!("after pass {n} under attack"));
    }
    assert_some_pass_met_a_swap(&met, &codes);
    let exchanges = attacker.stop();
    eprintln!("exit codes of the passes under attack: {codes:?}");
    assert!(
        exchanges >= 100,
        "the attacker hardly swapped anything ({exchanges} exchanges)"
    );
    assert_unchanged(&secret, &before, "after the attack");

    converge(&env);
    assert_no_secret_in(&env.rep, "after the clean pass");
    assert_unchanged(&secret, &before, "after the clean pass");
}
