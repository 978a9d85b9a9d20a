//! Moves (issue 14): a file moved in the source is renamed in the replica, never copied
//! again. A renamed directory and files moved between directories copy zero bytes, a changed
//! file among them is still copied, the deletion guard counts a move as neither a deletion
//! nor a creation, `--backup-dir` keeps nothing for a move, and `--no-moves` copies instead.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// The number before `word` in the last `PASS END` line (`moved 3`: `count(env, "moved")`;
/// `copied 0 bytes`: `count(env, "copied")`).
fn count(env: &Env, word: &str) -> u64 {
    let line = last_pass_end(env);
    let rest = line
        .split(&format!(" {word} "))
        .nth(1)
        .unwrap_or_else(|| panic!("no '{word}' in: {line}"));
    rest.split([',', ' '])
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count after '{word}' in: {line}"))
}

/// The file-I/O log lines written since `before` (the log's earlier content), without their
/// timestamps.
fn new_io_lines(env: &Env, before: &str) -> Vec<String> {
    env.io_log()[before.len()..]
        .lines()
        .map(|l| l.split_once(' ').map_or(l, |x| x.1).to_string())
        .collect()
}

fn with_word<'a>(lines: &'a [String], word: &str) -> Vec<&'a String> {
    lines
        .iter()
        .filter(|l| l.starts_with(&format!("{word} ")))
        .collect()
}

/// The last pass as `status --json` would show it.
fn last_pass(env: &Env) -> serde_json::Value {
    let text = fs::read_to_string(env.state.join("default.status.json")).expect("status file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("status json");
    v["last_pass"].clone()
}

/// `n` small files of distinct content under `dir`, named `f0000`…
fn small_files(dir: &Path, n: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    for i in 0..n {
        let mut data = format!("{seed}:{i}:").into_bytes();
        let extra = rng.below(200) as usize;
        data.extend(rng.bytes(extra));
        write(&dir.join(format!("f{i:04}")), &data);
    }
}

fn mv(env: &Env, from: &str, to: &str) {
    let to = env.src.join(to);
    fs::create_dir_all(to.parent().expect("below the source")).expect("mkdir");
    fs::rename(env.src.join(from), to).expect("rename in the source");
}

/// Total size of the files under `dir`.
fn bytes_below(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().expect("stat").len())
        .sum()
}

/// Every path below `root`, relative, sorted.
fn paths_below(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .filter_map(|e| e.ok())
        .map(|e| e.path().strip_prefix(root).expect("below").to_path_buf())
        .collect();
    v.sort();
    v
}

/// Runs a tool of the test's setup, failing the test if it fails; returns its stdout.
fn run(tool: &str, args: &[&str], path: &Path) -> String {
    let out = Command::new(tool)
        .args(args)
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required by this test (.ci/run installs it): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn a_renamed_directory_and_files_moved_between_directories_copy_nothing() {
    let env = Env::new();
    small_files(&env.src.join("album"), 2000, 1);
    for d in 0..10 {
        small_files(&env.src.join(format!("in/d{d}")), 60, 100 + d);
    }
    // Past the racy window, so that the cache vouches for every file it records.
    let_source_age_past_racy_window(&env.src);
    env.mirror_ok(&[]);
    let album = fs::metadata(env.rep.join("album")).expect("album").ino();

    mv(&env, "album", "photos/2024");
    // 500 files change directory: 50 from each of ten, half of them renamed on the way.
    for d in 0..10u64 {
        for i in 0..50 {
            let name = if i % 2 == 0 {
                format!("f{i:04}")
            } else {
                format!("moved-{i}")
            };
            mv(
                &env,
                &format!("in/d{d}/f{i:04}"),
                &format!("in/d{}/from{d}/{name}", (d + 1) % 10),
            );
        }
    }
    // Past the racy window, so that the pass after this one can trust what it records.
    let_source_age_past_racy_window(&env.src);
    let before = env.io_log();
    env.mirror_ok(&[]);
    let lines = new_io_lines(&env, &before);
    assert_eq!(count(&env, "copied"), 0, "{}", last_pass_end(&env));
    assert_eq!(with_word(&lines, "MOVE").len(), 2500);
    assert_eq!(count(&env, "moved"), 2500);
    assert_eq!(count(&env, "created"), 0);
    // The album's files keep their tokens in a renamed directory: the cache knows their
    // content. Each of the 500 files renamed on its own has a new ctime and is read.
    assert_eq!(count(&env, "hashed"), 500, "{}", last_pass_end(&env));
    assert!(with_word(&lines, "CREATE").is_empty());
    for expected in [
        "MOVE album/f1999 -> photos/2024/f1999 size=",
        "MOVE in/d3/f0001 -> in/d4/from3/moved-1 size=",
        "MOVE in/d9/f0002 -> in/d0/from9/f0002 size=",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(expected)),
            "no '{expected}…' line among {:?}…",
            &lines[..5]
        );
    }
    // Nothing is deleted: the album is renamed whole (the same directory), and the
    // directories the 500 files left are still in the source.
    assert_eq!(count(&env, "deleted"), 0);
    assert_eq!(
        fs::metadata(env.rep.join("photos/2024"))
            .expect("moved")
            .ino(),
        album,
        "the replica's album directory is renamed, not made anew"
    );
    assert_eq!(last_pass(&env)["moved"], 2500);
    assert_rsync_agrees(&env.src, &env.rep);

    // The cache knows every moved file by its new name: the next pass reads nothing.
    let before = env.io_log();
    env.mirror_ok(&[]);
    assert_eq!(
        (count(&env, "hashed"), count(&env, "moved")),
        (0, 0),
        "{}",
        last_pass_end(&env)
    );
    assert!(new_io_lines(&env, &before).is_empty());
}

