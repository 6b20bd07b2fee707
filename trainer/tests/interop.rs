//! Models that travel (issue 9), end to end through the `mla` binary, litgpt 0.5.13 and
//! transformers 4.57 in .venv.
//!
//! Out: tiny MHA and mapping-form MLA runs exported with `mla export --to litgpt` load in litgpt
//! (its own Config, a strict state dict from `torch.load`, its own tokenizer) and give mla's
//! logits and loss, and `litgpt generate` and `litgpt chat` write mla's greedy text (a tied
//! run's too: both keys); runs exported with `--to hf`
//! load in transformers with mla's logits and loss (MHA, GQA and MQA of pythia's block as
//! GPTNeoX, the LLaMA block as Llama, its MLA as DeepSeek-V2); the seed's
//! `latent_attention: true` is refused naming what to do instead; an existing directory
//! is replaced only with `--overwrite`; every `config_hub/pretrain` model but the seed's MLA,
//! and a checkpoint's config.yaml, is a litgpt `Config`.
//!
//! In: directories litgpt and transformers wrote themselves (a state dict and a training
//! checkpoint; one safetensors file, shards, pytorch_model.bin, a tied Llama) give their logits
//! in mla; `initial_checkpoint_dir` takes mla's step and its litgpt and HF exports with the same
//! losses, and refuses a model that computes differently, naming the field; `mla download`
//! fetches such directories from HF_ENDPOINT (a local server) and refuses one it cannot build
//! before fetching any weight.
//!
//! Needs .venv with litgpt and transformers (scripts/setup.sh installs them).

mod common;

use common::http::{Reply, Server};
use common::*;
use std::collections::HashMap;
use std::ffi::OsStr;
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

/// The final step of a finished tiny run (6 steps of the `common` configuration) with these
/// overrides, trained once per test process.
fn checkpoint(overrides: &'static [&'static str]) -> PathBuf {
    type Runs = std::sync::Mutex<Vec<(&'static [&'static str], PathBuf)>>;
    static RUNS: OnceLock<Runs> = OnceLock::new();
    let runs = RUNS.get_or_init(Default::default);
    let mut runs = runs.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, d)) = runs.iter().find(|(k, _)| *k == overrides) {
        return d.clone();
    }
    let dir = tempfile::tempdir().unwrap().keep();
    let out = dir.join("run");
    ok(&train(&dir, out.to_str().unwrap(), overrides, &[]));
    runs.push((overrides, out.join("final")));
    out.join("final")
}

/// The `common` run as it is: the seed's MLA (`latent_attention: true`).
const SEED: &[&str] = &[];
const MHA: &[&str] = &["--model_config.latent_attention", "null"];
const GQA: &[&str] = &[
    "--model_config.latent_attention",
    "null",
    "--model_config.n_head",
    "4",
    "--model_config.n_query_groups",
    "2",
];
const MQA: &[&str] = &[
    "--model_config.latent_attention",
    "null",
    "--model_config.n_query_groups",
    "1",
];
const MLA_MAPPING: &[&str] = &["--model_config.latent_attention", MAPPING];
/// The seed's `latent_attention: true` where it computes its mapping: RMS-normed latents
/// (`norm_qk` with RMSNorm), no bias.
const SEED_EXACT: &[&str] = &[
    "--model_config.norm_qk",
    "true",
    "--model_config.norm_class_name",
    "RMSNorm",
    "--model_config.bias",
    "false",
];
/// litgpt's LLaMA block (TinyLlama's: RMSNorm, SwiGLU, sequential residual, no bias) at the
/// tiny run's width, norm_eps 1e-6 as DeepSeek-V2's latent norms have it.
const LLAMA_BLOCK: &[&str] = &[
    "--model_config.norm_class_name",
    "RMSNorm",
    "--model_config.norm_eps",
    "1e-6",
    "--model_config.mlp_class_name",
    "LLaMAMLP",
    "--model_config.intermediate_size",
    "40",
    "--model_config.parallel_residual",
    "false",
    "--model_config.bias",
    "false",
];

