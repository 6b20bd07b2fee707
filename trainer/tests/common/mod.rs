//! Shared helpers of the checkpoint end-to-end tests (`trainer/tests/ckpt_*.rs`): the `mla`
//! binary with a tiny run (debug.yaml shrunk to 16-wide, 32-token blocks, 6 steps of 4
//! sequences in 2 micro-batches, a save every 2 steps, validation every 3), a small real TinyStories subset tokenized once into the target dir and shared by
//! every test, metrics and loss sequences, hashing, and the S3 test environment.
//!
//! Not tests themselves. S3 helpers need the environment of `scripts/s3_server.sh start`; with
//! `MLA_REQUIRE_S3=1` (scripts/test.sh) a missing environment is a failure, not a skip.
#![allow(dead_code)]

pub mod http;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repo root")
}

pub fn shared_data() -> PathBuf {
    let p = repo().join("../shared/data");
    assert!(
        p.join("tinystories/train").is_dir(),
        "{} is missing: these tests need the shared TinyStories sample",
        p.display()
    );
    p
}

pub fn tokenizer_dir() -> PathBuf {
    shared_data().join("tokenizers/gpt-neox-20b")
}

/// `mla` with `args`, run in `cwd` (S3 runs keep their metrics under `<cwd>/.cache`).
pub fn mla_in(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mla"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .output()
        .expect("mla runs")
}

pub fn mla(args: &[&str]) -> Output {
    mla_in(&repo(), args, &[])
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Stdout of a successful run; panics with stderr otherwise.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "mla failed ({:?}):\n{}",
        out.status,
        stderr(out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bad input: exit 2, one `error:` line on stderr naming every word of `culprits`, no panic.
pub fn assert_bad(out: &Output, culprits: &[&str]) -> String {
    let err = stderr(out);
    let last = err
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(last.starts_with("error: "), "{err}");
    for c in culprits {
        assert!(last.contains(c), "names {c}: {last}");
    }
    last
}

/// A small TinyStories subset (v1 heads: ~118k train, ~194k val tokens), tokenized once per
/// target dir and opened directly by `train_data_path` (so tests never re-tokenize).
pub fn prepared_data() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ckpt_tests_data");
        if dir.join("index.json").exists() {
            return dir;
        }
        // Prepare aside and rename: another test process may be doing the same.
        let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
        let d = shared_data();
        ok(&mla(&[
            "prepare",
            d.join("tinystories/train/tinystories_v1_train_head.txt")
                .to_str()
                .unwrap(),
            "--val",
            d.join("tinystories/valid/tinystories_v1_valid_head.txt")
                .to_str()
                .unwrap(),
            "--tokenizer-dir",
            tokenizer_dir().to_str().unwrap(),
            "--out",
            tmp.to_str().unwrap(),
            "--overwrite",
            "--quiet",
        ]));
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp); // someone else won the race
        }
        assert!(dir.join("index.json").exists());
        dir
    })
}

/// Optimizer steps of every test run: 2N in all, N = `HALF` before an interruption.
pub const STEPS: u64 = 6;
pub const HALF: u64 = STEPS / 2;

/// `mla train` arguments of the tiny test run into `out_dir`, then `extra` overrides.
pub fn train_args(out_dir: &str, extra: &[&str]) -> Vec<String> {
    let config = repo().join("config_hub/pretrain/debug.yaml");
    let steps = STEPS.to_string();
    let mut args: Vec<String> = [
        "train",
        "--device",
        "cpu",
        "--config",
        config.to_str().unwrap(),
        "--out_dir",
        out_dir,
        "--data.train_data_path",
        prepared_data().to_str().unwrap(),
        "--data.val_data_path",
        "null",
        "--tokenizer_dir",
        tokenizer_dir().to_str().unwrap(),
        "--model_config.block_size",
        "32",
        "--model_config.n_embd",
        "16",
        "--model_config.n_head",
        "2",
        "--train.micro_batch_size",
        "2",
        "--train.global_batch_size",
        "4",
        "--train.max_steps",
        &steps,
        "--train.lr_warmup_steps",
        "2",
        "--train.save_interval",
        "2",
        "--train.log_interval",
        "1",
        "--eval.interval",
        "3",
        "--eval.max_iters",
        "1",
        "--eval.initial_validation",
        "false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Run the tiny training in `cwd` with extra overrides and environment.
pub fn train(cwd: &Path, out_dir: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let args = train_args(out_dir, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    mla_in(cwd, &args, env)
}

/// The metrics.jsonl a run in `cwd` wrote for `out_dir`: `<out_dir>/metrics.jsonl` when local,
/// else the one file under `<cwd>/.cache/mla/runs/`.
pub fn metrics_file(cwd: &Path, out_dir: &str) -> PathBuf {
    if !out_dir.contains("://") {
        return Path::new(out_dir).join("metrics.jsonl");
    }
    let runs = cwd.join(".cache/mla/runs");
    let dirs: Vec<PathBuf> = std::fs::read_dir(&runs)
        .unwrap_or_else(|e| panic!("{}: {e}", runs.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "one run's metrics under {}", runs.display());
    dirs[0].join("metrics.jsonl")
}

/// (step, loss) of every training record, in file order (appended across resumed runs).
pub fn losses(metrics: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap_or_else(|e| panic!("{}: {e}", metrics.display()))
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("one JSON object per line"))
        .filter(|r| r["loss"].is_number())
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    hex::encode(sha2::Sha256::digest(&bytes))
}

/// The manifest of a step (`mla ckpt inspect --json`), which also verifies it.
pub fn inspect(step_dir: &str) -> Value {
    let out = ok(&mla(&["ckpt", "inspect", "--json", step_dir]));
    serde_json::from_str(&out).expect("inspect --json prints JSON")
}

/// sha256 of `model.safetensors` from a step's manifest (works for s3:// too).
pub fn model_sha256(step_dir: &str) -> String {
    let doc = inspect(step_dir);
    doc["manifest"]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "model.safetensors")
        .and_then(|o| o["sha256"].as_str())
        .expect("model.safetensors in the manifest")
        .to_string()
}

/// `mla ckpt list --json [--verify]` rows.
pub fn list(out_dir: &str, verify: bool) -> Vec<Value> {
    let mut args = vec!["ckpt", "list", "--json", out_dir];
    if verify {
        args.insert(2, "--verify");
    }
    let out = ok(&mla(&args));
    serde_json::from_str::<Value>(&out)
        .expect("list --json prints JSON")
        .as_array()
        .unwrap()
        .clone()
}

pub fn row<'a>(rows: &'a [Value], dir: &str) -> Option<&'a Value> {
    rows.iter().find(|r| r["dir"] == dir)
}

