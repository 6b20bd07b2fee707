//! The on-disk format of a prepared dataset: shard header, token dtype and the JSON index.
//! The normative description is `FORMAT.md` beside this file; this is its code.
//!
//! Not here: reading or writing files (see `store`, `writer`, `dataset`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::DataError;

/// First 8 bytes of every shard.
pub const SHARD_MAGIC: [u8; 8] = *b"MLATOKS\0";
/// Version of the shard header and of the index; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the shard header; tokens start at this offset.
pub const HEADER_BYTES: u64 = 32;
/// Name of the index object in a prepared dataset.
pub const INDEX_FILE: &str = "index.json";
/// Value of the index's `format` field.
pub const FORMAT_NAME: &str = "mla-tokens";

/// A split of a prepared dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    /// Key in the index and shard-name prefix: `train` or `val`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Width of one stored token (little-endian unsigned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// u16 when every id (< `vocab_size`) fits, else u32.
    pub fn for_vocab(vocab_size: u64) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    /// Bytes per token; also the dtype code stored in the shard header.
    pub fn bytes(self) -> u64 {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            2 => Some(TokenDtype::U16),
            4 => Some(TokenDtype::U32),
            _ => None,
        }
    }
}

/// Size of a shard file of `tokens` tokens: header + tokens × width; None when that does not
/// fit in a u64 (only an untrusted count can be that large).
pub(crate) fn shard_bytes(tokens: u64, dtype: TokenDtype) -> Option<u64> {
    tokens.checked_mul(dtype.bytes())?.checked_add(HEADER_BYTES)
}

/// The fixed 32-byte header at the start of every shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    pub version: u32,
    pub dtype: TokenDtype,
    pub tokens: u64,
    pub vocab_size: u32,
}

impl ShardHeader {
    /// Serialize: magic, version u32, dtype code u32, tokens u64, vocab_size u32, reserved u32 (LE).
    pub fn encode(&self) -> [u8; HEADER_BYTES as usize] {
        let mut h = [0u8; HEADER_BYTES as usize];
        h[0..8].copy_from_slice(&SHARD_MAGIC);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        h[12..16].copy_from_slice(&(self.dtype.bytes() as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.tokens.to_le_bytes());
        h[24..28].copy_from_slice(&self.vocab_size.to_le_bytes());
        h
    }

    /// Parse and check magic and version; `path` names the shard in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self, DataError> {
        let bad = |reason: String| DataError::BadShardHeader {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < HEADER_BYTES as usize {
            return Err(bad(format!(
                "{} bytes, shorter than the {HEADER_BYTES}-byte header",
                bytes.len()
            )));
        }
        if bytes[0..8] != SHARD_MAGIC {
            return Err(bad(format!(
                "magic {:?}, expected {:?}",
                String::from_utf8_lossy(&bytes[0..8]),
                String::from_utf8_lossy(&SHARD_MAGIC)
            )));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version}, this build reads version {FORMAT_VERSION}"
            )));
        }
        let code = u32_at(12);
        let dtype = TokenDtype::from_code(code)
            .ok_or_else(|| bad(format!("dtype code {code}, expected 2 (u16) or 4 (u32)")))?;
        let mut t = [0u8; 8];
        t.copy_from_slice(&bytes[16..24]);
        Ok(Self {
            version,
            dtype,
            tokens: u64::from_le_bytes(t),
            vocab_size: u32_at(24),
        })
    }
}

/// The tokenizer a dataset was prepared with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerInfo {
    /// Hex sha256 of the `tokenizer.json` bytes.
    pub sha256: String,
    /// Largest token id + 1.
    pub vocab_size: u64,
    /// Id written before every story.
    pub separator_id: u32,
    /// The separator as text.
    pub separator_token: String,
}

/// One shard as listed in the index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// Object name relative to the dataset root, e.g. `train-00000.bin`.
    pub file: String,
    /// Tokens in the shard (header excluded).
    pub tokens: u64,
    /// Whole file size: header + tokens × dtype width.
    pub bytes: u64,
    /// Hex sha256 of the whole file, header included.
    pub sha256: String,
}

