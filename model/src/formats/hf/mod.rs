//! Hugging Face `transformers` forms of mla models, as data: which form holds which model,
//! `config.json` both ways, and the weights by HF name.
//!
//! * [`gpt_neox`]: pythia's block (LayerNorm, GELU MLP), MHA/GQA/MQA;
//! * [`llama`]: the LLaMA block (RMSNorm, SwiGLU, sequential residual, full rotary), MHA/GQA/MQA;
//! * [`deepseek_v2`]: the LLaMA block with MLA (dense DeepSeek-V2).
//!
//! [`HfConfig`] picks the form: for a model by its attention and block, for a `config.json` by
//! its `model_type`. Not here: files (trainer/src/interop/).

pub mod deepseek_v2;
pub mod gpt_neox;
pub mod llama;

use crate::config::{MlpClass, ModelConfig, NormClass};
use std::collections::HashMap;
use tch::Tensor;

pub use deepseek_v2::DeepseekV2Config;
pub use gpt_neox::GptNeoxConfig;
pub use llama::LlamaConfig;

/// A `config.json` of one of the forms mla reads and writes.
#[derive(Debug, Clone, PartialEq)]
pub enum HfConfig {
    GptNeox(GptNeoxConfig),
    Llama(LlamaConfig),
    DeepseekV2(DeepseekV2Config),
}

/// The `model_type`s mla reads, for messages.
const READ: &str = "gpt_neox (pythia), llama and dense deepseek_v2";

impl HfConfig {
    /// The form of the resolved `cfg` (MLA: DeepSeek-V2; else its block decides), with
    /// `separator` as bos and eos, or one line naming what that form cannot express.
    pub fn for_model(cfg: &ModelConfig, separator: u32) -> Result<Self, String> {
        if cfg.mla().is_some() {
            return deepseek_v2::config(cfg, separator).map(HfConfig::DeepseekV2);
        }
        match cfg.mlp_class_name {
            MlpClass::LLaMAMLP => llama::config(cfg, separator).map(HfConfig::Llama),
            _ => gpt_neox::config(cfg, separator).map(HfConfig::GptNeox),
        }
    }

    /// A `config.json`'s text, read as the form its `model_type` names.
    pub fn parse(json: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let model_type = value
            .get("model_type")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        let parsed = match model_type {
            "gpt_neox" => serde_json::from_value(value).map(HfConfig::GptNeox),
            "llama" => serde_json::from_value(value).map(HfConfig::Llama),
            "deepseek_v2" => serde_json::from_value(value).map(HfConfig::DeepseekV2),
            other => {
                return Err(format!(
                    "model_type {other:?}: mla reads {READ} models (and writes them)"
                ))
            }
        };
        parsed.map_err(|e| e.to_string())
    }

