//! Run configuration: a litgpt pretrain YAML (plus mla's own sections) → typed, validated
//! sections. The one place that knows the YAML crate.
//!
//! Pipeline: read file → YAML tree → normalise litgpt class-path sections (`data`,
//! `optimizer`) → apply `--dotted.key value` overrides → deserialize with unknown keys denied
//! (errors carry the key path) → resolve the model (registry entry of `model_name`, overlaid
//! by `model_config`) → one validation pass that reports every problem at once.
//!
//! Not here: what the sections mean at run time (data, train loop, checkpoint store).

pub use crate::dist::config::{Backend, DistConfig, Sharding};
use mla_model::{registry, ModelConfig};
use serde::{Deserialize, Serialize};
use serde_yaml_ng::{Mapping, Value};
use std::fmt;
use std::path::Path;

/// A config problem: which file, which key, what is wrong. Displayed as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<(String, String)>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .problems
            .iter()
            .map(|(key, msg)| {
                if key.is_empty() {
                    msg.clone()
                } else {
                    format!("{key}: {msg}")
                }
            })
            .collect();
        write!(f, "{}: {}", self.source_name, parts.join("; "))
    }
}

impl ConfigError {
    fn one(source_name: &str, key: impl Into<String>, msg: impl Into<String>) -> Self {
        ConfigError {
            source_name: source_name.to_string(),
            problems: vec![(key.into(), msg.into())],
        }
    }
}

/// `precision:` as litgpt names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    #[serde(rename = "32-true")]
    Fp32,
    /// bf16 autocast on CUDA with fp32 master weights (fp32 on CPU: autocast is CUDA-only).
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
    /// bf16 weights and activations.
    #[serde(rename = "bf16-true")]
    Bf16True,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "32-true",
            Precision::Bf16Mixed => "bf16-mixed",
            Precision::Bf16True => "bf16-true",
        }
    }
    /// Bytes per activation element (what inference caches hold) on CUDA.
    pub fn activation_bytes(self) -> usize {
        match self {
            Precision::Fp32 => 4,
            Precision::Bf16Mixed | Precision::Bf16True => 2,
        }
    }
}

/// `resume:` false | true | "auto" | a step directory or URL.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Resume {
    #[default]
    No,
    /// Newest verified step under out_dir; it must exist.
    Latest,
    /// Newest verified step under out_dir, else a fresh start.
    Auto,
    Path(String),
}

impl Serialize for Resume {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Resume::No => s.serialize_bool(false),
            Resume::Latest => s.serialize_bool(true),
            Resume::Auto => s.serialize_str("auto"),
            Resume::Path(p) => s.serialize_str(p),
        }
    }
}

impl<'de> Deserialize<'de> for Resume {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Resume;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("false, true, \"auto\" or a checkpoint directory")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Resume, E> {
                Ok(if v { Resume::Latest } else { Resume::No })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Resume, E> {
                Ok(match v {
                    "auto" => Resume::Auto,
                    "false" | "False" => Resume::No,
                    "true" | "True" => Resume::Latest,
                    p => Resume::Path(p.to_string()),
                })
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Resume, E> {
                Ok(Resume::No)
            }
        }
        d.deserialize_any(V)
    }
}

/// `devices:` "auto" or a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Devices {
    #[default]
    Auto,
    Count(usize),
}

impl Serialize for Devices {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Devices::Auto => s.serialize_str("auto"),
            Devices::Count(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Devices {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Devices;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"auto\" or a positive number of devices")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Devices, E> {
                Ok(Devices::Count(v as usize))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Devices, E> {
                if v < 0 {
                    return Err(E::custom(format!("expected a positive number, got {v}")));
                }
                Ok(Devices::Count(v as usize))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Devices, E> {
                match v {
                    "auto" => Ok(Devices::Auto),
                    _ => v.parse().map(Devices::Count).map_err(|_| {
                        E::custom(format!("expected \"auto\" or a number, got {v:?}"))
                    }),
                }
            }
        }
        d.deserialize_any(V)
    }
}

fn d_out_dir() -> String {
    "out/pretrain".into()
}
fn d_seed() -> u64 {
    42
}
fn d_one() -> usize {
    1
}

/// The whole run config: litgpt's `pretrain` arguments plus mla's own sections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    #[serde(default)]
    pub model_name: Option<String>,
    /// The resolved model (registry entry of `model_name` overlaid by this mapping).
    #[serde(default)]
    pub model_config: Option<ModelConfig>,
    /// A local path or an object-store URL (`s3://bucket/prefix`, `file://…`, `memory://…`).
    #[serde(default = "d_out_dir")]
    pub out_dir: String,
    /// None: bf16-mixed on CUDA, 32-true on CPU.
    #[serde(default)]
    pub precision: Option<Precision>,
    #[serde(default)]
    pub initial_checkpoint_dir: Option<String>,
    #[serde(default)]
    pub resume: Resume,
    #[serde(default)]
    pub data: Option<DataConfig>,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub devices: Devices,
    #[serde(default = "d_one")]
    pub num_nodes: usize,
    #[serde(default)]
    pub tokenizer_dir: Option<String>,
    #[serde(default)]
    pub logger_name: LoggerName,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// mla extension: checkpoint store behaviour.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// mla extension: distributed backend.
    #[serde(default)]
    pub dist: DistConfig,
}

