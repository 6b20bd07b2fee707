//! The Llama form of mla's ordinary attention models with the LLaMA block (RMSNorm, SwiGLU MLP,
//! sequential residual, full rotary): litgpt's TinyLlama-family models, and any `model_config`
//! of that block. Its `config.json` and its weights by HF name.
//!
//! Llama keeps q, k and v apart (`q_proj` H·hs rows, `k_proj`/`v_proj` G·hs rows): litgpt's
//! fused `[q | k | v]` splits into them, grouped K/V heads included. Both rotate the two halves
//! of each head (rotate-half RoPE), so no row is permuted. Biases: Llama's `attention_bias`
//! covers q, k, v and o, `mlp_bias` the three MLP linears; litgpt's `bias` covers all of them,
//! so the two travel as one (a Llama with one and not the other has no litgpt form).
//!
//! Not here: files (trainer/src/interop/); the other forms (hf/).

use super::{check_llama_block, check_shared_options, llama_block, Lookup};
use crate::config::ModelConfig;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::Tensor;

/// `config.json` of a `LlamaForCausalLM` (transformers 4.57 field names; absent fields take
/// transformers' defaults, other fields are ignored when reading).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    /// The embedding's rows: mla's padded vocabulary.
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Null or absent: as many as `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Null or absent: `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// A number or a list (Llama 3); read, never used: the tokenizer files frame prompts.
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    pub torch_dtype: String,
    pub initializer_range: f64,
    /// Read only: mla has no RoPE scaling, so a config that sets one is refused.
    #[serde(skip_serializing)]
    pub rope_scaling: Option<serde::de::IgnoredAny>,
}

impl Default for LlamaConfig {
    /// transformers' `LlamaConfig()` defaults.
    fn default() -> Self {
        LlamaConfig {
            architectures: Vec::new(),
            model_type: "llama".into(),
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            bos_token_id: Some(1.into()),
            eos_token_id: Some(2.into()),
            torch_dtype: "float32".into(),
            initializer_range: 0.02,
            rope_scaling: None,
        }
    }
}

/// The Llama config of the resolved `cfg`, with `separator` as bos and eos, or one line naming
/// what Llama cannot express.
pub fn config(cfg: &ModelConfig, separator: u32) -> Result<LlamaConfig, String> {
    let refuse = |key: &str, why: &str| Err(format!("model_config.{key}: {why}"));
    if cfg.latent_attention.is_some() {
        return refuse(
            "latent_attention",
            "Llama has no latent attention (MLA goes to Hugging Face as DeepSeek-V2)",
        );
    }
    check_llama_block(cfg, "Llama")?;
    if cfg.rope_n_elem() != cfg.head_size() {
        return refuse(
            "rotary_percentage",
            "Llama rotates the whole head (rotary_percentage 1.0)",
        );
    }
    if cfg.attn_bias && !cfg.bias {
        return refuse(
            "attn_bias",
            "Llama's attention_bias covers the output projection too",
        );
    }
    if cfg.norm_qk {
        return refuse("norm_qk", "Llama has no such option");
    }
    check_shared_options(cfg, "Llama")?;
    Ok(LlamaConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        vocab_size: cfg.padded_vocab_size(),
        hidden_size: cfg.n_embd,
        intermediate_size: cfg.intermediate_size(),
        num_hidden_layers: cfg.n_layer,
        num_attention_heads: cfg.n_head,
        num_key_value_heads: Some(cfg.n_query_groups()),
        head_dim: Some(cfg.head_size()),
        max_position_embeddings: cfg.block_size,
        rms_norm_eps: cfg.norm_eps,
        rope_theta: cfg.rope_base,
        attention_bias: cfg.bias,
        mlp_bias: cfg.bias,
        bos_token_id: Some(separator.into()),
        eos_token_id: Some(separator.into()),
        ..LlamaConfig::default()
    })
}

