//! `initial_checkpoint_dir`: the weights a fresh run starts from (litgpt's
//! `pretrain --initial_checkpoint_dir`). It names an mla step or out_dir (read through
//! checkpoint/) or a litgpt / Hugging Face model directory (read through interop/import.rs);
//! either must describe the run's model field for field. Only the weights are taken: the
//! optimizer, the step and the data position start fresh.
//!
//! Not here: resuming a run (checkpoint::resume, which takes precedence over this).

use crate::checkpoint::{load_location, tokenizer_sha256, CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE};
use crate::config::RunConfig;
use crate::error::BadInput;
use crate::interop::import;
use crate::optim::{state, FlatParams};
use std::path::Path;
use tracing::{info, warn};

/// Copy the weights `dir` names into `flat`, checked against the run's model, and warn when
/// they were trained with another tokenizer than `tokenizer_dir`'s.
pub(crate) fn load(
    cfg: &RunConfig,
    flat: &FlatParams,
    dir: &str,
    tokenizer_dir: &Path,
) -> anyhow::Result<()> {
    let (url, saved_tok) = match import::detect(dir) {
        Some(source) => load_foreign(cfg, flat, dir, source)?,
        None => {
            let (url, l) = load_location(dir, "initial_checkpoint_dir")?;
            let bytes = l.object(MODEL_FILE).ok_or_else(|| {
                BadInput(format!("initial_checkpoint_dir: {url} has no {MODEL_FILE}"))
            })?;
            if let Some(yaml) = l.object(CONFIG_FILE) {
                let theirs = RunConfig::from_yaml(
                    &String::from_utf8_lossy(yaml),
                    &format!("{url}/{CONFIG_FILE}"),
                    &[],
                )?;
                same_model(cfg, theirs.model(), &url)?;
            }
            state::load_model(flat, bytes, &format!("{url}/{MODEL_FILE}"))?;
            (
                url,
                l.manifest.object(TOKENIZER_FILE).map(|o| o.sha256.clone()),
            )
        }
    };
    if let (Some(saved), Some(ours)) = (saved_tok, tokenizer_sha256(tokenizer_dir)?) {
        if !saved.eq_ignore_ascii_case(&ours) {
            warn!(
                "initial_checkpoint_dir: {url} was trained with another tokenizer than tokenizer_dir {}",
                tokenizer_dir.display()
            );
        }
    }
    info!(
        "initial weights from {url} (weights only: optimizer, step and data position start fresh)"
    );
    Ok(())
}

/// Weights from a litgpt or Hugging Face model directory; its name and its tokenizer's sha256.
fn load_foreign(
    cfg: &RunConfig,
    flat: &FlatParams,
    dir: &str,
    source: import::Source,
) -> anyhow::Result<(String, Option<String>)> {
    let foreign = import::read(dir, source)?;
    let what = format!("{} ({} model)", foreign.dir.display(), source.name());
    same_model(cfg, &foreign.model, &what)?;
    state::load_weights(flat, &foreign.weights, &what)?;
    Ok((what, tokenizer_sha256(&foreign.dir)?))
}

/// Refuse initial weights of a model that computes differently from the run's, naming each
/// field (shapes alone would let a different rotary fraction or norm through).
fn same_model(cfg: &RunConfig, theirs: &mla_model::ModelConfig, what: &str) -> anyhow::Result<()> {
    let tied = |t: bool| if t { "tied" } else { "untied" };
    if cfg.model().tie_embeddings != theirs.tie_embeddings {
        return Err(BadInput(format!(
            "initial_checkpoint_dir: {what} has {} embeddings, and train.tie_embeddings asks for {} ones",
            tied(theirs.tie_embeddings),
            tied(cfg.model().tie_embeddings)
        ))
        .into());
    }
    let diffs = cfg.model().differences(theirs);
    if diffs.is_empty() {
        return Ok(());
    }
    let list = diffs
        .iter()
        .map(|(k, ours, other)| format!("model_config.{k} is {ours} here, {other} there"))
        .collect::<Vec<_>>()
        .join("; ");
    Err(BadInput(format!(
        "initial_checkpoint_dir: {what} is another model: {list}"
    ))
    .into())
}
