//! `Dataset`: opens a prepared dataset, validates every shard against the index (header, size,
//! optionally sha256), and presents each split as one [`TokenStream`] with random access.
//!
//! Not here: windows, shuffling and batching (see `loader`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;

use super::error::DataError;
use super::format::{DatasetIndex, ShardHeader, Split, TokenDtype, HEADER_BYTES, INDEX_FILE};
use super::store::{LocalDir, RandomAccess, ShardSource};

/// How much to check when opening.
#[derive(Clone, Copy, Debug)]
pub struct OpenOptions {
    /// Hash every shard and compare with the index (reads all data once; ~1 s per GB).
    pub verify_checksums: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            verify_checksums: true,
        }
    }
}

/// A prepared dataset.
pub struct Dataset {
    location: PathBuf,
    index: DatasetIndex,
    train: Arc<TokenStream>,
    val: Arc<TokenStream>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("location", &self.location)
            .field("train_tokens", &self.train.len())
            .field("val_tokens", &self.val.len())
            .finish_non_exhaustive()
    }
}

/// Whether `dir` holds a prepared dataset (its `index.json` exists).
pub fn is_prepared(dir: impl AsRef<Path>) -> bool {
    dir.as_ref().join(INDEX_FILE).is_file()
}

impl Dataset {
    /// Open a local directory, verifying checksums.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, DataError> {
        Self::open_dir(dir, OpenOptions::default())
    }

    /// Open the dataset in a local directory with `opts`.
    pub fn open_dir(dir: impl AsRef<Path>, opts: OpenOptions) -> Result<Self, DataError> {
        Self::open_with(Arc::new(LocalDir::new(dir.as_ref())), opts)
    }

    /// Open from any source.
    pub fn open_with(source: Arc<dyn ShardSource>, opts: OpenOptions) -> Result<Self, DataError> {
        let index_path = source.location(INDEX_FILE);
        let bytes = source.read(INDEX_FILE).map_err(|e| match e {
            DataError::Io { error: io, .. } if io.kind() == std::io::ErrorKind::NotFound => {
                DataError::BadIndex {
                    path: index_path.clone(),
                    message: "not found (run `mla prepare` first)".into(),
                }
            }
            other => other,
        })?;
        let index = DatasetIndex::from_json(&bytes, &index_path)?;
        let train = Arc::new(TokenStream::open(&*source, &index, Split::Train, opts)?);
        let val = Arc::new(TokenStream::open(&*source, &index, Split::Val, opts)?);
        Ok(Self {
            location: dataset_location(&*source),
            index,
            train,
            val,
        })
    }

    /// Name the dataset `location` in messages instead of where it is stored: a dataset
    /// tokenized into a temporary directory from the user's text is named after that text.
    /// Call it right after opening, before handing out splits.
    pub fn named(mut self, location: impl Into<PathBuf>) -> Self {
        let location = location.into();
        for stream in [&mut self.train, &mut self.val] {
            if let Some(s) = Arc::get_mut(stream) {
                s.location = location.clone();
            }
        }
        self.location = location;
        self
    }

    pub fn index(&self) -> &DatasetIndex {
        &self.index
    }

    /// Where the dataset is (directory or URL).
    pub fn location(&self) -> &Path {
        &self.location
    }

    /// Vocabulary size of the tokenizer it was prepared with.
    pub fn vocab_size(&self) -> u64 {
        self.index.vocab_size()
    }

    /// The token stream of a split (possibly empty).
    pub fn split(&self, split: Split) -> Arc<TokenStream> {
        match split {
            Split::Train => self.train.clone(),
            Split::Val => self.val.clone(),
        }
    }
}

struct Shard {
    first_token: u64,
    tokens: u64,
    file: Box<dyn RandomAccess>,
}

/// The concatenated tokens of one split, read on demand.
pub struct TokenStream {
    split: Split,
    location: PathBuf,
    dtype: TokenDtype,
    shards: Vec<Shard>,
    tokens: u64,
    /// Reads are network round trips: read a batch's rows concurrently.
    concurrent: bool,
}

