//! MHA/GQA/MQA → MLA conversion (`mla_model::convert`): exact before truncation, an error
//! that falls with the rank, and a converted model whose three decode paths agree.
//!
//! The reference for an MHA/GQA source is the "partial-RoPE" model the factorisation is exact
//! against: the same conversion with [`Factor::Identity`], whose latent is the nope keys and
//! values themselves. For an MQA source RoRoPE loses nothing and the reference is the source.

mod common;

use common::{max_abs_diff, random_model, test_device, tiny, tokens, FORWARD_TOL};
use mla_model::convert::{plan, Calibration, Converted, Factor, Options, Plan};
use mla_model::{Gpt, MlaDecode, ModelConfig};
use std::collections::HashMap;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// |Δ| of the logits of a converted model at full rank against its reference. Both are fp32
/// forwards of O(1) activations (FORWARD_TOL covers their own rounding), and the converted
/// weights are fp64 products rounded once to fp32: the latent path adds, per layer, a chain
/// of two reductions (E terms into the latent, C terms out of it) over factors whose
/// magnitudes are those of the source weights. That at most doubles the chained reductions
/// FORWARD_TOL was derived for (17 → 2·17), i.e. √2 × its random-walk bound; 2 × FORWARD_TOL
/// bounds it with margin, well inside the 1e-4.
const CONVERTED_TOL: f64 = 2.0 * FORWARD_TOL;

fn weights(vs: &VarStore) -> HashMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .map(|(n, t)| (n, t.to_device(tch::Device::Cpu)))
        .collect()
}

fn build(cfg: &ModelConfig, weights: &HashMap<String, Tensor>) -> Gpt {
    let vs = VarStore::new(test_device());
    let gpt = Gpt::new(&vs.root(), cfg).expect("valid converted config");
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let t = weights
                .get(&name)
                .unwrap_or_else(|| panic!("converted weights lack {name}"));
            assert_eq!(t.size(), var.size(), "{name}");
            var.copy_(t);
        }
    });
    gpt // holds its own references to the parameters
}

fn options(kv_lora_rank: Option<usize>, factor: Factor) -> Options {
    Options {
        kv_lora_rank,
        q_lora_rank: None,
        rope_dims: None,
        factor,
    }
}

/// Convert the source and build the converted model.
fn converted(
    src: &ModelConfig,
    w: &HashMap<String, Tensor>,
    opts: Options,
    moments: Option<&[Tensor]>,
) -> (Plan, Converted, Gpt) {
    let p = plan(src, &opts).expect("valid conversion");
    let c = p.convert(w, moments).expect("conversion");
    let gpt = build(&p.target, &c.weights);
    (p, c, gpt)
}

fn logits(gpt: &Gpt, idx: &Tensor) -> Tensor {
    tch::no_grad(|| gpt.forward(idx))
}

fn calibrate(gpt: &Gpt, cfg: &ModelConfig) -> Vec<Tensor> {
    let mut cal = Calibration::new(cfg.n_layer, cfg.n_embd);
    for seed in 0..4 {
        let idx = tokens(4, 32, cfg.vocab_size as i64, 100 + seed);
        cal.add(&tch::no_grad(|| gpt.attention_inputs(&idx)));
    }
    assert_eq!(cal.tokens(), 4 * 4 * 32);
    cal.moments()
}

#[test]
fn an_mqa_source_converts_exactly_at_full_rank() {
    let cfg = tiny(1);
    let (vs, src) = random_model(&cfg, 11);
    let idx = tokens(2, 16, 64, 1);
    let (_, c, mla) = converted(&cfg, &weights(&vs), options(None, Factor::Weights), None);
    for l in &c.layers {
        assert!((l.rope_energy_kept - 1.0).abs() < 1e-12, "{l:?}");
        assert!((l.kv_energy_kept - 1.0).abs() < 1e-12, "{l:?}");
    }
    let d = max_abs_diff(&logits(&src, &idx), &logits(&mla, &idx));
    println!("MQA → MLA at full rank: max |Δ logits| = {d:.2e}");
    assert!(d < CONVERTED_TOL, "{d}");
}

#[test]
fn mha_and_gqa_factor_exactly_at_full_rank_by_weights_and_by_activations() {
    // MHA and GQA with biases; GQA without (LLaMA-style) and with a fixed softmax scale
    // (attention_scores_scalar: no query scaling).
    let unbiased = ModelConfig {
        bias: false,
        attention_scores_scalar: Some(8),
        ..tiny(2)
    };
    for cfg in [tiny(4), tiny(2), unbiased] {
        let groups = cfg.n_query_groups();
        let (vs, src) = random_model(&cfg, 12);
        let w = weights(&vs);
        let moments = calibrate(&src, &cfg);
        let idx = tokens(2, 16, 64, 2);
        let (_, _, reference) =
            converted(&cfg, &w, options(None, Factor::Identity), Some(&moments));
        let reference = logits(&reference, &idx);
        // The partial-RoPE reference is not the source: RoRoPE un-rotates part of the keys.
        assert!(max_abs_diff(&reference, &logits(&src, &idx)) > 100.0 * CONVERTED_TOL);
        for factor in [Factor::Weights, Factor::Activations] {
            let (p, c, mla) = converted(&cfg, &w, options(None, factor), Some(&moments));
            let d = max_abs_diff(&reference, &logits(&mla, &idx));
            println!(
                "G={groups} {factor:?} at C={}: max |Δ logits| = {d:.2e}, rope energy kept {:.3}",
                p.target.mla().unwrap().kv_lora_rank,
                c.layers[0].rope_energy_kept
            );
            assert!(d < CONVERTED_TOL, "G={groups} {factor:?}: {d}");
            assert!(c
                .layers
                .iter()
                .all(|l| (l.kv_energy_kept - 1.0).abs() < 1e-9));
        }
    }
}

