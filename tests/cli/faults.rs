//! Faults an unattended backup meets on the way to an object store (issue 23), injected by a
//! TCP proxy of the test's own between syncer and a real SeaweedFS (127.0.0.1, started and
//! stopped by the test): a server that accepts connections and never answers, one that
//! answers some requests and then stalls, one that throttles (503 SlowDown), one that is slow
//! while a large upload is cut short by SIGTERM. Every pass must end within its documented
//! bound with its documented exit code, leave no partial object under a final key, and the
//! next pass against the healthy server must converge. The same server also checks that a
//! name is freed before anything is created under it (file <-> directory and the rest).

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::common::*;
use crate::s3::{rclone, requests, restore, s3_command, server, Server, BUCKET};

/// What the proxy does to the requests that reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Forwards everything.
    Healthy,
    /// Reads every request and never answers (a frozen server, `kill -STOP`).
    Stall,
    /// Forwards the next `n` requests, then stalls.
    StallAfter(u64),
    /// Answers the next `n` requests with 503 SlowDown.
    SlowDown(u64),
    /// Forwards at about 16 MB/s a connection (a long upload).
    Slow,
    /// Forwards at about 1.5 MB/s a connection (a slow uplink: slow, never stalled).
    Crawl,
    /// Cuts the next `n` uploads (requests that start with `PUT `) half-way: half the
    /// request reaches the server, then the connection goes dead.
    Reset(u64),
}

struct Proxy {
    endpoint: String,
    fault: Arc<Mutex<Fault>>,
    /// Connections accepted so far.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

enum Step {
    Forward,
    /// Forward, after this long (the time the bytes take at a slow rate; the lock on the
    /// fault is not held meanwhile: each connection is slow on its own).
    Slow(Duration),
    Swallow,
    SlowDown,
    Cut,
}

const SLOW_DOWN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
<Message>Please reduce your request rate.</Message></Error>";

/// The time `n` bytes take at 16 MB/s.
fn slow(n: usize) -> Duration {
    Duration::from_nanos(n as u64 * 60)
}

/// The time `n` bytes take at 1.5 MB/s.
fn crawl(n: usize) -> Duration {
    Duration::from_nanos(n as u64 * 667)
}

fn starts_request(chunk: &[u8]) -> bool {
    ["GET ", "PUT ", "HEAD ", "POST ", "DELETE "]
        .iter()
        .any(|m| chunk.starts_with(m.as_bytes()))
}

impl Proxy {
    fn new(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let up = upstream.trim_start_matches("http://").to_string();
        let fault = Arc::new(Mutex::new(Fault::Healthy));
        let shared = fault.clone();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(&up) else {
                    continue;
                };
                let (f1, f2) = (shared.clone(), shared.clone());
                let (mut c_read, mut s_write) = (client.try_clone().expect("clone"), server);
                let (mut s_read, mut c_write) = (s_write.try_clone().expect("clone"), client);
                let mut answer = c_write.try_clone().expect("clone");
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = s_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let fault = *f1.lock().expect("fault");
                        if fault == Fault::Stall {
                            continue;
                        }
                        if fault == Fault::Slow {
                            std::thread::sleep(slow(n));
                        }
                        if c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_write.shutdown(Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match c_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let step = {
                            let mut f = f2.lock().expect("fault");
                            let new = starts_request(&buf[..n]);
                            match *f {
                                Fault::Healthy => Step::Forward,
                                Fault::Slow => Step::Slow(slow(n)),
                                Fault::Crawl => Step::Slow(crawl(n)),
                                Fault::Stall => Step::Swallow,
                                Fault::StallAfter(0) if new => {
                                    *f = Fault::Stall;
                                    Step::Swallow
                                }
                                Fault::StallAfter(k) if new => {
                                    *f = Fault::StallAfter(k - 1);
                                    Step::Forward
                                }
                                Fault::StallAfter(_) => Step::Forward,
                                Fault::SlowDown(k) if new && k > 0 => {
                                    *f = match k - 1 {
                                        0 => Fault::Healthy,
                                        left => Fault::SlowDown(left),
                                    };
                                    Step::SlowDown
                                }
                                Fault::SlowDown(_) => Step::Forward,
                                Fault::Reset(k) if k > 0 && buf[..n].starts_with(b"PUT ") => {
                                    *f = match k - 1 {
                                        0 => Fault::Healthy,
                                        left => Fault::Reset(left),
                                    };
                                    Step::Cut
                                }
                                Fault::Reset(_) => Step::Forward,
                            }
                        };
                        if let Step::Slow(d) = step {
                            std::thread::sleep(d);
                        }
                        match step {
                            Step::Forward | Step::Slow(_) => {
                                if s_write.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            Step::Swallow => {}
                            Step::Cut => {
                                let _ = s_write.write_all(&buf[..n / 2]);
                                break;
                            }
                            Step::SlowDown => {
                                let _ = write!(
                                    answer,
                                    "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n\
                                     Content-Length: {}\r\nConnection: close\r\n\r\n{SLOW_DOWN}",
                                    SLOW_DOWN.len()
                                );
                                break;
                            }
                        }
                    }
                    let _ = s_write.shutdown(Shutdown::Both);
                    let _ = c_read.shutdown(Shutdown::Both);
                });
            }
        });
        Proxy {
            endpoint,
            fault,
            accepted,
        }
    }

    fn set(&self, f: Fault) {
        *self.fault.lock().expect("fault") = f;
    }
}

