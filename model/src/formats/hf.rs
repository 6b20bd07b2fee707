//! Hugging Face `transformers` formats as data: the GPTNeoX (pythia) form of mla's ordinary
//! attention models, its `config.json` and its weights by HF name.
//!
//! GPTNeoX fuses q, k and v per head (`attention.query_key_value`, rows `[q_h; k_h; v_h]` for
//! each head h), where litgpt (and mla) keep `[q (H·hs) | k (G·hs) | v (G·hs)]`. GPTNeoX has no
//! grouped K/V heads: GQA and MQA go out as the MHA they compute, each query head with a copy
//! of its group's K/V rows (query head i reads group i / (H/G), as litgpt's repeat_interleave).
//! GPTNeoX always has biases; where the mla model has none, zeros compute the same.
//!
//! Not here: files (trainer/src/interop/hf.rs). Not yet: Llama and DeepSeek-V2 (MLA) forms.

use crate::config::{GeluApproximate, MlpClass, ModelConfig, NormClass};
use serde::Serialize;
use std::collections::HashMap;
use tch::Tensor;

/// `config.json` of a `GPTNeoXForCausalLM` (transformers 4.57 field names).
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub torch_dtype: String,
    pub initializer_range: f64,
}

/// The GPTNeoX config of the resolved `cfg`, with `separator` as bos and eos (what mla puts
/// before every story and prompt), or one line naming what GPTNeoX cannot express.
pub fn gpt_neox_config(cfg: &ModelConfig, separator: u32) -> Result<GptNeoxConfig, String> {
    let refuse = |key: &str, why: &str| Err(format!("model_config.{key}: {why}"));
    if cfg.latent_attention.is_some() {
        return refuse(
            "latent_attention",
            "MLA goes to Hugging Face as DeepSeek-V2, which mla does not write yet",
        );
    }
    if cfg.norm_class_name != NormClass::LayerNorm {
        return refuse("norm_class_name", "GPTNeoX has LayerNorm only");
    }
    if cfg.mlp_class_name != MlpClass::GptNeoxMLP {
        return refuse(
            "mlp_class_name",
            "GPTNeoX has GptNeoxMLP only (LLaMA-style models go out as Llama, not written yet)",
        );
    }
    let (h, hs) = (cfg.n_head, cfg.head_size());
    if h * hs != cfg.n_embd {
        return refuse("head_size", "GPTNeoX needs n_head × head_size = n_embd");
    }
    for (key, unsupported) in [
        ("norm_qk", cfg.norm_qk),
        ("shared_attention_norm", cfg.shared_attention_norm),
        ("lm_head_bias", cfg.lm_head_bias),
        ("scale_embeddings", cfg.scale_embeddings),
        ("rope_condense_ratio", cfg.rope_condense_ratio != 1),
        (
            "attention_scores_scalar",
            cfg.attention_scores_scalar.is_some_and(|s| s != hs),
        ),
    ] {
        if unsupported {
            return refuse(key, "GPTNeoX has no such option");
        }
    }
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
        bos_token_id: separator,
        eos_token_id: separator,
        torch_dtype: "float32".into(),
        initializer_range: 0.02,
    })
}

/// mla's weights (by litgpt name) as GPTNeoX's, in HF's order of layers. `cfg` must have
/// passed [`gpt_neox_config`].
pub fn gpt_neox_weights(
    cfg: &ModelConfig,
    weights: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>, String> {
    let get = |name: &str| {
        weights
            .get(name)
            .map(Tensor::shallow_clone)
            .ok_or_else(|| format!("no tensor {name}"))
    };
    // A bias mla does not have: zeros of the output width, which add nothing.
    let bias_or_zeros = |name: &str, weight: &Tensor| {
        weights
            .get(name)
            .map(Tensor::shallow_clone)
            .unwrap_or_else(|| Tensor::zeros([weight.size()[0]], (weight.kind(), weight.device())))
    };
    let (h, g, hs) = (cfg.n_head, cfg.n_query_groups(), cfg.head_size());
    let mut out = vec![(
        "gpt_neox.embed_in.weight".to_string(),
        get("transformer.wte.weight")?,
    )];
    for i in 0..cfg.n_layer {
        let ours = |s: &str| format!("transformer.h.{i}.{s}");
        let theirs = |s: &str| format!("gpt_neox.layers.{i}.{s}");
        for (from, to) in [
            ("norm_1", "input_layernorm"),
            ("norm_2", "post_attention_layernorm"),
        ] {
            for part in ["weight", "bias"] {
                out.push((
                    theirs(&format!("{to}.{part}")),
                    get(&ours(&format!("{from}.{part}")))?,
                ));
            }
        }
        let qkv = get(&ours("attn.qkv.weight"))?;
        let qkv_bias = bias_or_zeros(&ours("attn.qkv.bias"), &qkv);
        out.push((
            theirs("attention.query_key_value.weight"),
            per_head_qkv(&qkv, h, g, hs),
        ));
        out.push((
            theirs("attention.query_key_value.bias"),
            per_head_qkv(&qkv_bias, h, g, hs),
        ));
        for (from, to) in [
            ("attn.proj", "attention.dense"),
            ("mlp.fc", "mlp.dense_h_to_4h"),
            ("mlp.proj", "mlp.dense_4h_to_h"),
        ] {
            let w = get(&ours(&format!("{from}.weight")))?;
            let b = bias_or_zeros(&ours(&format!("{from}.bias")), &w);
            out.push((theirs(&format!("{to}.weight")), w));
            out.push((theirs(&format!("{to}.bias")), b));
        }
    }
    for part in ["weight", "bias"] {
        out.push((
            format!("gpt_neox.final_layer_norm.{part}"),
            get(&format!("transformer.ln_f.{part}"))?,
        ));
    }
    out.push(("embed_out.weight".into(), get("lm_head.weight")?));
    Ok(out)
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
}
