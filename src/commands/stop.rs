//! `syncer stop`: SIGTERM to the job's daemon, then wait (bounded) for it to exit. A daemon
//! that did not exit in time is reported with what it is waiting on (it writes that into
//! `<name>.stopping` once signalled); with `--force` it is then killed.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cli::StopArgs;
use crate::config;
use crate::daemon;
use crate::error::{ExitCode, Result};
use crate::state::{self, lock};
use crate::term;

/// How long `stop --force` waits for a killed daemon to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(stop: &StopArgs) -> Result<ExitCode> {
    let args = &stop.job;
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let dir = config::state_dir(args.state_dir.as_deref(), &cwd);
    let names = if args.all {
        super::status::job_names(&dir)
    } else {
        vec![args.name.clone()]
    };
    if args.all && names.is_empty() {
        let _ = term::out(format_args!("no jobs in '{}'", crate::model::show(&dir)));
    }
    let mut code = ExitCode::Ok;
    for name in names {
        config::check_name(&name)?;
        let pid_path = state::file(&dir, &name, "pid");
        let Some(text) = lock::holder(&pid_path) else {
            let _ = term::out(format_args!("job '{name}' is not running"));
            continue;
        };
        let Some(pid) = daemon::pid_of(&text) else {
            term::err(format_args!(
                "job '{name}' holds its PID file but its pid is unreadable"
            ));
            code = ExitCode::Partial;
            continue;
        };
        if let Err(e) = kill(Pid::from_raw(pid as i32), Signal::SIGTERM) {
            term::err(format_args!(
                "could not signal job '{name}' (pid {pid}): {e}"
            ));
            code = ExitCode::Partial;
            continue;
        }
        let t0 = Instant::now();
        while lock::holder(&pid_path).is_some() && t0.elapsed() < stop.wait {
            std::thread::sleep(Duration::from_millis(20));
        }
        if lock::holder(&pid_path).is_some() {
            let stuck = std::fs::read_to_string(state::file(&dir, &name, "stopping"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "unknown".into());
            if stop.force {
                term::err(format_args!(
                    "job '{name}' (pid {pid}) did not stop within {}s (waiting for: {stuck}); killing it",
                    stop.wait.as_secs()
                ));
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                // The kernel releases the PID file's lock when the process is gone.
                let t1 = Instant::now();
                while lock::holder(&pid_path).is_some() && t1.elapsed() < KILL_TIMEOUT {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if lock::holder(&pid_path).is_some() {
                    term::err(format_args!("job '{name}' (pid {pid}) survived SIGKILL"));
                    code = ExitCode::Partial;
                    continue;
                }
                for suffix in ["pid", "start", "stopping"] {
                    let _ = std::fs::remove_file(state::file(&dir, &name, suffix));
                }
                let _ = term::out(format_args!("killed job '{name}' (pid {pid})"));
                continue;
            }
            term::err(format_args!(
                "job '{name}' (pid {pid}) did not stop within {}s; it is waiting for: {stuck}; \
                 'syncer stop --force --name {name}' kills it",
                stop.wait.as_secs()
            ));
            code = ExitCode::Partial;
        } else {
            let _ = term::out(format_args!(
                "stopped job '{name}' (pid {pid}) in {:.1}s",
                t0.elapsed().as_secs_f64()
            ));
        }
    }
    Ok(code)
}