/// The keys of the files under `prefix` (without the object of directory attributes).
fn keys(s: &Server, prefix: &str) -> Vec<String> {
    let mut k = crate::s3::keys(s, prefix);
    k.retain(|k| k != ".syncer-dirs.json");
    k
}

/// A monoshot of `env` into `s3://mirror/PREFIX` through the proxy, with `extra` arguments.
fn through(proxy: &Proxy, env: &Env, prefix: &str, extra: &[&str]) -> Command {
    let mut c = s3_command(&proxy.endpoint, "monoshot", env, prefix);
    c.args(extra);
    c
}

/// The fault gone, the next pass converges (exit 0).
fn converge(proxy: &Proxy, env: &Env, prefix: &str) {
    proxy.set(Fault::Healthy);
    let out = through(proxy, env, prefix, &[]).output().expect("run");
    assert_eq!(code(&out), 0, "{}", text(&out));
}

/// Every object under `prefix` is one whole version of its source file: the current one
/// or `old` (what the previous pass stored), never a part of either.
fn assert_whole_objects(s: &Server, prefix: &str, env: &Env, old: &dyn Fn(&str) -> Vec<u8>) {
    for key in keys(s, prefix) {
        let got = rclone(s, &["cat", &format!("X:{BUCKET}/{prefix}/{key}")]).stdout;
        let now = fs::read(env.src.join(&key)).unwrap_or_default();
        assert!(
            got == now || got == old(&key),
            "'{key}' holds neither version ({} bytes)",
            got.len()
        );
    }
}

