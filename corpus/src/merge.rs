//! `mla prepare --merge DIR`: joins the partial indexes that `mla prepare --worker I/N` runs
//! wrote into one directory or object-store prefix into its `index.json`. It reads
//! `index-worker-0000.json` to learn N, then the other N - 1 by name (no listing, which
//! [`ShardSink`] does not offer), checks that they agree, concatenates each split in worker
//! order and writes `index.json` last.
//!
//! Not here: preparing (see `prepare`), copying, renaming or hashing shards (they stay where
//! the workers wrote them; opening the dataset verifies them), deleting the partial indexes
//! (they stay, so a merge can be repeated with `--overwrite`).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use super::error::DataError;
use super::format::{
    partial_index_file, DatasetIndex, PartialIndex, SplitIndex, TokenizerInfo, INDEX_FILE,
};
use super::remote::{remote_url, RemoteDir};
use super::store::{LocalDir, ShardSink, ShardSource};
use super::tokenizer::Tokenizer;

/// What [`merge`] did.
#[derive(Clone, Debug)]
pub struct MergeReport {
    /// The index that was written.
    pub index: DatasetIndex,
    /// Where it was written (the dataset's directory or URL).
    pub location: PathBuf,
    /// Number of workers merged.
    pub workers: u32,
}

impl std::fmt::Display for MergeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "merged {} workers into {}: {}",
            self.workers,
            self.location.display(),
            self.index.summary()
        )
    }
}

/// Merge the workers' partial indexes in `dir` (a local directory or an `s3://` prefix) into
/// `dir/index.json`; refuses an existing `index.json` unless `overwrite`. With `tokenizer_dir`,
/// every worker must have used that tokenizer.
pub fn merge(
    dir: &Path,
    overwrite: bool,
    tokenizer_dir: Option<&Path>,
) -> Result<MergeReport, DataError> {
    let tokenizer = tokenizer_dir
        .map(|d| Tokenizer::from_dir(d).map(|t| t.info()))
        .transpose()?;
    let location = dir.to_string_lossy();
    if let Some(url) = remote_url(&location) {
        return merge_in(&RemoteDir::open(url)?, overwrite, tokenizer.as_ref());
    }
    if !dir.is_dir() {
        return Err(DataError::Merge {
            path: dir.to_path_buf(),
            message: "not a directory (--merge takes the --out of the `mla prepare --worker I/N` \
                      runs)"
                .into(),
        });
    }
    merge_in(&LocalDir::new(dir), overwrite, tokenizer.as_ref())
}

/// [`merge`] in any store that can be read and written.
pub fn merge_in<D: ShardSource + ShardSink>(
    dir: &D,
    overwrite: bool,
    tokenizer: Option<&TokenizerInfo>,
) -> Result<MergeReport, DataError> {
    if !overwrite && dir.exists(INDEX_FILE)? {
        return Err(DataError::OutputExists {
            path: ShardSink::location(dir, INDEX_FILE),
        });
    }
    let first = read_partial(dir, 0, None)?;
    let workers = first.workers;
    let mut parts = vec![first];
    for i in 1..workers {
        let p = read_partial(dir, i, Some(workers))?;
        check_agrees(dir, &p, &parts[0])?;
        parts.push(p);
    }
    let base = &parts[0].index;
    if let Some(want) = tokenizer {
        if let Some((field, ours, theirs)) = tokenizer_difference(want, &base.tokenizer) {
            return Err(DataError::Merge {
                path: location_of(dir, 0),
                message: format!(
                    "worker 0 used another tokenizer than --tokenizer-dir: {field} {theirs}, \
                     --tokenizer-dir has {ours}"
                ),
            });
        }
    }
    let mut splits: BTreeMap<String, SplitIndex> = BTreeMap::new();
    let mut names = HashSet::new();
    for p in &parts {
        for (name, s) in &p.index.splits {
            let merged = splits.entry(name.clone()).or_default();
            for shard in &s.shards {
                if !names.insert(shard.file.clone()) {
                    return Err(DataError::Merge {
                        path: location_of(dir, p.worker),
                        message: format!(
                            "worker {} lists shard {}, which another worker lists too",
                            p.worker, shard.file
                        ),
                    });
                }
            }
            // Each partial index adds up on its own; their sum may still wrap around.
            let overflow = |what: &str| DataError::BadIndex {
                path: location_of(dir, p.worker),
                message: format!(
                    "split {name}: worker {}'s {what} bring the workers' total past {}",
                    p.worker,
                    u64::MAX
                ),
            };
            merged.tokens = merged
                .tokens
                .checked_add(s.tokens)
                .ok_or_else(|| overflow("tokens"))?;
            merged.stories = merged
                .stories
                .checked_add(s.stories)
                .ok_or_else(|| overflow("stories"))?;
            merged.shards.extend(s.shards.iter().cloned());
            merged.sources.extend(s.sources.iter().cloned());
        }
    }
    let index = DatasetIndex {
        splits,
        ..base.clone()
    };
    // Written as every reader will parse it: a merge never leaves an index that does not open.
    let json = index.to_json();
    let index = DatasetIndex::from_json(&json, &ShardSink::location(dir, INDEX_FILE))?;
    dir.put(INDEX_FILE, &json)?;
    let location = ShardSink::location(dir, INDEX_FILE);
    Ok(MergeReport {
        index,
        location: location.parent().map(Path::to_path_buf).unwrap_or(location),
        workers,
    })
}