impl RunConfig {
    /// The model config (set by `load`/`from_yaml`, which require one).
    pub fn model(&self) -> &ModelConfig {
        self.model_config
            .as_ref()
            .unwrap_or_else(|| unreachable!("RunConfig::load always resolves model_config"))
    }
}

/// litgpt's `TrainArgs` (0.5.13).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps between checkpoints (null: only the final one).
    pub save_interval: Option<usize>,
    /// Optimizer steps between metric lines.
    pub log_interval: usize,
    /// Samples per optimizer step across all ranks.
    pub global_batch_size: usize,
    /// Samples per forward/backward on one rank.
    pub micro_batch_size: usize,
    pub lr_warmup_steps: Option<usize>,
    pub lr_warmup_fraction: Option<f64>,
    pub epochs: Option<usize>,
    pub max_tokens: Option<u64>,
    pub max_steps: Option<usize>,
    /// Seconds.
    pub max_time: Option<f64>,
    /// Training window length (default: block_size).
    pub max_seq_length: Option<usize>,
    /// The LM head reuses the embedding's matrix (litgpt's; default false).
    pub tie_embeddings: Option<bool>,
    pub max_norm: Option<f64>,
    pub min_lr: f64,
    /// mla extension: abort after this many optimizer steps in a row skipped for a
    /// non-finite loss or gradient.
    pub max_nonfinite_steps: usize,
    /// mla extension: which blocks run their forward again in the backward instead of keeping
    /// their activations (train/recompute.rs). Written only when not `none`.
    #[serde(skip_serializing_if = "ActivationCheckpointing::is_none")]
    pub activation_checkpointing: ActivationCheckpointing,
}

/// `train.activation_checkpointing`: `none`, `blocks` (every block), or `{every_k: K}` (blocks
/// 0, K, 2K, …; the others keep their activations, as torchtitan's selective layer option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivationCheckpointing {
    #[default]
    None,
    Blocks,
    EveryK(usize),
}

impl Serialize for ActivationCheckpointing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            ActivationCheckpointing::None => s.serialize_str("none"),
            ActivationCheckpointing::Blocks => s.serialize_str("blocks"),
            ActivationCheckpointing::EveryK(k) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("every_k", k)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for ActivationCheckpointing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ActivationCheckpointing;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`none`, `blocks` or `{every_k: K}`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "none" => Ok(ActivationCheckpointing::None),
                    "blocks" => Ok(ActivationCheckpointing::Blocks),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut k = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "every_k" => k = Some(map.next_value::<usize>()?),
                        other => return Err(serde::de::Error::unknown_field(other, &["every_k"])),
                    }
                }
                k.map(ActivationCheckpointing::EveryK)
                    .ok_or_else(|| serde::de::Error::missing_field("every_k"))
            }
        }
        d.deserialize_any(V)
    }
}

impl ActivationCheckpointing {
    pub fn is_none(&self) -> bool {
        *self == ActivationCheckpointing::None
    }

