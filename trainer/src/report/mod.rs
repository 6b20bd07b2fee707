//! The attention trade-off study and its report (DESIGN §8): the decode benchmark, the study
//! runner that trains a list of variants under one budget, and the report over finished runs
//! (report.md with the table and the plots, report.csv, report.json, PNGs).

pub mod decode;
pub mod plot;
pub mod study;
pub mod summary;
pub mod table;

use decode::{DecodeOptions, DecodePath};
use std::path::{Path, PathBuf};
use summary::RunSummary;
use tch::{Device, Kind};

/// How `mla report` measures decode.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    pub title: String,
    /// Prompt lengths; empty = block/8, block/2 and block − new_tokens of each model.
    pub contexts: Vec<usize>,
    pub batch: usize,
    pub new_tokens: usize,
    pub warmup: usize,
    /// Interleaved decode rounds; each case keeps its best.
    pub rounds: usize,
    pub device: Device,
    pub kind: Kind,
    /// The command line that made the report, quoted in it.
    pub command: String,
}

impl ReportOptions {
    fn decode(&self, block: usize) -> DecodeOptions {
        let contexts = if self.contexts.is_empty() {
            let mut c = vec![block / 8, block / 2, block.saturating_sub(self.new_tokens)];
            c.retain(|&c| c > 0);
            c.dedup();
            c
        } else {
            self.contexts.clone()
        };
        DecodeOptions {
            contexts,
            batches: vec![self.batch],
            new_tokens: self.new_tokens,
            warmup: self.warmup,
            paths: vec![DecodePath::Naive, DecodePath::Absorbed],
        }
    }
}

/// The files `write` produces in its output directory.
pub const PLOTS: [&str; 3] = ["val_loss.png", "tradeoff.png", "decode.png"];

/// Summarize `runs`, measure their decode speed, and write report.md, report.csv,
/// report.json and the plots into `out`. Progress goes to stderr.
///
/// Decode speed on a shared machine drifts by tens of percent over minutes, which would pass
/// for differences between models measured minutes apart. So all models are loaded first and
/// measured in `rounds` interleaved rounds (every model once per round), and each case keeps
/// its best round: noise only ever slows a case down.
pub fn write(
    runs: &[PathBuf],
    out: &Path,
    opts: &ReportOptions,
) -> anyhow::Result<Vec<RunSummary>> {
    std::fs::create_dir_all(out)
        .map_err(|e| crate::error::BadInput(format!("{}: cannot create: {e}", out.display())))?;
    let mut loaded = Vec::new();
    for dir in runs {
        let (summary, model) = summary::load(dir, opts.device, opts.kind)?;
        let decode = opts.decode(summary.block_size);
        decode::check(&decode, &model.model)
            .map_err(|e| crate::error::BadInput(format!("{}/final: {e}", dir.display())))?;
        loaded.push((summary, model, decode));
    }
    for round in 1..=opts.rounds {
        for (i, (summary, model, decode)) in loaded.iter_mut().enumerate() {
            eprintln!(
                "decode round {round}/{} [{}/{}] {}",
                opts.rounds,
                i + 1,
                runs.len(),
                summary.name
            );
            let results = decode::run(&model.model, opts.kind, opts.device, decode, |r| {
                eprintln!(
                    "      context {:>5} batch {} {:<8} decode {:>8.1} tok/s, prefill {:>9.1} tok/s",
                    r.context,
                    r.batch,
                    r.path.name(),
                    r.decode_tokens_per_sec,
                    r.prefill_tokens_per_sec
                )
            })?;
            if summary.decode.is_empty() {
                summary.decode = results;
                continue;
            }
            for (best, r) in summary.decode.iter_mut().zip(results) {
                let prefill = best.prefill_secs.min(r.prefill_secs);
                if r.decode_tokens_per_sec > best.decode_tokens_per_sec {
                    *best = r;
                }
                best.prefill_secs = prefill;
                best.prefill_tokens_per_sec =
                    (best.batch * best.context) as f64 / prefill.max(1e-9);
            }
        }
    }
    let summaries: Vec<RunSummary> = loaded.into_iter().map(|(s, _, _)| s).collect();
    table::write_data(out, &summaries)?;
    plot::val_loss(&out.join(PLOTS[0]), &summaries)?;
    plot::tradeoff(&out.join(PLOTS[1]), &summaries)?;
    plot::decode_speed(&out.join(PLOTS[2]), &summaries)?;
    std::fs::write(out.join("report.md"), markdown(&summaries, opts))?;
    Ok(summaries)
}

fn markdown(runs: &[RunSummary], opts: &ReportOptions) -> String {
    let first = runs.iter().flat_map(|r| r.decode.first()).next();
    let decode_note = match first {
        Some(d) => format!(
            "Decode: batch {}, {} new tokens after each prompt ({} untimed warm-up steps), {:?} on {}; \
             context = prompt length; tokens/s counts every sequence of the batch, at the median step \
             time, best of {} rounds that take every model in turn. The cached path is \
             the K/V cache for MHA/GQA/MQA and the absorbed path for MLA; `{}` marks the naive path, \
             which only MLA has.",
            d.batch,
            opts.new_tokens,
            opts.warmup,
            opts.kind,
            crate::device::describe(opts.device),
            opts.rounds,
            table::NOT_APPLICABLE
        ),
        None => "No decode figures.".into(),
    };
    format!(
        "# {}\n\n\
         Made by `{}`.\n\n\
         {}\n\
         - **KV cache B/token**: what one generated token adds to the inference cache over all layers, in bf16 \
         (`mla info`); *cache @C* is the cache allocated for C + new tokens at the measured batch and dtype.\n\
         - **train tok/s**: median of the logged training windows (the first, with start-up, left out); \
         **peak train memory**: the largest logged peak (CUDA: device memory in use; CPU: process RSS).\n\
         - **val loss / ppl**: the last validation of the run (mean next-token loss on the val split).\n\
         - {decode_note}\n\n\
         ![Validation loss](val_loss.png)\n\n\
         ![Trade-off](tradeoff.png)\n\n\
         ![Decode speed](decode.png)\n",
        opts.title,
        opts.command,
        table::markdown(runs),
    )
}
