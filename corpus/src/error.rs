//! `DataError`: every way preparing, opening or loading token data can fail.
//!
//! Each variant carries the file, key or split it is about, and displays as one line, so the
//! binary can print it as is and exit with status 2 for bad input ([`DataError::is_bad_input`]).
//! Not here: retries or recovery; callers decide.

use std::path::PathBuf;

/// Errors of the data module (tokenizer, `prepare`, dataset, loader, downloads).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An input path given by the user does not exist.
    #[error("input not found: {path}")]
    MissingInput { path: PathBuf },

    /// A file or directory that should hold stories holds none (empty file, only separators,
    /// a Parquet text column of nulls and blanks, or a directory without data files).
    #[error("no stories in {path}")]
    NoStories { path: PathBuf },

    /// A text input is not valid UTF-8 (the offset counts decompressed bytes for `.gz`/`.zst`).
    #[error("{path}: not valid UTF-8 at byte offset {offset}")]
    NonUtf8 { path: PathBuf, offset: u64 },

    /// A `.json`/`.jsonl` input could not be parsed or lacks the story field.
    #[error("{path}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    BadJson {
        path: PathBuf,
        line: Option<u64>,
        message: String,
    },

    /// A story (a `.txt` story, a `.jsonl` line, a `.json` list element, a Parquet value) is
    /// longer than `--max-story-bytes`: reading stops there instead of holding it all in memory.
    #[error("{path}: {at} is longer than {limit} bytes (raise --max-story-bytes to read it)")]
    StoryTooLong {
        path: PathBuf,
        /// Where it starts.
        at: StoryAt,
        /// The `--max-story-bytes` in force.
        limit: u64,
    },

    /// A file named explicitly as input has an extension `prepare` does not read.
    #[error("{path}: unsupported input (expected .txt, .json or .jsonl, each optionally .gz or .zst, .parquet, .tar.gz or a directory)")]
    UnsupportedInput { path: PathBuf },

    /// An I/O error on a named file. The OS error is part of the message and deliberately not
    /// a `source`: the binary prints the chain, which would repeat it.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    /// A `.tar.gz` input ends early or does not decompress/unpack (the OS reported no error:
    /// the bytes themselves are wrong).
    #[error("{path}: truncated or corrupt archive: {message}")]
    BadArchive { path: PathBuf, message: String },

    /// A `.gz`/`.zst` data file ends early or does not decompress (the OS reported no error).
    #[error("{path}: truncated or corrupt {codec} stream: {message}")]
    BadCompressed {
        path: PathBuf,
        /// `gzip` or `zstd`.
        codec: &'static str,
        message: String,
    },

    /// A `.parquet` input that cannot be used: not Parquet, truncated or corrupt (magic,
    /// footer, pages), no such text column, a column that does not hold strings, a value that
    /// is not UTF-8, or a codec this build does not read. `message` says which.
    #[error("{path}: {message}")]
    BadParquet { path: PathBuf, message: String },

    /// A symlink inside an input directory leads back to a directory being walked (or to
    /// itself through other symlinks), so the walk would never end.
    #[error("{link}: symlink loop (it leads back to {target})")]
    SymlinkLoop { link: PathBuf, target: PathBuf },

    /// The output location cannot hold a dataset (a file, under a file, not writable).
    #[error("output {path}: {message}")]
    BadOutput { path: PathBuf, message: String },

    /// `tokenizer.json` (or `tokenizer_config.json`) could not be loaded or used.
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    /// The tokenizer has none of the tokens the separator rule looks for.
    #[error("tokenizer {path}: no story separator (no BOS with add_bos_token, no <|endoftext|>, no bos_token/eos_token)")]
    NoSeparator { path: PathBuf },

    /// The tokenizer (or a prepared dataset) has more token ids than the model's embedding rows.
    #[error("{source_name}: vocabulary of {vocab_size} tokens exceeds the model's padded_vocab_size {padded_vocab_size}")]
    VocabTooLarge {
        source_name: String,
        vocab_size: u64,
        padded_vocab_size: u64,
    },

    /// A shard's header is not what the index says (magic, version, dtype, token count).
    #[error("{path}: bad shard header: {reason}")]
    BadShardHeader { path: PathBuf, reason: String },

    /// A shard file is shorter or longer than its header and the index say.
    #[error("{path}: truncated or oversized shard: expected {expected_bytes} bytes, found {actual_bytes}")]
    ShardSize {
        path: PathBuf,
        expected_bytes: u64,
        actual_bytes: u64,
    },

    /// A shard's sha256 differs from the one recorded in the index.
    #[error("{path}: sha256 mismatch: index says {expected}, file has {actual}")]
    ShardChecksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    /// The index file is missing, unparsable, of another format version, or inconsistent.
    #[error("{path}: bad dataset index: {message}")]
    BadIndex { path: PathBuf, message: String },

    /// A split has fewer tokens than one window of `block_size + 1` (or one eval batch).
    #[error("{split} split of {path} has {tokens} tokens, fewer than {needed_tokens} ({what})")]
    TooSmall {
        path: PathBuf,
        split: String,
        tokens: u64,
        needed_tokens: u64,
        what: String,
    },

    /// A split the caller needs is empty (e.g. no validation data was prepared).
    #[error("dataset {path} has no {split} split")]
    EmptySplit { path: PathBuf, split: String },

    /// `--out` is inside (or equal to) an input directory: inputs may be read-only and are never written.
    #[error("output {out} is inside input {input}; choose an output directory outside the inputs")]
    OutputInsideInput { out: PathBuf, input: PathBuf },

    /// The output already holds a prepared dataset and overwriting was not asked for.
    #[error("{path} already exists (pass --overwrite to replace it)")]
    OutputExists { path: PathBuf },

    /// `mla prepare --merge`: a worker's partial index is missing (that worker has not
    /// finished) or disagrees with worker 0's, or the directory is not one. `message` says which.
    #[error("{path}: {message}")]
    Merge { path: PathBuf, message: String },

    /// An option has an invalid value (zero batch size, rank >= world size, ...).
    #[error("invalid {key}: {message}")]
    InvalidOption { key: String, message: String },

    /// A loader position saved under other settings cannot be restored.
    #[error("loader position does not match this loader: {field} is {found} in the checkpoint, {expected} here")]
    PositionMismatch {
        field: String,
        expected: String,
        found: String,
    },

    /// A download failed (network unreachable, HTTP error, interrupted body).
    #[error("download {url}: {message}")]
    Download {
        url: String,
        /// HTTP status when the server answered.
        status: Option<u16>,
        message: String,
    },

    /// SIGTERM/SIGINT arrived while inputs were being tokenized: preparation stopped, its
    /// shards were removed and no index was written, so nothing looks prepared.
    #[error("stopped by a signal during data preparation; nothing was prepared")]
    Interrupted,
}