#[test]
fn a_changed_file_among_moved_ones_is_copied_and_the_rest_are_moved() {
    let env = Env::new();
    small_files(&env.src.join("docs"), 20, 7);
    write(&env.src.join("notes.txt"), b"first draft");
    env.mirror_ok(&[]);

    mv(&env, "docs", "papers");
    // Same size, other bytes; and another size.
    let f5 = env.src.join("papers/f0005");
    let mut data = fs::read(&f5).expect("read");
    data[0] ^= 0xff;
    fs::write(&f5, &data).expect("write");
    write(
        &env.src.join("papers/f0006"),
        b"rewritten and longer than before....",
    );
    // A file renamed in its own directory and edited.
    mv(&env, "notes.txt", "notes-v2.txt");
    fs::write(env.src.join("notes-v2.txt"), b"second draft").expect("write");

    let before = env.io_log();
    env.mirror_ok(&[]);
    let lines = new_io_lines(&env, &before);
    let mut created: Vec<&str> = with_word(&lines, "CREATE")
        .iter()
        .map(|l| l.split(' ').nth(1).expect("path"))
        .collect();
    created.sort();
    assert_eq!(created, ["notes-v2.txt", "papers/f0005", "papers/f0006"]);
    assert_eq!(with_word(&lines, "MOVE").len(), 18, "{lines:?}");
    assert!(!lines
        .iter()
        .any(|l| l.contains("f0005 ->") || l.contains("f0006 ->")));
    let copied = fs::metadata(&f5).expect("stat").len()
        + fs::metadata(env.src.join("papers/f0006"))
            .expect("stat")
            .len()
        + 12;
    assert_eq!(count(&env, "copied"), copied);
    assert_eq!(count(&env, "moved"), 18);
}

#[test]
fn no_moves_copies_a_renamed_directory_again() {
    let env = Env::new();
    small_files(&env.src.join("a"), 30, 3);
    env.mirror_ok(&[]);
    mv(&env, "a", "b");
    let before = env.io_log();
    env.mirror_ok(&["--no-moves"]);
    let lines = new_io_lines(&env, &before);
    assert!(with_word(&lines, "MOVE").is_empty(), "{lines:?}");
    assert_eq!(with_word(&lines, "CREATE").len(), 30);
    assert_eq!(count(&env, "moved"), 0);
    assert_eq!(count(&env, "copied"), bytes_below(&env.src.join("b")));
    assert_eq!(count(&env, "deleted"), 31);
}

