//! `--replica s3://BUCKET/PREFIX` (issue 12) against a real S3 server: SeaweedFS, started
//! once per test binary on 127.0.0.1 on free ports (`.ci/run` installs it), stopped when the
//! tests end. Each test works under a prefix of its own in the bucket `mirror`. rclone, the
//! reference client, checks what is in the bucket independently of syncer.
//!
//! Without `weed` the tests skip with a message on a developer's machine; with `CI` set they
//! fail instead.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::common::*;

pub const BUCKET: &str = "mirror";
const KEY: &str = "testkey";
const SECRET: &str = "testsecret";

pub struct Server {
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

fn weed() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SYNCER_WEED") {
        return Some(PathBuf::from(p));
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/seaweedfs/bin/weed");
    if local.exists() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("weed"))
            .find(|p| p.exists())
    })
}

/// A free TCP port on 127.0.0.1 whose gRPC twin (+10000) is free too.
pub fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        if port < 55000 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

fn start_server() -> Result<Server, String> {
    let weed = weed().ok_or("SeaweedFS's `weed` was not found (.ci/run installs it)")?;
    let dir = tempfile::Builder::new()
        .prefix("syncer-s3-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let config = dir.path().join("s3.json");
    fs::write(
        &config,
        format!(
            r#"{{"identities":[{{"name":"admin","credentials":[{{"accessKey":"{KEY}","secretKey":"{SECRET}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        ),
    )
    .map_err(|e| e.to_string())?;
    let data = dir.path().join("data");
    fs::create_dir(&data).map_err(|e| e.to_string())?;
    let s3 = free_port();
    let mut cmd = Command::new(&weed);
    cmd.arg("mini")
        .arg(format!("-dir={}", data.display()))
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
        .arg(format!("-s3.port={s3}"))
        .arg(format!("-master.port={}", free_port()))
        .arg(format!("-volume.port={}", free_port()))
        .arg(format!("-filer.port={}", free_port()))
        .arg(format!("-admin.port={}", free_port()))
        .arg(format!("-s3.config={}", config.display()))
        .args([
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ])
        .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
        .arg(format!("-bucket={BUCKET}"))
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.path().join("weed.log")).map_err(|e| e.to_string())?);
    // The server ends with the thread that started it: a thread that lives as long as the
    // test binary, so SeaweedFS gets SIGTERM when the tests end, however they end.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let child = cmd.spawn();
        let ok = child.is_ok();
        let _ = tx.send(child.map(|_| ()).map_err(|e| e.to_string()));
        if ok {
            loop {
                std::thread::park();
            }
        }
    });
    rx.recv()
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("could not start {}: {e}", weed.display()))?;
    let server = Server {
        endpoint: format!("http://127.0.0.1:{s3}"),
        _dir: dir,
    };
    // Ready once a real upload succeeds (the S3 port answers 403 before that).
    let probe = Env::new();
    write(&probe.src.join("ready"), b"ready");
    let ready = wait_for(Duration::from_secs(60), || {
        let out = s3_command(&server.endpoint, "monoshot", &probe, "ready-probe")
            .arg("-q")
            .output()
            .expect("run syncer");
        out.status.success()
    });
    if !ready {
        let log = fs::read_to_string(server._dir.path().join("weed.log")).unwrap_or_default();
        return Err(format!("SeaweedFS did not become ready:\n{log}"));
    }
    Ok(server)
}

