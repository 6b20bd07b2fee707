//! litgpt 0.5.13's checkpoint as data: mla builds its modules under litgpt's parameter names,
//! so a state dict needs no renaming; what is left is which models litgpt can build and the
//! `Config` it reads from `model_config.yaml`.
//!
//! litgpt builds MHA/GQA/MQA and the mapping form of `latent_attention` (RMSNorm on both
//! latents, biases per `bias`/`attn_bias`). The seed's `latent_attention: true` (latent norms
//! of `norm_class_name` only with `norm_qk`, no bias in any MLA linear) has a litgpt form only
//! where it computes what its mapping would (`norm_qk` with RMSNorm, no bias): it goes out as
//! that mapping.

use crate::config::{LatentAttention, MlaDims, ModelConfig};

/// The litgpt `Config` of the resolved `cfg` (every derived field written out, nothing litgpt
/// would not accept), or one line saying why litgpt cannot build it.
pub fn model_config(cfg: &ModelConfig) -> Result<ModelConfig, String> {
    if cfg.latent_attention == Some(LatentAttention::Flag(true)) {
        let Some(m) = cfg.mla() else {
            unreachable!("latent_attention: true builds an MLA")
        };
        let dims = MlaDims {
            q_lora_rank: m.q_lora_rank,
            kv_lora_rank: m.kv_lora_rank,
            qk_rope_head_dim: m.qk_rope_head_dim,
            qk_nope_head_dim: m.qk_nope_head_dim,
            v_head_dim: m.v_head_dim,
            latent_norm: true,
        };
        let mapping = ModelConfig {
            latent_attention: Some(LatentAttention::Dims(dims)),
            ..cfg.clone()
        };
        if mapping.mla() == cfg.mla() {
            return Ok(mapping);
        }
        return Err(format!(
            "model_config.latent_attention: true is the seed's MLA, which litgpt cannot build \
             (its latents have no RMSNorm and its MLA linears no biases, where litgpt's have \
             both); train the mapping form instead (these dimensions: latent_attention: \
             {{q_lora_rank: {}, kv_lora_rank: {}, qk_rope_head_dim: {}, qk_nope_head_dim: {}, \
             v_head_dim: {}}})",
            m.q_lora_rank.map_or("null".into(), |r| r.to_string()),
            m.kv_lora_rank,
            m.qk_rope_head_dim,
            m.qk_nope_head_dim,
            m.v_head_dim
        ));
    }
    if let Some(LatentAttention::Dims(d)) = cfg.latent_attention {
        if !d.latent_norm {
            return Err(
                "model_config.latent_attention.latent_norm: false is mla's own (latents without \
                 RMSNorm, as a model converted from MHA has them); litgpt's MLA always normalizes \
                 its latents"
                    .into(),
            );
        }
    }
    Ok(cfg.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(json: &str) -> ModelConfig {
        serde_json::from_str::<ModelConfig>(json)
            .unwrap()
            .resolve()
            .unwrap()
    }

    #[test]
    fn ordinary_and_mapping_mla_configs_pass_and_the_seeds_mla_is_refused_naming_its_mapping() {
        let mha = resolved(r#"{"n_embd": 64, "n_head": 4, "n_query_groups": 2}"#);
        assert_eq!(model_config(&mha).unwrap(), mha);
        let mapping = resolved(
            r#"{"n_embd": 64, "n_head": 4, "latent_attention": {"q_lora_rank": null,
                "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                "v_head_dim": 16}}"#,
        );
        assert_eq!(model_config(&mapping).unwrap(), mapping);
        let seed = resolved(r#"{"n_embd": 768, "n_head": 12, "latent_attention": true}"#);
        let e = model_config(&seed).unwrap_err();
        assert!(
            e.contains("latent_attention: true")
                && e.contains("kv_lora_rank: 512")
                && e.contains("q_lora_rank: 384"),
            "{e}"
        );
        // With RMS-normed latents and no bias it computes its mapping, and goes out as that.
        let exact = resolved(
            r#"{"n_embd": 768, "n_head": 12, "latent_attention": true, "norm_qk": true,
                "norm_class_name": "RMSNorm", "bias": false}"#,
        );
        let out = model_config(&exact).unwrap();
        assert!(
            matches!(out.latent_attention, Some(LatentAttention::Dims(d))
            if d.kv_lora_rank == 512 && d.q_lora_rank == Some(384))
        );
        assert_eq!(out.mla(), exact.mla());
        // mla's own latent_norm: false has no litgpt form.
        let bare = resolved(
            r#"{"n_embd": 64, "n_head": 4, "latent_attention": {"q_lora_rank": null,
                "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                "v_head_dim": 16, "latent_norm": false}}"#,
        );
        assert!(model_config(&bare)
            .unwrap_err()
            .contains("latent_norm: false"));
    }
}
