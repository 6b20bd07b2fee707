//! Writing a litgpt 0.5.13 checkpoint directory from an mla checkpoint (`mla export --to
//! litgpt`), which `litgpt generate`, `litgpt chat` and `litgpt evaluate` then read:
//!
//! * `lit_model.pth`: the weights as `torch.save` writes a state dict (through the C++ shim:
//!   libtorch's pickler and zip writer); the names are litgpt's already;
//! * `model_config.yaml`: litgpt's `Config`, every derived field written out;
//! * `tokenizer.json`, and a `tokenizer_config.json` whose bos and eos are the separator mla
//!   put before every training story and before every prompt, with `add_bos_token: true`: so
//!   litgpt prompts the model as mla does, and stops where mla stops;
//! * `prompt_style.yaml`: litgpt's `Default` style (the prompt as given), whatever the name.
//!
//! Not here: which models litgpt can build (mla_model::formats::litgpt); the staging directory
//! and the tokenizer files (interop/mod.rs).

use super::load::LoadedModel;
use super::{cpu_weights, weight_bytes, write_dir, write_tokenizer, Exported};
use crate::cxx;
use crate::error::BadInput;
use anyhow::Context;
use std::path::Path;

/// Write `m` as a litgpt checkpoint directory at `out`.
pub fn export(m: &LoadedModel, out: &Path, overwrite: bool) -> anyhow::Result<Exported> {
    let config = mla_model::formats::litgpt::model_config(m.cfg.model())
        .map_err(|e| BadInput(format!("{}: {e}", m.source)))?;
    write_dir(out, overwrite, |dir| {
        let weights = cpu_weights(m);
        cxx::save_state_dict(&weights, &dir.join("lit_model.pth"))?;
        let yaml = serde_yaml_ng::to_string(&config).context("model_config.yaml")?;
        std::fs::write(dir.join("model_config.yaml"), yaml)?;
        std::fs::write(dir.join("prompt_style.yaml"), PROMPT_STYLE)?;
        write_tokenizer(m, dir)?;
        Ok(Exported {
            form: "litgpt",
            tensors: weights.len(),
            weight_bytes: weight_bytes(&weights),
        })
    })
}

/// litgpt's `Default` prompt style: the prompt goes to the model as given (mla has no chat
/// templates); without it litgpt would guess a style from the model name.
const PROMPT_STYLE: &str = "class_path: litgpt.prompts.Default\n";