/// The shared server, or `None` (skip) when SeaweedFS is missing outside CI.
pub fn server() -> Option<&'static Server> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    match SERVER.get_or_init(start_server) {
        Ok(s) => Some(s),
        Err(e) if std::env::var_os("CI").is_some() => panic!("{e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

/// `syncer SUB --source S --replica s3://mirror/PREFIX --state-dir T`, with the test
/// server's endpoint and credentials in the environment (as users give them).
pub fn s3_command(endpoint: &str, sub: &str, env: &Env, prefix: &str) -> Command {
    let mut c = syncer();
    aws_env(&mut c)
        .arg(sub)
        .arg("--source")
        .arg(&env.src)
        .arg("--replica")
        .arg(format!("s3://{BUCKET}/{prefix}"))
        .arg("--s3-endpoint")
        .arg(endpoint)
        .arg("--state-dir")
        .arg(&env.state);
    c
}

pub fn aws_env(c: &mut Command) -> &mut Command {
    c.env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_REGION")
}

/// rclone against the test server (the reference client; configured from the
/// environment, no config file).
pub fn rclone(s: &Server, args: &[&str]) -> Output {
    let out = Command::new("rclone")
        .env_remove("AWS_CA_BUNDLE")
        .env("RCLONE_CONFIG_X_TYPE", "s3")
        .env("RCLONE_CONFIG_X_PROVIDER", "Other")
        .env("RCLONE_CONFIG_X_ENV_AUTH", "false")
        .env("RCLONE_CONFIG_X_ACCESS_KEY_ID", KEY)
        .env("RCLONE_CONFIG_X_SECRET_ACCESS_KEY", SECRET)
        .env("RCLONE_CONFIG_X_ENDPOINT", &s.endpoint)
        .env("RCLONE_CONFIG_X_FORCE_PATH_STYLE", "true")
        .env("RCLONE_CONFIG_X_REGION", "us-east-1")
        .env("RCLONE_CONFIG", "/dev/null")
        .args(args)
        .output()
        .expect("rclone (.ci/run installs it)");
    assert!(out.status.success(), "rclone {args:?}: {}", text(&out));
    out
}

/// The keys under `prefix`, sorted, as rclone lists them.
pub fn keys(s: &Server, prefix: &str) -> Vec<String> {
    let out = rclone(
        s,
        &["lsf", "-R", "--files-only", &format!("X:{BUCKET}/{prefix}")],
    );
    let mut k: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    k.sort();
    k
}

/// The `requests …` part of the last PASS END line: (list, head, get, put, delete).
pub fn requests(env: &Env) -> (u64, u64, u64, u64, u64) {
    requests_of(env, "default")
}

/// The same, for the job `name`.
fn requests_of(env: &Env, name: &str) -> (u64, u64, u64, u64, u64) {
    let log =
        fs::read_to_string(env.state.join(format!("{name}.schedule.log"))).unwrap_or_default();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("PASS END"))
        .expect("a PASS END line")
        .to_string();
    let part = line
        .split("requests ")
        .nth(1)
        .unwrap_or_else(|| panic!("no requests in {line}"));
    let n: Vec<u64> = part
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().expect("number"))
        .collect();
    (n[0], n[1], n[2], n[3], n[4])
}

struct Job<'a> {
    s: &'a Server,
    env: Env,
    prefix: String,
}

impl Job<'_> {
    fn new<'a>(s: &'a Server, prefix: &str) -> Job<'a> {
        Job {
            s,
            env: Env::new(),
            prefix: prefix.to_string(),
        }
    }
    fn cmd(&self, extra: &[&str]) -> Command {
        let mut c = s3_command(&self.s.endpoint, "monoshot", &self.env, &self.prefix);
        c.args(extra);
        c
    }
    fn run(&self, extra: &[&str]) -> Output {
        self.cmd(extra).output().expect("run syncer")
    }
    fn ok(&self, extra: &[&str]) -> Output {
        let out = self.run(extra);
        assert_eq!(code(&out), 0, "{}", text(&out));
        out
    }
    /// Restores the bucket with rclone (`copy --metadata --links`) and checks content,
    /// mode and mtime of every source file whose name needs no escaping.
    fn assert_rclone_restores_the_source(&self) {
        let out = self.env.path(&format!("rclone-{}", rand_suffix()));
        rclone(
            self.s,
            &[
                "copy",
                "--metadata",
                "--links",
                &format!("X:{BUCKET}/{}", self.prefix),
                out.to_str().expect("utf-8"),
            ],
        );
        let mut checked = 0;
        for e in walkdir::WalkDir::new(&self.env.src)
            .into_iter()
            .filter_map(|e| e.ok())
        {
            let rel = e.path().strip_prefix(&self.env.src).expect("below");
            let plain = rel
                .to_str()
                .is_some_and(|s| !s.contains('%') && !s.ends_with(".rclonelink"));
            if !e.file_type().is_file() || !plain {
                continue;
            }
            let got = out.join(rel);
            assert_eq!(
                fs::read(e.path()).expect("read"),
                fs::read(&got).unwrap_or_else(|err| panic!("{}: {err}", got.display())),
                "content of {}",
                rel.display()
            );
            let (a, b) = (
                fs::metadata(e.path()).expect("stat"),
                fs::metadata(&got).expect("stat"),
            );
            assert_eq!(
                a.permissions().mode() & 0o7777,
                b.permissions().mode() & 0o7777,
                "mode of {}",
                rel.display()
            );
            assert_eq!(
                a.modified().expect("mtime"),
                b.modified().expect("mtime"),
                "mtime of {}",
                rel.display()
            );
            checked += 1;
        }
        assert!(checked > 0, "no file checked");
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
}