    /// Whether block `i` is recomputed.
    pub fn recomputes(&self, i: usize) -> bool {
        match *self {
            ActivationCheckpointing::None => false,
            ActivationCheckpointing::Blocks => true,
            ActivationCheckpointing::EveryK(k) => i.is_multiple_of(k.max(1)),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            save_interval: Some(1000),
            log_interval: 1,
            global_batch_size: 64,
            micro_batch_size: 4,
            lr_warmup_steps: Some(100),
            lr_warmup_fraction: None,
            epochs: None,
            max_tokens: None,
            max_steps: None,
            max_time: None,
            max_seq_length: None,
            tie_embeddings: None,
            max_norm: None,
            min_lr: 6e-5,
            max_nonfinite_steps: 10,
            activation_checkpointing: ActivationCheckpointing::None,
        }
    }
}

/// litgpt's `EvalArgs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Optimizer steps between validation runs.
    pub interval: usize,
    pub max_new_tokens: Option<usize>,
    /// Validation micro-batches per evaluation.
    pub max_iters: usize,
    pub initial_validation: bool,
    pub final_validation: bool,
    pub evaluate_example: Option<Value>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            interval: 600,
            max_new_tokens: None,
            max_iters: 100,
            initial_validation: false,
            final_validation: true,
            evaluate_example: None,
        }
    }
}

/// litgpt's `LogArgs` (wandb/litlogger fields; accepted, unused: mla logs to files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub project: Option<String>,
    pub run: Option<String>,
    pub group: Option<String>,
    pub teamspace: Option<String>,
    pub metadata: Option<Value>,
    pub log_model: Option<bool>,
    pub save_logs: Option<bool>,
    pub checkpoint_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoggerName {
    Csv,
    #[default]
    Tensorboard,
    /// Only `<out_dir>/metrics.jsonl` (always written).
    Jsonl,
}

/// `optimizer:` — "AdamW" or `{class_path: torch.optim.AdamW, init_args: {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    pub class_path: String,
    #[serde(default)]
    pub init_args: AdamWArgs,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            class_path: "torch.optim.AdamW".into(),
            init_args: AdamWArgs::default(),
        }
    }
}

/// torch.optim.AdamW arguments (torch defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWArgs {
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    /// Accepted for torch compatibility; mla's AdamW is always a fused flat-buffer update.
    pub fused: Option<bool>,
    pub foreach: Option<bool>,
}

impl Default for AdamWArgs {
    fn default() -> Self {
        AdamWArgs {
            lr: 1e-3,
            weight_decay: 0.01,
            betas: (0.9, 0.999),
            eps: 1e-8,
            fused: None,
            foreach: None,
        }
    }
}

/// `data:` — a litgpt data module, by class name or `{class_path, init_args}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub class_path: String,
    #[serde(default)]
    pub init_args: DataArgs,
}

/// Arguments of the TinyStories and TextFiles data modules (litgpt names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DataArgs {
    /// TinyStories: raw json/txt files or prepared shards; empty or absent → download.
    pub data_path: Option<String>,
    /// TextFiles: directory (or file) of training text.
    pub train_data_path: Option<String>,
    /// TextFiles: directory (or file) of validation text (default: split off the training set).
    pub val_data_path: Option<String>,
    /// Shuffle seed (default: the run's `seed`).
    pub seed: Option<u64>,
    /// Tokenizer threads for automatic preparation (default: all cores).
    pub num_workers: Option<usize>,
    /// mla extension: where automatic preparation writes shards (default `<out_dir>/data`
    /// for local out_dirs, else `.cache/mla/data`).
    pub cache_dir: Option<String>,
    /// mla extension: compare every shard's sha256 with the index when the run opens the
    /// dataset (default true). Sizes and headers are always checked; turning this off saves
    /// reading a large remote dataset once per start.
    pub verify_checksums: Option<bool>,
    /// mla extension (TextFiles): when `train_data_path` and `val_data_path` are `DIR/train`
    /// and `DIR/val` and neither exists, fill them on first use with a small TinyStories
    /// sample from the Hugging Face hub (its validation split, every 10th story to val), as
    /// the quickstart configs do. Other paths (a typo in an override) are never filled.
    pub tinystories_sample: Option<bool>,
}

/// Which data module a `DataConfig` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataModule {
    TinyStories,
    TextFiles,
}

impl DataModule {
    /// The module a `class_path` names (`TinyStories`, `litgpt.data.TextFiles`, …).
    pub fn of(class_path: &str) -> Option<DataModule> {
        match class_path.trim_start_matches("litgpt.data.") {
            "TinyStories" => Some(DataModule::TinyStories),
            "TextFiles" => Some(DataModule::TextFiles),
            _ => None,
        }
    }
}

