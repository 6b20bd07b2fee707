//! The study and the report end to end (CPU smoke scale): `mla study` trains two variants of
//! a few steps (and a third that fails at start, which must not lose the others), writes the
//! report, and a rerun keeps the finished variants. The report's table has every cell filled,
//! the CSV and JSON carry the same rows, and each PNG decodes to a real plot.
//! Also `mla bench decode`: its cache bytes equal what `mla info` predicts for every attention
//! kind, and a context beyond the block size is a one-line error.

mod common;
use common::*;
use std::path::Path;

/// A study of the tiny test model (common::train_args' sizes) into `out`.
fn smoke_study(out: &Path) -> String {
    format!(
        r#"
name: smoke
out_dir: {out}
base:
  model_name: pythia-14m
  model_config:
    name: smoke
    block_size: 32
    n_layer: 2
    n_embd: 16
    n_head: 2
    padding_multiple: 128
    rotary_percentage: 0.5
  precision: 32-true
  data:
    class_path: litgpt.data.TextFiles
    init_args:
      train_data_path: {data}
  train:
    save_interval: 2
    log_interval: 1
    global_batch_size: 4
    micro_batch_size: 2
    lr_warmup_steps: 1
    max_steps: 4
    min_lr: 1.0e-4
  eval:
    interval: 2
    max_iters: 1
  optimizer:
    class_path: torch.optim.AdamW
    init_args: {{lr: 3.0e-3}}
  tokenizer_dir: {tok}
  seed: 7
variants:
  - name: mha
    overrides: {{model_config: {{latent_attention: false}}}}
  - name: broken
    overrides: {{data: {{init_args: {{train_data_path: {out}/no-such-data}}}}}}
  - name: mla
    overrides: {{model_config: {{latent_attention: true}}}}
"#,
        out = out.display(),
        data = prepared_data().display(),
        tok = tokenizer_dir().display()
    )
}

/// The cells of each row of the first Markdown table in `md` (header first, rule skipped).
fn table(md: &str) -> Vec<Vec<String>> {
    md.lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter(|l| !l.starts_with("|---"))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// A PNG that is a plot: decodes, has a plot's size, is neither blank nor filled, and has
/// coloured (series) pixels besides the black/grey axes and text.
fn assert_plot(path: &Path) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: not a PNG image: {e}", path.display()))
        .to_rgb8();
    let (w, h) = img.dimensions();
    assert!(w >= 600 && h >= 400, "{}: {w}×{h}", path.display());
    let total = (w * h) as f64;
    let ink = img.pixels().filter(|p| p.0 != [255, 255, 255]).count() as f64;
    let coloured = img
        .pixels()
        .filter(|p| {
            let [r, g, b] = p.0;
            r.max(g).max(b) - r.min(g).min(b) > 40
        })
        .count();
    println!(
        "{}: {w}×{h}, {:.1}% ink, {coloured} coloured pixels",
        path.display(),
        100.0 * ink / total
    );
    assert!(ink / total > 0.01, "{}: blank canvas", path.display());
    assert!(ink / total < 0.9, "{}: filled canvas", path.display());
    assert!(coloured > 200, "{}: no plotted series", path.display());
}

#[test]
fn study_trains_variants_keeps_going_past_a_failure_and_reports_them() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("study");
    let file = tmp.path().join("smoke.yaml");
    std::fs::write(&file, smoke_study(&out)).expect("write study");
    let args = [
        "study",
        file.to_str().unwrap(),
        "--device",
        "cpu",
        "--contexts",
        "4,8",
        "--batch",
        "2",
        "--new-tokens",
        "6",
    ];
    let first = mla(&args);
    let err = stderr(&first);
    assert_eq!(first.status.code(), Some(1), "one variant fails: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("[2/3] broken: FAILED"), "{err}");
    assert!(
        err.contains("[3/3] mla: trained"),
        "the failure does not stop the others: {err}"
    );
    assert!(
        err.contains("2 trained, 0 already finished, 1 failed (broken)"),
        "{err}"
    );

    let report = out.join("report");
    let md = std::fs::read_to_string(report.join("report.md")).expect("report.md");
    let rows = table(&md);
    assert_eq!(rows.len(), 3, "header + mha + mla:\n{md}");
    let header = &rows[0];
    for row in &rows[1..] {
        assert_eq!(row.len(), header.len(), "{row:?}");
        for (h, cell) in header.iter().zip(row) {
            assert!(!cell.is_empty(), "{h} of {} is empty", row[0]);
            assert!(
                !cell.contains("not measured") && !cell.contains("unknown") && cell != "NaN",
                "{h} of {}: {cell}",
                row[0]
            );
        }
    }
    let (mha, mla_row) = (&rows[1], &rows[2]);
    assert_eq!((mha[0].as_str(), mla_row[0].as_str()), ("mha", "mla"));
    for (h, (a, m)) in header.iter().zip(mha.iter().zip(mla_row)) {
        // Only MLA has a naive path; every other figure applies to both.
        assert_eq!(a == "–", h.starts_with("MLA naive"), "{h}: mha {a}");
        assert_ne!(m, "–", "{h}: mla");
    }
    assert!(
        header.iter().any(|h| h == "decode tok/s @8 (batch 2)"),
        "{header:?}"
    );

    let csv = std::fs::read_to_string(report.join("report.csv")).expect("report.csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert_eq!(lines[0].split(',').count(), header.len(), "{csv}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).expect("json"))
            .expect("report.json parses");
    let runs = json["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    // MLA: naive and absorbed at 2 contexts; MHA: its K/V cache at 2 contexts.
    assert_eq!(runs[0]["decode"].as_array().expect("decode").len(), 2);
    assert_eq!(runs[1]["decode"].as_array().expect("decode").len(), 4);
    for name in ["val_loss.png", "tradeoff.png", "decode.png"] {
        assert_plot(&report.join(name));
    }

    // A rerun keeps the finished variants (no retraining: their final/ stays as it was).
    let before = model_sha256(out.join("mla/final").to_str().unwrap());
    let again = mla(&[
        "study",
        file.to_str().unwrap(),
        "--only",
        "mha,mla",
        "--no-report",
    ]);
    let err = stderr(&again);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("[2/2] mla: finished before"), "{err}");
    assert!(
        err.contains("0 trained, 2 already finished, 0 failed"),
        "{err}"
    );
    assert_eq!(
        model_sha256(out.join("mla/final").to_str().unwrap()),
        before
    );

    // A typo in any variant is refused before anything trains.
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        smoke_study(&tmp.path().join("other"))
            .replace("latent_attention: true", "latent_atention: true"),
    )
    .expect("write");
    assert_bad(
        &mla(&["study", bad.to_str().unwrap()]),
        &["variants[2]", "latent_atention"],
    );
    assert!(!tmp.path().join("other/mha").exists(), "nothing trained");
}

