//! mla-corpus: raw text → token shards (`mla prepare`), the shard index, and the training/eval
//! loaders. No tch: it builds and its tests run without libtorch.
//!
//! Flow: [`Tokenizer::from_dir`] → [`prepare`] (or [`prepare_into`] for another [`ShardSink`])
//! writes `train-*.bin`, `val-*.bin` and `index.json` (format: `FORMAT.md` in this directory) →
//! [`Dataset::open`] validates them → [`TrainLoader`] / [`EvalLoader`] cut windows of
//! `block_size + 1` tokens into micro-batches for one rank.
//!
//! Inputs are local files or, with `--hf-dataset`, a hub dataset's Parquet files downloaded
//! into a cache first (`hub.rs`).
//!
//! Distributed preparation: N `prepare` workers (`--worker I/N`) each write their share of the
//! shards and a partial index into one place; [`merge`] joins the partial indexes into
//! `index.json` (`merge.rs`).
//!
//! Datasets live in a local directory ([`LocalDir`]) or under an object-store prefix
//! ([`RemoteDir`]: `s3://bucket/prefix`, streamed by ranged reads, see `remote.rs`).
//!
//! Not here: tensors (loaders return `Vec<i64>`), the CLI and YAML mapping (the binary owns them).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod archive;
mod batch;
mod dataset;
mod download;
mod error;
mod format;
mod hub;
mod input;
mod loader;
mod merge;
mod parquet;
mod prepare;
mod remote;
mod sample;
mod store;
#[cfg(test)]
mod test_http;
mod thrift;
mod tokenizer;
mod writer;

pub use dataset::{is_prepared, Dataset, OpenOptions, TokenStream};
pub use download::{
    download_file, download_tinystories, download_tokenizer, fetch_bytes, first_missing_ancestor,
    hf_endpoint, model_file_url, repo_dir, tinystories_input, tinystories_url, DownloadOptions,
    DEFAULT_HF_ENDPOINT, TINYSTORIES_ARCHIVE,
};
pub use error::{DataError, StoryAt};
pub use format::{
    partial_index_file, DatasetIndex, PartialIndex, ShardEntry, ShardHeader, Split, SplitIndex,
    TokenDtype, TokenizerInfo, Worker, FORMAT_VERSION, HEADER_BYTES, INDEX_FILE, SHARD_MAGIC,
};
pub use input::input_files;
pub use loader::{
    epoch_permutation, windows_in, EvalBatches, EvalLoader, LoaderConfig, LoaderPosition,
    TrainLoader, POSITION_VERSION,
};
pub use merge::{merge, merge_in, MergeReport};
pub use prepare::{
    check_output_outside_inputs, prepare, prepare_into, PrepareArgs, PrepareReport,
    DEFAULT_MAX_STORY_BYTES,
};
pub use remote::{open_remote, remote_url, RemoteDir};
pub use sample::{
    download_tinystories_sample, SampleReport, SAMPLE_FILE, SAMPLE_VAL_EVERY, TINYSTORIES_REPO,
};
pub use store::{LocalDir, RandomAccess, ShardSink, ShardSource};
pub use tokenizer::{Tokenizer, ENDOFTEXT};
pub use writer::{DatasetWriter, DEFAULT_SHARD_TOKENS, MIN_SHARD_TOKENS};

/// Anything that knows how many token ids it can produce.
pub trait VocabSource {
    /// Largest token id + 1.
    fn vocab_size(&self) -> u64;
    /// What to name in an error.
    fn vocab_source_name(&self) -> String;
}

impl VocabSource for Tokenizer {
    fn vocab_size(&self) -> u64 {
        Tokenizer::vocab_size(self)
    }
    fn vocab_source_name(&self) -> String {
        format!("tokenizer {}", self.path().display())
    }
}

impl VocabSource for Dataset {
    fn vocab_size(&self) -> u64 {
        Dataset::vocab_size(self)
    }
    fn vocab_source_name(&self) -> String {
        format!("dataset {}", self.location().display())
    }
}

/// Fail when token ids of `source` could index past the model's embedding rows.
pub fn check_vocab(source: &dyn VocabSource, padded_vocab_size: u64) -> Result<(), DataError> {
    let vocab_size = source.vocab_size();
    if vocab_size > padded_vocab_size {
        return Err(DataError::VocabTooLarge {
            source_name: source.vocab_source_name(),
            vocab_size,
            padded_vocab_size,
        });
    }
    Ok(())
}