/// A small tree with every kind of entry and name an S3 replica must carry.
fn fill(src: &Path) {
    let mut rng = Rng::new(5);
    for i in 0..30 {
        let n = rng.below(5000) as usize;
        write(&src.join(format!("d{}/f{i}.bin", i % 3)), &rng.bytes(n));
    }
    write(&src.join("d0/deeper/x.txt"), b"deep");
    fs::create_dir_all(src.join("empty")).expect("mkdir");
    chmod(&src.join("d1/f1.bin"), 0o600);
    chmod(&src.join("d2/f2.bin"), 0o755);
    write(&src.join("100%.txt"), b"percent");
    write(&src.join(os(b"bad-\xff-name").as_os_str()), b"not utf-8");
    write(&src.join("x.rclonelink"), b"a file, not a link");
    std::os::unix::fs::symlink("d0/deeper/x.txt", src.join("link")).expect("ln -s");
    set_mtime(&src.join("d0/f0.bin"), 1_600_000_000, 123_456_789);
}

#[test]
fn a_tree_is_mirrored_into_a_bucket_and_an_idle_pass_is_one_listing() {
    let Some(s) = server() else { return };
    let job = Job::new(s, "tree");
    fill(&job.env.src);
    // One file large enough for a multipart upload.
    write(&job.env.src.join("big.img"), &Rng::new(9).bytes(18 << 20));
    job.ok(&[]);
    let k = keys(s, "tree");
    for want in [
        "100%25.txt",
        "bad-%FF-name",
        "x%2Erclonelink",
        "link.rclonelink",
        "big.img",
        "d0/deeper/x.txt",
        ".syncer-dirs.json",
    ] {
        assert!(k.contains(&want.to_string()), "{want} not in {k:?}");
    }
    job.assert_rclone_restores_the_source();

    // The next pass: one listing, no HEAD, no GET, nothing written.
    let before = job.env.io_log();
    job.ok(&[]);
    assert_eq!(requests(&job.env), (1, 0, 0, 0, 0));
    assert_eq!(job.env.io_log(), before, "the idle pass changed something");
}