/// [`LLAMA_BLOCK`] with `latent_attention` (a mapping: what DeepSeek-V2 holds; or null) and
/// `extra` overrides, as a [`checkpoint`] key.
fn llama_block(latent: &'static str, extra: &[&'static str]) -> &'static [&'static str] {
    let mut args = vec!["--model_config.latent_attention", latent];
    args.extend(LLAMA_BLOCK);
    args.extend(extra);
    Box::leak(args.into_boxed_slice())
}

/// The LLaMA block's ordinary attention as TinyLlama has it: full rotary, GQA.
fn llama() -> &'static [&'static str] {
    llama_block(
        "null",
        &[
            "--model_config.rotary_percentage",
            "1.0",
            "--model_config.n_head",
            "4",
            "--model_config.n_query_groups",
            "2",
        ],
    )
}

fn mha_checkpoint() -> PathBuf {
    checkpoint(MHA)
}

/// Run `python` with `args`; its stdout, asserting that it exited 0.
fn python(args: &[&OsStr]) -> String {
    let out = Command::new(venv("python")).args(args).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "python {args:?}:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

/// mla's logits of `ckpt` on [`TOKENS`] against `script`'s (a scripts/ref checker reading
/// `model` with litgpt or transformers): within `tol`, and the losses within 2·`tol` (a loss
/// is a log-sum-exp minus one logit). Returns the checker's report.
fn check(script: &str, ckpt: &Path, model: &Path, tol: f64, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("mla_logits.json");
    let logits = ok(&mla(&[
        "ckpt",
        "logits",
        ckpt.to_str().unwrap(),
        "--tokens",
        TOKENS,
    ]));
    std::fs::write(&theirs, &logits).unwrap();
    let script = repo().join("scripts/ref").join(script);
    let tol_arg = tol.to_string();
    let mut args: Vec<&OsStr> = vec![script.as_os_str(), model.as_os_str()];
    args.extend(["--tokens", TOKENS, "--tol", &tol_arg, "--compare"].map(OsStr::new));
    args.push(theirs.as_os_str());
    args.extend(extra.iter().map(OsStr::new));
    let report = python(&args);
    println!("{}:\n{report}", model.display());
    assert!(report.contains("over 402432 logits"), "8 × 50304: {report}");
    let line = report.lines().find(|l| l.starts_with("loss mla")).unwrap();
    let v: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!((v[0] - v[1]).abs() <= 2.0 * tol, "{report}");
    report
}

/// `litgpt generate`'s greedy continuation of `prompt` from `dir` (temperature 0 and top_p 0:
/// top_p 1 would still sample) ends with mla's text `ours` (litgpt prints its arguments
/// first, then the text).
fn assert_litgpt_writes(dir: &Path, prompt: &str, ours: &str) {
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(venv("litgpt"))
        .arg("generate")
        .arg(dir)
        .args(["--prompt", prompt, "--max_new_tokens", "12"])
        .args([
            "--temperature",
            "0",
            "--top_p",
            "0",
            "--precision",
            "32-true",
        ])
        .current_dir(cwd.path())
        .output()
        .unwrap();
    let theirs = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "litgpt generate failed:\n{theirs}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ours.trim().len() > prompt.len(), "{ours:?}");
    assert!(
        theirs.trim_end().ends_with(ours.trim_end()),
        "mla:    {ours:?}\nlitgpt: {theirs:?}"
    );
}

const TOKENS: &str = "7454,2069,247,673,13,50276,0,3";

fn export(ckpt: &Path, out: &Path, to: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "export",
        ckpt.to_str().unwrap(),
        "--to",
        to,
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    mla(&args)
}

/// Exported, then read by litgpt: mla's logits and loss for MHA, for mapping-form MLA, and for
/// the seed's MLA where it computes its mapping (written as that mapping).
#[test]
fn exported_mha_and_mapping_mla_give_mlas_logits_and_loss_in_litgpt() {
    for overrides in [MHA, MLA_MAPPING, SEED_EXACT] {
        let ckpt = checkpoint(overrides);
        let dir = tempfile::tempdir().unwrap();
        let exp = dir.path().join("lit");
        ok(&export(&ckpt, &exp, "litgpt", &[]));
        println!("{overrides:?}");
        // The same fp32 forward by another implementation (litgpt's): as for the plain
        // reference in ckpt_local.rs, ≈ 6,500 chained operations per logit add up to about
        // 2e-5 of the values carried: 1e-4.
        check("check_litgpt_export.py", &ckpt, &exp, 1e-4, &[]);
    }
}

/// Exported, then read by `transformers`: mla's logits within 1e-5 and its loss, for MHA, GQA
/// and MQA of pythia's block as GPTNeoX (GQA and MQA go out as the MHA they compute), for a
/// GQA of the LLaMA block as Llama, and for MLA of the LLaMA block as DeepSeek-V2 (with and
/// without q compression). The Llama and DeepSeek-V2 directories, read back by mla, give
/// `transformers`' logits too.
#[test]
fn exported_models_give_mlas_logits_and_loss_in_transformers() {
    for (overrides, form) in [
        (MHA, "GPTNeoXForCausalLM"),
        (GQA, "GPTNeoXForCausalLM"),
        (MQA, "GPTNeoXForCausalLM"),
        (llama(), "LlamaForCausalLM"),
        (llama_block(MAPPING, &[]), "DeepseekV2ForCausalLM"),
        // DeepSeek-V2-Lite's plain q_proj.
        (
            llama_block(
                "{q_lora_rank: null, kv_lora_rank: 8, qk_rope_head_dim: 4, \
                 qk_nope_head_dim: 4, v_head_dim: 8}",
                &[],
            ),
            "DeepseekV2ForCausalLM",
        ),
    ] {
        let ckpt = checkpoint(overrides);
        let dir = tempfile::tempdir().unwrap();
        let exp = dir.path().join("hf");
        let out = export(&ckpt, &exp, "hf", &[]);
        ok(&out);
        println!("{overrides:?}");
        // Another op order (GPTNeoX's fused per-head qkv, Llama's split q/k/v, DeepSeek-V2's
        // paired rope dims; their rotary tables, eager softmax) over 2 layers of 16-wide dot
        // products and 40- to 64-wide MLPs: a few hundred roundings of values O(1) per logit,
        // √n·u ≈ 1e-6 of them; 1e-5 as the issue asks.
        let report = check("check_hf_export.py", &ckpt, &exp, 1e-5, &[]);
        assert!(report.contains(&format!("architecture {form}")), "{report}");
        assert!(!stderr(&out).contains("WARN"), "{}", stderr(&out));
        if !form.starts_with("GPTNeoX") {
            check("check_hf_export.py", &exp, &exp, 1e-5, &[]);
        }
    }
}

/// An MLA with norm_eps other than DeepSeek-V2's fixed 1e-6 in its latent norms goes out with a
/// warning that says so; the seed's MLA and an MLA with biases are refused naming the field.
#[test]
fn deepseek_v2_export_says_what_it_cannot_hold_exactly() {
    let eps = llama_block(MAPPING, &["--model_config.norm_eps", "1e-5"]);
    let dir = tempfile::tempdir().unwrap();
    let out = export(&checkpoint(eps), &dir.path().join("eps"), "hf", &[]);
    ok(&out);
    assert!(
        stderr(&out).contains("latent norms use eps 1e-6") && stderr(&out).contains("1e-5"),
        "{}",
        stderr(&out)
    );
    let exp = dir.path().join("biased");
    let err = assert_bad(
        &export(&checkpoint(MLA_MAPPING), &exp, "hf", &[]),
        &["model_config.bias", "DeepSeek-V2"],
    );
    assert!(!exp.exists(), "{err}");
}

/// `litgpt generate` and `litgpt chat` (its prompt on stdin) on an export write mla's greedy
/// text.
#[test]
fn litgpt_generate_and_chat_on_an_export_write_mlas_greedy_text() {
    let ckpt = &mha_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("lit");
    ok(&export(ckpt, &exp, "litgpt", &[]));
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
    assert_litgpt_writes(&exp, prompt, &ours);

    let cwd = tempfile::tempdir().unwrap();
    let mut chat = Command::new(venv("litgpt"))
        .arg("chat")
        .arg(&exp)
        .args([
            "--max_new_tokens",
            "12",
            "--temperature",
            "0",
            "--top_p",
            "0",
        ])
        .current_dir(cwd.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = chat.stdin.take().unwrap();
        writeln!(stdin, "{prompt}").unwrap();
        writeln!(stdin).unwrap(); // an empty prompt ends the chat
    }
    let out = chat.wait_with_output().unwrap();
    let theirs = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "litgpt chat failed:\n{theirs}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let continuation = ours.trim_end().strip_prefix(prompt).unwrap();
    assert!(
        theirs.contains(&format!(">> Reply: {continuation}")),
        "mla:    {ours:?}\nlitgpt chat: {theirs:?}"
    );
}

/// litgpt cannot build the seed's MLA and GPTNeoX has no MLA: one line each, nothing written.
#[test]
fn the_seeds_mla_is_refused_naming_what_to_do_and_nothing_is_written() {
    let seed = checkpoint(SEED);
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("exported");
    for (to, culprits) in [
        (
            "litgpt",
            &["latent_attention: true", "litgpt", "kv_lora_rank"][..],
        ),
        ("hf", &["latent_attention", "DeepSeek-V2"][..]),
    ] {
        let err = assert_bad(&export(&seed, &exp, to, &[]), culprits);
        assert!(!exp.exists(), "{err}");
    }
}

#[test]
fn an_existing_directory_is_replaced_only_with_overwrite() {
    let ckpt = &mha_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("lit");
    ok(&export(ckpt, &exp, "litgpt", &[]));
    let pth = exp.join("lit_model.pth");
    let before = sha256_file(&pth);
    std::fs::write(exp.join("mine.txt"), "kept until --overwrite").unwrap();
    assert_bad(&export(ckpt, &exp, "litgpt", &[]), &["lit", "--overwrite"]);
    assert!(exp.join("mine.txt").exists());
    ok(&export(ckpt, &exp, "litgpt", &["--overwrite"]));
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
    let mut args: Vec<&OsStr> = vec![OsStr::new("-c"), OsStr::new(script)];
    args.extend(files.iter().map(|f| f.as_os_str()));
    let report = python(&args);
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

/// Tiny random models as litgpt and transformers save them (scripts/ref/make_foreign_models.py):
/// lit, lit_fabric, hf, hf_sharded, hf_bin, made once per test process.
fn foreign_models() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep().join("foreign");
        let script = repo().join("scripts/ref/make_foreign_models.py");
        let tokenizer = tokenizer_dir();
        python(&[
            script.as_os_str(),
            dir.as_os_str(),
            OsStr::new("--tokenizer-dir"),
            tokenizer.as_os_str(),
        ]);
        dir
    })
}

