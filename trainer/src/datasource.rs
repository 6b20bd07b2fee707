//! From the config's `data:` section to an opened, validated token dataset.
//!
//! * `TextFiles`: `train_data_path` is either a prepared dataset (index.json) or raw text,
//!   tokenized on first use with `val_data_path` as validation data; as litgpt's TextFiles, a
//!   directory gives its top-level `*.txt` files only (without `val_data_path`, the first of
//!   them is validation data).
//! * `TinyStories`: `data_path` holds prepared shards, or litgpt's layout (the extracted
//!   `TinyStories_all_data/` or `TinyStories_all_data.tar.gz`), tokenized on first use; when it
//!   holds neither, the archive is downloaded from the Hugging Face hub (`HF_ENDPOINT` honoured)
//!   into `data_path`, as litgpt does. The first json shard (`data00.json`) is validation data.
//! * `TextFiles` with `tinystories_sample: true` (the quickstart configs): when neither path
//!   exists, both are filled on first use with a small TinyStories sample from the hub
//!   (`mla_corpus::download_tinystories_sample`).
//! * The tokenizer: `tokenizer_dir` as given; when it does not exist and ends in `<owner>/<name>`
//!   (litgpt's `checkpoints/EleutherAI/pythia-160m`), its tokenizer files are downloaded there.
//!
//! * A `data_path`/`train_data_path` URL (`s3://bucket/prefix`) names a dataset prepared there
//!   (`mla prepare … --out s3://…`), read remotely; raw text on object storage is refused.
//!
//! * Ranks of a job: [`open_once_per_node`] lets one process per node prepare (download,
//!   tokenize) while that node's other ranks wait, so no two processes write one cache.
//!
//! Raw inputs are prepared into a cache, never next to the inputs (they may be read-only):
//! `data.init_args.cache_dir`, else `<out_dir>/data` for a local out_dir, else `.cache/mla/data`.
//! The cache key covers the input files `prepare` reads (path, size, mtime) and the tokenizer,
//! so changed inputs are re-tokenized.

use crate::config::{DataModule, RunConfig};
use crate::data::{
    download_tinystories, download_tinystories_sample, download_tokenizer, first_missing_ancestor,
    input_files, is_prepared, open_remote, prepare, remote_url, tinystories_input, Dataset,
    DownloadOptions, OpenOptions, PrepareArgs, Tokenizer, TINYSTORIES_REPO,
};
use crate::dist::{Communicator, RankInfo};
use crate::error::BadInput;
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tracing::info;

const DEFAULT_TINYSTORIES: &str = "data/tinystories";

/// Which of the three turns of [`open_once_per_node`] a rank opens the data in: global rank 0
/// first, then the first rank of every other node, then everyone else.
fn prep_turn(rank: &RankInfo) -> usize {
    match (rank.rank, rank.local_rank) {
        (0, _) => 0,
        (_, 0) => 1,
        _ => 2,
    }
}

/// The tokenizer directory and the opened dataset of this rank, prepared once per node.
///
/// Preparing downloads and tokenizes into a local cache with overwrite, so two processes must
/// never do it into one directory at once. Rank 0 goes first (on a shared filesystem it
/// prepares for everyone); then the first rank of each other node (without a shared
/// filesystem, it prepares its node's copy; with one, it finds rank 0's); then the rest of
/// each node, which find their node's copy. A barrier separates the turns; each wait is
/// bounded by `dist.timeout_secs`. Errors are this rank's; a peer that fails exits, and the
/// launcher (or mpirun) ends the job.
pub fn open_once_per_node(
    cfg: &RunConfig,
    rank: &RankInfo,
    comm: &dyn Communicator,
) -> anyhow::Result<(PathBuf, Dataset)> {
    // Turn t ends with barrier t (t = 0, 1): a rank waits out the turns before its own.
    let barriers = if rank.world_size > 1 { 2 } else { 0 };
    let before = prep_turn(rank).min(barriers);
    for _ in 0..before {
        comm.barrier()?;
    }
    let tokenizer_dir = tokenizer_dir(cfg)?;
    let dataset = open(cfg, &tokenizer_dir)?;
    for _ in before..barriers {
        comm.barrier()?;
    }
    Ok((tokenizer_dir, dataset))
}

