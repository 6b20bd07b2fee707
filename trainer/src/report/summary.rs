//! One finished run as the report sees it: what its model is (from the final checkpoint's
//! config), how it trained (from `metrics.jsonl`) and how fast it decodes (the decode
//! benchmark on the final weights).
//! Not here: formatting (table.rs, plot.rs).

use super::decode::{DecodePath, DecodeResult};
use crate::error::BadInput;
use crate::inference;
use mla_model::{stats, AttentionKind};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// A run's row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// The run directory's name (the study's variant name).
    pub name: String,
    pub dir: PathBuf,
    /// MHA, GQA, MQA or MLA.
    pub kind: String,
    /// The attention with its dimensions, e.g. "GQA (4 groups)", "MLA (kv 85, q 64, rope 8)".
    pub attention: String,
    pub parameters: u64,
    pub kv_cache_bytes_per_token_bf16: u64,
    /// Median of the logged training tokens/s, the first log window (warm-up) left out.
    pub train_tokens_per_sec: f64,
    /// Largest logged peak memory (CUDA: device; CPU: process RSS).
    pub peak_train_memory_bytes: Option<u64>,
    pub tokens_trained: u64,
    pub final_val_loss: f64,
    pub final_val_ppl: f64,
    /// (tokens, val loss) of every validation, in token order.
    pub val_curve: Vec<(u64, f64)>,
    pub block_size: usize,
    pub decode: Vec<DecodeResult>,
}

impl RunSummary {
    pub fn is_mla(&self) -> bool {
        self.kind == "MLA"
    }

    /// Decode figure of `path` at `context` (batch as measured), if measured.
    pub fn decode_at(&self, path: DecodePath, context: usize) -> Option<&DecodeResult> {
        self.decode
            .iter()
            .find(|r| r.path == path && r.context == context)
    }

    /// The path this model decodes with by default: absorbed for MLA, the K/V cache otherwise.
    pub fn cached_path(&self) -> DecodePath {
        if self.is_mla() {
            DecodePath::Absorbed
        } else {
            DecodePath::Kv
        }
    }
}

/// What training wrote to `metrics.jsonl`, deduplicated by step (a resumed run repeats the
/// steps after its checkpoint; the last record of a step wins).
struct Metrics {
    tokens_per_sec: Vec<f64>,
    peak_memory: Option<u64>,
    tokens: u64,
    evals: Vec<(u64, u64, f64, f64)>, // step, tokens, val_loss, val_ppl
}

