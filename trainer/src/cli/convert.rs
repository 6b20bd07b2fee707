//! `mla convert CHECKPOINT --to-mla OUT`: a trained MHA/GQA/MQA model (mla's own checkpoint,
//! or a litgpt / Hugging Face directory) as an MLA model, written as `OUT/final`, an ordinary
//! step directory that `initial_checkpoint_dir` continues from. The math is in
//! `mla_model::convert` (docs/design/mha2mla.md); this file loads, calibrates, measures and
//! writes.
//!
//! With `--data` (a prepared dataset), calibration batches of its train split weigh the
//! conversion by the model's real inputs, and the val loss is measured before and after.

use super::eval::{mean_loss, open_prepared};
use crate::checkpoint::{config_digest, read_tokenizer_files, CONFIG_FILE, MODEL_FILE};
use crate::config::{Resume, RunConfig};
use crate::data::{EvalLoader, Split};
use crate::device::{self, DeviceKind};
use crate::error::BadInput;
use crate::inference::{self, LoadedModel};
use crate::interop;
use crate::train::loss::tokens_to_batch;
use anyhow::Context;
use mla_model::convert::{self, Calibration, Factor, Options};
use mla_model::stats;
use mla_storage::{BlockingCheckpointStore, Bytes, ManifestMeta, StepName};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Kind, Tensor};
use tracing::{info, warn};

/// The factorisation of the latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FactorArg {
    /// MHA2MLA's joint SVD of the key/value weights (no data needed).
    Weights,
    /// TransMLA's PCA of the keys and values on the calibration batches (needs --data).
    Activations,
}

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Checkpoint step directory or URL, or a litgpt / Hugging Face model directory.
    checkpoint: String,
    /// Convert the attention into Multi-head Latent Attention (the one target for now).
    #[arg(long, required = true)]
    to_mla: bool,
    /// Output directory or URL: the converted model is written as its step `final`.
    out: String,
    /// Width C of the key/value latent (default: the largest that adds information,
    /// min(2·n_query_groups·head_size, n_embd), which is exact).
    #[arg(long)]
    kv_lora_rank: Option<usize>,
    /// Width of a query latent (default: a plain q_proj).
    #[arg(long)]
    q_lora_rank: Option<usize>,
    /// Rotated dims kept per head, Dr (default: all the source rotates); Dr = n/s keeps every
    /// s-th of the source's n/2 RoPE frequencies.
    #[arg(long)]
    rope_dims: Option<usize>,
    /// How the latent is factored (default: activations with --data, else weights).
    #[arg(long, value_enum)]
    factor: Option<FactorArg>,
    /// Prepared dataset (directory or s3:// URL) for calibration (its train split) and the
    /// val loss before and after (its val split).
    #[arg(long, value_name = "PATH|URL")]
    data: Option<PathBuf>,
    /// Calibration batches of --data's train split.
    #[arg(long, default_value_t = 16)]
    calib_batches: u64,
    /// Val batches for the loss before and after (0: every window of the val split).
    #[arg(long, default_value_t = 50)]
    eval_batches: u64,
    #[arg(long, default_value_t = 8)]
    micro_batch_size: usize,
    /// Replace an existing OUT/final.
    #[arg(long)]
    overwrite: bool,
    /// Print one JSON object (the report) instead of the table.
    #[arg(long)]
    json: bool,
    #[arg(long, value_enum)]
    device: Option<DeviceKind>,
}

