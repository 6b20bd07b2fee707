//! Figures derived from a config without building the model: parameter count, training
//! FLOPs per token, inference-cache bytes per token, SDPA head dims. `mla info` prints these;
//! tests check the parameter count against a built model.

use crate::config::{AttentionKind, MlpClass, ModelConfig, NormClass};

// Counts saturate instead of wrapping: a config read from outside (a downloaded
// model_config.yaml) may name dimensions whose product passes usize, and its count is what
// refuses to build such a model (`inference::build`).

fn mul(a: usize, b: usize) -> usize {
    a.saturating_mul(b)
}

fn linear(in_dim: usize, out_dim: usize, bias: bool) -> usize {
    mul(in_dim, out_dim).saturating_add(if bias { out_dim } else { 0 })
}

fn norm(kind: NormClass, size: usize) -> usize {
    match kind {
        NormClass::LayerNorm => mul(2, size),
        NormClass::RMSNorm => size,
    }
}

/// Sum of counts, saturating.
fn sum(parts: &[usize]) -> usize {
    parts.iter().fold(0usize, |a, &b| a.saturating_add(b))
}

/// Parameters of one attention module.
pub fn attention_parameters(cfg: &ModelConfig) -> usize {
    let (c, h, hs) = (cfg.n_embd, cfg.n_head, cfg.head_size());
    match cfg.attention_kind() {
        AttentionKind::Mla(m) => {
            let q = match m.q_lora_rank {
                Some(r) => sum(&[
                    linear(c, r, m.down_bias),
                    m.latent_norm.map_or(0, |k| norm(k, r)),
                    linear(r, mul(h, m.qk_head_dim()), m.up_bias),
                ]),
                None => linear(c, mul(h, m.qk_head_dim()), m.up_bias),
            };
            sum(&[
                q,
                linear(
                    c,
                    m.kv_lora_rank.saturating_add(m.qk_rope_head_dim),
                    m.down_bias,
                ),
                m.latent_norm.map_or(0, |k| norm(k, m.kv_lora_rank)),
                linear(
                    m.kv_lora_rank,
                    mul(h, m.qk_nope_head_dim.saturating_add(m.v_head_dim)),
                    m.up_bias,
                ),
                linear(mul(h, m.v_head_dim), c, m.up_bias),
            ])
        }
        _ => {
            let g = cfg.n_query_groups();
            let qk_norms = if cfg.norm_qk {
                mul(2, norm(cfg.norm_class_name, hs))
            } else {
                0
            };
            sum(&[
                linear(
                    c,
                    mul(h.saturating_add(mul(2, g)), hs),
                    cfg.bias || cfg.attn_bias,
                ),
                linear(mul(h, hs), c, cfg.bias),
                qk_norms,
            ])
        }
    }
}

fn mlp_parameters(cfg: &ModelConfig) -> usize {
    let (c, i, b) = (cfg.n_embd, cfg.intermediate_size(), cfg.bias);
    match cfg.mlp_class_name {
        MlpClass::GptNeoxMLP => linear(c, i, b).saturating_add(linear(i, c, b)),
        MlpClass::LLaMAMLP => mul(2, linear(c, i, b)).saturating_add(linear(i, c, b)),
    }
}

/// Parameters of the whole model (the LM head's matrix counted once more unless tied to the
/// embedding's).
pub fn parameters(cfg: &ModelConfig) -> usize {
    let (c, v) = (cfg.n_embd, cfg.padded_vocab_size());
    let norms_per_block = if cfg.shared_attention_norm { 1 } else { 2 };
    let block = sum(&[
        mul(norms_per_block, norm(cfg.norm_class_name, c)),
        attention_parameters(cfg),
        mlp_parameters(cfg),
    ]);
    let head = if cfg.tie_embeddings {
        usize::from(cfg.lm_head_bias) * v
    } else {
        linear(c, v, cfg.lm_head_bias)
    };
    sum(&[
        mul(v, c),
        mul(cfg.n_layer, block),
        norm(cfg.norm_class_name, c),
        head,
    ])
}

/// Training FLOPs per token (forward + backward), PaLM appendix B: 6·N + 6·L·H·T·(Dqk + Dv),
/// N = parameters except the input embedding (a tied LM head's matrix still multiplies), T =
/// block_size, the attention term without causal halving (12·L·H·Q·T for Dqk = Dv = Q).
pub fn flops_per_token(cfg: &ModelConfig) -> f64 {
    let embedding = if cfg.tie_embeddings {
        0
    } else {
        cfg.padded_vocab_size() * cfg.n_embd
    };
    let n = (parameters(cfg) - embedding) as f64;
    let (dqk, dv) = cfg.sdpa_head_dims();
    let attn = 6.0 * (cfg.n_layer * cfg.n_head * cfg.block_size * (dqk + dv)) as f64;
    6.0 * n + attn
}

/// Inference-cache values per token over all layers: 2·G·hs per layer for K/V caches,
/// kv_lora_rank + qk_rope_head_dim per layer for the compressed MLA cache.
pub fn kv_cache_values_per_token(cfg: &ModelConfig) -> usize {
    let per_layer = match cfg.attention_kind() {
        AttentionKind::Mla(m) => m.compressed_cache_width(),
        _ => 2 * cfg.n_query_groups() * cfg.head_size(),
    };
    cfg.n_layer * per_layer
}

/// q/k and v head dims of the absorbed MLA decode's attention (latent + rope, latent).
pub fn absorbed_head_dims(cfg: &ModelConfig) -> Option<(usize, usize)> {
    match cfg.attention_kind() {
        AttentionKind::Mla(m) => Some((m.compressed_cache_width(), m.kv_lora_rank)),
        _ => None,
    }
}
