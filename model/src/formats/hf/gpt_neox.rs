//! The GPTNeoX (pythia) form of mla's ordinary attention models with pythia's block (LayerNorm,
//! GELU MLP): its `config.json` and its weights by HF name.
//!
//! GPTNeoX fuses q, k and v per head (`attention.query_key_value`, rows `[q_h; k_h; v_h]` for
//! each head h), where litgpt (and mla) keep `[q (H·hs) | k (G·hs) | v (G·hs)]`. GPTNeoX has no
//! grouped K/V heads: GQA and MQA go out as the MHA they compute, each query head with a copy
//! of its group's K/V rows (query head i reads group i / (H/G), as litgpt's repeat_interleave).
//! GPTNeoX always has biases; where the mla model has none, zeros compute the same.
//!
//! Back from GPTNeoX (a pythia from the hub, or an export): the config becomes litgpt's pythia
//! fields, each head's `[q_h; k_h; v_h]` rows go back to `[q | k | v]` (as MHA), and biases
//! GPTNeoX leaves out (`attention_bias: false`) come in as zeros.
//!
//! Not here: files (trainer/src/interop/); the other forms (hf/).

use super::{check_shared_options, Lookup};
use crate::config::{GeluApproximate, MlpClass, ModelConfig, NormClass};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::Tensor;

/// `config.json` of a `GPTNeoXForCausalLM` (transformers 4.57 field names; absent fields take
/// transformers' defaults, other fields are ignored when reading).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GptNeoxConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    /// The embedding's rows: mla's padded vocabulary.
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub rotary_pct: f64,
    pub rotary_emb_base: f64,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub use_parallel_residual: bool,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    /// Null in some hub configs.
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub torch_dtype: String,
    pub initializer_range: f64,
    /// Read only: mla has no RoPE scaling, so a config that sets one is refused.
    #[serde(skip_serializing)]
    pub rope_scaling: Option<serde::de::IgnoredAny>,
}

impl Default for GptNeoxConfig {
    /// transformers' `GPTNeoXConfig()` defaults (the token ids are read, never used: the
    /// tokenizer files frame prompts).
    fn default() -> Self {
        GptNeoxConfig {
            architectures: Vec::new(),
            model_type: "gpt_neox".into(),
            vocab_size: 50432,
            hidden_size: 6144,
            num_hidden_layers: 44,
            num_attention_heads: 64,
            intermediate_size: 24576,
            hidden_act: "gelu".into(),
            rotary_pct: 0.25,
            rotary_emb_base: 10000.0,
            max_position_embeddings: 2048,
            layer_norm_eps: 1e-5,
            use_parallel_residual: true,
            attention_bias: true,
            tie_word_embeddings: false,
            bos_token_id: Some(0),
            eos_token_id: Some(2),
            torch_dtype: "float32".into(),
            initializer_range: 0.02,
            rope_scaling: None,
        }
    }
}

/// The GPTNeoX config of the resolved `cfg`, with `separator` as bos and eos (what mla puts
/// before every story and prompt), or one line naming what GPTNeoX cannot express.
pub fn config(cfg: &ModelConfig, separator: u32) -> Result<GptNeoxConfig, String> {
    let refuse = |key: &str, why: &str| Err(format!("model_config.{key}: {why}"));
    if cfg.latent_attention.is_some() {
        return refuse(
            "latent_attention",
            "GPTNeoX has no latent attention (MLA goes to Hugging Face as DeepSeek-V2)",
        );
    }
    if cfg.norm_class_name != NormClass::LayerNorm {
        return refuse("norm_class_name", "GPTNeoX has LayerNorm only");
    }
    if cfg.mlp_class_name != MlpClass::GptNeoxMLP {
        return refuse("mlp_class_name", "GPTNeoX has GptNeoxMLP only");
    }
    let (h, hs) = (cfg.n_head, cfg.head_size());
    if h * hs != cfg.n_embd {
        return refuse("head_size", "GPTNeoX needs n_head × head_size = n_embd");
    }
    if cfg.norm_qk {
        return refuse("norm_qk", "GPTNeoX has no such option");
    }
    check_shared_options(cfg, "GPTNeoX")?;
    Ok(GptNeoxConfig {
        architectures: vec!["GPTNeoXForCausalLM".into()],
        model_type: "gpt_neox".into(),
        vocab_size: cfg.padded_vocab_size(),
        hidden_size: cfg.n_embd,
        num_hidden_layers: cfg.n_layer,
        num_attention_heads: h,
        intermediate_size: cfg.intermediate_size(),
        hidden_act: match cfg.gelu_approximate {
            GeluApproximate::None => "gelu",
            GeluApproximate::Tanh => "gelu_pytorch_tanh",
        }
        .into(),
        rotary_pct: cfg.rotary_percentage,
        rotary_emb_base: cfg.rope_base,
        max_position_embeddings: cfg.block_size,
        layer_norm_eps: cfg.norm_eps,
        use_parallel_residual: cfg.parallel_residual,
        attention_bias: true,
        tie_word_embeddings: false,
        bos_token_id: Some(separator),
        eos_token_id: Some(separator),
        torch_dtype: "float32".into(),
        initializer_range: 0.02,
        rope_scaling: None,
    })
}

