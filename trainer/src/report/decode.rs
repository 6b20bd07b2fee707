//! The decode benchmark behind `mla bench decode` and `mla report`: for each prompt length
//! (context), batch size and attention path, the prefill speed, the steady-state decode speed
//! after a warm-up, the cache's bytes and the peak memory.
//!
//! Paths: `kv` (the K/V cache of MHA/GQA/MQA), `naive` and `absorbed` (MLA's compressed cache,
//! re-expanded every step or attended in latent space) and `none` (no cache: every step runs
//! the whole sequence). Prompts are fixed pseudo-random token ids, decode feeds back the
//! greedy token: speed does not depend on the weights, so a random-init model measures the
//! same as a trained one.
//! Not here: loading the model (interop/load.rs), printing and flags (cli/bench.rs).

use crate::device;
use mla_model::{AttentionKind, Gpt, InferenceCache, MlaDecode};
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// One way of running inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DecodePath {
    /// The K/V cache of MHA/GQA/MQA.
    Kv,
    /// MLA: latents up-projected to per-head K/V every step.
    Naive,
    /// MLA: W_uk/W_uv absorbed, attention over the latent (prompts take the expanded form).
    Absorbed,
    /// No cache: every step recomputes the whole sequence.
    None,
}

impl DecodePath {
    pub fn name(self) -> &'static str {
        match self {
            DecodePath::Kv => "kv",
            DecodePath::Naive => "naive",
            DecodePath::Absorbed => "absorbed",
            DecodePath::None => "none",
        }
    }

    /// The paths `requested` means for `model`: MLA has naive and absorbed, other kinds one
    /// K/V cache (`naive`, `absorbed` and `kv` all name it there); order kept, duplicates dropped.
    pub fn resolve(requested: &[DecodePath], model: &Gpt) -> Vec<DecodePath> {
        let mla = matches!(model.config().attention_kind(), AttentionKind::Mla(_));
        let mut out = Vec::new();
        for &p in requested {
            let p = match p {
                DecodePath::Kv | DecodePath::Naive | DecodePath::Absorbed if !mla => DecodePath::Kv,
                DecodePath::Kv => DecodePath::Absorbed, // an MLA model's cache
                p => p,
            };
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Prompt lengths in tokens.
    pub contexts: Vec<usize>,
    pub batches: Vec<usize>,
    /// Tokens generated after each prompt (warm-up included).
    pub new_tokens: usize,
    /// Decode steps run before the timed ones.
    pub warmup: usize,
    pub paths: Vec<DecodePath>,
}

/// The figures of one (context, batch, path).
#[derive(Debug, Clone, Serialize)]
pub struct DecodeResult {
    pub context: usize,
    pub batch: usize,
    pub path: DecodePath,
    pub prefill_secs: f64,
    pub prefill_tokens_per_sec: f64,
    /// Timed decode steps (new_tokens − warmup).
    pub decode_steps: usize,
    /// Generated tokens per second at the median step time, all sequences of the batch counted.
    pub decode_tokens_per_sec: f64,
    /// Median time of one timed decode step (each step waits for its token).
    pub decode_secs_per_step: f64,
    /// Bytes of the cache for context + new_tokens positions (0 without a cache).
    pub cache_bytes: u64,
    /// CPU: the process's peak resident memory during this case; CUDA: the device's memory in
    /// use sampled after prefill and decode (all processes on the card: an upper bound).
    pub peak_memory_bytes: Option<u64>,
}

/// Refuse, before anything runs, options the model cannot serve: one line naming the flag.
pub fn check(opts: &DecodeOptions, model: &Gpt) -> Result<(), String> {
    let block = model.config().block_size;
    if opts.new_tokens <= opts.warmup {
        return Err(format!(
            "--new-tokens {} must exceed the {} warm-up steps",
            opts.new_tokens, opts.warmup
        ));
    }
    if opts.contexts.is_empty() || opts.batches.is_empty() || opts.paths.is_empty() {
        return Err("--contexts, --batch and --attention each need at least one value".into());
    }
    if let Some(&b) = opts.batches.iter().find(|&&b| b == 0) {
        return Err(format!("--batch {b}: batch sizes must be at least 1"));
    }
    for &c in &opts.contexts {
        if c == 0 || c + opts.new_tokens > block {
            return Err(format!(
                "--contexts {c}: a prompt of {c} tokens + --new-tokens {} must fit the model's \
                 block_size {block} (and be at least 1 token)",
                opts.new_tokens
            ));
        }
    }
    Ok(())
}

/// Fixed prompt token ids (B, T): a deterministic spread over the vocabulary.
fn prompt(batch: usize, context: usize, vocab: usize, device: Device) -> Tensor {
    let ids: Vec<i64> = (0..batch * context)
        .map(|i| ((i as u64 * 2_654_435_761 + 12_345) % vocab as u64) as i64)
        .collect();
    Tensor::from_slice(&ids)
        .view([batch as i64, context as i64])
        .to_device(device)
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Reset the process's peak-RSS counter (Linux: `5` to /proc/self/clear_refs), so VmHWM
/// measures from here on. False where the kernel does not offer it.
fn reset_host_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn memory_now(device: Device, host_reset: bool) -> Option<u64> {
    match device {
        Device::Cuda(i) => device::peak_gpu_memory_bytes(i),
        _ if host_reset => device::peak_host_memory_bytes(),
        _ => None,
    }
}

/// Greedy next tokens (B, 1) from last-position logits (B, 1, V).
fn greedy(logits: &Tensor) -> Tensor {
    logits.select(1, logits.size()[1] - 1).argmax(-1, true)
}

struct Decoder<'a> {
    model: &'a Gpt,
    cache: Option<InferenceCache>,
    seq: Tensor,
}

impl Decoder<'_> {
    fn step(&mut self, idx: &Tensor) -> anyhow::Result<Tensor> {
        Ok(match &mut self.cache {
            Some(c) => self.model.forward_cached_last(idx, c)?,
            None => {
                self.seq = if self.seq.numel() == 0 {
                    idx.shallow_clone()
                } else {
                    Tensor::cat(&[&self.seq, idx], 1)
                };
                let t = self.seq.size()[1];
                let hidden = self.model.hidden(&self.seq);
                self.model.logits(&hidden.narrow(1, t - 1, 1))
            }
        })
    }
}

