//! Stories on their way from a reader (input.rs, parquet.rs, sample.rs) to the tokenizing
//! side: [`Event`]s of sources and batches of stories of about [`BATCH_BYTES`], cut by a
//! [`Batcher`], with the input bytes read so far ([`Counting`]) for progress.
//!
//! Not here: finding or parsing the inputs (input.rs), tokenizing (prepare.rs).

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::error::DataError;
use super::format::Split;

/// Stories are handed to the tokenizer in batches of about this many bytes of text.
pub(crate) const BATCH_BYTES: usize = 1 << 21;

/// Counts bytes read from the underlying file (compressed bytes for archives and compressed
/// files), for progress.
pub(super) struct Counting<R> {
    pub(super) inner: R,
    pub(super) count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// What the reader hands to the tokenizing side.
#[derive(Debug)]
pub(crate) enum Event {
    /// A data file starts; its stories follow.
    Source { split: Split, name: String },
    /// Stories of the current source; `bytes_read`: input bytes read from disk when the batch
    /// was cut (so progress follows tokenization, not read-ahead).
    Stories {
        split: Split,
        stories: Vec<String>,
        bytes_read: u64,
    },
}

/// Batches stories and emits them; remembers whether the consumer still listens.
pub(super) struct Batcher<'a> {
    split: Split,
    bytes_read: &'a AtomicU64,
    stories: Vec<String>,
    bytes: usize,
    total: u64,
    emit: &'a mut dyn FnMut(Event) -> bool,
    open: bool,
}

impl<'a> Batcher<'a> {
    pub(super) fn new(
        split: Split,
        bytes_read: &'a AtomicU64,
        emit: &'a mut dyn FnMut(Event) -> bool,
    ) -> Self {
        Self {
            split,
            bytes_read,
            stories: Vec::new(),
            bytes: 0,
            total: 0,
            emit,
            open: true,
        }
    }

    /// Whether the consumer still listens (false: stop reading).
    pub(super) fn is_open(&self) -> bool {
        self.open
    }

    /// Add one story, trimmed; an empty one is skipped.
    pub(super) fn push(&mut self, story: &str) {
        let s = story.trim();
        if s.is_empty() {
            return;
        }
        self.bytes += s.len();
        self.total += 1;
        self.stories.push(s.to_owned());
        if self.bytes >= BATCH_BYTES {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.stories.is_empty() || !self.open {
            return;
        }
        let stories = std::mem::take(&mut self.stories);
        self.bytes = 0;
        self.open = (self.emit)(Event::Stories {
            split: self.split,
            stories,
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
        });
    }

    /// Emit the last batch of the source `path`; an error when it held no story. Returns
    /// whether the consumer still listens.
    pub(super) fn finish(mut self, path: &Path) -> Result<bool, DataError> {
        self.flush();
        if self.total == 0 {
            return Err(DataError::NoStories {
                path: path.to_path_buf(),
            });
        }
        Ok(self.open)
    }
}