/// litgpt's own checkpoints (a state dict, and a training checkpoint's {"model": …}) and
/// transformers' own GPTNeoX (one safetensors file, shards, pytorch_model.bin) and Llama (GQA,
/// tied embeddings) enter mla with their logits and loss; `mla generate` reads them as it reads
/// a step.
#[test]
fn litgpt_and_hugging_face_directories_give_their_own_logits_in_mla() {
    let root = foreign_models();
    for (name, script, tol) in [
        ("lit", "check_litgpt_export.py", 1e-4),
        ("lit_fabric", "check_litgpt_export.py", 1e-4),
        ("hf", "check_hf_export.py", 1e-5),
        ("hf_sharded", "check_hf_export.py", 1e-5),
        ("hf_bin", "check_hf_export.py", 1e-5),
        ("hf_llama", "check_hf_export.py", 1e-5),
    ] {
        let model = root.join(name);
        // litgpt wrote these itself: no bos/eos convention of mla's export to check.
        let extra: &[&str] = if name.starts_with("lit") {
            &["--no-tokenizer-check"]
        } else {
            &[]
        };
        check(script, &model, &model, tol, extra);
    }
    let gen = mla(&[
        "generate",
        root.join("hf_sharded").to_str().unwrap(),
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]);
    ok(&gen);
    assert!(
        stderr(&gen).contains("(Hugging Face model)"),
        "{}",
        stderr(&gen)
    );
}