/// Unfinished multipart uploads under `prefix`, as rclone lists them (JSON).
fn multipart_uploads(s: &Server, prefix: &str) -> String {
    let out = rclone(
        s,
        &[
            "backend",
            "list-multipart-uploads",
            &format!("X:{BUCKET}/{prefix}"),
        ],
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn no_uploads(listing: &str) -> bool {
    !listing.contains("UploadId")
}

#[test]
fn a_server_that_never_answers_ends_the_pass_with_a_timeout_naming_the_url() {
    let Some(s) = server() else { return };
    let proxy = Proxy::new(&s.endpoint);
    let env = Env::new();
    write(&env.src.join("f"), b"f");
    proxy.set(Fault::Stall);
    // 3 x --timeout in all, retries included; the margin is for process start-up only.
    let out = run_bounded(
        through(&proxy, &env, "never", &["--timeout", "2s"]),
        Duration::from_secs(3 * 2 + 6),
    );
    assert_eq!(code(&out), 2, "{}", text(&out));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(&proxy.endpoint) && err.contains("timed out after 2s"),
        "{err}"
    );
    assert!(err.contains("could not reach replica"), "{err}");
    assert!(
        !env.state.join("default.s3index.redb").exists(),
        "a run that reached no server created the index"
    );

    converge(&proxy, &env, "never");
    assert_eq!(keys(s, "never"), ["f"]);
}

#[test]
fn a_server_that_stalls_mid_pass_fails_the_entries_and_leaves_only_whole_objects() {
    let Some(s) = server() else { return };
    let proxy = Proxy::new(&s.endpoint);
    let env = Env::new();
    let files: Vec<String> = (0..12).map(|i| format!("f{i:02}.bin")).collect();
    let old = |name: &str| Rng::new(name.len() as u64 + name.as_bytes()[2] as u64).bytes(200_000);
    for f in &files {
        write(&env.src.join(f), &old(f));
    }
    let out = through(&proxy, &env, "stalls", &[]).output().expect("run");
    assert_eq!(code(&out), 0, "{}", text(&out));
    for (i, f) in files.iter().enumerate() {
        write(&env.src.join(f), &Rng::new(1000 + i as u64).bytes(200_000));
    }
    // The listing is answered; every upload after it stalls.
    proxy.set(Fault::StallAfter(1));
    let out = run_bounded(
        through(&proxy, &env, "stalls", &["--timeout", "2s"]),
        Duration::from_secs(3 * 2 + 6),
    );
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        stderr(&out).contains("timed out after 2s"),
        "{}",
        text(&out)
    );
    assert_whole_objects(s, "stalls", &env, &old);

    converge(&proxy, &env, "stalls");
    assert_whole_objects(s, "stalls", &env, &|_| Vec::new());
    assert_eq!(keys(s, "stalls"), files);
}

#[test]
fn throttling_is_retried_and_a_server_that_keeps_throttling_fails_within_the_bound() {
    let Some(s) = server() else { return };
    let proxy = Proxy::new(&s.endpoint);
    let env = Env::new();
    for i in 0..4 {
        write(&env.src.join(format!("t{i}")), &Rng::new(i).bytes(1000));
    }
    // A few 503 SlowDown answers: the retry layer backs off and the pass succeeds.
    proxy.set(Fault::SlowDown(3));
    let out = run_bounded(
        through(&proxy, &env, "slowdown", &[]),
        Duration::from_secs(60),
    );
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(keys(s, "slowdown"), ["t0", "t1", "t2", "t3"]);

    // Throttled without end: the retries are spent, the listing fails, exit 2, one line.
    write(&env.src.join("t4"), b"new");
    proxy.set(Fault::SlowDown(u64::MAX));
    let out = run_bounded(
        through(&proxy, &env, "slowdown", &["--timeout", "10s"]),
        Duration::from_secs(3 * 10 + 6),
    );
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", text(&out));
    assert!(stderr(&out).contains("SlowDown"), "{}", text(&out));
    converge(&proxy, &env, "slowdown");
    assert_eq!(keys(s, "slowdown").len(), 5);
}

#[test]
fn sigterm_ends_a_pass_stuck_on_a_stalled_server_within_seconds() {
    let Some(s) = server() else { return };
    let proxy = Proxy::new(&s.endpoint);
    let env = Env::new();
    write(&env.src.join("f"), b"f");
    proxy.set(Fault::Stall);
    // The default timeout (60 s): only the signal can end this pass early.
    let mut cmd = through(&proxy, &env, "sigterm", &[]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = ChildGuard::spawn(cmd);
    // Once its listing is on the wire (the handlers are installed before anything is sent).
    assert!(
        wait_for(Duration::from_secs(30), || proxy
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0),
        "syncer never connected"
    );
    std::thread::sleep(Duration::from_millis(200));
    kill(Pid::from_raw(child.pid() as i32), Signal::SIGTERM).expect("kill");
    let out = child.wait(Duration::from_secs(5), "a pass after SIGTERM");
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        env.schedule_log().contains("PASS END interrupted"),
        "{}",
        env.schedule_log()
    );
}

