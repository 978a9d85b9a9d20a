//! A job's state (issue 23): the state directory is private (0700, files 0600).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

/// Stops every daemon of a state directory when dropped, so a failing test leaves none.
struct StopAll<'a>(&'a Path);

impl Drop for StopAll<'_> {
    fn drop(&mut self) {
        let _ = syncer()
            .args(["stop", "--all", "--state-dir"])
            .arg(self.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .expect("lstat")
        .permissions()
        .mode()
        & 0o7777
}

/// Every directory and file under `dir` (itself included) with its mode, sorted.
fn modes_below(dir: &Path) -> Vec<(String, u32)> {
    walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .map(|e| e.expect("walk"))
        .map(|e| (e.path().display().to_string(), mode(e.path())))
        .collect()
}

#[test]
fn the_state_directory_is_created_0700_and_its_files_0600() {
    let env = Env::new();
    gen_tree(&env.src, 2301, 20);
    env.mirror_ok(&[]);
    let _stop = StopAll(&env.state);
    let out = env
        .command("start")
        .args(["--interval", "1h", "--name", "daemon"])
        .output()
        .expect("start");
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        wait_for(Duration::from_secs(20), || env
            .state
            .join("daemon.schedule.log")
            .exists()
            && fs::read_to_string(env.state.join("daemon.schedule.log"))
                .unwrap_or_default()
                .contains("PASS END")),
        "the daemon did not finish a pass"
    );
    let all = modes_below(&env.state);
    for file in [
        "default.cache.redb",
        "default.status.json",
        "default.io.log",
        "default.schedule.log",
        "daemon.pid",
        "daemon.start",
        "daemon.daemon.log",
        "daemon.cache.redb",
    ] {
        assert!(
            all.iter().any(|(p, _)| p.ends_with(file)),
            "no {file} in {all:#?}"
        );
    }
    for (path, m) in &all {
        let want = if Path::new(path).is_dir() {
            0o700
        } else {
            0o600
        };
        assert_eq!(*m, want, "{path} is {m:o} in {all:#?}");
    }
}

#[test]
fn an_existing_state_directory_keeps_its_modes_and_still_works() {
    let env = Env::new();
    write(&env.src.join("f"), b"f");
    fs::create_dir(&env.state).expect("mkdir");
    chmod(&env.state, 0o755);
    write(&env.state.join("default.io.log"), b"");
    chmod(&env.state.join("default.io.log"), 0o644);
    env.mirror_ok(&[]);
    assert_eq!(mode(&env.state), 0o755);
    assert_eq!(mode(&env.state.join("default.io.log")), 0o644);
    assert!(env.io_log().contains("CREATE f"), "{}", env.io_log());
    // What syncer creates there now is private all the same.
    assert_eq!(mode(&env.state.join("default.cache.redb")), 0o600);
    assert_eq!(mode(&env.state.join("default.schedule.log")), 0o600);
}