/// `initial_checkpoint_dir` takes mla's step, its litgpt export and its Hugging Face export
/// alike: the same losses step for step. A directory of a model that computes differently is
/// refused naming the field, before anything is saved.
#[test]
fn initial_checkpoint_dir_takes_litgpt_and_hugging_face_directories() {
    let ckpt = mha_checkpoint();
    let dir = tempfile::tempdir().unwrap();
    let (lit, hf) = (dir.path().join("lit"), dir.path().join("hf"));
    ok(&export(&ckpt, &lit, "litgpt", &[]));
    ok(&export(&ckpt, &hf, "hf", &[]));
    let run = |name: &str, init: &Path, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = MHA.to_vec();
        args.extend(["--initial_checkpoint_dir", init.to_str().unwrap()]);
        args.extend(["--train.max_steps", "3"]);
        args.extend(extra);
        (train(dir.path(), out.to_str().unwrap(), &args, &[]), out)
    };
    let mut seen = Vec::new();
    for (name, init) in [("from-mla", &ckpt), ("from-lit", &lit), ("from-hf", &hf)] {
        let (r, out) = run(name, init, &[]);
        ok(&r);
        assert!(
            stderr(&r).contains("initial weights from"),
            "{}",
            stderr(&r)
        );
        seen.push(losses(&out.join("metrics.jsonl")));
    }
    assert_eq!(seen[0].len(), 3);
    assert_eq!(seen[0], seen[1], "litgpt export");
    assert_eq!(seen[0], seen[2], "Hugging Face export");

    let (r, out) = run("other", &hf, &["--model_config.rotary_percentage", "1.0"]);
    assert_bad(
        &r,
        &[
            "initial_checkpoint_dir",
            "Hugging Face model",
            "rotary_percentage",
        ],
    );
    assert!(!out.join("final").exists());
}