#[test]
fn sigterm_mid_multipart_upload_leaves_no_object_and_no_unfinished_upload() {
    let Some(s) = server() else { return };
    let proxy = Proxy::new(&s.endpoint);
    let env = Env::new();
    write(&env.src.join("big.bin"), &Rng::new(8).bytes(80 << 20));
    proxy.set(Fault::Slow);
    let mut cmd = through(&proxy, &env, "multipart", &[]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = ChildGuard::spawn(cmd);
    assert!(
        wait_for(Duration::from_secs(60), || !no_uploads(&multipart_uploads(
            s,
            "multipart"
        ))),
        "no multipart upload began"
    );
    kill(Pid::from_raw(child.pid() as i32), Signal::SIGTERM).expect("kill");
    let out = child.wait(Duration::from_secs(5), "a pass after SIGTERM");
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        keys(s, "multipart").is_empty(),
        "{:?}",
        keys(s, "multipart")
    );
    let left = multipart_uploads(s, "multipart");
    assert!(
        no_uploads(&left),
        "unfinished uploads left: {left}\n{}",
        text(&out)
    );

    converge(&proxy, &env, "multipart");
    assert_eq!(keys(s, "multipart"), ["big.bin"]);
}

#[test]
fn stop_returns_within_seconds_for_a_daemon_stuck_on_a_stalled_server() {
    let Some(s) = server() else { return };
    let proxy = Proxy::new(&s.endpoint);
    let env = Env::new();
    write(&env.src.join("f"), b"f");
    let mut start = s3_command(&proxy.endpoint, "start", &env, "stuck-daemon");
    start.args(["--interval", "1s"]);
    let out = run_bounded(start, Duration::from_secs(60));
    assert_eq!(code(&out), 0, "{}", text(&out));
    let stop = || {
        let mut c = syncer();
        c.arg("stop").arg("--state-dir").arg(&env.state);
        c
    };
    let _stop_anyway = Defer(Box::new(|| {
        let _ = stop().output();
    }));
    assert!(
        wait_for(Duration::from_secs(30), || env
            .schedule_log()
            .contains("PASS END ok")),
        "{}",
        env.schedule_log()
    );
    proxy.set(Fault::Stall);
    let starts = |log: &str| log.matches("PASS START").count();
    let before = starts(&env.schedule_log());
    assert!(
        wait_for(Duration::from_secs(30), || starts(&env.schedule_log())
            > before),
        "no pass began against the stalled server"
    );
    std::thread::sleep(Duration::from_millis(500));
    let out = run_bounded(stop(), Duration::from_secs(10));
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("stopped job"), "{}", text(&out));
    assert!(
        !env.state.join("default.pid").exists(),
        "the daemon left its PID file"
    );
}