pub fn run(args: &ConvertArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let device = device::select(args.device, 0)?;
    let m = inference::load(&args.checkpoint, device, Kind::Float)?;
    let factor = match (args.factor, &args.data) {
        (Some(FactorArg::Weights), _) | (None, None) => Factor::Weights,
        (Some(FactorArg::Activations), Some(_)) | (None, Some(_)) => Factor::Activations,
        (Some(FactorArg::Activations), None) => {
            return Err(
                BadInput("--factor activations: needs --data (calibration batches)".into()).into(),
            )
        }
    };
    let opts = Options {
        kv_lora_rank: args.kv_lora_rank,
        q_lora_rank: args.q_lora_rank,
        rope_dims: args.rope_dims,
        factor,
    };
    let plan =
        convert::plan(m.cfg.model(), &opts).map_err(|e| BadInput(format!("{}: {e}", m.source)))?;
    let store = open_out(args)?;
    let seq_len = m.cfg.model().block_size;
    let data = match &args.data {
        Some(path) => Some(Data::open(path, &m, seq_len, args)?),
        None => None,
    };

    let moments = data
        .as_ref()
        .map(|d| d.calibrate(&m, plan.source.n_layer, plan.source.n_embd))
        .transpose()?;
    let before = data
        .as_ref()
        .map(|d| d.val_loss(&m.model, "before"))
        .transpose()?;

    let weights =
        m.vs.variables()
            .into_iter()
            .map(|(k, t)| (k, t.to_device(tch::Device::Cpu)))
            .collect();
    let converted = plan
        .convert(&weights, moments.as_ref().map(|(m, _)| m.as_slice()))
        .map_err(|e| BadInput(format!("{}: {e}", m.source)))?;

    let (cfg, what) = converted_config(&m, &plan, &args.out)?;
    let (_vs, model) = inference::build(&cfg, &converted.weights, &what, device, Kind::Float)?;
    let after = data
        .as_ref()
        .map(|d| d.val_loss(&model, "after"))
        .transpose()?;

    let report = Report {
        source: &m.source,
        out: &what,
        plan: &plan,
        factor,
        calibration_tokens: moments.as_ref().map(|(_, tokens)| *tokens),
        loss_before: before.map(|(l, _)| l),
        loss_after: after.map(|(l, _)| l),
        val_tokens: before.map(|(_, t)| t),
        layers: &converted.layers,
    };
    let json = report.json();
    write_step(&store, &cfg, &m, &converted.weights, &json)?;
    if args.json {
        println!("{json}");
    } else {
        report.print();
    }
    info!(
        "converted {} to MLA in {:.1} s: {what}; continue pretraining with `mla-launch --config {what}/{CONFIG_FILE}` (initial_checkpoint_dir {what}, out_dir {})",
        m.source,
        started.elapsed().as_secs_f64(),
        cfg.out_dir
    );
    Ok(())
}

/// The source run's config around the converted model, set to continue pretraining from the
/// converted weights (`OUT/final`, returned too) into `OUT/pretrain` (a rerun resumes it).
fn converted_config(
    m: &LoadedModel,
    plan: &convert::Plan,
    out: &str,
) -> anyhow::Result<(RunConfig, String)> {
    let out = out_location(out)?;
    let step = format!("{out}/{}", StepName::Final);
    let mut cfg: RunConfig = m.cfg.clone();
    cfg.model_name = None;
    cfg.model_config = Some(plan.target.clone());
    cfg.initial_checkpoint_dir = Some(step.clone());
    cfg.out_dir = format!("{out}/pretrain");
    cfg.resume = Resume::Auto;
    if cfg.tokenizer_dir.is_none() && !out.contains("://") {
        // A litgpt or HF source's run config names no tokenizer; the step carries its files.
        cfg.tokenizer_dir = Some(step.clone());
    }
    Ok((cfg, step))
}

/// The output store, refusing an existing `final` unless `--overwrite`.
fn open_out(args: &ConvertArgs) -> anyhow::Result<BlockingCheckpointStore> {
    let store = BlockingCheckpointStore::open(&args.out)
        .map_err(|e| BadInput(format!("OUT {}: {e}", args.out)))?;
    let exists = store
        .list()
        .with_context(|| format!("listing {}", args.out))?
        .iter()
        .any(|s| s.step == StepName::Final && s.manifest.is_some());
    if exists && !args.overwrite {
        return Err(BadInput(format!(
            "OUT {}: already holds a final step (--overwrite replaces it)",
            store.url()
        ))
        .into());
    }
    // The continued pretraining of an earlier conversion: with resume: auto the new config
    // would resume it instead of starting from the new weights.
    let pretrain = format!("{}/pretrain", args.out.trim_end_matches('/'));
    if let Ok(earlier) = BlockingCheckpointStore::open(&pretrain) {
        if earlier.list().is_ok_and(|steps| !steps.is_empty()) {
            warn!("{pretrain} holds checkpoints of an earlier continued pretraining: a run of the new config resumes them (resume: auto); delete them, or give the run another out_dir");
        }
    }
    Ok(store)
}

