//! `syncer start`: validate everything a pass would, then fork a daemon (or, with
//! `--foreground`, run the loop here). The caller gets exit 0 only once the daemon holds its
//! PID file; a bad argument or a running job is reported on the caller's terminal.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use daemonize::{Daemonize, Outcome};

use crate::cli::StartArgs;
use crate::config::Config;
use crate::daemon;
use crate::error::{Error, ExitCode, Result};
use crate::state::{self, lock};

/// How long the caller waits for the daemon to confirm it runs.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);

pub fn run(args: &StartArgs) -> Result<ExitCode> {
    let text = args.interval.as_deref().unwrap_or("1h");
    let interval = humantime::parse_duration(text)
        .map_err(|e| Error::Usage(format!("invalid --interval '{text}': {e}")))?;
    let mut cfg = Config::from_args(&args.sync, Some(interval))?;
    cfg.watch = args.watch;
    if cfg.watch && cfg.source_s3.is_some() {
        return Err(Error::Usage(
            "--watch needs a local source (an s3:// source cannot be watched)".into(),
        ));
    }
    crate::job::check_pair(&cfg)?;
    state::create_dir(&cfg.state_dir)
        .map_err(|e| Error::io("create state directory", &cfg.state_dir, e))?;
    let pid_path = state::file(&cfg.state_dir, &cfg.name, "pid");
    if let Some(text) = lock::holder(&pid_path) {
        return Err(Error::Busy(format!(
            "job '{}' is already running (pid {})",
            cfg.name,
            daemon::pid_of(&text).map_or("unknown".into(), |p| p.to_string())
        )));
    }
    lock::probe_replica(&cfg.state_dir, &cfg.replica)?;
    // Everything a pass checks first, and that the replica and the state directory can be
    // written: a job that cannot run fails here, on the caller's terminal, not in a daemon.
    tempfile::NamedTempFile::new_in(&cfg.state_dir)
        .map_err(|e| Error::io("write into the state directory", &cfg.state_dir, e))?;
    crate::pass::preflight(&cfg).map_err(Error::Usage)?;
    if args.foreground {
        return Ok(daemon::run(&cfg, "", true));
    }

    let nonce = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let log_path = state::file(&cfg.state_dir, &cfg.name, "daemon.log");
    let open_log = || {
        state::private()
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io("open daemon log", &log_path, e))
    };
    let error_path = state::file(&cfg.state_dir, &cfg.name, "start-error");
    let _ = fs::remove_file(&error_path);
    let daemon = Daemonize::new()
        .working_directory("/")
        .umask(0o022)
        .stdout(open_log()?)
        .stderr(open_log()?);
    match daemon.execute() {
        Outcome::Parent(Ok(_)) => confirm(&cfg, &error_path, &nonce, &log_path),
        Outcome::Parent(Err(e)) => Err(Error::Usage(format!("could not start the daemon: {e}"))),
        Outcome::Child(Ok(_)) => Ok(daemon::run(&cfg, &nonce, false)),
        Outcome::Child(Err(e)) => {
            let _ = state::write_private(
                &error_path,
                &format!(
                    "{nonce} {} could not daemonize: {e}\n",
                    ExitCode::Usage as i32
                ),
            );
            Ok(ExitCode::Usage)
        }
    }
}

/// Waits until the daemon with our nonce holds the PID file, or reports why it did not.
fn confirm(cfg: &Config, error_path: &Path, nonce: &str, log_path: &Path) -> Result<ExitCode> {
    let pid_path = state::file(&cfg.state_dir, &cfg.name, "pid");
    let start_path = state::file(&cfg.state_dir, &cfg.name, "start");
    let deadline = Instant::now() + CONFIRM_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(text) = fs::read_to_string(error_path) {
            if let Some((code, msg)) = daemon::start_error(&text, nonce) {
                let _ = fs::remove_file(error_path);
                return Err(Error::with_code(code, msg));
            }
        }
        let held = lock::holder(&pid_path).and_then(|text| daemon::pid_of(&text));
        if let Some(pid) = held {
            let ours = fs::read_to_string(&start_path)
                .is_ok_and(|text| text == daemon::start_text(pid, nonce));
            if ours {
                // The daemon runs whether or not this line can be written.
                let _ = crate::term::out(format_args!(
                    "started job '{}' (pid {pid}): '{}' -> '{}' every {}",
                    cfg.name,
                    crate::model::show(&cfg.source),
                    crate::model::show(&cfg.replica),
                    humantime::format_duration(cfg.interval.unwrap_or_default())
                ));
                return Ok(ExitCode::Ok);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(Error::Usage(format!(
        "the daemon did not confirm it started within {}s; see '{}'",
        CONFIRM_TIMEOUT.as_secs(),
        crate::model::show(log_path)
    )))
}