#[test]
fn changes_deletions_and_drift_converge_and_a_lost_cache_costs_heads_only() {
    let Some(s) = server() else { return };
    let job = Job::new(s, "changes");
    fill(&job.env.src);
    job.ok(&[]);

    // A content change, a mode change, a deletion of a file and of a directory.
    write(&job.env.src.join("d0/f3.bin"), b"new content");
    chmod(&job.env.src.join("d1/f4.bin"), 0o640);
    fs::remove_file(job.env.src.join("d2/f5.bin")).expect("rm");
    fs::remove_dir_all(job.env.src.join("d0/deeper")).expect("rm -r");
    fs::remove_file(job.env.src.join("link")).expect("rm");
    job.ok(&[]);
    let log = job.env.io_log();
    assert!(log.contains("UPDATE d0/f3.bin"), "{log}");
    assert!(log.contains("DELETE d2/f5.bin"), "{log}");
    let k = keys(s, "changes");
    assert!(!k.iter().any(|k| k.starts_with("d0/deeper")), "{k:?}");
    assert!(!k.contains(&"d2/f5.bin".to_string()), "{k:?}");
    assert!(!k.contains(&"link.rclonelink".to_string()), "{k:?}");
    let (_, _, _, _, deletes) = requests(&job.env);
    assert_eq!(deletes, 1, "three deletions in one batched request");
    job.assert_rclone_restores_the_source();

    // An object overwritten behind syncer's back: DRIFT, restored.
    let intruder = job.env.path("intruder");
    fs::write(&intruder, b"someone else's bytes").expect("write");
    rclone(
        s,
        &[
            "copyto",
            intruder.to_str().expect("utf-8"),
            &format!("X:{BUCKET}/changes/d1/f1.bin"),
        ],
    );
    job.ok(&[]);
    let log = job.env.io_log();
    assert!(log.contains("DRIFT d1/f1.bin"), "{log}");
    let cat = rclone(s, &["cat", &format!("X:{BUCKET}/changes/d1/f1.bin")]);
    assert_eq!(
        cat.stdout,
        fs::read(job.env.src.join("d1/f1.bin")).expect("read")
    );

    // A lost cache and index: HEADs only, never a GET or an upload.
    fs::remove_dir_all(&job.env.state).expect("rm state");
    job.ok(&[]);
    let (list, head, get, put, delete) = requests(&job.env);
    assert_eq!(
        (list, get, put, delete),
        (1, 1, 0, 0),
        "one GET: the directory object"
    );
    assert!(head > 0);
    let (list, head, get, put, delete) = {
        job.ok(&[]);
        requests(&job.env)
    };
    assert_eq!((list, head, get, put, delete), (1, 0, 0, 0, 0));
}

#[test]
fn the_emptied_source_guard_deletes_nothing_from_the_bucket() {
    let Some(s) = server() else { return };
    let job = Job::new(s, "guard");
    fill(&job.env.src);
    // The default guard judges replicas of 100 entries or more.
    for i in 0..100 {
        write(&job.env.src.join(format!("many/{i}")), b"x");
    }
    job.ok(&[]);
    let before = keys(s, "guard");
    for e in fs::read_dir(&job.env.src).expect("ls") {
        let p = e.expect("entry").path();
        if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(&p).expect("rm");
        } else {
            fs::remove_file(&p).expect("rm");
        }
    }
    let out = job.run(&[]);
    assert_eq!(code(&out), 3, "{}", text(&out));
    assert_eq!(keys(s, "guard"), before);
}

