//! What a checkpoint holds and how tensors become bytes (the storage crate moves the bytes).
//!
//! A step directory (`step-00000400/` or `final/`) holds:
//! * `model.safetensors` — weights under litgpt state-dict keys (`safetensors.torch.load_file`
//!   reads it; litgpt loads it without a rename table);
//! * `optimizer.safetensors` — AdamW moments per parameter (`exp_avg.<key>`,
//!   `exp_avg_sq.<key>`) and the step count in the metadata;
//! * `state.json` — [`TrainState`]: step, tokens, every rank's loader position, RNG seed, …;
//! * `config.yaml` — the resolved run config; `tokenizer.json` (+ `tokenizer_config.json`).
//!
//! `manifest.json` is written last by the store and makes the step exist.
//!
//! Not here: the manifest protocol and uploads (mla-storage), when to save (train.rs).

use crate::config::{OnSaveFailure, Resume, RunConfig};
use crate::data::LoaderPosition;
use crate::error::BadInput;
use crate::metrics;
use crate::optim::{AdamW, FlatParams};
use anyhow::{bail, Context};
use mla_storage::{BackgroundSaver, BlockingCheckpointStore};
use mla_storage::{Bytes, ManifestMeta, SaveJob, StepName};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use tracing::{info, warn};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const CONFIG_FILE: &str = "config.yaml";
pub const TOKENIZER_FILES: &[&str] = &["tokenizer.json", "tokenizer_config.json"];
pub const STATE_VERSION: u32 = 1;

/// Training progress, enough to continue bit-exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    /// Loader position of every rank, by rank.
    pub loaders: Vec<LoaderPosition>,
    pub world_size: usize,
    pub seed: u64,
    pub skipped_steps: u64,
    /// Training wall time before this checkpoint (for max_time across resumes).
    pub elapsed_secs: f64,
    /// Validation loss at the last evaluation, if any.
    pub last_val_loss: Option<f64>,
}

fn kind_to_dtype(kind: Kind) -> anyhow::Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        k => bail!("no safetensors dtype for {k:?}"),
    })
}

fn dtype_to_kind(dtype: Dtype) -> anyhow::Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        d => bail!("unsupported safetensors dtype {d:?}"),
    })
}

/// A tensor's bytes on the host, contiguous, little-endian.
pub fn host_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut buf = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut buf, numel);
    buf
}

/// Serialize named tensors (copied to the host) as safetensors.
pub fn to_safetensors(
    named: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> anyhow::Result<Vec<u8>> {
    let host: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = named
        .iter()
        .map(|(name, t)| {
            let shape = t.size().iter().map(|&d| d as usize).collect();
            Ok((name.clone(), kind_to_dtype(t.kind())?, shape, host_bytes(t)))
        })
        .collect::<anyhow::Result<_>>()?;
    let views: Vec<(String, TensorView)> = host
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    safetensors::tensor::serialize(views, &metadata)
        .map_err(|e| anyhow::anyhow!("safetensors: {e:?}"))
}

/// Parse safetensors bytes into CPU tensors by name, plus the metadata.
pub fn from_safetensors(
    bytes: &[u8],
    what: &str,
) -> anyhow::Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("{what}: not a valid safetensors file ({e:?})"))?;
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| anyhow::anyhow!("{what}: {e:?}"))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let kind = dtype_to_kind(view.dtype()).with_context(|| format!("{what}: tensor {name}"))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.insert(name, Tensor::from_data_size(view.data(), &shape, kind));
    }
    Ok((out, metadata))
}

/// Model weights by litgpt key, from the flat buffer.
pub fn model_bytes(flat: &FlatParams) -> anyhow::Result<Vec<u8>> {
    let named: Vec<(String, Tensor)> = flat
        .entries
        .iter()
        .map(|e| (e.name.clone(), flat.param_view(e)))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    to_safetensors(&named, Some(meta))
}

fn optimizer_bytes(flat: &FlatParams, opt: &AdamW) -> anyhow::Result<Vec<u8>> {
    let mut named = Vec::with_capacity(2 * flat.entries.len());
    for e in &flat.entries {
        let view = |t: &Tensor| t.narrow(0, e.offset, e.numel()).view(e.shape.as_slice());
        named.push((format!("exp_avg.{}", e.name), view(&opt.exp_avg)));
        named.push((format!("exp_avg_sq.{}", e.name), view(&opt.exp_avg_sq)));
    }
    let meta = HashMap::from([("step".to_string(), opt.step.to_string())]);
    to_safetensors(&named, Some(meta))
}

