//! End-to-end training on CPU with the real TinyStories sample and the GPT-NeoX tokenizer
//! (../shared/data): the debug config trains, evaluates and writes final/ with validation
//! loss falling by ≥ 3 nats; greedy generation is identical for the naive, absorbed and
//! uncached paths; two runs with one seed give identical losses, with activation recomputation
//! too; bad data and tokenizer
//! inputs end in one-line errors with exit code 2.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn shared_data() -> PathBuf {
    let p = repo().join("../shared/data");
    assert!(
        p.join("tinystories/train").is_dir(),
        "{} is missing: these tests need the shared TinyStories sample",
        p.display()
    );
    p
}

fn mla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mla"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("mla runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "mla failed ({:?}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The debug data tokenized once for every test of this file (prepared datasets are opened
/// directly by `train_data_path`).
fn prepared() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("train_e2e_data");
        if !dir.join("index.json").exists() {
            let d = shared_data();
            ok(&mla(&[
                "prepare",
                d.join("tinystories/train").to_str().unwrap(),
                "--val",
                d.join("tinystories/valid").to_str().unwrap(),
                "--tokenizer-dir",
                d.join("tokenizers/gpt-neox-20b").to_str().unwrap(),
                "--out",
                dir.to_str().unwrap(),
                "--overwrite",
                "--quiet",
            ]));
        }
        dir
    })
}

fn metrics(out_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(out_dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn train(out_dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--device",
        "cpu",
        "--config",
        "config_hub/pretrain/debug.yaml",
        "--out_dir",
        out_dir.to_str().unwrap(),
        "--data.train_data_path",
        prepared().to_str().unwrap(),
        "--data.val_data_path",
        "null",
    ];
    let tokenizer = shared_data().join("tokenizers/gpt-neox-20b");
    args.extend_from_slice(&["--tokenizer_dir", tokenizer.to_str().unwrap()]);
    args.extend_from_slice(extra);
    mla(&args)
}

#[test]
fn debug_config_trains_evaluates_saves_and_generates_the_same_text_on_every_path() {
    let out_dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    ok(&train(out_dir.path(), &[]));
    // Its time is a benchmark figure (BENCHMARKS.md § Debug run), not a test bound.
    println!("debug run: {:.0} s", started.elapsed().as_secs_f64());

    let m = metrics(out_dir.path());
    let val: Vec<f64> = m.iter().filter_map(|r| r["val_loss"].as_f64()).collect();
    let train_lines: Vec<&Value> = m.iter().filter(|r| r["loss"].is_number()).collect();
    assert!(
        val.len() >= 3,
        "initial, interval and final validation: {val:?}"
    );
    let (first, last) = (val[0], *val.last().unwrap());
    println!("validation loss {first:.3} → {last:.3}");
    // Untrained, the loss is about ln 50304 ≈ 10.8; 3 nats lower is unmistakable learning.
    assert!(
        first - last >= 3.0,
        "validation loss fell only {first:.3} → {last:.3}"
    );
    // A model that ignores context scores at best the entropy of the token frequencies: 5.93
    // nats for the val split under the train split's frequencies, 5.89 under its own (GPT-NeoX
    // tokens of ../shared/data/tinystories). Below that the model uses the context (the debug
    // run reaches ≈ 4.2; its 10 validation batches move the figure by ≈ 0.03).
    assert!(
        last < 5.89,
        "validation loss {last:.3} is no better than token frequencies alone (5.89)"
    );
    for key in [
        "step",
        "tokens",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "data_wait_frac",
    ] {
        assert!(train_lines[0][key].is_number(), "train lines carry {key}");
    }
    // Local shards: reading a micro-batch is microseconds against a step of ~0.1 s or more.
    for r in &train_lines {
        let wait = r["data_wait_frac"].as_f64().unwrap();
        assert!((0.0..0.2).contains(&wait), "data_wait_frac {wait}");
    }
    assert!(out_dir.path().join("final/model.safetensors").exists());
    assert!(out_dir.path().join("final/manifest.json").exists());
    assert!(
        out_dir.path().join("metrics.csv").exists(),
        "logger_name: csv"
    );

    let final_dir = out_dir.path().join("final");
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            final_dir.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-new-tokens",
            "64",
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        ok(&mla(&args))
    };
    let absorbed = generate(&["--attention", "absorbed"]);
    let naive = generate(&["--attention", "naive"]);
    let uncached = generate(&["--no-cache"]);
    println!("{absorbed}");
    assert_eq!(absorbed, naive);
    assert_eq!(absorbed, uncached);
    assert!(absorbed.starts_with("Once upon a time,"));
    let words = absorbed.split_whitespace().count();
    assert!(words >= 20, "64 tokens of text: {absorbed}");
    // --precision: 32-true is the CPU default; bf16-true runs the absorbed bf16 cache (its
    // greedy text may part from fp32 at a near-tie, so only its form is checked).
    assert_eq!(generate(&["--precision", "32-true"]), absorbed);
    let bf16 = generate(&["--precision", "bf16-true"]);
    println!("bf16: {bf16}");
    assert!(bf16.starts_with("Once upon a time,"), "{bf16}");
    assert!(bf16.split_whitespace().count() >= 20, "{bf16}");
}

