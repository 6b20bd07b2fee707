//! The report's table: one row per run, written as Markdown (report.md, with the plots),
//! CSV (report.csv, raw numbers for spreadsheets; empty where a column does not apply) and
//! JSON (report.json, every figure including each decode case).

use super::decode::DecodePath;
use super::summary::RunSummary;
use crate::metrics::{human_bytes, thousands};
use std::fmt::Write as _;
use std::path::Path;

/// One column: its header, and per run the shown text and the raw CSV value (None = n/a).
struct Column {
    header: String,
    cells: Vec<(String, Option<String>)>,
}

/// Shown where a column does not apply to a run (the naive path of a non-MLA model).
pub const NOT_APPLICABLE: &str = "–";

fn contexts(runs: &[RunSummary]) -> Vec<usize> {
    let mut c: Vec<usize> = runs
        .iter()
        .flat_map(|r| r.decode.iter().map(|d| d.context))
        .collect();
    c.sort_unstable();
    c.dedup();
    c
}

fn columns(runs: &[RunSummary]) -> Vec<Column> {
    let col = |header: &str, f: &dyn Fn(&RunSummary) -> (String, Option<String>)| Column {
        header: header.to_string(),
        cells: runs.iter().map(f).collect(),
    };
    let num = |v: f64, digits: usize| (format!("{v:.digits$}"), Some(format!("{v}")));
    let mut cols = vec![
        col("variant", &|r| (r.name.clone(), Some(r.name.clone()))),
        col("attention", &|r| {
            (r.attention.clone(), Some(r.attention.clone()))
        }),
        col("parameters", &|r| {
            (thousands(r.parameters), Some(r.parameters.to_string()))
        }),
        col("KV cache B/token (bf16)", &|r| {
            let b = r.kv_cache_bytes_per_token_bf16;
            (thousands(b), Some(b.to_string()))
        }),
        col("train tok/s", &|r| num(r.train_tokens_per_sec, 0)),
        col("peak train memory", &|r| match r.peak_train_memory_bytes {
            Some(b) => (human_bytes(b), Some(b.to_string())),
            None => ("unknown".into(), None),
        }),
        col("tokens", &|r| {
            (
                thousands(r.tokens_trained),
                Some(r.tokens_trained.to_string()),
            )
        }),
        col("val loss", &|r| num(r.final_val_loss, 4)),
        col("val ppl", &|r| num(r.final_val_ppl, 2)),
    ];
    let batch = runs
        .iter()
        .flat_map(|r| r.decode.first())
        .map(|d| d.batch)
        .next();
    let ctx = contexts(runs);
    for &c in &ctx {
        let b = batch.unwrap_or(1);
        cols.push(col(&format!("decode tok/s @{c} (batch {b})"), &|r| match r
            .decode_at(r.cached_path(), c)
        {
            Some(d) => num(d.decode_tokens_per_sec, 1),
            None => ("not measured".into(), None),
        }));
    }
    for &c in &ctx {
        cols.push(col(&format!("MLA naive decode tok/s @{c}"), &|r| {
            if !r.is_mla() {
                return (NOT_APPLICABLE.into(), None);
            }
            match r.decode_at(DecodePath::Naive, c) {
                Some(d) => num(d.decode_tokens_per_sec, 1),
                None => ("not measured".into(), None),
            }
        }));
    }
    if let Some(&c) = ctx.last() {
        cols.push(col(
            &format!("cache @{c}"),
            &|r| match r.decode_at(r.cached_path(), c) {
                Some(d) => (human_bytes(d.cache_bytes), Some(d.cache_bytes.to_string())),
                None => ("not measured".into(), None),
            },
        ));
    }
    cols
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The Markdown table (header, rule, one row per run).
pub fn markdown(runs: &[RunSummary]) -> String {
    let cols = columns(runs);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| {} |",
        cols.iter()
            .map(|c| c.header.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(
        out,
        "|{}|",
        cols.iter()
            .enumerate()
            .map(|(i, _)| if i < 2 { "---" } else { "---:" })
            .collect::<Vec<_>>()
            .join("|")
    );
    for i in 0..runs.len() {
        let _ = writeln!(
            out,
            "| {} |",
            cols.iter()
                .map(|c| c.cells[i].0.replace('|', "\\|"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    out
}

/// The CSV table: the same columns, raw values.
pub fn csv(runs: &[RunSummary]) -> String {
    let cols = columns(runs);
    let mut out = cols
        .iter()
        .map(|c| csv_field(&c.header))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for i in 0..runs.len() {
        let row: Vec<String> = cols
            .iter()
            .map(|c| csv_field(c.cells[i].1.as_deref().unwrap_or("")))
            .collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

/// Write report.csv and report.json into `out`.
pub fn write_data(out: &Path, runs: &[RunSummary]) -> anyhow::Result<()> {
    std::fs::write(out.join("report.csv"), csv(runs))?;
    let json = serde_json::to_string_pretty(&serde_json::json!({ "runs": runs }))?;
    std::fs::write(out.join("report.json"), json + "\n")?;
    Ok(())
}