#[test]
fn bad_credentials_and_a_missing_bucket_exit_2_naming_the_url() {
    let Some(s) = server() else { return };
    let env = Env::new();
    write(&env.src.join("f"), b"f");
    let mut c = s3_command(&s.endpoint, "monoshot", &env, "creds");
    c.env("AWS_SECRET_ACCESS_KEY", "wrong-secret");
    let out = c.output().expect("run");
    assert_eq!(code(&out), 2, "{}", text(&out));
    let err = stderr(&out);
    assert!(err.contains("s3://mirror/creds"), "{err}");
    assert!(
        err.contains(
            "access denied to s3://mirror (SignatureDoesNotMatch: check AWS_SECRET_ACCESS_KEY)"
        ),
        "{err}"
    );
    assert!(
        !err.contains("wrong-secret"),
        "a secret in the output: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let mut c = syncer();
    aws_env(&mut c)
        .arg("monoshot")
        .arg("--source")
        .arg(&env.src)
        .args(["--replica", "s3://no-such-bucket/x", "--s3-endpoint"])
        .arg(&s.endpoint)
        .arg("--state-dir")
        .arg(&env.state);
    let out = c.output().expect("run");
    assert_eq!(code(&out), 2, "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("could not reach replica 's3://no-such-bucket/x'"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "bucket 'no-such-bucket' does not exist at {}",
            s.endpoint
        )),
        "{err}"
    );

    // Nothing listening: after the retries, exit 2 naming the URL and the cause.
    let closed = free_port();
    let env = Env::new();
    write(&env.src.join("f"), b"f");
    let out = s3_command(&format!("http://127.0.0.1:{closed}"), "monoshot", &env, "x")
        .output()
        .expect("run");
    assert_eq!(code(&out), 2, "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("s3://mirror/x") && err.contains("onnection refused"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn a_pass_killed_mid_upload_leaves_no_partial_object_and_the_next_converges() {
    let Some(s) = server() else { return };
    let job = Job::new(s, "killed");
    let big = job.env.src.join("big.bin");
    let content = Rng::new(3).bytes(96 << 20);
    write(&big, &content);
    let mut child = job.cmd(&["-q"]).spawn().expect("spawn");
    // Killed once the upload is under way (some part has reached the server).
    std::thread::sleep(Duration::from_millis(1500));
    let _ = child.kill();
    let _ = child.wait();
    // Either no object, or the whole one: never a part of it.
    let listed = rclone(s, &["lsl", &format!("X:{BUCKET}/killed")]);
    let text_ = String::from_utf8_lossy(&listed.stdout).to_string();
    for line in text_.lines().filter(|l| l.ends_with("big.bin")) {
        let size: u64 = line.split_whitespace().next().unwrap().parse().unwrap();
        assert_eq!(size, content.len() as u64, "a partial object: {line}");
    }
    job.ok(&[]);
    let cat = rclone(s, &["cat", &format!("X:{BUCKET}/killed/big.bin")]);
    assert!(cat.stdout == content, "the object differs from the source");
}

/// `syncer monoshot --source s3://… --replica DIR`: a restore.
pub fn restore(s: &Server, env: &Env, prefix: &str, into: &Path) -> Output {
    let mut c = syncer();
    aws_env(&mut c)
        .arg("monoshot")
        .arg("--source")
        .arg(format!("s3://{BUCKET}/{prefix}"))
        .arg("--replica")
        .arg(into)
        .args(["--s3-endpoint", &s.endpoint, "--name", "restore"])
        .arg("--state-dir")
        .arg(&env.state);
    c.output().expect("run syncer")
}

/// `syncer forget --name restore`: frees the job name `restore` for another pair.
fn forget_restore(env: &Env) {
    let out = syncer()
        .args(["forget", "--name", "restore", "--state-dir"])
        .arg(&env.state)
        .output()
        .expect("forget");
    assert_eq!(code(&out), 0, "{}", text(&out));
}

#[test]
fn a_restore_from_the_bucket_recreates_the_tree_exactly() {
    let Some(s) = server() else { return };
    let job = Job::new(s, "restore");
    fill(&job.env.src);
    write(&job.env.src.join("big.img"), &Rng::new(4).bytes(17 << 20));
    std::os::unix::fs::chown(job.env.src.join("d1/f7.bin"), Some(1234), Some(4321)).expect("chown");
    chmod(&job.env.src.join("d2"), 0o750);
    set_mtime(&job.env.src.join("empty"), 1_500_000_000, 42);
    job.ok(&[]);

    let into = job.env.path("restored");
    let out = restore(s, &job.env, "restore", &into);
    assert_eq!(code(&out), 0, "{}", text(&out));
    // Content, modes, mtimes, owners, symlinks, empty directories and exact name bytes.
    assert_rsync_agrees(&job.env.src, &into);
    assert_trees_equal(&job.env.src, &into);

    // A restore again: nothing to do, and no object is read.
    let out = restore(s, &job.env, "restore", &into);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let (_, _, get, put, _) = requests_of(&job.env, "restore");
    assert_eq!((get, put), (0, 0));

    // An object whose bytes no longer match the sha256 stored with it is not restored.
    let forged = job.env.path("forged");
    fs::write(&forged, b"forged bytes").expect("write");
    let stored = {
        let out = rclone(
            s,
            &["lsjson", "-M", &format!("X:{BUCKET}/restore/d0/f3.bin")],
        );
        let t = String::from_utf8_lossy(&out.stdout).to_string();
        let at = t.find("\"sha256\":\"").expect("sha256 metadata") + 10;
        t[at..at + 64].to_string()
    };
    rclone(
        s,
        &[
            "copyto",
            "--metadata",
            "--metadata-set",
            &format!("sha256={stored}"),
            forged.to_str().expect("utf-8"),
            &format!("X:{BUCKET}/restore/d0/f3.bin"),
        ],
    );
    let again = job.env.path("restored-2");
    // Another target is another pair: the job is forgotten first (issue 23).
    forget_restore(&job.env);
    let out = restore(s, &job.env, "restore", &again);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        stderr(&out).contains("d0/f3.bin") && stderr(&out).contains("sha256"),
        "{}",
        text(&out)
    );
    assert!(
        !again.join("d0/f3.bin").exists(),
        "a forged file was restored"
    );
    assert_eq!(
        fs::read(again.join("d0/f6.bin")).expect("read"),
        fs::read(job.env.src.join("d0/f6.bin")).expect("read")
    );

    // An empty prefix (a typo, a bucket not yet filled) is no source: exit 2, nothing made.
    let none = job.env.path("from-nothing");
    forget_restore(&job.env);
    let out = restore(s, &job.env, "no-such-prefix", &none);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(
        stderr(&out).contains("s3://mirror/no-such-prefix"),
        "{}",
        text(&out)
    );
    assert!(!none.exists());
}

