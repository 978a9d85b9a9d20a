//! The daemon: `syncer start/stop/status` with real forked daemons and real signals.
//!
//! Every test owns its own scratch area and state directory (tests run in parallel threads)
//! and wraps it in a `Jobs` guard whose `Drop` runs `syncer stop --all` and SIGKILLs every
//! daemon pid the test saw, so no daemon outlives a test, even one that fails.

use std::cell::RefCell;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::*;

/// How long a poll waits for something the daemon should do "at once" (generous: the tests
/// of every module share two cores).
const DEADLINE: Duration = Duration::from_secs(20);

/// A scratch area plus every daemon started in it; stops them all when dropped.
struct Jobs {
    env: Env,
    pids: RefCell<Vec<i32>>,
}

impl Jobs {
    fn new() -> Jobs {
        Jobs {
            env: Env::new(),
            pids: RefCell::new(Vec::new()),
        }
    }

    fn root(&self) -> &Path {
        self.env.tmp.path()
    }

    /// `syncer ARGS` run in the scratch area, so relative paths resolve there.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = syncer();
        c.current_dir(self.root()).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run syncer")
    }

    /// `syncer start` with relative paths (`src`, `rep`, `state`) plus `extra`.
    fn start_raw(&self, replica: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "start",
            "--source",
            "src",
            "--replica",
            replica,
            "--state-dir",
            "state",
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// Starts a job and asserts it started: exit 0, the pid printed, a live process behind
    /// the PID file. Returns the pid.
    fn start(&self, replica: &str, extra: &[&str]) -> i32 {
        let out = self.start_raw(replica, extra);
        if let Some(pid) = printed_pid(&out) {
            self.pids.borrow_mut().push(pid);
        }
        assert_eq!(code(&out), 0, "start failed:\n{}", text(&out));
        let pid = printed_pid(&out).unwrap_or_else(|| panic!("no pid printed:\n{}", text(&out)));
        assert!(alive(pid), "no live process behind the printed pid {pid}");
        let name = job_name(extra);
        assert_eq!(
            self.pid_file(&name),
            Some(pid),
            "the PID file names another process"
        );
        pid
    }

    /// The pid recorded in `<name>.pid`, if the file exists and reads.
    fn pid_file(&self, name: &str) -> Option<i32> {
        let text = fs::read_to_string(self.env.state.join(format!("{name}.pid"))).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    fn status_json(&self, extra: &[&str]) -> Value {
        let mut args = vec!["status", "--json", "--state-dir", "state"];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        assert_eq!(code(&out), 0, "status failed:\n{}", text(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{}", text(&out)))
    }

    /// Polls until the job's status file records a finished pass; returns the status.
    fn wait_last_pass(&self, extra: &[&str]) -> Value {
        let mut last = Value::Null;
        let ok = wait_for(DEADLINE, || {
            last = self.status_json(extra);
            last["last_pass"].is_object()
        });
        assert!(ok, "no pass recorded in time; status:\n{last:#}");
        last
    }

    fn schedule_log(&self) -> String {
        self.env.schedule_log()
    }
}

impl Drop for Jobs {
    fn drop(&mut self) {
        let _ = syncer()
            .args(["stop", "--all", "--state-dir"])
            .arg(&self.env.state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let mut pids = self.pids.borrow().clone();
        pids.extend(self.pid_file("default"));
        for pid in pids {
            if is_syncer(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// A `--foreground` daemon spawned as our child; killed and reaped when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn job_name(extra: &[&str]) -> String {
    extra
        .iter()
        .position(|a| *a == "--name")
        .map_or("default".to_string(), |i| extra[i + 1].to_string())
}

/// The pid in "started job 'NAME' (pid N): ...".
fn printed_pid(out: &Output) -> Option<i32> {
    let s = String::from_utf8_lossy(&out.stdout);
    let rest = &s[s.find("(pid ")? + 5..];
    rest[..rest.find(')')?].parse().ok()
}

/// The process exists and is not a zombie (orphaned daemons may wait for a reaper).
fn alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z'),
        Err(_) => false,
    }
}

/// The process is a live run of our binary (guards against killing a recycled pid).
fn is_syncer(pid: i32) -> bool {
    alive(pid)
        && fs::read_link(format!("/proc/{pid}/exe"))
            .map(|exe| exe.to_string_lossy().starts_with(&*bin().to_string_lossy()))
            .unwrap_or(false)
}

fn wait_gone(pid: i32) -> bool {
    wait_for(DEADLINE, || !alive(pid))
}

fn signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("kill -{sig} {pid}: {e}"));
}

/// `rep` mirrors `src` as far as `rsync -anic --delete` can tell. Does not panic, so it can be
/// polled while the daemon works.
fn mirrored(src: &Path, rep: &Path) -> bool {
    rsync_quiet(src, rep)
}

/// Polls until `rep` mirrors `src`, then checks it strictly (own walk + rsync).
fn assert_mirrors_soon(src: &Path, rep: &Path) {
    assert!(
        wait_for(DEADLINE, || mirrored(src, rep)),
        "the replica {} did not come to mirror {} in time",
        rep.display(),
        src.display()
    );
    assert_trees_equal(src, rep);
}

/// A few plain files and a directory: the daemon tests need a tree, not a torture test.
fn small_tree(root: &Path, count: usize) {
    for i in 0..count {
        write(
            &root.join(format!("d{}/f{i}.txt", i % 3)),
            format!("file {i}\n").as_bytes(),
        );
    }
    std::os::unix::fs::symlink("d0/f0.txt", root.join("link")).expect("symlink");
}

fn sha_file(path: &Path) -> Vec<u8> {
    Sha256::digest(fs::read(path).expect("read")).to_vec()
}

fn syncer_processes_mentioning(needle: &str) -> Vec<i32> {
    fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            is_syncer(*pid)
                && fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(needle))
                    .unwrap_or(false)
        })
        .collect()
}

