//! Writing a Hugging Face model directory from an mla checkpoint (`mla export --to hf`), which
//! `transformers` loads with `AutoModelForCausalLM.from_pretrained`:
//!
//! * `config.json` and `model.safetensors` of a `GPTNeoXForCausalLM` (pythia's block) or a
//!   `LlamaForCausalLM` (the LLaMA block) for MHA, GQA and MQA models, and of a dense
//!   `DeepseekV2ForCausalLM` for MLA models of the LLaMA block (mla_model::formats::hf says
//!   which form holds which model, and how the weights are laid out);
//! * `tokenizer.json`, `tokenizer_config.json` (bos = eos = mla's separator, prepended) and
//!   `generation_config.json` with the same ids.
//!
//! Not here: the config and weight maps (mla_model::formats::hf); the staging directory and
//! the tokenizer files (interop/mod.rs).

use super::load::LoadedModel;
use super::{cpu_weights, weight_bytes, write_dir, write_tokenizer, Exported};
use crate::error::BadInput;
use anyhow::Context;
use mla_model::formats::hf::HfConfig;
use std::collections::HashMap;
use std::path::Path;

/// Write `m` as a Hugging Face model directory at `out`, in the form its block takes.
pub fn export(m: &LoadedModel, out: &Path, overwrite: bool) -> anyhow::Result<Exported> {
    let cfg = m.cfg.model();
    let sep = m.tokenizer.separator_id();
    let config = HfConfig::for_model(cfg, sep)
        .map_err(|e| BadInput(format!("{}: Hugging Face: {e}", m.source)))?;
    if let Some(caveat) = config.caveat() {
        tracing::warn!("{}: {caveat}", m.source);
    }
    let ours: HashMap<String, tch::Tensor> = cpu_weights(m).into_iter().collect();
    let weights = config
        .weights_out(cfg, &ours)
        .map_err(|e| anyhow::anyhow!("{}: {e}", m.source))?
        .into_iter()
        .map(|(name, t)| (name, t.contiguous()))
        .collect::<Vec<_>>();
    write_dir(out, overwrite, |dir| {
        std::fs::write(dir.join("config.json"), config.to_json())?;
        write_safetensors(&weights, &dir.join("model.safetensors"))?;
        write_tokenizer(m, dir)?;
        let generation = serde_json::json!({ "bos_token_id": sep, "eos_token_id": sep });
        std::fs::write(
            dir.join("generation_config.json"),
            serde_json::to_string_pretty(&generation)?,
        )?;
        Ok(Exported {
            form: config.form(),
            tensors: weights.len(),
            weight_bytes: weight_bytes(&weights),
        })
    })
}

/// `model.safetensors` with `format: pt` in its metadata, as `transformers` expects.
fn write_safetensors(tensors: &[(String, tch::Tensor)], path: &Path) -> anyhow::Result<()> {
    let bytes = super::safetensors_bytes(tensors)?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}