/// Copy weights by name into the flat buffer; every parameter must be present with its shape.
pub fn load_model(flat: &FlatParams, bytes: &[u8], what: &str) -> anyhow::Result<()> {
    let (tensors, _) = from_safetensors(bytes, what)?;
    for e in &flat.entries {
        let t = tensors
            .get(&e.name)
            .with_context(|| format!("{what}: missing tensor {}", e.name))?;
        if t.size() != e.shape {
            bail!(
                "{what}: tensor {} has shape {:?}, the model needs {:?} (a checkpoint of another model shape?)",
                e.name,
                t.size(),
                e.shape
            );
        }
        tch::no_grad(|| flat.param_view(e).copy_(t));
    }
    if let Some(extra) = tensors
        .keys()
        .find(|k| !flat.entries.iter().any(|e| &e.name == *k))
    {
        bail!("{what}: tensor {extra} is not a parameter of this model");
    }
    Ok(())
}

fn load_optimizer(
    flat: &FlatParams,
    opt: &mut AdamW,
    bytes: &[u8],
    what: &str,
) -> anyhow::Result<()> {
    let (tensors, meta) = from_safetensors(bytes, what)?;
    for e in &flat.entries {
        for (prefix, buf) in [("exp_avg", &opt.exp_avg), ("exp_avg_sq", &opt.exp_avg_sq)] {
            let key = format!("{prefix}.{}", e.name);
            let t = tensors
                .get(&key)
                .with_context(|| format!("{what}: missing {key}"))?;
            if t.size() != e.shape {
                bail!(
                    "{what}: {key} has shape {:?}, expected {:?}",
                    t.size(),
                    e.shape
                );
            }
            tch::no_grad(|| {
                buf.narrow(0, e.offset, e.numel())
                    .view(e.shape.as_slice())
                    .copy_(t)
            });
        }
    }
    opt.step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{what}: metadata has no step"))?;
    Ok(())
}

/// Digest of what defines the model's shape: resume refuses a checkpoint of another model.
pub fn config_digest(cfg: &RunConfig) -> String {
    let json = serde_json::to_vec(cfg.model()).unwrap_or_default();
    mla_storage::sha256_hex(&json)[..16].to_string()
}

/// Snapshot everything of a step into host memory (the only part of a save that blocks
/// training) as a job for the store.
pub fn snapshot(
    step: StepName,
    flat: &FlatParams,
    opt: &AdamW,
    state: &TrainState,
    cfg: &RunConfig,
    tokenizer_dir: &Path,
    keep_last: Option<usize>,
) -> anyhow::Result<SaveJob> {
    let mut objects = vec![
        (MODEL_FILE.to_string(), Bytes::from(model_bytes(flat)?)),
        (
            OPTIMIZER_FILE.to_string(),
            Bytes::from(optimizer_bytes(flat, opt)?),
        ),
        (
            STATE_FILE.to_string(),
            Bytes::from(serde_json::to_vec_pretty(state)?),
        ),
        (CONFIG_FILE.to_string(), Bytes::from(cfg.to_yaml())),
    ];
    for name in TOKENIZER_FILES {
        let path = tokenizer_dir.join(name);
        if path.exists() {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            objects.push((name.to_string(), Bytes::from(bytes)));
        }
    }
    Ok(SaveJob {
        step,
        objects,
        meta: ManifestMeta {
            step: state.step,
            tokens_seen: state.tokens_seen,
            world_size: state.world_size as u32,
            config_digest: config_digest(cfg),
            extra: serde_json::Value::Null,
        },
        keep_last,
    })
}

/// A loaded step's parts, parsed.
pub struct Restored {
    pub state: TrainState,
    pub config_yaml: String,
}

/// Restore model, optimizer and state from a verified step's objects.
pub fn restore(
    objects: &std::collections::BTreeMap<String, Bytes>,
    where_: &str,
    flat: &FlatParams,
    opt: &mut AdamW,
) -> anyhow::Result<Restored> {
    let get = |name: &str| {
        objects
            .get(name)
            .with_context(|| format!("{where_}: checkpoint has no {name}"))
    };
    load_model(flat, get(MODEL_FILE)?, &format!("{where_}/{MODEL_FILE}"))?;
    load_optimizer(
        flat,
        opt,
        get(OPTIMIZER_FILE)?,
        &format!("{where_}/{OPTIMIZER_FILE}"),
    )?;
    let state: TrainState = serde_json::from_slice(get(STATE_FILE)?)
        .with_context(|| format!("{where_}/{STATE_FILE}: invalid"))?;
    if state.version != STATE_VERSION {
        bail!(
            "{where_}/{STATE_FILE}: state version {} (this mla reads {STATE_VERSION})",
            state.version
        );
    }
    let config_yaml = String::from_utf8_lossy(get(CONFIG_FILE)?).into_owned();
    Ok(Restored { state, config_yaml })
}