#[test]
fn the_error_falls_as_the_rank_grows() {
    let cfg = tiny(4);
    let (vs, src) = random_model(&cfg, 13);
    let w = weights(&vs);
    let moments = calibrate(&src, &cfg);
    let idx = tokens(4, 32, 64, 3);
    let (_, _, reference) = converted(&cfg, &w, options(None, Factor::Identity), Some(&moments));
    let reference = logits(&reference, &idx);
    for factor in [Factor::Weights, Factor::Activations] {
        let mut last = (f64::INFINITY, 0.0);
        for rank in [4, 12, 24, 32] {
            let (_, c, mla) = converted(&cfg, &w, options(Some(rank), factor), Some(&moments));
            let err = (logits(&mla, &idx) - &reference)
                .square()
                .mean(Kind::Double)
                .sqrt()
                .double_value(&[]);
            let kept = c.layers[0].kv_energy_kept;
            println!("{factor:?} C={rank}: rms Δ logits {err:.3e}, energy kept {kept:.3}");
            assert!(
                err < last.0,
                "{factor:?}: C={rank} gives {err}, not below {}",
                last.0
            );
            assert!(kept > last.1, "{factor:?}: C={rank} keeps {kept}");
            last = (err, kept);
        }
    }
}

/// Greedy continuation of `prompt` for `steps` tokens: without a cache (the whole sequence
/// each step), or with the compressed cache in the naive or the absorbed form.
fn greedy(gpt: &Gpt, prompt: &Tensor, steps: i64, decode: Option<MlaDecode>) -> Vec<i64> {
    tch::no_grad(|| {
        let mut seq = prompt.shallow_clone();
        let mut cache = decode.map(|d| {
            gpt.new_cache(1, prompt.size()[1] + steps, d, Kind::Float)
                .unwrap()
        });
        let mut next_input = prompt.shallow_clone();
        for _ in 0..steps {
            let last = match &mut cache {
                Some(c) => gpt.forward_cached_last(&next_input, c).unwrap(),
                None => gpt.forward(&seq).narrow(1, seq.size()[1] - 1, 1),
            };
            let next = last.argmax(-1, false); // (1, 1)
            seq = Tensor::cat(&[&seq, &next], 1);
            next_input = next;
        }
        Vec::<i64>::try_from(seq.flatten(0, -1)).unwrap()
    })
}

#[test]
fn a_truncated_conversion_decodes_the_same_text_on_every_path() {
    let cfg = tiny(2);
    let (vs, src) = random_model(&cfg, 14);
    let moments = calibrate(&src, &cfg);
    let opts = Options {
        kv_lora_rank: Some(12),
        q_lora_rank: Some(16),
        rope_dims: Some(2),
        factor: Factor::Activations,
    };
    let (p, c, mla) = converted(&cfg, &weights(&vs), opts, Some(&moments));
    let spec = p.target.mla().unwrap();
    assert_eq!(
        (spec.kv_lora_rank, spec.q_lora_rank, spec.qk_rope_head_dim),
        (12, Some(16), 2)
    );
    assert!(c.layers.iter().all(|l| l.q_energy_kept.is_some()));
    let prompt = tokens(1, 5, 64, 4);
    let uncached = greedy(&mla, &prompt, 20, None);
    assert_eq!(greedy(&mla, &prompt, 20, Some(MlaDecode::Naive)), uncached);
    assert_eq!(
        greedy(&mla, &prompt, 20, Some(MlaDecode::Absorbed)),
        uncached
    );
}

#[test]
fn a_source_with_a_missing_or_misshapen_qkv_is_an_error() {
    let cfg = tiny(4);
    let (vs, _) = random_model(&cfg, 15);
    let p = plan(&cfg, &options(None, Factor::Weights)).unwrap();
    let mut w = weights(&vs);
    w.remove("transformer.h.1.attn.qkv.bias");
    let e = p.convert(&w, None).err().unwrap().to_string();
    assert_eq!(e, "missing tensor transformer.h.1.attn.qkv.bias");
    let mut w = weights(&vs);
    w.insert(
        "transformer.h.0.attn.qkv.weight".into(),
        Tensor::zeros([3, 3], (Kind::Float, tch::Device::Cpu)),
    );
    let e = p.convert(&w, None).err().unwrap().to_string();
    assert!(e.contains("shape [3, 3]"), "{e}");
    let a = plan(&cfg, &options(None, Factor::Activations)).unwrap();
    assert!(a.convert(&weights(&vs), None).is_err());
}
