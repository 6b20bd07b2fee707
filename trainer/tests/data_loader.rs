//! Integration tests of the dataset reader and the train/eval loaders: windows, shuffle, epochs,
//! rank slicing, position save/restore, and corrupted or too-small datasets.
//! Datasets here are synthetic (token at stream position p has id p) so every window is checkable.
//! Not here: text preparation (data_prepare.rs).

use std::path::Path;
use std::sync::Arc;

use mla_trainer::data::{
    epoch_permutation, DataError, Dataset, DatasetWriter, EvalLoader, LoaderConfig, LocalDir,
    Split, TokenizerInfo, TrainLoader, INDEX_FILE,
};

/// Write `train_tokens` tokens (id = position) and `val_tokens` tokens, in shards of `shard_tokens`.
fn synthetic(dir: &Path, train_tokens: u32, val_tokens: u32, shard_tokens: u64, vocab: u64) {
    let store = LocalDir::new(dir);
    let info = TokenizerInfo {
        sha256: "synthetic".into(),
        vocab_size: vocab,
        separator_id: 0,
        separator_token: "<|endoftext|>".into(),
    };
    let mut w = DatasetWriter::new(&store, info, shard_tokens, true).unwrap();
    let train: Vec<u32> = (0..train_tokens).collect();
    w.push_tokens(Split::Train, &train).unwrap();
    let val: Vec<u32> = (0..val_tokens).map(|t| (t + 7) % (vocab as u32)).collect();
    w.push_tokens(Split::Val, &val).unwrap();
    w.finish().unwrap();
}

fn cfg(block_size: usize, micro: usize, accum: usize, rank: usize, world: usize) -> LoaderConfig {
    LoaderConfig {
        block_size,
        micro_batch_size: micro,
        grad_accum_steps: accum,
        rank,
        world_size: world,
        seed: 42,
    }
}

/// Window index of each row of a micro-batch (checks each row is a whole window).
fn windows_of(batch: &[i64], block_size: usize) -> Vec<u64> {
    let b1 = block_size + 1;
    batch
        .chunks_exact(b1)
        .map(|row| {
            let w = row[0] as usize / b1;
            assert_eq!(row[0] as usize % b1, 0, "row starts mid-window: {row:?}");
            let want: Vec<i64> = (w * b1..(w + 1) * b1).map(|t| t as i64).collect();
            assert_eq!(row, &want[..]);
            w as u64
        })
        .collect()
}

fn open(dir: &Path) -> Dataset {
    Dataset::open(dir).unwrap()
}

#[test]
fn an_epoch_visits_every_whole_window_once_across_shard_boundaries() {
    let tmp = tempfile::tempdir().unwrap();
    // 8-token windows, 13-token shards: most windows straddle a shard boundary; 5-token tail dropped.
    synthetic(tmp.path(), 8 * 25 + 5, 64, 13, 70_000);
    let ds = open(tmp.path());
    let mut l = TrainLoader::new(ds.split(Split::Train), cfg(7, 5, 1, 0, 1)).unwrap();
    assert_eq!(l.windows_per_epoch(), 25);
    assert_eq!(l.tokens_per_epoch(), 25 * 7);
    let mut seen = Vec::new();
    for _ in 0..5 {
        let b = l.next_micro_batch().unwrap();
        assert_eq!(b.len(), 5 * 8);
        seen.extend(windows_of(&b, 7));
    }
    assert_eq!(
        seen,
        epoch_permutation(42, 0, 25)
            .iter()
            .map(|&w| u64::from(w))
            .collect::<Vec<_>>()
    );
    assert_eq!(l.epoch(), 1);
}

#[test]
fn u16_shards_read_back_the_same_ids() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 1000, 100, 300, 50_277);
    let ds = open(tmp.path());
    assert_eq!(ds.index().dtype, mla_trainer::data::TokenDtype::U16);
    let s = ds.split(Split::Train);
    let mut out = vec![0i64; 700];
    s.read(250, &mut out).unwrap();
    assert!(out.iter().enumerate().all(|(i, &t)| t == 250 + i as i64));
    assert!(s.read(999, &mut [0i64; 2]).is_err());
}

