//! `DatasetWriter`: appends token ids to the `train`/`val` streams, cuts them into fixed-width
//! shards of at most `shard_tokens` tokens, and writes `index.json` last through a [`ShardSink`]
//! (as one [`Worker`] of a distributed preparation: its own shard names and a partial index).
//!
//! Not here: reading inputs or tokenizing (see `prepare`), reading shards back (see `dataset`).

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::error::DataError;
use super::format::{
    DatasetIndex, PartialIndex, ShardEntry, ShardHeader, Split, SplitIndex, TokenDtype,
    TokenizerInfo, Worker, FORMAT_NAME, FORMAT_VERSION, HEADER_BYTES, INDEX_FILE,
};
use super::store::ShardSink;

/// Default shard size: 2^25 tokens (64 MiB of u16).
pub const DEFAULT_SHARD_TOKENS: u64 = 1 << 25;

/// Smallest `--shard-tokens` `mla prepare` accepts: 2^16 tokens (128 KiB of u16). Each shard is
/// one more file or object to open, hash and index, so below this the count of files, not the
/// data, sets the cost. The library takes any size, so tests can cut small data across shards.
pub const MIN_SHARD_TOKENS: u64 = 1 << 16;

struct SplitWriter {
    split: Split,
    buf: Vec<u32>,
    index: SplitIndex,
}

/// Writes one prepared dataset. Call [`DatasetWriter::finish`] to flush and commit the index,
/// or [`DatasetWriter::abandon`] to remove the shards written so far; dropping the writer
/// without either leaves shards but no index, i.e. no dataset.
pub struct DatasetWriter<'a> {
    sink: &'a dyn ShardSink,
    tokenizer: TokenizerInfo,
    dtype: TokenDtype,
    shard_tokens: u64,
    splits: [SplitWriter; 2],
    worker: Option<Worker>,
}

impl<'a> DatasetWriter<'a> {
    /// Start a dataset. Removes an existing `index.json` first, so an interrupted rewrite never
    /// looks complete; refuses when one exists and `overwrite` is false.
    pub fn new(
        sink: &'a dyn ShardSink,
        tokenizer: TokenizerInfo,
        shard_tokens: u64,
        overwrite: bool,
    ) -> Result<Self, DataError> {
        Self::create(sink, tokenizer, shard_tokens, overwrite, None)
    }

    /// Start `worker`'s part of a dataset that several workers write into one sink: shards
    /// named `train-w0003-00000.bin` and, on [`DatasetWriter::finish`], the partial index
    /// `index-worker-0003.json` instead of `index.json`. Refuses when this worker's partial index
    /// exists and `overwrite` is false; with `overwrite` removes it first, and a merged
    /// `index.json` too (it lists this worker's shards, which are about to be replaced).
    pub fn for_worker(
        sink: &'a dyn ShardSink,
        tokenizer: TokenizerInfo,
        shard_tokens: u64,
        overwrite: bool,
        worker: Worker,
    ) -> Result<Self, DataError> {
        Self::create(sink, tokenizer, shard_tokens, overwrite, Some(worker))
    }

    fn create(
        sink: &'a dyn ShardSink,
        tokenizer: TokenizerInfo,
        shard_tokens: u64,
        overwrite: bool,
        worker: Option<Worker>,
    ) -> Result<Self, DataError> {
        if shard_tokens == 0 {
            return Err(DataError::InvalidOption {
                key: "shard_tokens".into(),
                message: "must be at least 1".into(),
            });
        }
        let index_file = Self::index_file(worker);
        if sink.exists(&index_file)? {
            if !overwrite {
                return Err(DataError::OutputExists {
                    path: sink.location(&index_file),
                });
            }
            sink.remove(&index_file)?;
        }
        if worker.is_some() && overwrite {
            sink.remove(INDEX_FILE)?;
        }
        let dtype = TokenDtype::for_vocab(tokenizer.vocab_size);
        let split = |split| SplitWriter {
            split,
            buf: Vec::new(),
            index: SplitIndex::default(),
        };
        Ok(Self {
            sink,
            tokenizer,
            dtype,
            shard_tokens,
            splits: [split(Split::Train), split(Split::Val)],
            worker,
        })
    }

    /// What [`DatasetWriter::finish`] writes: `index.json`, or a worker's partial index.
    fn index_file(worker: Option<Worker>) -> String {
        worker.map_or_else(|| INDEX_FILE.to_owned(), Worker::partial_index_file)
    }

    /// Token width chosen from the vocabulary size.
    pub fn dtype(&self) -> TokenDtype {
        self.dtype
    }

    fn split_mut(&mut self, split: Split) -> &mut SplitWriter {
        match split {
            Split::Train => &mut self.splits[0],
            Split::Val => &mut self.splits[1],
        }
    }