/// One split as listed in the index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitIndex {
    /// Total tokens, separators included (the sum over shards).
    pub tokens: u64,
    /// Stories (= separators) in the split.
    pub stories: u64,
    /// Shards in stream order.
    pub shards: Vec<ShardEntry>,
    /// Inputs that went into the split, in stream order (informative).
    pub sources: Vec<String>,
}

/// `index.json`: written last, so a dataset without it does not exist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetIndex {
    /// Always `mla-tokens`.
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Token width in every shard.
    pub dtype: TokenDtype,
    pub tokenizer: TokenizerInfo,
    /// `train` and `val` (either may have no shards).
    pub splits: BTreeMap<String, SplitIndex>,
}

impl DatasetIndex {
    /// The entry of a split; an empty one when the split is absent.
    pub fn split(&self, split: Split) -> SplitIndex {
        self.splits.get(split.as_str()).cloned().unwrap_or_default()
    }

    /// Vocabulary size of the tokenizer the dataset was prepared with.
    pub fn vocab_size(&self) -> u64 {
        self.tokenizer.vocab_size
    }

    /// `train N tokens (S stories, K shards), val …, U16`: the summary lines' account of it.
    pub fn summary(&self) -> String {
        let part = |split| {
            let s = self.split(split);
            format!(
                "{split} {} tokens ({} stories, {} shards)",
                s.tokens,
                s.stories,
                s.shards.len()
            )
        };
        format!(
            "{}, {}, {:?}",
            part(Split::Train),
            part(Split::Val),
            self.dtype
        )
    }

    /// Parse and check `format`/`format_version` and internal consistency; `path` names it in errors.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self, DataError> {
        let index: DatasetIndex =
            serde_json::from_slice(bytes).map_err(|e| DataError::BadIndex {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        index.check(path)?;
        Ok(index)
    }

    /// The checks of [`DatasetIndex::from_json`] after parsing.
    fn check(&self, path: &Path) -> Result<(), DataError> {
        let index = self;
        let bad = |message: String| DataError::BadIndex {
            path: path.to_path_buf(),
            message,
        };
        if index.format != FORMAT_NAME {
            return Err(bad(format!(
                "format {:?}, expected {FORMAT_NAME:?}",
                index.format
            )));
        }
        if index.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format_version {}, this build reads version {FORMAT_VERSION}",
                index.format_version
            )));
        }
        if index.tokenizer.vocab_size > 1 << 16 && index.dtype == TokenDtype::U16 {
            return Err(bad(format!(
                "dtype u16 cannot hold a vocabulary of {}",
                index.tokenizer.vocab_size
            )));
        }
        for (name, s) in &index.splits {
            if name != "train" && name != "val" {
                return Err(bad(format!("unknown split {name:?}")));
            }
            // Untrusted counts: a sum or size that wraps around would make a tiny shard look
            // like one of 2^63 tokens (release builds do not check overflow).
            let sum = s
                .shards
                .iter()
                .try_fold(0u64, |sum, e| sum.checked_add(e.tokens))
                .ok_or_else(|| {
                    bad(format!(
                        "split {name}: its shards' token counts add up to more than {}",
                        u64::MAX
                    ))
                })?;
            if sum != s.tokens {
                return Err(bad(format!(
                    "split {name}: shards hold {sum} tokens, split says {}",
                    s.tokens
                )));
            }
            for e in &s.shards {
                if e.file.contains('/') || e.file.contains('\\') || e.file.starts_with('.') {
                    return Err(bad(format!(
                        "shard name {:?} is not a plain file name",
                        e.file
                    )));
                }
                let expected = shard_bytes(e.tokens, index.dtype).ok_or_else(|| {
                    bad(format!(
                        "shard {}: {} tokens of {} bytes do not fit in a file (more than {} bytes)",
                        e.file,
                        e.tokens,
                        index.dtype.bytes(),
                        u64::MAX
                    ))
                })?;
                if e.bytes != expected {
                    return Err(bad(format!(
                        "shard {}: {} bytes listed, header + tokens make {expected}",
                        e.file, e.bytes,
                    )));
                }
            }
        }
        Ok(())
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain structs of strings and integers cannot fail.
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

