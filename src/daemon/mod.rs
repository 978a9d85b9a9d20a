//! The daemon: PID file, signals and the interval loop. Passes start every interval,
//! measured start to start; a pass that overruns is followed at once by the next; passes
//! never overlap (one thread runs them). A failed or refused pass does not stop the loop.
//!
//! Signals only set flags (signal-hook); the loop and the pass poll them. SIGTERM/SIGINT
//! cancel the pass in flight (the file being copied is abandoned, its temp file removed),
//! then the daemon writes its status, removes its PID file and exits 0. SIGHUP reopens the
//! log files; SIGUSR1 starts a pass now.

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::cancel;
use crate::config::Config;
use crate::error::ExitCode;
use crate::job;
use crate::journal;
use crate::model::show;
use crate::pass;
use crate::state::status::PassResult;
use crate::state::{self, lock, status};
use crate::watch::Watcher;

/// The pid in a PID file's text: the pid in decimal and a newline. (A daemon started by an
/// earlier version wrote `<pid> <nonce>`; its first word is still its pid.)
pub fn pid_of(text: &str) -> Option<u32> {
    text.split_whitespace().next()?.parse().ok()
}

/// The text of the start file (`<name>.start`), written by a forked daemon just before its
/// PID file: `<pid> <nonce>`. The `start` that forked it waits for its own nonce there, next
/// to the same pid in the PID file, and so never takes another daemon for its own.
pub fn start_text(pid: u32, nonce: &str) -> String {
    format!("{pid} {nonce}\n")
}

/// Takes the PID file's lock. `status`, `stop` and a waiting `start` probe that lock by
/// taking it for an instant, so a refusal is retried for a short while: a probe lets go
/// within microseconds, a running daemon never does.
fn lock_pid_file(path: &std::path::Path) -> std::io::Result<Result<lock::Held, String>> {
    let mut tries = 0;
    loop {
        match lock::try_lock(path)? {
            Err(_) if tries < 25 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return Ok(other),
        }
    }
}

/// Reports a start-up failure and returns its exit code: on the terminal in the
/// foreground, else also to the waiting parent as `<nonce> <code> <message>` (see
/// [`start_error`]).
fn fail(cfg: &Config, nonce: &str, foreground: bool, code: ExitCode, msg: &str) -> ExitCode {
    if !foreground {
        let _ = state::write_private(
            &state::file(&cfg.state_dir, &cfg.name, "start-error"),
            &format!("{nonce} {} {msg}\n", code as i32),
        );
    }
    crate::term::err(format_args!("{msg}"));
    code
}

/// Reads a start-up failure written by `fail` for this `nonce`: its exit code and message.
pub fn start_error(text: &str, nonce: &str) -> Option<(ExitCode, String)> {
    let rest = text.trim().strip_prefix(nonce)?.trim_start();
    let (code, msg) = rest.split_once(' ').unwrap_or((rest, ""));
    let code = code.parse().ok().and_then(ExitCode::from_number)?;
    Some((code, msg.trim().to_string()))
}

fn watch_state(w: &Watcher, partial_passes: u64) -> crate::watch::WatchState {
    let mut s = w.state();
    s.partial_passes = partial_passes;
    s
}