#[test]
fn a_global_batch_crossing_the_epoch_end_continues_into_the_next_permutation() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 4 * 10, 64, 1000, 70_000);
    let ds = open(tmp.path());
    let mut l = TrainLoader::new(ds.split(Split::Train), cfg(3, 2, 2, 0, 1)).unwrap();
    let p0 = epoch_permutation(42, 0, 10);
    let p1 = epoch_permutation(42, 1, 10);
    assert_ne!(p0, p1);
    let expected: Vec<u64> = p0.iter().chain(&p1).map(|&w| u64::from(w)).collect();
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.extend(windows_of(&l.next_micro_batch().unwrap(), 3));
    }
    assert_eq!(seen, expected);
    assert_eq!(l.epoch(), 2);
}

#[test]
fn order_is_the_same_for_the_same_seed_and_differs_for_another() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 8 * 100, 64, 1000, 70_000);
    let ds = open(tmp.path());
    let take = |seed: u64| {
        let mut c = cfg(7, 4, 1, 0, 1);
        c.seed = seed;
        let mut l = TrainLoader::new(ds.split(Split::Train), c).unwrap();
        (0..10)
            .map(|_| l.next_micro_batch().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(take(42), take(42));
    assert_ne!(take(42), take(7));
}

#[test]
fn n_ranks_together_see_exactly_the_windows_of_one_rank_with_n_times_accumulation() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 8 * 37, 64, 50, 70_000);
    let ds = open(tmp.path());
    let (micro, accum, world) = (3, 2, 2);
    let mut single =
        TrainLoader::new(ds.split(Split::Train), cfg(7, micro, accum * world, 0, 1)).unwrap();
    let mut ranks: Vec<TrainLoader> = (0..world)
        .map(|r| TrainLoader::new(ds.split(Split::Train), cfg(7, micro, accum, r, world)).unwrap())
        .collect();
    // Several optimizer steps, crossing epochs (37 windows, 12 per step).
    for _step in 0..8 {
        let want: Vec<Vec<i64>> = (0..accum * world)
            .map(|_| single.next_micro_batch().unwrap())
            .collect();
        let mut got = Vec::new();
        for r in ranks.iter_mut() {
            for _ in 0..accum {
                got.push(r.next_micro_batch().unwrap());
            }
        }
        assert_eq!(got, want);
    }
    // All ranks agree on the position at a step boundary.
    assert_eq!(ranks[0].state(), ranks[1].state());
}

#[test]
fn restoring_a_position_reproduces_the_following_batches() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 8 * 23, 64, 50, 70_000);
    let ds = open(tmp.path());
    let c = cfg(7, 2, 3, 1, 2);
    let mut a = TrainLoader::new(ds.split(Split::Train), c).unwrap();
    // Stop at a step boundary and mid-step (4 = one step + one micro-batch).
    for skip in [3usize, 4] {
        let mut a2 = TrainLoader::new(ds.split(Split::Train), c).unwrap();
        for _ in 0..skip {
            a2.next_micro_batch().unwrap();
        }
        let json = serde_json::to_string(&a2.state()).unwrap();
        let after: Vec<_> = (0..20).map(|_| a2.next_micro_batch().unwrap()).collect();
        let mut b = TrainLoader::new(ds.split(Split::Train), c).unwrap();
        b.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        let resumed: Vec<_> = (0..20).map(|_| b.next_micro_batch().unwrap()).collect();
        assert_eq!(after, resumed, "skip {skip}");
    }
    a.next_micro_batch().unwrap();
    let json = serde_json::to_value(a.state()).unwrap();
    for key in ["version", "epoch", "cursor", "micro_step"] {
        assert!(json.get(key).is_some(), "{key} in {json}");
    }
}

#[test]
fn a_step_boundary_position_resumes_under_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 8 * 29, 64, 1000, 70_000);
    let ds = open(tmp.path());
    let mut one = TrainLoader::new(ds.split(Split::Train), cfg(7, 2, 4, 0, 1)).unwrap();
    for _ in 0..4 * 3 {
        one.next_micro_batch().unwrap();
    }
    let pos = one.state();
    let want: Vec<_> = (0..4).map(|_| one.next_micro_batch().unwrap()).collect();
    let mut got = Vec::new();
    for r in 0..2 {
        let mut l = TrainLoader::new(ds.split(Split::Train), cfg(7, 2, 2, r, 2)).unwrap();
        l.restore(&pos).unwrap();
        got.push(l.next_micro_batch().unwrap());
        got.push(l.next_micro_batch().unwrap());
    }
    assert_eq!(got, want);
}

