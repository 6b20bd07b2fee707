//! Reading other programs' model directories, so that `initial_checkpoint_dir`, `mla generate`,
//! `mla eval` and `mla ckpt logits` take them where they take an mla step:
//!
//! * litgpt: `lit_model.pth` (a `torch.save` state dict, or litgpt's training checkpoint whose
//!   `model` entry is one) with `model_config.yaml`;
//! * Hugging Face: `config.json` of a GPTNeoX (pythia), a Llama or a dense DeepSeek-V2 (MLA)
//!   with `model.safetensors`, a sharded `model.safetensors.index.json`, `pytorch_model.bin`
//!   or its shards (`pytorch_model.bin.index.json`).
//!
//! Both bring their tokenizer files along (tokenizer.json, tokenizer_config.json). Weights come
//! in as fp32, by litgpt name. Local directories only; an mla step (manifest.json) is never
//! taken for one of these.
//!
//! Not here: the config and layout maps (mla_model::formats).

use super::torch_save;
use crate::data::Tokenizer;
use crate::error::BadInput;
use crate::tensors::from_safetensors;
use anyhow::Context;
use mla_model::formats::hf::HfConfig;
use mla_model::ModelConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Whose layout a model directory has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Litgpt,
    HuggingFace,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Litgpt => "litgpt",
            Source::HuggingFace => "Hugging Face",
        }
    }
}

/// A model read from another program's directory.
pub struct Foreign {
    pub source: Source,
    pub dir: PathBuf,
    /// Resolved, litgpt's fields.
    pub model: ModelConfig,
    /// fp32 CPU tensors by litgpt name.
    pub weights: HashMap<String, Tensor>,
}

/// The layout of the local directory `location`, when it is a litgpt or Hugging Face model
/// directory and not an mla step.
pub fn detect(location: &str) -> Option<Source> {
    let dir = Path::new(location.strip_prefix("file://").unwrap_or(location));
    if location.contains("://") && !location.starts_with("file://")
        || !dir.is_dir()
        || dir.join("manifest.json").exists()
    {
        return None;
    }
    if dir.join("lit_model.pth").is_file() && dir.join("model_config.yaml").is_file() {
        return Some(Source::Litgpt);
    }
    if dir.join("config.json").is_file() && HF_WEIGHTS.iter().any(|w| dir.join(w).is_file()) {
        return Some(Source::HuggingFace);
    }
    None
}

/// Read the model directory `location` of layout `source`.
pub fn read(location: &str, source: Source) -> anyhow::Result<Foreign> {
    let dir = PathBuf::from(location.strip_prefix("file://").unwrap_or(location));
    let (model, weights) = match source {
        Source::Litgpt => read_litgpt(&dir)?,
        Source::HuggingFace => read_hf(&dir)?,
    };
    let weights = weights
        .into_iter()
        .map(|(k, t)| (k, t.to_kind(Kind::Float)))
        .collect();
    Ok(Foreign {
        source,
        dir,
        model,
        weights,
    })
}

fn read_litgpt(dir: &Path) -> anyhow::Result<(ModelConfig, HashMap<String, Tensor>)> {
    let path = dir.join("model_config.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let model: ModelConfig =
        serde_yaml_ng::from_str(&text).map_err(|e| BadInput(format!("{}: {e}", path.display())))?;
    let model = model
        .resolve()
        .map_err(|e| BadInput(format!("{}: {e}", path.display())))?;
    let pth = dir.join("lit_model.pth");
    let weights = torch_save::load_state_dict(&pth)?.into_iter().collect();
    Ok((model, weights))
}

fn read_hf(dir: &Path) -> anyhow::Result<(ModelConfig, HashMap<String, Tensor>)> {
    let path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let name = dir
        .file_name()
        .map_or("hf".into(), |n| n.to_string_lossy().into_owned());
    let (config, model) =
        hf_model(&text, &name).map_err(|e| BadInput(format!("{}: {e}", path.display())))?;
    if let Some(caveat) = config.caveat() {
        tracing::warn!("{}: {caveat}", path.display());
    }
    let theirs = hf_tensors(dir)?;
    let weights = config.weights_in(&model, &theirs).map_err(|e| {
        BadInput(format!(
            "{}: {config_form}: {e}",
            dir.display(),
            config_form = config.form()
        ))
    })?;
    Ok((model, weights))
}

/// The form and the mla model of a Hugging Face `config.json`'s text, or one line naming what
/// mla cannot read or build.
pub fn hf_model(config_json: &str, name: &str) -> Result<(HfConfig, ModelConfig), String> {
    let config = HfConfig::parse(config_json)?;
    let model = config
        .model_config(name)
        .map_err(|e| format!("{}: {e}", config.form()))?;
    Ok((config, model))
}

/// The weight files a Hugging Face directory may hold, in the order they are looked for: one
/// safetensors file, safetensors shards, one `torch.save` file, `torch.save` shards. The
/// indexes name their shards in `weight_map`.
pub const HF_WEIGHTS: [&str; 4] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
];

