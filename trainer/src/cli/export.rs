//! `mla export CHECKPOINT --to litgpt|hf OUT`: a checkpoint (local path or URL) as another
//! program's model directory. The formats are in interop/; this file parses and reports.

use crate::error::BadInput;
use crate::inference;
use crate::interop;
use crate::metrics::human_bytes;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind};
use tracing::info;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// litgpt 0.5.13: lit_model.pth, model_config.yaml, tokenizer files.
    Litgpt,
    /// Hugging Face transformers: config.json, model.safetensors, tokenizer files (GPTNeoX for
    /// pythia's block, Llama for the LLaMA block, DeepSeek-V2 for MLA of the LLaMA block).
    Hf,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Checkpoint step directory or URL (e.g. out/pretrain/mha/final).
    checkpoint: String,
    /// The format to write.
    #[arg(long, value_enum)]
    to: Format,
    /// Output directory (created; an existing one is replaced only with --overwrite).
    out: PathBuf,
    /// Replace an existing output directory (once the new one is complete).
    #[arg(long)]
    overwrite: bool,
}

pub fn run(args: &ExportArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    if args.out.as_os_str().is_empty() {
        return Err(BadInput("OUT: empty path".into()).into());
    }
    // Weights as trained: fp32, on the CPU.
    let m = inference::load(&args.checkpoint, Device::Cpu, Kind::Float)?;
    let (e, hint) = match args.to {
        Format::Litgpt => (
            interop::litgpt::export(&m, &args.out, args.overwrite)?,
            format!("litgpt generate {} --precision 32-true", args.out.display()),
        ),
        Format::Hf => (
            interop::hf::export(&m, &args.out, args.overwrite)?,
            format!(
                "AutoModelForCausalLM.from_pretrained(\"{}\")",
                args.out.display()
            ),
        ),
    };
    info!(
        "exported {} to {} ({}): {} tensors, {} in {:.1} s (try: {hint})",
        m.source,
        args.out.display(),
        e.form,
        e.tensors,
        human_bytes(e.weight_bytes),
        start.elapsed().as_secs_f64(),
    );
    Ok(())
}