impl DataConfig {
    pub fn module(&self) -> Option<DataModule> {
        DataModule::of(&self.class_path)
    }
}

/// What to do when a background checkpoint upload fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnSaveFailure {
    /// Report it and keep training; the next save retries.
    #[default]
    Continue,
    Stop,
}

/// `checkpoint:` (mla extension).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Keep the newest k step checkpoints (never deleting the newest valid one or final/);
    /// null keeps all.
    pub keep_last: Option<usize>,
    /// Upload in the background while training continues.
    pub async_save: bool,
    pub on_failure: OnSaveFailure,
    /// A fresh run (`resume: false`) into an out_dir that holds checkpoints deletes them
    /// first (`mla train --overwrite`); without it such a run is refused.
    pub overwrite: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            keep_last: None,
            async_save: true,
            on_failure: OnSaveFailure::Continue,
            overwrite: false,
        }
    }
}

/// Top-level keys; `--key value` on a command line overrides them (litgpt style).
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "model_name",
    "model_config",
    "out_dir",
    "precision",
    "initial_checkpoint_dir",
    "resume",
    "data",
    "train",
    "eval",
    "log",
    "optimizer",
    "devices",
    "num_nodes",
    "tokenizer_dir",
    "logger_name",
    "seed",
    "checkpoint",
    "dist",
];

/// One `--dotted.key value` override from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub key: String,
    pub value: String,
}

/// Split litgpt-style overrides (`--train.max_steps 20`, `--out_dir=x`, `--data TextFiles`)
/// out of `args`; the rest is returned for the CLI parser. A flag is an override when its
/// key is dotted or a top-level config key, unless it is one of `own` (a subcommand's flag
/// spelled like a config key, e.g. `mla bench decode --precision`).
pub fn split_overrides(
    args: &[String],
    own: &[&str],
) -> Result<(Vec<String>, Vec<Override>), String> {
    let mut rest = Vec::new();
    let mut overrides = Vec::new();
    let mut it = args.iter().peekable();
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            rest.push(arg.clone());
            continue;
        };
        let (key, inline) = match flag.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (flag, None),
        };
        let root = key.split('.').next().unwrap_or(key);
        if !TOP_LEVEL_KEYS.contains(&root) || own.contains(&key) {
            if key.contains('.') {
                return Err(format!(
                    "--{key}: unknown config section `{root}` (sections: {})",
                    TOP_LEVEL_KEYS.join(", ")
                ));
            }
            rest.push(arg.clone());
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => match it.next() {
                Some(v) => v.clone(),
                None => return Err(format!("--{key}: missing value")),
            },
        };
        overrides.push(Override {
            key: key.to_string(),
            value,
        });
    }
    Ok((rest, overrides))
}

/// Turn litgpt's class-path shorthand into the mapping form: `data: TinyStories` →
/// `{class_path: TinyStories}`; `optimizer: AdamW` → `{class_path: AdamW}`.
fn normalize_class_sections(root: &mut Mapping) {
    for section in ["data", "optimizer"] {
        if let Some(v) = root.get_mut(section) {
            if let Value::String(s) = v {
                let mut m = Mapping::new();
                m.insert("class_path".into(), Value::String(s.clone()));
                *v = Value::Mapping(m);
            }
        }
    }
}

/// The data module the tree names now (`None`: none, or one mla does not know).
fn data_class(root: &Mapping) -> Option<DataModule> {
    DataModule::of(root.get("data")?.get("class_path")?.as_str()?)
}

/// An override that switches `data.class_path` (TextFiles ↔ TinyStories) drops the init_args
/// only the previous module takes, as jsonargparse does when a class_path changes, so that
/// `--data.class_path TinyStories --data.data_path D` works on a TextFiles config. Arguments
/// both take (seed, cache_dir, …) are kept; a later override may still set any of them.
fn drop_other_modules_args(root: &mut Mapping, before: Option<DataModule>) {
    let (Some(before), Some(now)) = (before, data_class(root)) else {
        return;
    };
    if now == before {
        return;
    }
    let only_before: &[&str] = match before {
        DataModule::TextFiles => &["train_data_path", "val_data_path", "tinystories_sample"],
        DataModule::TinyStories => &["data_path"],
    };
    if let Some(Value::Mapping(args)) = root.get_mut("data").and_then(|d| d.get_mut("init_args")) {
        for key in only_before {
            args.remove(*key);
        }
    }
}

