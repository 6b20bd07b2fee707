//! Models to and from other programs' files. What each format can hold, and its configs and
//! key maps, are pure data in `mla_model::formats`; here are the files.
//!
//! * [`litgpt`]: writing a litgpt checkpoint directory (`mla export --to litgpt`);
//! * [`hf`]: writing a Hugging Face model directory (`mla export --to hf`);
//! * [`import`]: reading litgpt and Hugging Face model directories (generate, eval,
//!   `initial_checkpoint_dir`), with `torch_save` reading `torch.save` files;
//! * [`load`]: any of those, or an mla step, as a model ready for inference;
//! * [`download`]: fetching a Hugging Face model directory from the hub (`mla download`);
//! * here: what both share: the directory written aside and renamed into place, and the
//!   tokenizer files.

pub mod download;
pub mod hf;
pub mod import;
pub mod litgpt;
pub mod load;
mod torch_save;

use crate::error::BadInput;
use crate::tensors::kind_to_dtype;
use anyhow::Context;
use load::LoadedModel;
use safetensors::tensor::TensorView;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What an export wrote.
pub struct Exported {
    /// The format's architecture: "litgpt", or the Hugging Face form ("GPTNeoX", "Llama").
    pub form: &'static str,
    pub tensors: usize,
    pub weight_bytes: u64,
}

/// Make the directory `out` with `fill`, which writes into a staging directory beside it that
/// is then renamed into place: a failed export leaves nothing, and an existing directory is
/// replaced (only with `overwrite`) once the new one is complete.
pub(crate) fn write_dir<T>(
    out: &Path,
    overwrite: bool,
    fill: impl FnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    if out.exists() && !(overwrite && out.is_dir()) {
        let why = if out.is_dir() {
            "exists (--overwrite replaces it)"
        } else {
            "exists and is not a directory"
        };
        return Err(BadInput(format!("{}: {why}", out.display())).into());
    }
    let staging = sibling(out, "export")?;
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let filled = fill(&staging);
    if filled.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    let value = filled?;
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to)
            .with_context(|| format!("renaming {} to {}", from.display(), to.display()))
    };
    if out.exists() {
        let old = sibling(out, "replaced")?;
        rename(out, &old)?;
        rename(&staging, out)?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        rename(&staging, out)?;
    }
    Ok(value)
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

/// `tokenizer.json`, and a `tokenizer_config.json` (the checkpoint's, when it has one) whose
/// bos and eos are the separator mla put before every training story and every prompt, with
/// `add_bos_token: true`: litgpt and transformers then prompt the model as mla does, and stop
/// where mla stops.
pub(crate) fn write_tokenizer(m: &LoadedModel, dir: &Path) -> anyhow::Result<()> {
    let from = m.tokenizer_dir();
    std::fs::copy(from.join("tokenizer.json"), dir.join("tokenizer.json"))
        .context("copying tokenizer.json")?;
    let mut config = match std::fs::read(from.join("tokenizer_config.json")) {
        Ok(bytes) => serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes)
            .context("the checkpoint's tokenizer_config.json")?,
        Err(_) => serde_json::Map::new(),
    };
    let sep = m.tokenizer.separator_token().to_string();
    config.insert("add_bos_token".into(), true.into());
    config.insert("bos_token".into(), sep.clone().into());
    config.insert("eos_token".into(), sep.into());
    // litgpt reads it unconditionally; a tokenizer.json alone is HF's generic fast tokenizer.
    config
        .entry("tokenizer_class")
        .or_insert_with(|| "PreTrainedTokenizerFast".into());
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}

/// The model's weights by litgpt name, on the CPU and contiguous, sorted by name.
pub(crate) fn cpu_weights(m: &LoadedModel) -> Vec<(String, tch::Tensor)> {
    let mut vars: Vec<(String, tch::Tensor)> =
        m.vs.variables()
            .into_iter()
            .map(|(name, t)| (name, t.to_device(tch::Device::Cpu).contiguous()))
            .collect();
    if m.cfg.model().tie_embeddings {
        // The store holds the tied matrix once, as the embedding; every format mla writes
        // has the head as a tensor of its own (litgpt's state dict holds both keys too).
        if let Some((_, wte)) = vars.iter().find(|(n, _)| n == "transformer.wte.weight") {
            let head = wte.copy();
            vars.push(("lm_head.weight".into(), head));
        }
    }
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Bytes of `tensors`' data.
pub(crate) fn weight_bytes(tensors: &[(String, tch::Tensor)]) -> u64 {
    tensors
        .iter()
        .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum()
}

/// `tensors` as safetensors bytes, with `format: pt` in the metadata (as `transformers`
/// expects; mla's own reader ignores it).
pub(crate) fn safetensors_bytes(tensors: &[(String, tch::Tensor)]) -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.contiguous();
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel)?;
        let shape = t.size().iter().map(|&d| d as usize).collect::<Vec<_>>();
        data.push((name.clone(), kind_to_dtype(t.kind())?, shape, bytes));
    }
    let views = data
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.as_str(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .context("model.safetensors")?;
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::tensor::serialize(views, meta).context("model.safetensors")
}
