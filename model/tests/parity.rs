//! Parity against the real peers: goldens from litgpt 0.5.13 (MHA, GQA, MQA, MLA mapping) and
//! from the plain-PyTorch reference (the seed's `latent_attention: true`), made by
//! scripts/ref/gen_goldens.py. Same weights (loaded by litgpt key, no rename table) → same
//! fp32 logits and loss within 1e-5, same gradients within 1e-4. On the device of
//! `MLA_TEST_DEVICE` (cpu by default; cuda in scripts/gpu_check.sh, where the goldens are found
//! through `MLA_MODEL_GOLDENS` because the binary runs away from this source tree).

mod common;

use common::{max_abs_diff, test_device};
use mla_model::{Gpt, ModelConfig};
use std::collections::HashMap;
use std::path::PathBuf;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

fn golden_dir() -> PathBuf {
    std::env::var_os("MLA_MODEL_GOLDENS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/goldens"),
        PathBuf::from,
    )
}

fn check(name: &str) {
    let dir = golden_dir();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{name}.json"))).expect("golden json"),
    )
    .expect("valid json");
    let cfg: ModelConfig =
        serde_json::from_value(json["model_config"].clone()).expect("config parses");
    let golden: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join(format!("{name}.safetensors")))
            .expect("golden safetensors")
            .into_iter()
            .collect();

    let device = test_device();
    let vs = VarStore::new(device);
    let gpt = Gpt::new(&vs.root(), &cfg).expect("valid config");
    let vars = vs.variables();
    let golden_keys: Vec<&str> = golden.keys().filter_map(|k| k.strip_prefix("w.")).collect();
    let mut ours: Vec<&str> = vars.keys().map(String::as_str).collect();
    let mut theirs = golden_keys.clone();
    ours.sort();
    theirs.sort();
    assert_eq!(
        ours, theirs,
        "{name}: parameter names differ from the peer's state dict"
    );
    tch::no_grad(|| {
        for (key, var) in &vars {
            let mut var = var.shallow_clone();
            var.copy_(&golden[&format!("w.{key}")]);
        }
    });

    let logits = gpt.forward(&golden["idx"].to(device));
    let v = logits.size()[2];
    let loss = logits
        .view([-1, v])
        .cross_entropy_for_logits(&golden["targets"].view([-1]).to(device));
    let d_logits = max_abs_diff(&logits, &golden["logits"]);
    let d_loss = (loss.double_value(&[]) - golden["loss"].double_value(&[0])).abs();
    loss.backward();
    let mut d_grad: f64 = 0.0;
    let mut worst = String::new();
    for (key, var) in &vars {
        let d = max_abs_diff(&var.grad(), &golden[&format!("g.{key}")]);
        if d > d_grad {
            d_grad = d;
            worst = key.clone();
        }
    }
    println!(
        "{name} on {device:?}: max |Δ| logits {d_logits:.2e}, loss {d_loss:.2e}, grads {d_grad:.2e} ({worst})"
    );
    assert_eq!(logits.kind(), Kind::Float);
    assert!(d_logits <= 1e-5, "{name}: logits differ by {d_logits:e}");
    assert!(d_loss <= 1e-5, "{name}: loss differs by {d_loss:e}");
    assert!(
        d_grad <= 1e-4,
        "{name}: gradient of {worst} differs by {d_grad:e}"
    );
}

#[test]
fn mha_matches_litgpt() {
    check("mha");
}

#[test]
fn gqa_rmsnorm_llama_mlp_sequential_residual_matches_litgpt() {
    check("gqa");
}

#[test]
fn mqa_with_qk_norm_matches_litgpt() {
    check("mqa");
}

#[test]
fn mla_deepseek_mapping_matches_litgpt() {
    check("mla_mapping");
}

#[test]
fn mla_seed_variant_matches_pytorch_reference() {
    check("mla_seed");
}

#[test]
fn mla_seed_variant_with_latent_norms_matches_pytorch_reference() {
    check("mla_seed_norm_qk");
}
