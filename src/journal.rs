//! The two logs and the terminal. The file-I/O log gets one line per action, the schedule
//! log one line per pass event; monoshot and `--foreground` print the same lines to the
//! terminal (actions and summaries on stdout, warnings and errors on stderr, `syncer: `
//! prefixed). Files are opened for append and reopened on SIGHUP (logrotate).
//!
//! This is a small `log::Log` of its own, not simplelog's loggers: the lines have a fixed
//! format that users and tests parse; the schedule file takes the lines of several targets
//! (schedule events bare, warnings and errors with a word); buffered I/O lines are flushed
//! before every schedule line and after every committed chunk; both files are reopened in
//! place on SIGHUP; and the terminal side needs the `syncer: ` prefix, `-q`/`-v` and the
//! progress bar. simplelog's `WriteLogger` owns one writer and formats each record on its
//! own, so all of that would still be written here, around it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use indicatif::ProgressBar;
use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::config::Verbosity;
use crate::error::EntryError;
use crate::model::{Counts, RelPath};

const IO: &str = "io";
const SCHEDULE: &str = "schedule";
const PLAN: &str = "plan";
/// Terminal and schedule-log side of per-entry errors and skips.
const ENTRY: &str = "syncer::entry";

/// A log file. Lines are buffered and flushed at every schedule line (pass start and end)
/// and after each committed chunk of a pass, so a crash loses at most the lines of the
/// chunk in flight, and a pass costs one `write` per 64 KiB of log, not one per action.
struct Sink {
    path: PathBuf,
    file: Option<BufWriter<File>>,
}

impl Sink {
    fn open(path: PathBuf) -> Sink {
        let file = open_append(&path);
        Sink { path, file }
    }
    fn write(&mut self, line: &str) {
        if let Some(f) = &mut self.file {
            let _ = f.write_all(line.as_bytes());
            let _ = f.write_all(b"\n");
        }
    }
    fn flush(&mut self) {
        if let Some(f) = &mut self.file {
            let _ = f.flush();
        }
    }
    fn reopen(&mut self) {
        self.flush();
        self.file = open_append(&self.path);
    }
}

fn open_append(path: &Path) -> Option<BufWriter<File>> {
    if let Some(parent) = path.parent() {
        let _ = crate::state::create_dir(parent);
    }
    // Owner-only: a log names every path the job backs up.
    let file = crate::state::private().append(true).open(path).ok()?;
    Some(BufWriter::with_capacity(64 << 10, file))
}

/// Writes buffered log lines to their files.
pub fn flush() {
    for sink in [&JOURNAL.io, &JOURNAL.schedule] {
        if let Some(s) = sink.lock().expect("journal lock").as_mut() {
            s.flush();
        }
    }
}

struct Journal {
    terminal: Mutex<Option<Verbosity>>,
    io: Mutex<Option<Sink>>,
    schedule: Mutex<Option<Sink>>,
    bar: Mutex<Option<ProgressBar>>,
}

static JOURNAL: Journal = Journal {
    terminal: Mutex::new(None),
    io: Mutex::new(None),
    schedule: Mutex::new(None),
    bar: Mutex::new(None),
};

static INSTALLED: OnceLock<()> = OnceLock::new();

/// Installs the logger. `terminal` is `None` for a forked daemon (no terminal).
pub fn init(terminal: Option<Verbosity>) {
    *JOURNAL.terminal.lock().expect("journal lock") = terminal;
    INSTALLED.get_or_init(|| {
        let _ = log::set_logger(&JOURNAL);
        log::set_max_level(LevelFilter::Debug);
    });
}

/// Starts writing the two log files (appending).
pub fn open_files(io_log: &Path, schedule_log: &Path) {
    *JOURNAL.io.lock().expect("journal lock") = Some(Sink::open(io_log.to_path_buf()));
    *JOURNAL.schedule.lock().expect("journal lock") = Some(Sink::open(schedule_log.to_path_buf()));
}

