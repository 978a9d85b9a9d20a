//! Command-line hygiene (issue 15): a reader that goes away never makes syncer panic, and a
//! monoshot still completes its pass; shell completions and the man page come from the clap
//! definitions; `status` of a job that never ran says so, with `null`s in JSON; `--threads`
//! outside 1..=256 is a usage error before anything starts (issue 23).

use std::os::fd::OwnedFd;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::common::*;

/// Runs `cmd` with a stdout whose reader is already closed: its first write fails (EPIPE).
fn with_closed_stdout(mut cmd: Command) -> Output {
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe().expect("pipe");
    drop(read);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .expect("run syncer")
}

fn assert_quiet_exit(out: &Output, code_expected: i32, what: &str) {
    let err = stderr(out);
    assert!(!err.contains("panicked"), "{what} panicked:\n{err}");
    assert!(!err.contains("Broken pipe"), "{what} complained:\n{err}");
    assert_eq!(code(out), code_expected, "{what}:\n{}", text(out));
}

#[test]
fn a_closed_stdout_never_panics_and_a_monoshot_still_completes() {
    let env = Env::new();
    gen_tree(&env.src, 15, 300);
    let out = with_closed_stdout(env.monoshot_cmd(&[]));
    assert_quiet_exit(&out, 0, "monoshot into a closed pipe");
    assert_trees_equal(&env.src, &env.rep);

    // The same through a real `head -1`: the pass completes and exits with its own code.
    write(&env.src.join("more/new.txt"), b"after the first pass");
    let cmd = env.monoshot_cmd(&[]);
    let mut sh = Command::new("bash");
    sh.arg("-c")
        .arg("\"$@\" | head -1 >/dev/null; exit ${PIPESTATUS[0]}")
        .arg("bash")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    let out = sh.output().expect("bash");
    assert_quiet_exit(&out, 0, "monoshot | head -1");
    assert_trees_equal(&env.src, &env.rep);

    for args in [&["status"][..], &["status", "--json"], &["status", "--all"]] {
        let mut cmd = syncer();
        cmd.args(args).arg("--state-dir").arg(&env.state);
        let out = with_closed_stdout(cmd);
        assert_quiet_exit(&out, 0, &args.join(" "));
        assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    }
    let mut cmd = syncer();
    cmd.args(["completions", "bash"]);
    assert_quiet_exit(&with_closed_stdout(cmd), 0, "completions");
    let mut cmd = syncer();
    cmd.arg("manpage");
    assert_quiet_exit(&with_closed_stdout(cmd), 0, "manpage");
}

#[test]
fn bash_completion_offers_source_after_monoshot_so() {
    let script = r#"
source <("$1" completions bash)
COMP_WORDS=(syncer monoshot --so)
COMP_CWORD=2
COMP_LINE="syncer monoshot --so"
COMP_POINT=${#COMP_LINE}
_syncer syncer --so monoshot
printf '%s\n' "${COMPREPLY[@]}"
"#;
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("bash")
        .arg(bin())
        .output()
        .expect("bash");
    assert!(out.status.success(), "{}", text(&out));
    let offered: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(offered, ["--source"], "{}", text(&out));
    for shell in ["zsh", "fish"] {
        let out = syncer().args(["completions", shell]).output().expect("run");
        assert_eq!(code(&out), 0);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("source"),
            "{shell} script lacks --source"
        );
    }
}

#[test]
fn the_man_page_renders_without_warnings_and_names_every_subcommand() {
    let env = Env::new();
    let out = syncer().arg("manpage").output().expect("run");
    assert_eq!(code(&out), 0, "{}", text(&out));
    let page = env.path("syncer.1");
    std::fs::write(&page, &out.stdout).expect("write");
    let rendered = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(&page)
        .output()
        .expect("groff (.ci/run installs groff-base)");
    assert!(rendered.status.success(), "{}", text(&rendered));
    assert!(
        rendered.stderr.is_empty(),
        "groff warnings:\n{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let man = Command::new("man")
        .arg("-l")
        .arg(&page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .expect("man");
    let shown = String::from_utf8_lossy(&man.stdout);
    for sub in [
        "monoshot",
        "start",
        "stop",
        "status",
        "forget",
        "completions",
        "manpage",
    ] {
        assert!(
            shown.contains(sub),
            "the man page does not name '{sub}':\n{shown}"
        );
    }
}

#[test]
fn status_of_a_job_that_never_ran_says_so_with_nulls_in_json() {
    let env = Env::new();
    let out = syncer()
        .args(["status", "--name", "ghost", "--state-dir"])
        .arg(&env.state)
        .output()
        .expect("run");
    assert_eq!(code(&out), 0);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("job 'ghost': never ran"),
        "{}",
        text(&out)
    );
    let out = syncer()
        .args(["status", "--name", "ghost", "--json", "--state-dir"])
        .arg(&env.state)
        .output()
        .expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    for field in [
        "source",
        "replica",
        "updated",
        "last_pass",
        "pid",
        "next_pass",
    ] {
        assert!(v[field].is_null(), "{field} is {} in:\n{v}", v[field]);
    }
    assert_eq!(v["running"], false);
    assert_eq!(v["name"], "ghost");
}

#[test]
fn threads_outside_1_to_256_is_a_usage_error_before_anything_starts() {
    let env = Env::new();
    write(&env.src.join("f"), b"f");
    for n in ["0", "257", "1000000000", "-1", "many", "", "4.5"] {
        for sub in ["monoshot", "start"] {
            let mut cmd = env.command(sub);
            cmd.args(["--interval", "1h"][..if sub == "start" { 2 } else { 0 }].iter());
            cmd.arg(format!("--threads={n}"));
            // A hang bound only: a refused value returns at once.
            let out = run_bounded(cmd, Duration::from_secs(20));
            assert_eq!(code(&out), 2, "{sub} --threads '{n}':\n{}", text(&out));
            let err = stderr(&out);
            assert!(
                err.contains("--threads"),
                "{sub} --threads '{n}' does not name the option:\n{err}"
            );
            if n.parse::<u64>().is_ok() {
                assert!(err.contains("1..=256"), "no range in:\n{err}");
            }
            assert!(!env.rep.exists(), "{sub} --threads '{n}' made the replica");
            assert!(!env.state.exists(), "{sub} --threads '{n}' wrote state");
        }
    }
    // The bounds themselves are accepted.
    for n in ["1", "256"] {
        let out = env.monoshot(&["--threads", n]);
        assert_eq!(code(&out), 0, "--threads {n}:\n{}", text(&out));
    }
    assert_trees_equal(&env.src, &env.rep);
}