#[test]
fn a_restore_of_one_folder_gives_its_root_the_folder_attributes() {
    let Some(s) = server() else { return };
    let job = Job::new(s, "whole/tree");
    fill(&job.env.src);
    let d1 = job.env.src.join("d1");
    chmod(&d1, 0o750);
    set_mtime(&d1, 1_400_000_000, 7);
    job.ok(&[]);
    let into = job.env.path("only-d1");
    let out = restore(s, &job.env, "whole/tree/d1", &into);
    assert_eq!(code(&out), 0, "{}", text(&out));
    // The root too: its mode and mtime are d1's, not a default and 1970.
    assert_rsync_agrees(&d1, &into);
    let m = fs::metadata(&into).expect("stat");
    assert_eq!(m.permissions().mode() & 0o7777, 0o750);
    assert_eq!(
        m.modified().expect("mtime"),
        fs::metadata(&d1).expect("stat").modified().expect("mtime")
    );
}

#[test]
fn backup_dir_keeps_overwritten_and_deleted_objects_by_server_side_copy() {
    let Some(s) = server() else { return };
    let job = Job::new(s, "kept/live");
    fill(&job.env.src);
    job.ok(&[]);
    let old_f3 = fs::read(job.env.src.join("d0/f3.bin")).expect("read");
    let old_f5 = fs::read(job.env.src.join("d2/f5.bin")).expect("read");
    write(&job.env.src.join("d0/f3.bin"), b"replaced");
    fs::remove_file(job.env.src.join("d2/f5.bin")).expect("rm");
    let backup = format!("s3://{BUCKET}/kept/old");
    job.ok(&["--backup-dir", &backup]);
    let log = job.env.io_log();
    assert!(log.contains("BACKUP d0/f3.bin"), "{log}");
    assert!(log.contains("BACKUP d2/f5.bin"), "{log}");
    let kept = keys(s, "kept/old");
    assert_eq!(kept.len(), 2, "{kept:?}");
    let find = |suffix: &str| {
        let k = kept.iter().find(|k| k.ends_with(suffix)).expect(suffix);
        rclone(s, &["cat", &format!("X:{BUCKET}/kept/old/{k}")]).stdout
    };
    assert_eq!(find("d0/f3.bin"), old_f3);
    assert_eq!(find("d2/f5.bin"), old_f5);
    assert!(!keys(s, "kept/live").contains(&"d2/f5.bin".to_string()));

    // A backup prefix inside the replica's, or in another bucket, is refused up front.
    for bad in [
        format!("s3://{BUCKET}/kept/live/b"),
        "s3://other/x".to_string(),
    ] {
        let out = job.run(&["--backup-dir", &bad]);
        assert_eq!(code(&out), 2, "{}", text(&out));
    }
}