/// Where an override key lands in the tree: `data.data_path` → `data.init_args.data_path`
/// (jsonargparse's class-path convention for `data` and `optimizer`).
fn override_path(key: &str) -> Vec<String> {
    let parts: Vec<String> = key.split('.').map(str::to_string).collect();
    if parts.len() >= 2
        && (parts[0] == "data" || parts[0] == "optimizer")
        && parts[1] != "class_path"
        && parts[1] != "init_args"
    {
        let mut p = vec![parts[0].clone(), "init_args".to_string()];
        p.extend(parts[1..].iter().cloned());
        return p;
    }
    parts
}

fn set_path(root: &mut Mapping, path: &[String], value: Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut cur = root;
    for (i, p) in parents.iter().enumerate() {
        let entry = cur
            .entry(Value::String(p.clone()))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if entry.is_null() {
            *entry = Value::Mapping(Mapping::new());
        }
        cur = match entry {
            Value::Mapping(m) => m,
            _ => {
                return Err(format!(
                    "`{}` is not a section, cannot set `{}` inside it",
                    path[..=i].join("."),
                    path.join(".")
                ))
            }
        };
    }
    cur.insert(Value::String(last.clone()), value);
    Ok(())
}

/// `train:` and `eval:` rules (the sequence length is bounded by the model's block size).
fn check_train(
    t: &TrainConfig,
    eval: &EvalConfig,
    block_size: usize,
    bad: &mut impl FnMut(&str, String),
) {
    if t.micro_batch_size == 0 {
        bad("train.micro_batch_size", "must be at least 1".into());
    } else if !t.global_batch_size.is_multiple_of(t.micro_batch_size) || t.global_batch_size == 0 {
        bad(
            "train.global_batch_size",
            format!(
                "{} is not a positive multiple of train.micro_batch_size ({})",
                t.global_batch_size, t.micro_batch_size
            ),
        );
    }
    if t.log_interval == 0 {
        bad("train.log_interval", "must be at least 1".into());
    }
    if t.save_interval == Some(0) {
        bad("train.save_interval", "must be at least 1 (or null)".into());
    }
    if t.lr_warmup_fraction.is_some() && t.lr_warmup_steps.is_some_and(|s| s > 0) {
        bad(
            "train.lr_warmup_fraction",
            "cannot be combined with train.lr_warmup_steps; set one of them to null".into(),
        );
    }
    if let Some(f) = t.lr_warmup_fraction {
        if !(0.0..=1.0).contains(&f) {
            // NaN is in no range, so it lands here too.
            bad(
                "train.lr_warmup_fraction",
                format!("must be in [0, 1], got {f}"),
            );
        }
    }
    if let Some(n) = t.max_norm {
        if !(n.is_finite() && n > 0.0) {
            bad(
                "train.max_norm",
                format!("must be a positive finite number (or null), got {n}"),
            );
        }
    }

    if let Some(m) = t.max_seq_length {
        if m == 0 || m > block_size {
            bad(
                "train.max_seq_length",
                format!("must be in 1..={block_size} (model_config.block_size), got {m}"),
            );
        }
    }
    if t.max_time.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
        bad(
            "train.max_time",
            "must be a positive number of seconds".into(),
        );
    }
    if t.max_nonfinite_steps == 0 {
        bad("train.max_nonfinite_steps", "must be at least 1".into());
    }
    if t.activation_checkpointing == ActivationCheckpointing::EveryK(0) {
        bad(
            "train.activation_checkpointing.every_k",
            "must be at least 1 (1 recomputes every block, as `blocks`)".into(),
        );
    }
    if eval.interval == 0 {
        bad("eval.interval", "must be at least 1".into());
    }
}