/// The mla model (litgpt's fields, resolved) of a GPTNeoX `config.json`, or one line naming
/// what mla cannot build.
pub fn model_config(hf: &GptNeoxConfig, name: &str) -> Result<ModelConfig, String> {
    if hf.model_type != "gpt_neox" {
        return Err(format!(
            "model_type {:?}: mla reads GPTNeoX (\"gpt_neox\") models only",
            hf.model_type
        ));
    }
    if hf.rope_scaling.is_some() {
        return Err("rope_scaling: mla has no RoPE scaling".into());
    }
    let gelu_approximate = match hf.hidden_act.as_str() {
        "gelu" => GeluApproximate::None,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => GeluApproximate::Tanh,
        other => {
            return Err(format!(
                "hidden_act {other:?}: mla has GELU (exact or tanh) only"
            ))
        }
    };
    let cfg = ModelConfig {
        name: name.to_string(),
        block_size: hf.max_position_embeddings,
        n_layer: hf.num_hidden_layers,
        n_embd: hf.hidden_size,
        vocab_size: hf.vocab_size,
        padded_vocab_size: Some(hf.vocab_size),
        norm_class_name: NormClass::LayerNorm,
        norm_eps: hf.layer_norm_eps,
        parallel_residual: hf.use_parallel_residual,
        n_head: hf.num_attention_heads,
        n_query_groups: Some(hf.num_attention_heads),
        rope_base: hf.rotary_emb_base,
        rotary_percentage: hf.rotary_pct,
        intermediate_size: Some(hf.intermediate_size),
        bias: true,
        mlp_class_name: MlpClass::GptNeoxMLP,
        gelu_approximate,
        ..ModelConfig::default()
    };
    cfg.resolve().map_err(|e| e.to_string())
}

/// GPTNeoX weights (by HF name) as mla's (by litgpt name) for `cfg` from
/// [`model_config`]; `tied` when the config ties the output to the input embedding.
pub fn weights_in(
    cfg: &ModelConfig,
    hf: &HashMap<String, Tensor>,
    tied: bool,
) -> Result<HashMap<String, Tensor>, String> {
    let hf = Lookup(hf);
    let (h, hs) = (cfg.n_head as i64, cfg.head_size() as i64);
    let mut out = HashMap::new();
    for (ours, theirs) in plain_pairs(cfg.n_layer) {
        out.insert(ours, hf.get(&theirs)?);
    }
    for (ours, theirs) in linear_pairs(cfg.n_layer) {
        let w = hf.get(&format!("{theirs}.weight"))?;
        out.insert(
            format!("{ours}.bias"),
            hf.bias_or_zeros(&format!("{theirs}.bias"), &w),
        );
        out.insert(format!("{ours}.weight"), w);
    }
    for (ours, theirs) in qkv_pairs(cfg.n_layer) {
        let w = hf.get(&format!("{theirs}.weight"))?;
        let b = hf.bias_or_zeros(&format!("{theirs}.bias"), &w);
        for (part, t) in [("weight", &w), ("bias", &b)] {
            if t.size()[0] != 3 * h * hs {
                return Err(format!(
                    "{theirs}.{part}: {} rows, not 3 × {h} heads × {hs}",
                    t.size()[0]
                ));
            }
            out.insert(format!("{ours}.{part}"), grouped_qkv(t, h, hs));
        }
    }
    out.insert(HEAD.0.into(), hf.head(HEAD.1, EMBEDDING.1, tied)?);
    Ok(out)
}

