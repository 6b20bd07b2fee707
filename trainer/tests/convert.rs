//! `mla convert --to-mla` end to end (issue 11): tiny MQA and MHA runs of the `common`
//! configuration become MLA step directories that `mla eval`, `mla generate` and
//! `initial_checkpoint_dir` take as any other; an MQA source keeps its loss (RoRoPE loses
//! nothing there and the full rank is exact); a Hugging Face export converts to the very
//! bytes its checkpoint does; bad input is one line and exit 2, with nothing overwritten.
//!
//! The math is tested against the partial-RoPE reference in model/tests/convert.rs.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

const MHA: &[&str] = &["--model_config.latent_attention", "null"];
const MQA: &[&str] = &[
    "--model_config.latent_attention",
    "null",
    "--model_config.n_query_groups",
    "1",
];

/// A finished tiny run with `extra` overrides under a new temp dir: its `final` step.
fn trained(extra: &[&str]) -> PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    let out = dir.join("run");
    ok(&train(&dir, out.to_str().unwrap(), extra, &[]));
    out.join("final")
}

fn convert(src: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "convert",
        src.to_str().unwrap(),
        "--to-mla",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    mla(&args)
}

fn data() -> &'static str {
    prepared_data().to_str().unwrap()
}

/// Convert `src` into a new temp dir's `mla` with `extra` flags and `--json`: the dir, the
/// out_dir and the report, which `--json` prints and the step keeps as conversion.json.
fn converted(src: &Path, extra: &[&str]) -> (tempfile::TempDir, PathBuf, Value) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mla");
    let mut flags = extra.to_vec();
    flags.push("--json");
    let printed: Value =
        serde_json::from_str(&ok(&convert(src, &out, &flags))).expect("--json prints JSON");
    let saved: Value =
        serde_json::from_slice(&std::fs::read(out.join("final/conversion.json")).unwrap()).unwrap();
    assert_eq!(printed, saved);
    (dir, out, printed)
}

/// `mla train` on the CPU of a converted step's config.yaml, with `extra` overrides.
fn train_converted(cwd: &Path, cfg: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train",
        "--device",
        "cpu",
        "--config",
        cfg.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    mla_in(cwd, &args, &[])
}

fn eval_loss(step: &Path, batches: &str) -> f64 {
    let out = ok(&mla(&[
        "eval",
        step.to_str().unwrap(),
        "--data",
        data(),
        "--max-iters",
        batches,
        "--json",
    ]));
    serde_json::from_str::<Value>(&out).unwrap()["loss"]
        .as_f64()
        .unwrap()
}

#[test]
fn an_mqa_checkpoint_converts_without_changing_its_loss_and_trains_on() {
    let src = trained(MQA);
    let (dir, out, r) = converted(&src, &["--data", data(), "--eval-batches", "4"]);
    assert_eq!(r["source_attention"], "MQA");
    // 2 layers; MQA's cache 2·1·8 per layer; MLA's C + Dr = min(2·1·8, 16) + 4.
    assert_eq!(r["kv_cache_values_per_token"]["before"], 32);
    assert_eq!(r["kv_cache_values_per_token"]["after"], 40);
    assert!(r["calibration_tokens"].as_u64().unwrap() > 0);
    let layers = r["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for l in layers {
        for key in ["rope_energy_kept", "kv_energy_kept"] {
            assert!((l[key].as_f64().unwrap() - 1.0).abs() < 1e-9, "{l}");
        }
    }
    // The converted logits are the source's to fp32 rounding (model/tests/convert.rs: within
    // 2e-5); the mean cross-entropy moves by at most twice the largest logit change.
    let (before, after) = (
        r["val_loss"]["before"].as_f64().unwrap(),
        r["val_loss"]["after"].as_f64().unwrap(),
    );
    assert!((after - before).abs() < 4e-5, "{before} → {after}");
    // The step directory is an ordinary checkpoint: eval gives the loss the report measured
    // (same weights, windows and kernels), generate samples from it, and a run continues it.
    let step = out.join("final");
    assert!((eval_loss(&step, "4") - after).abs() < 1e-9);
    let text = ok(&mla(&[
        "generate",
        step.to_str().unwrap(),
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "5",
    ]));
    assert!(text.starts_with("Once upon a time"), "{text}");
    let cfg = step.join("config.yaml");
    let yaml = std::fs::read_to_string(&cfg).unwrap();
    assert!(yaml.starts_with("# Converted from "), "{yaml}");
    // The converted config is the source run's around the converted model, set to continue
    // from the converted weights into OUT/pretrain.
    let trained_on = train_converted(dir.path(), &cfg, &["--train.max_steps", "2"]);
    ok(&trained_on);
    assert!(stderr(&trained_on).contains("initial weights from"));
    assert!(out.join("pretrain/final/model.safetensors").exists());
}