/// One seed, one loss sequence; recomputing blocks in the backward
/// (`train.activation_checkpointing`) changes memory and time, not a bit of the training over
/// 20 steps (issue 12 asks ≤ 1e-6 relative; its gradients are the plain backward's to the bit:
/// train::loss tests).
#[test]
fn same_seed_gives_identical_loss_sequences_with_and_without_recomputation() {
    let run = |extra: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--train.max_steps",
            "20",
            "--train.log_interval",
            "1",
            "--eval.initial_validation",
            "false",
            "--eval.max_iters",
            "2",
        ];
        args.extend_from_slice(extra);
        ok(&train(dir.path(), &args));
        let losses: Vec<f64> = metrics(dir.path())
            .iter()
            .filter_map(|r| r["loss"].as_f64())
            .collect();
        assert_eq!(losses.len(), 20);
        losses
    };
    let a = run(&[]);
    assert_eq!(a, run(&[]), "bit-identical losses for the same seed");
    for policy in ["blocks", "{every_k: 2}"] {
        let b = run(&["--train.activation_checkpointing", policy]);
        assert_eq!(a, b, "activation_checkpointing {policy}");
    }
}

/// Bad input: exit 2, one line on stderr naming `culprit`, no panic.
fn assert_bad(out: &Output, culprit: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(last.starts_with("error: "), "{err}");
    assert!(last.contains(culprit), "names {culprit}: {last}");
}

fn quick(out_dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "--train.max_steps",
        "1",
        "--eval.initial_validation",
        "false",
    ];
    args.extend_from_slice(extra);
    train(out_dir, &args)
}

#[test]
fn missing_and_empty_data_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = quick(
        dir.path(),
        &["--data.train_data_path", "/nonexistent/stories"],
    );
    assert_bad(&out, "/nonexistent/stories");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out = quick(
        dir.path(),
        &[
            "--data.train_data_path",
            empty.to_str().unwrap(),
            "--data.val_data_path",
            empty.to_str().unwrap(),
        ],
    );
    assert_bad(&out, "empty.txt");
}

#[test]
fn non_utf8_text_is_reported_with_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("latin1.txt");
    std::fs::write(
        &bad,
        b"Once upon a time there was a caf\xe9.\n<|endoftext|>\n",
    )
    .unwrap();
    let out = quick(
        dir.path(),
        &[
            "--data.train_data_path",
            bad.to_str().unwrap(),
            "--data.val_data_path",
            bad.to_str().unwrap(),
        ],
    );
    assert_bad(&out, "latin1.txt");
}

#[test]
fn tokenizer_larger_than_the_model_vocabulary_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = quick(
        dir.path(),
        &[
            "--model_config.vocab_size",
            "1000",
            "--model_config.padded_vocab_size",
            "1024",
        ],
    );
    assert_bad(&out, "50277");
}

#[test]
fn shard_with_a_wrong_header_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("data");
    std::fs::create_dir(&copy).unwrap();
    for e in std::fs::read_dir(prepared()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, copy.join(p.file_name().unwrap())).unwrap();
    }
    let shard = std::fs::read_dir(&copy)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "bin"))
        .expect("a shard");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[0] ^= 0xff; // break the magic
    std::fs::write(&shard, bytes).unwrap();
    let out = quick(
        dir.path(),
        &["--data.train_data_path", copy.to_str().unwrap()],
    );
    assert_bad(&out, shard.file_name().unwrap().to_str().unwrap());
}

