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

    /// Parse and check `format`/`format_version` and internal consistency; `path` names it in errors.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self, DataError> {
        let bad = |message: String| DataError::BadIndex {
            path: path.to_path_buf(),
            message,
        };
        let index: DatasetIndex = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
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
            let sum: u64 = s.shards.iter().map(|e| e.tokens).sum();
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
                if e.bytes != HEADER_BYTES + e.tokens * index.dtype.bytes() {
                    return Err(bad(format!(
                        "shard {}: {} bytes listed, header + tokens make {}",
                        e.file,
                        e.bytes,
                        HEADER_BYTES + e.tokens * index.dtype.bytes()
                    )));
                }
            }
        }
        Ok(index)
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
    fn dtype_is_u16_exactly_when_ids_fit() {
        assert_eq!(TokenDtype::for_vocab(50277), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65536), TokenDtype::U16);
        assert_eq!(TokenDtype::for_vocab(65537), TokenDtype::U32);
    }
}