/// Reopens both log files by path (after logrotate moved them away).
pub fn reopen() {
    for sink in [&JOURNAL.io, &JOURNAL.schedule] {
        if let Some(s) = sink.lock().expect("journal lock").as_mut() {
            s.reopen();
        }
    }
}

/// Shows a progress bar (TTY only); log lines are printed above it.
pub fn set_bar(bar: Option<ProgressBar>) {
    *JOURNAL.bar.lock().expect("journal lock") = bar;
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// One file-I/O log line: `ACTION path [size sha256]`.
pub fn action(word: &str, rel: &RelPath, detail: std::fmt::Arguments) {
    log::info!(target: IO, "{word} {rel}{detail}");
}

/// Reports a per-entry problem, the one place they are printed, and counts it (the count is
/// what makes the pass's exit code 1). An error: an `ERROR` line in the file-I/O log and the
/// message (which names the path) on stderr and in the schedule log. A skip (changed during
/// the copy, vanished): a `SKIP` line and a warning naming the path.
pub fn report(problem: &EntryError) -> Counts {
    let rel = problem.rel();
    if problem.is_skip() {
        log::warn!(target: IO, "SKIP {rel} {problem}");
        log::warn!(target: ENTRY, "skipped '{rel}': {problem}");
        Counts {
            skipped: 1,
            ..Counts::default()
        }
    } else {
        log::error!(target: IO, "ERROR {rel} {problem}");
        log::error!(target: ENTRY, "{problem}");
        Counts {
            errors: 1,
            ..Counts::default()
        }
    }
}

/// A schedule log line.
pub fn schedule(line: std::fmt::Arguments) {
    log::info!(target: SCHEDULE, "{line}");
}

/// A dry-run line (terminal only).
pub fn plan_line(line: std::fmt::Arguments) {
    log::info!(target: PLAN, "{line}");
}

impl Journal {
    fn to_terminal(&self, record: &Record, line: &str) {
        let Some(v) = *self.terminal.lock().expect("journal lock") else {
            return;
        };
        let level = record.level();
        let show = match v {
            Verbosity::Quiet => level <= Level::Error,
            Verbosity::Normal => level <= Level::Info,
            Verbosity::Verbose => true,
        };
        if !show {
            return;
        }
        let print = || {
            if level <= Level::Warn {
                let _ = writeln!(std::io::stderr(), "syncer: {line}");
            } else {
                let _ = writeln!(std::io::stdout(), "{line}");
            }
        };
        match self.bar.lock().expect("journal lock").as_ref() {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }
}

impl Log for Journal {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        let msg = record.args().to_string();
        let target = record.target();
        let stamped = |m: &str| format!("{} {m}", now_rfc3339());
        if target == IO {
            let line = stamped(&msg);
            if let Some(s) = self.io.lock().expect("journal lock").as_mut() {
                s.write(&line);
            }
            // Errors and skips reach the terminal through their ENTRY record.
            if record.level() > Level::Warn {
                self.to_terminal(record, &line);
            }
        } else if target == SCHEDULE {
            let line = stamped(&msg);
            if let Some(s) = self.io.lock().expect("journal lock").as_mut() {
                s.flush();
            }
            if let Some(s) = self.schedule.lock().expect("journal lock").as_mut() {
                s.write(&line);
                s.flush();
            }
            self.to_terminal(record, &line);
        } else if target == PLAN {
            self.to_terminal(record, &msg);
        } else {
            if record.level() <= Level::Warn {
                let word = if record.level() == Level::Error {
                    "ERROR"
                } else {
                    "WARN"
                };
                let line = stamped(&format!("{word} {msg}"));
                if let Some(s) = self.schedule.lock().expect("journal lock").as_mut() {
                    s.write(&line);
                }
            }
            if target.starts_with("syncer") {
                let text = if record.level() == Level::Warn {
                    format!("warning: {msg}")
                } else {
                    msg
                };
                self.to_terminal(record, &text);
            }
        }
    }

    fn flush(&self) {
        flush();
    }
}