pub fn report_save(report: &mla_storage::SaveReport, cfg: &RunConfig) -> anyhow::Result<()> {
    match &report.result {
        Ok(m) => {
            info!(
                "checkpoint {} saved: {} in {:.1} s",
                report.step,
                metrics::human_bytes(m.total_bytes()),
                report.elapsed.as_secs_f64()
            );
            Ok(())
        }
        Err(e) => {
            warn!(
                "checkpoint {} FAILED ({} in a row): {e}",
                report.step, report.consecutive_failures
            );
            if cfg.checkpoint.on_failure == OnSaveFailure::Stop {
                bail!(
                    "checkpoint {} failed and checkpoint.on_failure is stop: {e}",
                    report.step
                );
            }
            Ok(())
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn save(
    cfg: &RunConfig,
    store: &BlockingCheckpointStore,
    saver: &mut Option<BackgroundSaver>,
    name: StepName,
    t: &crate::train::Trainable,
    state: &TrainState,
    tokenizer_dir: &std::path::Path,
    main: bool,
) -> anyhow::Result<()> {
    if !main {
        return Ok(());
    }
    let job = snapshot(
        name,
        &t.flat,
        &t.opt,
        state,
        cfg,
        tokenizer_dir,
        cfg.checkpoint.keep_last,
    )?;
    match saver {
        Some(s) => {
            if let Some(previous) = s.save(job) {
                report_save(&previous, cfg)?;
            }
        }
        None => {
            let started = Instant::now();
            let step = job.step.clone();
            match store.write_step(&job.step, &job.objects, job.meta) {
                Ok(m) => {
                    info!(
                        "checkpoint {step} saved: {} in {:.1} s",
                        metrics::human_bytes(m.total_bytes()),
                        started.elapsed().as_secs_f64()
                    );
                    if let Some(k) = job.keep_last {
                        store.retain(k)?;
                    }
                }
                Err(e) if cfg.checkpoint.on_failure == OnSaveFailure::Continue => {
                    warn!("checkpoint {step} FAILED: {e}");
                }
                Err(e) => return Err(e).context(format!("checkpoint {step}")),
            }
        }
    }
    Ok(())
}

/// Apply `resume` / `initial_checkpoint_dir`; returns the restored state when resuming.
pub(crate) fn resume(
    cfg: &RunConfig,
    store: &BlockingCheckpointStore,
    t: &mut crate::train::Trainable,
) -> anyhow::Result<Option<Restored>> {
    let loaded = match &cfg.resume {
        Resume::No => None,
        Resume::Auto | Resume::Latest => {
            let latest = store.load_latest_valid()?;
            for s in &latest.skipped {
                warn!("resume: skipping checkpoint {}: {}", s.step, s.reason);
            }
            match latest.found {
                Some(l) => Some((store.url().to_string(), l)),
                None if cfg.resume == Resume::Latest => {
                    return Err(BadInput(format!(
                        "resume: true but {} holds no valid checkpoint (use resume: auto to start fresh)",
                        cfg.out_dir
                    ))
                    .into())
                }
                None => {
                    info!("resume: auto — no checkpoint under {}, starting fresh", cfg.out_dir);
                    None
                }
            }
        }
        Resume::Path(p) => {
            let (s, step) =
                BlockingCheckpointStore::resolve(p).with_context(|| format!("resume: {p}"))?;
            Some((
                p.clone(),
                s.load_step(&step).with_context(|| format!("resume: {p}"))?,
            ))
        }
    };
    if let Some((url, l)) = loaded {
        if l.manifest.config_digest != config_digest(cfg) {
            return Err(BadInput(format!(
                "resume: {url}/{} was trained with another model shape (config digest {} ≠ {}); point out_dir elsewhere or set resume: false",
                l.step,
                l.manifest.config_digest,
                config_digest(cfg)
            ))
            .into());
        }
        let where_ = format!("{}/{}", url.trim_end_matches('/'), l.step);
        let restored = restore(&l.objects, &where_, &t.flat, &mut t.opt)?;
        info!("resume: loaded {where_} (step {})", restored.state.step);
        return Ok(Some(restored));
    }
    if let Some(dir) = &cfg.initial_checkpoint_dir {
        let (s, step) = BlockingCheckpointStore::resolve(dir)
            .with_context(|| format!("initial_checkpoint_dir: {dir}"))?;
        let l = s
            .load_step(&step)
            .with_context(|| format!("initial_checkpoint_dir: {dir}"))?;
        let bytes = l
            .object(MODEL_FILE)
            .with_context(|| format!("initial_checkpoint_dir: {dir} has no {}", MODEL_FILE))?;
        load_model(&t.flat, bytes, dir)?;
        info!("initial weights from {dir}");
    }
    Ok(None)
}