#[test]
fn start_with_relative_paths_forks_a_daemon_that_mirrors_and_follows_the_source() {
    let jobs = Jobs::new();
    gen_tree(&jobs.env.src, 11, 20);
    let pid = jobs.start("rep", &["--interval", "1s"]);
    assert_mirrors_soon(&jobs.env.src, &jobs.env.rep);

    // The daemon keeps watching: a file added later appears on a following pass.
    write(
        &jobs.env.src.join("added/later.txt"),
        b"added after the first pass\n",
    );
    assert_mirrors_soon(&jobs.env.src, &jobs.env.rep);
    assert_eq!(
        fs::read(jobs.env.rep.join("added/later.txt")).unwrap(),
        b"added after the first pass\n"
    );
    assert!(alive(pid), "the daemon died after its passes");
    assert_eq!(jobs.pid_file("default"), Some(pid));
    let log = jobs.schedule_log();
    assert!(
        log.contains(&format!("DAEMON START pid {pid}")),
        "schedule log:\n{log}"
    );
    assert!(log.contains("PASS END ok"), "schedule log:\n{log}");
    // The relative paths were resolved against the caller's directory, not the daemon's "/".
    let st = jobs.status_json(&[]);
    let src = fs::canonicalize(&jobs.env.src).unwrap();
    assert_eq!(
        st["source"],
        src.to_string_lossy().as_ref(),
        "status:\n{st:#}"
    );
}

#[test]
fn second_start_of_a_running_job_exits_4_naming_the_running_pid() {
    let jobs = Jobs::new();
    small_tree(&jobs.env.src, 5);
    let pid = jobs.start("rep", &["--interval", "1s"]);

    let out = jobs.start_raw("rep", &["--interval", "1s"]);
    if let Some(p) = printed_pid(&out) {
        jobs.pids.borrow_mut().push(p);
    }
    assert_eq!(code(&out), 4, "second start:\n{}", text(&out));
    assert!(
        stderr(&out).contains(&pid.to_string()),
        "stderr does not name pid {pid}:\n{}",
        text(&out)
    );
    assert!(alive(pid), "the first daemon died");
    assert_eq!(
        jobs.pid_file("default"),
        Some(pid),
        "the PID file changed hands"
    );
    assert_mirrors_soon(&jobs.env.src, &jobs.env.rep);
}

