//! The run config as users meet it: every file in config_hub/ parses and validates, `mla info`
//! prints the acceptance figures, and bad configs end in a one-line error naming the file
//! and the key, exit code 2, no panic.

use mla_trainer::config::{Override, RunConfig};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn mla(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mla"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("mla runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn info_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["info", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = mla(&all);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("one JSON object")
}

#[test]
fn every_config_hub_file_parses_and_validates() {
    let mut n = 0;
    let mut stack = vec![repo().join("config_hub")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("config_hub readable") {
            let path = entry.expect("entry").path();
            if path.is_dir() && path.ends_with("study") {
                // Study files: a base config and variants, each checked as `mla study` does
                // (from the repository root, which their paths are relative to).
                for f in std::fs::read_dir(&path).expect("config_hub/study readable") {
                    let f = f.expect("entry").path();
                    let (code, _, err) = mla(&["study", f.to_str().unwrap(), "--dry-run"]);
                    assert_eq!(code, 0, "{}: {err}", f.display());
                    // Variants trained here before show as finished (out/ is the user's).
                    let planned =
                        err.matches("would train").count() + err.matches("finished before").count();
                    assert!(planned >= 2, "{err}");
                    n += 1;
                }
            } else if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let cfg = RunConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
                assert!(cfg.model().n_layer > 0);
                n += 1;
            }
        }
    }
    assert!(n >= 5, "expected cfg, mha, gqa, mqa, debug; found {n}");
}

#[test]
fn info_reports_the_seed_run_and_its_mha_baseline() {
    let mla_cfg = info_json(&["--config", "config_hub/pretrain/cfg.yaml"]);
    assert_eq!(mla_cfg["parameters"], 160_221_696);
    assert_eq!(mla_cfg["kv_cache_bytes_per_token_bf16"], 13_056);
    assert!(mla_cfg["flops_per_token"].as_f64().expect("number") > 6.0 * 121_588_224.0);
    let mha = info_json(&["--config", "config_hub/pretrain/mha.yaml"]);
    assert_eq!(mha["parameters"], 162_322_944);
    assert_eq!(mha["kv_cache_bytes_per_token_bf16"], 36_864);
}

#[test]
fn info_counts_the_deepseek_mapping_as_litgpt() {
    let j = info_json(&[
        "--config",
        "config_hub/pretrain/cfg.yaml",
        "--model_config.latent_attention",
        "{q_lora_rank: 384, kv_lora_rank: 512, qk_rope_head_dim: 32, qk_nope_head_dim: 32, v_head_dim: 64}",
    ]);
    assert_eq!(j["parameters"], 160_264_704);
}