/// OUT as the converted config names it: a URL as given, a local path made absolute (the
/// config may be used from another directory).
fn out_location(out: &str) -> anyhow::Result<String> {
    let out = out.trim_end_matches('/');
    if out.contains("://") {
        return Ok(out.to_string());
    }
    let abs = std::path::absolute(out).with_context(|| format!("OUT {out}"))?;
    Ok(abs.to_string_lossy().into_owned())
}

/// `--data`: the calibration and val windows.
struct Data {
    name: String,
    calibration: EvalLoader,
    val: EvalLoader,
    micro_batch_size: usize,
    seq_len: usize,
}

impl Data {
    fn open(
        path: &Path,
        m: &LoadedModel,
        seq_len: usize,
        args: &ConvertArgs,
    ) -> anyhow::Result<Data> {
        let name = path.display().to_string();
        let dataset = open_prepared(path)?.ok_or_else(|| {
            BadInput(format!(
                "--data {name}: not a prepared dataset (make one with `mla prepare`)"
            ))
        })?;
        if dataset.index().tokenizer.sha256 != m.tokenizer.sha256() {
            return Err(BadInput(format!(
                "--data {name}: tokenized with another tokenizer than the checkpoint's"
            ))
            .into());
        }
        let loader = |split, max| {
            EvalLoader::new(
                dataset.split(split),
                seq_len,
                args.micro_batch_size,
                0,
                1,
                max,
            )
        };
        Ok(Data {
            calibration: loader(Split::Train, Some(args.calib_batches))?,
            val: loader(
                Split::Val,
                (args.eval_batches > 0).then_some(args.eval_batches),
            )?,
            name,
            micro_batch_size: args.micro_batch_size,
            seq_len,
        })
    }

    /// The per-layer input moments of the calibration batches, and the positions they cover.
    fn calibrate(
        &self,
        m: &LoadedModel,
        n_layer: usize,
        n_embd: usize,
    ) -> anyhow::Result<(Vec<Tensor>, u64)> {
        let t = Instant::now();
        info!("calibrating on the train split of {}…", self.name);
        let mut cal = Calibration::new(n_layer, n_embd);
        for batch in self.calibration.iter() {
            let (x, _) = tokens_to_batch(
                &batch?,
                self.micro_batch_size,
                self.seq_len,
                m.model.device(),
            )?;
            cal.add(&tch::no_grad(|| m.model.attention_inputs(&x)));
        }
        info!(
            "calibrated on {} positions of {} (train split) in {:.1} s",
            cal.tokens(),
            self.name,
            t.elapsed().as_secs_f64()
        );
        Ok((cal.moments(), cal.tokens()))
    }

    /// Mean val loss of `model` and the positions it covered.
    fn val_loss(&self, model: &mla_model::Gpt, which: &str) -> anyhow::Result<(f64, u64)> {
        let t = Instant::now();
        let (loss, batches) =
            mean_loss(model, &self.val, self.micro_batch_size, self.seq_len, false)?;
        let tokens = batches * (self.micro_batch_size * self.seq_len) as u64;
        info!(
            "val loss {which}: {loss:.4} over {tokens} positions ({:.1} s)",
            t.elapsed().as_secs_f64()
        );
        Ok((loss, tokens))
    }
}

/// `OUT/final`: the weights, the run config (the source's, with the converted model) and the
/// tokenizer; the report goes into `conversion.json` and the manifest's `extra`.
fn write_step(
    store: &BlockingCheckpointStore,
    cfg: &RunConfig,
    m: &LoadedModel,
    weights: &std::collections::HashMap<String, Tensor>,
    report: &serde_json::Value,
) -> anyhow::Result<()> {
    let mut tensors: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let source = report["source"].as_str().unwrap_or_default();
    let yaml = format!(
        "# Converted from {source} by `mla convert --to-mla` (see conversion.json).\n{}",
        cfg.to_yaml()
    );
    // The config must load back as the model it describes.
    RunConfig::from_yaml(&yaml, CONFIG_FILE, &[]).context("the converted run config")?;
    let mut objects = vec![
        (
            MODEL_FILE.to_string(),
            Bytes::from(interop::safetensors_bytes(&tensors)?),
        ),
        (CONFIG_FILE.to_string(), Bytes::from(yaml)),
        (
            "conversion.json".to_string(),
            Bytes::from(serde_json::to_vec_pretty(report)?),
        ),
    ];
    objects.extend(read_tokenizer_files(m.tokenizer_dir())?);
    let meta = ManifestMeta {
        step: 0,
        tokens_seen: 0,
        world_size: 1,
        config_digest: config_digest(cfg),
        extra: serde_json::json!({ "converted_from": source }),
    };
    store
        .write_step(&StepName::Final, &objects, meta)
        .with_context(|| format!("writing {}/final", store.url()))?;
    Ok(())
}

