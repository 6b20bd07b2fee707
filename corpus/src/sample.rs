//! The TinyStories sample of the quickstart configs (`config_hub/pretrain/debug.yaml`,
//! `config_hub/study/tiny.yaml`): a few MB that a clone of the repository fills on first use,
//! instead of the 1.5 GB archive. It is the hub's TinyStories validation split (one Parquet
//! file of ~22k stories, `roneneldan/TinyStories` through the dataset viewer's listing, as
//! `--hf-dataset` reads it), split by a fixed rule: every [`SAMPLE_VAL_EVERY`]-th story (0,
//! 10, 20, …) is validation, the rest training. The two halves are written as `.txt` files
//! (stories separated by `<|endoftext|>` lines) into the train and val directories a
//! `TextFiles` config names, so they are read like any local text.
//!
//! Nothing partial is left behind: the download and both files are made in a temporary
//! directory beside them and moved into place only when whole; directories this created are
//! removed again when it fails.
//!
//! Not here: when a config asks for it (the trainer's datasource), HTTP (download.rs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use super::batch::{Batcher, Event};
use super::download::{first_missing_ancestor, DownloadOptions};
use super::error::DataError;
use super::format::Split;
use super::hub::{fetch_parquet, HubDataset};
use super::tokenizer::ENDOFTEXT;

/// The hub dataset the sample comes from.
pub const TINYSTORIES_REPO: &str = "roneneldan/TinyStories";
/// Every this-many-th story of the sample is validation data.
pub const SAMPLE_VAL_EVERY: usize = 10;
/// File name of each half inside its directory.
pub const SAMPLE_FILE: &str = "tinystories-sample.txt";

/// Stories in each half of a sample written by [`download_tinystories_sample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleReport {
    pub train_stories: u64,
    pub val_stories: u64,
}

/// Fill `train_dir` and `val_dir` (both missing) with the TinyStories sample; returns how many
/// stories each holds.
pub fn download_tinystories_sample(
    train_dir: &Path,
    val_dir: &Path,
    opts: &DownloadOptions,
) -> Result<SampleReport, DataError> {
    let parent = train_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let created = create_missing(parent)?;
    let result = fill(parent, train_dir, val_dir, opts);
    if result.is_err() {
        if let Some(top) = created {
            let _ = std::fs::remove_dir_all(top);
        }
    }
    result
}

/// Create `dir` and its missing parents; returns the topmost one created (to remove on
/// failure), or None when `dir` existed.
fn create_missing(dir: &Path) -> Result<Option<PathBuf>, DataError> {
    let top = first_missing_ancestor(dir);
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    Ok(top)
}

fn fill(
    parent: &Path,
    train_dir: &Path,
    val_dir: &Path,
    opts: &DownloadOptions,
) -> Result<SampleReport, DataError> {
    let tmp = tempfile::Builder::new()
        .prefix(".tinystories-sample-")
        .tempdir_in(parent)
        .map_err(|e| DataError::io(parent, e))?;
    let ds = HubDataset {
        repo: TINYSTORIES_REPO.into(),
        subset: "default".into(),
        split: "validation".into(),
    };
    let files = fetch_parquet(&ds, &tmp.path().join("hub"), opts)?;
    let (train_txt, val_txt) = (tmp.path().join("train.txt"), tmp.path().join("val.txt"));
    let report = split_into(&files, &train_txt, &val_txt)?;
    for (txt, dir) in [(&train_txt, train_dir), (&val_txt, val_dir)] {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let dest = dir.join(SAMPLE_FILE);
        std::fs::rename(txt, &dest).map_err(|e| DataError::io(&dest, e))?;
    }
    Ok(report)
}

/// Read the stories of `files` (their `text` column) and write every
/// [`SAMPLE_VAL_EVERY`]-th to `val`, the rest to `train`.
fn split_into(files: &[PathBuf], train: &Path, val: &Path) -> Result<SampleReport, DataError> {
    let create = |p: &Path| {
        std::fs::File::create(p)
            .map(std::io::BufWriter::new)
            .map_err(|e| DataError::io(p, e))
    };
    let (mut t, mut v) = (create(train)?, create(val)?);
    let mut report = SampleReport {
        train_stories: 0,
        val_stories: 0,
    };
    let mut written: Result<(), std::io::Error> = Ok(());
    let mut n = 0usize;
    for file in files {
        let counter = Arc::new(AtomicU64::new(0));
        let mut emit = |e: Event| {
            if let Event::Stories { stories, .. } = e {
                for s in stories {
                    let (out, count) = if n.is_multiple_of(SAMPLE_VAL_EVERY) {
                        (&mut v, &mut report.val_stories)
                    } else {
                        (&mut t, &mut report.train_stories)
                    };
                    n += 1;
                    *count += 1;
                    if written.is_ok() {
                        written = write!(out, "{s}\n{ENDOFTEXT}\n");
                    }
                }
            }
            written.is_ok()
        };
        let mut batch = Batcher::new(Split::Train, &counter, &mut emit);
        super::parquet::read_column(file, Some("text"), 64 << 20, &mut batch, &counter)?;
        batch.finish(file)?;
    }
    written
        .and_then(|()| t.flush())
        .and_then(|()| v.flush())
        .map_err(|e| DataError::io(train, e))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed rule: stories 0, 10, 20 … to val, in the order the file holds them.
    #[test]
    fn every_tenth_story_goes_to_val_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let stories: Vec<String> = (0..25).map(|i| format!("Story number {i}.")).collect();
        let parquet = dir.path().join("v.parquet");
        crate::parquet::tests::write_parquet(
            &parquet,
            &stories,
            ::parquet::basic::Compression::SNAPPY,
        );
        let (train, val) = (dir.path().join("t.txt"), dir.path().join("v.txt"));
        let r = split_into(&[parquet], &train, &val).unwrap();
        assert_eq!((r.train_stories, r.val_stories), (22, 3));
        let val_text = std::fs::read_to_string(&val).unwrap();
        assert_eq!(
            val_text,
            "Story number 0.\n<|endoftext|>\nStory number 10.\n<|endoftext|>\nStory number 20.\n<|endoftext|>\n"
        );
        let train_text = std::fs::read_to_string(&train).unwrap();
        assert!(train_text.starts_with("Story number 1.\n<|endoftext|>\nStory number 2.\n"));
        assert!(!train_text.contains("number 10."));
    }
}
