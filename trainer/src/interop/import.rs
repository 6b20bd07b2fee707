//! Reading other programs' model directories, so that `initial_checkpoint_dir`, `mla generate`,
//! `mla eval` and `mla ckpt logits` take them where they take an mla step:
//!
//! * litgpt: `lit_model.pth` (a `torch.save` state dict, or litgpt's training checkpoint whose
//!   `model` entry is one) with `model_config.yaml`;
//! * Hugging Face: `config.json` of a GPTNeoX (pythia) with `model.safetensors`, a sharded
//!   `model.safetensors.index.json`, or `pytorch_model.bin`.
//!
//! Both bring their tokenizer files along (tokenizer.json, tokenizer_config.json). Weights come
//! in as fp32, by litgpt name. Local directories only; an mla step (manifest.json) is never
//! taken for one of these.
//!
//! Not here: the config and layout maps (mla_model::formats).

use super::torch_pickle;
use crate::checkpoint::from_safetensors;
use crate::data::Tokenizer;
use crate::error::BadInput;
use crate::inference::Framing;
use anyhow::Context;
use mla_model::formats::hf;
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
    let weights = [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
    ];
    if dir.join("config.json").is_file() && weights.iter().any(|w| dir.join(w).is_file()) {
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
    let weights = torch_pickle::load_state_dict(&pth)?.into_iter().collect();
    Ok((model, weights))
}

fn read_hf(dir: &Path) -> anyhow::Result<(ModelConfig, HashMap<String, Tensor>)> {
    let path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config: hf::GptNeoxConfig =
        serde_json::from_str(&text).map_err(|e| BadInput(format!("{}: {e}", path.display())))?;
    let name = dir
        .file_name()
        .map_or("hf".into(), |n| n.to_string_lossy().into_owned());
    let model = hf::from_gpt_neox_config(&config, &name)
        .map_err(|e| BadInput(format!("{}: {e}", path.display())))?;
    let theirs = hf_tensors(dir)?;
    let weights = hf::from_gpt_neox_weights(&model, &theirs, config.tie_word_embeddings)
        .map_err(|e| BadInput(format!("{}: {e}", dir.display())))?;
    Ok((model, weights))
}

/// Every tensor of a Hugging Face directory by HF name, from its one safetensors file, its
/// shards (model.safetensors.index.json), or pytorch_model.bin.
fn hf_tensors(dir: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        let text = std::fs::read_to_string(&index)?;
        let doc: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| BadInput(format!("{}: {e}", index.display())))?;
        let map = doc["weight_map"]
            .as_object()
            .ok_or_else(|| BadInput(format!("{}: no weight_map", index.display())))?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        shards.sort();
        shards.dedup();
        shards.iter().map(|s| dir.join(s)).collect()
    } else {
        let bin = dir.join("pytorch_model.bin");
        return Ok(torch_pickle::load_state_dict(&bin)?.into_iter().collect());
    };
    let mut out = HashMap::new();
    for f in files {
        let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        let (tensors, _) = from_safetensors(&bytes, &f.display().to_string())?;
        out.extend(tensors);
    }
    Ok(out)
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
