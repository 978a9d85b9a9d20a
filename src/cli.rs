//! The command line, and the only file that knows clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "syncer",
    version,
    about = "Keeps a replica directory an exact, safe, one-way mirror of a source directory"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one pass, then exit (for cron and scripts).
    Monoshot(SyncArgs),
    /// Start a daemon that runs a pass at once and then every interval.
    Start(StartArgs),
    /// Stop a running daemon.
    Stop(StopArgs),
    /// Show the state of a job.
    Status(StatusArgs),
    /// Forget a stopped job: remove its hash cache, S3 index and status, so that its name
    /// can serve another source/replica pair.
    Forget(ForgetArgs),
    /// Print a shell completion script (bash, zsh or fish) to stdout.
    Completions(CompletionsArgs),
    /// Print the man page (roff) to stdout.
    Manpage,
}

#[derive(Args, Debug, Clone)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// Shells `syncer completions` writes a script for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// Options shared by `monoshot` and `start`.
#[derive(Args, Debug, Clone)]
pub struct SyncArgs {
    /// Directory to mirror from, or `s3://BUCKET/PREFIX` (a restore from a bucket).
    #[arg(long, short = 's', value_name = "DIR|URL")]
    pub source: PathBuf,
    /// Directory to mirror into (created if missing), or `s3://BUCKET/PREFIX`.
    #[arg(long, short = 'r', value_name = "DIR|URL")]
    pub replica: PathBuf,
    /// S3 endpoint URL for an s3:// replica [default: $AWS_ENDPOINT_URL, else AWS]; given,
    /// path-style addressing is used.
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region [default: $AWS_REGION, else us-east-1].
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// A request to an object store that makes no progress for DURATION is abandoned and
    /// retried; one request with its retries ends within 3 x DURATION.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_timeout)]
    pub timeout: std::time::Duration,
    /// Allow a replica that is a whole bucket (`s3://BUCKET` with no prefix): a mirror
    /// deletes whatever else the bucket holds.
    #[arg(long)]
    pub allow_bucket_root: bool,
    /// Job name: names the PID, status, cache and log files in the state directory.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// State directory [default: $XDG_STATE_HOME/syncer or ~/.local/state/syncer].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// File-I/O log [default: <state-dir>/<name>.io.log].
    #[arg(long, value_name = "PATH")]
    pub io_log: Option<PathBuf>,
    /// Schedule log [default: <state-dir>/<name>.schedule.log].
    #[arg(long, value_name = "PATH")]
    pub schedule_log: Option<PathBuf>,
    /// Exclude entries matching this gitignore-style pattern (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Read exclude patterns from FILE, one per line (repeatable).
    #[arg(long, value_name = "FILE")]
    pub exclude_from: Vec<PathBuf>,
    /// Re-hash every file on both sides, ignoring the hash cache.
    #[arg(long)]
    pub checksum: bool,
    /// Print what would be done, change nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Deletion guard: N entries, P% of the replica, or 'none' [default: refuse to leave a
    /// replica of 100+ entries with fewer than half].
    #[arg(long, value_name = "N|P%|none")]
    pub max_delete: Option<String>,
    /// Move every replica file about to be overwritten or deleted into DIR/<pass time>/.
    #[arg(long, value_name = "DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Do not cross filesystem boundaries: a mount point in the source is mirrored as an
    /// empty directory, one in the replica is left alone.
    #[arg(long, short = 'x')]
    pub one_file_system: bool,
    /// Do not mirror hard links: each name of a file becomes a file of its own.
    #[arg(long)]
    pub no_hard_links: bool,
    /// Do not mirror extended attributes (so neither ACLs nor file capabilities).
    #[arg(long)]
    pub no_xattrs: bool,
    /// Copy a file moved in the source again instead of renaming its replica twin into place.
    #[arg(long)]
    pub no_moves: bool,
    /// Worker threads, 1 to 256 [default: one per core, at most 256; 16 with an s3://
    /// replica or source].
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
            .range(1..=crate::config::MAX_THREADS as u64)
    )]
    pub threads: Option<usize>,
    /// More output (debug detail).
    #[arg(short, long, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Print errors only.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct StartArgs {
    #[command(flatten)]
    pub sync: SyncArgs,
    /// Time between pass starts: 30s, 5m, 1h... With --watch: the period of the full pass
    /// that backs up the watcher [default with --watch: 1h].
    #[arg(
        long,
        short = 'i',
        value_name = "DURATION",
        required_unless_present = "watch"
    )]
    pub interval: Option<String>,
    /// Watch the source with inotify: a change reaches the replica in under a second, by a
    /// partial pass over the directories that changed.
    #[arg(long, short = 'w')]
    pub watch: bool,
    /// Do not fork: run the loop in this process (systemd Type=simple, containers).
    #[arg(long)]
    pub foreground: bool,
}

#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    /// Job name.
    #[arg(long, default_value = "default", conflicts_with = "all")]
    pub name: String,
    /// Every job in the state directory.
    #[arg(long)]
    pub all: bool,
    /// State directory [default: $XDG_STATE_HOME/syncer or ~/.local/state/syncer].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct StopArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// If the daemon has not exited when the wait is over, kill it (SIGKILL) and remove its
    /// PID file. A pass killed this way leaves temp files (removed by the next pass) and, on
    /// an object store, possibly an unfinished multipart upload.
    #[arg(long)]
    pub force: bool,
    /// How long to wait for the daemon to exit after SIGTERM.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_timeout)]
    pub wait: std::time::Duration,
}

#[derive(Args, Debug, Clone)]
pub struct ForgetArgs {
    /// Job name.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// State directory [default: $XDG_STATE_HOME/syncer or ~/.local/state/syncer].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Also remove the job's logs in the state directory (<name>.io.log, .schedule.log,
    /// .daemon.log). Logs kept elsewhere (--io-log, --schedule-log) are never touched.
    #[arg(long)]
    pub logs: bool,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Print JSON (one object per job, in an array with --all).
    #[arg(long)]
    pub json: bool,
}

/// `--timeout`: a humantime duration of at least one second.
fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}