/// `optimizer:` rules: AdamW, every float finite and in range, and `train.min_lr` under its lr.
fn check_optimizer(opt: &OptimizerConfig, min_lr: f64, bad: &mut impl FnMut(&str, String)) {
    if !matches!(opt.class_path.as_str(), "AdamW" | "torch.optim.AdamW") {
        bad(
            "optimizer.class_path",
            format!(
                "unsupported optimizer `{}` (mla implements AdamW)",
                opt.class_path
            ),
        );
    }
    // Every float finite and in range (issue 14: `lr .inf`, `eps .nan`, `weight_decay -5`
    // trained an all-NaN model to exit 0). Ranges are open where torch's AdamW divides by
    // the value or its complement.
    let a = &opt.init_args;
    if !(a.lr.is_finite() && a.lr > 0.0) {
        bad(
            "optimizer.init_args.lr",
            format!("must be a positive finite number, got {}", a.lr),
        );
    }
    if !(a.weight_decay.is_finite() && a.weight_decay >= 0.0) {
        bad(
            "optimizer.init_args.weight_decay",
            format!("must be a finite number ≥ 0, got {}", a.weight_decay),
        );
    }
    if !(a.eps.is_finite() && a.eps > 0.0) {
        bad(
            "optimizer.init_args.eps",
            format!("must be a positive finite number, got {}", a.eps),
        );
    }
    if !(0.0..1.0).contains(&a.betas.0) || !(0.0..1.0).contains(&a.betas.1) {
        bad(
            "optimizer.init_args.betas",
            format!("must be in [0, 1), got {:?}", a.betas),
        );
    }
    if !(0.0..=a.lr).contains(&min_lr) {
        bad(
            "train.min_lr",
            format!("must be in [0, optimizer lr {}], got {}", a.lr, min_lr),
        );
    }
}

/// `data:` rules: a module mla supports, given the arguments of that module only.
fn check_data(d: &DataConfig, bad: &mut impl FnMut(&str, String)) {
    match d.module() {
        None => bad(
            "data.class_path",
            format!(
                "unsupported data module `{}` (mla supports TinyStories and TextFiles)",
                d.class_path
            ),
        ),
        Some(DataModule::TextFiles) => {
            if d.init_args.train_data_path.is_none() {
                bad(
                    "data.init_args.train_data_path",
                    "is required for TextFiles".into(),
                );
            }
            if d.init_args.data_path.is_some() {
                bad(
                    "data.init_args.data_path",
                    "belongs to TinyStories; TextFiles takes train_data_path/val_data_path".into(),
                );
            }
        }
        Some(DataModule::TinyStories) => {
            if d.init_args.train_data_path.is_some() || d.init_args.val_data_path.is_some() {
                bad("data.init_args", "TinyStories takes data_path; train_data_path/val_data_path belong to TextFiles".into());
            }
            if d.init_args.tinystories_sample.is_some() {
                bad(
                    "data.init_args.tinystories_sample",
                    "belongs to TextFiles (TinyStories downloads the whole archive into data_path)"
                        .into(),
                );
            }
        }
    }
}

/// The run-wide keys: devices, nodes, dist, out_dir, checkpoint.
fn check_run(cfg: &RunConfig, bad: &mut impl FnMut(&str, String)) {
    if cfg.devices == Devices::Count(0) {
        bad("devices", "must be at least 1 (or \"auto\")".into());
    }
    if cfg.num_nodes == 0 {
        bad("num_nodes", "must be at least 1".into());
    }
    if cfg.dist.timeout_secs == 0 {
        bad("dist.timeout_secs", "must be at least 1".into());
    }
    if cfg.dist.bucket_mb == 0 {
        bad("dist.bucket_mb", "must be at least 1".into());
    }
    if let Err(e) = mla_storage::check_location(&cfg.out_dir) {
        bad("out_dir", mla_storage::redact_userinfo(&e.to_string()));
    }
    if cfg.checkpoint.keep_last == Some(0) {
        bad(
            "checkpoint.keep_last",
            "must be at least 1 (or null to keep all)".into(),
        );
    }
}

fn yaml_error_key(e: &serde_path_to_error::Error<serde_yaml_ng::Error>) -> String {
    let path = e.path().to_string();
    if path == "." {
        String::new()
    } else {
        path
    }
}

/// The YAML error's message without serde_yaml's location suffix (the key path says where),
/// and for an unknown key a "did you mean" instead of serde's list of every field.
fn yaml_message(e: &serde_yaml_ng::Error) -> String {
    let msg = e.to_string();
    let msg = match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    };
    let Some(rest) = msg.strip_prefix("unknown field `") else {
        return msg;
    };
    let Some((unknown, expected)) = rest.split_once("`, expected ") else {
        return msg;
    };
    let known: Vec<&str> = expected
        .trim_start_matches("one of ")
        .split(", ")
        .map(|k| k.trim_matches('`'))
        .collect();
    let closest = known
        .iter()
        .map(|k| (strsim::levenshtein(unknown, k), *k))
        .min()
        .filter(|(d, k)| *d <= 2.max(k.len() / 4));
    match closest {
        Some((_, k)) => format!("unknown key `{unknown}` (did you mean `{k}`?)"),
        None if known.len() <= 20 => {
            format!("unknown key `{unknown}` (known keys: {})", known.join(", "))
        }
        None => format!("unknown key `{unknown}`"),
    }
}