    /// The architecture's name, for messages.
    pub fn form(&self) -> &'static str {
        match self {
            HfConfig::GptNeox(_) => "GPTNeoX",
            HfConfig::Llama(_) => "Llama",
            HfConfig::DeepseekV2(_) => "DeepSeek-V2",
        }
    }

    /// One line when mla and this form compute nearly, not exactly, the same model (DeepSeek-V2's
    /// latent norm eps), for a warning.
    pub fn caveat(&self) -> Option<String> {
        match self {
            HfConfig::DeepseekV2(c) => deepseek_v2::latent_eps_caveat(c),
            _ => None,
        }
    }

    /// The `config.json` text.
    pub fn to_json(&self) -> String {
        let text = match self {
            HfConfig::GptNeox(c) => serde_json::to_string_pretty(c),
            HfConfig::Llama(c) => serde_json::to_string_pretty(c),
            HfConfig::DeepseekV2(c) => serde_json::to_string_pretty(c),
        };
        // Plain structs of numbers and strings: serializing cannot fail.
        text.unwrap_or_default()
    }

    /// The mla model (litgpt's fields, resolved) named `name`, or one line naming what mla
    /// cannot build.
    pub fn model_config(&self, name: &str) -> Result<ModelConfig, String> {
        match self {
            HfConfig::GptNeox(c) => gpt_neox::model_config(c, name),
            HfConfig::Llama(c) => llama::model_config(c, name),
            HfConfig::DeepseekV2(c) => deepseek_v2::model_config(c, name),
        }
    }

    /// mla's weights (by litgpt name) as this form's, for the `cfg` it was made from.
    pub fn weights_out(
        &self,
        cfg: &ModelConfig,
        weights: &HashMap<String, Tensor>,
    ) -> Result<Vec<(String, Tensor)>, String> {
        match self {
            HfConfig::GptNeox(_) => gpt_neox::weights_out(cfg, weights),
            HfConfig::Llama(_) => llama::weights_out(cfg, weights),
            HfConfig::DeepseekV2(_) => deepseek_v2::weights_out(cfg, weights),
        }
    }

    /// This form's weights (by HF name) as mla's, for `cfg` from [`HfConfig::model_config`].
    pub fn weights_in(
        &self,
        cfg: &ModelConfig,
        weights: &HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>, String> {
        match self {
            HfConfig::GptNeox(c) => gpt_neox::weights_in(cfg, weights, c.tie_word_embeddings),
            HfConfig::Llama(c) => llama::weights_in(cfg, weights, c.tie_word_embeddings),
            HfConfig::DeepseekV2(c) => deepseek_v2::weights_in(cfg, weights, c.tie_word_embeddings),
        }
    }
}

/// Options of litgpt's `Config` that no Hugging Face form mla writes has: one line naming the
/// first one `cfg` sets, with the form's name.
pub(crate) fn check_shared_options(cfg: &ModelConfig, form: &str) -> Result<(), String> {
    let qk = cfg.sdpa_head_dims().0;
    for (key, unsupported) in [
        ("shared_attention_norm", cfg.shared_attention_norm),
        ("lm_head_bias", cfg.lm_head_bias),
        ("scale_embeddings", cfg.scale_embeddings),
        ("rope_condense_ratio", cfg.rope_condense_ratio != 1),
        (
            "attention_scores_scalar",
            cfg.attention_scores_scalar.is_some_and(|s| s != qk),
        ),
    ] {
        if unsupported {
            return Err(format!("model_config.{key}: {form} has no such option"));
        }
    }
    Ok(())
}

/// The LLaMA block's checks, for Llama and DeepSeek-V2 alike: RMSNorm, SwiGLU, sequential
/// residual, or one line naming the field `cfg` sets otherwise.
pub(crate) fn check_llama_block(cfg: &ModelConfig, form: &str) -> Result<(), String> {
    let refuse = |key: &str, why: String| Err(format!("model_config.{key}: {why}"));
    if cfg.norm_class_name != NormClass::RMSNorm {
        return refuse("norm_class_name", format!("{form} has RMSNorm only"));
    }
    if cfg.mlp_class_name != MlpClass::LLaMAMLP {
        return refuse(
            "mlp_class_name",
            format!("{form} has LLaMAMLP (SwiGLU) only"),
        );
    }
    if cfg.parallel_residual {
        return refuse(
            "parallel_residual",
            format!("{form}'s residual is sequential"),
        );
    }
    Ok(())
}

/// The [`LlamaBlock`] of a Llama or DeepSeek-V2 config (their fields share names).
macro_rules! llama_block {
    ($hf:expr) => {
        $crate::formats::hf::LlamaBlock {
            hidden_act: &$hf.hidden_act,
            rope_scaling: $hf.rope_scaling.is_some(),
            max_position_embeddings: $hf.max_position_embeddings,
            num_hidden_layers: $hf.num_hidden_layers,
            hidden_size: $hf.hidden_size,
            vocab_size: $hf.vocab_size,
            rms_norm_eps: $hf.rms_norm_eps,
            num_attention_heads: $hf.num_attention_heads,
            rope_theta: $hf.rope_theta,
            intermediate_size: $hf.intermediate_size,
        }
    };
}
pub(crate) use llama_block;