/// The straight run: losses of all 2N steps and the sha256 of its final weights. Run once per
/// test binary, in a directory removed afterwards.
pub struct Reference {
    pub losses: Vec<(u64, f64)>,
    pub model_sha256: String,
}

pub fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("straight");
        let out = out.to_str().unwrap();
        ok(&train(dir.path(), out, &[], &[]));
        let losses = losses(&metrics_file(dir.path(), out));
        assert_eq!(
            losses.iter().map(|l| l.0).collect::<Vec<_>>(),
            (1..=STEPS).collect::<Vec<_>>()
        );
        Reference {
            losses,
            model_sha256: sha256_file(&Path::new(out).join("final/model.safetensors")),
        }
    })
}

/// Is the S3 test environment present? Panics when it is required but missing.
pub fn s3_bucket() -> Option<String> {
    let bucket = std::env::var("MLA_TEST_S3_BUCKET").ok();
    let endpoint = std::env::var("AWS_ENDPOINT_URL").ok();
    match (bucket, endpoint) {
        (Some(b), Some(_)) => Some(b),
        _ if std::env::var("MLA_REQUIRE_S3").as_deref() == Ok("1") => panic!(
            "MLA_REQUIRE_S3=1 but MLA_TEST_S3_BUCKET/AWS_ENDPOINT_URL are not set: \
             run `eval \"$(scripts/s3_server.sh start)\"` first"
        ),
        _ => None,
    }
}

/// A unique `s3://bucket/ckpt-tests-<pid>-<nanos>/<test>` out_dir, or `None` (skip).
pub fn s3_out_dir(test: &str) -> Option<String> {
    let Some(bucket) = s3_bucket() else {
        eprintln!("skipping S3 case {test}: no MLA_TEST_S3_BUCKET (scripts/s3_server.sh start)");
        return None;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Some(format!(
        "s3://{bucket}/ckpt-tests-{}-{nanos}/{test}",
        std::process::id()
    ))
}

/// A Parquet file as Hugging Face writes one, from Rust: snappy, a row group per 100 rows, an
/// `id` column before the string column `column`, and a null after every 50th story (nulls are
/// skipped, so the file holds exactly `stories`).
pub fn write_parquet(path: &Path, column: &str, stories: &[String]) {
    use parquet::column::writer::ColumnWriter;
    use parquet::data_type::ByteArray;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = parquet::schema::parser::parse_message_type(&format!(
        "message m {{ required int64 id; optional binary {column} (STRING); }}"
    ))
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, std::sync::Arc::new(schema), props.into()).unwrap();
    for chunk in stories.chunks(100) {
        let mut values = Vec::new();
        let mut defs = Vec::new();
        for (i, s) in chunk.iter().enumerate() {
            values.push(ByteArray::from(s.as_str()));
            defs.push(1);
            if i % 50 == 0 {
                defs.push(0);
            }
        }
        let ids: Vec<i64> = (0..defs.len() as i64).collect();
        let mut group = w.next_row_group().unwrap();
        while let Some(mut col) = group.next_column().unwrap() {
            match col.untyped() {
                ColumnWriter::Int64ColumnWriter(c) => c.write_batch(&ids, None, None),
                ColumnWriter::ByteArrayColumnWriter(c) => c.write_batch(&values, Some(&defs), None),
                _ => unreachable!(),
            }
            .unwrap();
            col.close().unwrap();
        }
        group.close().unwrap();
    }
    w.close().unwrap();
}