/// litgpt's own checkpoint of a pythia-style model (pythia's tokenizer_config: bos = eos =
/// <|endoftext|>, no add_bos_token): `mla generate` frames the prompt as litgpt does (no bos,
/// stop at the eos) and writes `litgpt generate`'s greedy text, with litgpt's flag spellings;
/// `--precision bf16-mixed` is accepted.
#[test]
fn mla_generate_on_a_litgpt_directory_writes_litgpts_text() {
    let lit = foreign_models().join("lit");
    let prompt = "Once upon a time,";
    let ours = ok(&mla(&[
        "generate",
        lit.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max_new_tokens",
        "12",
        "--top_k",
        "50",
        "--num_samples",
        "1",
        "--temperature",
        "0",
        "--device",
        "cpu",
        "--precision",
        "32-true",
    ]));
    assert_litgpt_writes(&lit, prompt, &ours);
    ok(&mla(&[
        "generate",
        lit.to_str().unwrap(),
        "--max_new_tokens",
        "2",
        "--device",
        "cpu",
        "--precision",
        "bf16-mixed",
    ]));
}

/// Every entry of mla's model registry is litgpt 0.5.13's `Config.from_name` of the same name,
/// field for field (pythia with the -deduped twins, tiny-llama, micro-llama).
#[test]
fn the_model_registry_is_litgpts() {
    let ours: Vec<serde_json::Value> = mla_model::registry::all()
        .into_iter()
        .map(|c| serde_json::to_value(c.resolve().unwrap()).unwrap())
        .collect();
    let script = r#"
import dataclasses, json, sys
from litgpt import Config
bad = []
ours = json.load(open(sys.argv[1]))
for c in ours:
    theirs = dataclasses.asdict(Config.from_name(c["name"]))
    for k, v in c.items():
        if theirs.get(k) != v:
            bad.append(f'{c["name"]}.{k}: mla {v!r}, litgpt {theirs.get(k)!r}')
print(f"{len(ours)} registry entries compared")
print("\n".join(bad))
sys.exit(1 if bad else 0)
"#;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("registry.json");
    std::fs::write(&json, serde_json::to_string(&ours).unwrap()).unwrap();
    let report = python(&[OsStr::new("-c"), OsStr::new(script), json.as_os_str()]);
    assert!(report.starts_with(&format!("{} registry entries compared", ours.len())));
}