/// What a LLaMA-block `config.json` (Llama, DeepSeek-V2) says of the model, by its fields.
pub(crate) struct LlamaBlock<'a> {
    pub hidden_act: &'a str,
    pub rope_scaling: bool,
    pub max_position_embeddings: usize,
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub num_attention_heads: usize,
    pub rope_theta: f64,
    pub intermediate_size: usize,
}

impl LlamaBlock<'_> {
    /// litgpt's fields of this block (the form adds its attention's), or one line naming what
    /// mla cannot build.
    pub fn model_config(&self, name: &str) -> Result<ModelConfig, String> {
        if self.rope_scaling {
            return Err("rope_scaling: mla has no RoPE scaling".into());
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?}: mla's LLaMAMLP is SwiGLU (silu)",
                self.hidden_act
            ));
        }
        if self.num_attention_heads == 0 {
            return Err("num_attention_heads: must be positive".into());
        }
        Ok(ModelConfig {
            name: name.to_string(),
            block_size: self.max_position_embeddings,
            n_layer: self.num_hidden_layers,
            n_embd: self.hidden_size,
            vocab_size: self.vocab_size,
            padded_vocab_size: Some(self.vocab_size),
            norm_class_name: NormClass::RMSNorm,
            norm_eps: self.rms_norm_eps,
            parallel_residual: false,
            n_head: self.num_attention_heads,
            rope_base: self.rope_theta,
            intermediate_size: Some(self.intermediate_size),
            mlp_class_name: MlpClass::LLaMAMLP,
            ..ModelConfig::default()
        })
    }
}

/// Tensors by name, with the errors and fallbacks both directions need.
pub(crate) struct Lookup<'a>(pub &'a HashMap<String, Tensor>);

impl Lookup<'_> {
    pub fn get(&self, name: &str) -> Result<Tensor, String> {
        self.0
            .get(name)
            .map(Tensor::shallow_clone)
            .ok_or_else(|| format!("no tensor {name}"))
    }

    /// The LM head `head`, or the input embedding `embedding` where the config ties them
    /// (`tied`) and the file leaves the head out.
    pub fn head(&self, head: &str, embedding: &str, tied: bool) -> Result<Tensor, String> {
        match self.0.get(head) {
            Some(t) => Ok(t.shallow_clone()),
            None if tied => self.get(embedding),
            None => Err(format!("no tensor {head}")),
        }
    }

    /// The bias `name`, or zeros of `weight`'s output width where the model has none.
    pub fn bias_or_zeros(&self, name: &str, weight: &Tensor) -> Tensor {
        self.0
            .get(name)
            .map(Tensor::shallow_clone)
            .unwrap_or_else(|| Tensor::zeros([weight.size()[0]], (weight.kind(), weight.device())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each model_type lands in its form; any other is refused by name, before its fields are
    /// read.
    #[test]
    fn config_json_is_read_as_its_model_type() {
        let neox = HfConfig::parse(r#"{"model_type": "gpt_neox", "hidden_size": 64}"#).unwrap();
        assert_eq!(neox.form(), "GPTNeoX");
        let llama =
            HfConfig::parse(r#"{"model_type": "llama", "num_key_value_heads": null}"#).unwrap();
        assert_eq!(llama.form(), "Llama");
        let ds = HfConfig::parse(r#"{"model_type": "deepseek_v2", "q_lora_rank": null}"#).unwrap();
        assert!(matches!(ds, HfConfig::DeepseekV2(ref c) if c.q_lora_rank.is_none()));
        let e =
            HfConfig::parse(r#"{"model_type": "mistral", "sliding_window": 4096}"#).unwrap_err();
        assert!(e.starts_with("model_type \"mistral\""), "{e}");
        assert!(HfConfig::parse("{").is_err());
    }
}
