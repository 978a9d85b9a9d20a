//! Safety (issue 7): the deletion guard, backups, atomic installs under concurrent writers,
//! crashes and full disks, the replica lock, hostile symlinks, and a daemon under churn.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

use crate::common::*;

const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------------------
// Helpers

/// Stops the job's daemon when dropped (`syncer stop`, then SIGKILL of the pid it wrote).
struct DaemonGuard {
    state: PathBuf,
}

impl DaemonGuard {
    fn pid(&self) -> Option<u32> {
        let text = fs::read_to_string(self.state.join("default.pid")).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }
    fn stop(&self) -> Output {
        syncer()
            .arg("stop")
            .arg("--state-dir")
            .arg(&self.state)
            .output()
            .expect("syncer stop")
    }
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        let pid = self.pid();
        let _ = self.stop();
        if let Some(pid) = pid {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// Starts a daemon on the env's source and replica; returns its guard once it runs.
fn start_daemon(env: &Env, interval: &str) -> DaemonGuard {
    let out = env
        .command("start")
        .args(["--interval", interval])
        .output()
        .expect("syncer start");
    let guard = DaemonGuard {
        state: env.state.clone(),
    };
    assert_eq!(code(&out), 0, "start failed:\n{}", text(&out));
    assert!(guard.pid().is_some(), "no pid file after start");
    guard
}

/// Appends a 100-byte record to a file every millisecond until dropped.
struct Appender {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

const RECORD: usize = 100;

impl Appender {
    fn start(path: &Path) -> Appender {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let path = path.to_path_buf();
        let handle = std::thread::spawn(move || {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .expect("open for append");
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let mut rec = format!("append {n:012}").into_bytes();
                rec.resize(RECORD - 1, b'.');
                rec.push(b'\n');
                f.write_all(&rec).expect("append");
                n += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            n
        });
        Appender {
            stop,
            handle: Some(handle),
        }
    }
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("handle")
            .join()
            .expect("appender")
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Writes `mib` MiB made of one random 1 MiB block repeated (fast to generate).
fn write_big(path: &Path, seed: u64, mib: usize) {
    let block = Rng::new(seed).bytes(MIB);
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).expect("mkdir");
    }
    let mut f = std::io::BufWriter::new(fs::File::create(path).expect("create"));
    for _ in 0..mib {
        f.write_all(&block).expect("write");
    }
    f.flush().expect("flush");
}

fn sha(path: &Path) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut f = fs::File::open(path).expect("open");
    std::io::copy(&mut f, &mut h).expect("hash");
    h.finalize().into()
}

fn temps_in(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    let n = name_bytes(Path::new(&n)).to_vec();
                    n.starts_with(b".syncer-") && n.ends_with(b".tmp")
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// `count` small files directly under `root`.
fn flat_files(root: &Path, count: usize) {
    for i in 0..count {
        write(
            &root.join(format!("f{i:03}.dat")),
            format!("content of file {i}\n").as_bytes(),
        );
    }
}

/// Moves every file directly under `root` into the new directory `root/sub`.
fn move_files_into(root: &Path, sub: &str) -> usize {
    let names: Vec<_> = fs::read_dir(root)
        .expect("ls")
        .map(|e| e.expect("entry"))
        .filter(|e| e.file_type().expect("type").is_file())
        .map(|e| e.file_name())
        .collect();
    fs::create_dir(root.join(sub)).expect("mkdir");
    for n in &names {
        fs::rename(root.join(n), root.join(sub).join(n)).expect("mv");
    }
    names.len()
}

fn last_pass(env: &Env) -> serde_json::Value {
    let text = fs::read_to_string(env.state.join("default.status.json")).expect("status file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("status json");
    v["last_pass"].clone()
}

/// Snapshot of `root` without the entries under `skip` (relative).
fn snapshot_without(root: &Path, skip: &str) -> BTreeMap<PathBuf, Snap> {
    let mut s = snapshot(root);
    s.retain(|k, _| !k.starts_with(skip));
    s
}

// ---------------------------------------------------------------------------------------
// Deletion guard

#[test]
fn emptied_source_is_refused_and_the_replica_is_left_untouched() {
    let env = Env::new();
    gen_tree(&env.src, 71, 200);
    env.mirror_ok(&[]);
    let before = snapshot(&env.rep);
    assert!(before.len() >= 150, "tree too small: {}", before.len());

    // The source "unmounted": an empty directory where the data was.
    let away = env.path("src.away");
    fs::rename(&env.src, &away).expect("mv src away");
    fs::create_dir(&env.src).expect("mkdir src");
    let out = env.monoshot(&[]);
    assert_eq!(code(&out), 3, "{}", text(&out));
    assert!(stderr(&out).contains("--max-delete"), "{}", text(&out));
    assert_eq!(
        snapshot(&env.rep),
        before,
        "a refused pass changed the replica"
    );
    assert_eq!(last_pass(&env)["result"], "refused");
    assert!(
        env.schedule_log().contains("PASS REFUSED"),
        "{}",
        env.schedule_log()
    );

    // Source back: a normal pass again.
    fs::remove_dir(&env.src).expect("rmdir");
    fs::rename(&away, &env.src).expect("mv src back");
    env.mirror_ok(&[]);

    // Emptied on purpose: --max-delete none lets it through.
    fs::rename(&env.src, &away).expect("mv src away");
    fs::create_dir(&env.src).expect("mkdir src");
    env.mirror_ok(&["--max-delete", "none"]);
    assert_eq!(snapshot(&env.rep).len(), 1, "replica not emptied");
}

#[test]
fn files_moved_into_a_new_directory_pass_the_default_guard() {
    let env = Env::new();
    flat_files(&env.src, 300);
    env.mirror_ok(&[]);
    assert_eq!(move_files_into(&env.src, "archive"), 300);
    env.mirror_ok(&[]);
    // Moves are renames (issue 14): neither deletions nor creations.
    assert_eq!(last_pass(&env)["deleted"], 0);
    assert_eq!(last_pass(&env)["moved"], 300);
}

#[test]
fn files_copied_into_a_new_directory_are_refused_by_max_delete_10_percent() {
    let env = Env::new();
    flat_files(&env.src, 300);
    env.mirror_ok(&[]);
    let before = snapshot(&env.rep);
    move_files_into(&env.src, "archive");
    // Without moves, each moved file is one deletion (and one creation).
    let out = env.monoshot(&["--no-moves", "--max-delete", "10%"]);
    assert_eq!(code(&out), 3, "{}", text(&out));
    assert!(stderr(&out).contains("--max-delete"), "{}", text(&out));
    assert_eq!(
        snapshot(&env.rep),
        before,
        "a refused pass changed the replica"
    );
}

#[test]
fn max_delete_5_refuses_deleting_6_files_and_6_allows_it() {
    let env = Env::new();
    flat_files(&env.src, 20);
    env.mirror_ok(&[]);
    let before = snapshot(&env.rep);
    for i in 0..6 {
        fs::remove_file(env.src.join(format!("f{i:03}.dat"))).expect("rm");
    }
    let out = env.monoshot(&["--max-delete", "5"]);
    assert_eq!(code(&out), 3, "{}", text(&out));
    assert!(stderr(&out).contains("--max-delete"), "{}", text(&out));
    assert_eq!(
        snapshot(&env.rep),
        before,
        "a refused pass changed the replica"
    );
    env.mirror_ok(&["--max-delete", "6"]);
    assert_eq!(last_pass(&env)["deleted"], 6);
}

// ---------------------------------------------------------------------------------------
// Backups

/// The one `<timestamp>` directory of a backup dir.
fn only_pass_dir(backup: &Path) -> PathBuf {
    let dirs: Vec<_> = fs::read_dir(backup)
        .expect("ls backup")
        .map(|e| e.expect("e").path())
        .collect();
    assert_eq!(
        dirs.len(),
        1,
        "expected one pass directory in the backup: {dirs:?}"
    );
    dirs[0].clone()
}

#[test]
fn backup_dir_keeps_the_old_content_of_overwritten_and_deleted_files() {
    let env = Env::new();
    write(&env.src.join("keep.txt"), b"unchanged");
    write(&env.src.join("sub/dir/over.txt"), b"old over");
    write(&env.src.join("sub/gone.txt"), b"old gone");
    write(&env.src.join("gone-dir/deep/x.txt"), b"old x");
    env.mirror_ok(&[]);

    write(&env.src.join("sub/dir/over.txt"), b"new content of over");
    fs::remove_file(env.src.join("sub/gone.txt")).expect("rm");
    fs::remove_dir_all(env.src.join("gone-dir")).expect("rm -r");
    let bk = env.path("bk");
    env.mirror_ok(&["--backup-dir", bk.to_str().expect("utf8")]);

    let pass_dir = only_pass_dir(&bk);
    let name = pass_dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    assert!(
        name.starts_with("20") && name.contains('T'),
        "odd pass directory name {name}"
    );
    assert_eq!(
        fs::read(pass_dir.join("sub/dir/over.txt")).expect("over"),
        b"old over"
    );
    assert_eq!(
        fs::read(pass_dir.join("sub/gone.txt")).expect("gone"),
        b"old gone"
    );
    assert_eq!(
        fs::read(pass_dir.join("gone-dir/deep/x.txt")).expect("x"),
        b"old x"
    );
    assert!(
        !pass_dir.join("keep.txt").exists(),
        "an unchanged file was backed up"
    );
    assert!(
        env.io_log()
            .lines()
            .any(|l| l.contains(" BACKUP sub/dir/over.txt")),
        "{}",
        env.io_log()
    );
}

#[test]
fn backup_dir_inside_the_replica_needs_an_exclude() {
    let env = Env::new();
    write(&env.src.join("a.txt"), b"version 1");
    env.mirror_ok(&[]);
    write(&env.src.join("a.txt"), b"version 2!");
    let before = snapshot(&env.rep);
    let bk = env.rep.join("bk");
    let bk_arg = bk.to_str().expect("utf8");

    let out = env.monoshot(&["--backup-dir", bk_arg]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(stderr(&out).contains("--exclude"), "{}", text(&out));
    assert_eq!(
        snapshot(&env.rep),
        before,
        "a rejected command changed the replica"
    );

    let out = env.monoshot(&["--backup-dir", bk_arg, "--exclude", "/bk/"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(
        fs::read(only_pass_dir(&bk).join("a.txt")).expect("backup"),
        b"version 1"
    );
    assert_eq!(snapshot_without(&env.rep, "bk"), snapshot(&env.src));

    // The excluded backup is never mirrored away by later passes.
    let out = env.monoshot(&["--backup-dir", bk_arg, "--exclude", "/bk/"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(
        fs::read(only_pass_dir(&bk).join("a.txt")).expect("backup"),
        b"version 1"
    );
}

/// An exclude pattern that does not compile (an unclosed `[`) is a usage error: exit 2, one
/// line naming the pattern, and nothing changed or created, whether it comes from
/// `--exclude`, from `--exclude-from`, or is given to `start`.
#[test]
fn an_exclude_pattern_that_does_not_compile_exits_2_naming_it() {
    let env = Env::new();
    write(&env.src.join("a.txt"), b"version 1");
    let rules = env.path("rules.txt");
    write(&rules, b"*.tmp\n[\n");
    let assert_refused = |out: &std::process::Output| {
        assert_eq!(code(out), 2, "{}", text(out));
        let err = stderr(out);
        assert_eq!(err.lines().count(), 1, "one line:\n{err}");
        assert!(
            err.starts_with("syncer: invalid exclude pattern '[': "),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "{}", text(out));
    };

    assert_refused(&env.monoshot(&["--exclude", "["]));
    assert!(!env.rep.exists(), "a rejected command created the replica");
    env.mirror_ok(&[]);
    write(&env.src.join("a.txt"), b"version 2!");
    let before = snapshot(&env.rep);
    let rules_arg = rules.to_str().expect("utf8");
    for args in [&["--exclude", "["][..], &["--exclude-from", rules_arg]] {
        assert_refused(&env.monoshot(args));
        assert_eq!(
            snapshot(&env.rep),
            before,
            "a rejected command changed the replica"
        );
    }
    let out = env
        .command("start")
        .args(["--interval", "1h", "--exclude", "["])
        .output()
        .expect("run syncer");
    assert_refused(&out);
    assert!(
        !env.state.join("default.pid").exists(),
        "a daemon was started"
    );
    assert_eq!(snapshot(&env.rep), before);

    // Escaped, the bracket is a literal name.
    write(&env.src.join("["), b"a file named [");
    let out = env.monoshot(&["--exclude", "\\["]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        !env.rep.join("[").exists(),
        "'\\[' should exclude the file '['"
    );
    assert_eq!(
        fs::read(env.rep.join("a.txt")).expect("read"),
        b"version 2!"
    );
}

// ---------------------------------------------------------------------------------------
// Atomic installs: concurrent writers, crashes, full disks

#[test]
fn file_appended_during_its_copy_is_never_torn_in_the_replica() {
    let env = Env::new();
    let log = env.src.join("app.log");
    write_big(&log, 81, 64);
    write(&env.src.join("other.txt"), b"calm file");
    env.mirror_ok(&[]);
    let old = sha(&env.rep.join("app.log"));

    let appender = Appender::start(&log);
    assert!(
        wait_for(Duration::from_secs(10), || fs::metadata(&log)
            .unwrap()
            .len()
            > (64 * MIB + 10 * RECORD) as u64),
        "appender did not start"
    );
    let out = run_bounded(env.monoshot_cmd(&[]), Duration::from_secs(60));
    let rep_log = env.rep.join("app.log");
    let copied = fs::read(&rep_log).expect("replica app.log");
    match code(&out) {
        1 => {
            assert!(
                env.io_log().lines().any(|l| l.contains(" SKIP app.log")),
                "{}\n{}",
                text(&out),
                env.io_log()
            );
            let new: [u8; 32] = Sha256::digest(&copied).into();
            assert_eq!(new, old, "a skipped copy changed the replica file");
        }
        0 => {
            // A consistent snapshot: the source's content at some record boundary, exactly
            // what the io log says was copied.
            let len = copied.len();
            assert!(
                len >= 64 * MIB && (len - 64 * MIB).is_multiple_of(RECORD),
                "torn length {len}"
            );
            let src_now = fs::read(&log).expect("source");
            assert_eq!(
                &src_now[..len],
                &copied[..],
                "replica is not a prefix of the source"
            );
            let line = env
                .io_log()
                .lines()
                .rev()
                .find(|l| l.contains(" app.log "))
                .expect("io line")
                .to_string();
            let hex: String = Sha256::digest(&copied)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert!(line.contains(&format!("size={len} sha256={hex}")), "{line}");
        }
        c => panic!("unexpected exit {c}:\n{}", text(&out)),
    }
    assert_no_temps(&env.rep);
    assert_eq!(
        fs::read(env.rep.join("other.txt")).expect("other"),
        b"calm file"
    );

    let appended = appender.finish();
    assert!(
        appended > 10,
        "the appender barely ran ({appended} records)"
    );
    env.mirror_ok(&[]);
    assert_no_temps(&env.rep);
}

#[test]
fn replica_on_a_full_filesystem_fails_partially_and_keeps_earlier_files() {
    let env = Env::new();
    let _mount = Mount::tmpfs(&env.rep, "2m");
    for i in 0..8 {
        write(
            &env.src.join(format!("a{i}.bin")),
            &Rng::new(i).bytes(100 * 1024),
        );
    }
    env.mirror_ok(&[]);

    write_big(&env.src.join("z-big.bin"), 91, 4);
    write(&env.src.join("b-new.txt"), &Rng::new(99).bytes(20 * 1024));
    let out = env.monoshot(&[]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    let err = stderr(&out);
    assert!(err.contains("no space left on device"), "{err}");
    assert!(err.contains("z-big.bin"), "the error names no path:\n{err}");
    assert_eq!(last_pass(&env)["result"], "partial");
    assert_no_temps(&env.rep);
    assert!(
        !env.rep.join("z-big.bin").exists(),
        "a partial big file landed"
    );
    for i in 0..8 {
        let name = format!("a{i}.bin");
        assert_eq!(
            fs::read(env.rep.join(&name)).unwrap(),
            fs::read(env.src.join(&name)).unwrap(),
            "{name}"
        );
    }
    if env.rep.join("b-new.txt").exists() {
        assert_eq!(
            fs::read(env.rep.join("b-new.txt")).unwrap(),
            fs::read(env.src.join("b-new.txt")).unwrap()
        );
    }

    // Once the big file is gone from the source, the replica converges.
    fs::remove_file(env.src.join("z-big.bin")).expect("rm");
    env.mirror_ok(&[]);
}

#[test]
fn kill_9_during_a_large_copy_leaves_the_old_file_in_place() {
    let env = Env::new();
    let big = env.src.join("data/big.bin");
    write_big(&big, 101, 1);
    env.mirror_ok(&[]);
    let old = sha(&env.rep.join("data/big.bin"));

    write_big(&big, 102, 512);
    let mut child = ChildGuard::spawn({
        let mut c = env.monoshot_cmd(&["-q"]);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c
    });
    let rep_dir = env.rep.join("data");
    let t0 = Instant::now();
    while temps_in(&rep_dir).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no temp file appeared"
        );
        assert!(
            child.child().try_wait().expect("try_wait").is_none(),
            "monoshot ended before copying"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.child().kill().expect("SIGKILL");
    child.child().wait().expect("reap");
    assert!(
        !temps_in(&rep_dir).is_empty(),
        "killed before its temp file: no crash mid-copy"
    );
    assert_eq!(
        sha(&env.rep.join("data/big.bin")),
        old,
        "the final path holds a torn or new file"
    );

    env.mirror_ok(&[]);
    assert_no_temps(&env.rep);
}

// ---------------------------------------------------------------------------------------
// The replica lock

#[test]
fn monoshot_on_a_replica_held_by_a_daemon_exits_busy_naming_the_holder() {
    let env = Env::new();
    gen_tree(&env.src, 111, 20);
    let daemon = start_daemon(&env, "1h");
    let pid = daemon.pid().expect("daemon pid");
    let out = env.monoshot(&[]);
    assert_eq!(code(&out), 4, "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!("daemon pid {pid}")),
        "holder not named:\n{}",
        text(&out)
    );

    let stop = daemon.stop();
    assert_eq!(code(&stop), 0, "{}", text(&stop));
    env.mirror_ok(&[]);
}

#[test]
fn two_monoshots_on_one_replica_one_exits_busy() {
    // A holds the lock while it copies a large file; it is frozen (SIGSTOP) once its lock
    // file names it, so B is sure to meet the held lock. Bounded retries cover the unlikely
    // case of A finishing before it could be frozen.
    for attempt in 0..5 {
        let env = Env::new();
        write_big(&env.src.join("big.bin"), 121, 64);
        let mut a = ChildGuard::spawn({
            let mut c = env.monoshot_cmd(&["-q"]);
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            c
        });
        let a_pid = a.pid();
        let holder = format!("monoshot pid {a_pid} ");
        let lock_text = || -> String {
            fs::read_dir(env.state.join("locks"))
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok())
                .filter_map(|e| fs::read_to_string(e.path()).ok())
                .collect()
        };
        assert!(
            wait_for(Duration::from_secs(30), || lock_text().contains(&holder)),
            "A never took the lock"
        );
        kill(Pid::from_raw(a_pid as i32), Signal::SIGSTOP).expect("SIGSTOP");
        if a.child().try_wait().expect("try_wait").is_some() {
            eprintln!("attempt {attempt}: A finished before it was frozen; again");
            continue;
        }
        let b = run_bounded(env.monoshot_cmd(&[]), Duration::from_secs(30));
        kill(Pid::from_raw(a_pid as i32), Signal::SIGCONT).expect("SIGCONT");
        let a_out = a.wait(Duration::from_secs(60), "monoshot A");
        assert_eq!(code(&b), 4, "B:\n{}", text(&b));
        assert!(
            stderr(&b).contains(&holder),
            "holder not named:\n{}",
            text(&b)
        );
        assert_eq!(code(&a_out), 0, "A:\n{}", text(&a_out));
        assert_trees_equal(&env.src, &env.rep);
        return;
    }
    panic!("could not freeze the first monoshot while it held the lock in 5 attempts");
}

// ---------------------------------------------------------------------------------------
// Hostile symlinks

#[test]
fn replica_symlink_to_an_outside_directory_is_replaced_not_followed() {
    let env = Env::new();
    let outside = env.path("outside");
    write(&outside.join("secret.txt"), b"outside, keep me");
    write(&outside.join("inner/y.txt"), b"outside y");
    write(&env.src.join("d/secret.txt"), b"source version");
    write(&env.src.join("d/inner/y.txt"), b"source y");
    write(&env.src.join("d/new.txt"), b"only in source");
    fs::create_dir(&env.rep).expect("mkdir rep");
    symlink(&outside, env.rep.join("d")).expect("symlink");
    let before = snapshot(&outside);

    env.mirror_ok(&[]);
    assert_eq!(
        snapshot(&outside),
        before,
        "the outside directory was changed"
    );
    assert!(
        fs::symlink_metadata(env.rep.join("d")).unwrap().is_dir(),
        "replica d is not a real directory"
    );
}

#[test]
fn symlink_loops_in_the_source_are_mirrored_as_links() {
    let env = Env::new();
    symlink("b", env.src.join("a")).expect("symlink");
    symlink("a", env.src.join("b")).expect("symlink");
    write(&env.src.join("dir/file.txt"), b"x");
    symlink("..", env.src.join("dir/self")).expect("symlink");
    let out = run_bounded(env.monoshot_cmd(&[]), Duration::from_secs(30));
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_trees_equal(&env.src, &env.rep);
    assert_eq!(fs::read_link(env.rep.join("a")).unwrap(), Path::new("b"));
    assert_eq!(fs::read_link(env.rep.join("b")).unwrap(), Path::new("a"));
    assert_eq!(
        fs::read_link(env.rep.join("dir/self")).unwrap(),
        Path::new("..")
    );
    assert_eq!(
        snapshot(&env.rep).len(),
        6,
        "something was walked through a link"
    );
}

// ---------------------------------------------------------------------------------------
// A daemon under churn

#[test]
fn daemon_under_churn_never_exposes_a_torn_file_and_converges() {
    let env = Env::new();
    fs::create_dir(&env.rep).expect("mkdir rep");
    let _daemon = start_daemon(&env, "1s");
    let (churner, reader) = churn_and_read(&env.src, &env.rep, 20, 1);
    let r = reader.wait(Duration::from_secs(60), "churn --reader");
    let c = churner.wait(Duration::from_secs(60), "churn --root");
    assert_eq!(code(&c), 0, "churn:\n{}", text(&c));
    assert_eq!(
        code(&r),
        0,
        "the reader saw a torn replica file:\n{}",
        text(&r)
    );
    // The reader really read replica files while the daemon was mirroring the churn.
    let reads = reads_checked(&r);
    assert!(
        reads > 100,
        "the reader found almost nothing to read: {reads}"
    );
    let passes = env.schedule_log().matches("PASS END").count();
    assert!(
        passes >= 5,
        "only {passes} passes during the churn:\n{}",
        env.schedule_log()
    );

    assert!(
        wait_for(Duration::from_secs(30), || rsync_quiet(&env.src, &env.rep)
            && temps_in_tree(&env.rep) == 0),
        "the replica did not converge after churn stopped:\n{}",
        env.schedule_log()
    );
    assert_trees_equal(&env.src, &env.rep);
    assert!(
        wait_for(Duration::from_secs(10), || last_pass(&env)["result"]
            == "ok"),
        "no clean pass after the churn: {}",
        last_pass(&env)
    );
    let v = run_bounded(
        {
            let mut c = churn();
            c.arg("--verify").arg(&env.rep);
            c
        },
        Duration::from_secs(60),
    );
    assert_eq!(code(&v), 0, "{}", text(&v));
}

#[test]
fn read_only_replica_fails_partially_names_the_cause_and_changes_nothing() {
    let env = Env::new();
    let _mount = Mount::tmpfs(&env.rep, "8m");
    write(&env.src.join("keep.txt"), b"first version");
    write(&env.src.join("dir/inner.txt"), b"inner");
    env.mirror_ok(&[]);
    let before = snapshot(&env.rep);

    write(&env.src.join("keep.txt"), b"second version!");
    write(&env.src.join("new.txt"), b"new");
    let st = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&env.rep)
        .status()
        .expect("remount");
    assert!(st.success(), "remount read-only failed");
    let out = env.monoshot(&[]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("read-only file system"),
        "cause not named:\n{err}"
    );
    assert!(
        err.contains("'keep.txt'") && err.contains("'new.txt'"),
        "paths not named:\n{err}"
    );
    assert_eq!(
        snapshot(&env.rep),
        before,
        "a read-only replica must be left as it was"
    );

    let st = Command::new("mount")
        .args(["-o", "remount,rw"])
        .arg(&env.rep)
        .status()
        .expect("remount");
    assert!(st.success());
    env.mirror_ok(&[]);
    assert_no_temps(&env.rep);
}

#[test]
fn sigint_during_a_monoshot_copy_stops_cleanly_with_exit_1() {
    let env = Env::new();
    write(&env.src.join("small.txt"), b"small");
    write_big(&env.src.join("big.bin"), 17, 384);
    let mut child = env
        .monoshot_cmd(&[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn monoshot");
    let temp_seen = wait_for(Duration::from_secs(30), || {
        fs::read_dir(&env.rep).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".syncer-"))
        })
    });
    assert!(temp_seen, "the copy of big.bin never started");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).expect("SIGINT");
    let status = child.wait().expect("wait");
    // Either the copy was abandoned (interrupted, exit 1) or it had just finished (exit 0).
    let code = status.code().unwrap_or(-1);
    assert!(code == 1 || code == 0, "unexpected exit {status:?}");
    assert_no_temps(&env.rep);
    let rep_big = env.rep.join("big.bin");
    if rep_big.exists() {
        assert_eq!(
            sha(&rep_big),
            sha(&env.src.join("big.bin")),
            "torn big.bin in the replica"
        );
    }
    if code == 1 {
        assert!(
            env.schedule_log().contains("PASS END interrupted"),
            "{}",
            env.schedule_log()
        );
    }
    env.mirror_ok(&[]);
}

#[test]
fn backups_of_two_quick_passes_never_overwrite_each_other() {
    let env = Env::new();
    let bk = env.path("bk");
    let bk_arg = bk.to_str().expect("utf-8 path").to_string();
    write(&env.src.join("f.txt"), b"version one");
    env.mirror_ok(&[]);
    write(&env.src.join("f.txt"), b"version two!");
    env.mirror_ok(&["--backup-dir", &bk_arg]);
    fs::remove_file(env.src.join("f.txt")).expect("rm");
    env.mirror_ok(&["--backup-dir", &bk_arg]);
    let mut kept: Vec<Vec<u8>> = walkdir::WalkDir::new(&bk)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| fs::read(e.path()).expect("read backup"))
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        vec![b"version one".to_vec(), b"version two!".to_vec()]
    );
}

#[test]
fn refused_pass_leaves_even_leftover_temp_files_alone() {
    let env = Env::new();
    for i in 0..120 {
        write(&env.src.join(format!("f{i}.txt")), b"data");
    }
    env.mirror_ok(&[]);
    write(&env.rep.join(".syncer-leftover.tmp"), b"partial");
    let before = snapshot(&env.rep);
    fs::rename(&env.src, env.path("moved-away")).expect("move source");
    fs::create_dir(&env.src).expect("empty source");
    let out = env.monoshot(&[]);
    assert_eq!(code(&out), 3, "{}", text(&out));
    assert_eq!(
        snapshot(&env.rep),
        before,
        "a refused pass must change nothing"
    );
}

#[test]
fn replica_lock_holds_across_state_directories() {
    let env = Env::new();
    write(&env.src.join("a.txt"), b"a");
    env.mirror_ok(&[]);
    let _daemon = start_daemon(&env, "1h");
    let other_state = env.path("other-state");
    let out = syncer()
        .arg("monoshot")
        .arg("--source")
        .arg(&env.src)
        .arg("--replica")
        .arg(&env.rep)
        .arg("--state-dir")
        .arg(&other_state)
        .output()
        .expect("run");
    assert_eq!(code(&out), 4, "{}", text(&out));
    assert!(stderr(&out).contains("busy"), "{}", text(&out));
}

#[test]
fn permission_denied_in_the_replica_fails_per_entry_and_mirrors_the_rest() {
    let env = Env::new();
    write(&env.src.join("open/a.txt"), b"a");
    write(&env.src.join("locked/b.txt"), b"b");
    env.mirror_ok(&[]);
    write(&env.src.join("open/new.txt"), b"new");
    write(&env.src.join("locked/new.txt"), b"blocked");
    give_to_nobody(env.tmp.path());
    // The replica's `locked` directory belongs to root: nobody cannot write into it.
    let st = Command::new("chown")
        .arg("0:0")
        .arg(env.rep.join("locked"))
        .status()
        .expect("chown");
    assert!(st.success());
    let out = unprivileged(&env.monoshot_cmd(&[])).output().expect("run");
    assert_eq!(code(&out), 1, "{}", text(&out));
    let err = stderr(&out);
    assert!(err.contains("permission denied"), "cause not named:\n{err}");
    assert!(err.contains("'locked/new.txt'"), "path not named:\n{err}");
    assert_eq!(
        fs::read(env.rep.join("open/new.txt")).expect("mirrored"),
        b"new"
    );
    assert_eq!(fs::read(env.rep.join("locked/b.txt")).expect("kept"), b"b");
    assert!(!env.rep.join("locked/new.txt").exists());
    assert_no_temps(&env.rep);
}