/// One of `count` independent workers of a distributed preparation (`mla prepare --worker
/// INDEX/COUNT`): it writes the shards of its share of the inputs under names no other worker
/// uses, and a partial index instead of `index.json` (see `FORMAT.md`, "Distributed preparation").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Worker {
    /// 0-based, below `count`.
    pub index: u32,
    /// Number of workers, at least 1.
    pub count: u32,
}

impl Worker {
    /// Its partial index: `index-worker-0003.json`.
    pub fn partial_index_file(self) -> String {
        partial_index_file(self.index)
    }

    /// Its shard `n` of `split`: `train-w0003-00000.bin`.
    pub fn shard_file(self, split: Split, n: usize) -> String {
        format!("{split}-w{:04}-{n:05}.bin", self.index)
    }
}

impl std::fmt::Display for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Name of worker `worker`'s partial index: `index-worker-0003.json` (at least 4 digits).
pub fn partial_index_file(worker: u32) -> String {
    format!("index-worker-{worker:04}.json")
}

/// A partial index (`index-worker-NNNN.json`): one worker's [`DatasetIndex`] with its place
/// among the workers. `mla prepare --merge` joins all of them into `index.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialIndex {
    /// This worker's number, below `workers`.
    pub worker: u32,
    /// How many workers share the dataset.
    pub workers: u32,
    /// What this worker wrote, as `index.json` would list it.
    pub index: DatasetIndex,
}