/// The shard file names of a Hugging Face weight index (`weight_map`'s values), sorted, each a
/// plain file name (nothing that could leave the directory).
pub fn index_shards(index_json: &[u8]) -> Result<Vec<String>, String> {
    let doc: serde_json::Value = serde_json::from_slice(index_json).map_err(|e| e.to_string())?;
    let map = doc["weight_map"]
        .as_object()
        .ok_or_else(|| "no weight_map".to_string())?;
    let mut shards = Vec::new();
    for v in map.values() {
        let name = v
            .as_str()
            .ok_or_else(|| format!("weight_map value {v} is not a file name"))?;
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && !name.contains(['/', '\\'])
            && name != "..";
        if !plain {
            return Err(format!(
                "weight_map names {name:?}, not a file of this directory"
            ));
        }
        shards.push(name.to_string());
    }
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Every tensor of a Hugging Face directory by HF name, from the first of [`HF_WEIGHTS`] it
/// holds.
fn hf_tensors(dir: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let found = HF_WEIGHTS
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            BadInput(format!(
                "{}: no weights ({})",
                dir.display(),
                HF_WEIGHTS.join(", ")
            ))
        })?;
    let name = found
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let files: Vec<PathBuf> = if name.ends_with(".index.json") {
        let bytes =
            std::fs::read(&found).with_context(|| format!("reading {}", found.display()))?;
        index_shards(&bytes)
            .map_err(|e| BadInput(format!("{}: {e}", found.display())))?
            .iter()
            .map(|s| dir.join(s))
            .collect()
    } else {
        vec![found]
    };
    let mut out = HashMap::new();
    for f in files {
        if f.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
            let (tensors, _) = from_safetensors(&bytes, &f.display().to_string())?;
            out.extend(tensors);
        } else {
            out.extend(torch_save::load_state_dict(&f)?);
        }
    }
    Ok(out)
}

/// How prompts go to the model and where generation stops (an mla step: the tokenizer's
/// separator both ways; a foreign directory: [`litgpt_framing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// Prepended to every prompt.
    pub bos: Option<u32>,
    /// Generation ends after it.
    pub stop: Option<u32>,
}

/// litgpt's prompt framing for a model directory (its `Tokenizer`): bos and eos from
/// `tokenizer_config.json` (a string or `{"content": …}`), else `generation_config.json`'s
/// ids; the bos prepended when `add_bos_token` says so (absent: only for `LlamaTokenizer`, and
/// for Llama-3 directories). Generation stops at the eos, when there is one.
pub fn litgpt_framing(dir: &Path, tokenizer: &Tokenizer) -> anyhow::Result<Framing> {
    let read = |name: &str| -> anyhow::Result<Option<serde_json::Value>> {
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
                    BadInput(format!("{}: {e}", path.display()))
                })?))
            }
            Err(_) => Ok(None),
        }
    };
    let config = read("tokenizer_config.json")?;
    let generation = read("generation_config.json")?;
    let token = |key: &str| -> Option<u32> {
        let v = config.as_ref()?.get(key)?;
        let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
        tokenizer.token_to_id(text)
    };
    let id = |key: &str| -> Option<u32> {
        generation
            .as_ref()?
            .get(key)?
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
    };
    let bos = token("bos_token").or_else(|| id("bos_token_id"));
    let stop = token("eos_token").or_else(|| id("eos_token_id"));
    let stem = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let use_bos = match config.as_ref() {
        None => false,
        Some(_) if stem.starts_with("Meta-Llama-3") || stem.starts_with("Llama-3") => true,
        Some(c) => match c.get("add_bos_token").and_then(serde_json::Value::as_bool) {
            Some(b) => b,
            None => {
                c.get("tokenizer_class").and_then(serde_json::Value::as_str)
                    == Some("LlamaTokenizer")
            }
        },
    };
    if use_bos && bos.is_none() {
        return Err(BadInput(format!(
            "{}: tokenizer_config.json asks for a bos token but names none in the vocabulary",
            dir.display()
        ))
        .into());
    }
    Ok(Framing {
        bos: if use_bos { bos } else { None },
        stop,
    })
}
