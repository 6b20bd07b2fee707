//! Checkpoints on a local out_dir, end to end through the `mla` binary (DESIGN §6, issue #4):
//! bit-exact resume after a process exit, a corrupted newest step named by `mla ckpt verify`
//! and skipped by `resume: auto`, refusal of another model / tying / tokenizer, `mla ckpt
//! list|inspect`, and the weights giving the same logits in Python (`safetensors` + the plain
//! PyTorch reference, scripts/ref/check_safetensors_logits.py) as in mla; steps with a
//! non-finite gradient skipped without touching weights or optimizer state.
//!
//! Each run is the tiny 2N-step configuration of `common` (N = 3, a save every 2 steps); the
//! straight 2N-step run is shared by the tests of this file.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Run 1 of a split run: the same 2N-step config, interrupted after step N (as by SIGTERM).
fn first_half(cwd: &Path, out_dir: &str) -> String {
    let out = train(
        cwd,
        out_dir,
        &[],
        &[("MLA_TEST_STOP_AT_STEP", &HALF.to_string())],
    );
    ok(&out);
    stderr(&out)
}

fn resume_auto(cwd: &Path, out_dir: &str) -> String {
    let out = train(cwd, out_dir, &["--resume", "auto"], &[]);
    ok(&out);
    stderr(&out)
}

#[test]
fn exit_after_n_steps_then_resume_auto_is_bit_exact_with_a_straight_run() {
    let reference = reference();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();

    let log = first_half(dir.path(), out);
    assert!(
        log.contains(&format!("saving step {HALF} before exiting")),
        "{log}"
    );
    let rows = list(out, true);
    let dirs: Vec<&str> = rows.iter().map(|r| r["dir"].as_str().unwrap()).collect();
    assert_eq!(dirs, ["step-00000002", "step-00000003"], "{rows:?}");
    assert!(rows.iter().all(|r| r["status"] == "verified"), "{rows:?}");

    let log = resume_auto(dir.path(), out);
    assert!(log.contains(&format!("resumed at step {HALF}")), "{log}");
    assert_eq!(
        losses(&metrics_file(dir.path(), out)),
        reference.losses,
        "loss sequence of N + N steps vs 2N straight"
    );
    assert_eq!(
        sha256_file(&Path::new(out).join("final/model.safetensors")),
        reference.model_sha256,
        "final weights"
    );
}

#[test]
fn corrupt_newest_step_is_named_by_verify_and_resume_auto_falls_back_to_the_previous_one() {
    let reference = reference();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    first_half(dir.path(), out_s);

    // Flip one byte in the middle of the newest step's (N's) weights.
    let model = out.join("step-00000003/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&model, bytes).unwrap();

    let newest = out.join("step-00000003");
    let verify = mla(&["ckpt", "verify", newest.to_str().unwrap()]);
    assert_bad(
        &verify,
        &["step-00000003", "model.safetensors", "corrupt", "sha256"],
    );
    ok(&mla(&[
        "ckpt",
        "verify",
        out.join("step-00000002").to_str().unwrap(),
    ]));
    let rows = list(out_s, true);
    let bad = row(&rows, "step-00000003").unwrap();
    assert_eq!(bad["status"], "invalid");
    assert!(bad["reason"]
        .as_str()
        .unwrap()
        .contains("model.safetensors"));
    let table = ok(&mla(&["ckpt", "list", "--verify", out_s]));
    assert!(
        table.contains("resume: auto would load step-00000002"),
        "{table}"
    );

    let log = resume_auto(dir.path(), out_s);
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("skipping checkpoint step-00000003"))
        .unwrap_or_else(|| panic!("a warning about step 3: {log}"));
    assert!(warning.contains("model.safetensors"), "{warning}");
    assert!(log.contains("resumed at step 2"), "{log}");
    // Steps 3.. are replayed from step 2: the same losses, the same final weights.
    let all = losses(&metrics_file(dir.path(), out_s));
    assert_eq!(
        &all[all.len() - (STEPS as usize - 2)..],
        &reference.losses[2..]
    );
    assert_eq!(
        sha256_file(&out.join("final/model.safetensors")),
        reference.model_sha256
    );
}