/// Run one case (also the short untimed warm-up case [`run`] starts each path with).
fn case(
    model: &Gpt,
    kind: Kind,
    device: Device,
    context: usize,
    batch: usize,
    path: DecodePath,
    opts: &DecodeOptions,
) -> anyhow::Result<DecodeResult> {
    let host_reset = !device.is_cuda() && reset_host_peak();
    let cap = (context + opts.new_tokens) as i64;
    let cache = match path {
        DecodePath::None => None,
        DecodePath::Naive => Some(model.new_cache(batch as i64, cap, MlaDecode::Naive, kind)?),
        DecodePath::Kv | DecodePath::Absorbed => {
            Some(model.new_cache(batch as i64, cap, MlaDecode::Absorbed, kind)?)
        }
    };
    let cache_bytes = cache.as_ref().map_or(0, |c| c.bytes() as u64);
    let mut dec = Decoder {
        model,
        cache,
        seq: Tensor::zeros([0], (Kind::Int64, device)),
    };
    let idx = prompt(batch, context, model.config().vocab_size, device);
    // Prefill up to 3 times (while they take under 2 s in all) and keep the fastest: noise
    // from other processes only ever adds time.
    let (mut prefill_secs, mut spent) = (f64::INFINITY, 0.0);
    let mut logits = Tensor::zeros([0], (kind, device));
    for _ in 0..3 {
        if let Some(c) = &mut dec.cache {
            c.reset();
        }
        dec.seq = Tensor::zeros([0], (Kind::Int64, device));
        sync(device);
        let started = Instant::now();
        let out = dec.step(&idx)?;
        let _ = greedy(&out).int64_value(&[0, 0]);
        sync(device);
        let secs = started.elapsed().as_secs_f64();
        prefill_secs = prefill_secs.min(secs);
        spent += secs;
        logits = out;
        if spent > 2.0 {
            break;
        }
    }
    let mut next = greedy(&logits);
    let mut peak = memory_now(device, host_reset);
    for _ in 0..opts.warmup {
        logits = dec.step(&next)?;
        next = greedy(&logits);
    }
    sync(device);
    let steps = opts.new_tokens - opts.warmup;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let started = Instant::now();
        logits = dec.step(&next)?;
        next = greedy(&logits);
        sync(device);
        times.push(started.elapsed().as_secs_f64());
    }
    // The median step: one step delayed by another process on a shared machine moves it
    // little, and a real decode loop waits for each token anyway.
    times.sort_by(f64::total_cmp);
    let step_secs = times[steps / 2].max(1e-9);
    peak = peak.max(memory_now(device, host_reset));
    Ok(DecodeResult {
        context,
        batch,
        path,
        prefill_secs,
        prefill_tokens_per_sec: (batch * context) as f64 / prefill_secs.max(1e-9),
        decode_steps: steps,
        decode_tokens_per_sec: batch as f64 / step_secs,
        decode_secs_per_step: step_secs,
        cache_bytes,
        peak_memory_bytes: peak,
    })
}

/// Measure every (context, batch, path) of `opts` (checked with [`check`]) on `model`, in that
/// nesting order; `progress` hears of each finished case. Each path first runs a short
/// untimed case, so no figure includes first-call costs.
pub fn run(
    model: &Gpt,
    kind: Kind,
    device: Device,
    opts: &DecodeOptions,
    mut progress: impl FnMut(&DecodeResult),
) -> anyhow::Result<Vec<DecodeResult>> {
    let paths = DecodePath::resolve(&opts.paths, model);
    tch::no_grad(|| {
        let warm = DecodeOptions {
            new_tokens: 2,
            warmup: 1,
            ..opts.clone()
        };
        for &path in &paths {
            case(
                model,
                kind,
                device,
                opts.contexts[0].min(16),
                1,
                path,
                &warm,
            )?;
        }
        let mut out = Vec::new();
        for &context in &opts.contexts {
            for &batch in &opts.batches {
                for &path in &paths {
                    let r = case(model, kind, device, context, batch, path, opts)?;
                    progress(&r);
                    out.push(r);
                }
            }
        }
        Ok(out)
    })
}
