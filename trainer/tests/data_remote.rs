//! Prepared token datasets on object storage: `prepare` into `memory://` (library) and `s3://`
//! (the `mla` binary, S3 test server) reads back token for token what the same inputs give on
//! local disk; the tiny debug run trained from the `s3://` dataset has bit-identical losses to
//! the same run from local disk; a corrupted shard (header, sha256) is a one-line error naming
//! the object, exit 2; a prefix without `index.json` says only prepared datasets are read there;
//! the train and eval loaders read ahead on object storage and give the batches of local ones.
//!
//! S3 cases skip without the S3 environment (`scripts/s3_server.sh start`); a failure when
//! `MLA_REQUIRE_S3=1` (scripts/test.sh).

mod common;

use common::*;
use mla_storage::object_store::memory::InMemory;
use mla_storage::StoreOptions;
use mla_trainer::data::{
    prepare, prepare_into, Dataset, DatasetIndex, EvalLoader, LoaderConfig, OpenOptions,
    PrepareArgs, RemoteDir, ShardSink, ShardSource, Split, Tokenizer, TrainLoader, INDEX_FILE,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The inputs of `common::prepared_data()` (train head + valid head of TinyStories v1).
fn head_inputs() -> (PathBuf, PathBuf) {
    let d = shared_data();
    (
        d.join("tinystories/train/tinystories_v1_train_head.txt"),
        d.join("tinystories/valid/tinystories_v1_valid_head.txt"),
    )
}

fn head_args(out: &str, shard_tokens: u64) -> PrepareArgs {
    let (train, val) = head_inputs();
    let mut a = PrepareArgs::new(vec![train], tokenizer_dir(), out);
    a.val = vec![val];
    a.shard_tokens = shard_tokens;
    a
}

fn whole_split(ds: &Dataset, split: Split) -> Vec<i64> {
    let s = ds.split(split);
    let mut out = vec![0; s.len() as usize];
    s.read(0, &mut out).unwrap();
    out
}

fn without_sources(mut index: DatasetIndex) -> DatasetIndex {
    for s in index.splits.values_mut() {
        s.sources.clear();
    }
    index
}

#[test]
fn prepare_into_memory_reads_back_the_tokens_of_a_local_prepare() {
    // Small shards: windows and rows cross shard boundaries.
    let local = tempfile::tempdir().unwrap();
    let args = head_args(local.path().to_str().unwrap(), 40_000);
    prepare(&args).unwrap();
    let store = Arc::new(InMemory::new());
    let remote =
        RemoteDir::from_object_store(store, "ds", "memory://ds", StoreOptions::default()).unwrap();
    let tokenizer = Tokenizer::from_dir(tokenizer_dir()).unwrap();
    let report = prepare_into(&args, &tokenizer, &remote).unwrap();
    assert_eq!(report.location, Path::new("memory://ds"));
    assert!(report.index.split(Split::Train).shards.len() >= 3);

    let a = Dataset::open(local.path()).unwrap();
    let b = Dataset::open_with(Arc::new(remote), OpenOptions::default()).unwrap();
    assert_eq!(b.location(), Path::new("memory://ds"));
    assert_eq!(a.index(), b.index());
    for split in [Split::Train, Split::Val] {
        assert_eq!(whole_split(&a, split), whole_split(&b, split), "{split}");
    }
    // Concurrent row reads (remote) equal sequential ones (local), across shard boundaries.
    let last = a.split(Split::Train).len() - 33;
    let starts = [0, 39_990, 39_999, 55_555, 79_980, 80_000, 100_001, last];
    let (mut ra, mut rb) = (vec![0; 8 * 33], vec![0; 8 * 33]);
    a.split(Split::Train).read_rows(&starts, &mut ra).unwrap();
    b.split(Split::Train).read_rows(&starts, &mut rb).unwrap();
    assert_eq!(ra, rb);
}

#[test]
fn remote_train_and_eval_loaders_read_ahead_and_give_the_batches_of_local_ones() {
    let local = tempfile::tempdir().unwrap();
    let args = head_args(local.path().to_str().unwrap(), 40_000);
    prepare(&args).unwrap();
    let remote = RemoteDir::from_object_store(
        Arc::new(InMemory::new()),
        "ds",
        "memory://ds",
        StoreOptions::default(),
    )
    .unwrap();
    let tokenizer = Tokenizer::from_dir(tokenizer_dir()).unwrap();
    prepare_into(&args, &tokenizer, &remote).unwrap();
    let a = Dataset::open(local.path()).unwrap().split(Split::Train);
    let b = Dataset::open_with(Arc::new(remote), OpenOptions::default())
        .unwrap()
        .split(Split::Train);
    assert!(!a.latency_bound() && b.latency_bound());
    // Rank 1 of 2, accumulation 3: micro-batches 3..6 of every global batch; enough steps to
    // wrap into the next epoch (3_574 windows of 33 tokens).
    let cfg = LoaderConfig {
        block_size: 32,
        micro_batch_size: 16,
        grad_accum_steps: 3,
        rank: 1,
        world_size: 2,
        seed: 5,
    };
    let mut plain = TrainLoader::new(a.clone(), cfg).unwrap();
    let mut ahead = TrainLoader::new(b.clone(), cfg).unwrap();
    let mut saved = None;
    for i in 0..120 {
        if i == 40 {
            saved = Some(plain.state()); // mid-step: micro_step 1
            assert_eq!(saved.as_ref().unwrap().micro_step, 1);
        }
        assert_eq!(
            plain.next_micro_batch().unwrap(),
            ahead.next_micro_batch().unwrap(),
            "micro-batch {i}"
        );
    }
    assert!(plain.epoch() >= 1, "wrapped into epoch {}", plain.epoch());
    // Restoring elsewhere discards the batch read ahead for the old position.
    let saved = saved.unwrap();
    plain.restore(&saved).unwrap();
    ahead.restore(&saved).unwrap();
    for i in 0..7 {
        assert_eq!(
            plain.next_micro_batch().unwrap(),
            ahead.next_micro_batch().unwrap(),
            "micro-batch {i} after restore"
        );
    }
    // The eval loader reads ahead as well: the same micro-batches in order, also when the
    // caller stops early (the batch being read is joined, not leaked).
    let eval = |s| EvalLoader::new(s, 32, 16, 1, 2, Some(20)).unwrap();
    let (plain, ahead) = (eval(a), eval(b));
    assert_eq!(plain.len(), 20);
    let want: Vec<Vec<i64>> = plain.iter().map(Result::unwrap).collect();
    let got: Vec<Vec<i64>> = ahead.iter().map(Result::unwrap).collect();
    assert_eq!(want, got);
    let first: Vec<Vec<i64>> = ahead.iter().take(3).map(Result::unwrap).collect();
    assert_eq!(first, want[..3]);
}

#[test]
fn mla_prepare_refuses_a_memory_out() {
    let (train, val) = head_inputs();
    let out = mla(&[
        "prepare",
        train.to_str().unwrap(),
        "--val",
        val.to_str().unwrap(),
        "--tokenizer-dir",
        tokenizer_dir().to_str().unwrap(),
        "--out",
        "memory://x",
        "--quiet",
    ]);
    assert_bad(&out, &["--out", "memory://x", "one process"]);
}

/// A unique `s3://bucket/data-tests-<pid>-<nanos>/<name>` prefix, or `None` (skip).
fn s3_prefix(name: &str) -> Option<String> {
    s3_out_dir(name).map(|u| u.replace("/ckpt-tests-", "/data-tests-"))
}

#[test]
fn s3_dataset_prepared_by_mla_trains_with_the_losses_of_the_local_dataset() {
    let Some(url) = s3_prefix("prepared") else {
        return;
    };
    let (train_txt, val_txt) = head_inputs();
    let started = std::time::Instant::now();
    let stdout = ok(&mla(&[
        "prepare",
        train_txt.to_str().unwrap(),
        "--val",
        val_txt.to_str().unwrap(),
        "--tokenizer-dir",
        tokenizer_dir().to_str().unwrap(),
        "--out",
        &url,
        "--quiet",
    ]));
    println!("mla prepare → s3: {:.2} s", started.elapsed().as_secs_f64());
    assert!(stdout.contains(&format!("prepared {url}:")), "{stdout}");

    // The same index (and so the same shard bytes, by sha256) as on local disk.
    let remote = RemoteDir::open(&url).unwrap();
    let index = DatasetIndex::from_json(
        &ShardSource::read(&remote, INDEX_FILE).unwrap(),
        Path::new("index.json"),
    )
    .unwrap();
    let local_dir = prepared_data();
    let local = DatasetIndex::from_json(
        &std::fs::read(local_dir.join(INDEX_FILE)).unwrap(),
        Path::new("index.json"),
    )
    .unwrap();
    assert_eq!(without_sources(index), without_sources(local));

    let reference = reference(); // the same run from local disk
    let cwd = tempfile::tempdir().unwrap();
    let out_dir = cwd.path().join("run");
    let out_dir = out_dir.to_str().unwrap();
    let started = std::time::Instant::now();
    let run = train(cwd.path(), out_dir, &["--data.train_data_path", &url], &[]);
    ok(&run);
    println!("tiny run from s3: {:.2} s", started.elapsed().as_secs_f64());
    assert!(
        stderr(&run).contains(&format!("data: reading {url}")),
        "{}",
        stderr(&run)
    );
    assert_eq!(
        losses(&metrics_file(cwd.path(), out_dir)),
        reference.losses,
        "losses from s3:// vs local disk"
    );
    // `mla eval` reads the same dataset from s3:// as from local disk.
    let final_dir = Path::new(out_dir).join("final");
    let eval = |data: &str| {
        let args = [
            "eval",
            final_dir.to_str().unwrap(),
            "--data",
            data,
            "--max-iters",
            "3",
            "--json",
        ];
        ok(&mla_in(cwd.path(), &args, &[])) // its checksum memo goes under cwd/.cache
    };
    let (from_s3, from_disk) = (eval(&url), eval(local_dir.to_str().unwrap()));
    assert!(from_s3.contains("\"loss\""), "{from_s3}");
    assert_eq!(from_s3, from_disk);
    let memo = cwd.path().join(".cache/mla/data/remote-sha256");
    assert_eq!(
        std::fs::read_dir(&memo).unwrap().count(),
        2,
        "{}",
        memo.display()
    );
    // Verified checksums are remembered: one per shard of both splits.
    let memo = Path::new(out_dir).join("data/remote-sha256");
    assert_eq!(
        std::fs::read_dir(&memo).unwrap().count(),
        2,
        "{}",
        memo.display()
    );
}

#[test]
fn corrupted_s3_shards_and_a_missing_index_are_one_line_errors_naming_the_object() {
    let Some(url) = s3_prefix("corrupt") else {
        return;
    };
    let remote = RemoteDir::open(&url).unwrap();
    let tokenizer = Tokenizer::from_dir(tokenizer_dir()).unwrap();
    let fixture = shared_data().join("tinystories/fixtures/cs336_tinystories_sample.txt");
    let mut args = PrepareArgs::new(vec![fixture.clone()], tokenizer_dir(), "unused");
    args.val = vec![fixture]; // a val split, so that the unverified run below can evaluate
    prepare_into(&args, &tokenizer, &remote).unwrap();
    let shard = "train-00000.bin";
    let good = ShardSource::read(&remote, shard).unwrap();
    let object = format!("{url}/{shard}");
    let cwd = tempfile::tempdir().unwrap();
    let run = |data_args: &[&str]| {
        let out_dir = cwd.path().join("run");
        train(cwd.path(), out_dir.to_str().unwrap(), data_args, &[])
    };

    let mut bad = good.clone();
    bad[0] = b'X'; // magic
    remote.put(shard, &bad).unwrap();
    let out = run(&["--data.train_data_path", &url]);
    assert_bad(&out, &[&object, "bad shard header"]);

    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 1; // a token: header fine, sha256 not
    remote.put(shard, &bad).unwrap();
    let out = run(&["--data.train_data_path", &url]);
    assert_bad(&out, &[&object, "sha256 mismatch"]);
    // Opting out of the checksum (sizes and headers still checked) opens it.
    let out_dir = cwd.path().join("run-unverified");
    let out = train(
        cwd.path(),
        out_dir.to_str().unwrap(),
        &[
            "--data.train_data_path",
            &url,
            "--data.verify_checksums",
            "false",
        ],
        &[],
    );
    ok(&out);
    assert!(
        stderr(&out).contains("sha256 not checked"),
        "{}",
        stderr(&out)
    );

    // Raw text (or nothing) under the prefix: TinyStories and TextFiles both say what to do.
    let empty = format!("{url}/nothing-here");
    let out = run(&["--data.train_data_path", &empty]);
    assert_bad(
        &out,
        &[
            &format!("{empty}/index.json"),
            "not supported",
            "mla prepare",
        ],
    );
    let out = run(&[
        "--data.class_path",
        "TinyStories",
        "--data.train_data_path",
        "null",
        "--data.data_path",
        &empty,
    ]);
    assert_bad(&out, &[&format!("{empty}/index.json"), "mla prepare"]);
}