#[test]
fn dry_run_writes_nothing_and_a_daemon_mirrors_into_the_bucket() {
    let Some(s) = server() else { return };
    let job = Job::new(s, "daemon");
    fill(&job.env.src);
    let out = job.run(&["--dry-run"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("would CREATE d0/f0.bin"));
    assert!(
        keys(s, "daemon").is_empty(),
        "a dry run wrote to the bucket"
    );

    let mut start = s3_command(&s.endpoint, "start", &job.env, "daemon");
    let out = start.args(["--interval", "1s"]).output().expect("start");
    assert_eq!(code(&out), 0, "{}", text(&out));
    let stop = || {
        let mut c = syncer();
        c.arg("stop").arg("--state-dir").arg(&job.env.state);
        c.output().expect("stop")
    };
    let listed = wait_for(Duration::from_secs(30), || {
        keys(s, "daemon").contains(&"d0/deeper/x.txt".to_string())
    });
    // Then a change in the source reaches the bucket at a later pass.
    write(&job.env.src.join("later.txt"), b"later");
    let followed = wait_for(Duration::from_secs(30), || {
        keys(s, "daemon").contains(&"later.txt".to_string())
    });
    let status = {
        let mut c = syncer();
        c.args(["status", "--json", "--state-dir"])
            .arg(&job.env.state);
        c.output().expect("status")
    };
    let out = stop();
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        listed && followed,
        "the daemon did not mirror into the bucket"
    );
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(status.contains("s3://mirror/daemon"), "{status}");
    assert!(status.contains("\"requests\""), "{status}");
}

#[test]
fn checksum_compares_the_source_with_the_sha256_stored_in_each_object() {
    let Some(s) = server() else { return };
    let job = Job::new(s, "scrub");
    fill(&job.env.src);
    job.ok(&[]);
    // The same bytes (so the same ETag) with a wrong stored sha256: invisible to a normal
    // pass, which trusts its index for an unchanged ETag.
    let key = format!("X:{BUCKET}/scrub/d0/f0.bin");
    rclone(
        s,
        &[
            "copyto",
            "--ignore-times",
            "--metadata",
            "--metadata-set",
            &format!("sha256={}", "0".repeat(64)),
            job.env.src.join("d0/f0.bin").to_str().expect("utf-8"),
            &key,
        ],
    );
    let before = job.env.io_log();
    job.ok(&[]);
    assert_eq!(job.env.io_log(), before);
    // --checksum re-hashes the source and reads each stored sha256 (HEADs, no GET).
    job.ok(&["--checksum"]);
    let log = job.env.io_log()[before.len()..].to_string();
    assert!(log.contains(" d0/f0.bin"), "{log}");
    assert_eq!(
        log.lines().filter(|l| l.contains("sha256=")).count(),
        1,
        "{log}"
    );
    let (_, head, get, put, _) = requests(&job.env);
    assert!(head >= 30, "one HEAD per object: {head}");
    assert_eq!((get, put), (0, 1));
}

/// A dry run reads the index and writes no state (issue 23): with no state yet it makes
/// none, and an idle one makes no HEAD, hashes nothing, and leaves every file as it was.
#[test]
fn a_dry_run_reads_the_index_and_writes_no_state() {
    let Some(s) = server() else { return };
    let job = Job::new(s, "dry-index");
    fill(&job.env.src);
    let out = job.run(&["--dry-run"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        !job.env.state.exists(),
        "a dry run made the state directory"
    );
    let_source_age_past_racy_window(&job.env.src);
    job.ok(&[]);
    let before = snapshot(&job.env.state);
    let out = job.run(&["--dry-run"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    let end = said.lines().find(|l| l.contains("PASS END")).unwrap_or("");
    assert!(end.contains("hashed 0 files / 0 bytes"), "{said}");
    assert!(end.contains(", head 0, get 0, put 0, delete 0"), "{said}");
    assert!(snapshot(&job.env.state) == before, "a dry run wrote state");
}