impl RunConfig {
    /// Load a config file and apply command-line overrides.
    pub fn load(path: &Path, overrides: &[Override]) -> Result<RunConfig, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(&name, "", format!("cannot read config: {e}")))?;
        Self::from_yaml(&text, &name, overrides)
    }

    /// Parse YAML text (named `source_name` in errors) and apply overrides.
    pub fn from_yaml(
        text: &str,
        source_name: &str,
        overrides: &[Override],
    ) -> Result<RunConfig, ConfigError> {
        let err = |key: &str, msg: String| ConfigError::one(source_name, key, msg);
        let tree: Value = serde_yaml_ng::from_str(text).map_err(|e| {
            let loc = e
                .location()
                .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                .unwrap_or_default();
            err("", format!("invalid YAML{loc}: {}", yaml_message(&e)))
        })?;
        let mut root = match tree {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            _ => return Err(err("", "expected a mapping of config sections".into())),
        };
        normalize_class_sections(&mut root);
        for o in overrides {
            let value: Value =
                serde_yaml_ng::from_str(&o.value).unwrap_or(Value::String(o.value.clone()));
            let before = data_class(&root);
            set_path(&mut root, &override_path(&o.key), value)
                .map_err(|m| err(&format!("--{}", o.key), m))?;
            normalize_class_sections(&mut root);
            drop_other_modules_args(&mut root, before);
        }
        let from_override = |key: &str| {
            overrides
                .iter()
                .find(|o| {
                    key == o.key
                        || key.starts_with(&format!("{}.", o.key))
                        || o.key.starts_with(&format!("{key}."))
                })
                .map(|o| format!(" (from --{} {})", o.key, o.value))
                .unwrap_or_default()
        };

        // model_config is resolved separately (litgpt's Config defaults or the registry), so take it out.
        let model_overlay = root.remove("model_config").unwrap_or(Value::Null);
        let mut cfg: RunConfig =
            serde_path_to_error::deserialize(Value::Mapping(root)).map_err(|e| {
                let key = yaml_error_key(&e);
                let msg = format!("{}{}", yaml_message(e.inner()), from_override(&key));
                err(&key, msg)
            })?;
        let mut model =
            resolve_model(cfg.model_name.as_deref(), model_overlay).map_err(|(key, msg)| {
                let msg = format!("{msg}{}", from_override(&key));
                err(&key, msg)
            })?;
        model.tie_embeddings = cfg.train.tie_embeddings == Some(true);
        cfg.model_config = Some(model);
        cfg.validate(source_name)?;
        Ok(cfg)
    }

    /// Cross-field rules of the run sections; every problem at once, each section's by its
    /// own function.
    fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let mut problems: Vec<(String, String)> = Vec::new();
        let mut bad = |k: &str, m: String| problems.push((k.to_string(), m));
        check_train(&self.train, &self.eval, self.model().block_size, &mut bad);
        check_optimizer(&self.optimizer, self.train.min_lr, &mut bad);
        if let Some(d) = &self.data {
            check_data(d, &mut bad);
        }
        check_run(self, &mut bad);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                source_name: source_name.to_string(),
                problems,
            })
        }
    }

    /// The resolved config as YAML (what every checkpoint stores).
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_else(|e| format!("# unserializable config: {e}\n"))
    }

    /// The world sizes that split `train.global_batch_size` (see [`TrainConfig::world_sizes`]).
    pub fn world_sizes(&self) -> Vec<usize> {
        self.train.world_sizes()
    }

    /// Gradient-accumulation steps per optimizer step for `world_size` ranks.
    pub fn grad_accum_steps(&self, world_size: usize) -> Result<usize, String> {
        self.train.grad_accum_steps(world_size)
    }
}