#[test]
fn differently_named_jobs_run_side_by_side() {
    let jobs = Jobs::new();
    small_tree(&jobs.env.src, 6);
    let a = jobs.start("rep", &["--interval", "1s", "--name", "alpha"]);
    let b = jobs.start("rep2", &["--interval", "1s", "--name", "beta"]);
    assert_ne!(a, b);
    assert_mirrors_soon(&jobs.env.src, &jobs.env.rep);
    assert_mirrors_soon(&jobs.env.src, &jobs.root().join("rep2"));
    assert!(alive(a) && alive(b), "both daemons must stay up");

    let all = jobs.status_json(&["--all"]);
    let arr = all
        .as_array()
        .unwrap_or_else(|| panic!("status --all --json is not an array:\n{all:#}"));
    let mut seen: Vec<(String, bool, i64)> = arr
        .iter()
        .map(|j| {
            (
                j["name"].as_str().unwrap_or_default().to_string(),
                j["running"].as_bool().unwrap_or(false),
                j["pid"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("alpha".to_string(), true, a as i64),
            ("beta".to_string(), true, b as i64)
        ],
        "status --all:\n{all:#}"
    );
}

#[test]
fn status_shows_the_pid_and_the_last_pass_while_running() {
    let jobs = Jobs::new();
    small_tree(&jobs.env.src, 5);
    let pid = jobs.start("rep", &["--interval", "1s"]);
    let st = jobs.wait_last_pass(&[]);

    assert_eq!(st["name"], "default", "status:\n{st:#}");
    assert_eq!(st["running"], true, "status:\n{st:#}");
    assert_eq!(st["pid"].as_i64(), Some(pid as i64), "status:\n{st:#}");
    assert_eq!(st["last_pass"]["result"], "ok", "status:\n{st:#}");
    assert_eq!(st["interval_seconds"].as_u64(), Some(1), "status:\n{st:#}");
    let src = fs::canonicalize(&jobs.env.src).unwrap();
    assert_eq!(
        st["source"],
        src.to_string_lossy().as_ref(),
        "status:\n{st:#}"
    );
    let rep_dir = fs::canonicalize(jobs.root()).unwrap().join("rep");
    assert_eq!(
        st["replica"],
        rep_dir.to_string_lossy().as_ref(),
        "status:\n{st:#}"
    );
    assert!(st["refused_reason"].is_null(), "status:\n{st:#}");

    let out = jobs.run(&["status", "--state-dir", "state"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains(&format!("running (pid {pid})")),
        "status:\n{human}"
    );
    assert!(
        human.contains("last pass:") && human.contains(" ok in "),
        "status:\n{human}"
    );

    let all = jobs.status_json(&["--all"]);
    let arr = all
        .as_array()
        .unwrap_or_else(|| panic!("status --all --json is not an array:\n{all:#}"));
    assert_eq!(arr.len(), 1, "status --all:\n{all:#}");
    assert_eq!(
        arr[0]["pid"].as_i64(),
        Some(pid as i64),
        "status --all:\n{all:#}"
    );
}

#[test]
fn sighup_reopens_a_rotated_schedule_log() {
    let jobs = Jobs::new();
    small_tree(&jobs.env.src, 4);
    let pid = jobs.start("rep", &["--interval", "1h"]);
    let sched = jobs.env.state.join("default.schedule.log");
    let io = jobs.env.state.join("default.io.log");
    assert!(
        wait_for(DEADLINE, || jobs.schedule_log().contains("NEXT PASS")),
        "first pass never finished:\n{}",
        jobs.schedule_log()
    );

    // logrotate: move both logs away, then HUP.
    let rotated = jobs.env.state.join("default.schedule.log.1");
    fs::rename(&sched, &rotated).unwrap();
    fs::rename(&io, jobs.env.state.join("default.io.log.1")).unwrap();
    signal(pid, Signal::SIGHUP);
    assert!(
        wait_for(DEADLINE, || fs::read_to_string(&sched)
            .unwrap_or_default()
            .contains("LOGS REOPENED")),
        "no new schedule log with LOGS REOPENED after SIGHUP"
    );
    assert!(alive(pid), "SIGHUP killed the daemon");

    // Later lines go to the new files, none to the rotated one.
    write(&jobs.env.src.join("after-rotation.txt"), b"new\n");
    signal(pid, Signal::SIGUSR1);
    assert!(
        wait_for(DEADLINE, || fs::read_to_string(&sched)
            .unwrap_or_default()
            .contains("PASS END ok")),
        "no PASS END in the new schedule log:\n{}",
        fs::read_to_string(&sched).unwrap_or_default()
    );
    let io_text = fs::read_to_string(&io).unwrap_or_default();
    assert!(
        io_text.contains("CREATE after-rotation.txt"),
        "new io log:\n{io_text}"
    );
    let old = fs::read_to_string(&rotated).unwrap();
    assert!(
        !old.contains("LOGS REOPENED") && !old.contains("after-rotation"),
        "rotated log got new lines:\n{old}"
    );
    assert!(alive(pid));
    assert_trees_equal(&jobs.env.src, &jobs.env.rep);
}

#[test]
fn sigusr1_runs_a_pass_at_once_despite_a_long_interval() {
    let jobs = Jobs::new();
    small_tree(&jobs.env.src, 4);
    let pid = jobs.start("rep", &["--interval", "1h"]);
    assert_mirrors_soon(&jobs.env.src, &jobs.env.rep);
    assert!(wait_for(DEADLINE, || jobs
        .schedule_log()
        .contains("NEXT PASS")));

    write(
        &jobs.env.src.join("d1/changed.txt"),
        b"appears only on a signal\n",
    );
    fs::remove_file(jobs.env.src.join("d0/f0.txt")).unwrap();
    signal(pid, Signal::SIGUSR1);
    assert_mirrors_soon(&jobs.env.src, &jobs.env.rep);
    assert!(!jobs.env.rep.join("d0/f0.txt").exists());
    assert!(wait_for(DEADLINE, || jobs
        .schedule_log()
        .matches("PASS END")
        .count()
        >= 2));
    assert_eq!(
        jobs.schedule_log().matches("PASS END").count(),
        2,
        "{}",
        jobs.schedule_log()
    );
    assert!(alive(pid));
}

#[test]
fn stop_ends_the_daemon_removes_its_pid_file_and_is_idempotent() {
    let jobs = Jobs::new();
    small_tree(&jobs.env.src, 5);
    let pid = jobs.start("rep", &["--interval", "1s"]);
    assert_mirrors_soon(&jobs.env.src, &jobs.env.rep);

    let out = jobs.run(&["stop", "--state-dir", "state"]);
    assert_eq!(code(&out), 0, "stop:\n{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("pid {pid}")),
        "{}",
        text(&out)
    );
    assert!(wait_gone(pid), "pid {pid} still alive after stop");
    assert!(
        !jobs.env.state.join("default.pid").exists(),
        "PID file left behind"
    );
    assert_no_temps(&jobs.env.rep);
    assert_trees_equal(&jobs.env.src, &jobs.env.rep);
    assert!(
        jobs.schedule_log()
            .contains(&format!("DAEMON STOP pid {pid}")),
        "{}",
        jobs.schedule_log()
    );

    let st = jobs.status_json(&[]);
    assert_eq!(st["running"], false, "status after stop:\n{st:#}");
    assert!(st["pid"].is_null(), "status after stop:\n{st:#}");

    let again = jobs.run(&["stop", "--state-dir", "state"]);
    assert_eq!(code(&again), 0, "second stop:\n{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("not running"),
        "{}",
        text(&again)
    );
}

/// The PID file is a plain one: the pid in decimal and a newline, so `kill $(cat FILE)`,
/// monitoring scripts and systemd's `PIDFile=` can use it; `stop` still works, and removes it
/// together with the start file beside it.
#[test]
fn pid_file_holds_the_pid_alone_and_kill_reaches_the_daemon_through_it() {
    let jobs = Jobs::new();
    small_tree(&jobs.env.src, 3);
    let pid = jobs.start("rep", &["--interval", "1h"]);
    let pid_file = jobs.env.state.join("default.pid");
    let content = fs::read_to_string(&pid_file).expect("PID file");
    let digits = content.strip_suffix('\n').unwrap_or("");
    assert!(
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
        "the PID file is not '<pid>\\n': {content:?}"
    );
    assert_eq!(digits, pid.to_string());

    let sh = |script: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&pid_file)
            .output()
            .expect("sh")
    };
    let out = sh(r#"kill -0 $(cat "$1")"#);
    assert_eq!(code(&out), 0, "kill -0 $(cat pidfile):\n{}", text(&out));
    // The README's logrotate line.
    assert!(
        wait_for(DEADLINE, || jobs.schedule_log().contains("NEXT PASS")),
        "first pass never finished:\n{}",
        jobs.schedule_log()
    );
    let out = sh(r#"kill -HUP $(cat "$1")"#);
    assert_eq!(code(&out), 0, "kill -HUP $(cat pidfile):\n{}", text(&out));
    assert!(
        wait_for(DEADLINE, || jobs.schedule_log().contains("LOGS REOPENED")),
        "no LOGS REOPENED after kill -HUP $(cat pidfile):\n{}",
        jobs.schedule_log()
    );

    let out = jobs.run(&["stop", "--state-dir", "state"]);
    assert_eq!(code(&out), 0, "stop:\n{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("stopped job 'default' (pid {pid})")),
        "{}",
        text(&out)
    );
    assert!(wait_gone(pid), "pid {pid} still alive after stop");
    assert!(!pid_file.exists(), "PID file left behind");
    assert!(
        !jobs.env.state.join("default.start").exists(),
        "start file left behind"
    );
}

#[test]
fn stop_all_stops_every_job_of_the_state_dir() {
    let jobs = Jobs::new();
    small_tree(&jobs.env.src, 4);
    let a = jobs.start("rep", &["--interval", "1s", "--name", "one"]);
    let b = jobs.start("rep2", &["--interval", "1s", "--name", "two"]);

    let out = jobs.run(&["stop", "--all", "--state-dir", "state"]);
    assert_eq!(code(&out), 0, "stop --all:\n{}", text(&out));
    assert!(wait_gone(a) && wait_gone(b), "a daemon survived stop --all");
    assert!(!jobs.env.state.join("one.pid").exists() && !jobs.env.state.join("two.pid").exists());
    let all = jobs.status_json(&["--all"]);
    let arr = all.as_array().expect("array");
    assert_eq!(arr.len(), 2, "{all:#}");
    assert!(arr.iter().all(|j| j["running"] == false), "{all:#}");
}

#[test]
fn stop_during_a_big_copy_exits_promptly_and_leaves_no_torn_file() {
    let jobs = Jobs::new();
    let big = jobs.env.src.join("big.bin");
    {
        let mut f = fs::File::create(&big).unwrap();
        let mut chunk = Rng::new(7).bytes(1 << 20);
        for i in 0..300u32 {
            chunk[..4].copy_from_slice(&i.to_le_bytes());
            f.write_all(&chunk).unwrap();
        }
    }
    let pid = jobs.start("rep", &["--interval", "1h"]);
    // The first pass starts at once; catch it copying if we can, then stop regardless.
    let saw_temp = wait_for(Duration::from_secs(5), || {
        fs::read_dir(&jobs.env.rep)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".syncer-"))
            })
            .unwrap_or(false)
    });

    let out = jobs.run(&["stop", "--state-dir", "state"]);
    assert_eq!(code(&out), 0, "stop during a pass:\n{}", text(&out));
    assert!(wait_gone(pid), "the daemon outlived stop");
    assert_no_temps(&jobs.env.rep);
    let copy = jobs.env.rep.join("big.bin");
    if copy.exists() {
        assert_eq!(
            fs::metadata(&copy).unwrap().len(),
            fs::metadata(&big).unwrap().len(),
            "torn copy"
        );
        assert_eq!(sha_file(&copy), sha_file(&big), "torn copy");
    }
    let log = jobs.schedule_log();
    if saw_temp && !copy.exists() {
        assert!(
            log.contains("PASS END interrupted"),
            "an abandoned copy must be an interrupted pass:\n{log}"
        );
    }
    assert!(log.contains(&format!("DAEMON STOP pid {pid}")), "{log}");
}

