//! A job's state (issue 23): it belongs to one source/replica pair, and a run that names
//! another pair under the same job is refused before it touches anything; `forget` frees a
//! stopped job's name; the state directory is private (0700, files 0600); a dry run reads
//! the cache, writes nothing and counts what it would do, even beside the job's daemon.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

/// Stops every daemon of a state directory when dropped, so a failing test leaves none.
struct StopAll<'a>(&'a Path);

impl Drop for StopAll<'_> {
    fn drop(&mut self) {
        let _ = syncer()
            .args(["stop", "--all", "--state-dir"])
            .arg(self.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Asserts two `snapshot`s (names, kinds, content hashes, modes, mtimes) are equal.
fn assert_snapshots_equal(a: &BTreeMap<PathBuf, Snap>, b: &BTreeMap<PathBuf, Snap>, what: &str) {
    let keys: std::collections::BTreeSet<&PathBuf> = a.keys().chain(b.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{}:\n  {:?}\n  {:?}", k.display(), a.get(k), b.get(k)))
        .collect();
    assert!(diffs.is_empty(), "{what}:\n{}", diffs.join("\n"));
}

/// Polls until the job's status file records a finished pass.
fn wait_status_pass(env: &Env, name: &str) {
    let path = env.state.join(format!("{name}.status.json"));
    let done = wait_for(Duration::from_secs(20), || {
        fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["last_pass"].is_object())
    });
    assert!(done, "no pass recorded in '{}'", path.display());
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .expect("lstat")
        .permissions()
        .mode()
        & 0o7777
}

/// Every directory and file under `dir` (itself included) with its mode, sorted.
fn modes_below(dir: &Path) -> Vec<(String, u32)> {
    walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .map(|e| e.expect("walk"))
        .map(|e| (e.path().display().to_string(), mode(e.path())))
        .collect()
}

#[test]
fn the_state_directory_is_created_0700_and_its_files_0600() {
    let env = Env::new();
    gen_tree(&env.src, 2301, 20);
    env.mirror_ok(&[]);
    let _stop = StopAll(&env.state);
    let out = env
        .command("start")
        .args(["--interval", "1h", "--name", "daemon"])
        .output()
        .expect("start");
    assert_eq!(code(&out), 0, "{}", text(&out));
    wait_status_pass(&env, "daemon");
    let all = modes_below(&env.state);
    for file in [
        "default.cache.redb",
        "default.status.json",
        "default.io.log",
        "default.schedule.log",
        "daemon.pid",
        "daemon.start",
        "daemon.daemon.log",
        "daemon.cache.redb",
    ] {
        assert!(
            all.iter().any(|(p, _)| p.ends_with(file)),
            "no {file} in {all:#?}"
        );
    }
    for (path, m) in &all {
        let want = if Path::new(path).is_dir() {
            0o700
        } else {
            0o600
        };
        assert_eq!(*m, want, "{path} is {m:o} in {all:#?}");
    }
}

#[test]
fn an_existing_state_directory_keeps_its_modes_and_still_works() {
    let env = Env::new();
    write(&env.src.join("f"), b"f");
    fs::create_dir(&env.state).expect("mkdir");
    chmod(&env.state, 0o755);
    write(&env.state.join("default.io.log"), b"");
    chmod(&env.state.join("default.io.log"), 0o644);
    env.mirror_ok(&[]);
    assert_eq!(mode(&env.state), 0o755);
    assert_eq!(mode(&env.state.join("default.io.log")), 0o644);
    assert!(env.io_log().contains("CREATE f"), "{}", env.io_log());
    // What syncer creates there now is private all the same.
    assert_eq!(mode(&env.state.join("default.cache.redb")), 0o600);
    assert_eq!(mode(&env.state.join("default.schedule.log")), 0o600);
}

/// `(files, bytes)` of the `hashed F files / B bytes` field of a `PASS END` line.
pub fn hashed(line: &str) -> (u64, u64) {
    let rest = line
        .split("hashed ")
        .nth(1)
        .unwrap_or_else(|| panic!("no 'hashed' field in: {line}"));
    let w: Vec<&str> = rest.split_whitespace().collect();
    assert_eq!(
        (w[1], w[2], w[4]),
        ("files", "/", "bytes,"),
        "odd line: {line}"
    );
    (w[0].parse().expect("files"), w[3].parse().expect("bytes"))
}

/// `syncer SUB --source S --replica R --state-dir T ARGS` for another pair.
fn run_pair(env: &Env, sub: &str, src: &Path, rep: &Path, args: &[&str]) -> std::process::Output {
    let mut c = syncer();
    c.arg(sub)
        .arg("--source")
        .arg(src)
        .arg("--replica")
        .arg(rep)
        .arg("--state-dir")
        .arg(&env.state)
        .args(args);
    run_bounded(c, Duration::from_secs(60))
}

fn forget(env: &Env, args: &[&str]) -> std::process::Output {
    syncer()
        .arg("forget")
        .arg("--state-dir")
        .arg(&env.state)
        .args(args)
        .output()
        .expect("forget")
}

#[test]
fn another_pair_under_a_job_name_is_refused_and_the_job_keeps_its_cache() {
    let env = Env::new();
    gen_tree(&env.src, 2302, 60);
    let_source_age_past_racy_window(&env.src);
    env.mirror_ok(&[]);
    let state_before = snapshot(&env.state);
    let src = fs::canonicalize(&env.src).expect("canonical");
    let rep = fs::canonicalize(&env.rep).expect("canonical");
    let other = env.path("other");
    fs::create_dir(env.path("src2")).expect("mkdir");
    let cases = [
        ("monoshot", env.src.clone(), other.clone(), vec![]),
        ("monoshot", env.src.clone(), other.clone(), vec!["-q"]),
        ("monoshot", env.path("src2"), env.rep.clone(), vec![]),
        (
            "monoshot",
            env.src.clone(),
            other.clone(),
            vec!["--dry-run"],
        ),
        (
            "start",
            env.src.clone(),
            other.clone(),
            vec!["--interval", "1h"],
        ),
        (
            "start",
            env.src.clone(),
            other.clone(),
            vec!["--interval", "1h", "--foreground"],
        ),
    ];
    for (sub, s, r, args) in cases {
        let out = run_pair(&env, sub, &s, &r, &args);
        assert_eq!(code(&out), 2, "{sub} {args:?}:\n{}", text(&out));
        let want = format!(
            "syncer: job 'default' mirrors '{}' -> '{}'; use --name to start another job, or 'syncer forget --name default --state-dir {}'",
            src.display(),
            rep.display(),
            env.state.display()
        );
        assert_eq!(stderr(&out).trim_end(), want, "{sub} {args:?}");
        assert!(out.stdout.is_empty(), "{sub} {args:?}:\n{}", text(&out));
        assert!(!other.exists(), "{sub} {args:?} made the other replica");
        assert_snapshots_equal(
            &state_before,
            &snapshot(&env.state),
            &format!("{sub} {args:?} touched the state directory"),
        );
    }
    // The job's own next pass trusts its cache as before.
    env.mirror_ok(&[]);
    assert_eq!(
        hashed(&last_pass_end(&env)),
        (0, 0),
        "{}",
        last_pass_end(&env)
    );
}

#[test]
fn forget_frees_a_stopped_jobs_name_for_another_pair() {
    let env = Env::new();
    gen_tree(&env.src, 2303, 40);
    env.mirror_ok(&[]);
    let other = env.path("other");
    assert_eq!(code(&run_pair(&env, "monoshot", &env.src, &other, &[])), 2);

    let out = forget(&env, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.starts_with("forgot job 'default' ("), "{said}");
    for gone in ["default.cache.redb", "default.status.json"] {
        assert!(!env.state.join(gone).exists(), "{gone} is still there");
        assert!(said.contains(gone), "{said}");
    }
    // Logs are history: kept, and said so.
    assert!(env.state.join("default.io.log").exists());
    assert!(said.contains("kept log"), "{said}");

    let out = run_pair(&env, "monoshot", &env.src, &other, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_trees_equal(&env.src, &other);
    let st: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(env.state.join("default.status.json")).expect("status"),
    )
    .expect("json");
    assert_eq!(st["replica"], other.display().to_string());
    // From now on the old pair is the other one.
    let out = env.monoshot(&[]);
    assert_eq!(code(&out), 2, "{}", text(&out));

    let out = forget(&env, &["--logs"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let left: Vec<_> = fs::read_dir(&env.state)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("locks")], "{left:?}");
    let out = forget(&env, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("job 'default' has no state in"),
        "{}",
        text(&out)
    );
}

#[test]
fn forget_refuses_a_running_job_and_so_does_a_run_with_another_pair() {
    let env = Env::new();
    gen_tree(&env.src, 2304, 20);
    let _stop = StopAll(&env.state);
    let out = env
        .command("start")
        .args(["--interval", "1h"])
        .output()
        .expect("start");
    assert_eq!(code(&out), 0, "{}", text(&out));
    wait_status_pass(&env, "default");
    let state_before = snapshot(&env.state);

    let out = forget(&env, &[]);
    assert_eq!(code(&out), 4, "{}", text(&out));
    assert!(
        stderr(&out).contains("job 'default' is running (pid "),
        "{}",
        text(&out)
    );
    // The daemon holds its cache: the pair comes from the status it wrote when it started.
    let out = run_pair(&env, "monoshot", &env.src, &env.path("other"), &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(
        stderr(&out).contains("job 'default' mirrors"),
        "{}",
        text(&out)
    );
    assert_snapshots_equal(&state_before, &snapshot(&env.state), "state touched");

    let out = syncer()
        .args(["stop", "--state-dir"])
        .arg(&env.state)
        .output()
        .expect("stop");
    assert_eq!(code(&out), 0, "{}", text(&out));
    let out = forget(&env, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(!env.state.join("default.cache.redb").exists());
    assert!(!env.state.join("default.pid").exists());
}

#[test]
fn a_run_that_fails_its_root_checks_touches_no_state_file() {
    let env = Env::new();
    gen_tree(&env.src, 2305, 20);
    env.mirror_ok(&["--name", "other"]);
    let ro = env.path("ro");
    let _mount = Mount::with(&ro, &["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"]);
    let state_before = snapshot(&env.state);
    // A new job whose replica cannot be created (on a read-only filesystem), or is inside
    // its source, or whose source is missing: refused, and nothing is created or changed in
    // the state directory (no cache, log, status or lock).
    let cases = [
        (env.src.clone(), ro.join("rep"), "could not create replica"),
        (env.src.clone(), env.src.join("rep"), "is inside source"),
        (env.path("gone"), env.rep.clone(), "does not exist"),
    ];
    for (src, rep, why) in cases {
        let mut c = syncer();
        c.arg("monoshot")
            .arg("--source")
            .arg(&src)
            .arg("--replica")
            .arg(&rep)
            .arg("--state-dir")
            .arg(&env.state);
        let out = run_bounded(c, Duration::from_secs(60));
        assert_eq!(code(&out), 2, "{}", text(&out));
        assert!(stderr(&out).contains(why), "{why}: {}", text(&out));
        assert_snapshots_equal(
            &state_before,
            &snapshot(&env.state),
            &format!("a run refused with '{why}' touched the state directory"),
        );
    }
}

/// The `PASS END` line a dry run printed.
fn dry_end(out: &std::process::Output) -> String {
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    said.lines()
        .find(|l| l.contains("PASS END ok (dry run)"))
        .unwrap_or_else(|| panic!("no dry-run PASS END in:\n{}", text(out)))
        .to_string()
}

#[test]
fn an_idle_dry_run_hashes_nothing_writes_nothing_and_works_beside_the_daemon() {
    let env = Env::new();
    // A dry run of a job that never ran makes no state directory.
    gen_tree(&env.src, 2306, 60);
    let out = env.monoshot(&["--dry-run"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(!env.state.exists(), "a dry run made the state directory");

    let_source_age_past_racy_window(&env.src);
    env.mirror_ok(&[]);
    let state = snapshot(&env.state);
    let out = env.monoshot(&["--dry-run"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let end = dry_end(&out);
    assert_eq!(hashed(&end), (0, 0), "{end}");
    assert!(
        end.contains("would create 0, update 0, drift 0, delete 0, move 0,"),
        "{end}"
    );
    assert_snapshots_equal(&state, &snapshot(&env.state), "an idle dry run wrote state");

    // What it would do is counted: two files created, one updated, one deleted, one moved.
    write(&env.src.join("new-1"), b"one");
    write(&env.src.join("new-2"), b"two");
    let f = walkdir::WalkDir::new(&env.src)
        .sort_by_file_name()
        .into_iter()
        .map(|e| e.expect("walk"))
        .filter(|e| e.file_type().is_file() && e.metadata().expect("stat").len() > 10)
        .map(|e| e.path().to_path_buf())
        .collect::<Vec<_>>();
    let mut grown = fs::read(&f[0]).expect("read");
    grown.push(b'!');
    fs::write(&f[0], grown).expect("write");
    fs::remove_file(&f[1]).expect("rm");
    fs::rename(&f[2], env.src.join("moved-here")).expect("mv");
    let replica = snapshot(&env.rep);
    let out = env.monoshot(&["--dry-run"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let end = dry_end(&out);
    assert!(
        end.contains("would create 2, update 1, drift 0, delete 1, move 1,"),
        "{end}"
    );
    assert_snapshots_equal(&state, &snapshot(&env.state), "a dry run wrote state");
    assert_snapshots_equal(
        &replica,
        &snapshot(&env.rep),
        "a dry run changed the replica",
    );
    // A real pass does what the dry run said.
    let out = env.mirror_ok(&[]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains("created 2, updated 1, drift 0, deleted 1, moved 1,"),
        "{said}"
    );

    // Beside the job's daemon, which holds the replica and the cache: it works, says it
    // may be out of date, still hashes nothing, and writes nothing.
    let _stop = StopAll(&env.state);
    let_source_age_past_racy_window(&env.src);
    let out = env
        .command("start")
        .args(["--interval", "1h"])
        .output()
        .expect("start");
    assert_eq!(code(&out), 0, "{}", text(&out));
    // Only a daemon's status names a next pass, written once its pass has ended.
    let passed = wait_for(Duration::from_secs(20), || {
        let st = fs::read_to_string(env.state.join("default.status.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&st).unwrap_or_default();
        v["next_pass"].is_string()
    });
    assert!(
        passed,
        "the daemon did not record a pass:\n{}\n{}",
        fs::read_to_string(env.state.join("default.status.json")).unwrap_or_default(),
        env.schedule_log()
    );
    let state = snapshot(&env.state);
    let out = env.monoshot(&["--dry-run"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        stderr(&out).contains("is in use by another pass (daemon pid")
            && stderr(&out).contains("this dry run may be out of date"),
        "{}",
        text(&out)
    );
    assert_eq!(hashed(&dry_end(&out)), (0, 0), "{}", dry_end(&out));
    assert_snapshots_equal(
        &state,
        &snapshot(&env.state),
        "a dry run beside the daemon wrote state",
    );
}
