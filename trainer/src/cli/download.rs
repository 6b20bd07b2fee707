//! `mla download OWNER/NAME [--tokenizer_only] [--checkpoint_dir checkpoints]`: a model from the
//! Hugging Face hub (`HF_ENDPOINT` and `HF_TOKEN` honoured) into `<checkpoint_dir>/<owner>/<name>`,
//! litgpt's layout: its config, weights and tokenizer files (interop/download.rs), or with
//! `--tokenizer_only` the tokenizer files alone (ready for `tokenizer_dir`). Prints the
//! directory; a summary line goes to the log.

use crate::data::{download_tokenizer, DownloadOptions};
use crate::interop;
use crate::metrics::human_bytes;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// Hub repository, e.g. EleutherAI/pythia-160m.
    repo: String,
    /// Fetch only tokenizer.json and tokenizer_config.json.
    #[arg(long, alias = "tokenizer_only")]
    tokenizer_only: bool,
    /// Root of the litgpt-style checkpoint tree.
    #[arg(long, alias = "checkpoint_dir", default_value = "checkpoints")]
    checkpoint_dir: PathBuf,
}

pub fn run(args: &DownloadArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let opts = DownloadOptions::default();
    if args.tokenizer_only {
        let dir = download_tokenizer(&args.repo, &args.checkpoint_dir, &opts)?;
        println!("{}", dir.display());
        return Ok(());
    }
    let d = interop::download::model(&args.repo, &args.checkpoint_dir, &opts)?;
    let m = &d.model;
    let kept = match d.kept {
        0 => String::new(),
        n => format!(", {n} already there"),
    };
    tracing::info!(
        "downloaded {} to {} ({}: {} layers, {} wide, {} heads): {} files, {}{kept} in {:.1} s \
         (try: mla generate {})",
        args.repo,
        d.dir.display(),
        d.form,
        m.n_layer,
        m.n_embd,
        m.n_head,
        d.fetched,
        human_bytes(d.bytes),
        start.elapsed().as_secs_f64(),
        d.dir.display()
    );
    println!("{}", d.dir.display());
    Ok(())
}