/// A 1-step run's checkpoint (final/), shared by the read-only tests below.
fn small_checkpoint() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("small");
        ok(&train(
            dir.path(),
            out.to_str().unwrap(),
            &["--train.max_steps", "1"],
            &[],
        ));
        (dir, out.join("final"))
    })
    .1
}

#[test]
fn resume_refuses_another_model_tying_or_tokenizer_with_one_line_and_exit_2() {
    let ckpt = small_checkpoint();
    let ckpt_s = ckpt.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh");
    let fresh = fresh.to_str().unwrap();

    let shape = train(
        dir.path(),
        fresh,
        &["--resume", ckpt_s, "--model_config.n_layer", "3"],
        &[],
    );
    assert_bad(&shape, &["another model", "n_layer", "2 there, 3 here"]);

    // Same tokenizer semantics, different file: the sha256 decides.
    let tok = dir.path().join("tokenizer");
    std::fs::create_dir(&tok).unwrap();
    let mut json = std::fs::read(tokenizer_dir().join("tokenizer.json")).unwrap();
    json.push(b'\n');
    std::fs::write(tok.join("tokenizer.json"), json).unwrap();
    let tokenizer = train(
        dir.path(),
        fresh,
        &["--resume", ckpt_s, "--tokenizer_dir", tok.to_str().unwrap()],
        &[],
    );
    assert_bad(
        &tokenizer,
        &["another tokenizer", "tokenizer.json", "sha256"],
    );

    // Tied embeddings are another model, though model_config is the same (a train key).
    let tied = train(
        dir.path(),
        fresh,
        &["--resume", ckpt_s, "--train.tie_embeddings", "true"],
        &[],
    );
    assert_bad(&tied, &["train.tie_embeddings false", "this run has true"]);
    // Another world size is not refused (issue 15: dist_cpu.rs resumes across them).

    let missing = train(dir.path(), fresh, &["--resume", "true"], &[]);
    assert_bad(&missing, &["resume: true", "no valid checkpoint"]);
    assert!(
        list(fresh, false).is_empty(),
        "refused resumes write nothing"
    );
}

#[test]
fn resume_from_an_explicit_step_dir_continues_from_that_step() {
    let ckpt = small_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("continued");
    let log = stderr(&train(
        dir.path(),
        out.to_str().unwrap(),
        &["--resume", ckpt.to_str().unwrap(), "--train.max_steps", "2"],
        &[],
    ));
    assert!(log.contains("resumed at step 1"), "{log}");
    let steps: Vec<u64> = losses(&out.join("metrics.jsonl"))
        .iter()
        .map(|l| l.0)
        .collect();
    assert_eq!(steps, [2]);
}

#[test]
fn initial_checkpoint_dir_given_as_an_out_dir_loads_its_newest_weights_only() {
    let ckpt = small_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("finetune");
    let out_s = out.to_str().unwrap();
    let args = [
        "--initial_checkpoint_dir",
        ckpt.parent().unwrap().to_str().unwrap(),
        "--train.max_steps",
        "1",
    ];
    let log = stderr(&train(dir.path(), out_s, &args, &[]));
    let loaded = log
        .lines()
        .find(|l| l.contains("initial weights from"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(loaded.contains("/small/final"), "{loaded}");
    // Weights only: step, optimizer and data position start fresh, so step 1 sees the first
    // batch again, now with trained weights.
    let first = losses(&out.join("metrics.jsonl"));
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].0, 1);
    assert_ne!(first[0].1, reference().losses[0].1);
}

#[test]
fn inspect_shows_config_state_and_tensor_names_shapes_and_dtypes() {
    let ckpt = small_checkpoint();
    let text = ok(&mla(&["ckpt", "inspect", ckpt.to_str().unwrap()]));
    for needle in [
        "verified, 5 objects",
        "step 1, 128 tokens, world size 1",
        "model mla-debug: MLA attention, 2 layers, n_embd 16",
        "state.json:",
        "\"cursor\": 4",
        "model.safetensors: 30 tensors (format=pt)",
        "transformer.wte.weight",
        "F32  [50304, 16]",
        "optimizer.safetensors: 60 tensors (step=1)",
        "exp_avg_sq.transformer.h.1.attn.kv_b_proj.weight",
    ] {
        assert!(text.contains(needle), "{needle:?} in:\n{text}");
    }
    let bad = mla(&["ckpt", "inspect", ckpt.parent().unwrap().to_str().unwrap()]);
    assert_bad(&bad, &["not a step directory", "mla ckpt list --verify"]);
}

