//! `mla eval <checkpoint> --data <path>`: mean next-token loss (and perplexity) of a
//! checkpoint on a dataset — a prepared dataset directory (its val split, or `--split train`)
//! or raw text/json files, tokenized on the fly with the checkpoint's tokenizer, or a prepared
//! dataset on object storage (`--data s3://bucket/prefix`).
//!
//! Raw text is tokenized into a temporary directory, but every message names the text.

use crate::data::{
    is_prepared, open_remote, prepare_into, remote_url, Dataset, EvalLoader, LocalDir, OpenOptions,
    PrepareArgs, Split,
};
use crate::device::{self, DeviceKind};
use crate::error::BadInput;
use crate::inference::{self, InferencePrecision};
use crate::train::loss::tokens_to_batch;
use anyhow::Context;
use mla_model::Gpt;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitArg {
    Train,
    Val,
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Checkpoint step directory or URL.
    checkpoint: String,
    /// Prepared dataset directory or object-store URL (s3://…), or text/json files (or a
    /// directory of them) to evaluate on.
    #[arg(long, value_name = "PATH|URL")]
    data: PathBuf,
    /// Split of a prepared dataset.
    #[arg(long, value_enum, default_value_t = SplitArg::Val)]
    split: SplitArg,
    /// Micro-batches to evaluate (default: all windows).
    #[arg(long)]
    max_iters: Option<u64>,
    #[arg(long, default_value_t = 8)]
    micro_batch_size: usize,
    /// Window length (default: the model's block size).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[arg(long, value_enum)]
    device: Option<DeviceKind>,
    /// Weights and compute dtype (default: bf16-true on CUDA, 32-true on CPU; bf16-mixed:
    /// fp32 weights under bf16 autocast on CUDA).
    #[arg(long, value_enum)]
    precision: Option<InferencePrecision>,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    let device = device::select(args.device, 0)?;
    let m = inference::load(
        &args.checkpoint,
        device,
        inference::kind(args.precision, device),
    )?;
    let split = match args.split {
        SplitArg::Train => Split::Train,
        SplitArg::Val => Split::Val,
    };
    if remote_url(&args.data.to_string_lossy()).is_none() && !args.data.exists() {
        return Err(BadInput(format!("--data {}: does not exist", args.data.display())).into());
    }
    // Outlives the dataset read from it.
    let tmp = tempfile::tempdir().context("temp dir for the tokenized --data")?;
    let (dataset, split) = if let Some(d) = open_prepared(&args.data)? {
        (d, split)
    } else {
        // The checkpoint's own tokenizer (with its tokenizer_config.json: the same separator
        // as in training), and the text as the val split only: nothing is tokenized twice.
        let dir = tmp.path().join("data");
        let mut p = PrepareArgs::new(Vec::new(), m.tokenizer.path(), &dir);
        p.val = vec![args.data.clone()];
        p.stop = Some(crate::signals::stop_requested);
        prepare_into(&p, &m.tokenizer, &LocalDir::new(&dir))?;
        (Dataset::open(&dir)?.named(&args.data), Split::Val)
    };
    if dataset.index().tokenizer.sha256 != m.tokenizer.sha256() {
        return Err(BadInput(format!(
            "--data {}: tokenized with another tokenizer than the checkpoint's",
            args.data.display()
        ))
        .into());
    }
    let seq_len = args.seq_len.unwrap_or(m.cfg.model().block_size);
    let loader = EvalLoader::new(
        dataset.split(split),
        seq_len,
        args.micro_batch_size,
        0,
        1,
        args.max_iters,
    )?;
    let started = Instant::now();
    let autocast = inference::autocast(args.precision, device);
    let (loss, n) = mean_loss(&m.model, &loader, args.micro_batch_size, seq_len, autocast)?;
    let tokens = n * (args.micro_batch_size * seq_len) as u64;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"checkpoint": m.source, "loss": loss, "perplexity": loss.exp(), "tokens": tokens, "batches": n})
        );
    } else {
        println!(
            "{}: loss {loss:.4}, perplexity {:.2} over {tokens} tokens ({n} batches, {:.1} s)",
            m.source,
            loss.exp(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// A prepared dataset at `data`: an object-store URL, or a local directory `mla prepare` wrote
/// (`None` for anything else: text files to tokenize).
pub(super) fn open_prepared(data: &Path) -> anyhow::Result<Option<Dataset>> {
    if let Some(url) = remote_url(&data.to_string_lossy()) {
        // Shard checksums remembered as for runs whose out_dir is on object storage.
        let memo = PathBuf::from(".cache/mla/data/remote-sha256");
        return Ok(Some(open_remote(url, Some(memo), OpenOptions::default())?));
    }
    Ok(is_prepared(data).then(|| Dataset::open(data)).transpose()?)
}

/// Mean next-token loss of `model` over the windows of `loader` (each `micro_batch_size` rows
/// of `seq_len` + 1 tokens), and how many batches it took.
pub(super) fn mean_loss(
    model: &Gpt,
    loader: &EvalLoader,
    micro_batch_size: usize,
    seq_len: usize,
    autocast: bool,
) -> anyhow::Result<(f64, u64)> {
    let device = model.device();
    let (mut sum, mut n) = (0.0, 0u64);
    tch::no_grad(|| -> anyhow::Result<()> {
        for batch in loader.iter() {
            let (x, y) = tokens_to_batch(&batch?, micro_batch_size, seq_len, device)?;
            // Chunked over the vocabulary projection: no (B·T, V) fp32 logits at once.
            sum += crate::train::loss::mean_loss(model, &x, &y, autocast).double_value(&[]);
            n += 1;
        }
        Ok(())
    })?;
    Ok((sum / n.max(1) as f64, n))
}
