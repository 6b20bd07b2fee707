//! The DeepSeek-V2 form of mla's MLA models with the LLaMA block (RMSNorm, SwiGLU MLP,
//! sequential residual): `DeepseekV2ForCausalLM` of transformers 4.57, every layer dense
//! (`first_k_dense_replace` = the layer count, no experts). Its `config.json` and its weights
//! by HF name.
//!
//! The MLA linears carry DeepSeek's names on both sides and the same layouts (q per head
//! `[nope | rope]`, kv down `[c_kv | k_rope]`, kv up per head `[k_nope | v]`), with one
//! difference: mla rotates the two halves of the rope dims (pairs j, j + Dr/2, litgpt's
//! rotate-half), DeepSeek-V2 adjacent pairs (2j, 2j + 1). So the rope rows of the q projection
//! (each head's) and of `kv_a_proj_with_mqa` are permuted, the same way on q and k: the
//! scores, and so the model, do not change. `kv_b_proj` is untouched.
//!
//! DeepSeek-V2 has latent RMSNorms always and biases on none of q_b/q/kv_b: mla's MLA goes out
//! when its latents are RMS-normed and no MLA linear has a bias (the mapping form with
//! `bias: false`, `attn_bias: false`). Its latent norms' eps is fixed at 1e-6 where mla's is
//! `norm_eps`: [`latent_eps_caveat`] says when the two differ.
//!
//! Not here: files (trainer/src/interop/); the other forms (hf/).

use super::{check_llama_block, check_shared_options, llama_block, Lookup};
use crate::config::{LatentAttention, MlaDims, ModelConfig, NormClass};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::Tensor;

/// The eps of DeepSeek-V2's latent norms (`q_a_layernorm`, `kv_a_layernorm`), which its config
/// does not set.
pub const LATENT_NORM_EPS: f64 = 1e-6;

/// `config.json` of a `DeepseekV2ForCausalLM` (transformers 4.57 field names; absent fields
/// take transformers' defaults, other fields are ignored when reading).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeepseekV2Config {
    pub architectures: Vec<String>,
    pub model_type: String,
    /// The embedding's rows: mla's padded vocabulary.
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The dense MLP's width.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// Null: a plain `q_proj` (DeepSeek-V2-Lite).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_rope_head_dim: usize,
    pub qk_nope_head_dim: usize,
    pub v_head_dim: usize,
    /// Layers below this index are dense; the rest are mixtures of experts.
    pub first_k_dense_replace: usize,
    pub n_routed_experts: Option<usize>,
    pub n_shared_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    /// A number or a list; read, never used: the tokenizer files frame prompts.
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    pub torch_dtype: String,
    pub initializer_range: f64,
    /// Read only: mla has no RoPE scaling, so a config that sets one is refused.
    #[serde(skip_serializing)]
    pub rope_scaling: Option<serde::de::IgnoredAny>,
    /// Read only: DeepSeek-V2 rotates all `qk_rope_head_dim` dims; another factor is refused.
    #[serde(skip_serializing)]
    pub partial_rotary_factor: Option<f64>,
}

impl Default for DeepseekV2Config {
    /// transformers' `DeepseekV2Config()` defaults.
    fn default() -> Self {
        DeepseekV2Config {
            architectures: Vec::new(),
            model_type: "deepseek_v2".into(),
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            qk_rope_head_dim: 64,
            qk_nope_head_dim: 128,
            v_head_dim: 128,
            first_k_dense_replace: 0,
            n_routed_experts: Some(64),
            n_shared_experts: Some(2),
            num_experts_per_tok: None,
            bos_token_id: Some(1.into()),
            eos_token_id: Some(2.into()),
            torch_dtype: "float32".into(),
            initializer_range: 0.02,
            rope_scaling: None,
            partial_rotary_factor: None,
        }
    }
}