/// Runs a closure when dropped (a test that fails still stops its daemon).
struct Defer<'a>(Box<dyn Fn() + 'a>);
impl Drop for Defer<'_> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Each way a name can change its kind, on a server that refuses a key beside a prefix of
/// the same name (SeaweedFS, as MinIO): the deletion that frees the name goes first.
#[test]
fn kind_changes_free_the_name_first_and_restore_exactly() {
    let Some(s) = server() else { return };
    let proxy = Proxy::new(&s.endpoint);
    let env = Env::new();
    let src = &env.src;
    write(&src.join("file-to-dir"), b"a file");
    write(&src.join("dir-to-file/inner"), b"inside");
    for i in 0..200 {
        write(
            &src.join(format!("big-dir/f{i:03}")),
            format!("{i}").as_bytes(),
        );
    }
    write(&src.join("link-to-file-target"), b"t");
    std::os::unix::fs::symlink("link-to-file-target", src.join("link-to-file")).expect("ln");
    write(&src.join("file-to-link"), b"plain");
    write(&src.join("nested/a/b"), b"deep file");
    write(&src.join("Case"), b"upper");
    // A 200-file directory turned into a file is a big deletion: the guard is told.
    let run = |what: &str| {
        let out = through(&proxy, &env, "kinds", &["--max-delete", "none"])
            .output()
            .expect("run");
        assert_eq!(code(&out), 0, "{what}: {}", text(&out));
    };
    run("first pass");

    let rm = |p: &str| {
        let p = src.join(p);
        if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(&p).expect("rm -r");
        } else {
            fs::remove_file(&p).expect("rm");
        }
    };
    rm("file-to-dir");
    write(&src.join("file-to-dir/g"), b"now a directory");
    rm("dir-to-file");
    write(&src.join("dir-to-file"), b"now a file");
    rm("big-dir");
    write(&src.join("big-dir"), b"200 files became one");
    rm("link-to-file");
    write(&src.join("link-to-file"), b"now a file");
    rm("file-to-link");
    std::os::unix::fs::symlink("Case", src.join("file-to-link")).expect("ln");
    rm("nested/a/b");
    write(&src.join("nested/a/b/c"), b"a directory where a file was");
    rm("Case");
    write(&src.join("case"), b"lower");
    run("the kinds changed");
    let restored = env.path("restored");
    let out = restore(s, &env, "kinds", &restored);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_rsync_agrees(src, &restored);

    // And back again.
    rm("file-to-dir");
    write(&src.join("file-to-dir"), b"a file again");
    rm("dir-to-file");
    write(&src.join("dir-to-file/inner"), b"a directory again");
    rm("nested/a");
    write(&src.join("nested/a"), b"a file above");
    run("changed back");
    // Another state directory: the restore job above owns the first folder.
    let other = Env::new();
    let again = other.path("restored-again");
    let out = restore(s, &other, "kinds", &again);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_rsync_agrees(src, &again);
    assert!(!Path::new(&again).join("big-dir/f000").exists());
}

/// No syncer process runs with `state` as its state directory.
fn no_daemon_of(state: &Path) -> bool {
    let out = Command::new("pgrep")
        .args(["-f", &format!("--state-dir {}", state.display())])
        .output()
        .expect("pgrep");
    out.stdout.is_empty()
}

fn assert_start_refused(out: &std::process::Output, env: &Env, says: &str) {
    assert_eq!(code(out), 2, "{}", text(out));
    let err = stderr(out);
    assert!(err.contains(says), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        !env.state.join("default.pid").exists(),
        "a PID file was left"
    );
    assert!(no_daemon_of(&env.state), "a daemon was left running");
}

#[test]
fn start_checks_the_replica_before_it_forks_and_leaves_no_daemon() {
    // A replica on a read-only filesystem.
    let env = Env::new();
    write(&env.src.join("f"), b"f");
    let _ro = Mount::with(&env.rep, &["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"]);
    let mut start = env.command("start");
    start.args(["--interval", "1h"]);
    let out = run_bounded(start, Duration::from_secs(30));
    assert_start_refused(&out, &env, "read-only file system");
    assert!(
        stderr(&out).contains(&format!("'{}'", env.rep.display())),
        "{}",
        text(&out)
    );

    let Some(s) = server() else { return };
    // A bucket that does not exist.
    let env = Env::new();
    write(&env.src.join("f"), b"f");
    let start = s3_command(&s.endpoint, "start", &env, "x");
    let args: Vec<_> = start.get_args().map(|a| a.to_owned()).collect();
    let mut start = syncer();
    crate::s3::aws_env(&mut start);
    for a in args {
        start.arg(if a == "s3://mirror/x" {
            "s3://no-such-bucket/x".into()
        } else {
            a
        });
    }
    start.args(["--interval", "1h"]);
    let out = run_bounded(start, Duration::from_secs(60));
    assert_start_refused(&out, &env, "bucket 'no-such-bucket' does not exist");

    // A wrong secret.
    let mut start = s3_command(&s.endpoint, "start", &env, "wrong-secret");
    start
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .args(["--interval", "1h"]);
    let out = run_bounded(start, Duration::from_secs(60));
    assert_start_refused(&out, &env, "SignatureDoesNotMatch");
    assert!(keys(s, "wrong-secret").is_empty());
}

