//! Parity against the real peers: goldens from litgpt 0.5.13 (MHA, GQA, MQA, MLA mapping) and
//! from the plain-PyTorch reference (the seed's `latent_attention: true`), made by
//! scripts/ref/gen_goldens.py. Same weights (loaded by litgpt key, no rename table) → same
//! fp32 logits, loss and gradients to fp32 rounding (bounds derived in common.rs). On the device of
//! `MLA_TEST_DEVICE` (cpu by default; cuda in scripts/gpu_check.sh, where the goldens are found
//! through `MLA_MODEL_GOLDENS` because the binary runs away from this source tree).

mod common;

use common::{max_abs_diff, test_device, FORWARD_TOL, GRAD_REL_TOL, LOSS_TOL};
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
    // Each gradient relative to its tensor's largest entry (gradients are far smaller than
    // the activations, so an absolute bound would say nothing).
    let mut d_grad: f64 = 0.0;
    let mut worst = String::new();
    for (key, var) in &vars {
        let want = &golden[&format!("g.{key}")];
        let d = max_abs_diff(&var.grad(), want) / want.abs().max().double_value(&[]).max(1e-30);
        if d > d_grad {
            d_grad = d;
            worst = key.clone();
        }
    }
    println!("Δ {name} logits on {device:?}: {d_logits:.2e} (bound {FORWARD_TOL:.1e})");
    println!("Δ {name} loss on {device:?}: {d_loss:.2e} (bound {LOSS_TOL:.1e})");
    println!(
        "Δ {name} gradients on {device:?}, of their largest entry ({worst}): {d_grad:.2e} \
         (bound {GRAD_REL_TOL:.1e})"
    );
    assert_eq!(logits.kind(), Kind::Float);
    assert!(
        d_logits <= FORWARD_TOL,
        "{name}: logits differ by {d_logits:e}"
    );
    assert!(d_loss <= LOSS_TOL, "{name}: loss differs by {d_loss:e}");
    assert!(
        d_grad <= GRAD_REL_TOL,
        "{name}: gradient of {worst} differs by {d_grad:e} of its largest entry"
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