impl TrainConfig {
    /// The world sizes (numbers of ranks) that split `train.global_batch_size` into whole
    /// micro-batches of `train.micro_batch_size`: those a run, or its resume, can have.
    pub fn world_sizes(&self) -> Vec<usize> {
        if self.micro_batch_size == 0
            || !self.global_batch_size.is_multiple_of(self.micro_batch_size)
        {
            return Vec::new();
        }
        let n = self.global_batch_size / self.micro_batch_size;
        (1..=n).filter(|w| n.is_multiple_of(*w)).collect()
    }

    /// Gradient-accumulation steps per optimizer step for `world_size` ranks.
    pub fn grad_accum_steps(&self, world_size: usize) -> Result<usize, String> {
        let per_step = self.micro_batch_size * world_size;
        if per_step == 0 || !self.global_batch_size.is_multiple_of(per_step) {
            let can = match self.world_sizes() {
                w if w.is_empty() => "none".to_string(),
                w => w
                    .iter()
                    .map(|w| w.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            return Err(format!(
                "train.global_batch_size ({}) must be divisible by micro_batch_size × world size ({} × {world_size}); world sizes that can with this micro_batch_size: {can}",
                self.global_batch_size, self.micro_batch_size
            ));
        }
        Ok(self.global_batch_size / per_step)
    }
}

/// The model of a run, read as litgpt 0.5.13's `pretrain` reads it: `model_config` present →
/// litgpt's `Config` defaults under the `model_config` mapping (`model_name` is then only a
/// label, and need not be in the registry: litgpt's own configs name `stories15M`); absent →
/// the registry entry of `model_name`. When `model_name` names a registry model and the
/// `model_config` leaves out fields in which that model differs from litgpt's defaults, a
/// warning names each one, since whoever wrote the file likely meant the named model's values.
/// Errors are (key, message) with keys under `model_config`.
fn resolve_model(
    model_name: Option<&str>,
    model_config: Value,
) -> Result<ModelConfig, (String, String)> {
    if model_config.is_null() {
        return match model_name {
            Some(name) => registry::find(name).ok_or_else(|| {
                (
                    "model_name".to_string(),
                    format!(
                        "unknown model `{name}` (known: {}; or give the whole model_config)",
                        registry::names().join(", ")
                    ),
                )
            }),
            None => Err((
                "model_name".to_string(),
                "set model_name (e.g. pythia-160m) or model_config".to_string(),
            )),
        };
    }
    let cfg = overlay_model(&ModelConfig::default(), model_config.clone())?;
    if let Some((name, named)) = model_name.and_then(|n| Some((n, registry::find(n)?))) {
        if let Ok(meant) = overlay_model(&named, model_config) {
            let diffs = cfg.differences(&meant);
            if !diffs.is_empty() {
                let list = diffs
                    .iter()
                    .map(|(k, ours, theirs)| format!("{k} {ours} ({name}: {theirs})"))
                    .collect::<Vec<_>>()
                    .join(", ");
                tracing::warn!(
                    "model_config replaces model_name {name}, as in litgpt: the fields it leaves out take litgpt's Config defaults, so this model differs from {name} in {list}; write those fields into model_config, or drop model_config to train {name}"
                );
            }
        }
    }
    Ok(cfg)
}

/// `overlay` (a `model_config` mapping) over `base`, deserialized and resolved.
fn overlay_model(base: &ModelConfig, overlay: Value) -> Result<ModelConfig, (String, String)> {
    let mut tree = match serde_yaml_ng::to_value(base) {
        Ok(Value::Mapping(m)) => m,
        _ => Mapping::new(),
    };
    match overlay {
        Value::Null => {}
        Value::Mapping(m) => {
            for (k, v) in m {
                tree.insert(k, v);
            }
        }
        _ => {
            return Err((
                "model_config".into(),
                "expected a mapping of model fields".into(),
            ))
        }
    }
    let cfg: ModelConfig = serde_path_to_error::deserialize(Value::Mapping(tree)).map_err(|e| {
        let key = match yaml_error_key(&e) {
            k if k.is_empty() => "model_config".to_string(),
            k => format!("model_config.{k}"),
        };
        (key, yaml_message(e.inner()))
    })?;
    cfg.resolve().map_err(|errs| {
        let first = errs.0.first().cloned();
        let all: Vec<String> = errs.0.iter().map(|i| format!("model_config.{i}")).collect();
        match first {
            Some(i) if errs.0.len() == 1 => (format!("model_config.{}", i.key), i.message),
            _ => (String::new(), all.join("; ")),
        }
    })
}
