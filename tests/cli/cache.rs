//! The hash cache (issue 4): an idle pass reads no file content, yet no change slips through
//! it (same-size same-mtime edits, replica drift), and a corrupt database is never trusted:
//! it is rebuilt by hashing, with a warning. A cache of another source/replica pair is never
//! trusted either: the run is refused (issue 23), and once the job is forgotten the new pair
//! starts from nothing.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::common::*;

/// `(files, bytes)` from the `hashed F files / B bytes` field of the last `PASS END` line.
fn hashed_in_log(env: &Env) -> (u64, u64) {
    let line = last_pass_end(env);
    let rest = line
        .split("hashed ")
        .nth(1)
        .unwrap_or_else(|| panic!("no 'hashed' field in: {line}"));
    let words: Vec<&str> = rest.split_whitespace().collect();
    // "F files / B bytes, ..."
    assert_eq!(
        (words[1], words[2], words[4]),
        ("files", "/", "bytes,"),
        "odd line: {line}"
    );
    (
        words[0].parse().expect("files"),
        words[3].parse().expect("bytes"),
    )
}

/// `last_pass` of the job's status file.
fn last_pass(env: &Env) -> serde_json::Value {
    let text = fs::read_to_string(env.state.join("default.status.json")).expect("status file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("status json");
    v["last_pass"].clone()
}

fn regular_files(root: &Path) -> u64 {
    snapshot(root).values().filter(|s| s.kind == "file").count() as u64
}

/// Rewrites `path` with different content of the same length and puts its mtime back, so
/// size and mtime (what rsync's quick check looks at) are unchanged.
fn same_size_same_mtime_edit(path: &Path) {
    let m = fs::symlink_metadata(path).expect("lstat");
    let old = fs::read(path).expect("read");
    assert!(!old.is_empty(), "edit needs a non-empty file");
    let new: Vec<u8> = old.iter().map(|b| b ^ 0x5a).collect();
    fs::write(path, &new).expect("rewrite");
    use std::os::unix::fs::MetadataExt;
    set_mtime(path, m.mtime(), m.mtime_nsec() as u32);
}

#[test]
fn second_pass_over_unchanged_tree_hashes_no_file() {
    let env = Env::new();
    gen_tree(&env.src, 41, 200);
    let_source_age_past_racy_window(&env.src);
    env.mirror_ok(&[]);
    env.mirror_ok(&[]);
    assert_eq!(hashed_in_log(&env), (0, 0), "{}", last_pass_end(&env));
    assert_eq!(last_pass(&env)["hashed_files"], 0);
    assert_eq!(last_pass(&env)["hashed_bytes"], 0);
    assert_eq!(last_pass(&env)["result"], "ok");
}

/// A tree that has not changed since before the first pass, then a second pass ~100 ms after
/// the first ended (a script running two passes, a daemon at a short interval): the second
/// reads no file content. The scratch filesystem is checked when it keeps fine timestamps
/// (ext4 here), and a tmpfs in any case.
#[test]
fn back_to_back_passes_over_an_unchanged_tree_read_nothing_the_second_time() {
    let back_to_back = |env: &Env, what: &str| {
        gen_tree(&env.src, 47, 120);
        // Settled: older than the narrow racy window (50 ms) when the first pass starts,
        // well within the wide one (3 s).
        std::thread::sleep(Duration::from_millis(200));
        env.mirror_ok(&[]);
        std::thread::sleep(Duration::from_millis(100));
        env.mirror_ok(&[]);
        assert_eq!(hashed_in_log(env), (0, 0), "{what}: {}", last_pass_end(env));
        assert_eq!(last_pass(env)["hashed_bytes"], 0, "{what}");
    };
    let env = Env::new();
    if fine_timestamps(&env.src) {
        back_to_back(&env, "scratch filesystem");
    } else {
        eprintln!("the scratch filesystem is not ext4, xfs, btrfs or tmpfs: tmpfs only");
    }
    let env = Env::new();
    let _tmpfs = Mount::tmpfs(&env.src, "64m");
    back_to_back(&env, "tmpfs");
}

/// Files on a filesystem not known to keep fine timestamps keep the 3 s racy window, and so
/// are re-hashed by a pass 100 ms after the one that first read them: here a ramfs mounted
/// inside a tmpfs source (another device, of a type not vouched for).
#[test]
fn a_filesystem_of_unknown_timestamps_keeps_the_wide_racy_window() {
    let env = Env::new();
    let _tmpfs = Mount::tmpfs(&env.src, "16m");
    write(&env.src.join("on-tmpfs/a.txt"), b"fine timestamps");
    write(&env.src.join("on-tmpfs/b.txt"), b"fine timestamps too");
    let _ramfs = Mount::with(&env.src.join("ram"), &["-t", "ramfs", "ramfs"]);
    for i in 0..3 {
        write(
            &env.src.join(format!("ram/r{i}.txt")),
            b"unknown timestamps",
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    env.mirror_ok(&[]);
    std::thread::sleep(Duration::from_millis(100));
    env.mirror_ok(&[]);
    assert_eq!(
        hashed_in_log(&env).0,
        3,
        "only the ramfs files are racy: {}",
        last_pass_end(&env)
    );
}

/// The case the racy window exists for, made real: an ext4 whose 128-byte inodes keep whole
/// seconds (`statfs` says ext4, its ctimes say otherwise). A file is mirrored, then rewritten
/// with the same size and its mtime put back within the same second, so its stat token does
/// not change at all. The next pass must still copy it.
#[test]
fn a_same_size_edit_within_the_same_timestamp_tick_is_caught() {
    let env = Env::new();
    let _ext4 = Mount::ext4_image(&env.path("ext4-128.img"), "8M", &["-I", "128"], &env.src);
    assert!(fine_timestamps(&env.src), "statfs should say ext4");
    let f = env.src.join("same.txt");
    let ctime = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let m = fs::symlink_metadata(p).expect("lstat");
        (m.ctime(), m.ctime_nsec(), m.ino())
    };
    let now_subsec = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .subsec_millis()
    };
    // Each try starts 300 ms into a second: the write, the pass and the rewrite fall within
    // that second (a try that straddles two is run again), and the pass starts well after
    // the whole-second ctime, out of reach of the 50 ms window that finer timestamps get.
    for round in 0..5u8 {
        assert!(wait_for(Duration::from_secs(2), || (300..400)
            .contains(&now_subsec())));
        let before = format!("round {round}: AAAAAAAAAAAAAAAA");
        let after = format!("round {round}: BBBBBBBBBBBBBBBB");
        write(&f, before.as_bytes());
        set_mtime(&f, 1_600_000_000, 0);
        let token = ctime(&f);
        env.mirror_ok(&[]);
        write(&f, after.as_bytes());
        set_mtime(&f, 1_600_000_000, 0);
        if ctime(&f) != token {
            continue;
        }
        assert_eq!(token.1, 0, "128-byte inodes keep whole seconds");
        env.mirror_ok(&[]);
        assert_eq!(
            fs::read(env.rep.join("same.txt")).expect("read"),
            after.as_bytes(),
            "an edit that left the stat token unchanged was missed"
        );
        return;
    }
    panic!("no try kept the rewrite within the same second as the pass");
}

#[test]
fn same_size_same_mtime_edit_is_copied_despite_the_cache() {
    let env = Env::new();
    gen_tree(&env.src, 42, 60);
    write(&env.src.join("docs/report.txt"), b"quarterly numbers: 1234");
    set_mtime(&env.src.join("docs/report.txt"), 1_600_000_000, 5);
    let_source_age_past_racy_window(&env.src);
    env.mirror_ok(&[]);

    same_size_same_mtime_edit(&env.src.join("docs/report.txt"));
    env.mirror_ok(&[]);
    assert!(
        env.io_log()
            .lines()
            .any(|l| l.contains(" UPDATE docs/report.txt ")),
        "no UPDATE line:\n{}",
        env.io_log()
    );
    assert_eq!(last_pass(&env)["updated"], 1);
    // Only the edited source file was read: its replica twin's hash came from the cache.
    assert_eq!(hashed_in_log(&env).0, 1, "{}", last_pass_end(&env));
}

#[test]
fn corrupt_cache_database_is_rebuilt_with_a_warning() {
    let env = Env::new();
    gen_tree(&env.src, 43, 80);
    write(&env.src.join("docs/a.txt"), b"0123456789");
    let_source_age_past_racy_window(&env.src);
    env.mirror_ok(&[]);
    let db = env.state.join("default.cache.redb");
    assert!(db.is_file(), "no cache database at {}", db.display());
    let mut rng = Rng::new(7);
    let len = fs::metadata(&db).expect("db").len().max(4096) as usize;
    fs::write(&db, rng.bytes(len)).expect("corrupt db");
    // Meanwhile the replica drifts (same size and mtime): without a usable cache the pass
    // must still find it by hashing.
    same_size_same_mtime_edit(&env.rep.join("docs/a.txt"));

    let out = env.mirror_ok(&[]);
    let err = stderr(&out);
    assert!(
        err.to_lowercase().contains("cache"),
        "no warning about the cache:\n{}",
        text(&out)
    );
    assert!(
        err.contains("default.cache.redb"),
        "warning does not name the database:\n{err}"
    );

    // The database was rebuilt: the next pass trusts it again.
    env.mirror_ok(&[]);
    assert_eq!(hashed_in_log(&env), (0, 0), "{}", last_pass_end(&env));
}

#[test]
fn cache_of_another_source_and_replica_is_refused_then_forgotten_never_trusted() {
    let env = Env::new();
    gen_tree(&env.src, 44, 80);
    write(&env.src.join("docs/b.txt"), b"bee bee bee");
    let_source_age_past_racy_window(&env.src);
    env.mirror_ok(&[]);
    let files = regular_files(&env.src);

    // Same job name and state directory, but another source and replica. Renaming keeps
    // every file's stat token, so a cache that trusted its records would hash nothing.
    let src2 = env.path("src2");
    let rep2 = env.path("rep2");
    fs::rename(&env.src, &src2).expect("mv src");
    fs::rename(&env.rep, &rep2).expect("mv rep");
    same_size_same_mtime_edit(&rep2.join("docs/b.txt"));
    let run = || {
        syncer()
            .arg("monoshot")
            .arg("--source")
            .arg(&src2)
            .arg("--replica")
            .arg(&rep2)
            .arg("--state-dir")
            .arg(&env.state)
            .output()
            .expect("run")
    };
    let out = run();
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(
        stderr(&out).contains("job 'default' mirrors"),
        "no refusal:\n{}",
        text(&out)
    );
    let out = syncer()
        .args(["forget", "--state-dir"])
        .arg(&env.state)
        .output()
        .expect("forget");
    assert_eq!(code(&out), 0, "{}", text(&out));
    let out = run();
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_trees_equal(&src2, &rep2);
    assert_eq!(hashed_in_log(&env).0, 2 * files, "{}", last_pass_end(&env));
}

#[test]
fn replica_drift_is_restored_and_logged() {
    let env = Env::new();
    gen_tree(&env.src, 45, 60);
    write(&env.src.join("etc/config.ini"), b"[core]\nmode = safe\n");
    let_source_age_past_racy_window(&env.src);
    env.mirror_ok(&[]);

    // Someone edits the replica behind syncer's back, keeping size and mtime.
    same_size_same_mtime_edit(&env.rep.join("etc/config.ini"));
    assert_ne!(
        fs::read(env.rep.join("etc/config.ini")).unwrap(),
        fs::read(env.src.join("etc/config.ini")).unwrap()
    );
    env.mirror_ok(&[]);
    assert!(
        env.io_log()
            .lines()
            .any(|l| l.contains(" DRIFT etc/config.ini ")),
        "no DRIFT line:\n{}",
        env.io_log()
    );
    assert_eq!(last_pass(&env)["drifted"], 1);
    assert_eq!(last_pass(&env)["updated"], 0);
    assert!(
        last_pass_end(&env).contains("drift 1,"),
        "{}",
        last_pass_end(&env)
    );
}

#[test]
fn checksum_rehashes_every_file_on_both_sides() {
    let env = Env::new();
    gen_tree(&env.src, 46, 100);
    let_source_age_past_racy_window(&env.src);
    env.mirror_ok(&[]);
    let files = regular_files(&env.src);
    let bytes: u64 = walkdir::WalkDir::new(&env.src)
        .into_iter()
        .map(|e| e.expect("walk"))
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().expect("stat").len())
        .sum();

    env.mirror_ok(&["--checksum"]);
    assert_eq!(
        hashed_in_log(&env),
        (2 * files, 2 * bytes),
        "{}",
        last_pass_end(&env)
    );
    assert_eq!(last_pass(&env)["hashed_files"], 2 * files);

    // Without --checksum the cache is trusted again.
    env.mirror_ok(&[]);
    assert_eq!(hashed_in_log(&env), (0, 0), "{}", last_pass_end(&env));
}
