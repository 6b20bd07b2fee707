//! Models that travel to litgpt (issue 9), end to end through the `mla` binary and litgpt
//! 0.5.13 in .venv: tiny MHA and mapping-form MLA runs exported with `mla export --to litgpt`
//! load in litgpt (its own Config, a strict state dict from `torch.load`, its own tokenizer)
//! and give mla's logits and loss, and `litgpt generate` writes mla's greedy text; the seed's
//! `latent_attention: true` is refused naming the mapping form to train instead; an existing
//! directory is replaced only with `--overwrite`; every `config_hub/pretrain` model but the
//! seed's MLA, and a checkpoint's config.yaml, is a litgpt `Config`.
//!
//! Needs .venv with litgpt==0.5.13 (scripts/setup.sh installs it).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn venv(tool: &str) -> PathBuf {
    let p = repo().join(".venv/bin").join(tool);
    assert!(p.exists(), "{} missing: run scripts/setup.sh", p.display());
    p
}

/// The MLA of litgpt's mapping form, at the tiny run's size (2 heads of 8).
const MAPPING: &str = "{q_lora_rank: 8, kv_lora_rank: 8, qk_rope_head_dim: 4, \
                       qk_nope_head_dim: 4, v_head_dim: 8}";

/// The final step of a finished tiny run (6 steps of the `common` configuration) with this
/// `latent_attention`, trained once per test process.
fn checkpoint(latent_attention: &'static str) -> PathBuf {
    static DIRS: OnceLock<std::sync::Mutex<Vec<(&'static str, PathBuf)>>> = OnceLock::new();
    let dirs = DIRS.get_or_init(Default::default);
    let mut dirs = dirs.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, d)) = dirs.iter().find(|(k, _)| *k == latent_attention) {
        return d.clone();
    }
    let dir = tempfile::tempdir().unwrap().keep();
    let out = dir.join("run");
    ok(&train(
        &dir,
        out.to_str().unwrap(),
        &["--model_config.latent_attention", latent_attention],
        &[],
    ));
    dirs.push((latent_attention, out.join("final")));
    out.join("final")
}

fn mha_checkpoint() -> PathBuf {
    checkpoint("null")
}

fn export(ckpt: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "export",
        ckpt.to_str().unwrap(),
        "--to",
        "litgpt",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    mla(&args)
}

/// Exported, then read by litgpt: mla's logits and loss for MHA and for mapping-form MLA.
#[test]
fn exported_mha_and_mapping_mla_give_mlas_logits_and_loss_in_litgpt() {
    for latent_attention in ["null", MAPPING] {
        let ckpt = checkpoint(latent_attention);
        let dir = tempfile::tempdir().unwrap();
        let exp = dir.path().join("lit");
        ok(&export(&ckpt, &exp, &[]));
        let tokens = "7454,2069,247,673,13,50276,0,3";
        let logits = ok(&mla(&[
            "ckpt",
            "logits",
            ckpt.to_str().unwrap(),
            "--tokens",
            tokens,
        ]));
        let theirs = dir.path().join("mla_logits.json");
        std::fs::write(&theirs, &logits).unwrap();
        let out = Command::new(venv("python"))
            .arg(repo().join("scripts/ref/check_litgpt_export.py"))
            .arg(&exp)
            // The same fp32 forward by another implementation (litgpt's): as for the plain
            // reference in ckpt_local.rs, ≈ 6,500 chained operations per logit add up to about
            // 2e-5 of the values carried: 1e-4.
            .args(["--tokens", tokens, "--tol", "1e-4", "--compare"])
            .arg(&theirs)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout).to_string();
        println!(
            "latent_attention {latent_attention}:\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "litgpt differs: {report}");
        assert!(report.contains("over 402432 logits"), "8 × 50304: {report}");
        // The loss is a log-sum-exp minus one logit: off by at most twice the logits' bound.
        let line = report.lines().find(|l| l.starts_with("loss mla")).unwrap();
        let v: Vec<f64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert!((v[0] - v[1]).abs() <= 2e-4, "{line}");
    }
}

#[test]
fn litgpt_generate_on_an_export_writes_mlas_greedy_text() {
    let ckpt = &mha_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("lit");
    ok(&export(ckpt, &exp, &[]));
    let prompt = "Once upon a time,";
    let ours = ok(&mla(&[
        "generate",
        ckpt.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--device",
        "cpu",
        "--precision",
        "32-true",
    ]));
    // Greedy in litgpt: temperature 0 and top_p 0 (top_p 1 would still sample).
    let out = Command::new(venv("litgpt"))
        .arg("generate")
        .arg(&exp)
        .args(["--prompt", prompt, "--max_new_tokens", "12"])
        .args([
            "--temperature",
            "0",
            "--top_p",
            "0",
            "--precision",
            "32-true",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let theirs = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "litgpt generate failed:\n{theirs}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ours.trim().len() > prompt.len(), "{ours:?}");
    // litgpt prints its arguments first, then the text.
    assert!(
        theirs.trim_end().ends_with(ours.trim_end()),
        "mla:    {ours:?}\nlitgpt: {theirs:?}"
    );
}

#[test]
fn the_seeds_mla_is_refused_naming_the_mapping_form_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seed");
    ok(&train(
        dir.path(),
        out.to_str().unwrap(),
        &["--train.max_steps", "2"],
        &[],
    ));
    let exp = dir.path().join("lit");
    let err = assert_bad(
        &export(&out.join("final"), &exp, &[]),
        &["latent_attention: true", "litgpt", "kv_lora_rank"],
    );
    assert!(!exp.exists(), "{err}");
}

#[test]
fn an_existing_directory_is_replaced_only_with_overwrite() {
    let ckpt = &mha_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("lit");
    ok(&export(ckpt, &exp, &[]));
    let pth = exp.join("lit_model.pth");
    let before = sha256_file(&pth);
    std::fs::write(exp.join("mine.txt"), "kept until --overwrite").unwrap();
    assert_bad(&export(ckpt, &exp, &[]), &["lit", "--overwrite"]);
    assert!(exp.join("mine.txt").exists());
    ok(&export(ckpt, &exp, &["--overwrite"]));
    assert!(!exp.join("mine.txt").exists());
    assert_eq!(sha256_file(&pth), before, "the same export twice");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["lit"], "no staging or replaced directory left");
}

/// litgpt's `Config(**model_config)` for every config_hub/pretrain model whose attention litgpt
/// has (all but the seed's `latent_attention: true`) and for a checkpoint's config.yaml. Before
/// issue 9, mha/gqa/mqa.yaml and every ordinary-attention checkpoint failed on
/// `latent_attention: false`.
#[test]
fn config_hub_models_and_checkpoint_configs_are_litgpt_configs() {
    let script = r#"
import sys, yaml
from litgpt import Config
checked, seed = [], []
for path in sys.argv[1:]:
    with open(path) as f:
        mc = yaml.safe_load(f)["model_config"]
    if mc.get("latent_attention") is True:
        seed.append(path)
        continue
    Config(**mc)
    checked.append(path)
print(f"litgpt Config: {len(checked)} ok, {len(seed)} seed MLA skipped")
"#;
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("config_hub/pretrain"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let n = files.len();
    files.push(mha_checkpoint().join("config.yaml"));
    let out = Command::new(venv("python"))
        .args(["-c", script])
        .args(&files)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    let ok_count: usize = report
        .split_whitespace()
        .nth(2)
        .and_then(|w| w.parse().ok())
        .unwrap();
    assert!(
        ok_count >= 4,
        "mha, gqa, mqa and the checkpoint at least: {report} ({n} files)"
    );
}
