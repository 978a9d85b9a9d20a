//! What `rsync -aHAXS` keeps beyond content, mode, owner and times (issue 11), checked with
//! the real binary as root: sparse files keep their holes (allocated size within 1 MiB of the
//! source's, holes never read to hash them); extended attributes of every namespace, POSIX
//! ACLs and file capabilities are mirrored, and a change to them is a metadata fix. (ext4
//! keeps all of an inode's attributes in one 4 KiB block, which bounds the sizes used.)

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use crate::common::*;

const MIB: u64 = 1 << 20;

/// Bytes allocated on disk for `path`.
fn allocated(path: &Path) -> u64 {
    fs::symlink_metadata(path).expect("lstat").blocks() * 512
}

/// Writes `data` at `offset` in `path` (created as an empty file of `size` bytes if new).
fn write_at(path: &Path, size: u64, offset: u64, data: &[u8]) {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .expect("open");
    if f.metadata().expect("stat").len() < size {
        f.set_len(size).expect("set_len");
    }
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(data).expect("write");
}

/// `(files, bytes)` of the last pass's `hashed F files / B bytes`.
fn hashed(env: &Env) -> (u64, u64) {
    let log = env.schedule_log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("PASS END"))
        .expect("a PASS END line")
        .to_string();
    let rest = line.split("hashed ").nth(1).expect("hashed field");
    let w: Vec<&str> = rest.split_whitespace().collect();
    (w[0].parse().expect("files"), w[3].parse().expect("bytes"))
}

fn assert_holes_kept(src: &Path, rep: &Path) {
    for e in walkdir::WalkDir::new(src)
        .into_iter()
        .filter_map(|e| e.ok())
    {
        if !e.file_type().is_file() {
            continue;
        }
        let rel = e.path().strip_prefix(src).expect("below src");
        let (a, b) = (allocated(e.path()), allocated(&rep.join(rel)));
        assert!(
            a.abs_diff(b) <= MIB,
            "'{}': {b} bytes allocated in the replica, {a} in the source",
            rel.display()
        );
    }
}

#[test]
fn sparse_files_keep_their_holes_and_holes_are_never_read() {
    let env = Env::new();
    let image = env.src.join("vm/disk.img");
    fs::create_dir_all(image.parent().expect("parent")).expect("mkdir");
    let mut rng = Rng::new(11);
    // A 1 GiB image with three data extents.
    for (i, off) in [0, 300 * MIB, 900 * MIB].into_iter().enumerate() {
        write_at(&image, 1 << 30, off, &rng.bytes(64 * 1024 + i * 4096));
    }
    // Only a hole; data then a trailing hole.
    File::create(env.src.join("hole.bin"))
        .expect("create")
        .set_len(50 * MIB)
        .expect("set_len");
    write_at(&env.src.join("tail.bin"), 20 * MIB, 0, &rng.bytes(100_000));
    write(&env.src.join("plain.txt"), b"not sparse");
    assert!(
        allocated(&image) < 2 * MIB,
        "the test filesystem does not keep holes"
    );

    env.mirror_ok(&[]);
    assert_rsync_agrees(&env.src, &env.rep);
    assert_holes_kept(&env.src, &env.rep);

    // A new data extent in the image: copied, holes still kept, content equal.
    write_at(&image, 1 << 30, 600 * MIB, &rng.bytes(8192));
    env.mirror_ok(&[]);
    assert_rsync_agrees(&env.src, &env.rep);
    assert_holes_kept(&env.src, &env.rep);
    assert_eq!(
        fs::read(&image).expect("read"),
        fs::read(env.rep.join("vm/disk.img")).expect("read"),
    );

    // A scrub hashes every byte of both sides, but reads only the data extents.
    std::thread::sleep(Duration::from_millis(10));
    env.mirror_ok(&["--checksum"]);
    let (files, bytes) = hashed(&env);
    assert_eq!(files, 8, "four files on each side");
    assert!(
        bytes < 2 * MIB,
        "{bytes} bytes read to hash: the holes were read"
    );
}

