//! Analytic model figures: the parameter counts of the acceptance list (litgpt's own counts for
//! the same configs), and analytic count == the parameters a built model actually has.

mod common;
use common::*;
use mla_model::stats::{kv_cache_values_per_token, parameters};
use mla_model::{registry, Gpt, LatentAttention, MlaDims, ModelConfig};
use tch::nn::VarStore;
use tch::Device;

fn pythia_160m(latent: Option<LatentAttention>) -> ModelConfig {
    ModelConfig {
        latent_attention: latent,
        n_query_groups: Some(12),
        rotary_percentage: 0.5,
        ..registry::find("pythia-160m").expect("registered")
    }
    .resolve()
    .expect("valid")
}

fn built_parameters(cfg: &ModelConfig) -> usize {
    let vs = VarStore::new(Device::Cpu);
    let _gpt = Gpt::new(&vs.root(), cfg).expect("valid");
    vs.trainable_variables().iter().map(|t| t.numel()).sum()
}

#[test]
fn seed_mla_pythia_160m_has_160221696_parameters_and_544_cached_values_per_layer() {
    let cfg = pythia_160m(Some(LatentAttention::Flag(true)));
    assert_eq!(parameters(&cfg), 160_221_696);
    assert_eq!(kv_cache_values_per_token(&cfg) * 2, 13_056); // 12 layers × 544 × 2 B
}

#[test]
fn mha_pythia_160m_has_162322944_parameters() {
    let cfg = pythia_160m(None);
    assert_eq!(parameters(&cfg), 162_322_944);
    assert_eq!(kv_cache_values_per_token(&cfg) * 2, 36_864);
}

#[test]
fn mla_mapping_pythia_160m_counts_as_litgpt_0_5_13() {
    let cfg = pythia_160m(Some(LatentAttention::Dims(MlaDims {
        q_lora_rank: Some(384),
        kv_lora_rank: 512,
        qk_rope_head_dim: 32,
        qk_nope_head_dim: 32,
        v_head_dim: 64,
        latent_norm: true,
    })));
    assert_eq!(parameters(&cfg), 160_264_704);
}

#[test]
fn analytic_count_equals_built_model_for_every_variant() {
    let mut cfgs = vec![
        tiny(4),
        tiny(2),
        tiny(1),
        tiny_mla_seed(false),
        tiny_mla_seed(true),
        tiny_mla_dims(Some(16)),
        tiny_mla_dims(None),
        tiny_mla_dims_without_latent_norm(),
        ModelConfig {
            mlp_class_name: mla_model::config::MlpClass::LLaMAMLP,
            norm_class_name: mla_model::config::NormClass::RMSNorm,
            parallel_residual: false,
            norm_qk: true,
            bias: false,
            lm_head_bias: true,
            ..tiny(2)
        },
        ModelConfig {
            shared_attention_norm: true,
            ..tiny(4)
        },
        ModelConfig {
            tie_embeddings: true,
            ..tiny(2)
        },
        ModelConfig {
            tie_embeddings: true,
            lm_head_bias: true,
            ..tiny_mla_dims(None)
        },
    ];
    cfgs.extend(["pythia-14m", "pythia-31m"].map(|n| registry::find(n).expect("registered")));
    for cfg in cfgs {
        let cfg = cfg.resolve().expect("valid");
        assert_eq!(
            parameters(&cfg),
            built_parameters(&cfg),
            "{} {}",
            cfg.name,
            cfg.attention_kind().name()
        );
    }
}

#[test]
fn built_seed_mla_pythia_160m_has_the_analytic_count() {
    let cfg = pythia_160m(Some(LatentAttention::Flag(true)));
    assert_eq!(built_parameters(&cfg), 160_221_696);
}