    /// Append one story: the separator id, then its tokens.
    pub fn push_story(&mut self, split: Split, tokens: &[u32]) -> Result<(), DataError> {
        let sep = self.tokenizer.separator_id;
        let s = self.split_mut(split);
        s.index.stories += 1;
        s.buf.push(sep);
        self.push_tokens(split, tokens)
    }

    /// Append raw token ids (no separator).
    pub fn push_tokens(&mut self, split: Split, mut tokens: &[u32]) -> Result<(), DataError> {
        let vocab = self.tokenizer.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| u64::from(t) >= vocab) {
            return Err(DataError::InvalidOption {
                key: "token id".into(),
                message: format!("{bad} is outside the vocabulary of {vocab}"),
            });
        }
        let cap = self.shard_tokens as usize;
        loop {
            let s = self.split_mut(split);
            let room = cap.saturating_sub(s.buf.len());
            let take = room.min(tokens.len());
            s.buf.extend_from_slice(&tokens[..take]);
            tokens = &tokens[take..];
            // A separator pushed by push_story may already fill the shard.
            if s.buf.len() >= cap {
                self.flush(split, cap)?;
            }
            if tokens.is_empty() {
                return Ok(());
            }
        }
    }

    /// Record an input name in the split's `sources` list.
    pub fn add_source(&mut self, split: Split, name: impl Into<String>) {
        self.split_mut(split).index.sources.push(name.into());
    }

    /// Tokens written so far to `split` (buffered ones included).
    pub fn tokens(&self, split: Split) -> u64 {
        let s = &self.splits[split as usize];
        s.index.tokens + s.buf.len() as u64
    }

    /// Write out the first `n` buffered tokens of `split` as one shard.
    fn flush(&mut self, split: Split, n: usize) -> Result<(), DataError> {
        let dtype = self.dtype;
        let vocab_size = u32::try_from(self.tokenizer.vocab_size).unwrap_or(u32::MAX);
        let sink = self.sink;
        let worker = self.worker;
        let s = self.split_mut(split);
        let n = n.min(s.buf.len());
        if n == 0 {
            return Ok(());
        }
        let header = ShardHeader {
            version: FORMAT_VERSION,
            dtype,
            tokens: n as u64,
            vocab_size,
        };
        let mut bytes = Vec::with_capacity(HEADER_BYTES as usize + n * dtype.bytes() as usize);
        bytes.extend_from_slice(&header.encode());
        match dtype {
            // Ids were checked against the vocabulary, which fits u16 for this dtype.
            TokenDtype::U16 => {
                for &t in &s.buf[..n] {
                    bytes.extend_from_slice(&(t as u16).to_le_bytes());
                }
            }
            TokenDtype::U32 => {
                for &t in &s.buf[..n] {
                    bytes.extend_from_slice(&t.to_le_bytes());
                }
            }
        }
        let n_shard = s.index.shards.len();
        let file = match worker {
            Some(w) => w.shard_file(s.split, n_shard),
            None => format!("{}-{n_shard:05}.bin", s.split.as_str()),
        };
        let sha256 = hex::encode(Sha256::digest(&bytes));
        sink.put(&file, &bytes)?;
        s.index.shards.push(ShardEntry {
            file,
            tokens: n as u64,
            bytes: bytes.len() as u64,
            sha256,
        });
        s.index.tokens += n as u64;
        s.buf.drain(..n);
        Ok(())
    }

    /// Remove the shards written so far (best effort: a shard that cannot be removed stays, but
    /// without an index it is never read). No index was written, so nothing looks prepared.
    pub fn abandon(self) {
        for s in &self.splits {
            for shard in &s.index.shards {
                let _ = self.sink.remove(&shard.file);
            }
        }
    }

    /// Flush the last partial shards and write `index.json` (last; a worker's partial index
    /// instead, see [`DatasetWriter::for_worker`]). Returns the index. On
    /// failure the shards are removed ([`DatasetWriter::abandon`]).
    pub fn finish(mut self) -> Result<DatasetIndex, DataError> {
        match self.commit() {
            Ok(index) => Ok(index),
            Err(e) => {
                self.abandon();
                Err(e)
            }
        }
    }

    fn commit(&mut self) -> Result<DatasetIndex, DataError> {
        for split in [Split::Train, Split::Val] {
            while !self.split_mut(split).buf.is_empty() {
                let cap = self.shard_tokens as usize;
                self.flush(split, cap)?;
            }
        }
        let splits: BTreeMap<String, SplitIndex> = self
            .splits
            .iter()
            .map(|s| (s.split.as_str().to_owned(), s.index.clone()))
            .collect();
        let index = DatasetIndex {
            format: FORMAT_NAME.to_owned(),
            format_version: FORMAT_VERSION,
            dtype: self.dtype,
            tokenizer: self.tokenizer.clone(),
            splits,
        };
        match self.worker {
            None => self.sink.put(INDEX_FILE, &index.to_json())?,
            Some(w) => {
                let partial = PartialIndex {
                    worker: w.index,
                    workers: w.count,
                    index,
                };
                self.sink.put(&w.partial_index_file(), &partial.to_json())?;
                return Ok(partial.index);
            }
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{LocalDir, ShardSource};

    fn info(vocab_size: u64) -> TokenizerInfo {
        TokenizerInfo {
            sha256: "00".into(),
            vocab_size,
            separator_id: 0,
            separator_token: "<|endoftext|>".into(),
        }
    }

    #[test]
    fn shards_are_cut_at_shard_tokens_and_index_sums_match() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::new(dir.path());
        let mut w = DatasetWriter::new(&store, info(100), 4, false).unwrap();
        w.push_story(Split::Train, &[5, 6, 7]).unwrap(); // 4 tokens: exactly one shard
        w.push_story(Split::Train, &[8, 9, 10, 11, 12]).unwrap(); // 6 tokens: 4 + 2
        w.push_story(Split::Val, &[1]).unwrap();
        let index = w.finish().unwrap();
        let train = index.split(Split::Train);
        assert_eq!(train.tokens, 10);
        assert_eq!(train.stories, 2);
        let counts: Vec<u64> = train.shards.iter().map(|s| s.tokens).collect();
        assert_eq!(counts, vec![4, 4, 2]);
        assert_eq!(index.split(Split::Val).tokens, 2);
        assert_eq!(index.dtype, TokenDtype::U16);
        let shard = ShardSource::read(&store, "train-00001.bin").unwrap();
        assert_eq!(shard.len(), 32 + 8);
        assert_eq!(&shard[32..], &[0, 0, 8, 0, 9, 0, 10, 0]);
    }

    #[test]
    fn token_outside_vocabulary_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::new(dir.path());
        let mut w = DatasetWriter::new(&store, info(10), 4, false).unwrap();
        let e = w
            .push_story(Split::Train, &[3, 10])
            .unwrap_err()
            .to_string();
        assert!(e.contains("10 is outside the vocabulary of 10"), "{e}");
    }

    #[test]
    fn abandon_removes_the_shards_written_so_far() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::new(dir.path());
        let mut w = DatasetWriter::new(&store, info(100), 2, false).unwrap();
        w.push_story(Split::Train, &[5, 6, 7]).unwrap();
        w.push_story(Split::Val, &[8]).unwrap();
        assert!(store.exists("train-00001.bin").unwrap());
        w.abandon();
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_worker_names_its_shards_and_writes_a_partial_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::new(dir.path());
        let w = Worker { index: 3, count: 8 };
        let mut writer = DatasetWriter::for_worker(&store, info(100), 4, false, w).unwrap();
        writer.push_story(Split::Train, &[5, 6, 7, 8]).unwrap();
        writer.push_story(Split::Val, &[1]).unwrap();
        let index = writer.finish().unwrap();
        assert!(!store.exists(INDEX_FILE).unwrap());
        let names: Vec<_> = index
            .split(Split::Train)
            .shards
            .iter()
            .map(|s| s.file.clone())
            .collect();
        assert_eq!(names, ["train-w0003-00000.bin", "train-w0003-00001.bin"]);
        assert!(store.exists("val-w0003-00000.bin").unwrap());
        let path = ShardSource::location(&store, "index-worker-0003.json");
        let bytes = ShardSource::read(&store, "index-worker-0003.json").unwrap();
        let partial = PartialIndex::from_json(&bytes, &path).unwrap();
        assert_eq!((partial.worker, partial.workers), (3, 8));
        assert_eq!(partial.index, index);
        // Its own partial index counts as existing; another worker's does not.
        let e = DatasetWriter::for_worker(&store, info(100), 4, false, w)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("index-worker-0003.json already exists"), "{e}");
        let other = Worker { index: 2, count: 8 };
        drop(DatasetWriter::for_worker(&store, info(100), 4, false, other).unwrap());
        // --overwrite removes its partial index and a merged index.json, nothing else.
        store.put(INDEX_FILE, b"{}").unwrap();
        drop(DatasetWriter::for_worker(&store, info(100), 4, true, w).unwrap());
        assert!(!store.exists("index-worker-0003.json").unwrap());
        assert!(!store.exists(INDEX_FILE).unwrap());
        assert!(store.exists("train-w0003-00000.bin").unwrap());
    }

    #[test]
    fn existing_index_is_kept_unless_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::new(dir.path());
        let mut w = DatasetWriter::new(&store, info(10), 4, false).unwrap();
        w.push_story(Split::Train, &[3]).unwrap();
        w.finish().unwrap();
        let e = DatasetWriter::new(&store, info(10), 4, false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("index.json already exists"), "{e}");
        let w = DatasetWriter::new(&store, info(10), 4, true).unwrap();
        assert!(!store.exists(INDEX_FILE).unwrap());
        drop(w);
    }
}