impl TokenStream {
    fn open(
        source: &dyn ShardSource,
        index: &DatasetIndex,
        split: Split,
        opts: OpenOptions,
    ) -> Result<Self, DataError> {
        let entries = index.split(split).shards;
        let opened: Vec<Box<dyn RandomAccess>> = entries
            .par_iter()
            .map(|e| {
                let path = source.location(&e.file);
                let file = source.open(&e.file)?;
                if file.len() != e.bytes {
                    return Err(DataError::ShardSize {
                        path,
                        expected_bytes: e.bytes,
                        actual_bytes: file.len(),
                    });
                }
                let mut head = [0u8; HEADER_BYTES as usize];
                file.read_exact_at(&mut head, 0)?;
                let h = ShardHeader::decode(&head, &path)?;
                let bad = |reason: String| DataError::BadShardHeader {
                    path: path.clone(),
                    reason,
                };
                if h.dtype != index.dtype {
                    return Err(bad(format!(
                        "dtype {:?}, index says {:?}",
                        h.dtype, index.dtype
                    )));
                }
                if h.tokens != e.tokens {
                    return Err(bad(format!("{} tokens, index says {}", h.tokens, e.tokens)));
                }
                if u64::from(h.vocab_size) != index.tokenizer.vocab_size {
                    return Err(bad(format!(
                        "vocab_size {}, index says {}",
                        h.vocab_size, index.tokenizer.vocab_size
                    )));
                }
                if opts.verify_checksums {
                    let actual = file.sha256()?;
                    if !actual.eq_ignore_ascii_case(&e.sha256) {
                        return Err(DataError::ShardChecksum {
                            path,
                            expected: e.sha256.clone(),
                            actual,
                        });
                    }
                }
                Ok(file)
            })
            .collect::<Result<_, _>>()?;
        let concurrent = opened.iter().any(|f| f.latency_bound());
        let mut first_token = 0u64;
        let mut shards = Vec::with_capacity(entries.len());
        for (e, file) in entries.iter().zip(opened) {
            shards.push(Shard {
                first_token,
                tokens: e.tokens,
                file,
            });
            // The index check already bounds the sum; a wrap here would misplace every read.
            first_token = first_token
                .checked_add(e.tokens)
                .ok_or_else(|| DataError::BadIndex {
                    path: source.location(INDEX_FILE),
                    message: format!(
                        "split {split}: its shards hold more than {} tokens",
                        u64::MAX
                    ),
                })?;
        }
        Ok(Self {
            split,
            location: dataset_location(source),
            dtype: index.dtype,
            shards,
            tokens: first_token,
            concurrent,
        })
    }

    /// Which split this is.
    pub fn split(&self) -> Split {
        self.split
    }

    /// Where the dataset is, for messages.
    pub fn location(&self) -> &Path {
        &self.location
    }

    /// Total tokens in the split.
    pub fn len(&self) -> u64 {
        self.tokens
    }

    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// True when reads are network round trips (a dataset on object storage): the train loader
    /// then reads the next micro-batch in the background.
    pub fn latency_bound(&self) -> bool {
        self.concurrent
    }

    /// Read `starts.len()` rows of equal length: row i of `out` (flat, row-major) gets tokens
    /// `[starts[i], starts[i] + row)`, `row = out.len() / starts.len()`. Rows of a remote
    /// dataset are fetched concurrently (one round trip per batch instead of one per row).
    pub fn read_rows(&self, starts: &[u64], out: &mut [i64]) -> Result<(), DataError> {
        if starts.is_empty() || !out.len().is_multiple_of(starts.len()) {
            return Err(DataError::InvalidOption {
                key: "token rows".into(),
                message: format!(
                    "{} tokens do not split into {} equal rows",
                    out.len(),
                    starts.len()
                ),
            });
        }
        let row = out.len() / starts.len();
        let mut rows = out.chunks_exact_mut(row).zip(starts);
        if !self.concurrent || starts.len() == 1 {
            return rows.try_for_each(|(dst, &s)| self.read(s, dst));
        }
        // Threads, not the rayon pool: the work is waiting on the network, not the CPU.
        std::thread::scope(|scope| {
            let handles: Vec<_> = rows
                .map(|(dst, &s)| scope.spawn(move || self.read(s, dst)))
                .collect();
            // (The scope joins every thread, also those after a failed one.)
            handles
                .into_iter()
                .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })
    }

    /// Read tokens `[start, start + out.len())` of the concatenated stream into `out`.
    pub fn read(&self, start: u64, out: &mut [i64]) -> Result<(), DataError> {
        let end = start.saturating_add(out.len() as u64);
        if end > self.tokens {
            return Err(DataError::InvalidOption {
                key: "token range".into(),
                message: format!(
                    "{start}..{end} is past the end of the {} split ({} tokens)",
                    self.split, self.tokens
                ),
            });
        }
        let width = self.dtype.bytes() as usize;
        let mut pos = start;
        let mut filled = 0usize;
        let mut buf = Vec::new();
        // First shard whose range contains `start`.
        let mut i = self
            .shards
            .partition_point(|s| s.first_token + s.tokens <= start);
        while filled < out.len() {
            let s = &self.shards[i];
            let offset = pos - s.first_token;
            // Compared as u64: a shard's count need not fit in a usize.
            let n = (s.tokens - offset).min((out.len() - filled) as u64) as usize;
            buf.resize(n * width, 0);
            s.file
                .read_exact_at(&mut buf, HEADER_BYTES + offset * width as u64)?;
            let dst = &mut out[filled..filled + n];
            match self.dtype {
                TokenDtype::U16 => {
                    for (d, c) in dst.iter_mut().zip(buf.chunks_exact(2)) {
                        *d = i64::from(u16::from_le_bytes([c[0], c[1]]));
                    }
                }
                TokenDtype::U32 => {
                    for (d, c) in dst.iter_mut().zip(buf.chunks_exact(4)) {
                        *d = i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                    }
                }
            }
            filled += n;
            pos += n as u64;
            i += 1;
        }
        Ok(())
    }
}

/// The dataset's own location: the parent of its index (no trailing separator).
fn dataset_location(source: &dyn ShardSource) -> PathBuf {
    let index = source.location(INDEX_FILE);
    index.parent().map(Path::to_path_buf).unwrap_or(index)
}