/// Open the dataset the config names, preparing it first when needed.
pub fn open(cfg: &RunConfig, tokenizer_dir: &Path) -> anyhow::Result<Dataset> {
    let data = cfg
        .data
        .as_ref()
        .ok_or_else(|| BadInput("data: not set (TinyStories or TextFiles)".into()))?;
    let args = &data.init_args;
    let opts = OpenOptions {
        verify_checksums: args.verify_checksums.unwrap_or(true),
    };
    if !opts.verify_checksums {
        info!("data: shard sha256 not checked (data.init_args.verify_checksums: false); sizes and headers are");
    }
    let (name, inputs, val) = match data.module() {
        Some(DataModule::TextFiles) => {
            if let Some(url) = args.train_data_path.as_deref().and_then(remote_url) {
                if args.val_data_path.is_some() {
                    return Err(BadInput(format!(
                        "data.init_args.val_data_path: must be unset when train_data_path is a \
                         prepared dataset on object storage ({url}: its val split is used)"
                    ))
                    .into());
                }
                return open_remote_data(cfg, url, opts);
            }
            let train = PathBuf::from(args.train_data_path.as_deref().unwrap_or_default());
            if is_prepared(&train) {
                if args.val_data_path.is_some() {
                    return Err(BadInput(format!(
                        "data.init_args.val_data_path: must be unset when train_data_path is a \
                         prepared dataset ({}: its val split is used)",
                        train.display()
                    ))
                    .into());
                }
                return Ok(Dataset::open_dir(&train, opts)?);
            }
            if args.tinystories_sample == Some(true) {
                fill_sample(&train, args.val_data_path.as_deref())?;
            }
            let val = match args.val_data_path.as_deref() {
                Some(v) => top_level_txt(Path::new(v), "data.init_args.val_data_path")?,
                None => Vec::new(),
            };
            (
                "textfiles",
                top_level_txt(&train, "data.init_args.train_data_path")?,
                val,
            )
        }
        Some(DataModule::TinyStories) => {
            let data_path = match args.data_path.as_deref() {
                None | Some("") => DEFAULT_TINYSTORIES,
                Some(p) => p,
            };
            if let Some(url) = remote_url(data_path) {
                return open_remote_data(cfg, url, opts);
            }
            let path = PathBuf::from(data_path);
            if is_prepared(&path) {
                return Ok(Dataset::open_dir(&path, opts)?);
            }
            let input = match tinystories_input(&path) {
                Some(input) => input,
                None if path.is_dir() && has_story_files(&path) => path.clone(),
                None => {
                    info!("data: no TinyStories in {}, downloading it", path.display());
                    download_tinystories(&path, &DownloadOptions::default())?
                }
            };
            ("tinystories", vec![input], Vec::new())
        }
        None => {
            return Err(BadInput(format!(
                "data.class_path: unsupported `{}`",
                data.class_path
            ))
            .into())
        }
    };
    for p in inputs.iter().chain(&val) {
        if !p.exists() {
            let key = match data.module() {
                Some(DataModule::TinyStories) => "data.init_args.data_path",
                _ if val.contains(p) => "data.init_args.val_data_path",
                _ => "data.init_args.train_data_path",
            };
            return Err(BadInput(format!("{key}: {} does not exist", p.display())).into());
        }
    }
    let tokenizer = Tokenizer::from_dir(tokenizer_dir)?;
    let key = cache_key(name, &inputs, &val, tokenizer.sha256())?;
    let dir = cache_root(cfg)?.join(format!("{name}-{key}"));
    if is_prepared(&dir) {
        info!("data: using prepared {}", dir.display());
        return Ok(Dataset::open_dir(&dir, opts)?);
    }
    info!(
        "data: tokenizing {} into {}",
        inputs
            .iter()
            .chain(&val)
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        dir.display()
    );
    let mut p = PrepareArgs::new(inputs, tokenizer_dir, &dir);
    p.val = val;
    p.threads = args.num_workers.unwrap_or(0);
    p.quiet = false;
    p.overwrite = true; // a partial earlier attempt (no index) is replaced
    p.stop = Some(crate::signals::stop_requested);
    let report = prepare(&p)?;
    info!("{report}");
    Ok(Dataset::open_dir(&dir, opts)?)
}