/// The DeepSeek-V2 config of the resolved MLA `cfg`, with `separator` as bos and eos, or one
/// line naming what DeepSeek-V2 cannot express.
pub fn config(cfg: &ModelConfig, separator: u32) -> Result<DeepseekV2Config, String> {
    let refuse = |key: &str, why: &str| Err(format!("model_config.{key}: {why}"));
    let Some(spec) = cfg.mla() else {
        return refuse("latent_attention", "DeepSeek-V2 holds MLA models only");
    };
    if spec.latent_norm != Some(NormClass::RMSNorm) {
        return refuse(
            "latent_attention",
            "DeepSeek-V2 RMS-normalizes both latents, which the seed's `true` does only with \
             norm_qk and RMSNorm (and the mapping only without latent_norm: false); train the \
             mapping form to export",
        );
    }
    if spec.down_bias || spec.up_bias {
        let key = if spec.up_bias { "bias" } else { "attn_bias" };
        return refuse(key, "DeepSeek-V2's MLA linears have no biases");
    }
    check_llama_block(cfg, "DeepSeek-V2")?;
    check_shared_options(cfg, "DeepSeek-V2")?;
    Ok(DeepseekV2Config {
        architectures: vec!["DeepseekV2ForCausalLM".into()],
        vocab_size: cfg.padded_vocab_size(),
        hidden_size: cfg.n_embd,
        intermediate_size: cfg.intermediate_size(),
        num_hidden_layers: cfg.n_layer,
        num_attention_heads: cfg.n_head,
        num_key_value_heads: Some(cfg.n_head),
        max_position_embeddings: cfg.block_size,
        rms_norm_eps: cfg.norm_eps,
        rope_theta: cfg.rope_base,
        q_lora_rank: spec.q_lora_rank,
        kv_lora_rank: spec.kv_lora_rank,
        qk_rope_head_dim: spec.qk_rope_head_dim,
        qk_nope_head_dim: spec.qk_nope_head_dim,
        v_head_dim: spec.v_head_dim,
        first_k_dense_replace: cfg.n_layer,
        n_routed_experts: None,
        n_shared_experts: None,
        bos_token_id: Some(separator.into()),
        eos_token_id: Some(separator.into()),
        ..DeepseekV2Config::default()
    })
}

/// The mla model (litgpt's fields, resolved, `latent_attention` as a mapping) of a
/// DeepSeek-V2 `config.json`, or one line naming what mla cannot build.
pub fn model_config(hf: &DeepseekV2Config, name: &str) -> Result<ModelConfig, String> {
    if hf.partial_rotary_factor.is_some_and(|f| f != 1.0) {
        return Err("partial_rotary_factor: mla rotates every qk_rope_head_dim dim".into());
    }
    if hf.first_k_dense_replace < hf.num_hidden_layers {
        return Err(format!(
            "first_k_dense_replace {} of {} layers: layers from there on are mixtures of \
             experts, and mla's MLPs are dense",
            hf.first_k_dense_replace, hf.num_hidden_layers
        ));
    }
    if hf.attention_bias || hf.mlp_bias {
        return Err(
            "attention_bias/mlp_bias: mla's MLA models of this block have no biases".into(),
        );
    }
    if hf
        .num_key_value_heads
        .is_some_and(|g| g != hf.num_attention_heads)
    {
        return Err("num_key_value_heads: MLA has one K/V head per query head".into());
    }
    let block = llama_block!(hf).model_config(name)?;
    let cfg = ModelConfig {
        bias: false,
        latent_attention: Some(LatentAttention::Dims(MlaDims {
            q_lora_rank: hf.q_lora_rank,
            kv_lora_rank: hf.kv_lora_rank,
            qk_rope_head_dim: hf.qk_rope_head_dim,
            qk_nope_head_dim: hf.qk_nope_head_dim,
            v_head_dim: hf.v_head_dim,
            latent_norm: true,
        })),
        ..block
    };
    cfg.resolve().map_err(|e| e.to_string())
}

