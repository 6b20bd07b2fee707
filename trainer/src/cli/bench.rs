//! `mla bench decode (CHECKPOINT | --config F)`: inference speed and cache size per prompt
//! length, batch size and attention path (report/decode.rs measures). A table on stdout (or
//! JSON with `--json`), one line per finished case on stderr, and a summary line.

use crate::config::{Override, RunConfig};
use crate::device::{self, DeviceKind};
use crate::error::BadInput;
use crate::inference::{self, InferencePrecision};
use crate::metrics::human_bytes;
use crate::report::decode::{self, DecodeOptions, DecodePath, DecodeResult};
use mla_model::Gpt;
use std::path::PathBuf;
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Debug, clap::Subcommand)]
enum BenchWhat {
    /// Prefill and decode speed, cache bytes and peak memory of the inference paths.
    Decode(DecodeArgs),
}

#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
    /// Checkpoint step directory or URL (e.g. out/pretrain/mla/final).
    #[arg(required_unless_present = "config", conflicts_with = "config")]
    checkpoint: Option<String>,
    /// Benchmark the model of a run config with random weights instead (speed does not
    /// depend on the weights).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Prompt lengths in tokens (default: those of 128, 512, 2048 that fit the block size).
    #[arg(long, value_delimiter = ',')]
    contexts: Vec<usize>,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8])]
    batch: Vec<usize>,
    /// Tokens generated after each prompt, warm-up included.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Untimed decode steps before the timed ones.
    #[arg(long, default_value_t = 4)]
    warmup: usize,
    /// Paths: naive, absorbed (MLA), kv (MHA/GQA/MQA; naive and absorbed name it too), none.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [DecodePath::Naive, DecodePath::Absorbed])]
    attention: Vec<DecodePath>,
    /// Compute device (default: CUDA when available, else CPU).
    #[arg(long, value_enum)]
    device: Option<DeviceKind>,
    /// Weights, cache and compute dtype (default: bf16-true on CUDA, 32-true on CPU).
    #[arg(long, value_enum)]
    precision: Option<InferencePrecision>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &BenchArgs, overrides: &[Override]) -> anyhow::Result<()> {
    match &args.what {
        BenchWhat::Decode(a) => run_decode(a, overrides),
    }
}

/// The model to measure and a name for it: a checkpoint's weights, or a config's random ones.
fn model(
    args: &DecodeArgs,
    overrides: &[Override],
    device: Device,
    kind: Kind,
) -> anyhow::Result<(Gpt, VarStore, String)> {
    if let Some(path) = &args.config {
        let cfg = RunConfig::load(path, overrides)?;
        let mut vs = VarStore::new(device);
        let model = Gpt::new(&vs.root(), cfg.model())?;
        if kind == Kind::BFloat16 {
            vs.bfloat16();
        }
        vs.freeze();
        return Ok((model, vs, format!("{} (random weights)", path.display())));
    }
    if !overrides.is_empty() {
        return Err(
            BadInput("config overrides need --config (a checkpoint keeps its own)".into()).into(),
        );
    }
    let ckpt = args.checkpoint.as_deref().unwrap_or_default();
    let m = inference::load(ckpt, device, kind)?;
    Ok((m.model, m.vs, m.source))
}

/// Contexts of `args`, or the default ones that fit `block` with the new tokens.
pub fn contexts(explicit: &[usize], block: usize, new_tokens: usize) -> Vec<usize> {
    if !explicit.is_empty() {
        return explicit.to_vec();
    }
    let fit: Vec<usize> = [128, 512, 2048]
        .into_iter()
        .filter(|c| c + new_tokens <= block)
        .collect();
    if fit.is_empty() {
        vec![(block.saturating_sub(new_tokens)).max(1)]
    } else {
        fit
    }
}

fn run_decode(args: &DecodeArgs, overrides: &[Override]) -> anyhow::Result<()> {
    let device = device::select(args.device, 0)?;
    let kind = inference::kind(args.precision, device);
    let (model, _vs, source) = model(args, overrides, device, kind)?;
    let opts = DecodeOptions {
        contexts: contexts(&args.contexts, model.config().block_size, args.new_tokens),
        batches: args.batch.clone(),
        new_tokens: args.new_tokens,
        warmup: args.warmup,
        paths: args.attention.clone(),
    };
    decode::check(&opts, &model).map_err(BadInput)?;
    let attention = model.config().attention_kind().name();
    eprintln!(
        "decode benchmark: {source} ({attention}) on {} in {kind:?}; contexts {:?}, batch {:?}, \
         {} new tokens ({} warm-up)",
        device::describe(device),
        opts.contexts,
        opts.batches,
        opts.new_tokens,
        opts.warmup
    );
    let started = Instant::now();
    let results = decode::run(&model, kind, device, &opts, |r| {
        eprintln!("  {}", row(r));
    })?;
    if args.json {
        let obj = serde_json::json!({
            "source": source,
            "attention": attention,
            "device": device::describe(device),
            "dtype": format!("{kind:?}"),
            "new_tokens": opts.new_tokens,
            "warmup": opts.warmup,
            "results": results,
        });
        println!("{obj}");
    } else {
        println!("{}", header());
        for r in &results {
            println!("{}", row(r));
        }
    }
    eprintln!(
        "{} cases in {:.1} s{}",
        results.len(),
        started.elapsed().as_secs_f64(),
        speedup(&results)
    );
    Ok(())
}

fn header() -> String {
    format!(
        "{:>7} {:>5} {:<8} {:>13} {:>12} {:>9} {:>10} {:>10}",
        "context", "batch", "path", "prefill tok/s", "decode tok/s", "ms/step", "cache", "peak mem"
    )
}

fn row(r: &DecodeResult) -> String {
    format!(
        "{:>7} {:>5} {:<8} {:>13.1} {:>12.1} {:>9.2} {:>10} {:>10}",
        r.context,
        r.batch,
        r.path.name(),
        r.prefill_tokens_per_sec,
        r.decode_tokens_per_sec,
        r.decode_secs_per_step * 1e3,
        human_bytes(r.cache_bytes),
        r.peak_memory_bytes.map_or("-".into(), human_bytes)
    )
}

/// "; absorbed/naive decode speed 1.2× … at context C" for MLA results, else "".
fn speedup(results: &[DecodeResult]) -> String {
    let mut parts = Vec::new();
    for a in results.iter().filter(|r| r.path == DecodePath::Absorbed) {
        if let Some(n) = results
            .iter()
            .find(|n| n.path == DecodePath::Naive && n.context == a.context && n.batch == a.batch)
        {
            parts.push(format!(
                "{:.2}× at {}×{}",
                a.decode_tokens_per_sec / n.decode_tokens_per_sec,
                a.context,
                a.batch
            ));
        }
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("; absorbed/naive decode speed {}", parts.join(", "))
    }
}