/// A prepared dataset on object storage, validated like a local one; shard checksums are
/// remembered in the data cache so reopening an unchanged dataset does not re-read it.
fn open_remote_data(cfg: &RunConfig, url: &str, opts: OpenOptions) -> anyhow::Result<Dataset> {
    info!("data: reading {url}");
    Ok(open_remote(
        url,
        Some(cache_root(cfg)?.join("remote-sha256")),
        opts,
    )?)
}

/// TextFiles' inputs as litgpt's `TextFiles` reads them: a directory's top-level `*.txt` files,
/// sorted (nothing below it: litgpt writes its own tokenized `train/` and `val/` there, and no
/// `.json`); a file as given. A directory without any is an error naming `key`.
fn top_level_txt(path: &Path, key: &str) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]); // a file; a missing path is reported by the caller
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("{key}: reading {}", path.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(BadInput(format!(
            "{key}: {} has no .txt files (TextFiles reads the directory's top-level *.txt, as litgpt)",
            path.display()
        ))
        .into());
    }
    Ok(files)
}

/// `data.init_args.tinystories_sample`: when the paths are `DIR/train` and `DIR/val` and
/// neither exists yet, download the TinyStories sample into them (a first run from a plain
/// clone). Any other paths are left to the usual checks, so a mistyped directory is reported,
/// never filled. Offline, one line says what to point at local text instead.
fn fill_sample(train: &Path, val: Option<&str>) -> anyhow::Result<()> {
    let Some(val) = val.map(Path::new) else {
        return Ok(());
    };
    let sample_layout = train.file_name().is_some_and(|n| n == "train")
        && val.file_name().is_some_and(|n| n == "val")
        && train.parent() == val.parent();
    if !sample_layout || train.exists() || val.exists() {
        return Ok(());
    }
    let opts = DownloadOptions::default();
    info!(
        "data: {} and {} do not exist: downloading the TinyStories sample ({}'s validation split from {}) into them",
        train.display(),
        val.display(),
        TINYSTORIES_REPO,
        opts.endpoint
    );
    let r = download_tinystories_sample(train, val, &opts).map_err(|e| {
        BadInput(format!(
            "data.init_args.train_data_path: {} does not exist, and the TinyStories sample could \
             not be downloaded into it: {e}; or point --data.init_args.train_data_path and \
             --data.init_args.val_data_path at local text (directories of .txt stories)",
            train.display()
        ))
    })?;
    info!(
        "data: TinyStories sample: {} training and {} validation stories",
        r.train_stories, r.val_stories
    );
    Ok(())
}

/// Whether `dir` directly holds text/json story files (a TinyStories data_path of raw files).
fn has_story_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            [".txt", ".json", ".jsonl", ".tar.gz"]
                .iter()
                .any(|ext| name.ends_with(ext))
        })
    })
}

