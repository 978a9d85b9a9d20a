//! Issue 2: the mirror engine and `monoshot`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::common::*;

/// The io-log lines as (ACTION, rest-after-the-action) pairs, timestamps dropped.
fn io_actions(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(' ')?;
            let (word, rest) = rest.split_once(' ')?;
            Some((word.to_string(), rest.to_string()))
        })
        .collect()
}

/// True when the log has an `ACTION path` line (exactly that path, details allowed after).
fn has_action(log: &str, action: &str, path: &str) -> bool {
    io_actions(log)
        .iter()
        .any(|(w, rest)| w == action && (rest == path || rest.starts_with(&format!("{path} "))))
}

/// The part of the io log written since `before` (the log's earlier content).
fn new_lines(env: &Env, before: &str) -> String {
    let now = env.io_log();
    assert!(
        now.starts_with(before),
        "the io log was rewritten, not appended to"
    );
    now[before.len()..].to_string()
}

/// A snapshot with every entry at or below one of `skip` (relative paths) left out.
fn snapshot_without(root: &Path, skip: &[&Path]) -> BTreeMap<PathBuf, Snap> {
    let mut s = snapshot(root);
    s.retain(|k, _| !skip.iter().any(|p| k.starts_with(p)));
    s
}

fn assert_snapshots_equal(a: &BTreeMap<PathBuf, Snap>, b: &BTreeMap<PathBuf, Snap>, what: &str) {
    let mut diffs = Vec::new();
    for (k, va) in a {
        match b.get(k) {
            None => diffs.push(format!("only in the first: {}", k.display())),
            Some(vb) if va != vb => {
                diffs.push(format!("differs: {}\n  {va:?}\n  {vb:?}", k.display()))
            }
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        diffs.push(format!("only in the second: {}", k.display()));
    }
    assert!(diffs.is_empty(), "{what}:\n{}", diffs.join("\n"));
}

/// Polls until the wall clock is more than `margin` past the newest ctime under `root`, so
/// the hash cache of the next pass may trust those files (it distrusts racy ctimes).
fn wait_until_not_racy(root: &Path, margin: Duration) {
    let newest = walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter_map(|e| fs::symlink_metadata(e.path()).ok())
        .map(|m| m.ctime() as f64 + m.ctime_nsec() as f64 / 1e9)
        .fold(0.0, f64::max);
    let ok = wait_for(Duration::from_secs(5), || {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        now > newest + margin.as_secs_f64()
    });
    assert!(ok, "the clock did not advance past the source's ctimes");
}

fn sha256_hex(path: &Path) -> String {
    Sha256::digest(fs::read(path).expect("read"))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn mirrors_a_mixed_tree_exactly() {
    let env = Env::new();
    gen_tree(&env.src, 1, 60);
    env.mirror_ok(&[]);
    assert_no_temps(&env.rep);
}

/// A fixture subtree with one entry per kind of change the second pass must handle.
fn plant_change_fixture(src: &Path) {
    let fx = src.join("fx");
    write(&fx.join("edit.txt"), b"first content");
    write(&fx.join("resize.bin"), &[7u8; 5000]);
    write(&fx.join("mode.sh"), b"#!/bin/sh\necho hi\n");
    chmod(&fx.join("mode.sh"), 0o644);
    write(&fx.join("touch.txt"), b"only the mtime changes");
    set_mtime(&fx.join("touch.txt"), 1_600_000_000, 5);
    write(&fx.join("del.txt"), b"to be deleted");
    write(&fx.join("tree/a/one.txt"), b"1");
    write(&fx.join("tree/a/b/two.txt"), b"22");
    write(&fx.join("tree/three.txt"), b"333");
    write(&fx.join("f2d"), b"a file that becomes a directory");
    write(&fx.join("d2f/x.txt"), b"x");
    write(&fx.join("d2f/sub/y.txt"), b"y");
    write(&fx.join("f2l"), b"a file that becomes a symlink");
    symlink("edit.txt", fx.join("link")).expect("symlink");
    write(&fx.join("olddir/p.txt"), b"p");
    write(&fx.join("olddir/q/r.txt"), b"r");
}

#[test]
fn second_pass_converges_after_every_kind_of_change() {
    let env = Env::new();
    gen_tree(&env.src, 2, 50);
    plant_change_fixture(&env.src);
    env.mirror_ok(&[]);
    let before = env.io_log();

    let fx = env.src.join("fx");
    write(&fx.join("edit.txt"), b"second content, longer");
    let mut big = fs::read(fx.join("resize.bin")).expect("read");
    big.extend_from_slice(&[9u8; 1234]);
    write(&fx.join("resize.bin"), &big);
    chmod(&fx.join("mode.sh"), 0o755);
    set_mtime(&fx.join("touch.txt"), 1_650_000_000, 777);
    fs::remove_file(fx.join("del.txt")).expect("rm");
    fs::remove_dir_all(fx.join("tree")).expect("rm -r");
    fs::remove_file(fx.join("f2d")).expect("rm");
    write(&fx.join("f2d/inside.txt"), b"now a directory");
    fs::remove_dir_all(fx.join("d2f")).expect("rm -r");
    write(&fx.join("d2f"), b"now a file");
    fs::remove_file(fx.join("f2l")).expect("rm");
    symlink("resize.bin", fx.join("f2l")).expect("symlink");
    fs::remove_file(fx.join("link")).expect("rm");
    symlink("mode.sh", fx.join("link")).expect("symlink");
    fs::rename(fx.join("olddir"), fx.join("newdir")).expect("rename");

    env.mirror_ok(&[]);
    assert_no_temps(&env.rep);
    let log = new_lines(&env, &before);
    for (action, path) in [
        ("UPDATE", "fx/edit.txt"),
        ("UPDATE", "fx/resize.bin"),
        ("META", "fx/mode.sh"),
        ("META", "fx/touch.txt"),
        ("DELETE", "fx/del.txt"),
        ("RMDIR", "fx/tree"),
        ("DELETE", "fx/f2d"),
        ("MKDIR", "fx/f2d"),
        ("CREATE", "fx/f2d/inside.txt"),
        ("RMDIR", "fx/d2f"),
        ("CREATE", "fx/d2f"),
        ("DELETE", "fx/f2l"),
        ("LINK", "fx/f2l"),
        ("LINK", "fx/link"),
        ("RMDIR", "fx/olddir"),
        ("MKDIR", "fx/newdir"),
        // A renamed directory's files are moved, not copied again (issue 14).
        ("MOVE", "fx/olddir/q/r.txt -> fx/newdir/q/r.txt"),
    ] {
        assert!(
            has_action(&log, action, path),
            "no '{action} {path}' in the io log:\n{log}"
        );
    }
    for action in ["UPDATE", "CREATE", "DRIFT"] {
        for path in ["fx/touch.txt", "fx/mode.sh"] {
            assert!(
                !has_action(&log, action, path),
                "a metadata-only change was copied ({action} {path}):\n{log}"
            );
        }
    }
    // Nothing outside the fixture changed, so nothing outside it may be touched (but the
    // root's and fx's own metadata).
    for (w, rest) in io_actions(&log) {
        assert!(
            rest.starts_with("fx/") || rest == "fx" || rest == ".",
            "unexpected action outside the changes: {w} {rest}"
        );
    }

    // A third pass has nothing to do.
    let before = env.io_log();
    env.mirror_ok(&[]);
    assert_eq!(
        new_lines(&env, &before),
        "",
        "an idle pass must change nothing"
    );
}

#[test]
fn same_size_same_mtime_content_edit_is_caught() {
    let env = Env::new();
    gen_tree(&env.src, 3, 40);
    let f = env.src.join("same.bin");
    write(&f, b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    set_mtime(&f, 1_700_000_000, 42);
    // Let the cache vouch for the file (a racy ctime would make the pass rehash anyway).
    wait_until_not_racy(&env.src, racy_margin(&env.src));
    env.mirror_ok(&[]);
    let before = env.io_log();

    write(&f, b"BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB");
    set_mtime(&f, 1_700_000_000, 42);
    env.mirror_ok(&[]);
    assert_eq!(
        fs::read(env.rep.join("same.bin")).expect("read"),
        b"BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
    );
    let log = new_lines(&env, &before);
    assert!(
        has_action(&log, "UPDATE", "same.bin"),
        "the edit was not copied as an UPDATE:\n{log}"
    );
}

#[test]
fn one_thread_and_default_threads_build_identical_replicas() {
    let env = Env::new();
    gen_tree(&env.src, 4, 80);
    let (one, many) = (env.path("rep-one"), env.path("rep-many"));
    let run = |rep: &Path, name: &str, extra: &[&str]| -> Output {
        let out = syncer()
            .arg("monoshot")
            .arg("--source")
            .arg(&env.src)
            .arg("--replica")
            .arg(rep)
            .arg("--state-dir")
            .arg(&env.state)
            .args(["--name", name])
            .args(extra)
            .output()
            .expect("run syncer");
        assert_eq!(code(&out), 0, "{}", text(&out));
        out
    };
    run(&one, "one", &["--threads", "1"]);
    run(&many, "many", &[]);
    assert_trees_equal(&env.src, &one);
    assert_trees_equal(&env.src, &many);
    assert_snapshots_equal(&snapshot(&one), &snapshot(&many), "the two replicas differ");
    let actions = |name: &str| {
        let log = fs::read_to_string(env.state.join(format!("{name}.io.log"))).expect("io log");
        let mut v = io_actions(&log);
        v.sort();
        v
    };
    assert_eq!(
        actions("one"),
        actions("many"),
        "the two passes logged different actions"
    );
    assert!(!actions("one").is_empty());
}

/// Runs `cmd`, expects exit 2 with a one-line message containing `names`, and nothing
/// changed anywhere in the scratch area (source, replica and state alike).
fn assert_usage_error(env: &Env, mut cmd: Command, names: &Path) {
    let before = snapshot(env.tmp.path());
    let out = cmd.output().expect("run syncer");
    assert_eq!(code(&out), 2, "{}", text(&out));
    let err = stderr(&out);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "not a one-line message: {err:?}"
    );
    assert!(
        err.contains(&*names.to_string_lossy()),
        "the message does not name '{}': {err}",
        names.display()
    );
    assert!(out.stdout.is_empty(), "{}", text(&out));
    assert_snapshots_equal(
        &before,
        &snapshot(env.tmp.path()),
        "a refused run changed files",
    );
}

fn monoshot_with(state: &Path, source: impl AsRef<Path>, replica: impl AsRef<Path>) -> Command {
    let mut c = syncer();
    c.arg("monoshot")
        .arg("--source")
        .arg(source.as_ref())
        .arg("--replica")
        .arg(replica.as_ref())
        .arg("--state-dir")
        .arg(state);
    c
}

#[test]
fn bad_roots_exit_2_with_a_one_line_message_and_change_nothing() {
    let env = Env::new();
    gen_tree(&env.src, 5, 40);
    fs::create_dir_all(env.src.join("inner")).expect("mkdir");
    env.mirror_ok(&[]);
    fs::create_dir_all(env.rep.join("nested-src")).expect("mkdir");
    write(&env.path("plain-file"), b"not a directory");
    symlink(&env.src, env.path("alias")).expect("symlink");
    let root = fs::canonicalize(env.tmp.path()).expect("canonicalize");
    let st = &env.state;

    // Absolute paths.
    assert_usage_error(
        &env,
        monoshot_with(st, env.path("missing"), &env.rep),
        &env.path("missing"),
    );
    assert_usage_error(
        &env,
        monoshot_with(st, env.path("missing"), env.path("fresh")),
        &env.path("missing"),
    );
    assert!(
        !env.path("fresh").exists(),
        "a refused run created the replica"
    );
    assert_usage_error(
        &env,
        monoshot_with(st, env.path("plain-file"), &env.rep),
        &env.path("plain-file"),
    );
    assert_usage_error(
        &env,
        monoshot_with(st, &env.rep, &env.rep),
        &root.join("rep"),
    );
    assert_usage_error(
        &env,
        monoshot_with(st, &env.src, env.src.join("inner")),
        &env.src.join("inner"),
    );
    assert_usage_error(
        &env,
        monoshot_with(st, env.rep.join("nested-src"), &env.rep),
        &root.join("rep/nested-src"),
    );
    assert_usage_error(
        &env,
        monoshot_with(st, &env.src, env.path("plain-file")),
        &env.path("plain-file"),
    );

    // Relative paths, resolved against the working directory.
    let rel = |s: &str, r: &str| {
        let mut c = monoshot_with(st, s, r);
        c.current_dir(env.tmp.path());
        c
    };
    assert_usage_error(&env, rel("missing", "rep"), &root.join("missing"));
    assert_usage_error(&env, rel("plain-file", "rep"), &root.join("plain-file"));
    assert_usage_error(&env, rel("src", "./src/../src"), &root.join("src"));
    assert_usage_error(&env, rel("src", "src/inner"), &root.join("src/inner"));
    assert_usage_error(
        &env,
        rel("rep/nested-src", "rep"),
        &root.join("rep/nested-src"),
    );

    // A symlink that resolves to the source, as the replica or above it.
    assert_usage_error(
        &env,
        monoshot_with(st, &env.src, env.path("alias")),
        &root.join("src"),
    );
    assert_usage_error(&env, rel("src", "alias"), &root.join("src"));
    assert_usage_error(&env, rel("src", "alias/inner"), &root.join("alias/inner"));
    assert_usage_error(&env, rel("alias", "src/inner"), &root.join("src/inner"));
}

#[test]
fn unreadable_source_directory_deletes_nothing_below_its_twin_and_mirrors_the_rest() {
    let env = Env::new();
    gen_tree(&env.src, 6, 40);
    write(&env.src.join("locked/kept.txt"), b"kept");
    write(&env.src.join("locked/sub/deep.txt"), b"deep");
    write(&env.src.join("gone.txt"), b"deleted from the source later");
    env.mirror_ok(&[]);

    // Changes the pass must make elsewhere, and some it must not make under `locked`.
    write(&env.src.join("fresh.txt"), b"new in the source");
    fs::remove_file(env.src.join("gone.txt")).expect("rm");
    write(&env.rep.join("locked/only-in-replica.txt"), b"must survive");
    fs::remove_file(env.src.join("locked/kept.txt")).expect("rm");
    chmod(&env.src.join("locked"), 0o000);
    give_to_nobody(env.tmp.path());
    let twin_before = snapshot(&env.rep.join("locked"));

    let out = unprivileged(&env.monoshot_cmd(&[]))
        .output()
        .expect("run syncer");
    assert_eq!(code(&out), 1, "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("'locked'"),
        "stderr does not name the directory: {err}"
    );
    assert!(
        has_action(&env.io_log(), "ERROR", "locked"),
        "no ERROR line:\n{}",
        env.io_log()
    );

    assert_snapshots_equal(
        &twin_before,
        &snapshot(&env.rep.join("locked")),
        "the replica twin was changed",
    );
    assert!(env.rep.join("locked/only-in-replica.txt").exists());
    assert!(env.rep.join("locked/kept.txt").exists());
    let skip = [Path::new("locked")];
    assert_snapshots_equal(
        &snapshot_without(&env.src, &skip),
        &snapshot_without(&env.rep, &skip),
        "the rest of the tree was not mirrored",
    );
    assert!(env.rep.join("fresh.txt").exists() && !env.rep.join("gone.txt").exists());
    assert_no_temps(&env.rep);
    assert!(
        env.schedule_log().contains("PASS END partial"),
        "{}",
        env.schedule_log()
    );
}

#[test]
fn unreadable_source_file_is_an_error_and_the_rest_is_mirrored() {
    let env = Env::new();
    gen_tree(&env.src, 7, 40);
    write(&env.src.join("old-secret.txt"), b"version one");
    env.mirror_ok(&[]);

    write(&env.src.join("new-secret.txt"), b"never readable");
    chmod(&env.src.join("new-secret.txt"), 0o000);
    write(&env.src.join("old-secret.txt"), b"version two");
    chmod(&env.src.join("old-secret.txt"), 0o000);
    write(&env.src.join("readable.txt"), b"fine");
    give_to_nobody(env.tmp.path());
    let old_before = snapshot(&env.rep.join("old-secret.txt"));

    let out = unprivileged(&env.monoshot_cmd(&[]))
        .output()
        .expect("run syncer");
    assert_eq!(code(&out), 1, "{}", text(&out));
    let err = stderr(&out);
    for name in ["new-secret.txt", "old-secret.txt"] {
        assert!(
            err.contains(&format!("'{name}'")),
            "stderr does not name {name}: {err}"
        );
        assert!(
            has_action(&env.io_log(), "ERROR", name),
            "no ERROR line for {name}:\n{}",
            env.io_log()
        );
    }
    assert!(
        !env.rep.join("new-secret.txt").exists(),
        "an unreadable file was created"
    );
    assert_eq!(
        old_before,
        snapshot(&env.rep.join("old-secret.txt")),
        "the old copy was changed"
    );
    let skip = [Path::new("new-secret.txt"), Path::new("old-secret.txt")];
    assert_snapshots_equal(
        &snapshot_without(&env.src, &skip),
        &snapshot_without(&env.rep, &skip),
        "the rest of the tree was not mirrored",
    );
    assert_eq!(
        fs::read(env.rep.join("readable.txt")).expect("read"),
        b"fine"
    );
    assert_no_temps(&env.rep);
}

#[test]
fn temp_files_are_cleaned_from_the_replica_and_never_mirrored() {
    let env = Env::new();
    gen_tree(&env.src, 8, 40);
    fs::create_dir_all(env.src.join("sub")).expect("mkdir");
    env.mirror_ok(&[]);
    assert_no_temps(&env.rep);

    write(
        &env.rep.join(".syncer-abc.tmp"),
        b"left over by a killed pass",
    );
    write(&env.rep.join("sub/.syncer-abc.tmp"), b"left over too");
    write(
        &env.src.join(".syncer-x.tmp"),
        b"looks like ours, is the user's",
    );
    write(&env.src.join("sub/real.txt"), b"a real change");
    let out = env.monoshot(&[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_no_temps(&env.rep);
    assert!(
        env.src.join(".syncer-x.tmp").exists(),
        "the source was touched"
    );
    let skip = [Path::new(".syncer-x.tmp")];
    assert_snapshots_equal(
        &snapshot_without(&env.src, &skip),
        &snapshot(&env.rep),
        "the replica does not mirror the source (temp names aside)",
    );
    assert!(
        !env.io_log().contains(".syncer-"),
        "temp names reached the io log:\n{}",
        env.io_log()
    );
}

#[test]
fn io_log_records_created_files_with_size_and_hash_and_deletions() {
    let env = Env::new();
    gen_tree(&env.src, 9, 40);
    write(&env.src.join("hello.txt"), b"hello, world\n");
    write(&env.src.join("dir/doomed.txt"), b"doomed");
    write(&env.src.join("tree/a/b.txt"), b"b");
    env.mirror_ok(&[]);

    let log = env.io_log();
    let creates: Vec<_> = io_actions(&log)
        .into_iter()
        .filter(|(w, _)| w == "CREATE")
        .collect();
    let files = snapshot(&env.src)
        .into_values()
        .filter(|s| s.kind == "file")
        .count();
    assert_eq!(creates.len(), files, "one CREATE per file expected:\n{log}");
    let want = format!(
        "hello.txt size=13 sha256={}",
        sha256_hex(&env.src.join("hello.txt"))
    );
    assert!(
        creates.iter().any(|(_, r)| *r == want),
        "no '{want}' in:\n{log}"
    );
    for (_, rest) in &creates {
        assert!(
            rest.contains(" size=") && rest.contains(" sha256="),
            "CREATE without size/hash: {rest}"
        );
        let hex = rest.rsplit_once(" sha256=").expect("hash").1;
        assert!(
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "bad hash: {rest}"
        );
    }
    let sched = env.schedule_log();
    assert!(sched.lines().any(|l| l.contains(" PASS START ")), "{sched}");
    assert!(
        sched.lines().any(|l| l.contains(" PASS END ok ")),
        "{sched}"
    );

    let before = env.io_log();
    fs::remove_file(env.src.join("dir/doomed.txt")).expect("rm");
    fs::remove_dir_all(env.src.join("tree")).expect("rm -r");
    env.mirror_ok(&[]);
    let log = new_lines(&env, &before);
    assert!(has_action(&log, "DELETE", "dir/doomed.txt"), "{log}");
    assert!(has_action(&log, "RMDIR", "tree"), "{log}");
    assert_eq!(
        env.schedule_log().matches("PASS END ok").count(),
        2,
        "{}",
        env.schedule_log()
    );
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let env = Env::new();
    gen_tree(&env.src, 10, 40);
    write(&env.src.join("hello.txt"), b"hello");

    let out = env.monoshot(&["--dry-run"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l == "would CREATE hello.txt size=5"),
        "{stdout}"
    );
    assert!(stdout.lines().any(|l| l == "would MKDIR empty"), "{stdout}");
    assert!(!env.rep.exists(), "a dry run created the replica");

    env.mirror_ok(&[]);
    write(&env.src.join("hello.txt"), b"hello again");
    fs::remove_dir_all(env.src.join("empty")).expect("rm -r");
    write(&env.src.join("new.txt"), b"new");
    write(&env.rep.join(".syncer-left.tmp"), b"leftover");
    let rep_before = snapshot(&env.rep);
    let log_before = env.io_log();
    let out = env.monoshot(&["--dry-run"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in [
        "would UPDATE hello.txt size=11",
        "would CREATE new.txt size=3",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "no '{line}' in:\n{stdout}"
        );
    }
    assert!(
        stdout.lines().any(|l| l.starts_with("would RMDIR empty")),
        "{stdout}"
    );
    assert_snapshots_equal(
        &rep_before,
        &snapshot(&env.rep),
        "a dry run changed the replica",
    );
    assert_eq!(env.io_log(), log_before, "a dry run wrote the io log");
}

#[test]
fn excluded_names_are_neither_copied_nor_deleted() {
    let env = Env::new();
    gen_tree(&env.src, 11, 40);
    write(&env.src.join("app.log"), b"source log");
    write(&env.src.join("sub/deep.log"), b"source log below");
    write(&env.src.join("cache/blob"), b"excluded by the file");
    write(&env.src.join("notes.bak"), b"excluded by the file");
    write(&env.src.join("sub/keep.txt"), b"kept");
    fs::create_dir_all(&env.rep).expect("mkdir");
    write(&env.rep.join("old.log"), b"replica-only log");
    write(&env.rep.join("sub/own.log"), b"replica-only log below");
    write(&env.rep.join("cache/mine"), b"replica-only excluded dir");
    write(&env.rep.join("x.bak"), b"replica-only excluded file");
    let rules = env.path("excludes.txt");
    write(&rules, b"# a comment\n\ncache/\n*.bak\n");

    let out = env.monoshot(&[
        "--exclude",
        "*.log",
        "--exclude-from",
        rules.to_str().expect("utf8"),
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    for gone in ["app.log", "sub/deep.log", "cache/blob", "notes.bak"] {
        assert!(!env.rep.join(gone).exists(), "excluded {gone} was copied");
    }
    for kept in ["old.log", "sub/own.log", "cache/mine", "x.bak"] {
        assert!(
            env.rep.join(kept).exists(),
            "excluded replica file {kept} was deleted"
        );
    }
    let excluded = |root: &Path| {
        let mut s = snapshot(root);
        s.retain(|k, _| {
            let n = k.as_os_str().as_bytes();
            !(n.ends_with(b".log") || n.ends_with(b".bak") || k.starts_with("cache"))
        });
        s
    };
    assert_snapshots_equal(
        &excluded(&env.src),
        &excluded(&env.rep),
        "the rest was not mirrored",
    );
    assert!(
        !env.io_log().contains(".log") && !env.io_log().contains("cache"),
        "{}",
        env.io_log()
    );
}

#[test]
fn non_utf8_names_are_escaped_in_the_io_log() {
    let env = Env::new();
    gen_tree(&env.src, 12, 40);
    write(&env.src.join(os(b"bad-\xff-name.txt")), b"bytes");
    env.mirror_ok(&[]);
    let log = env.io_log();
    assert!(has_action(&log, "CREATE", "bad-\\xff-name.txt"), "{log}");
    assert!(
        has_action(&log, "MKDIR", "non-utf8-\\xff\\xfe-dir"),
        "{log}"
    );
    assert!(
        has_action(&log, "CREATE", "non-utf8-\\xff\\xfe-dir/inner/x\\x80y"),
        "{log}"
    );
    // gen_tree's `raw-<EF BF FF>-0`: a broken sequence, every byte escaped.
    assert!(log.contains("raw-\\xef\\xbf\\xff-0 size="), "{log}");
    let raw = fs::read(env.state.join("default.io.log")).expect("io log");
    assert!(
        std::str::from_utf8(&raw).is_ok(),
        "the io log holds raw non-UTF-8 bytes"
    );
    assert!(
        !log.contains('\u{fffd}'),
        "names were replaced, not escaped:\n{log}"
    );
}

#[test]
fn mirrors_the_committed_fixture_tree() {
    let env = Env::new();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("test-payloads/basic");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", fixture.display()))
        .arg(&env.src)
        .status()
        .expect("cp");
    assert!(status.success());
    env.mirror_ok(&[]);
    assert!(env.rep.join("bin/hello.sh").exists());
    assert_eq!(
        std::fs::read_link(env.rep.join("docs/readme-link")).expect("link"),
        std::path::PathBuf::from("../README.txt")
    );
}

/// Files of 8 MiB and more whose source changed are copied speculatively while hashed: a
/// touch must still be a metadata fix only, and a same-size edit inside must be copied.
#[test]
fn large_file_touch_is_meta_only_and_inner_edit_is_copied() {
    let env = Env::new();
    let big = env.src.join("big.bin");
    let mut rng = Rng::new(7);
    write(&big, &rng.bytes(9 << 20));
    set_mtime(&big, 1_600_000_000, 5);
    env.mirror_ok(&[]);

    set_mtime(&big, 1_600_000_100, 7);
    let before = env.io_log().len();
    env.mirror_ok(&[]);
    let pass2 = env.io_log()[before..].to_string();
    assert!(
        pass2.contains("META big.bin"),
        "touch should be META only:\n{pass2}"
    );
    assert!(
        !pass2.contains("UPDATE big.bin"),
        "touch must not copy:\n{pass2}"
    );

    let mut data = std::fs::read(&big).expect("read");
    let mid = data.len() / 2;
    data[mid..mid + (1 << 20)].copy_from_slice(&rng.bytes(1 << 20));
    std::fs::write(&big, &data).expect("rewrite");
    set_mtime(&big, 1_600_000_200, 9);
    let before = env.io_log().len();
    env.mirror_ok(&[]);
    let pass3 = env.io_log()[before..].to_string();
    assert!(
        pass3.contains("UPDATE big.bin size=9437184"),
        "inner edit must be copied:\n{pass3}"
    );
}

#[test]
fn error_for_a_path_with_spaces_names_the_whole_path() {
    let env = Env::new();
    let secret = env.src.join("my dir/a secret file.txt");
    write(&secret, b"private");
    write(&env.src.join("ok.txt"), b"fine");
    give_to_nobody(env.tmp.path());
    chmod(&secret, 0o000);
    let out = unprivileged(&env.monoshot_cmd(&[])).output().expect("run");
    assert_eq!(code(&out), 1, "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("'my dir/a secret file.txt'"),
        "stderr should quote the whole path:\n{err}"
    );
    assert!(env.rep.join("ok.txt").exists());
}

/// A large file mirrored right after it was written has a racy token: the next pass must
/// re-hash it, not copy it again (speculative copies are for tokens that really changed).
/// The source is a ramfs, which keeps the 3 s racy window (on ext4 or tmpfs the window is
/// 50 ms, too short to be sure the first pass starts within it).
#[test]
fn unchanged_large_file_with_a_racy_token_is_not_rewritten() {
    let env = Env::new();
    let _ramfs = Mount::with(&env.src, &["-t", "ramfs", "ramfs"]);
    write(&env.src.join("big.bin"), &Rng::new(3).bytes(9 << 20));
    env.mirror_ok(&[]);
    let before = env.io_log().len();
    env.mirror_ok(&[]);
    let pass2 = env.io_log()[before..].to_string();
    assert!(
        pass2.trim().is_empty(),
        "an unchanged file needs no action:\n{pass2}"
    );
    assert!(
        env.schedule_log()
            .lines()
            .last()
            .unwrap_or("")
            .contains("hashed 1 files"),
        "the racy source is re-hashed once:\n{}",
        env.schedule_log()
    );
}

/// The progress bar (files and bytes of the plan) is drawn on a terminal, never into pipes.
#[test]
fn progress_bar_appears_on_a_terminal_only() {
    let env = Env::new();
    for i in 0..3 {
        write(
            &env.src.join(format!("f{i}.bin")),
            &Rng::new(i).bytes(24 << 20),
        );
    }
    // Without a terminal: no bar.
    let piped = env.monoshot(&[]);
    assert_eq!(code(&piped), 0, "{}", text(&piped));
    assert!(
        !text(&piped).contains("MiB/"),
        "no bar without a terminal:\n{}",
        text(&piped)
    );

    // `script` runs the same command on a pseudo-terminal and copies what it drew.
    let env = Env::new();
    for i in 0..3 {
        write(
            &env.src.join(format!("f{i}.bin")),
            &Rng::new(i).bytes(24 << 20),
        );
    }
    let cmd = format!(
        "{} monoshot --source '{}' --replica '{}' --state-dir '{}'",
        bin().display(),
        env.src.display(),
        env.rep.display(),
        env.state.display()
    );
    let out = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .output()
        .expect("script (util-linux) runs a command on a terminal");
    assert_eq!(code(&out), 0, "{}", text(&out));
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains("MiB/72.00 MiB") && screen.contains("3 files"),
        "no progress bar on the terminal:\n{screen}"
    );
    assert_trees_equal(&env.src, &env.rep);
}