/// Runs the daemon loop until SIGTERM/SIGINT. `nonce` identifies this start to the parent.
pub fn run(cfg: &Config, nonce: &str, foreground: bool) -> ExitCode {
    let reopen = Arc::new(AtomicBool::new(false));
    let now = Arc::new(AtomicBool::new(false));
    let signals = cancel::on_signals()
        .and_then(|_| signal_hook::flag::register(signal_hook::consts::SIGHUP, reopen.clone()))
        .and_then(|_| signal_hook::flag::register(signal_hook::consts::SIGUSR1, now.clone()));
    if let Err(e) = signals {
        return fail(
            cfg,
            nonce,
            foreground,
            ExitCode::Usage,
            &format!("could not install signal handlers: {e}"),
        );
    }
    journal::init(foreground.then_some(cfg.verbosity));
    let pid = std::process::id();
    let pid_path = state::file(&cfg.state_dir, &cfg.name, "pid");
    let start_path = state::file(&cfg.state_dir, &cfg.name, "start");
    let mut pidfile = match lock_pid_file(&pid_path) {
        // A crashed daemon's pid may still be in the file: it is not ours.
        Ok(Ok(mut held)) => match held.describe("") {
            Ok(()) => held,
            Err(e) => {
                return fail(
                    cfg,
                    nonce,
                    foreground,
                    ExitCode::Usage,
                    &format!("could not write '{}': {e}", show(&pid_path)),
                )
            }
        },
        Ok(Err(text)) => {
            let other = pid_of(&text).map_or("unknown".into(), |p| p.to_string());
            return fail(
                cfg,
                nonce,
                foreground,
                ExitCode::Busy,
                &format!("job '{}' is already running (pid {other})", cfg.name),
            );
        }
        Err(e) => {
            return fail(
                cfg,
                nonce,
                foreground,
                ExitCode::Usage,
                &format!("could not lock '{}': {e}", show(&pid_path)),
            );
        }
    };
    let who = format!("daemon pid {pid} job {}", cfg.name);
    let _replica_lock = match lock::lock_replica(&cfg.state_dir, &cfg.replica, &who) {
        Ok(l) => l,
        Err(e) => {
            let _ = fs::remove_file(&pid_path);
            return fail(cfg, nonce, foreground, e.exit_code(), &e.to_string());
        }
    };
    journal::open_files(&cfg.io_log, &cfg.schedule_log);
    job::build_pool(cfg.threads);
    let cache = match job::open_cache(cfg) {
        Ok(c) => c,
        Err(e) => {
            let _ = fs::remove_file(&pid_path);
            return fail(cfg, nonce, foreground, e.exit_code(), &e.to_string());
        }
    };
    let interval = cfg.interval.unwrap_or(Duration::from_secs(300));
    let mut st = job::base_status(cfg);
    if let Some(old) = status::read(&cfg.state_dir, &cfg.name) {
        st.last_pass = old.last_pass;
        st.refused_reason = old.refused_reason;
    }
    st.running = true;
    st.pid = Some(pid);
    let _ = status::write(&cfg.state_dir, &st);
    journal::schedule(format_args!(
        "DAEMON START pid {pid} job {} source '{}' replica '{}' interval {}",
        cfg.name,
        show(&cfg.source),
        show(&cfg.replica),
        humantime::format_duration(interval)
    ));
    // Announce readiness last: the parent returns 0 once it sees its nonce in the start
    // file and the same pid in the PID file, which holds the pid alone (`kill $(cat …)`,
    // systemd's PIDFile=).
    let written = if nonce.is_empty() {
        Ok(())
    } else {
        state::write_private(&start_path, &start_text(pid, nonce))
            .map_err(|e| format!("could not write '{}': {e}", show(&start_path)))
    }
    .and_then(|()| {
        pidfile
            .describe(&format!("{pid}\n"))
            .map_err(|e| format!("could not write '{}': {e}", show(&pid_path)))
    });
    if let Err(msg) = written {
        return fail(cfg, nonce, foreground, ExitCode::Usage, &msg);
    }

    let usage = |msg: &str| fail(cfg, nonce, foreground, ExitCode::Usage, msg);
    // Signals also wake the loop: it blocks in poll, never in a sleep loop.
    let (sig_rx, sig_tx) = match rustix::pipe::pipe_with(
        rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
    ) {
        Ok(p) => p,
        Err(e) => return usage(&format!("could not make a pipe: {e}")),
    };
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGUSR1,
    ] {
        let registered = sig_tx
            .try_clone()
            .and_then(|fd| signal_hook::low_level::pipe::register(sig, fd));
        if let Err(e) = registered {
            return usage(&format!("could not install signal handlers: {e}"));
        }
    }
    let watcher = match cfg.watch {
        false => None,
        true => match Watcher::start(&cfg.source) {
            Ok(w) => Some(w),
            Err(e) => return usage(&format!("could not watch '{}': {e}", show(&cfg.source))),
        },
    };
    report_when_stopping(state::file(&cfg.state_dir, &cfg.name, "stopping"));
    let progress = foreground && job::wants_progress(cfg);
    let mut next = Instant::now();
    // Replica entries at the last full pass: the guard of a partial pass judges them all.
    let mut whole_replica = 0u64;
    let mut partial_passes = 0u64;
    while !cancel::requested() {
        if reopen.swap(false, Ordering::Relaxed) {
            journal::reopen();
            journal::schedule(format_args!("LOGS REOPENED"));
        }
        let pass_now = now.swap(false, Ordering::Relaxed);
        let dirty_due = watcher.as_ref().and_then(|w| {
            let p = w.pending.lock().expect("pending");
            p.due().map(|at| (at, p.dirty.all))
        });
        let lost = dirty_due.is_some_and(|(_, all)| all);
        if pass_now || lost || Instant::now() >= next {
            // A full pass (watches every directory again); what was dirty is covered.
            if let Some(w) = &watcher {
                w.take();
            }
            let started = Instant::now();
            let outcome = match &watcher {
                Some(w) => pass::run_watching(
                    cfg,
                    &cache,
                    progress,
                    pass::Watching {
                        watcher: w,
                        partial: None,
                    },
                ),
                None => pass::run(cfg, &cache, progress),
            };
            if outcome.record.result != PassResult::Failed {
                whole_replica = outcome.replica_entries;
            }
            job::record_pass(&mut st, &outcome.record);
            next = (started + interval).max(Instant::now());
            if cancel::requested() {
                break;
            }
            let at = SystemTime::now() + next.saturating_duration_since(Instant::now());
            let at = humantime::format_rfc3339_seconds(at).to_string();
            journal::schedule(format_args!("NEXT PASS {at}"));
            st.next_pass = Some(at);
            st.watch = watcher.as_ref().map(|w| watch_state(w, partial_passes));
            if let Err(e) = status::write(&cfg.state_dir, &st) {
                log::warn!("could not write the job status: {e}");
            }
        } else if let (Some(w), Some((at, _))) = (&watcher, dirty_due) {
            if Instant::now() >= at {
                // The dirty set is taken before anything is listed: a change made during
                // the pass lands in the next one.
                let dirty = w.take();
                journal::schedule(format_args!(
                    "WATCH PASS {} dirty directories",
                    dirty.dirs.len()
                ));
                let outcome = pass::run_watching(
                    cfg,
                    &cache,
                    progress,
                    pass::Watching {
                        watcher: w,
                        partial: Some((dirty, whole_replica)),
                    },
                );
                partial_passes += 1;
                job::record_pass(&mut st, &outcome.record);
                st.watch = Some(watch_state(w, partial_passes));
                if let Err(e) = status::write(&cfg.state_dir, &st) {
                    log::warn!("could not write the job status: {e}");
                }
                continue;
            }
        }
        // Block until a signal, a change in the source, a due partial pass or the next
        // full pass.
        let mut deadline = next;
        if let Some(w) = &watcher {
            if let Some(at) = w.pending.lock().expect("pending").due() {
                deadline = deadline.min(at);
            }
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        let timeout = rustix::event::Timespec {
            tv_sec: wait.as_secs() as i64,
            tv_nsec: wait.subsec_nanos() as i64,
        };
        let mut fds = vec![rustix::event::PollFd::new(
            &sig_rx,
            rustix::event::PollFlags::IN,
        )];
        if let Some(w) = &watcher {
            fds.push(rustix::event::PollFd::from_borrowed_fd(
                w.wake_fd(),
                rustix::event::PollFlags::IN,
            ));
        }
        let _ = rustix::event::poll(&mut fds, Some(&timeout));
        drop(fds);
        let mut buf = [0u8; 64];
        while matches!(rustix::io::read(&sig_rx, &mut buf), Ok(n) if n > 0) {}
        if let Some(w) = &watcher {
            w.drain_wake();
        }
    }
    st.running = false;
    st.pid = None;
    st.next_pass = None;
    st.updated = Some(journal::now_rfc3339());
    let _ = status::write(&cfg.state_dir, &st);
    journal::schedule(format_args!("DAEMON STOP pid {pid}"));
    // Release the cache and the replica lock BEFORE the PID file: `syncer stop` returns as
    // soon as the PID file is free, and a monoshot started right after must not find the
    // replica still locked (exit 4) or the cache still open.
    drop(cache);
    drop(_replica_lock);
    let _ = fs::remove_file(&start_path);
    {
        // Under the lock the reporting thread writes under: the file cannot come back.
        let mut exiting = EXITING.lock().unwrap_or_else(|p| p.into_inner());
        *exiting = true;
        let _ = fs::remove_file(state::file(&cfg.state_dir, &cfg.name, "stopping"));
    }
    let _ = fs::remove_file(&pid_path);
    drop(pidfile);
    ExitCode::Ok
}

/// Set once the daemon is past its last pass: the stop report is no longer written (it
/// would outlive the daemon and mislead a later `stop`).
static EXITING: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

/// Once SIGTERM/SIGINT has asked the daemon to stop, writes what it is still waiting on
/// into `path` (`<name>.stopping`) every second until it exits, for a `stop` that waited in
/// vain to report. A thread of its own (the one it reports on may be stuck), asleep on
/// signal-hook's pipe until the signal comes: an idle daemon wakes no more for it.
fn report_when_stopping(path: std::path::PathBuf) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("could not watch for a slow stop: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("stopping".into())
        .spawn(move || {
            if signals.forever().next().is_none() {
                return;
            }
            loop {
                let what = cancel::current().unwrap_or_else(|| "finishing the pass".into());
                {
                    let exiting = EXITING.lock().unwrap_or_else(|p| p.into_inner());
                    if *exiting {
                        return;
                    }
                    let _ = state::write_private(&path, &format!("{what}\n"));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
    if let Err(e) = spawned {
        log::warn!("could not start the thread that reports a slow stop: {e}");
    }
}