/// `mla download OWNER/NAME` from HF_ENDPOINT (a local server holding transformers' own
/// directories): sharded safetensors, a pytorch_model.bin and a tied Llama arrive whole, in
/// litgpt's `<checkpoint_dir>/<owner>/<name>`, and give transformers' logits in mla. A second
/// download fetches nothing; a model mla cannot build is refused from its config.json before
/// any weight is fetched, and nothing is left.
#[test]
fn mla_download_fetches_hub_models_that_mla_reads() {
    let root = foreign_models();
    let repos = [
        ("tiny/sharded", "hf_sharded"),
        ("tiny/bin", "hf_bin"),
        ("tiny/llama", "hf_llama"),
    ];
    let mut routes = HashMap::new();
    for (repo, dir) in repos {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            routes.insert(
                format!("/{repo}/resolve/main/{name}"),
                Reply::Ok(std::fs::read(&path).unwrap()),
            );
        }
    }
    let mistral = "/tiny/mistral/resolve/main/";
    routes.insert(
        format!("{mistral}config.json"),
        Reply::Ok(br#"{"model_type": "mistral", "sliding_window": 8}"#.to_vec()),
    );
    routes.insert(format!("{mistral}model.safetensors"), Reply::Ok(vec![0; 8]));
    let server = Server::start(routes);
    let dest = tempfile::tempdir().unwrap();
    let download = |repo: &str| {
        mla_in(
            dest.path(),
            &["download", repo, "--checkpoint_dir", "checkpoints"],
            &[("HF_ENDPOINT", server.addr.as_str())],
        )
    };
    // Every download first: the server stops after 60 s, and the checks below take longer.
    for (repo, _) in repos {
        let out = download(repo);
        assert_eq!(ok(&out).trim(), format!("checkpoints/{repo}"));
        assert!(stderr(&out).contains("downloaded"), "{}", stderr(&out));
    }
    let shard = "/tiny/sharded/resolve/main/model-00001-of-00003.safetensors";
    assert_eq!(
        server.hits(shard),
        1,
        "the shards are named as transformers names them"
    );
    let again = download("tiny/sharded");
    ok(&again);
    assert!(
        stderr(&again).contains(": 0 files, 0 B, "),
        "{}",
        stderr(&again)
    );
    assert_eq!(server.hits(shard), 1, "nothing fetched twice");
    let refused = download("tiny/mistral");
    assert_bad(
        &refused,
        &[
            "tiny/mistral",
            "model_type \"mistral\"",
            "nothing was downloaded",
        ],
    );
    assert_eq!(server.hits(&format!("{mistral}model.safetensors")), 0);
    assert!(!dest.path().join("checkpoints/tiny/mistral").exists());
    drop(server);

    for (repo, dir) in repos {
        let got = dest.path().join("checkpoints").join(repo);
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap();
            assert_eq!(
                std::fs::read(got.join(name)).unwrap(),
                std::fs::read(&path).unwrap(),
                "{repo}: {name:?}"
            );
        }
        check("check_hf_export.py", &got, &root.join(dir), 1e-5, &[]);
    }
}

/// litgpt's `train.tie_embeddings: true`: one matrix for the embedding and the LM head. The run
/// trains; its step holds the matrix once (no `lm_head.weight`) and verifies; its litgpt export
/// (both keys, as litgpt's own state dict of a tied model) gives mla's logits in litgpt; an
/// untied step is refused as its initial weights, naming the key.
#[test]
fn tied_embeddings_train_verify_and_travel() {
    const TIED: &[&str] = &[
        "--model_config.latent_attention",
        "null",
        "--train.tie_embeddings",
        "true",
    ];
    let ckpt = checkpoint(TIED);
    let bytes = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&bytes[8..8 + n]);
    assert!(header.contains("transformer.wte.weight"), "{header}");
    assert!(!header.contains("lm_head.weight"), "one matrix: {header}");
    ok(&mla(&["ckpt", "verify", ckpt.to_str().unwrap()]));

    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("lit");
    ok(&export(&ckpt, &exp, "litgpt", &[]));
    check("check_litgpt_export.py", &ckpt, &exp, 1e-4, &[]);

    let mut args = TIED.to_vec();
    let untied = mha_checkpoint();
    args.extend(["--initial_checkpoint_dir", untied.to_str().unwrap()]);
    let out = dir.path().join("from-untied");
    let r = train(dir.path(), out.to_str().unwrap(), &args, &[]);
    assert_bad(
        &r,
        &["initial_checkpoint_dir", "untied", "train.tie_embeddings"],
    );
    assert!(!out.join("final").exists());
}