#[test]
fn checkpoint_weights_give_the_same_logits_in_python_safetensors_as_in_mla() {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/setup.sh",
        python.display()
    );
    let ckpt = small_checkpoint();
    let tokens = "7454,2069,247,673,13,50276,0,3";
    let logits = ok(&mla(&[
        "ckpt",
        "logits",
        ckpt.to_str().unwrap(),
        "--tokens",
        tokens,
    ]));
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("mla_logits.json");
    std::fs::write(&theirs, &logits).unwrap();
    let out = std::process::Command::new(&python)
        .arg(repo().join("scripts/ref/check_safetensors_logits.py"))
        .arg(ckpt)
        // The same fp32 forward by another implementation: rounding differences of n ≈ 17
        // chained reductions × K ≤ 384 (the MLP width) ≈ 6,500 operations add up to about
        // 4·√n·u ≈ 2e-5 of the values carried (Higham & Mary's probabilistic bound), which
        // LayerNorm keeps O(1) and the residual stream at a few units: 1e-4.
        .args(["--tokens", tokens, "--tol", "1e-4", "--compare"])
        .arg(&theirs)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "logits differ: {report}");
    assert!(report.contains("over 402432 logits"), "8 × 50304: {report}");
}

#[test]
fn ckpt_list_of_a_missing_local_out_dir_is_an_error_not_an_empty_run() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    let missing = missing.to_str().unwrap();
    assert_bad(
        &mla(&["ckpt", "list", missing]),
        &[missing, "no such directory"],
    );
    let url = format!("file://{missing}");
    assert_bad(&mla(&["ckpt", "list", &url]), &[&url]);
    // An existing directory without checkpoints is an empty run.
    let empty = ok(&mla(&["ckpt", "list", dir.path().to_str().unwrap()]));
    assert!(empty.contains("no step directories"), "{empty}");
}

/// The non-finite guard end to end (issue 10 item 7 moved its decision to the device): with
/// one gradient NaN at steps 3 and 4, both updates are skipped, so step 4 saves the very
/// weights and optimizer state of step 2 (bit for bit) and training goes on at step 5; three
/// in a row with `train.max_nonfinite_steps: 3` end the run with a one-line error.
#[test]
fn non_finite_steps_are_skipped_on_the_device_and_too_many_in_a_row_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = out.to_str().unwrap();
    let run = train(
        dir.path(),
        o,
        &["--train.max_nonfinite_steps", "3"],
        &[("MLA_TEST_NAN_GRAD_STEPS", "3,4")],
    );
    ok(&run);
    let err = stderr(&run);
    for (step, n) in [(3, 1), (4, 2)] {
        let line =
            format!("step {step}: non-finite gradient norm (NaN) — update skipped ({n} in a row)");
        assert!(err.contains(&line), "{line}\n{err}");
    }
    let sha = |step: &str, file: &str| sha256_file(&out.join(step).join(file));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert_eq!(
            sha("step-00000002", file),
            sha("step-00000004", file),
            "{file}"
        );
    }
    assert_ne!(
        sha("step-00000004", "model.safetensors"),
        sha("final", "model.safetensors"),
        "steps 5 and 6 update again"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("final/state.json")).unwrap()).unwrap();
    assert_eq!(state["skipped_steps"], 2, "{state}");

    let out = dir.path().join("too-many");
    let run = train(
        dir.path(),
        out.to_str().unwrap(),
        &["--train.max_nonfinite_steps", "3"],
        &[("MLA_TEST_NAN_GRAD_STEPS", "2,3,4")],
    );
    let err = stderr(&run);
    assert_eq!(run.status.code(), Some(1), "{err}");
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: 3 optimizer steps in a row had a non-finite loss or gradient"),
        "{err}"
    );
}