fn location_of<D: ShardSink>(dir: &D, worker: u32) -> PathBuf {
    dir.location(&partial_index_file(worker))
}

/// Worker `i`'s partial index; `workers`: the count worker 0 gave (None while reading worker 0).
fn read_partial<D: ShardSource + ShardSink>(
    dir: &D,
    i: u32,
    workers: Option<u32>,
) -> Result<PartialIndex, DataError> {
    let name = partial_index_file(i);
    let path = location_of(dir, i);
    if !dir.exists(&name)? {
        let message = match workers {
            Some(n) => format!(
                "not found: worker {i}/{n} has not finished (merge when every `mla prepare … \
                 --worker I/{n}` run is done)"
            ),
            None => "not found: worker 0 has not finished, or this is not the --out of `mla \
                     prepare … --worker I/N` runs"
                .into(),
        };
        return Err(DataError::Merge { path, message });
    }
    let p = PartialIndex::from_json(&dir.read(&name)?, &path)?;
    if p.worker != i {
        return Err(DataError::Merge {
            path,
            message: format!(
                "says it is worker {} (of {}), expected worker {i}",
                p.worker, p.workers
            ),
        });
    }
    Ok(p)
}

/// Worker `p` must have been one of as many workers as worker 0, and written the same format,
/// token width and tokenizer.
fn check_agrees<D: ShardSink>(
    dir: &D,
    p: &PartialIndex,
    first: &PartialIndex,
) -> Result<(), DataError> {
    let differs = |field: &str, theirs: String, ours: String| DataError::Merge {
        path: location_of(dir, p.worker),
        message: format!(
            "worker {} disagrees with worker 0 on {field}: {theirs} here, {ours} in worker 0's",
            p.worker
        ),
    };
    let (a, b) = (&p.index, &first.index);
    if p.workers != first.workers {
        return Err(differs(
            "workers",
            p.workers.to_string(),
            first.workers.to_string(),
        ));
    }
    if a.format_version != b.format_version {
        return Err(differs(
            "format_version",
            a.format_version.to_string(),
            b.format_version.to_string(),
        ));
    }
    if a.dtype != b.dtype {
        return Err(differs(
            "dtype",
            format!("{:?}", a.dtype),
            format!("{:?}", b.dtype),
        ));
    }
    if let Some((field, ours, theirs)) = tokenizer_difference(&b.tokenizer, &a.tokenizer) {
        return Err(differs(&format!("tokenizer {field}"), theirs, ours));
    }
    Ok(())
}

/// The first field in which `theirs` differs from `ours`: (name, ours, theirs).
fn tokenizer_difference(
    ours: &TokenizerInfo,
    theirs: &TokenizerInfo,
) -> Option<(&'static str, String, String)> {
    let fields = [
        ("sha256", ours.sha256.clone(), theirs.sha256.clone()),
        (
            "vocab_size",
            ours.vocab_size.to_string(),
            theirs.vocab_size.to_string(),
        ),
        (
            "separator_id",
            ours.separator_id.to_string(),
            theirs.separator_id.to_string(),
        ),
        (
            "separator_token",
            format!("{:?}", ours.separator_token),
            format!("{:?}", theirs.separator_token),
        ),
    ];
    fields.into_iter().find(|(_, a, b)| a != b)
}