#[test]
fn restore_rejects_a_position_from_another_seed_block_size_or_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 8 * 20, 64, 1000, 70_000);
    let ds = open(tmp.path());
    let l = TrainLoader::new(ds.split(Split::Train), cfg(7, 2, 1, 0, 1)).unwrap();
    let pos = l.state();
    let mut c = cfg(7, 2, 1, 0, 1);
    c.seed = 1;
    let mut other = TrainLoader::new(ds.split(Split::Train), c).unwrap();
    let e = other.restore(&pos).unwrap_err().to_string();
    assert!(e.contains("seed is 42 in the checkpoint, 1 here"), "{e}");
    let mut other = TrainLoader::new(ds.split(Split::Train), cfg(3, 2, 1, 0, 1)).unwrap();
    assert!(matches!(
        other.restore(&pos),
        Err(DataError::PositionMismatch { .. })
    ));
    let mut bad = pos.clone();
    bad.windows_per_epoch += 1;
    let mut same = TrainLoader::new(ds.split(Split::Train), cfg(7, 2, 1, 0, 1)).unwrap();
    assert!(same.restore(&bad).is_err());
}

#[test]
fn eval_loader_reads_sequential_windows_split_across_ranks_up_to_max_iters() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 64, 8 * 21, 50, 70_000);
    let ds = open(tmp.path());
    let val = ds.split(Split::Val);
    let base = {
        let mut first = [0i64];
        val.read(0, &mut first).unwrap();
        first[0]
    };
    let window = |b: &[i64]| -> Vec<i64> { b.chunks_exact(8).map(|r| (r[0] - base) / 8).collect() };
    // 21 windows, micro 2 × world 2 = 4 per step → 5 complete steps.
    let r0 = EvalLoader::new(val.clone(), 7, 2, 0, 2, None).unwrap();
    let r1 = EvalLoader::new(val.clone(), 7, 2, 1, 2, None).unwrap();
    assert_eq!((r0.len(), r1.len()), (5, 5));
    let w0: Vec<Vec<i64>> = r0.iter().map(|b| window(&b.unwrap())).collect();
    let w1: Vec<Vec<i64>> = r1.iter().map(|b| window(&b.unwrap())).collect();
    assert_eq!(w0[0], vec![0, 1]);
    assert_eq!(w1[0], vec![2, 3]);
    assert_eq!(w0[4], vec![16, 17]);
    assert_eq!(w1[4], vec![18, 19]);
    let capped = EvalLoader::new(val.clone(), 7, 2, 0, 2, Some(3)).unwrap();
    assert_eq!(capped.len(), 3);
    // The same batches every time it is iterated.
    assert_eq!(
        capped.iter().map(Result::unwrap).collect::<Vec<_>>(),
        capped.iter().map(Result::unwrap).collect::<Vec<_>>()
    );
}

#[test]
fn a_split_smaller_than_one_window_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 100, 10, 1000, 70_000);
    let ds = open(tmp.path());
    let e = TrainLoader::new(ds.split(Split::Train), cfg(100, 1, 1, 0, 1))
        .err()
        .unwrap();
    assert!(matches!(e, DataError::TooSmall { .. }));
    assert!(
        e.to_string().starts_with("train split of ")
            && e.to_string()
                .ends_with("has 100 tokens, fewer than 101 (one window of block_size + 1)"),
        "{e}"
    );
    let e = EvalLoader::new(ds.split(Split::Val), 7, 4, 0, 1, Some(10))
        .err()
        .unwrap();
    assert!(e.to_string().contains("val split"), "{e}");
}

#[test]
fn invalid_loader_options_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 100, 10, 1000, 70_000);
    let ds = open(tmp.path());
    let e = TrainLoader::new(ds.split(Split::Train), cfg(7, 1, 1, 2, 2))
        .err()
        .unwrap();
    assert_eq!(e.to_string(), "invalid rank: 2 is not below world_size 2");
    let e = TrainLoader::new(ds.split(Split::Train), cfg(7, 0, 1, 0, 1))
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "invalid micro_batch_size: must be at least 1"
    );
}

fn corrupt(tmp: &Path, f: impl FnOnce(&Path)) -> String {
    synthetic(tmp, 1000, 100, 400, 70_000);
    f(&tmp.join("train-00001.bin"));
    Dataset::open(tmp).err().unwrap().to_string()
}