#[test]
fn start_after_kill_9_takes_over_the_stale_pid_file() {
    let jobs = Jobs::new();
    small_tree(&jobs.env.src, 4);
    let first = jobs.start("rep", &["--interval", "1s"]);
    assert_mirrors_soon(&jobs.env.src, &jobs.env.rep);
    signal(first, Signal::SIGKILL);
    assert!(wait_gone(first));
    assert!(
        jobs.env.state.join("default.pid").exists(),
        "kill -9 cannot remove the PID file"
    );
    assert!(
        wait_for(DEADLINE, || jobs.status_json(&[])["running"] == false),
        "a dead daemon still counts as running"
    );

    let second = jobs.start("rep", &["--interval", "1s"]);
    assert_ne!(first, second);
    write(&jobs.env.src.join("after-restart.txt"), b"x\n");
    assert_mirrors_soon(&jobs.env.src, &jobs.env.rep);
    assert_eq!(jobs.status_json(&[])["pid"].as_i64(), Some(second as i64));
}

#[test]
fn bad_start_arguments_exit_2_on_the_terminal_and_leave_no_daemon() {
    let jobs = Jobs::new();
    small_tree(&jobs.env.src, 2);
    let state = jobs.env.state.to_string_lossy().to_string();
    let cases: [&[&str]; 4] = [
        &[
            "--source",
            "missing",
            "--replica",
            "rep",
            "--interval",
            "1s",
        ],
        &["--source", "src", "--replica", "rep", "--interval", "soon"],
        &[
            "--source",
            "src",
            "--replica",
            "rep",
            "--interval",
            "1s",
            "--name",
            "../evil",
        ],
        &[
            "--source",
            "src/d0/f0.txt",
            "--replica",
            "rep",
            "--interval",
            "1s",
        ],
    ];
    for args in cases {
        let mut all = vec!["start", "--state-dir", &state];
        all.extend_from_slice(args);
        let out = jobs.run(&all);
        if let Some(p) = printed_pid(&out) {
            jobs.pids.borrow_mut().push(p);
        }
        assert_eq!(code(&out), 2, "start {args:?}:\n{}", text(&out));
        assert!(
            stderr(&out).starts_with("syncer: "),
            "no message on the terminal for {args:?}:\n{}",
            text(&out)
        );
        assert!(
            !jobs.env.state.join("default.pid").exists(),
            "a PID file was written for {args:?}"
        );
        let st = jobs.status_json(&[]);
        assert_eq!(st["running"], false, "{args:?}: {st:#}");
    }
    assert!(!jobs.env.rep.exists(), "a failed start created the replica");
    assert!(
        !jobs.env.state.exists(),
        "a failed start (or status) created the state directory"
    );
    assert_eq!(
        syncer_processes_mentioning(&state),
        Vec::<i32>::new(),
        "a daemon was left running"
    );
}