/// One line when mla's latent norms (eps `rms_norm_eps`) and DeepSeek-V2's (eps 1e-6) differ:
/// the two then compute nearly, not exactly, the same.
pub fn latent_eps_caveat(hf: &DeepseekV2Config) -> Option<String> {
    (hf.rms_norm_eps != LATENT_NORM_EPS).then(|| {
        format!(
            "DeepSeek-V2's latent norms use eps {LATENT_NORM_EPS:e} and mla's use norm_eps \
             (rms_norm_eps) {:e}: the logits agree closely, not exactly (train with norm_eps \
             1e-6 for an exact match)",
            hf.rms_norm_eps
        )
    })
}

/// (mla, DeepSeek-V2) names of the tensors that travel as they are.
fn pairs(cfg: &ModelConfig, q_lora: bool) -> Vec<(String, String)> {
    let mut out = vec![
        (EMBEDDING.0.to_string(), EMBEDDING.1.to_string()),
        ("transformer.ln_f.weight".into(), "model.norm.weight".into()),
        (HEAD.0.to_string(), HEAD.1.to_string()),
    ];
    for i in 0..cfg.n_layer {
        let (ours, theirs) = (format!("transformer.h.{i}"), format!("model.layers.{i}"));
        let mut names = vec![
            ("norm_1", "input_layernorm"),
            ("norm_2", "post_attention_layernorm"),
            ("attn.kv_a_norm", "self_attn.kv_a_layernorm"),
            ("attn.kv_b_proj", "self_attn.kv_b_proj"),
            ("attn.proj", "self_attn.o_proj"),
            ("mlp.fc_1", "mlp.gate_proj"),
            ("mlp.fc_2", "mlp.up_proj"),
            ("mlp.proj", "mlp.down_proj"),
        ];
        if q_lora {
            names.push(("attn.q_a_proj", "self_attn.q_a_proj"));
            names.push(("attn.q_a_norm", "self_attn.q_a_layernorm"));
        }
        for (a, b) in names {
            out.push((format!("{ours}.{a}.weight"), format!("{theirs}.{b}.weight")));
        }
    }
    out
}

/// (mla, DeepSeek-V2) names of the weights whose rope rows are permuted: the q projection
/// (`q_b_proj`, or `q_proj` without q compression) and `kv_a_proj_with_mqa`.
fn rope_pairs(cfg: &ModelConfig, q_lora: bool) -> Vec<(String, String, RopeRows)> {
    let q = if q_lora { "q_b_proj" } else { "q_proj" };
    (0..cfg.n_layer)
        .flat_map(|i| {
            [
                (q, RopeRows::PerQueryHead),
                ("kv_a_proj_with_mqa", RopeRows::AfterLatent),
            ]
            .map(|(name, rows)| {
                (
                    format!("transformer.h.{i}.attn.{name}.weight"),
                    format!("model.layers.{i}.self_attn.{name}.weight"),
                    rows,
                )
            })
        })
        .collect()
}

const EMBEDDING: (&str, &str) = ("transformer.wte.weight", "model.embed_tokens.weight");
const HEAD: (&str, &str) = ("lm_head.weight", "lm_head.weight");

/// Where a weight's rope rows are.
#[derive(Clone, Copy)]
enum RopeRows {
    /// The last `qk_rope_head_dim` rows of each head's `qk_head_dim`.
    PerQueryHead,
    /// The last `qk_rope_head_dim` rows, after the `kv_lora_rank` latent rows.
    AfterLatent,
}