fn read_metrics(dir: &Path) -> anyhow::Result<Metrics> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        BadInput(format!(
            "{}: {e} (a run directory holds the metrics.jsonl that training writes)",
            path.display()
        ))
    })?;
    let mut train: std::collections::BTreeMap<u64, (f64, Option<u64>, u64)> = Default::default();
    let mut evals: std::collections::BTreeMap<u64, (u64, f64, f64)> = Default::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            BadInput(format!(
                "{}:{}: not a JSON object: {e}",
                path.display(),
                i + 1
            ))
        })?;
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        let (Some(step), Some(tokens)) = (num("step"), num("tokens")) else {
            continue;
        };
        if let Some(loss) = num("val_loss") {
            let ppl = num("val_ppl").unwrap_or(loss.exp());
            evals.insert(step as u64, (tokens as u64, loss, ppl));
        } else if let Some(tps) = num("tokens_per_sec") {
            let peak = num("peak_memory_bytes").map(|b| b as u64);
            train.insert(step as u64, (tps, peak, tokens as u64));
        }
    }
    if evals.is_empty() {
        return Err(BadInput(format!(
            "{}: no validation record (set eval.final_validation: true, the default)",
            path.display()
        ))
        .into());
    }
    let tokens = train
        .values()
        .map(|t| t.2)
        .chain(evals.values().map(|e| e.0))
        .max()
        .unwrap_or(0);
    Ok(Metrics {
        // The first window includes start-up (allocation, first-touch): leave it out when
        // there are others.
        tokens_per_sec: train
            .values()
            .skip(usize::from(train.len() > 1))
            .map(|t| t.0)
            .collect(),
        peak_memory: train.values().filter_map(|t| t.1).max(),
        tokens,
        evals: evals
            .into_iter()
            .map(|(s, (t, l, p))| (s, t, l, p))
            .collect(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The attention's short kind and its description with dimensions.
fn describe(cfg: &mla_model::ModelConfig) -> (String, String) {
    match cfg.attention_kind() {
        AttentionKind::Mla(s) => (
            "MLA".into(),
            format!(
                "MLA (kv {}, q {}, rope {})",
                s.kv_lora_rank,
                s.q_lora_rank.map_or("full".into(), |r| r.to_string()),
                s.qk_rope_head_dim
            ),
        ),
        AttentionKind::Gqa { n_query_groups } => {
            ("GQA".into(), format!("GQA ({n_query_groups} groups)"))
        }
        k => (k.name().to_string(), k.name().to_string()),
    }
}

/// Read run `dir` (local: metrics.jsonl and final/): its summary (decode figures still empty)
/// and its final weights on `device` in `kind`, for the decode benchmark.
pub fn load(
    dir: &Path,
    device: Device,
    kind: Kind,
) -> anyhow::Result<(RunSummary, inference::LoadedModel)> {
    let name = dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let metrics = read_metrics(dir)?;
    let final_dir = dir.join("final");
    if !final_dir.join("manifest.json").exists() {
        return Err(BadInput(format!(
            "{}: no committed final checkpoint (the run has not finished; rerun it with --resume auto)",
            final_dir.display()
        ))
        .into());
    }
    let m = inference::load(&final_dir.display().to_string(), device, kind)?;
    let cfg = m.cfg.model().clone();
    let (kind_name, attention) = describe(&cfg);
    let Some(&(_, _, loss, ppl)) = metrics.evals.last() else {
        unreachable!("read_metrics refuses a run without validation")
    };
    let summary = RunSummary {
        name,
        dir: dir.to_path_buf(),
        kind: kind_name,
        attention,
        parameters: stats::parameters(&cfg) as u64,
        kv_cache_bytes_per_token_bf16: 2 * stats::kv_cache_values_per_token(&cfg) as u64,
        train_tokens_per_sec: median(metrics.tokens_per_sec),
        peak_train_memory_bytes: metrics.peak_memory,
        tokens_trained: metrics.tokens,
        final_val_loss: loss,
        final_val_ppl: ppl,
        val_curve: metrics.evals.iter().map(|e| (e.1, e.2)).collect(),
        block_size: cfg.block_size,
        decode: Vec::new(),
    };
    Ok((summary, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_keep_the_last_record_of_a_repeated_step_and_skip_the_first_window() {
        let dir = tempfile::tempdir().expect("tmp");
        let lines = [
            r#"{"step":0,"tokens":0,"val_loss":10.0,"val_ppl":22026.0,"eval_secs":1}"#,
            r#"{"step":10,"tokens":100,"loss":5,"tokens_per_sec":1.0,"peak_memory_bytes":7}"#,
            r#"{"step":20,"tokens":200,"loss":4,"tokens_per_sec":50.0,"peak_memory_bytes":9}"#,
            r#"{"step":20,"tokens":200,"val_loss":4.5,"val_ppl":90.0,"eval_secs":1}"#,
            // resumed from step 10: step 20 again
            r#"{"step":20,"tokens":200,"loss":4,"tokens_per_sec":60.0,"peak_memory_bytes":8}"#,
            r#"{"step":20,"tokens":200,"val_loss":4.4,"val_ppl":81.0,"eval_secs":1}"#,
            r#"{"step":30,"tokens":300,"loss":3,"tokens_per_sec":70.0}"#,
        ];
        std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n")).expect("write");
        let m = read_metrics(dir.path()).expect("reads");
        assert_eq!(m.tokens_per_sec, vec![60.0, 70.0]);
        assert_eq!(m.peak_memory, Some(8));
        assert_eq!(m.tokens, 300);
        assert_eq!(m.evals, vec![(0, 0, 10.0, 22026.0), (20, 200, 4.4, 81.0)]);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