#[test]
fn shard_with_wrong_magic_is_an_error_naming_the_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let e = corrupt(tmp.path(), |p| {
        let mut b = std::fs::read(p).unwrap();
        b[0..8].copy_from_slice(b"NOTTOKS\0");
        std::fs::write(p, b).unwrap();
    });
    assert!(
        e.contains("train-00001.bin: bad shard header: magic"),
        "{e}"
    );
}

#[test]
fn shard_header_disagreeing_with_the_index_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let e = corrupt(tmp.path(), |p| {
        let mut b = std::fs::read(p).unwrap();
        b[16] ^= 1; // token count
        std::fs::write(p, b).unwrap();
    });
    assert!(
        e.contains("train-00001.bin: bad shard header:") && e.contains("index says 400"),
        "{e}"
    );
}

#[test]
fn truncated_shard_is_an_error_naming_the_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let e = corrupt(tmp.path(), |p| {
        let b = std::fs::read(p).unwrap();
        std::fs::write(p, &b[..b.len() - 3]).unwrap();
    });
    assert!(
        e.contains(
            "train-00001.bin: truncated or oversized shard: expected 1632 bytes, found 1629"
        ),
        "{e}"
    );
}

#[test]
fn shard_with_changed_tokens_fails_the_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let e = corrupt(tmp.path(), |p| {
        let mut b = std::fs::read(p).unwrap();
        let n = b.len();
        b[n - 1] ^= 0xff;
        std::fs::write(p, b).unwrap();
    });
    assert!(e.contains("train-00001.bin: sha256 mismatch"), "{e}");
    let unverified = Dataset::open_with(
        Arc::new(LocalDir::new(tmp.path())),
        mla_trainer::data::OpenOptions {
            verify_checksums: false,
        },
    );
    assert!(unverified.is_ok());
}

#[test]
fn missing_index_says_to_run_prepare() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic(tmp.path(), 100, 10, 1000, 70_000);
    std::fs::remove_file(tmp.path().join(INDEX_FILE)).unwrap();
    let e = Dataset::open(tmp.path()).err().unwrap().to_string();
    assert!(
        e.contains("index.json: bad dataset index: not found"),
        "{e}"
    );
}

/// The windows of each global batch after a resume, from a position a 2-rank run saved at a
/// step boundary, whatever world size and micro-batch size continue it (issue 15): steps 21-40
/// of 1 rank (4 micro-batches of 2), 2 ranks as saved, and 4 ranks (1 micro-batch of 2) hold
/// the same set of windows as the straight 2-rank run's, across an epoch boundary.
#[test]
fn every_global_batch_after_a_resume_holds_the_same_windows_on_any_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    // 8 windows of 8 tokens per global batch, 29 windows per epoch: 40 steps span 11 epochs.
    synthetic(tmp.path(), 8 * 29, 64, 1000, 70_000);
    let ds = open(tmp.path());
    let (block, global) = (7usize, 8usize);
    // (micro, accum, world): every split of the 8-window global batch.
    let step = |loaders: &mut Vec<TrainLoader>, accum: usize| -> Vec<u64> {
        let mut windows = Vec::new();
        for l in loaders.iter_mut() {
            for _ in 0..accum {
                windows.extend(windows_of(&l.next_micro_batch().unwrap(), block));
            }
        }
        windows.sort_unstable();
        windows
    };
    let ranks = |micro: usize, accum: usize, world: usize| -> Vec<TrainLoader> {
        assert_eq!(micro * accum * world, global);
        (0..world)
            .map(|r| {
                TrainLoader::new(ds.split(Split::Train), cfg(block, micro, accum, r, world))
                    .unwrap()
            })
            .collect()
    };
    let mut straight = ranks(2, 2, 2);
    let mut want = Vec::new();
    let mut saved = None;
    for s in 1..=40 {
        let w = step(&mut straight, 2);
        assert_eq!(w.len(), global);
        if s > 20 {
            want.push(w);
        }
        if s == 20 {
            saved = Some(straight[0].state());
            assert!(straight.iter().all(|l| l.state() == straight[0].state()));
        }
    }
    let saved = saved.unwrap();
    for (micro, accum, world) in [(2, 4, 1), (2, 2, 2), (2, 1, 4), (1, 2, 4)] {
        let mut resumed = ranks(micro, accum, world);
        for l in &mut resumed {
            l.restore(&saved).unwrap();
        }
        let got: Vec<Vec<u64>> = (21..=40).map(|_| step(&mut resumed, accum)).collect();
        assert_eq!(got, want, "{world} rank(s) × {accum} × {micro}");
    }
}