#[test]
fn global_batch_not_divisible_by_micro_batch_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = quick(
        dir.path(),
        &[
            "--train.global_batch_size",
            "12",
            "--train.micro_batch_size",
            "8",
        ],
    );
    assert_bad(&out, "train.global_batch_size");
}

#[test]
fn tensorboard_event_files_are_read_by_tensorboard() {
    let dir = tempfile::tempdir().unwrap();
    ok(&train(
        dir.path(),
        &[
            "--logger_name",
            "tensorboard",
            "--train.max_steps",
            "3",
            "--train.log_interval",
            "1",
            "--eval.initial_validation",
            "false",
            "--eval.max_iters",
            "1",
        ],
    ));
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]); acc.Reload()
tags = acc.Tags()["scalars"]
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags}))
"#;
    let out = Command::new(repo().join(".venv/bin/python"))
        .args([
            "-c",
            script,
            dir.path().join("tensorboard").to_str().unwrap(),
        ])
        .output()
        .expect("python from .venv");
    let scalars: Value = serde_json::from_slice(&ok(&out).into_bytes()).expect("JSON");
    let jsonl: Vec<f64> = metrics(dir.path())
        .iter()
        .filter_map(|r| r["loss"].as_f64())
        .collect();
    let tb: Vec<f64> = scalars["train/loss"]
        .as_array()
        .expect("train/loss scalars")
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .collect();
    assert_eq!(tb.len(), 3);
    // TensorBoard's scalars are f32: each is metrics.jsonl's value rounded once to f32
    // (≤ 2^-24 of it), which TensorBoard's reader may render to a decimal within another half
    // f32 step: at most 2^-23 = f32::EPSILON apart in all.
    for (a, b) in tb.iter().zip(&jsonl) {
        let d = (a - b).abs() / b.abs();
        println!(
            "Δ TensorBoard vs metrics.jsonl loss, relative: {d:.2e} (bound {:.2e})",
            f32::EPSILON
        );
        assert!(d <= f64::from(f32::EPSILON), "{a} vs {b}");
    }
    assert_eq!(scalars["val/loss"].as_array().map(Vec::len), Some(1));
}

/// TextFiles reads a directory as litgpt's TextFiles does (issue 9): its top-level `*.txt`
/// files only, the first of them as validation data without `val_data_path`; not a litgpt
/// `train/` output below it, a nested folder, or `.json` beside it (which broke runs on a
/// folder litgpt had used). A directory without any `.txt` is an error naming the key.
#[test]
fn text_files_reads_a_directorys_top_level_txt_files_as_litgpt() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("stories");
    let text = std::fs::read_to_string(
        shared_data().join("tinystories/valid/tinystories_v1_valid_head.txt"),
    )
    .unwrap();
    let cut = text[..text.len().min(60_000)]
        .rfind("<|endoftext|>")
        .unwrap();
    std::fs::create_dir_all(data.join("train")).unwrap();
    std::fs::create_dir_all(data.join("nested")).unwrap();
    for name in ["a.txt", "b.txt", "nested/c.txt"] {
        std::fs::write(data.join(name), &text[..cut]).unwrap();
    }
    std::fs::write(data.join("notes.json"), "{\"not\": \"stories\"}").unwrap();
    std::fs::write(data.join("train/index.json"), "{\"litgpt\": \"output\"}").unwrap();
    let out = quick(
        dir.path(),
        &["--data.train_data_path", data.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("data: tokenizing"))
        .unwrap();
    let (a, b) = (data.join("a.txt"), data.join("b.txt"));
    assert!(
        line.contains(&format!("tokenizing {}, {} into", a.display(), b.display())),
        "{line}"
    );
    let empty = dir.path().join("no-txt");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.json"), "{}").unwrap();
    let out = quick(
        &dir.path().join("run2"),
        &["--data.train_data_path", empty.to_str().unwrap()],
    );
    assert_bad(&out, "data.init_args.train_data_path");
}