/// Rotate-half order → adjacent pairs (`to_pairs`), or back: the `dr` rows from `start` of each
/// of `t`'s `block`-row blocks (each query head's, or kv_a's one block); other rows stay.
fn permute_rope(t: &Tensor, block: i64, start: i64, dr: i64, to_pairs: bool) -> Tensor {
    let cols = t.size()[1];
    let blocks = t.size()[0] / block;
    let t = t.reshape([blocks, block, cols]);
    let rope = t.narrow(1, start, dr);
    let permuted = if to_pairs {
        // row 2j ← j, row 2j+1 ← j + dr/2
        rope.reshape([blocks, 2, dr / 2, cols]).transpose(1, 2)
    } else {
        // row j ← 2j, row j + dr/2 ← 2j+1
        rope.reshape([blocks, dr / 2, 2, cols]).transpose(1, 2)
    }
    .reshape([blocks, dr, cols]);
    Tensor::cat(
        &[
            t.narrow(1, 0, start),
            permuted,
            t.narrow(1, start + dr, block - start - dr),
        ],
        1,
    )
    .reshape([blocks * block, cols])
}

/// `w` (a q projection or `kv_a_proj_with_mqa` of `cfg`, per `rows`) with its rope rows in
/// adjacent pairs (`to_pairs`) or back in rotate-half order; a row count that does not fit
/// `cfg` is an error.
fn permute(
    cfg: &ModelConfig,
    w: &Tensor,
    rows: RopeRows,
    to_pairs: bool,
) -> Result<Tensor, String> {
    let spec = cfg.mla().ok_or("not an MLA model")?;
    let dr = spec.qk_rope_head_dim as i64;
    let (block, start, total) = match rows {
        RopeRows::PerQueryHead => {
            let dq = spec.qk_head_dim() as i64;
            (dq, spec.qk_nope_head_dim as i64, cfg.n_head as i64 * dq)
        }
        RopeRows::AfterLatent => {
            let c = spec.kv_lora_rank as i64;
            (c + dr, c, c + dr)
        }
    };
    if w.size().len() != 2 || w.size()[0] != total {
        return Err(format!("{:?} rows, not {total}", w.size()));
    }
    Ok(permute_rope(w, block, start, dr, to_pairs))
}