/// Where a story starts in its file, for [`DataError::StoryTooLong`]: a byte offset where one
/// is known (of the decompressed stream for `.gz`/`.zst`), else the element or row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoryAt {
    /// A `.txt` story starting at this byte offset.
    Offset(u64),
    /// A `.jsonl` line (1-based) starting at this byte offset.
    Line { line: u64, offset: u64 },
    /// A `.json` list element (0-based; serde reports no byte offsets).
    Element(u64),
    /// A Parquet value: the column and the row (0-based, in file order).
    Row { column: String, row: u64 },
}

impl std::fmt::Display for StoryAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoryAt::Offset(offset) => write!(f, "the story at byte offset {offset}"),
            StoryAt::Line { line, offset } => write!(f, "line {line} (at byte offset {offset})"),
            StoryAt::Element(i) => write!(f, "list element {i}"),
            StoryAt::Row { column, row } => write!(f, "row {row} of column `{column}`"),
        }
    }
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            error,
        }
    }

    /// True when the error is caused by what the user supplied (files, tokenizer, options)
    /// rather than by the environment: the binary exits with status 2 for these.
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            DataError::Io { .. } | DataError::Download { .. } | DataError::Interrupted
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_displays_on_one_line() {
        let errors = [
            DataError::MissingInput {
                path: "a/b.txt".into(),
            },
            DataError::NonUtf8 {
                path: "x.txt".into(),
                offset: 17,
            },
            DataError::BadJson {
                path: "x.jsonl".into(),
                line: Some(3),
                message: "missing field `story`".into(),
            },
            DataError::BadCompressed {
                path: "x.jsonl.zst".into(),
                codec: "zstd",
                message: "incomplete frame".into(),
            },
            DataError::BadParquet {
                path: "x.parquet".into(),
                message: "no column `text`; its columns: id, story".into(),
            },
            DataError::StoryTooLong {
                path: "x.jsonl".into(),
                at: StoryAt::Line {
                    line: 2,
                    offset: 80,
                },
                limit: 64 << 20,
            },
            DataError::io(
                "f",
                std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
            ),
            DataError::VocabTooLarge {
                source_name: "tok".into(),
                vocab_size: 50277,
                padded_vocab_size: 50000,
            },
        ];
        for e in errors {
            let s = e.to_string();
            assert!(!s.contains('\n'), "{s}");
        }
    }

    #[test]
    fn io_error_is_printed_once_through_the_error_chain() {
        // main prints `{:#}`: the message and every source, so a source would repeat the OS error.
        let e = anyhow::Error::from(DataError::io(
            "out/index.json",
            std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        ));
        assert_eq!(format!("{e:#}"), "out/index.json: gone");
    }

    #[test]
    fn interrupted_is_not_bad_input() {
        let e = DataError::Interrupted;
        assert!(!e.is_bad_input());
        assert_eq!(
            e.to_string(),
            "stopped by a signal during data preparation; nothing was prepared"
        );
    }

    #[test]
    fn bad_json_names_line_when_known() {
        let e = DataError::BadJson {
            path: "x.jsonl".into(),
            line: Some(3),
            message: "m".into(),
        };
        assert_eq!(e.to_string(), "x.jsonl:3: m");
    }
}
