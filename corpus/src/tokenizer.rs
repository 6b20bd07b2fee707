//! `Tokenizer`: a Hugging Face `tokenizer.json` (loaded with the `tokenizers` crate) plus the
//! facts the data pipeline needs: vocabulary size, the story separator id, and the file's sha256.
//!
//! Not here: training tokenizers, chat templates, truncation or padding (both are switched off:
//! stories are never cut by a `truncation` section left in a `tokenizer.json`).
//!
//! Separator rule (litgpt pretraining encodes each story with `bos=True`), first match wins:
//! 1. `tokenizer_config.json` sets `add_bos_token: true` and its `bos_token` is in the vocabulary
//!    → that BOS (Llama-style tokenizers);
//! 2. `<|endoftext|>` is in the vocabulary → that token (GPT-NeoX/Pythia: 0, GPT-2: 50256);
//! 3. `tokenizer_config.json`'s `bos_token`, then its `eos_token`, if in the vocabulary;
//! 4. otherwise [`DataError::NoSeparator`].
//!
//! For Pythia the HF config declares `bos_token = <|endoftext|>` without `add_bos_token`, so rule 2
//! gives id 0, the same id litgpt's `Tokenizer.encode(bos=True)` prepends.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::DataError;

/// The end-of-text token of GPT-2 style byte-level BPE vocabularies.
pub const ENDOFTEXT: &str = "<|endoftext|>";

/// A loaded tokenizer. Cheap to share by reference across threads (`Sync`).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    vocab_size: u64,
    separator_id: u32,
    separator_token: String,
    sha256: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size)
            .field("separator_id", &self.separator_id)
            .field("separator_token", &self.separator_token)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Load `tokenizer.json` (and `tokenizer_config.json` when present) from `dir`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, DataError> {
        let dir = dir.as_ref();
        let problem = match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => None,
            Ok(_) => Some("not a directory (expected a directory with tokenizer.json)"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("directory not found"),
            Err(e) => return Err(DataError::io(dir, e)),
        };
        if let Some(message) = problem {
            return Err(DataError::Tokenizer {
                path: dir.to_path_buf(),
                message: message.into(),
            });
        }
        let config = dir.join("tokenizer_config.json");
        Self::from_files(
            dir.join("tokenizer.json"),
            config.exists().then_some(config.as_path()),
        )
    }

    /// Load a `tokenizer.json` file, with an optional `tokenizer_config.json`.
    pub fn from_files(
        tokenizer_json: impl AsRef<Path>,
        tokenizer_config: Option<&Path>,
    ) -> Result<Self, DataError> {
        let path = tokenizer_json.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DataError::Tokenizer {
                    path: path.clone(),
                    message: "not found".into(),
                }
            } else {
                DataError::io(&path, e)
            }
        })?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let mut inner = parse_tokenizer_json(&bytes).map_err(|message| DataError::Tokenizer {
            path: path.clone(),
            message,
        })?;
        inner
            .with_truncation(None)
            .map_err(|e| DataError::Tokenizer {
                path: path.clone(),
                message: one_line(&e.to_string()),
            })?;
        inner.with_padding(None);

        let config = match tokenizer_config {
            Some(p) => Some(read_config(p)?),
            None => None,
        };
        // Ids index the embedding: the size that matters is the largest id + 1, counting added tokens.
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .map(|&id| u64::from(id) + 1)
            .max()
            .unwrap_or(0);
        let (separator_id, separator_token) = pick_separator(&inner, config.as_ref())
            .ok_or_else(|| DataError::NoSeparator { path: path.clone() })?;
        Ok(Self {
            inner,
            path,
            vocab_size,
            separator_id,
            separator_token,
            sha256,
        })
    }

    /// Number of token ids (largest id + 1, added tokens included). GPT-NeoX: 50277, GPT-2: 50257.
    pub fn vocab_size(&self) -> u64 {
        self.vocab_size
    }

    /// The id written before every story (see the module docs for the rule).
    pub fn separator_id(&self) -> u32 {
        self.separator_id
    }

    /// The separator as text, e.g. `<|endoftext|>`.
    pub fn separator_token(&self) -> &str {
        &self.separator_token
    }

    /// Hex sha256 of the `tokenizer.json` bytes; recorded in the dataset index.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Path of the `tokenizer.json` this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id of a token, if it is in the vocabulary (added tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encode text without adding special tokens (no BOS/EOS from a post-processor).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        self.inner
            .encode_fast(text, false)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|e| DataError::Tokenizer {
                path: self.path.clone(),
                message: one_line(&e.to_string()),
            })
    }

    /// Decode ids to text. Special tokens are kept (a generated `<|endoftext|>` stays visible).
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| DataError::Tokenizer {
                path: self.path.clone(),
                message: one_line(&e.to_string()),
            })
    }
}

/// Parse `tokenizer.json` bytes, saying which of three things is wrong: not JSON at all, JSON
/// but not a tokenizer (the `tokenizers` crate would report a serde error about the first
/// missing field at some column, which reads like a syntax error), or a tokenizer this crate
/// cannot build.
fn parse_tokenizer_json(bytes: &[u8]) -> Result<tokenizers::Tokenizer, String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(fields) = value.as_object() else {
        return Err("valid JSON but not a Hugging Face tokenizer.json (not an object)".into());
    };
    if !fields.contains_key("model") {
        return Err("valid JSON but not a Hugging Face tokenizer.json (no `model` section)".into());
    }
    tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| {
        format!(
            "not a usable Hugging Face tokenizer.json: {}",
            one_line(&e.to_string())
        )
    })
}

/// The fields of `tokenizer_config.json` the separator rule reads.
#[derive(Debug, Default)]
struct TokenizerConfig {
    add_bos_token: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

fn read_config(path: &Path) -> Result<TokenizerConfig, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| DataError::Tokenizer {
            path: path.to_path_buf(),
            message: one_line(&e.to_string()),
        })?;
    // Special tokens appear either as a string or as a serialized AddedToken `{"content": ...}`.
    let token = |key: &str| -> Option<String> {
        match value.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
            _ => None,
        }
    };
    Ok(TokenizerConfig {
        add_bos_token: value
            .get("add_bos_token")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
        bos_token: token("bos_token"),
        eos_token: token("eos_token"),
    })
}

fn pick_separator(
    tok: &tokenizers::Tokenizer,
    config: Option<&TokenizerConfig>,
) -> Option<(u32, String)> {
    let lookup = |t: &str| tok.token_to_id(t).map(|id| (id, t.to_owned()));
    if let Some(c) = config {
        if c.add_bos_token {
            if let Some(found) = c.bos_token.as_deref().and_then(lookup) {
                return Some(found);
            }
        }
    }
    if let Some(found) = lookup(ENDOFTEXT) {
        return Some(found);
    }
    let c = config?;
    c.bos_token
        .as_deref()
        .and_then(lookup)
        .or_else(|| c.eos_token.as_deref().and_then(lookup))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
