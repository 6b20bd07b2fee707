//! `mla download <owner/name> --tokenizer-only [--checkpoint-dir checkpoints]`: fetch a
//! model's tokenizer files from the Hugging Face hub (`HF_ENDPOINT` honoured) into
//! `<checkpoint_dir>/<owner>/<name>`, litgpt's layout, ready for `tokenizer_dir`.
//! Weights are not downloaded: mla pretrains from scratch, and `initial_checkpoint_dir`
//! takes an mla checkpoint.

use crate::data::{download_tokenizer, DownloadOptions};
use crate::error::BadInput;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// Hub repository, e.g. EleutherAI/pythia-160m.
    repo: String,
    /// Fetch tokenizer.json (and tokenizer_config.json); required.
    #[arg(long, alias = "tokenizer_only")]
    tokenizer_only: bool,
    /// Root of the litgpt-style checkpoint tree.
    #[arg(long, alias = "checkpoint_dir", default_value = "checkpoints")]
    checkpoint_dir: PathBuf,
}

pub fn run(args: &DownloadArgs) -> anyhow::Result<()> {
    if !args.tokenizer_only {
        return Err(BadInput(
            "mla download fetches tokenizers only (pass --tokenizer-only): mla pretrains from scratch and loads mla checkpoints".into(),
        )
        .into());
    }
    let dir = download_tokenizer(
        &args.repo,
        &args.checkpoint_dir,
        &DownloadOptions::default(),
    )?;
    println!("{}", dir.display());
    Ok(())
}
