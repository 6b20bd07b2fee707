//! `mla generate <checkpoint_dir>`: sample text from a checkpoint (local path or URL), or from a
//! litgpt or Hugging Face model directory. The prompt of an mla checkpoint is prefixed by the
//! tokenizer's story separator, as every training story is; a litgpt or HF directory's prompt
//! is framed as litgpt frames it (interop::import::Framing). litgpt's flag spellings
//! (`--max_new_tokens`, `--top_k`, `--top_p`, `--num_samples`) are accepted too.
//! With `--temperature 0` the text is the greedy continuation and does not depend on
//! `--attention` or `--no-cache`. Text goes to stdout; speed, cache size and memory to stderr.

use crate::device::{self, DeviceKind};
use crate::error::BadInput;
use crate::inference::{self, InferencePrecision};
use crate::metrics::human_bytes;
use mla_model::sampling::{Sampler, SamplingParams};
use mla_model::{AttentionKind, Gpt, MlaDecode};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Attention {
    /// Up-project cached latents to per-head K/V each step.
    Naive,
    /// W_uk/W_uv absorbed: attention over the compressed latent (MLA only).
    Absorbed,
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint step directory or URL (e.g. out/pretrain/mla/final).
    checkpoint: String,
    #[arg(long, default_value = "Once upon a time,")]
    prompt: String,
    #[arg(long, alias = "max_new_tokens", default_value_t = 100)]
    max_new_tokens: usize,
    // Negative numbers parse (clap would take `-1` for a flag) so that `run` can say what the
    // valid range is.
    /// 0 = greedy; must be ≥ 0.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    temperature: f64,
    /// Keep the K most likely tokens (0 or less = off).
    #[arg(
        long,
        alias = "top_k",
        default_value_t = 50,
        allow_negative_numbers = true
    )]
    top_k: i64,
    /// Nucleus sampling mass, in (0, 1] (1 = off).
    #[arg(
        long,
        alias = "top_p",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    top_p: f64,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    #[arg(long, alias = "num_samples", default_value_t = 1)]
    num_samples: usize,
    /// MLA attention path at inference (ignored for MHA/GQA/MQA).
    #[arg(long, value_enum, default_value_t = Attention::Absorbed)]
    attention: Attention,
    /// Recompute the whole sequence every step instead of using the cache.
    #[arg(long)]
    no_cache: bool,
    /// Compute device (default: CUDA when available, else CPU).
    #[arg(long, value_enum)]
    device: Option<DeviceKind>,
    /// Weights, cache and compute dtype (default: bf16-true on CUDA, 32-true on CPU;
    /// bf16-mixed: fp32 weights under bf16 autocast on CUDA).
    #[arg(long, value_enum)]
    precision: Option<InferencePrecision>,
}

pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    if args.temperature < 0.0 || args.temperature.is_nan() {
        return Err(BadInput(format!(
            "--temperature must be ≥ 0, got {}",
            args.temperature
        ))
        .into());
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(BadInput(format!("--top-p must be in (0, 1], got {}", args.top_p)).into());
    }
    if args.num_samples == 0 {
        return Err(BadInput("--num-samples must be at least 1".into()).into());
    }
    let device = device::select(args.device, 0)?;
    let kind = inference::kind(args.precision, device);
    let m = inference::load(&args.checkpoint, device, kind)?;
    let mut prompt: Vec<u32> = m.framing.bos.into_iter().collect();
    prompt.extend(m.tokenizer.encode(&args.prompt)?);
    if prompt.is_empty() {
        return Err(BadInput(
            "--prompt is empty and the model has no bos token to start from".into(),
        )
        .into());
    }
    let block = m.cfg.model().block_size;
    if prompt.len() + args.max_new_tokens > block {
        return Err(BadInput(format!(
            "prompt ({} tokens) + --max-new-tokens {} exceeds the model's block size {block}",
            prompt.len(),
            args.max_new_tokens
        ))
        .into());
    }
    let decode = match args.attention {
        Attention::Naive => MlaDecode::Naive,
        Attention::Absorbed => MlaDecode::Absorbed,
    };
    let is_mla = matches!(m.cfg.model().attention_kind(), AttentionKind::Mla(_));
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: (args.top_k > 0).then_some(args.top_k),
        top_p: (args.top_p < 1.0).then_some(args.top_p),
    };
    let mut sampler = Sampler::new(params, args.seed);
    let stop = m.framing.stop.map(i64::from);
    let started = Instant::now();
    let autocast = inference::autocast(args.precision, device);
    let out = tch::no_grad(|| {
        crate::autocast::bf16(autocast, || {
            generate(
                &m.model,
                &prompt,
                args,
                &mut sampler,
                decode,
                kind,
                device,
                stop,
            )
        })
    })?;
    let secs = started.elapsed().as_secs_f64();
    let generated: usize = out.tokens.iter().map(Vec::len).sum();
    for (i, toks) in out.tokens.iter().enumerate() {
        let ids: Vec<u32> = toks.iter().map(|&t| t as u32).collect();
        let text = m.tokenizer.decode(&ids)?;
        if args.num_samples > 1 {
            println!("--- sample {} ---", i + 1);
        }
        println!("{}{}", args.prompt, text);
    }
    let cache = match out.cache_bytes {
        Some(b) => format!(
            "{} cache {}",
            if is_mla {
                match decode {
                    MlaDecode::Absorbed => "compressed (absorbed)",
                    MlaDecode::Naive => "compressed (naive)",
                }
            } else {
                "KV"
            },
            human_bytes(b as u64)
        ),
        None => "no cache".to_string(),
    };
    let mem = device::peak_host_memory_bytes()
        .filter(|_| !device.is_cuda())
        .map(|b| format!(", peak host memory {}", human_bytes(b)))
        .unwrap_or_default();
    eprintln!(
        "{generated} tokens in {secs:.2} s ({:.1} tokens/s) from {} on {} in {kind:?}; {cache}{mem}",
        generated as f64 / secs.max(1e-9),
        m.source,
        device::describe(device),
    );
    Ok(())
}

struct Generated {
    tokens: Vec<Vec<i64>>,
    cache_bytes: Option<i64>,
}

#[allow(clippy::too_many_arguments)]
fn generate(
    model: &Gpt,
    prompt: &[u32],
    args: &GenerateArgs,
    sampler: &mut Sampler,
    decode: MlaDecode,
    kind: Kind,
    device: Device,
    stop: Option<i64>,
) -> anyhow::Result<Generated> {
    let b = args.num_samples as i64;
    let prompt: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let p = prompt.len() as i64;
    let idx = Tensor::from_slice(&prompt)
        .view([1, p])
        .expand([b, p], false)
        .to_device(device);
    let mut tokens: Vec<Vec<i64>> = vec![Vec::new(); args.num_samples];
    let mut done = vec![false; args.num_samples];
    let mut cache = if args.no_cache {
        None
    } else {
        Some(model.new_cache(b, p + args.max_new_tokens as i64, decode, kind)?)
    };
    let mut seq = idx.shallow_clone();
    let mut logits = match &mut cache {
        Some(c) => model.forward_cached_last(&idx, c)?,
        None => model.forward(&idx),
    };
    for _ in 0..args.max_new_tokens {
        let last = logits.select(1, logits.size()[1] - 1); // (B, V)
        let next = sampler.sample(&last);
        for (i, &t) in next.iter().enumerate() {
            if !done[i] {
                if Some(t) == stop {
                    done[i] = true;
                } else {
                    tokens[i].push(t);
                }
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        let next = Tensor::from_slice(&next).view([b, 1]).to_device(device);
        logits = match &mut cache {
            Some(c) => model.forward_cached_last(&next, c)?,
            None => {
                seq = Tensor::cat(&[seq, next], 1);
                model.forward(&seq)
            }
        };
    }
    Ok(Generated {
        tokens,
        cache_bytes: cache.map(|c| c.bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    /// The error `mla generate` gives for `flags`, checked before any checkpoint is read.
    fn refused(flags: &[&str]) -> (String, u8) {
        let argv = ["generate", "no-such-checkpoint"].iter().chain(flags);
        let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{flags:?} must parse: {e}"));
        let e = run(&cli.args).unwrap_err();
        (format!("{e:#}"), crate::cli::exit_code(&e))
    }

    #[test]
    fn negative_sampling_values_parse_and_are_refused_with_their_range() {
        assert_eq!(
            refused(&["--temperature", "-1"]),
            ("--temperature must be ≥ 0, got -1".into(), 2)
        );
        assert_eq!(
            refused(&["--top-p", "-0.5"]),
            ("--top-p must be in (0, 1], got -0.5".into(), 2)
        );
    }
}