#[test]
fn dotted_overrides_reach_every_section() {
    let ov = |k: &str, v: &str| Override {
        key: k.into(),
        value: v.into(),
    };
    let cfg = RunConfig::load(
        &repo().join("config_hub/pretrain/cfg.yaml"),
        &[
            ov("train.max_steps", "20"),
            ov("model_config.n_layer", "2"),
            ov("data.data_path", "/tmp/ts"),
            ov("optimizer.lr", "0.01"),
            ov("out_dir", "s3://bucket/run"),
            ov("resume", "auto"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.train.max_steps, Some(20));
    assert_eq!(cfg.model().n_layer, 2);
    assert_eq!(
        cfg.data.expect("data").init_args.data_path.as_deref(),
        Some("/tmp/ts")
    );
    assert_eq!(cfg.optimizer.init_args.lr, 0.01);
    assert_eq!(cfg.out_dir, "s3://bucket/run");
    assert_eq!(cfg.resume, mla_trainer::config::Resume::Auto);
}

/// `--data.class_path` switching modules drops the arguments only the old one takes (as
/// jsonargparse does), keeps shared ones, and a file that mixes them is still refused.
#[test]
fn switching_the_data_module_by_override_drops_the_old_modules_arguments() {
    let ov = |k: &str, v: &str| Override {
        key: k.into(),
        value: v.into(),
    };
    let text_files = "model_name: pythia-14m\n\
                      data:\n  class_path: litgpt.data.TextFiles\n  init_args:\n    train_data_path: d/train\n    val_data_path: d/val\n    tinystories_sample: true\n    seed: 7\n";
    let cfg = RunConfig::from_yaml(
        text_files,
        "t.yaml",
        &[
            ov("data.class_path", "TinyStories"),
            ov("data.data_path", "/tmp/ts"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let data = cfg.data.expect("data");
    assert_eq!(
        data.module(),
        Some(mla_trainer::config::DataModule::TinyStories)
    );
    assert_eq!(data.init_args.data_path.as_deref(), Some("/tmp/ts"));
    assert_eq!(data.init_args.train_data_path, None);
    assert_eq!(data.init_args.tinystories_sample, None);
    assert_eq!(data.init_args.seed, Some(7), "shared arguments are kept");

    // Back the other way, and the override order does not matter for keys set after it.
    let tiny = "model_name: pythia-14m\ndata:\n  class_path: TinyStories\n  init_args:\n    data_path: /d\n";
    let cfg = RunConfig::from_yaml(
        tiny,
        "t.yaml",
        &[
            ov("data.class_path", "litgpt.data.TextFiles"),
            ov("data.train_data_path", "/x"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let data = cfg.data.expect("data");
    assert_eq!(data.init_args.data_path, None);
    assert_eq!(data.init_args.train_data_path.as_deref(), Some("/x"));

    // Without a switch, a mixed file is an error naming the key.
    let e = RunConfig::from_yaml(
        "model_name: pythia-14m\ndata:\n  class_path: TinyStories\n  init_args:\n    tinystories_sample: true\n",
        "t.yaml",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("data.init_args.tinystories_sample"), "{e}");
}

#[test]
fn litgpt_text_files_yaml_loads_unchanged() {
    let yaml = "model_name: pythia-14m\n\
                data:\n  class_path: litgpt.data.TextFiles\n  init_args:\n    train_data_path: data/train\n    val_data_path: data/val\n    seed: 1\n    num_workers: 2\n\
                train:\n  global_batch_size: 8\n  micro_batch_size: 2\n  lr_warmup_steps: 10\n\
                optimizer: AdamW\n";
    let cfg = RunConfig::from_yaml(yaml, "litgpt.yaml", &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.data.as_ref().expect("data").module(),
        Some(mla_trainer::config::DataModule::TextFiles)
    );
    assert_eq!(cfg.model().name, "pythia-14m");
    assert_eq!(cfg.grad_accum_steps(1), Ok(4));
    assert_eq!(cfg.grad_accum_steps(2), Ok(2));
    // A world size that cannot split the global batch names those that can (issue 15).
    assert_eq!(cfg.world_sizes(), [1, 2, 4]);
    let e = cfg.grad_accum_steps(3).unwrap_err();
    assert!(
        e.ends_with("world sizes that can with this micro_batch_size: 1, 2, 4"),
        "{e}"
    );
}

/// A bad config: exit 2, one line on stderr naming the file and the key, no panic.
fn assert_bad(yaml: &str, key: &str, words: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, yaml).expect("write");
    let (code, out, err) = mla(&["info", "--config", file.to_str().expect("utf8")]);
    assert_eq!(code, 2, "stdout {out} stderr {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("bad.yaml"), "names the file: {err}");
    assert!(err.contains(key), "names `{key}`: {err}");
    assert!(err.contains(words), "says `{words}`: {err}");
}

#[test]
fn unknown_key_is_an_error_naming_key_and_file() {
    assert_bad(
        "model_name: pythia-14m\nmodel_config:\n  n_layers: 2\n",
        "model_config.n_layers",
        "did you mean `n_layer`",
    );
    assert_bad(
        "model_name: pythia-14m\ntrian:\n  max_steps: 2\n",
        "trian",
        "unknown key",
    );
}

#[test]
fn wrong_type_is_an_error_naming_key_and_file() {
    assert_bad(
        "model_name: pythia-14m\ntrain:\n  max_steps: many\n",
        "train.max_steps",
        "invalid type",
    );
}

#[test]
fn n_embd_not_divisible_by_n_head_is_an_error() {
    assert_bad(
        "model_name: pythia-14m\nmodel_config:\n  n_embd: 130\n",
        "model_config.n_embd",
        "divisible by n_head",
    );
}

#[test]
fn odd_rope_dim_is_an_error() {
    assert_bad(
        "model_name: pythia-14m\nmodel_config:\n  n_embd: 128\n  n_head: 4\n  rotary_percentage: 0.3\n",
        "model_config.rotary_percentage",
        "even dimension",
    );
    assert_bad(
        "model_name: pythia-14m\nmodel_config:\n  latent_attention: {q_lora_rank: 8, kv_lora_rank: 8, qk_rope_head_dim: 5, qk_nope_head_dim: 4, v_head_dim: 8}\n",
        "model_config.latent_attention.qk_rope_head_dim",
        "even dimension",
    );
}

#[test]
fn n_head_not_divisible_by_n_query_groups_is_an_error() {
    assert_bad(
        "model_name: pythia-14m\nmodel_config:\n  n_query_groups: 3\n",
        "model_config.n_query_groups",
        "divisible by n_query_groups",
    );
}

#[test]
fn global_batch_not_divisible_by_micro_batch_is_an_error() {
    assert_bad(
        "model_name: pythia-14m\ntrain:\n  global_batch_size: 10\n  micro_batch_size: 4\n",
        "train.global_batch_size",
        "micro_batch_size",
    );
}

#[test]
fn missing_config_file_and_unknown_override_section_exit_2() {
    let (code, _, err) = mla(&["info", "--config", "does/not/exist.yaml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("does/not/exist.yaml") && err.contains("cannot read"),
        "{err}"
    );
    let (code, _, err) = mla(&[
        "info",
        "--config",
        "config_hub/pretrain/cfg.yaml",
        "--trains.max_steps",
        "3",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--trains.max_steps"), "{err}");
}

/// litgpt ignores `model_name` when `model_config` is set (issue 9): litgpt's own configs name
/// models the registry does not list (`stories15M` in its tinystories.yaml), which mla builds
/// from the model_config with litgpt's defaults instead of refusing the name. A registry name
/// with a partial model_config builds what litgpt builds (its Config defaults, not the named
/// model, fill the gaps), and a warning names each field that differs from the named model.
#[test]
fn model_config_with_an_unknown_name_builds_and_a_known_name_that_differs_is_said() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stories = dir.path().join("tinystories.yaml");
    std::fs::write(
        &stories,
        "model_name: stories15M\nmodel_config:\n  name: stories15M\n  block_size: 256\n  \
         vocab_size: 32000\n  n_layer: 6\n  n_head: 6\n  n_embd: 288\n  rotary_percentage: 1.0\n  \
         parallel_residual: false\n  bias: false\n  norm_class_name: RMSNorm\n  \
         mlp_class_name: LLaMAMLP\n  intermediate_size: 768\n",
    )
    .expect("write");
    let (code, out, err) = mla(&["info", "--config", stories.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("stories15M — 6 layers, 288 wide, 6 heads"),
        "{out}"
    );
    assert!(!err.contains("WARN"), "{err}");

    let partial = dir.path().join("partial.yaml");
    std::fs::write(
        &partial,
        "model_name: pythia-160m\nmodel_config:\n  n_layer: 2\n",
    )
    .expect("write");
    let (code, out, err) = mla(&["info", "--config", partial.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("2 layers, 4096 wide, 32 heads"),
        "litgpt's reading: {out}"
    );
    assert!(
        err.contains("model_config replaces model_name pythia-160m, as in litgpt")
            && err.contains("n_embd 4096 (pythia-160m: 768)")
            && !err.contains("n_layer"),
        "{err}"
    );
}