/// The mla model (litgpt's fields, resolved) of a Llama `config.json`, or one line naming what
/// mla cannot build.
pub fn model_config(hf: &LlamaConfig, name: &str) -> Result<ModelConfig, String> {
    if hf.attention_bias != hf.mlp_bias {
        return Err("attention_bias and mlp_bias differ: litgpt's `bias` sets both alike".into());
    }
    let block = llama_block!(hf).model_config(name)?;
    let cfg = ModelConfig {
        n_query_groups: Some(hf.num_key_value_heads.unwrap_or(hf.num_attention_heads)),
        head_size: Some(
            hf.head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads),
        ),
        rotary_percentage: 1.0,
        bias: hf.attention_bias,
        ..block
    };
    cfg.resolve().map_err(|e| e.to_string())
}

/// The tensors of each linear layer: litgpt's `bias` gives every one a bias or none.
fn parts(cfg: &ModelConfig) -> &'static [&'static str] {
    if cfg.bias {
        &["weight", "bias"]
    } else {
        &["weight"]
    }
}

/// (mla, Llama) names of the tensors that travel as they are (norms and plain linears).
fn pairs(cfg: &ModelConfig) -> Vec<(String, String)> {
    let mut out = vec![
        (EMBEDDING.0.to_string(), EMBEDDING.1.to_string()),
        ("transformer.ln_f.weight".into(), "model.norm.weight".into()),
    ];
    let parts = parts(cfg);
    for i in 0..cfg.n_layer {
        let (ours, theirs) = (format!("transformer.h.{i}"), format!("model.layers.{i}"));
        for (a, b) in [
            ("norm_1", "input_layernorm"),
            ("norm_2", "post_attention_layernorm"),
        ] {
            out.push((format!("{ours}.{a}.weight"), format!("{theirs}.{b}.weight")));
        }
        for (a, b) in [
            ("attn.proj", "self_attn.o_proj"),
            ("mlp.fc_1", "mlp.gate_proj"),
            ("mlp.fc_2", "mlp.up_proj"),
            ("mlp.proj", "mlp.down_proj"),
        ] {
            for part in parts {
                out.push((format!("{ours}.{a}.{part}"), format!("{theirs}.{b}.{part}")));
            }
        }
    }
    out
}

const EMBEDDING: (&str, &str) = ("transformer.wte.weight", "model.embed_tokens.weight");
const HEAD: (&str, &str) = ("lm_head.weight", "lm_head.weight");

/// Row counts of q, k and v in litgpt's fused qkv.
fn qkv_rows(cfg: &ModelConfig) -> [i64; 3] {
    let hs = cfg.head_size() as i64;
    let (h, g) = (cfg.n_head as i64, cfg.n_query_groups() as i64);
    [h * hs, g * hs, g * hs]
}