/// GPTNeoX's per-head `[q_h; k_h; v_h]` rows back to `[q (H·hs) | k (H·hs) | v (H·hs)]`.
fn grouped_qkv(t: &Tensor, h: i64, hs: i64) -> Tensor {
    let rest: Vec<i64> = t.size()[1..].to_vec();
    let mut shape = vec![h, 3, hs];
    shape.extend(&rest);
    let per_head = t.reshape(shape);
    let mut flat = vec![h * hs];
    flat.extend(&rest);
    Tensor::cat(
        &[0, 1, 2].map(|j| per_head.select(1, j).reshape(flat.as_slice())),
        0,
    )
}

/// mla's weights (by litgpt name) as GPTNeoX's. `cfg` must have passed [`config`].
pub fn weights_out(
    cfg: &ModelConfig,
    weights: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>, String> {
    let ours = Lookup(weights);
    let (h, g, hs) = (cfg.n_head, cfg.n_query_groups(), cfg.head_size());
    let mut out = Vec::new();
    for (mine, theirs) in plain_pairs(cfg.n_layer) {
        out.push((theirs, ours.get(&mine)?));
    }
    for (mine, theirs) in linear_pairs(cfg.n_layer) {
        let w = ours.get(&format!("{mine}.weight"))?;
        out.push((
            format!("{theirs}.bias"),
            ours.bias_or_zeros(&format!("{mine}.bias"), &w),
        ));
        out.push((format!("{theirs}.weight"), w));
    }
    for (mine, theirs) in qkv_pairs(cfg.n_layer) {
        let w = ours.get(&format!("{mine}.weight"))?;
        let b = ours.bias_or_zeros(&format!("{mine}.bias"), &w);
        out.push((format!("{theirs}.weight"), per_head_qkv(&w, h, g, hs)));
        out.push((format!("{theirs}.bias"), per_head_qkv(&b, h, g, hs)));
    }
    out.push((HEAD.1.into(), ours.get(HEAD.0)?));
    Ok(out)
}

/// (mla, GPTNeoX) names of the embeddings.
const EMBEDDING: (&str, &str) = ("transformer.wte.weight", "gpt_neox.embed_in.weight");
const HEAD: (&str, &str) = ("lm_head.weight", "embed_out.weight");

/// (mla, GPTNeoX) names of the tensors that travel as they are: the input embedding and every
/// LayerNorm's weight and bias.
fn plain_pairs(n_layer: usize) -> Vec<(String, String)> {
    let mut norms = vec![(
        "transformer.ln_f".to_string(),
        "gpt_neox.final_layer_norm".to_string(),
    )];
    for i in 0..n_layer {
        for (ours, theirs) in [
            ("norm_1", "input_layernorm"),
            ("norm_2", "post_attention_layernorm"),
        ] {
            norms.push((
                format!("transformer.h.{i}.{ours}"),
                format!("gpt_neox.layers.{i}.{theirs}"),
            ));
        }
    }
    let mut out = vec![(EMBEDDING.0.to_string(), EMBEDDING.1.to_string())];
    for (ours, theirs) in norms {
        for part in ["weight", "bias"] {
            out.push((format!("{ours}.{part}"), format!("{theirs}.{part}")));
        }
    }
    out
}

/// (mla, GPTNeoX) prefixes of the linear layers other than qkv: same layout on both sides, a
/// bias one side may lack (zeros where it does, which add nothing).
fn linear_pairs(n_layer: usize) -> Vec<(String, String)> {
    (0..n_layer)
        .flat_map(|i| {
            [
                ("attn.proj", "attention.dense"),
                ("mlp.fc", "mlp.dense_h_to_4h"),
                ("mlp.proj", "mlp.dense_4h_to_h"),
            ]
            .map(|(ours, theirs)| {
                (
                    format!("transformer.h.{i}.{ours}"),
                    format!("gpt_neox.layers.{i}.{theirs}"),
                )
            })
        })
        .collect()
}

/// (mla, GPTNeoX) prefixes of the fused qkv projections, laid out differently on each side.
fn qkv_pairs(n_layer: usize) -> Vec<(String, String)> {
    (0..n_layer)
        .map(|i| {
            (
                format!("transformer.h.{i}.attn.qkv"),
                format!("gpt_neox.layers.{i}.attention.query_key_value"),
            )
        })
        .collect()
}

/// litgpt's `[q (H·hs) | k (G·hs) | v (G·hs)]` rows (weight or bias) as GPTNeoX's per-head
/// `[q_h; k_h; v_h]`, K/V rows repeated for the H/G query heads of each group.
fn per_head_qkv(t: &Tensor, h: usize, g: usize, hs: usize) -> Tensor {
    let (h, g, hs) = (h as i64, g as i64, hs as i64);
    let rest: Vec<i64> = t.size()[1..].to_vec();
    let heads = |start: i64, n: i64| {
        let mut shape = vec![n, hs];
        shape.extend(&rest);
        t.narrow(0, start, n * hs).reshape(shape)
    };
    let q = heads(0, h);
    let k = heads(h * hs, g).repeat_interleave_self_int(h / g, Some(0), None);
    let v = heads((h + g) * hs, g).repeat_interleave_self_int(h / g, Some(0), None);
    let mut shape = vec![3 * h * hs];
    shape.extend(&rest);
    Tensor::stack(&[q, k, v], 1).reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Row r of litgpt's qkv, for a GQA of 4 query heads in 2 groups of head size 2, lands
    /// where GPTNeoX reads head h's q, k or v.
    #[test]
    fn qkv_rows_go_to_their_heads_and_groups_are_repeated() {
        let (h, g, hs) = (4usize, 2usize, 2usize);
        let rows = ((h + 2 * g) * hs) as i64;
        let t = Tensor::arange(rows, (Kind::Float, Device::Cpu));
        let out = Vec::<f32>::try_from(per_head_qkv(&t, h, g, hs)).unwrap();
        let mut want = Vec::new();
        for head in 0..h {
            let group = head / (h / g);
            let q = head * hs;
            let k = h * hs + group * hs;
            let v = (h + g) * hs + group * hs;
            for start in [q, k, v] {
                want.extend((start..start + hs).map(|r| r as f32));
            }
        }
        assert_eq!(out, want);
        // A weight's columns travel with their row.
        let w = Tensor::arange(rows * 3, (Kind::Float, Device::Cpu)).reshape([rows, 3]);
        let out = per_head_qkv(&w, h, g, hs);
        assert_eq!(out.size(), [(3 * h * hs) as i64, 3]);
        assert!(out.select(1, 1).equal(&(out.select(1, 0) + 1.0)));
    }

    /// A hub config with null token ids and only some fields reads with transformers'
    /// defaults for the rest; another model_type is refused by name.
    #[test]
    fn a_sparse_hub_config_takes_transformers_defaults() {
        let c: GptNeoxConfig = serde_json::from_str(
            r#"{"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4,
                "num_hidden_layers": 2, "intermediate_size": 256, "vocab_size": 512,
                "bos_token_id": null, "eos_token_id": null, "unknown_key": 1}"#,
        )
        .unwrap();
        assert_eq!(
            (c.bos_token_id, c.rotary_pct, c.max_position_embeddings),
            (None, 0.25, 2048)
        );
        let m = model_config(&c, "x").unwrap();
        assert_eq!((m.n_embd, m.head_size(), m.rope_n_elem()), (64, 16, 4));
        let llama = GptNeoxConfig {
            model_type: "llama".into(),
            ..c
        };
        let e = model_config(&llama, "x").unwrap_err();
        assert!(e.starts_with("model_type \"llama\""), "{e}");
    }

    /// MHA rows survive the trip to GPTNeoX and back, exactly.
    #[test]
    fn per_head_rows_go_back_to_q_k_v() {
        let (h, hs) = (3usize, 2usize);
        let w = Tensor::arange((3 * h * hs * 5) as i64, (Kind::Float, Device::Cpu))
            .reshape([(3 * h * hs) as i64, 5]);
        let there = per_head_qkv(&w, h, h, hs);
        assert!(!there.equal(&w), "the layouts differ");
        assert!(grouped_qkv(&there, h as i64, hs as i64).equal(&w));
    }
}