#[test]
fn stop_says_when_a_daemon_did_not_stop_and_force_kills_it() {
    let env = Env::new();
    write(&env.src.join("f"), b"f");
    let mut start = env.command("start");
    start.args(["--interval", "1h"]);
    let out = run_bounded(start, Duration::from_secs(30));
    assert_eq!(code(&out), 0, "{}", text(&out));
    let pid: i32 = fs::read_to_string(env.state.join("default.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    // A test that fails still kills its daemon, and only it (a pid can be reused).
    let _kill_anyway = Defer(Box::new(move || {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("syncer") {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }));
    assert!(
        wait_for(Duration::from_secs(30), || env
            .schedule_log()
            .contains("PASS END ok")),
        "{}",
        env.schedule_log()
    );
    // A daemon that cannot act on SIGTERM.
    kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP");
    let stop = |extra: &[&str]| {
        let mut c = syncer();
        c.arg("stop").arg("--state-dir").arg(&env.state).args(extra);
        run_bounded(c, Duration::from_secs(20))
    };
    let out = stop(&["--wait", "1s"]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        stderr(&out).contains("did not stop within 1s") && stderr(&out).contains("stop --force"),
        "{}",
        text(&out)
    );
    let out = stop(&["--wait", "1s", "--force"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        text(&out).contains("killed job 'default'"),
        "{}",
        text(&out)
    );
    assert!(!env.state.join("default.pid").exists());
    // Gone, or a zombie waiting for whoever reaps orphans here.
    let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let running = state
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| !rest.starts_with('Z'));
    assert!(!running, "the daemon still runs: {state}");
    // Its replica lock went with it.
    env.mirror_ok(&[]);
}

#[test]
fn connections_cut_mid_upload_are_retried_and_a_lasting_fault_leaves_no_partial_object() {
    let Some(s) = server() else { return };
    let flaky = Proxy::new(&s.endpoint);
    let env = Env::new();
    let files = ["a.bin", "b.bin", "c.bin"];
    for (i, f) in files.iter().enumerate() {
        write(&env.src.join(f), &Rng::new(i as u64).bytes(300_000));
    }
    let run = || {
        s3_command(&flaky.endpoint, "monoshot", &env, "flaky")
            .output()
            .expect("run")
    };

    // Two uploads cut: retried, and the pass still succeeds.
    flaky.set(Fault::Reset(2));
    let out = run();
    assert_eq!(code(&out), 0, "{}", text(&out));
    for f in files {
        let cat = rclone(s, &["cat", &format!("X:{BUCKET}/flaky/{f}")]);
        assert_eq!(cat.stdout, fs::read(env.src.join(f)).expect("read"), "{f}");
    }

    // Every upload cut: after the retries, a per-entry error (exit 1), and the key keeps
    // the previous whole object.
    let old = fs::read(env.src.join("b.bin")).expect("read");
    write(&env.src.join("b.bin"), &Rng::new(99).bytes(300_000));
    flaky.set(Fault::Reset(u64::MAX));
    let out = run();
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(stderr(&out).contains("b.bin"), "{}", text(&out));
    assert_eq!(
        rclone(s, &["cat", &format!("X:{BUCKET}/flaky/b.bin")]).stdout,
        old,
        "a partial or new object under the key"
    );

    // The fault gone, the next pass converges.
    flaky.set(Fault::Healthy);
    let out = run();
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(
        rclone(s, &["cat", &format!("X:{BUCKET}/flaky/b.bin")]).stdout,
        fs::read(env.src.join("b.bin")).expect("read")
    );
}

/// A process killed with SIGKILL mid-upload aborts nothing; the index remembers the upload,
/// and the next pass aborts what was left. A pass with nothing recorded sends no request
/// for it.
#[test]
fn the_next_pass_aborts_the_multipart_upload_a_killed_process_left() {
    let Some(s) = server() else { return };
    let proxy = Proxy::new(&s.endpoint);
    let env = Env::new();
    let content = Rng::new(23).bytes(80 << 20);
    write(&env.src.join("big.bin"), &content);
    proxy.set(Fault::Slow);
    let mut cmd = through(&proxy, &env, "sigkill", &[]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = ChildGuard::spawn(cmd);
    assert!(
        wait_for(Duration::from_secs(60), || !no_uploads(&multipart_uploads(
            s, "sigkill"
        ))),
        "no multipart upload began"
    );
    kill(Pid::from_raw(child.pid() as i32), Signal::SIGKILL).expect("kill");
    let out = child.wait(Duration::from_secs(5), "a pass after SIGKILL");
    assert_eq!(out.status.code(), None, "not killed: {}", text(&out));
    let left = multipart_uploads(s, "sigkill");
    assert!(!no_uploads(&left), "no unfinished upload was left: {left}");

    proxy.set(Fault::Healthy);
    let out = through(&proxy, &env, "sigkill", &[]).output().expect("run");
    assert_eq!(code(&out), 0, "{}", text(&out));
    let got = rclone(s, &["cat", &format!("X:{BUCKET}/sigkill/big.bin")]).stdout;
    assert!(got == content, "the object differs from the source");
    let left = multipart_uploads(s, "sigkill");
    assert!(no_uploads(&left), "unfinished uploads left: {left}");
    // The objects' listing and the uploads' listing; at least one abort beside the upload.
    let (list, _, _, _, delete) = requests(&env);
    assert!(list >= 2 && delete >= 1, "{}", env.schedule_log());

    // Nothing recorded any more: an idle pass is one listing, as ever.
    let out = through(&proxy, &env, "sigkill", &[]).output().expect("run");
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(requests(&env), (1, 0, 0, 0, 0), "{}", env.schedule_log());
}

/// `--timeout` is a bound on a stall, not on a transfer: an 8 MiB upload that takes several
/// times `--timeout` over a slow link goes through.
#[test]
fn a_slow_link_is_not_a_dead_one() {
    let Some(s) = server() else { return };
    let proxy = Proxy::new(&s.endpoint);
    let env = Env::new();
    let content = Rng::new(31).bytes(8 << 20);
    write(&env.src.join("eight.bin"), &content);
    proxy.set(Fault::Crawl);
    let out = run_bounded(
        through(&proxy, &env, "crawl", &["--timeout", "1s"]),
        Duration::from_secs(90),
    );
    assert_eq!(code(&out), 0, "{}", text(&out));
    let got = rclone(s, &["cat", &format!("X:{BUCKET}/crawl/eight.bin")]).stdout;
    assert!(got == content, "the object differs from the source");
}

/// A whole bucket as the replica is refused (a mirror would delete every other prefix in it)
/// unless `--allow-bucket-root` says it is meant.
#[test]
fn a_bucket_root_replica_needs_allow_bucket_root() {
    let Some(s) = server() else { return };
    let env = Env::new();
    write(&env.src.join("f"), b"f");
    let root = |bucket: &str, extra: &[&str]| {
        let mut c = syncer();
        crate::s3::aws_env(&mut c)
            .arg("monoshot")
            .arg("--source")
            .arg(&env.src)
            .args(["--replica", &format!("s3://{bucket}"), "--s3-endpoint"])
            .arg(&s.endpoint)
            .arg("--state-dir")
            .arg(&env.state)
            .args(extra);
        run_bounded(c, Duration::from_secs(60))
    };
    let out = root(BUCKET, &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(
        stderr(&out).contains("is a whole bucket") && stderr(&out).contains("--allow-bucket-root"),
        "{}",
        text(&out)
    );
    // Refused with the arguments, before the server or any state file is touched.
    assert!(!env.state.exists(), "the refused run wrote state");
    // Allowed, the run goes on to the server (a bucket that does not exist, so that no other
    // test's objects are at stake).
    let out = root("no-such-root-bucket", &["--allow-bucket-root"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(
        stderr(&out).contains("bucket 'no-such-root-bucket' does not exist"),
        "{}",
        text(&out)
    );
}