/// mla's weights (by litgpt name) as Llama's. `cfg` must have passed [`config`].
pub fn weights_out(
    cfg: &ModelConfig,
    weights: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>, String> {
    let ours = Lookup(weights);
    let mut out = Vec::new();
    for (mine, theirs) in pairs(cfg) {
        out.push((theirs, ours.get(&mine)?));
    }
    let parts = parts(cfg);
    for i in 0..cfg.n_layer {
        for part in parts {
            let qkv = ours.get(&format!("transformer.h.{i}.attn.qkv.{part}"))?;
            let split = qkv.split_with_sizes(qkv_rows(cfg), 0);
            for (name, t) in ["q_proj", "k_proj", "v_proj"].iter().zip(split) {
                out.push((format!("model.layers.{i}.self_attn.{name}.{part}"), t));
            }
        }
    }
    out.push((HEAD.1.into(), ours.get(HEAD.0)?));
    Ok(out)
}

/// Llama weights (by HF name) as mla's (by litgpt name) for `cfg` from [`model_config`];
/// `tied` when the config ties the output to the input embedding.
pub fn weights_in(
    cfg: &ModelConfig,
    hf: &HashMap<String, Tensor>,
    tied: bool,
) -> Result<HashMap<String, Tensor>, String> {
    let theirs = Lookup(hf);
    let mut out = HashMap::new();
    for (ours, name) in pairs(cfg) {
        out.insert(ours, theirs.get(&name)?);
    }
    let parts = parts(cfg);
    let rows = qkv_rows(cfg);
    for i in 0..cfg.n_layer {
        for part in parts {
            let mut qkv = Vec::new();
            for (name, want) in ["q_proj", "k_proj", "v_proj"].iter().zip(rows) {
                let key = format!("model.layers.{i}.self_attn.{name}.{part}");
                let t = theirs.get(&key)?;
                if t.size()[0] != want {
                    return Err(format!("{key}: {} rows, not {want}", t.size()[0]));
                }
                qkv.push(t);
            }
            out.insert(
                format!("transformer.h.{i}.attn.qkv.{part}"),
                Tensor::cat(&qkv, 0),
            );
        }
    }
    out.insert(HEAD.0.into(), theirs.head(HEAD.1, EMBEDDING.1, tied)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn tiny() -> ModelConfig {
        serde_json::from_str::<ModelConfig>(
            r#"{"n_layer": 1, "n_embd": 16, "n_head": 4, "n_query_groups": 2,
                "padded_vocab_size": 16, "norm_class_name": "RMSNorm",
                "mlp_class_name": "LLaMAMLP", "intermediate_size": 12, "bias": false,
                "parallel_residual": false, "rotary_percentage": 1.0}"#,
        )
        .unwrap()
        .resolve()
        .unwrap()
    }

    /// A GQA model's config and weights go to Llama and come back as they were.
    #[test]
    fn config_and_weights_make_the_round_trip() {
        let cfg = tiny();
        let hf = config(&cfg, 0).unwrap();
        assert_eq!(
            (hf.num_key_value_heads, hf.head_dim, hf.attention_bias),
            (Some(2), Some(4), false)
        );
        let back = model_config(&hf, &cfg.name).unwrap();
        assert!(
            back.differences(&cfg).is_empty(),
            "{:?}",
            back.differences(&cfg)
        );

        let opts = (Kind::Float, Device::Cpu);
        let mut ours = HashMap::new();
        for (name, _) in pairs(&cfg) {
            ours.insert(name, Tensor::randn([3], opts));
        }
        ours.insert(
            "transformer.h.0.attn.qkv.weight".into(),
            Tensor::randn([32, 16], opts),
        );
        ours.insert("lm_head.weight".into(), Tensor::randn([16, 16], opts));
        let out: HashMap<String, Tensor> = weights_out(&cfg, &ours).unwrap().into_iter().collect();
        assert_eq!(
            out["model.layers.0.self_attn.k_proj.weight"].size(),
            [8, 16]
        );
        assert!(out["model.layers.0.self_attn.v_proj.weight"]
            .equal(&ours["transformer.h.0.attn.qkv.weight"].narrow(0, 24, 8)));
        let back = weights_in(&cfg, &out, false).unwrap();
        assert_eq!(back.len(), ours.len());
        for (k, t) in &ours {
            assert!(back[k].equal(t), "{k}");
        }
    }

    /// What Llama cannot hold is refused by field; a tied hub model reads its embedding as head.
    #[test]
    fn other_blocks_are_refused_and_tied_heads_read_the_embedding() {
        let mut cfg = tiny();
        cfg.parallel_residual = true;
        assert!(config(&cfg, 0).unwrap_err().contains("parallel_residual"));
        let mut cfg = tiny();
        cfg.rotary_percentage = 0.5;
        let cfg = cfg.resolve().unwrap();
        assert!(config(&cfg, 0).unwrap_err().contains("rotary_percentage"));
        let hf: LlamaConfig = serde_json::from_str(
            r#"{"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
                "vocab_size": 16, "intermediate_size": 4, "eos_token_id": [1, 2]}"#,
        )
        .unwrap();
        let cfg = model_config(&hf, "x").unwrap();
        assert_eq!((cfg.n_query_groups(), cfg.head_size()), (2, 4));
        let opts = (Kind::Float, Device::Cpu);
        let mut hf_w: HashMap<String, Tensor> = pairs(&cfg)
            .into_iter()
            .map(|(_, theirs)| (theirs, Tensor::randn([2], opts)))
            .collect();
        for name in ["q_proj", "k_proj", "v_proj"] {
            hf_w.insert(
                format!("model.layers.0.self_attn.{name}.weight"),
                Tensor::randn([8, 8], opts),
            );
        }
        let emb = hf_w[EMBEDDING.1].shallow_clone();
        let ours = weights_in(&cfg, &hf_w, true).unwrap();
        assert!(ours["lm_head.weight"].equal(&emb));
        assert!(weights_in(&cfg, &hf_w, false)
            .unwrap_err()
            .contains("lm_head"));
    }
}