#[test]
fn foreground_start_runs_passes_and_exits_0_on_sigterm() {
    let jobs = Jobs::new();
    small_tree(&jobs.env.src, 4);
    let out_file = fs::File::create(jobs.root().join("fg.out")).unwrap();
    let err_file = fs::File::create(jobs.root().join("fg.err")).unwrap();
    let child = jobs
        .cmd(&[
            "start",
            "--foreground",
            "--source",
            "src",
            "--replica",
            "rep",
            "--state-dir",
            "state",
            "--interval",
            "1s",
        ])
        .stdin(Stdio::null())
        .stdout(out_file)
        .stderr(err_file)
        .spawn()
        .expect("spawn foreground daemon");
    let mut child = ChildGuard(child);
    let pid = child.0.id() as i32;

    assert!(
        wait_for(DEADLINE, || jobs.pid_file("default") == Some(pid)),
        "the foreground process never took the PID file"
    );
    assert_mirrors_soon(&jobs.env.src, &jobs.env.rep);
    write(&jobs.env.src.join("second-pass.txt"), b"2\n");
    assert_mirrors_soon(&jobs.env.src, &jobs.env.rep);
    let st = jobs.status_json(&[]);
    assert_eq!(
        (st["running"].as_bool(), st["pid"].as_i64()),
        (Some(true), Some(pid as i64)),
        "{st:#}"
    );

    signal(pid, Signal::SIGTERM);
    let mut status = None;
    assert!(
        wait_for(DEADLINE, || {
            status = child.0.try_wait().expect("wait");
            status.is_some()
        }),
        "the foreground daemon ignored SIGTERM"
    );
    assert_eq!(status.unwrap().code(), Some(0), "exit status after SIGTERM");
    assert!(
        !jobs.env.state.join("default.pid").exists(),
        "PID file left behind"
    );
    let printed = fs::read_to_string(jobs.root().join("fg.out")).unwrap();
    assert!(
        printed.contains("PASS END ok"),
        "the foreground daemon prints its passes:\n{printed}"
    );
}