impl PartialIndex {
    /// Parse and check it (the inner index as [`DatasetIndex::from_json`] does); `path` names
    /// it in errors.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self, DataError> {
        let bad = |message: String| DataError::BadIndex {
            path: path.to_path_buf(),
            message,
        };
        let p: PartialIndex = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if p.worker >= p.workers {
            return Err(bad(format!(
                "worker {} of {} workers (workers count from 0)",
                p.worker, p.workers
            )));
        }
        p.index.check(path)?;
        Ok(p)
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain structs of strings and integers cannot fail.
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = ShardHeader {
            version: FORMAT_VERSION,
            dtype: TokenDtype::U16,
            tokens: 123_456_789,
            vocab_size: 50277,
        };
        let bytes = h.encode();
        assert_eq!(&bytes[0..8], b"MLATOKS\0");
        assert_eq!(ShardHeader::decode(&bytes, Path::new("s")).ok(), Some(h));
    }

    #[test]
    fn header_rejects_wrong_magic_version_and_dtype() {
        let good = ShardHeader {
            version: FORMAT_VERSION,
            dtype: TokenDtype::U32,
            tokens: 1,
            vocab_size: 7,
        }
        .encode();
        let mut m = good;
        m[0] = b'X';
        let e = ShardHeader::decode(&m, Path::new("a.bin"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.bin") && e.contains("magic"), "{e}");
        let mut v = good;
        v[8] = 9;
        let e = ShardHeader::decode(&v, Path::new("a.bin"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 9"), "{e}");
        let mut d = good;
        d[12] = 3;
        let e = ShardHeader::decode(&d, Path::new("a.bin"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dtype code 3"), "{e}");
        let e = ShardHeader::decode(&good[..10], Path::new("a.bin"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("shorter"), "{e}");
    }

    #[test]
    fn partial_index_round_trips_with_worker_shard_names() {
        let w = Worker { index: 3, count: 8 };
        let shard = ShardEntry {
            file: w.shard_file(Split::Val, 12),
            tokens: 5,
            bytes: HEADER_BYTES + 10,
            sha256: "00".into(),
        };
        assert_eq!(shard.file, "val-w0003-00012.bin");
        assert_eq!(w.partial_index_file(), "index-worker-0003.json");
        let index = DatasetIndex {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            dtype: TokenDtype::U16,
            tokenizer: TokenizerInfo {
                sha256: "ab".into(),
                vocab_size: 100,
                separator_id: 0,
                separator_token: "<|endoftext|>".into(),
            },
            splits: [(
                "val".to_owned(),
                SplitIndex {
                    tokens: 5,
                    stories: 1,
                    shards: vec![shard],
                    sources: vec![],
                },
            )]
            .into(),
        };
        let path = Path::new("index-worker-0003.json");
        DatasetIndex::from_json(&index.to_json(), path).unwrap();
        let mut p = PartialIndex {
            worker: 3,
            workers: 8,
            index,
        };
        assert_eq!(PartialIndex::from_json(&p.to_json(), path).unwrap(), p);
        p.worker = 8;
        let e = PartialIndex::from_json(&p.to_json(), path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("worker 8 of 8 workers"), "{e}");
    }

    fn u16_index(shards: Vec<(u64, u64)>, split_tokens: u64) -> DatasetIndex {
        let shards = shards
            .into_iter()
            .enumerate()
            .map(|(i, (tokens, bytes))| ShardEntry {
                file: format!("train-{i:05}.bin"),
                tokens,
                bytes,
                sha256: "00".into(),
            })
            .collect();
        DatasetIndex {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            dtype: TokenDtype::U16,
            tokenizer: TokenizerInfo {
                sha256: "ab".into(),
                vocab_size: 100,
                separator_id: 0,
                separator_token: "<|endoftext|>".into(),
            },
            splits: [(
                "train".to_owned(),
                SplitIndex {
                    tokens: split_tokens,
                    stories: 1,
                    shards,
                    sources: vec![],
                },
            )]
            .into(),
        }
    }

    #[test]
    fn index_sizes_that_wrap_around_u64_are_refused() {
        let path = Path::new("d/index.json");
        // 2^63 + 2 u16 tokens are 2^64 + 4 bytes: wrapped, header + tokens "make" 36 bytes.
        let huge = (1u64 << 63) + 2;
        assert_eq!(HEADER_BYTES.wrapping_add(huge.wrapping_mul(2)), 36);
        let index = u16_index(vec![(huge, 36)], huge);
        let e = DatasetIndex::from_json(&index.to_json(), path).unwrap_err();
        assert!(matches!(e, DataError::BadIndex { .. }) && e.is_bad_input());
        assert_eq!(
            e.to_string(),
            "d/index.json: bad dataset index: shard train-00000.bin: 9223372036854775810 tokens \
             of 2 bytes do not fit in a file (more than 18446744073709551615 bytes)"
        );
        // Five shards of 2^62 tokens (2^63 + 32 bytes each, a size that fits) hold 5 * 2^62
        // tokens, which wraps around to 2^62.
        let quarter = 1u64 << 62;
        let index = u16_index(
            vec![(quarter, HEADER_BYTES + 2 * quarter); 5],
            quarter.wrapping_mul(5),
        );
        assert_eq!(quarter.wrapping_mul(5), quarter);
        let e = DatasetIndex::from_json(&index.to_json(), path).unwrap_err();
        assert_eq!(
            e.to_string(),
            "d/index.json: bad dataset index: split train: its shards' token counts add up to \
             more than 18446744073709551615"
        );
        // The largest shard that fits is still accepted.
        let most = (u64::MAX - HEADER_BYTES) / 2;
        DatasetIndex::from_json(&u16_index(vec![(most, u64::MAX - 1)], most).to_json(), path)
            .unwrap();
    }

    #[test]
    fn dtype_is_u16_exactly_when_ids_fit() {
        assert_eq!(TokenDtype::for_vocab(50277), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65536), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65537), TokenDtype::U32);
    }
}
