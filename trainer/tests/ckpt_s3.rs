//! Checkpoints on the S3 test server (`scripts/s3_server.sh`), end to end through the `mla`
//! binary: bit-exact resume after a process exit with an `s3://` out_dir, and `kill -9` in the
//! middle of an upload — the half-written step stays invisible, `mla ckpt list` shows it as
//! incomplete, and `resume: auto` removes it and continues from the step before, bit-exactly.
//!
//! Skipped without the S3 environment; a failure when `MLA_REQUIRE_S3=1` (scripts/test.sh).

mod common;

use common::*;
use mla_storage::{BlockingCheckpointStore, StepName};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn s3_exit_after_n_steps_then_resume_auto_is_bit_exact_with_a_straight_run() {
    let Some(out) = s3_out_dir("bit_exact") else {
        return;
    };
    let reference = reference();
    let cwd = tempfile::tempdir().unwrap();
    // Saves every N steps: the stop at step N comes right after its periodic save, which
    // must not be written twice.
    let every_n = ["--train.save_interval", "3"];
    let first = train(
        cwd.path(),
        &out,
        &every_n,
        &[("MLA_TEST_STOP_AT_STEP", &HALF.to_string())],
    );
    ok(&first);
    let saved = format!("checkpoint step-{HALF:08} saved");
    assert_eq!(
        stderr(&first).matches(&saved).count(),
        1,
        "{}",
        stderr(&first)
    );
    let resumed = train(
        cwd.path(),
        &out,
        &["--resume", "auto", every_n[0], every_n[1]],
        &[],
    );
    ok(&resumed);
    assert!(
        stderr(&resumed).contains(&format!("resumed at step {HALF}")),
        "{}",
        stderr(&resumed)
    );
    assert_eq!(
        losses(&metrics_file(cwd.path(), &out)),
        reference.losses,
        "loss sequence of N + N steps on S3 vs 2N straight"
    );
    assert_eq!(
        model_sha256(&format!("{out}/final")),
        reference.model_sha256
    );
}

#[test]
fn kill_9_during_an_s3_upload_leaves_the_step_invisible_and_resume_auto_continues_before_it() {
    let Some(out) = s3_out_dir("kill9") else {
        return;
    };
    let reference = reference();
    let cwd = tempfile::tempdir().unwrap();
    // Every PUT waits 250 ms, so one save (5 objects, then the manifest) takes > 1.5 s.
    let args = train_args(&out, &[]);
    // One run id for the killed process and its restart, as mla-launch gives its ranks: the
    // restart takes over the out_dir's lease at once instead of waiting for it to go stale.
    let run_id = ("MLA_RUN_ID", "ckpt-s3-kill9");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mla"))
        .args(&args)
        .env(run_id.0, run_id.1)
        .env("MLA_STORE_TEST_PUT_DELAY_MS", "250")
        .current_dir(cwd.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let store = BlockingCheckpointStore::open(&out).unwrap();
    let (first, second) = (StepName::Step(2), StepName::Step(4));
    let deadline = Instant::now() + Duration::from_secs(120);
    // Kill once step 2 is committed and step 4 has some objects but at least two PUTs to go.
    let killed_with = loop {
        assert!(Instant::now() < deadline, "no save in flight to interrupt");
        assert!(child.try_wait().unwrap().is_none(), "mla ended too early");
        let steps = store.list().unwrap();
        let committed = steps.iter().any(|s| s.step == first && s.exists());
        let partial = steps
            .iter()
            .find(|s| s.step == second && !s.exists() && (1..=3).contains(&s.object_count));
        if let (true, Some(p)) = (committed, partial) {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            break p.object_count;
        }
        std::thread::sleep(Duration::from_millis(30));
    };
    eprintln!("killed with {killed_with} object(s) of step-00000004 uploaded");

    let rows = list(&out, false);
    let s4 = row(&rows, "step-00000004").expect("the half-written step is listed");
    assert_eq!(s4["status"], "incomplete", "{s4}");
    assert!(s4["objects"].as_u64().unwrap() >= 1);
    assert_eq!(row(&rows, "step-00000002").unwrap()["status"], "committed");
    assert!(row(&rows, "final").is_none());
    let verify = mla(&["ckpt", "verify", &format!("{out}/step-00000004")]);
    assert_bad(&verify, &["step-00000004", "no manifest.json"]);

    let resumed = train(cwd.path(), &out, &["--resume", "auto"], &[run_id]);
    ok(&resumed);
    let log = stderr(&resumed);
    // Taking charge of the out_dir, the restart removes the half-written step first.
    assert!(
        log.contains(
            "removed what crashed saves left: 1 incomplete step directory (step-00000004)"
        ),
        "{log}"
    );
    assert!(log.contains("resumed at step 2"), "{log}");
    // The resumed run replays steps 3.. exactly as the straight run did.
    let all = losses(&metrics_file(cwd.path(), &out));
    let replayed = &all[all.len() - (STEPS as usize - 2)..];
    assert_eq!(replayed, &reference.losses[2..]);
    assert_eq!(
        model_sha256(&format!("{out}/final")),
        reference.model_sha256
    );
    // Its own save of step 4 replaced the half-written one.
    let rows = list(&out, true);
    assert_eq!(row(&rows, "step-00000004").unwrap()["status"], "verified");
}