/// mla's weights (by litgpt name) as DeepSeek-V2's. `cfg` must have passed [`config`].
pub fn weights_out(
    cfg: &ModelConfig,
    weights: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>, String> {
    let ours = Lookup(weights);
    let q_lora = cfg.mla().is_some_and(|m| m.q_lora_rank.is_some());
    let mut out = Vec::new();
    for (mine, theirs) in pairs(cfg, q_lora) {
        out.push((theirs, ours.get(&mine)?));
    }
    for (mine, theirs, rows) in rope_pairs(cfg, q_lora) {
        let w = permute(cfg, &ours.get(&mine)?, rows, true).map_err(|e| format!("{mine}: {e}"))?;
        out.push((theirs, w));
    }
    Ok(out)
}

/// DeepSeek-V2 weights (by HF name) as mla's (by litgpt name) for `cfg` from
/// [`model_config`]; `tied` when the config ties the output to the input embedding.
pub fn weights_in(
    cfg: &ModelConfig,
    hf: &HashMap<String, Tensor>,
    tied: bool,
) -> Result<HashMap<String, Tensor>, String> {
    let theirs = Lookup(hf);
    let q_lora = cfg.mla().is_some_and(|m| m.q_lora_rank.is_some());
    let mut out = HashMap::new();
    for (ours, name) in pairs(cfg, q_lora) {
        let t = match name.as_str() {
            n if n == HEAD.1 => theirs.head(HEAD.1, EMBEDDING.1, tied)?,
            n => theirs.get(n)?,
        };
        out.insert(ours, t);
    }
    for (ours, name, rows) in rope_pairs(cfg, q_lora) {
        let w =
            permute(cfg, &theirs.get(&name)?, rows, false).map_err(|e| format!("{name}: {e}"))?;
        out.insert(ours, w);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Rope rows go to adjacent pairs and back; nope and latent rows stay where they are.
    #[test]
    fn rope_rows_interleave_and_come_back() {
        // 2 heads of [nope 2 | rope 4], one column: row r holds r.
        let t = Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([12, 1]);
        let out = permute_rope(&t, 6, 2, 4, true);
        let rows = Vec::<f32>::try_from(out.reshape([12])).unwrap();
        assert_eq!(
            rows,
            [0., 1., 2., 4., 3., 5., 6., 7., 8., 10., 9., 11.],
            "head h: nope as is, rope [j, j+2] pairs at 2j, 2j+1"
        );
        assert!(permute_rope(&out, 6, 2, 4, false).equal(&t));
    }

    fn tiny(edit: impl Fn(&mut ModelConfig)) -> ModelConfig {
        let mut cfg = serde_json::from_str::<ModelConfig>(
            r#"{"n_layer": 1, "n_embd": 16, "n_head": 2, "padded_vocab_size": 8,
                "norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP",
                "intermediate_size": 12, "bias": false, "parallel_residual": false,
                "norm_eps": 1e-6,
                "latent_attention": {"q_lora_rank": 4, "kv_lora_rank": 6,
                    "qk_rope_head_dim": 4, "qk_nope_head_dim": 2, "v_head_dim": 3}}"#,
        )
        .unwrap();
        edit(&mut cfg);
        cfg.resolve().unwrap()
    }

    /// Config and weights go to DeepSeek-V2 and come back as they were; only the rope rows
    /// move.
    #[test]
    fn config_and_weights_make_the_round_trip() {
        let cfg = tiny(|_| {});
        let hf = config(&cfg, 0).unwrap();
        assert_eq!((hf.first_k_dense_replace, hf.n_routed_experts), (1, None));
        assert!(latent_eps_caveat(&hf).is_none());
        let back = model_config(&hf, "x").unwrap();
        assert!(
            back.differences(&cfg).is_empty(),
            "{:?}",
            back.differences(&cfg)
        );

        let opts = (Kind::Float, Device::Cpu);
        let mut ours: HashMap<String, Tensor> = pairs(&cfg, true)
            .into_iter()
            .map(|(name, _)| (name, Tensor::randn([3, 2], opts)))
            .collect();
        ours.insert(
            "transformer.h.0.attn.q_b_proj.weight".into(),
            Tensor::randn([12, 4], opts),
        );
        ours.insert(
            "transformer.h.0.attn.kv_a_proj_with_mqa.weight".into(),
            Tensor::randn([10, 16], opts),
        );
        let out: HashMap<String, Tensor> = weights_out(&cfg, &ours).unwrap().into_iter().collect();
        let kv_a = &out["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"];
        let mine = &ours["transformer.h.0.attn.kv_a_proj_with_mqa.weight"];
        assert!(
            kv_a.narrow(0, 0, 6).equal(&mine.narrow(0, 0, 6)),
            "latent rows stay"
        );
        assert!(
            kv_a.get(7).equal(&mine.get(8)),
            "rope row 1 = mla's row 2 (j + Dr/2)"
        );
        let back = weights_in(&cfg, &out, false).unwrap();
        assert_eq!(back.len(), ours.len());
        for (k, t) in &ours {
            assert!(back[k].equal(t), "{k}");
        }
    }

    /// What DeepSeek-V2 cannot hold is refused by field; experts and other eps are named.
    #[test]
    fn other_models_are_refused() {
        let e = config(&tiny(|c| c.bias = true), 0).unwrap_err();
        assert!(e.starts_with("model_config.bias"), "{e}");
        let e = config(&tiny(|c| c.parallel_residual = true), 0).unwrap_err();
        assert!(e.starts_with("model_config.parallel_residual"), "{e}");
        let seed = tiny(|c| c.latent_attention = Some(LatentAttention::Flag(true)));
        assert!(config(&seed, 0).unwrap_err().contains("mapping form"));
        let hub: DeepseekV2Config = serde_json::from_str(
            r#"{"num_hidden_layers": 27, "first_k_dense_replace": 1, "rms_norm_eps": 1e-5}"#,
        )
        .unwrap();
        assert!(model_config(&hub, "x")
            .unwrap_err()
            .contains("mixtures of experts"));
        assert!(latent_eps_caveat(&hub).unwrap().contains("1e-5"));
    }
}