#[cfg(test)]
mod tests {
    use super::super::format::{
        ShardEntry, Split, TokenDtype, Worker, FORMAT_NAME, FORMAT_VERSION,
    };
    use super::*;

    fn partial(worker: u32, workers: u32, tokens: u64) -> PartialIndex {
        let w = Worker {
            index: worker,
            count: workers,
        };
        let shard = ShardEntry {
            file: w.shard_file(Split::Train, 0),
            tokens,
            bytes: 32 + 2 * tokens,
            sha256: "00".into(),
        };
        let train = SplitIndex {
            tokens,
            stories: 1,
            shards: vec![shard],
            sources: vec![format!("in{worker}.txt")],
        };
        PartialIndex {
            worker,
            workers,
            index: DatasetIndex {
                format: FORMAT_NAME.into(),
                format_version: FORMAT_VERSION,
                dtype: TokenDtype::U16,
                tokenizer: TokenizerInfo {
                    sha256: "ab".into(),
                    vocab_size: 100,
                    separator_id: 0,
                    separator_token: "<|endoftext|>".into(),
                },
                splits: [("train".to_owned(), train)].into(),
            },
        }
    }

    fn put(dir: &LocalDir, p: &PartialIndex) {
        dir.put(&partial_index_file(p.worker), &p.to_json())
            .unwrap();
    }

    #[test]
    fn splits_are_concatenated_in_worker_order() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = LocalDir::new(tmp.path());
        for (i, t) in [(1, 5), (0, 3), (2, 7)] {
            put(&dir, &partial(i, 3, t));
        }
        let r = merge_in(&dir, false, None).unwrap();
        let train = r.index.split(Split::Train);
        assert_eq!((train.tokens, train.stories), (15, 3));
        assert_eq!(train.sources, ["in0.txt", "in1.txt", "in2.txt"]);
        let files: Vec<_> = train.shards.iter().map(|s| s.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "train-w0000-00000.bin",
                "train-w0001-00000.bin",
                "train-w0002-00000.bin"
            ]
        );
        assert!(dir.exists(INDEX_FILE).unwrap());
    }

    #[test]
    fn token_counts_that_wrap_around_across_workers_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = LocalDir::new(tmp.path());
        // The largest u16 shard whose size fits in a u64: 32 + 2t <= u64::MAX. Each partial index
        // is valid on its own; three of them hold more than u64::MAX tokens.
        let t = (u64::MAX - 32) / 2;
        assert!(t.checked_mul(3).is_none());
        for i in 0..3 {
            put(&dir, &partial(i, 3, t));
        }
        let e = merge_in(&dir, false, None).unwrap_err();
        assert!(matches!(e, DataError::BadIndex { .. }) && e.is_bad_input());
        assert_eq!(
            e.to_string(),
            format!(
                "{}: bad dataset index: split train: worker 2's tokens bring the workers' total \
                 past 18446744073709551615",
                tmp.path().join("index-worker-0002.json").display()
            )
        );
        assert!(!dir.exists(INDEX_FILE).unwrap());
    }

    #[test]
    fn a_renamed_partial_index_or_a_shared_shard_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = LocalDir::new(tmp.path());
        put(&dir, &partial(0, 2, 3));
        let mut p = partial(0, 2, 3);
        dir.put(&partial_index_file(1), &p.to_json()).unwrap();
        let e = merge_in(&dir, false, None).unwrap_err().to_string();
        assert!(
            e.contains("index-worker-0001.json") && e.contains("expected worker 1"),
            "{e}"
        );
        p.worker = 1;
        put(&dir, &p);
        let e = merge_in(&dir, false, None).unwrap_err().to_string();
        assert!(
            e.contains("train-w0000-00000.bin") && e.contains("worker 1"),
            "{e}"
        );
        assert!(!dir.exists(INDEX_FILE).unwrap());
    }
}