/// Runs a tool of the test's setup, failing the test if it fails.
fn run(tool: &str, args: &[&str], path: &Path) {
    let out = std::process::Command::new(tool)
        .args(args)
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required by this test (.ci/run installs it): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        text(&out)
    );
}

/// Every extended attribute of `path` (all namespaces root can read), as `getfattr` dumps
/// them in hex, without the file-name line.
fn xattr_dump(path: &Path) -> String {
    let out = std::process::Command::new("getfattr")
        .args(["-h", "-d", "-m", "-", "-e", "hex"])
        .arg(path)
        .output()
        .expect("getfattr (.ci/run installs attr)");
    assert!(out.status.success(), "getfattr failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("# file:") && !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Once the source is past the racy window and one pass later, an idle pass reads no file
/// content and changes nothing.
fn assert_settled_idle_pass_does_nothing(env: &Env) {
    let_source_age_past_racy_window(&env.src);
    env.mirror_ok(&[]);
    let before = env.io_log();
    env.mirror_ok(&[]);
    assert_eq!(hashed(env).0, 0, "the idle pass read file content");
    assert_eq!(
        env.io_log()[before.len()..].lines().count(),
        0,
        "the idle pass changed something"
    );
}

/// `rsync -ani<flags> --delete SRC/ REP/` itemizes nothing (`c`: checksums; `A`, `X`, `H`:
/// ACLs, xattrs, hard-link structure).
fn assert_rsync_agrees_with(flags: &str, src: &Path, rep: &Path) {
    let out = std::process::Command::new("rsync")
        .args([&format!("-ani{flags}"), "--delete"])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", rep.display()))
        .output()
        .expect("rsync");
    assert!(out.status.success(), "rsync failed: {}", text(&out));
    let diff = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        diff.is_empty(),
        "rsync -ani{flags} sees differences:\n{diff}"
    );
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::from("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[test]
fn xattrs_acls_and_file_capabilities_are_mirrored_and_a_change_is_only_a_fix() {
    let env = Env::new();
    let mut rng = Rng::new(7);
    let file = env.src.join("data/notes.txt");
    let dir = env.src.join("data/shared");
    write(&file, b"some notes\n");
    fs::create_dir_all(&dir).expect("mkdir");
    write(&dir.join("inside.txt"), b"inside\n");
    for (name, size) in [
        ("user.small", 1usize),
        ("user.mid", 300),
        ("user.big", 2900),
    ] {
        let value = hex(&rng.bytes(size));
        run("setfattr", &["-n", name, "-v", &value], &file);
        run("setfattr", &["-n", name, "-v", &value], &dir);
    }
    run("setfattr", &["-n", "user.empty"], &file);
    run(
        "setfattr",
        &["-n", "trusted.root-only", "-v", "0x00ff00"],
        &file,
    );
    run("setfacl", &["-m", "u:nobody:rw,g:nogroup:r"], &file);
    run("setfacl", &["-d", "-m", "u:nobody:rwx"], &dir);
    let ping = env.src.join("bin/ping-like");
    fs::create_dir_all(ping.parent().expect("parent")).expect("mkdir");
    fs::copy("/bin/true", &ping).expect("copy /bin/true");
    run("setcap", &["cap_net_raw+ep"], &ping);

    env.mirror_ok(&[]);
    assert_rsync_agrees_with("cAX", &env.src, &env.rep);
    for p in [&file, &dir, &ping] {
        let rel = p.strip_prefix(&env.src).expect("below src");
        let (a, b) = (xattr_dump(p), xattr_dump(&env.rep.join(rel)));
        assert!(!a.is_empty());
        assert_eq!(a, b, "attributes of '{}'", rel.display());
    }
    let caps = std::process::Command::new("getcap")
        .arg(env.rep.join("bin/ping-like"))
        .output()
        .expect("getcap");
    assert!(text(&caps).contains("cap_net_raw"), "{}", text(&caps));

    // Changed, removed and added attributes and a changed ACL: metadata fixes, no copy.
    let before = env.io_log();
    run("setfattr", &["-n", "user.mid", "-v", "0x0102"], &file);
    run("setfattr", &["-x", "user.big"], &file);
    run("setfattr", &["-n", "user.new", "-v", "fresh"], &dir);
    run("setfacl", &["-m", "u:nobody:r"], &file);
    env.mirror_ok(&[]);
    assert_rsync_agrees_with("cAX", &env.src, &env.rep);
    let log = env.io_log()[before.len()..].to_string();
    assert!(log.contains(" META data/notes.txt"), "{log}");
    assert!(log.contains(" META data/shared"), "{log}");
    assert!(
        !log.contains("UPDATE"),
        "an attribute change was copied:\n{log}"
    );

    // Once the source is past the racy window, an idle pass reads nothing, changes nothing.
    assert_settled_idle_pass_does_nothing(&env);
    assert_rsync_agrees_with("cAX", &env.src, &env.rep);
}

#[test]
fn no_xattrs_mirrors_content_without_attributes() {
    let env = Env::new();
    let file = env.src.join("f.txt");
    write(&file, b"x");
    run("setfattr", &["-n", "user.tag", "-v", "v"], &file);
    env.mirror_ok(&["--no-xattrs"]);
    assert_eq!(fs::read(env.rep.join("f.txt")).expect("read"), b"x");
    assert!(xattr_dump(&env.rep.join("f.txt")).is_empty());
}

#[test]
fn one_file_system_mirrors_a_source_mount_point_as_an_empty_directory() {
    let env = Env::new();
    write(&env.src.join("a.txt"), b"on the root filesystem");
    let mnt = env.src.join("mnt");
    let _mount = Mount::tmpfs(&mnt, "4m");
    chmod(&mnt, 0o750);
    write(&mnt.join("inner.txt"), b"on another filesystem");
    fs::create_dir_all(env.rep.join("mnt")).expect("mkdir");
    write(&env.rep.join("mnt/kept.txt"), b"an earlier copy");

    let out = env.monoshot(&["-x"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(
        fs::read(env.rep.join("a.txt")).expect("read"),
        b"on the root filesystem"
    );
    assert!(
        !env.rep.join("mnt/inner.txt").exists(),
        "-x descended into a mount point"
    );
    let mode = |p: &Path| fs::metadata(p).expect("stat").mode() & 0o7777;
    assert_eq!(
        mode(&env.rep.join("mnt")),
        0o750,
        "the mount point's metadata"
    );
    assert_eq!(
        fs::read(env.rep.join("mnt/kept.txt")).expect("read"),
        b"an earlier copy",
        "what is below a mount point is not deleted either"
    );

    // Without -x the mount point is crossed, as before.
    let out = env.monoshot(&[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(
        fs::read(env.rep.join("mnt/inner.txt")).expect("read"),
        b"on another filesystem"
    );
}

#[test]
fn a_mount_point_in_the_replica_is_never_descended_into_or_deleted_through() {
    let env = Env::new();
    write(&env.src.join("a.txt"), b"a");
    fs::create_dir_all(&env.rep).expect("mkdir");
    let data = env.rep.join("data");
    let _mount = Mount::tmpfs(&data, "4m");
    write(&data.join("keep.txt"), b"someone else's filesystem");

    let out = env.monoshot(&["-x"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(stderr(&out).contains("mount point"), "{}", text(&out));
    assert!(
        data.join("keep.txt").exists(),
        "-x deleted through a mount point"
    );

    // Without -x the entry is to be deleted, but nothing on the mounted filesystem is.
    let out = env.monoshot(&[]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(stderr(&out).contains("'data'"), "{}", text(&out));
    assert_eq!(
        fs::read(data.join("keep.txt")).expect("read"),
        b"someone else's filesystem"
    );
}

fn inode(p: &Path) -> u64 {
    fs::symlink_metadata(p).expect("lstat").ino()
}

/// Every name of `names` is one inode in the replica.
fn assert_one_inode(rep: &Path, names: &[&str]) {
    let inodes: Vec<u64> = names.iter().map(|n| inode(&rep.join(n))).collect();
    assert!(
        inodes.windows(2).all(|w| w[0] == w[1]),
        "{names:?} are not one inode in the replica: {inodes:?}"
    );
}

#[test]
fn hard_link_groups_are_mirrored_and_membership_changes_follow() {
    let env = Env::new();
    let s = &env.src;
    write(&s.join("d1/pair-a"), b"a pair in one directory");
    fs::hard_link(s.join("d1/pair-a"), s.join("d1/pair-b")).expect("ln");
    write(&s.join("t1/x"), b"a triple across directories");
    for n in ["t2/y", "t3/z"] {
        fs::create_dir_all(s.join(n).parent().expect("parent")).expect("mkdir");
        fs::hard_link(s.join("t1/x"), s.join(n)).expect("ln");
    }
    write(&s.join("bin/tool"), b"#!/bin/sh\necho tool\n");
    chmod(&s.join("bin/tool"), 0o755);
    fs::hard_link(s.join("bin/tool"), s.join("bin/tool-alias")).expect("ln");
    write(&s.join("plain.txt"), b"one name");

    env.mirror_ok(&[]);
    assert_rsync_agrees_with("cH", s, &env.rep);
    assert_one_inode(&env.rep, &["d1/pair-a", "d1/pair-b"]);
    assert_one_inode(&env.rep, &["t1/x", "t2/y", "t3/z"]);
    assert_one_inode(&env.rep, &["bin/tool", "bin/tool-alias"]);
    assert_eq!(
        fs::metadata(env.rep.join("t1/x")).expect("stat").nlink(),
        3,
        "the triple's inode has exactly its three names"
    );

    // A name joins a group, one leaves it (replaced by a copy of its own), one content
    // change in a group.
    fs::create_dir_all(s.join("d2")).expect("mkdir");
    fs::hard_link(s.join("d1/pair-a"), s.join("d2/pair-c")).expect("ln");
    fs::copy(s.join("t1/x"), s.join("t2/y.new")).expect("cp");
    fs::rename(s.join("t2/y.new"), s.join("t2/y")).expect("mv");
    write(&s.join("bin/tool"), b"#!/bin/sh\necho tool v2\n");
    env.mirror_ok(&[]);
    assert_rsync_agrees_with("cH", s, &env.rep);
    assert_one_inode(&env.rep, &["d1/pair-a", "d1/pair-b", "d2/pair-c"]);
    assert_one_inode(&env.rep, &["t1/x", "t3/z"]);
    assert_ne!(inode(&env.rep.join("t2/y")), inode(&env.rep.join("t1/x")));
    assert_one_inode(&env.rep, &["bin/tool", "bin/tool-alias"]);
    assert_eq!(
        fs::read(env.rep.join("bin/tool-alias")).expect("read"),
        b"#!/bin/sh\necho tool v2\n"
    );

    // Settled: once past the racy window and one pass later, an idle pass reads nothing.
    assert_settled_idle_pass_does_nothing(&env);
    assert_rsync_agrees_with("cH", s, &env.rep);

    // --no-hard-links: every name a file of its own.
    let other = env.path("rep-no-links");
    let out = syncer()
        .arg("monoshot")
        .arg("--source")
        .arg(s)
        .arg("--replica")
        .arg(&other)
        .arg("--state-dir")
        .arg(&env.state)
        .args(["--name", "nolinks", "--no-hard-links"])
        .output()
        .expect("run");
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_ne!(
        inode(&other.join("d1/pair-a")),
        inode(&other.join("d1/pair-b"))
    );
}

#[test]
fn a_mirror_of_usr_bin_is_clean_under_rsync_hax() {
    // Debian hard-links some names in /usr/bin, and some binaries carry setuid bits or
    // file capabilities.
    let env = Env::new();
    let out = syncer()
        .arg("monoshot")
        .args(["--source", "/usr/bin", "--replica"])
        .arg(&env.rep)
        .arg("--state-dir")
        .arg(&env.state)
        .arg("-q")
        .output()
        .expect("run");
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_rsync_agrees_with("cHAX", Path::new("/usr/bin"), &env.rep);
}

#[test]
fn a_replica_filesystem_without_xattrs_gets_one_warning_and_the_content() {
    // ramfs keeps no extended attributes at all.
    let env = Env::new();
    for i in 0..3 {
        let f = env.src.join(format!("f{i}.txt"));
        write(&f, b"content");
        run("setfattr", &["-n", "user.tag", "-v", "v"], &f);
    }
    fs::create_dir_all(&env.rep).expect("mkdir");
    let st = std::process::Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(&env.rep)
        .status()
        .expect("mount");
    assert!(st.success(), "mount -t ramfs failed (tests run as root)");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&env.rep);
    for pass in 0..2 {
        let out = env.monoshot(&[]);
        assert_eq!(code(&out), 0, "pass {pass}: {}", text(&out));
        let warnings = stderr(&out)
            .lines()
            .filter(|l| l.contains("without extended attributes"))
            .count();
        assert_eq!(
            warnings,
            1,
            "pass {pass}: one warning per pass:\n{}",
            text(&out)
        );
        assert!(stderr(&out).contains(&env.rep.display().to_string()));
        if pass == 1 {
            // Attributes the replica cannot keep are no difference: nothing to fix.
            let said = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                !said.contains(" META f") && !said.contains("UPDATE"),
                "{said}"
            );
        }
    }
    assert_trees_equal(&env.src, &env.rep);
}

#[test]
fn a_symlinks_own_attributes_are_mirrored_where_the_filesystem_allows() {
    // Linux allows no user.* attribute on a symlink; trusted.* (as root) it does.
    let env = Env::new();
    write(&env.src.join("target.txt"), b"t");
    let link = env.src.join("link");
    std::os::unix::fs::symlink("target.txt", &link).expect("ln -s");
    run(
        "setfattr",
        &["-h", "-n", "trusted.label", "-v", "0x0a0b"],
        &link,
    );
    env.mirror_ok(&[]);
    let rep_link = env.rep.join("link");
    assert_eq!(xattr_dump(&link), xattr_dump(&rep_link));
    assert!(xattr_dump(&rep_link).contains("trusted.label=0x0a0b"));
    // A change to them alone is a metadata fix of the link, its target untouched.
    run(
        "setfattr",
        &["-h", "-n", "trusted.label", "-v", "0x0c"],
        &link,
    );
    let before = env.io_log();
    env.mirror_ok(&[]);
    let log = env.io_log()[before.len()..].to_string();
    assert!(log.contains(" META link"), "{log}");
    assert!(xattr_dump(&rep_link).contains("trusted.label=0x0c"));
    assert!(xattr_dump(&env.rep.join("target.txt")).is_empty());
}

/// Issue 11's acceptance tree, all in one source: hard-link groups, xattrs of several sizes
/// (binary values too) on a file and a directory, a file capability, access and default
/// ACLs, and sparse files. One pass, then the listed mutations, then an idle pass.
#[test]
fn one_tree_with_everything_rsync_ahaxs_keeps_is_mirrored_and_kept_in_step() {
    let env = Env::new();
    let s = &env.src;
    let mut rng = Rng::new(23);
    // Hard links: a pair in one directory, a triple across directories, an executable.
    write(&s.join("links/pair-a"), b"pair");
    fs::hard_link(s.join("links/pair-a"), s.join("links/pair-b")).expect("ln");
    write(&s.join("t1/x"), b"triple");
    for n in ["t2/y", "t3/z"] {
        fs::create_dir_all(s.join(n).parent().expect("parent")).expect("mkdir");
        fs::hard_link(s.join("t1/x"), s.join(n)).expect("ln");
    }
    let ping = s.join("bin/ping-like");
    fs::create_dir_all(s.join("bin")).expect("mkdir");
    fs::copy("/bin/true", &ping).expect("copy /bin/true");
    fs::hard_link(&ping, s.join("bin/ping-alias")).expect("ln");
    run("setcap", &["cap_net_raw+ep"], &ping);
    // Xattrs up to 3 KiB (ext4 keeps one 4 KiB block per inode for all of them), binary.
    let file = s.join("attrs/file.txt");
    let dir = s.join("attrs/dir");
    write(&file, b"attributes");
    fs::create_dir_all(&dir).expect("mkdir");
    for (name, size) in [("user.a", 1usize), ("user.b", 700), ("user.c", 3000)] {
        let value = hex(&rng.bytes(size));
        run("setfattr", &["-n", name, "-v", &value], &file);
        run("setfattr", &["-n", name, "-v", &value], &dir);
    }
    run("setfacl", &["-m", "u:nobody:rw"], &file);
    run("setfacl", &["-d", "-m", "g:nogroup:rx"], &dir);
    // Sparse: a 1 GiB image with three extents, a hole only, a trailing hole.
    let image = s.join("vm/disk.img");
    fs::create_dir_all(s.join("vm")).expect("mkdir");
    for off in [0, 400 * MIB, 1000 * MIB] {
        write_at(&image, 1 << 30, off, &rng.bytes(64 * 1024));
    }
    File::create(s.join("vm/hole.bin"))
        .expect("create")
        .set_len(64 * MIB)
        .expect("set_len");
    write_at(&s.join("vm/tail.bin"), 16 * MIB, 0, &rng.bytes(50_000));

    let check = |env: &Env, flags: &str| {
        assert_rsync_agrees_with(flags, &env.src, &env.rep);
        assert_holes_kept(&env.src, &env.rep);
        assert_eq!(
            xattr_dump(&file),
            xattr_dump(&env.rep.join("attrs/file.txt"))
        );
        assert_eq!(xattr_dump(&dir), xattr_dump(&env.rep.join("attrs/dir")));
        let caps = std::process::Command::new("getcap")
            .arg(env.rep.join("bin/ping-like"))
            .output()
            .expect("getcap");
        assert!(text(&caps).contains("cap_net_raw"), "{}", text(&caps));
    };
    env.mirror_ok(&[]);
    check(&env, "cHAXS");
    assert_one_inode(&env.rep, &["links/pair-a", "links/pair-b"]);
    assert_one_inode(&env.rep, &["t1/x", "t2/y", "t3/z"]);
    assert_one_inode(&env.rep, &["bin/ping-like", "bin/ping-alias"]);

    // A new link, a broken link, a changed and a removed xattr, a changed ACL, a new data
    // extent in the image.
    fs::hard_link(s.join("links/pair-a"), s.join("t1/pair-c")).expect("ln");
    fs::copy(s.join("t1/x"), s.join("t2/y.new")).expect("cp");
    fs::rename(s.join("t2/y.new"), s.join("t2/y")).expect("mv");
    run("setfattr", &["-n", "user.b", "-v", "0x00ff"], &file);
    run("setfattr", &["-x", "user.c"], &dir);
    run("setfacl", &["-m", "u:nobody:r"], &file);
    write_at(&image, 1 << 30, 700 * MIB, &rng.bytes(4096));
    env.mirror_ok(&[]);
    check(&env, "cHAXS");
    assert_one_inode(&env.rep, &["links/pair-a", "links/pair-b", "t1/pair-c"]);
    assert_one_inode(&env.rep, &["t1/x", "t3/z"]);
    assert_ne!(inode(&env.rep.join("t2/y")), inode(&env.rep.join("t1/x")));

    // The idle pass changed nothing (its log is empty): no need to re-read 2 GiB of holes.
    assert_settled_idle_pass_does_nothing(&env);
    check(&env, "HAXS");
}