/// The tokenizer directory of a run, downloading litgpt-style `<dir>/<owner>/<name>` when absent.
pub fn tokenizer_dir(cfg: &RunConfig) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(cfg.tokenizer_dir.as_deref().ok_or_else(|| {
        BadInput("tokenizer_dir: not set (a directory with tokenizer.json, e.g. checkpoints/EleutherAI/pythia-160m)".into())
    })?);
    if dir.join("tokenizer.json").is_file() {
        return Ok(dir);
    }
    let parts: Vec<String> = dir
        .iter()
        .map(|c| c.to_string_lossy().to_string())
        .collect();
    match parts.as_slice() {
        [root @ .., owner, name] if !dir.exists() => {
            let repo = format!("{owner}/{name}");
            let cache: PathBuf = root.iter().collect();
            info!("tokenizer: {} missing, downloading {repo}", dir.display());
            // What the download creates, it removes when it fails: a mistyped path must not
            // leave an empty `<owner>/<name>` behind (issue 9), wherever it pointed.
            let created = first_missing_ancestor(&dir);
            download_tokenizer(&repo, &cache, &DownloadOptions::default()).map_err(|e| {
                if let Some(c) = &created {
                    let _ = std::fs::remove_dir_all(c);
                }
                BadInput(format!(
                    "tokenizer_dir: {} does not exist, and downloading {repo} from the Hugging \
                     Face hub into it failed: {e}; or point --tokenizer_dir at a directory \
                     with tokenizer.json",
                    dir.display()
                ))
                .into()
            })
        }
        _ => Err(BadInput(format!(
            "tokenizer_dir: {} has no tokenizer.json",
            dir.display()
        ))
        .into()),
    }
}

fn cache_root(cfg: &RunConfig) -> anyhow::Result<PathBuf> {
    if let Some(dir) = cfg
        .data
        .as_ref()
        .and_then(|d| d.init_args.cache_dir.as_deref())
    {
        return Ok(PathBuf::from(dir));
    }
    let dir = match cfg.out_dir.split_once("://") {
        None => PathBuf::from(&cfg.out_dir).join("data"),
        Some(("file", p)) => PathBuf::from(p).join("data"),
        Some(_) => return Ok(PathBuf::from(".cache/mla/data")),
    };
    // Inside the out_dir: a link planted at `data` must not send the cache's writes elsewhere.
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if !m.is_dir() => Err(BadInput(format!(
            "{} is not a directory (a symbolic link?): mla never follows links in an out_dir;              remove it, or set data.init_args.cache_dir",
            dir.display()
        ))
        .into()),
        _ => Ok(dir),
    }
}

/// Hash of the inputs' files (path, size, mtime), their roles, and the tokenizer.
fn cache_key(
    name: &str,
    inputs: &[PathBuf],
    val: &[PathBuf],
    tokenizer_sha: &str,
) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(tokenizer_sha.as_bytes());
    for (role, paths) in [("train", inputs), ("val", val)] {
        for root in paths {
            h.update(role.as_bytes());
            // Exactly the files `prepare` reads, found by its walk (which refuses symlink loops
            // and does not leave the input tree).
            for f in input_files(std::slice::from_ref(root))? {
                let meta =
                    std::fs::metadata(&f).with_context(|| format!("reading {}", f.display()))?;
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                let abs = std::fs::canonicalize(&f).unwrap_or(f);
                h.update(format!("{}\0{}\0{mtime}\n", abs.display(), meta.len()).as_bytes());
            }
        }
    }
    Ok(hex::encode(&h.finalize()[..6]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_0_then_each_other_nodes_first_rank_then_the_rest() {
        let r = |rank, local_rank| RankInfo {
            rank,
            world_size: 16,
            local_rank,
            source: "test",
        };
        // Two nodes of eight: ranks 0..8 on node 0, 8..16 on node 1.
        assert_eq!(prep_turn(&r(0, 0)), 0);
        assert_eq!(prep_turn(&r(8, 0)), 1);
        for (rank, local) in [(1, 1), (7, 7), (9, 1), (15, 7)] {
            assert_eq!(prep_turn(&r(rank, local)), 2, "rank {rank}");
        }
    }
}
