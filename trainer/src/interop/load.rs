//! Loading a model for inference (`mla generate`, `mla eval`, `mla export`, `mla convert`): an
//! mla step is verified through the store (local path or URL), its resolved config rebuilds
//! the model, weights are copied in by litgpt key, and its tokenizer files are materialised in
//! a temp dir. A litgpt or Hugging Face model directory is read through [`super::import`].
//!
//! Not here: training resume (checkpoint/), the `--precision` settings (inference.rs).

use super::import::{self, Framing};
use crate::checkpoint::{CONFIG_FILE, MODEL_FILE, TOKENIZER_FILES};
use crate::config::RunConfig;
use crate::data::Tokenizer;
use crate::error::BadInput;
use anyhow::Context;
use mla_model::{stats, Gpt};
use mla_storage::BlockingCheckpointStore;
use std::collections::HashMap;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// A model ready for inference, with what came with it.
pub struct LoadedModel {
    pub cfg: RunConfig,
    pub model: Gpt,
    pub tokenizer: Tokenizer,
    pub vs: VarStore,
    /// Where it came from, for messages.
    pub source: String,
    /// mla's steps: the separator before every prompt and as the stop token, as in training;
    /// litgpt and Hugging Face directories: what litgpt's tokenizer does with them.
    pub framing: Framing,
    tokenizer_files: tempfile::TempDir,
}

impl LoadedModel {
    /// The directory holding the checkpoint's tokenizer files (a temp dir, alive with `self`).
    pub fn tokenizer_dir(&self) -> &std::path::Path {
        self.tokenizer_files.path()
    }
}

/// Load `step_dir` (e.g. `out/pretrain/mla/final`, `s3://bucket/run/step-00000400`) onto
/// `device` in `kind` (fp32 or bf16). A litgpt or Hugging Face model directory is read too
/// (interop/import.rs).
pub fn load(step_dir: &str, device: Device, kind: Kind) -> anyhow::Result<LoadedModel> {
    if let Some(source) = import::detect(step_dir) {
        return load_foreign(step_dir, source, device, kind);
    }
    let (store, step) = BlockingCheckpointStore::resolve(step_dir)
        .map_err(|e| BadInput(format!("{step_dir}: not a checkpoint directory ({e})")))?;
    let loaded = store
        .load_step(&step)
        .map_err(|e| BadInput(format!("{step_dir}: {e}")))?;
    let object = |name: &str| {
        loaded
            .object(name)
            .ok_or_else(|| BadInput(format!("{step_dir}: checkpoint has no {name}")))
    };
    let yaml = String::from_utf8_lossy(object(CONFIG_FILE)?).into_owned();
    let cfg = RunConfig::from_yaml(&yaml, &format!("{step_dir}/{CONFIG_FILE}"), &[])?;
    let tokenizer_dir = tempfile::tempdir().context("temp dir for the tokenizer")?;
    for name in TOKENIZER_FILES {
        if let Some(bytes) = loaded.object(name) {
            std::fs::write(tokenizer_dir.path().join(name), bytes)?;
        }
    }
    let tokenizer = Tokenizer::from_dir(tokenizer_dir.path())
        .map_err(|e| BadInput(format!("{step_dir}: tokenizer: {e}")))?;

    let (tensors, _) =
        crate::tensors::from_safetensors(object(MODEL_FILE)?, &format!("{step_dir}/{MODEL_FILE}"))?;
    let (vs, model) = build(
        &cfg,
        &tensors,
        &format!("{step_dir}/{MODEL_FILE}"),
        device,
        kind,
    )?;
    let sep = tokenizer.separator_id();
    Ok(LoadedModel {
        cfg,
        model,
        tokenizer,
        vs,
        source: format!("{}/{}", store.url().trim_end_matches('/'), step),
        framing: Framing {
            bos: Some(sep),
            stop: Some(sep),
        },
        tokenizer_files: tokenizer_dir,
    })
}

/// A litgpt or Hugging Face model directory, with its own tokenizer files.
fn load_foreign(
    location: &str,
    source: import::Source,
    device: Device,
    kind: Kind,
) -> anyhow::Result<LoadedModel> {
    let foreign = import::read(location, source)?;
    let what = format!("{} ({} model)", foreign.dir.display(), source.name());
    // A run config around the model, validated as any other.
    let yaml = serde_yaml_ng::to_string(&serde_json::json!({ "model_config": &foreign.model }))
        .context("model config")?;
    let cfg = RunConfig::from_yaml(&yaml, &what, &[])?;
    let tokenizer_dir = tempfile::tempdir().context("temp dir for the tokenizer")?;
    for name in TOKENIZER_FILES {
        let from = foreign.dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, tokenizer_dir.path().join(name))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    let tokenizer = Tokenizer::from_dir(tokenizer_dir.path())
        .map_err(|e| BadInput(format!("{what}: tokenizer: {e}")))?;
    let framing = import::litgpt_framing(&foreign.dir, &tokenizer)?;
    let (vs, model) = build(&cfg, &foreign.weights, &what, device, kind)?;
    Ok(LoadedModel {
        cfg,
        model,
        tokenizer,
        vs,
        source: what,
        framing,
        tokenizer_files: tokenizer_dir,
    })
}

/// The model of `cfg` with `tensors` (by litgpt name) copied in, on `device` in `kind`.
pub fn build(
    cfg: &RunConfig,
    tensors: &HashMap<String, Tensor>,
    what: &str,
    device: Device,
    kind: Kind,
) -> anyhow::Result<(VarStore, Gpt)> {
    // The config may come from the same stranger as the weights: a model_config.yaml naming
    // n_embd 2^20 would allocate hundreds of GiB before any shape is compared. A model needs
    // at least as many values as the weights hold, so a bigger one is refused unbuilt.
    let needed = stats::parameters(cfg.model());
    let held = tensors
        .values()
        .fold(0usize, |n, t| n.saturating_add(t.numel()));
    if needed > held {
        return Err(BadInput(format!(
            "{what}: its config describes a model of {needed} parameters, its weights hold {held} values"
        ))
        .into());
    }
    let mut vs = VarStore::new(device);
    let model = Gpt::new(&vs.root(), cfg.model())?;
    let vars = vs.variables();
    tch::no_grad(|| -> anyhow::Result<()> {
        for (name, var) in &vars {
            let t = tensors
                .get(name)
                .ok_or_else(|| BadInput(format!("{what}: missing tensor {name}")))?;
            if t.size() != var.size() {
                return Err(BadInput(format!(
                    "{what}: {name} has shape {:?}, config says {:?}",
                    t.size(),
                    var.size()
                ))
                .into());
            }
            var.shallow_clone().copy_(t);
        }
        Ok(())
    })?;
    if kind == Kind::BFloat16 {
        vs.bfloat16();
    }
    vs.freeze();
    Ok((vs, model))
}