/// What the conversion did and measured.
struct Report<'a> {
    source: &'a str,
    out: &'a str,
    plan: &'a convert::Plan,
    factor: Factor,
    calibration_tokens: Option<u64>,
    loss_before: Option<f64>,
    loss_after: Option<f64>,
    val_tokens: Option<u64>,
    layers: &'a [convert::LayerReport],
}

impl Report<'_> {
    fn json(&self) -> serde_json::Value {
        let (src, dst) = (&self.plan.source, &self.plan.target);
        let spec = dst.mla();
        serde_json::json!({
            "source": self.source,
            "out": self.out,
            "method": {
                "positions": "RoRoPE (TransMLA): per-frequency PCA across key heads into the shared rope key",
                "latent": match self.factor {
                    Factor::Weights => "joint SVD of the weights (MHA2MLA)",
                    Factor::Activations => "PCA of the key/value outputs, keys balanced to the values (TransMLA)",
                    Factor::Identity => "none",
                },
            },
            "source_attention": src.attention_kind().name(),
            "kv_lora_rank": spec.map(|s| s.kv_lora_rank),
            "q_lora_rank": spec.and_then(|s| s.q_lora_rank),
            "qk_rope_head_dim": spec.map(|s| s.qk_rope_head_dim),
            "calibration_tokens": self.calibration_tokens,
            "kv_cache_values_per_token": {
                "before": stats::kv_cache_values_per_token(src),
                "after": stats::kv_cache_values_per_token(dst),
            },
            "parameters": {
                "before": stats::parameters(src),
                "after": stats::parameters(dst),
            },
            "val_loss": { "before": self.loss_before, "after": self.loss_after, "tokens": self.val_tokens },
            "layers": self.layers.iter().map(|l| serde_json::json!({
                "rope_energy_kept": l.rope_energy_kept,
                "kv_energy_kept": l.kv_energy_kept,
                "q_energy_kept": l.q_energy_kept,
            })).collect::<Vec<_>>(),
        })
    }

    fn print(&self) {
        let (src, dst) = (&self.plan.source, &self.plan.target);
        let q = self.layers.iter().any(|l| l.q_energy_kept.is_some());
        println!(
            "layer  rope energy kept  kv energy kept{}",
            if q { "  q energy kept" } else { "" }
        );
        for (i, l) in self.layers.iter().enumerate() {
            let qe = l
                .q_energy_kept
                .map_or(String::new(), |e| format!("  {:>13.4}", e));
            println!(
                "{i:>5}  {:>16.4}  {:>14.4}{qe}",
                l.rope_energy_kept, l.kv_energy_kept
            );
        }
        let (before, after) = (
            stats::kv_cache_values_per_token(src),
            stats::kv_cache_values_per_token(dst),
        );
        // bf16, the inference default on CUDA.
        println!(
            "KV cache per token: {} {before} values ({} bytes in bf16) → MLA {after} ({} bytes), {:.1}%",
            src.attention_kind().name(),
            2 * before,
            2 * after,
            100.0 * after as f64 / before as f64
        );
        println!(
            "parameters: {} → {}",
            stats::parameters(src),
            stats::parameters(dst)
        );
        match (self.loss_before, self.loss_after) {
            (Some(b), Some(a)) => println!(
                "val loss: {b:.4} → {a:.4} ({:+.4}) over {} positions",
                a - b,
                self.val_tokens.unwrap_or_default()
            ),
            _ => println!("val loss: not measured (no --data)"),
        }
    }
}