#[test]
fn refused_pass_shows_in_status_and_the_daemon_keeps_running() {
    let jobs = Jobs::new();
    small_tree(&jobs.env.src, 120);
    let pid = jobs.start("rep", &["--interval", "1s"]);
    assert_mirrors_soon(&jobs.env.src, &jobs.env.rep);
    let before = snapshot(&jobs.env.rep);

    // Empty the source in one step (deleting entry by entry could let a pass see a half-empty
    // source that the guard rightly allows): swap in an empty directory.
    fs::rename(&jobs.env.src, jobs.root().join("src.old")).unwrap();
    fs::create_dir(&jobs.env.src).unwrap();
    let mut st = Value::Null;
    assert!(
        wait_for(DEADLINE, || {
            st = jobs.status_json(&[]);
            st["refused_reason"].is_string()
        }),
        "no refused_reason in status:\n{st:#}"
    );
    assert_eq!(st["last_pass"]["result"], "refused", "{st:#}");
    assert_eq!(st["running"], true, "{st:#}");
    assert!(alive(pid), "a refused pass stopped the daemon");
    assert!(
        jobs.schedule_log().contains("PASS REFUSED"),
        "{}",
        jobs.schedule_log()
    );
    // Refused means nothing changed, and the daemon goes on refusing rather than deleting.
    let refusals = jobs.schedule_log().matches("PASS REFUSED").count();
    assert!(wait_for(DEADLINE, || jobs
        .schedule_log()
        .matches("PASS REFUSED")
        .count()
        > refusals));
    assert!(alive(pid));
    assert_eq!(
        snapshot(&jobs.env.rep),
        before,
        "a refused pass changed the replica"
    );
    let out = jobs.run(&["status", "--state-dir", "state"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("refused:"),
        "{}",
        text(&out)
    );
}