#[test]
fn an_mha_checkpoint_converts_to_a_smaller_cache_without_data() {
    let src = trained(MHA);
    let (_dir, out, r) = converted(
        &src,
        &[
            "--kv-lora-rank",
            "8",
            "--q-lora-rank",
            "8",
            "--rope-dims",
            "2",
        ],
    );
    assert_eq!(r["source_attention"], "MHA");
    assert_eq!(r["kv_cache_values_per_token"]["before"], 2 * 2 * 2 * 8);
    assert_eq!(r["kv_cache_values_per_token"]["after"], 2 * (8 + 2));
    assert_eq!(r["val_loss"]["before"], Value::Null);
    assert!(r["method"]["latent"].as_str().unwrap().contains("SVD"));
    for l in r["layers"].as_array().unwrap() {
        for key in ["rope_energy_kept", "kv_energy_kept", "q_energy_kept"] {
            let e = l[key].as_f64().unwrap();
            assert!(e > 0.0 && e < 1.0, "{key}: {l}");
        }
    }
    let loss = eval_loss(&out.join("final"), "2");
    assert!(loss.is_finite() && loss > 0.0, "{loss}");
}

#[test]
fn a_hugging_face_export_converts_to_the_bytes_its_checkpoint_does() {
    let src = trained(MHA);
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    ok(&mla(&[
        "export",
        src.to_str().unwrap(),
        "--to",
        "hf",
        hf.to_str().unwrap(),
    ]));
    let (a, b) = (dir.path().join("from-mla"), dir.path().join("from-hf"));
    ok(&convert(&src, &a, &["--kv-lora-rank", "12"]));
    ok(&convert(&hf, &b, &["--kv-lora-rank", "12"]));
    let sha = |d: &Path| sha256_file(&d.join("final/model.safetensors"));
    assert_eq!(sha(&a), sha(&b));
    // A foreign source has no run config: the converted one names the step's own tokenizer,
    // and the data is named on the command line.
    let cfg = b.join("final/config.yaml");
    ok(&train_converted(
        dir.path(),
        &cfg,
        &[
            "--data",
            "TinyStories",
            "--data.data_path",
            data(),
            "--train.max_steps",
            "1",
            "--train.global_batch_size",
            "2",
            "--train.micro_batch_size",
            "2",
        ],
    ));
    assert!(b.join("pretrain/final/model.safetensors").exists());
}

#[test]
fn bad_input_is_one_line_and_overwrites_nothing() {
    let mha = trained(MHA);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mla");
    let bad = |src: &Path, extra: &[&str], culprits: &[&str]| {
        assert_bad(&convert(src, &out, extra), culprits);
        assert!(!out.join("final").exists(), "{extra:?} wrote a step");
    };
    // The common run is the seed's MLA.
    bad(&trained(&[]), &[], &["already MLA"]);
    bad(
        &mha,
        &["--kv-lora-rank", "33"],
        &["--kv-lora-rank 33", "at most 16"],
    );
    bad(&mha, &["--rope-dims", "3"], &["--rope-dims 3", "even"]);
    bad(
        &mha,
        &["--rope-dims", "10"],
        &["--rope-dims 10", "larger than the head"],
    );
    bad(&mha, &["--q-lora-rank", "0"], &["--q-lora-rank 0"]);
    bad(
        &mha,
        &["--factor", "activations"],
        &["--factor activations", "--data"],
    );
    let text = shared_data().join("tinystories/fixtures/cs336_tinystories_sample.txt");
    bad(
        &mha,
        &["--data", text.to_str().unwrap()],
        &["--data", "not a prepared dataset"],
    );
    let no_flag = mla(&["convert", mha.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(no_flag.status.code(), Some(2));
    assert!(stderr(&no_flag).contains("--to-mla"));

    // An existing converted step stays as it is unless --overwrite.
    ok(&convert(&mha, &out, &["--kv-lora-rank", "8"]));
    let before = sha256_file(&out.join("final/model.safetensors"));
    assert_bad(
        &convert(&mha, &out, &["--kv-lora-rank", "4"]),
        &["already holds a final step", "--overwrite"],
    );
    assert_eq!(sha256_file(&out.join("final/model.safetensors")), before);
    ok(&convert(
        &mha,
        &out,
        &["--kv-lora-rank", "4", "--overwrite"],
    ));
    assert_ne!(sha256_file(&out.join("final/model.safetensors")), before);
}