#[test]
fn a_dry_run_shows_moves_and_changes_nothing() {
    let env = Env::new();
    small_files(&env.src.join("a"), 3, 4);
    env.mirror_ok(&[]);
    mv(&env, "a/f0001", "b/f0001");
    let before = snapshot(&env.rep);
    let out = env.monoshot(&["--dry-run"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed
            .lines()
            .any(|l| l.starts_with("would MOVE a/f0001 -> b/f0001 size=")),
        "{printed}"
    );
    assert_eq!(snapshot(&env.rep), before, "a dry run changed the replica");
}

#[test]
fn the_guard_lets_a_renamed_tree_through_as_moves() {
    let env = Env::new();
    for d in ["x", "y", "z"] {
        small_files(&env.src.join("top").join(d), 50, d.len() as u64 + 20);
    }
    small_files(&env.src.join("keep"), 10, 30);
    env.mirror_ok(&[]);
    // Most of the tree moves: 154 of the replica's 165 entries.
    mv(&env, "top", "renamed");

    // Counted as deletions, that is 154 of 165 entries, far above 10 %.
    let held = snapshot(&env.rep);
    let out = env.monoshot(&["--no-moves", "--max-delete", "10%"]);
    assert_eq!(code(&out), 3, "{}", text(&out));
    assert_eq!(
        snapshot(&env.rep),
        held,
        "a refused pass changed the replica"
    );

    // As moves, only the four emptied directories are deleted.
    env.mirror_ok(&["--max-delete", "10%"]);
    assert_eq!(count(&env, "moved"), 150);
    assert_eq!(count(&env, "deleted"), 4);
    assert_eq!(count(&env, "copied"), 0);
}

#[test]
fn backup_dir_keeps_nothing_for_a_move() {
    let env = Env::new();
    small_files(&env.src.join("old"), 5, 5);
    small_files(&env.src.join("old/sub"), 2, 6);
    write(&env.src.join("gone.txt"), b"deleted for real");
    env.mirror_ok(&[]);
    mv(&env, "old", "new");
    fs::remove_file(env.src.join("gone.txt")).expect("rm");

    let bk = env.path("bk");
    let before = env.io_log();
    env.mirror_ok(&["--backup-dir", bk.to_str().expect("utf-8")]);
    assert_eq!(count(&env, "moved"), 7);
    let passes: Vec<PathBuf> = fs::read_dir(&bk)
        .expect("ls backup")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(passes.len(), 1, "{passes:?}");
    // Only the file that was really deleted is kept: no moved file, and no directory left
    // empty by moves.
    assert_eq!(paths_below(&passes[0]), [PathBuf::from("gone.txt")]);
    let lines = new_io_lines(&env, &before);
    assert_eq!(with_word(&lines, "BACKUP").len(), 1, "{lines:?}");
}

#[test]
fn a_moved_file_gets_the_sources_metadata_and_the_next_pass_reads_nothing() {
    let env = Env::new();
    let f = env.src.join("a/file");
    write(&f, b"content that moves");
    chmod(&f, 0o640);
    run("setfattr", &["-n", "user.tag", "-v", "before"], &f);
    env.mirror_ok(&[]);

    mv(&env, "a/file", "b/renamed");
    let g = env.src.join("b/renamed");
    chmod(&g, 0o600);
    std::os::unix::fs::chown(&g, Some(4321), Some(8765)).expect("chown (tests run as root)");
    set_mtime(&g, 1_600_000_000, 5);
    run("setfattr", &["-n", "user.tag", "-v", "after"], &g);
    run("setfattr", &["-n", "user.more", "-v", "1"], &g);
    let_source_age_past_racy_window(&env.src);
    env.mirror_ok(&[]);
    assert_eq!(count(&env, "moved"), 1);
    assert_eq!(count(&env, "copied"), 0);
    let r = env.rep.join("b/renamed");
    let m = fs::symlink_metadata(&r).expect("moved");
    assert_eq!(
        (
            m.mode() & 0o7777,
            m.uid(),
            m.gid(),
            m.mtime(),
            m.mtime_nsec()
        ),
        (0o600, 4321, 8765, 1_600_000_000, 5)
    );
    let dump = |p: &Path| run("getfattr", &["-d", "-m", "user\\.", "--absolute-names"], p);
    assert_eq!(
        dump(&r).lines().skip(1).collect::<Vec<_>>(),
        dump(&g).lines().skip(1).collect::<Vec<_>>()
    );

    let before = env.io_log();
    env.mirror_ok(&[]);
    assert_eq!(count(&env, "hashed"), 0, "{}", last_pass_end(&env));
    assert!(new_io_lines(&env, &before).is_empty());
}

#[test]
fn hard_linked_files_are_copied_and_linked_not_moved() {
    let env = Env::new();
    write(&env.src.join("d/a"), b"linked content");
    fs::hard_link(env.src.join("d/a"), env.src.join("d/b")).expect("link");
    write(&env.src.join("d/c"), b"single");
    env.mirror_ok(&[]);
    mv(&env, "d", "e");
    env.mirror_ok(&[]);
    assert_eq!(count(&env, "moved"), 1, "only the file with one name moves");
    let (a, b) = (
        fs::metadata(env.rep.join("e/a")).expect("a"),
        fs::metadata(env.rep.join("e/b")).expect("b"),
    );
    assert_eq!(a.ino(), b.ino(), "the group is one inode in the replica");
    let out = Command::new("rsync")
        .args(["-anicH", "--delete"])
        .arg(format!("{}/", env.src.display()))
        .arg(format!("{}/", env.rep.display()))
        .output()
        .expect("rsync");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
}

/// Moves mixed with every ordering hazard: into a directory that replaces a file, out of a
/// directory that becomes a file, out of a directory left empty inside one that stays, and
/// two files swapping directories. Each move runs after the mkdir of its new directory and
/// before the deletion of its old one; a name replaced by another kind is never a move's
/// target (the old entry must go first), so it is copied.
#[test]
fn moves_are_ordered_around_mkdirs_deletions_and_kind_changes() {
    let env = Env::new();
    for (path, content) in [
        ("X/a", "content of X/a"),
        ("X/other", "content of X/other"),
        ("f", "content of f"),
        ("sw1/x", "x, short"),
        ("sw2/y", "y, a bit longer"),
        ("p/q/f", "deep"),
        ("h/b/f", "deeper still"),
        ("n", "a file that becomes a directory"),
        ("old/x", "moves into n/"),
    ] {
        write(&env.src.join(path), content.as_bytes());
    }
    env.mirror_ok(&[]);

    // X becomes a file with X/a's content; X/other moves out first.
    mv(&env, "X/other", "other2");
    fs::remove_dir_all(env.src.join("X")).expect("rm X");
    write(&env.src.join("X"), b"content of X/a");
    // f becomes a directory holding f's content.
    fs::remove_file(env.src.join("f")).expect("rm f");
    write(&env.src.join("f/g"), b"content of f");
    // Two files swap directories.
    mv(&env, "sw1/x", "sw2/x");
    mv(&env, "sw2/y", "sw1/y");
    // Up one level, out of a directory that goes.
    mv(&env, "p/q/f", "p/f");
    fs::remove_dir(env.src.join("p/q")).expect("rmdir");
    // h becomes a file; its file moves to a new directory first.
    mv(&env, "h/b/f", "b/f");
    fs::remove_dir_all(env.src.join("h")).expect("rm h");
    write(&env.src.join("h"), b"now a file");
    // n becomes a directory, and receives a moved file.
    fs::remove_file(env.src.join("n")).expect("rm n");
    mv(&env, "old/x", "n/x");

    let before = env.io_log();
    env.mirror_ok(&[]);
    let lines = new_io_lines(&env, &before);
    let mut moves: Vec<String> = with_word(&lines, "MOVE")
        .iter()
        .map(|l| l.split(" size=").next().expect("line").to_string())
        .collect();
    moves.sort();
    assert_eq!(
        moves,
        [
            "MOVE X/other -> other2",
            "MOVE h/b/f -> b/f",
            "MOVE old/x -> n/x",
            "MOVE p/q/f -> p/f",
            "MOVE sw1/x -> sw2/x",
            "MOVE sw2/y -> sw1/y",
        ]
    );
    let mut created: Vec<&str> = with_word(&lines, "CREATE")
        .iter()
        .map(|l| l.split(' ').nth(1).expect("path"))
        .collect();
    created.sort();
    assert_eq!(created, ["X", "f/g", "h"]);
    assert_eq!(count(&env, "deleted"), 7, "f, n, X and X/a, p/q, h and h/b");
}
