//! Writing a litgpt 0.5.13 checkpoint directory from an mla checkpoint (`mla export --to
//! litgpt`), which `litgpt generate`, `litgpt chat` and `litgpt evaluate` then read:
//!
//! * `lit_model.pth`: the weights as `torch.save` writes a state dict (through the C++ shim's
//!   `torch::pickle_save`); the names are litgpt's already;
//! * `model_config.yaml`: litgpt's `Config`, every derived field written out;
//! * `tokenizer.json`, and a `tokenizer_config.json` whose bos and eos are the separator mla
//!   put before every training story and before every prompt, with `add_bos_token: true`: so
//!   litgpt prompts the model as mla does, and stops where mla stops;
//! * `prompt_style.yaml`: litgpt's `Default` style (the prompt as given), whatever the name.
//!
//! The directory is written aside and renamed into place: a failed export leaves nothing, and
//! an existing directory is replaced only with `--overwrite`, after the new one is complete.
//!
//! Not here: which models litgpt can build (mla_model::formats::litgpt).

use crate::cxx;
use crate::error::BadInput;
use crate::inference::LoadedModel;
use anyhow::Context;
use std::path::{Path, PathBuf};
use tch::Device;

/// What an export wrote.
pub struct Exported {
    pub tensors: usize,
    pub weight_bytes: u64,
}

/// Write `m` as a litgpt checkpoint directory at `out`.
pub fn export(m: &LoadedModel, out: &Path, overwrite: bool) -> anyhow::Result<Exported> {
    let config = mla_model::formats::litgpt::model_config(m.cfg.model())
        .map_err(|e| BadInput(format!("{}: {e}", m.source)))?;
    if out.exists() && !(overwrite && out.is_dir()) {
        let why = if out.is_dir() {
            "exists (--overwrite replaces it)"
        } else {
            "exists and is not a directory"
        };
        return Err(BadInput(format!("{}: {why}", out.display())).into());
    }
    let staging = sibling(out, "export")?;
    let written = write_all(m, &config, &staging);
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    let exported = written?;
    if out.exists() {
        let old = sibling(out, "replaced")?;
        std::fs::rename(out, &old).with_context(|| format!("moving {} aside", out.display()))?;
        std::fs::rename(&staging, out)
            .with_context(|| format!("renaming {} to {}", staging.display(), out.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        std::fs::rename(&staging, out)
            .with_context(|| format!("renaming {} to {}", staging.display(), out.display()))?;
    }
    Ok(exported)
}

/// `<parent>/.<name>.<what>-<pid>`, next to `out` (same filesystem, so renames are atomic).
fn sibling(out: &Path, what: &str) -> anyhow::Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| BadInput(format!("{}: not a directory name", out.display())))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    Ok(parent.join(format!(
        ".{}.{what}-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

fn write_all(
    m: &LoadedModel,
    config: &mla_model::ModelConfig,
    dir: &Path,
) -> anyhow::Result<Exported> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut vars: Vec<(String, tch::Tensor)> =
        m.vs.variables()
            .into_iter()
            .map(|(name, t)| (name, t.to_device(Device::Cpu).contiguous()))
            .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let weight_bytes = vars
        .iter()
        .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum();
    cxx::save_state_dict(&vars, &dir.join("lit_model.pth"))?;
    let yaml = serde_yaml_ng::to_string(config).context("model_config.yaml")?;
    std::fs::write(dir.join("model_config.yaml"), yaml)?;
    std::fs::write(dir.join("prompt_style.yaml"), PROMPT_STYLE)?;

    let tokenizer_dir = m.tokenizer_dir();
    std::fs::copy(
        tokenizer_dir.join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .context("copying tokenizer.json")?;
    let mut tok_cfg = match std::fs::read(tokenizer_dir.join("tokenizer_config.json")) {
        Ok(bytes) => serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes)
            .context("the checkpoint's tokenizer_config.json")?,
        Err(_) => serde_json::Map::new(),
    };
    let sep = m.tokenizer.separator_token().to_string();
    tok_cfg.insert("add_bos_token".into(), true.into());
    tok_cfg.insert("bos_token".into(), sep.clone().into());
    tok_cfg.insert("eos_token".into(), sep.into());
    // litgpt reads it unconditionally; a tokenizer.json alone is HF's generic fast tokenizer.
    tok_cfg
        .entry("tokenizer_class")
        .or_insert_with(|| "PreTrainedTokenizerFast".into());
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tok_cfg)?,
    )?;
    Ok(Exported {
        tensors: vars.len(),
        weight_bytes,
    })
}

/// litgpt's `Default` prompt style: the prompt goes to the model as given (mla has no chat
/// templates); without it litgpt would guess a style from the model name.
const PROMPT_STYLE: &str = "class_path: litgpt.prompts.Default\n";