/// `mla info --json` and `mla bench decode --json` for `debug.yaml` shrunk, with `extra`
/// overrides.
fn info_and_bench(extra: &[&str], precision: &str) -> (serde_json::Value, serde_json::Value) {
    let config = repo().join("config_hub/pretrain/debug.yaml");
    let mut shape = vec![
        "--config",
        config.to_str().unwrap(),
        "--model_config.n_embd",
        "48",
        "--model_config.n_head",
        "4",
        "--model_config.block_size",
        "64",
    ];
    shape.extend_from_slice(extra);
    let mut info = vec!["info", "--json"];
    info.extend_from_slice(&shape);
    let mut bench = vec![
        "bench",
        "decode",
        "--json",
        "--device",
        "cpu",
        "--precision",
        precision,
        "--contexts",
        "8",
        "--batch",
        "3",
        "--new-tokens",
        "6",
        "--warmup",
        "2",
        "--attention",
        "naive,absorbed,none",
    ];
    bench.extend_from_slice(&shape);
    let parse = |out: String| serde_json::from_str::<serde_json::Value>(&out).expect("one JSON");
    (parse(ok(&mla(&info))), parse(ok(&mla(&bench))))
}

#[test]
fn decode_cache_bytes_equal_what_info_predicts_for_every_kind() {
    let kinds: [(&str, &[&str]); 4] = [
        ("MHA", &["--model_config.latent_attention", "false"]),
        (
            "GQA",
            &[
                "--model_config.latent_attention",
                "false",
                "--model_config.n_query_groups",
                "2",
            ],
        ),
        (
            "MQA",
            &[
                "--model_config.latent_attention",
                "false",
                "--model_config.n_query_groups",
                "1",
            ],
        ),
        ("MLA", &[]),
    ];
    for (kind, extra) in kinds {
        for (precision, bytes_key) in [
            ("bf16-true", "kv_cache_bytes_per_token_bf16"),
            ("32-true", "kv_cache_values_per_token"),
        ] {
            let (info, bench) = info_and_bench(extra, precision);
            assert_eq!(info["attention"], kind);
            let per_token = info[bytes_key].as_u64().expect("bytes per token")
                * if precision == "32-true" { 4 } else { 1 };
            let results = bench["results"].as_array().expect("results");
            let paths: Vec<&str> = results
                .iter()
                .map(|r| r["path"].as_str().unwrap())
                .collect();
            let expected_paths: &[&str] = if kind == "MLA" {
                &["naive", "absorbed", "none"]
            } else {
                &["kv", "none"]
            };
            assert_eq!(paths, expected_paths, "{kind}");
            for r in results {
                let cache = r["cache_bytes"].as_u64().expect("cache bytes");
                let want = if r["path"] == "none" {
                    0
                } else {
                    per_token * 3 * (8 + 6) // batch 3, context 8 + 6 new tokens
                };
                println!(
                    "{kind} {precision} {}: cache {cache} B (info: {want} B)",
                    r["path"]
                );
                assert_eq!(cache, want, "{kind} {precision} {}", r["path"]);
                assert!(r["decode_tokens_per_sec"].as_f64().unwrap() > 0.0);
                assert!(r["prefill_tokens_per_sec"].as_f64().unwrap() > 0.0);
            }
        }
    }
}

#[test]
fn decode_bench_refuses_contexts_beyond_the_block_size() {
    let config = repo().join("config_hub/pretrain/debug.yaml");
    let out = mla(&[
        "bench",
        "decode",
        "--config",
        config.to_str().unwrap(),
        "--contexts",
        "64,120",
        "--new-tokens",
        "16",
    ]);
    assert_bad(&out, &["--contexts 120", "block_size 128"]);
    let out = mla(&["bench", "decode", "no/such/checkpoint"]);
    assert_bad(&out, &["no/such/checkpoint"]);
}
