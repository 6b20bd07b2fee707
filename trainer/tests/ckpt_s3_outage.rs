//! Failed checkpoint saves during training, end to end through the `mla` binary: the S3 test
//! server is paused (SIGSTOP) while a save uploads — the run reports the failed save, keeps
//! training (`checkpoint.on_failure: continue`, the default) and the next save succeeds once
//! the server answers again; with the store lost for good after the start, `on_failure: stop`
//! ends the run at the first failure, and `continue` trains to the end but fails the run when
//! the last save is lost. (A store unusable from the start is refused before training: see
//! nothing_lost.rs.)
//!
//! Its own test binary because pausing the shared server would stall concurrent S3 tests; its
//! tests pause it one at a time. They need `scripts/s3_server.sh start` (MLA_TEST_S3_PID).

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// SIGSTOP on creation, SIGCONT on drop (also when the test panics).
struct Paused(String);

impl Paused {
    fn new(pid: &str) -> Paused {
        let ok = Command::new("kill").args(["-STOP", pid]).status().unwrap();
        assert!(ok.success(), "kill -STOP {pid}");
        Paused(pid.to_string())
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

/// The tiny run into `out` with short S3 timeouts (IMPATIENT) and `env`; its stderr lines go
/// to the receiver as they come, and all of them are the reader thread's result.
fn spawn_logged(
    cwd: &std::path::Path,
    out: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (
    std::process::Child,
    mpsc::Receiver<String>,
    std::thread::JoinHandle<Vec<String>>,
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mla"))
        .args(train_args(out, extra))
        .envs(IMPATIENT.iter().copied())
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let _ = tx.send(line.clone());
            all.push(line);
        }
        all
    });
    (child, rx, reader)
}

/// Short S3 timeouts and retries, so a paused server fails a save within ~3 s.
const IMPATIENT: &[(&str, &str)] = &[
    ("MLA_STORE_REQUEST_TIMEOUT_SECS", "1"),
    ("MLA_STORE_CONNECT_TIMEOUT_SECS", "1"),
    ("MLA_STORE_MAX_RETRIES", "1"),
    ("MLA_STORE_RETRY_TIMEOUT_SECS", "2"),
];

#[test]
fn s3_outage_during_a_save_is_reported_training_continues_and_the_next_save_succeeds() {
    let Some(out) = s3_out_dir("outage") else {
        return;
    };
    let pid = std::env::var("MLA_TEST_S3_PID").expect("MLA_TEST_S3_PID (scripts/s3_server.sh)");
    let _one = SERVER.lock().unwrap_or_else(|p| p.into_inner());
    let cwd = tempfile::tempdir().unwrap();
    // Each PUT waits 100 ms: the pause below lands while the save is still uploading.
    let (mut child, rx, reader) = spawn_logged(
        cwd.path(),
        &out,
        &[],
        &[
            ("MLA_STORE_TEST_PUT_DELAY_MS", "100"),
            ("RUST_LOG", "info,mla_trainer=debug"),
        ],
    );
    let wait_for = |needle: &str| wait_for_line(&rx, needle);
    // The save of step 2 has been handed to the background upload: pause the server until the
    // run reports that save as failed (short timeouts: a few seconds).
    wait_for("checkpoint step-00000002: training blocked");
    {
        let _paused = Paused::new(&pid);
        wait_for("checkpoint step-00000002 FAILED");
    }
    let status = child.wait().unwrap();
    let log = reader.join().unwrap().join("\n");
    assert!(status.success(), "{status:?}\n{log}");
    let failed = log
        .find("checkpoint step-00000002 FAILED")
        .unwrap_or_else(|| panic!("the failed save is reported:\n{log}"));
    assert!(log[failed..].contains("training continues"), "{log}");
    assert!(
        log[failed..].contains(&format!("step {STEPS}/{STEPS}")),
        "{log}"
    );
    assert!(
        log[failed..].contains("checkpoint final saved"),
        "a later save succeeds:\n{log}"
    );

    let rows = list(&out, true);
    if let Some(s2) = row(&rows, "step-00000002") {
        assert_ne!(s2["status"], "verified", "the failed save stays invisible");
    }
    assert_eq!(row(&rows, "final").unwrap()["status"], "verified");
}

/// Read the run's log lines until one contains `needle` (at most 120 s).
fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no line with {needle:?}"));
        if line.contains(needle) {
            return;
        }
    }
}

/// One server-pausing test at a time: they share the one S3 test server.
static SERVER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The tiny run on S3 whose store goes away once training has begun (after the start-up
/// probe, which refuses a store that is unusable from the start): the server is paused from
/// the first training step until the run has ended. Each PUT waits 250 ms, so the pause lands
/// before step 2's save completes. None without the S3 environment.
fn store_lost_after_start(extra: &[&str]) -> Option<(std::process::ExitStatus, String)> {
    let out = s3_out_dir("lost_after_start")?;
    let pid = std::env::var("MLA_TEST_S3_PID").expect("MLA_TEST_S3_PID (scripts/s3_server.sh)");
    let _one = SERVER.lock().unwrap_or_else(|p| p.into_inner());
    let cwd = tempfile::tempdir().unwrap();
    let (mut child, rx, reader) = spawn_logged(
        cwd.path(),
        &out,
        extra,
        &[("MLA_STORE_TEST_PUT_DELAY_MS", "250")],
    );
    wait_for_line(&rx, &format!("step 1/{STEPS}"));
    let paused = Paused::new(&pid);
    let status = child.wait().unwrap();
    drop(paused);
    Some((status, reader.join().unwrap().join("\n")))
}

#[test]
fn failed_save_with_on_failure_stop_ends_the_run() {
    let Some((status, log)) = store_lost_after_start(&["--checkpoint.on_failure", "stop"]) else {
        return;
    };
    assert_eq!(status.code(), Some(1), "{log}");
    let last = log.trim_end().lines().last().unwrap();
    assert!(
        last.contains("checkpoint step-00000002 failed and checkpoint.on_failure is stop"),
        "{log}"
    );
    assert!(!log.contains(&format!("step {STEPS}/{STEPS}")), "{log}");
    assert!(!log.contains(&secret()), "no credentials in logs");
}

#[test]
fn failed_saves_with_on_failure_continue_keep_training_but_a_lost_last_save_fails_the_run() {
    let Some((status, log)) = store_lost_after_start(&[]) else {
        return;
    };
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("checkpoint step-00000002 FAILED (1 in a row)"),
        "{log}"
    );
    assert!(
        log.contains("checkpoint step-00000004 FAILED (2 in a row)"),
        "{log}"
    );
    assert!(log.contains(&format!("step {STEPS}/{STEPS}")), "{log}");
    let last = log.trim_end().lines().last().unwrap();
    assert!(
        last.contains("the last checkpoint (final) was not saved"),
        "{log}"
    );
    // A lost final save is not followed by the promise of a later one (none comes).
    let lost = log
        .find("checkpoint final FAILED")
        .unwrap_or_else(|| panic!("the lost final save is reported:\n{log}"));
    assert!(!log[lost..].contains("a later save writes"), "{log}");
    assert!(!log.contains(&secret()), "no credentials in logs");
}

fn secret() -> String {
    std::env::var("AWS_SECRET_ACCESS_KEY").expect("the S3 test environment")
}
