//! Raw inputs of `prepare`: finds the data files in the given paths, assigns each to the train
//! or val split, and streams their stories in batches.
//!
//! Inputs: `.txt` (stories separated by lines that are exactly `<|endoftext|>`), `.json` (a list
//! of objects with a `story` or `text` field, as `TinyStories_all_data/*.json`), `.jsonl` (one
//! such object per line), each of these gzip- or zstd-compressed too (`.jsonl.gz`,
//! `.json.zst`, `.txt.gz`, …: decompressed while reading), `.parquet` (one string column of a
//! Hugging Face dataset file, `--text-column`, default `text`; see `parquet.rs`), `.tar.gz`/`.tgz`
//! archives of the text formats (compressed members included; Parquet members are skipped with
//! a warning, as they need random access), and directories of all of these (walked recursively
//! in sorted order; hidden entries and other extensions are skipped). Archives are read in
//! member order, by `archive.rs` (which caps the long names and PAX headers a tar stream
//! declares). Each story is trimmed; empty stories are skipped.
//!
//! Memory does not grow with the input: every format is streamed (a `.json` list element by
//! element, a compressed file through its decoder, Parquet one page of one column at a time)
//! and handed on in batches of about `batch::BATCH_BYTES` of text. One story is held whole, so its
//! length is capped (`--max-story-bytes`, [`DataError::StoryTooLong`]): a line or list element
//! is read only that far, never to its end first.
//!
//! Symlinks inside an input directory: file symlinks are followed; directory symlinks are
//! followed only when they stay inside that input directory (one pointing out of it is skipped
//! with a warning: the input tree is what the user named), and one leading back to a directory
//! being walked is an error ([`DataError::SymlinkLoop`]).
//!
//! Not here: tokenizing or writing (see `prepare`).

use std::cell::Cell;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::archive::{Member, Members};
use super::batch::{Batcher, Counting, Event};
use super::error::{DataError, StoryAt};
use super::format::Split;
use super::tokenizer::ENDOFTEXT;

/// Read buffer of a data file or archive on disk.
const FILE_BUF_BYTES: usize = 1 << 20;

/// Layout of a data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Txt,
    Json,
    Jsonl,
    Parquet,
}

/// Compression of a whole data file, from its last extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Codec {
    Plain,
    Gzip,
    Zstd,
}

impl Codec {
    fn name(self) -> &'static str {
        match self {
            Codec::Plain => "plain",
            Codec::Gzip => "gzip",
            Codec::Zstd => "zstd",
        }
    }
}

fn lower(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// Format and compression of a data file by its name: `.txt`, `.json`, `.jsonl`, each
/// optionally followed by `.gz` or `.zst`, or `.parquet` (compressed inside, by column chunk).
pub(crate) fn format_of(name: &str) -> Option<(Format, Codec)> {
    let n = lower(name);
    let (stem, codec) = if let Some(stem) = n.strip_suffix(".gz") {
        (stem, Codec::Gzip)
    } else if let Some(stem) = n.strip_suffix(".zst") {
        (stem, Codec::Zstd)
    } else {
        (n.as_str(), Codec::Plain)
    };
    let format = if stem.ends_with(".txt") {
        Format::Txt
    } else if stem.ends_with(".jsonl") {
        Format::Jsonl
    } else if stem.ends_with(".json") {
        Format::Json
    } else if stem.ends_with(".parquet") && codec == Codec::Plain {
        Format::Parquet
    } else {
        return None;
    };
    Some((format, codec))
}

pub(crate) fn is_archive(name: &str) -> bool {
    let n = lower(name);
    n.ends_with(".tar.gz") || n.ends_with(".tgz")
}

/// One unit of reading, in stream order.
#[derive(Clone, Debug)]
pub(crate) enum Job {
    /// A data file on disk.
    File {
        path: PathBuf,
        format: Format,
        codec: Codec,
        split: Split,
    },
    /// An archive; its data members go to `split`, except `val_member` which goes to val.
    Archive {
        path: PathBuf,
        split: Split,
        val_member: Option<String>,
    },
}

impl Job {
    fn path(&self) -> &Path {
        match self {
            Job::File { path, .. } | Job::Archive { path, .. } => path,
        }
    }
}

/// What `prepare` reads, in order, and how many bytes that is on disk.
#[derive(Debug)]
pub(crate) struct Plan {
    pub jobs: Vec<Job>,
    pub total_bytes: u64,
    /// Name of the input chosen as validation data when none was given explicitly.
    pub auto_val: Option<String>,
    /// The column Parquet inputs are read from (`--text-column`); None: `text`, else `story`.
    pub text_column: Option<String>,
    /// `--max-story-bytes`: the longest story (line, list element, Parquet value) read.
    pub max_story_bytes: u64,
}

/// Build the plan. Without explicit `val` inputs, one data file among the train inputs becomes
/// the val split, provided there are at least two data files; otherwise there is no val split.
/// It is the first by path (archive members by name) of, in this order of preference: a
/// Hugging Face validation split in Parquet (a `.parquet` file whose name starts with
/// `validation`, or in a directory named `validation`), a JSON list (`.json`, `.json.gz`,
/// `.json.zst`), any data file (litgpt: TinyStories keeps `data00.json` for validation,
/// TextFiles the first file). Choosing it may decompress whole archives, so `stop` is polled
/// between their members.
pub(crate) fn plan(
    train: &[PathBuf],
    val: &[PathBuf],
    text_column: Option<&str>,
    max_story_bytes: u64,
    stop: &dyn Fn() -> bool,
) -> Result<Plan, DataError> {
    let mut jobs = Vec::new();
    for p in train {
        expand(p, Split::Train, &mut jobs)?;
    }
    let mut auto_val = None;
    if val.is_empty() {
        auto_val = choose_auto_val(&mut jobs, stop)?;
    }
    for p in val {
        expand(p, Split::Val, &mut jobs)?;
    }
    Ok(Plan {
        total_bytes: bytes_on_disk(&jobs)?,
        jobs,
        auto_val,
        text_column: text_column.map(str::to_owned),
        max_story_bytes,
    })
}

impl Plan {
    /// Keep only the jobs in `range` (one worker's share of a distributed preparation; the
    /// choice of validation data was made on the whole plan), with `total_bytes` recounted.
    pub(crate) fn keep(&mut self, range: std::ops::Range<usize>) -> Result<(), DataError> {
        self.jobs = self.jobs.drain(range).collect();
        self.total_bytes = bytes_on_disk(&self.jobs)?;
        Ok(())
    }
}

/// Size on disk of the jobs' files and archives.
fn bytes_on_disk(jobs: &[Job]) -> Result<u64, DataError> {
    let mut total = 0;
    for j in jobs {
        total += std::fs::metadata(j.path())
            .map_err(|e| DataError::io(j.path(), e))?
            .len();
    }
    Ok(total)
}

/// The data files and archives `prepare` reads from `paths`, in reading order (the same walk
/// as [`plan`], without opening archives): what a cache of their tokens depends on.
pub fn input_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut jobs = Vec::new();
    for p in paths {
        expand(p, Split::Train, &mut jobs)?;
    }
    Ok(jobs.into_iter().map(|j| j.path().to_path_buf()).collect())
}

/// Add the jobs of one input path given by the user.
fn expand(path: &Path, split: Split, jobs: &mut Vec<Job>) -> Result<(), DataError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::MissingInput {
            path: path.to_path_buf(),
        },
        _ => DataError::io(path, e),
    })?;
    if meta.is_dir() {
        let root = path.canonicalize().map_err(|e| DataError::io(path, e))?;
        let before = jobs.len();
        let mut walk = Walk {
            root: root.clone(),
            split,
            stack: vec![root],
            jobs,
        };
        walk.dir(path)?;
        if jobs.len() == before {
            return Err(DataError::NoStories {
                path: path.to_path_buf(),
            });
        }
    } else if !add_file(path, split, jobs) {
        return Err(DataError::UnsupportedInput {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Add a data file or archive by its extension; false when the extension is not one we read.
fn add_file(path: &Path, split: Split, jobs: &mut Vec<Job>) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if is_archive(&name) {
        jobs.push(Job::Archive {
            path: path.to_path_buf(),
            split,
            val_member: None,
        });
    } else if let Some((format, codec)) = format_of(&name) {
        jobs.push(Job::File {
            path: path.to_path_buf(),
            format,
            codec,
            split,
        });
    } else {
        return false;
    }
    true
}

/// The recursive walk of one input directory.
struct Walk<'a> {
    /// The input directory, canonical: directory symlinks are followed only inside it.
    root: PathBuf,
    split: Split,
    /// Canonical directories from the root down to the one being listed: a symlink to any of
    /// them is a loop.
    stack: Vec<PathBuf>,
    jobs: &'a mut Vec<Job>,
}

impl Walk<'_> {
    fn dir(&mut self, dir: &Path) -> Result<(), DataError> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| DataError::io(dir, e))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(|e| DataError::io(dir, e))?;
        entries.sort();
        for e in entries {
            let hidden = e
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if !hidden {
                self.entry(&e)?;
            }
        }
        Ok(())
    }

    fn entry(&mut self, path: &Path) -> Result<(), DataError> {
        let link = std::fs::symlink_metadata(path)
            .map_err(|e| DataError::io(path, e))?
            .file_type()
            .is_symlink();
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::MissingInput {
                    path: path.to_path_buf(),
                })
            }
            // A cycle of symlinks (a → b → a) never reaches a file or directory.
            #[cfg(unix)]
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(DataError::SymlinkLoop {
                    link: path.to_path_buf(),
                    target: std::fs::read_link(path).unwrap_or_default(),
                })
            }
            Err(e) => return Err(DataError::io(path, e)),
        };
        if !meta.is_dir() {
            add_file(path, self.split, self.jobs);
            return Ok(());
        }
        let real = path.canonicalize().map_err(|e| DataError::io(path, e))?;
        if link {
            if self.stack.contains(&real) {
                return Err(DataError::SymlinkLoop {
                    link: path.to_path_buf(),
                    target: real,
                });
            }
            if !real.starts_with(&self.root) {
                tracing::warn!(
                    "{}: not read: a directory symlink to {}, outside the input {}",
                    path.display(),
                    real.display(),
                    self.root.display()
                );
                return Ok(());
            }
        }
        self.stack.push(real);
        let result = self.dir(path);
        self.stack.pop();
        result
    }
}

/// Preference of a data file as automatic validation data, lower first (see [`plan`]).
fn val_rank(path: &Path, format: Format) -> u8 {
    let named = |p: Option<&std::ffi::OsStr>, validation: fn(&str) -> bool| {
        p.is_some_and(|n| validation(&lower(&n.to_string_lossy())))
    };
    let hf_validation = named(path.file_name(), |n| n.starts_with("validation"))
        || named(path.parent().and_then(Path::file_name), |n| {
            n == "validation"
        });
    match format {
        Format::Parquet if hf_validation => 0,
        Format::Json => 1,
        _ => 2,
    }
}

/// Pick the auto-val data file (see [`plan`]) and re-route it; returns its display name.
fn choose_auto_val(jobs: &mut [Job], stop: &dyn Fn() -> bool) -> Result<Option<String>, DataError> {
    // (preference, sort key, job index, archive member)
    let mut candidates: Vec<(u8, PathBuf, usize, Option<String>)> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        match job {
            Job::File { path, format, .. } => {
                candidates.push((val_rank(path, *format), path.clone(), i, None));
            }
            Job::Archive { path, .. } => {
                for (member, format, _) in list_archive(path, stop)? {
                    let key = path.join(&member);
                    candidates.push((val_rank(&key, format), key, i, Some(member)));
                }
            }
        }
    }
    if candidates.len() < 2 {
        return Ok(None);
    }
    candidates.sort();
    let (_, key, i, member) = candidates.swap_remove(0);
    match (&mut jobs[i], member) {
        (Job::File { split, .. }, None) => *split = Split::Val,
        (Job::Archive { val_member, .. }, Some(m)) => *val_member = Some(m),
        _ => {}
    }
    Ok(Some(key.display().to_string()))
}

fn open_archive(
    path: &Path,
    counter: Option<Arc<AtomicU64>>,
) -> Result<Members<Box<dyn Read + Send>>, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let inner: Box<dyn Read + Send> = match counter {
        Some(c) => Box::new(Counting {
            inner: file,
            count: c,
        }),
        None => Box::new(file),
    };
    let gz = flate2::read::MultiGzDecoder::new(BufReader::with_capacity(FILE_BUF_BYTES, inner));
    Ok(Members::new(Box::new(gz)))
}

/// An error while decompressing or unpacking an archive. One the OS reported is an I/O failure;
/// any other (a gzip stream that ends early, a bad tar header) is the archive's own fault.
fn archive_error(path: &Path, e: std::io::Error) -> DataError {
    if e.raw_os_error().is_some() {
        DataError::io(path, e)
    } else {
        DataError::BadArchive {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// An error while reading a compressed data file: the OS's is an I/O failure, any other (a
/// stream that ends early, a bad header or checksum) is the file's own fault.
fn compressed_error(path: &Path, codec: Codec, e: std::io::Error) -> DataError {
    if e.raw_os_error().is_some() {
        DataError::io(path, e)
    } else {
        DataError::BadCompressed {
            path: path.to_path_buf(),
            codec: codec.name(),
            message: e.to_string(),
        }
    }
}

/// `reader` decompressed as `codec` says, streaming (gzip: any number of concatenated members;
/// zstd: any number of frames), buffered for line reading.
fn decoded<'a>(reader: impl BufRead + 'a, codec: Codec) -> std::io::Result<Box<dyn BufRead + 'a>> {
    Ok(match codec {
        Codec::Plain => Box::new(reader),
        Codec::Gzip => Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::bufread::MultiGzDecoder::new(reader),
        )),
        Codec::Zstd => Box::new(BufReader::with_capacity(
            1 << 20,
            zstd::stream::read::Decoder::with_buffer(reader)?,
        )),
    })
}

/// Text data members of an archive in member order (one decompression pass over headers and
/// bodies); Parquet members are left out.
fn list_archive(
    path: &Path,
    stop: &dyn Fn() -> bool,
) -> Result<Vec<(String, Format, Codec)>, DataError> {
    let mut archive = open_archive(path, None)?;
    let mut out = Vec::new();
    while let Some(member) = archive.next_member().map_err(|e| archive_error(path, e))? {
        if stop() {
            return Err(DataError::Interrupted);
        }
        if let Some(member) = data_member(member) {
            if member.1 != Format::Parquet {
                out.push(member);
            }
        }
    }
    Ok(out)
}

fn data_member(member: Member) -> Option<(String, Format, Codec)> {
    if !member.kind.is_file() {
        return None;
    }
    let name = member.name;
    let base = name.rsplit('/').next().unwrap_or(&name);
    if base.starts_with('.') {
        return None; // e.g. macOS `._data00.json` resource forks
    }
    format_of(base).map(|(f, c)| (name, f, c))
}

/// Read every job in order and pass its events to `emit`; `emit` returning false stops reading.
/// `bytes_read` counts bytes read from disk.
pub(crate) fn read_all(
    plan: &Plan,
    bytes_read: &Arc<AtomicU64>,
    emit: &mut dyn FnMut(Event) -> bool,
) -> Result<(), DataError> {
    for job in &plan.jobs {
        match job {
            Job::File {
                path,
                format: Format::Parquet,
                split,
                ..
            } => {
                if !emit(Event::Source {
                    split: *split,
                    name: path.display().to_string(),
                }) {
                    return Ok(());
                }
                let mut batch = Batcher::new(*split, bytes_read, emit);
                super::parquet::read_column(
                    path,
                    plan.text_column.as_deref(),
                    plan.max_story_bytes,
                    &mut batch,
                    bytes_read,
                )?;
                if !batch.finish(path)? {
                    return Ok(());
                }
            }
            Job::File {
                path,
                format,
                codec,
                split,
            } => {
                let file = File::open(path).map_err(|e| DataError::io(path, e))?;
                let reader = BufReader::with_capacity(
                    FILE_BUF_BYTES,
                    Counting {
                        inner: file,
                        count: bytes_read.clone(),
                    },
                );
                let reader =
                    decoded(reader, *codec).map_err(|e| compressed_error(path, *codec, e))?;
                if !emit(Event::Source {
                    split: *split,
                    name: path.display().to_string(),
                }) {
                    return Ok(());
                }
                let read = read_stories(
                    reader,
                    *format,
                    path,
                    *split,
                    plan.max_story_bytes,
                    bytes_read,
                    emit,
                );
                // A read that fails without an OS error is the compressed stream's fault.
                let open = read.map_err(|e| match e {
                    DataError::Io { path, error } if *codec != Codec::Plain => {
                        compressed_error(&path, *codec, error)
                    }
                    other => other,
                })?;
                if !open {
                    return Ok(());
                }
            }
            Job::Archive {
                path,
                split,
                val_member,
            } => {
                let mut archive = open_archive(path, Some(bytes_read.clone()))?;
                let mut members = 0usize;
                while let Some(member) =
                    archive.next_member().map_err(|e| archive_error(path, e))?
                {
                    let Some((name, format, codec)) = data_member(member) else {
                        continue;
                    };
                    if format == Format::Parquet {
                        tracing::warn!(
                            "{}: not read: Parquet needs random access; extract it from the archive",
                            path.join(&name).display()
                        );
                        continue;
                    }
                    members += 1;
                    let split = if val_member.as_deref() == Some(name.as_str()) {
                        Split::Val
                    } else {
                        *split
                    };
                    let display = path.join(&name);
                    if !emit(Event::Source {
                        split,
                        name: display.display().to_string(),
                    }) {
                        return Ok(());
                    }
                    let member = decoded(BufReader::new(archive.body()), codec)
                        .map_err(|e| archive_error(&display, e))?;
                    let read = read_stories(
                        member,
                        format,
                        &display,
                        split,
                        plan.max_story_bytes,
                        bytes_read,
                        emit,
                    );
                    // A member's body that cannot be read is the archive's fault, as above.
                    let open = read.map_err(|e| match e {
                        DataError::Io { path, error } => archive_error(&path, error),
                        other => other,
                    })?;
                    if !open {
                        return Ok(());
                    }
                }
                if members == 0 {
                    return Err(DataError::NoStories { path: path.clone() });
                }
            }
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct Record {
    story: Option<String>,
    text: Option<String>,
}

impl Record {
    fn into_text(self) -> Option<String> {
        self.story.or(self.text)
    }
}

/// serde_json's message without its ` at line L column C` suffix.
fn json_problem(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    match message.strip_suffix(&position) {
        Some(m) => m.to_owned(),
        None => message,
    }
}

fn check_utf8(bytes: &[u8], base_offset: u64, path: &Path) -> Result<(), DataError> {
    std::str::from_utf8(bytes)
        .map(|_| ())
        .map_err(|e| DataError::NonUtf8 {
            path: path.to_path_buf(),
            offset: base_offset + e.valid_up_to() as u64,
        })
}

/// Stream the stories of one data file. Returns false when the consumer stopped listening.
/// `max_story` bounds what is held for one story: a `.txt` story (its line breaks counted, not
/// the one that ends it), a `.jsonl` line (without its line break) or the JSON text of a `.json`
/// list element; a longer one is [`DataError::StoryTooLong`], found before more than about
/// `max_story` bytes of it are in memory.
pub(crate) fn read_stories<R: BufRead>(
    mut reader: R,
    format: Format,
    path: &Path,
    split: Split,
    max_story: u64,
    bytes_read: &AtomicU64,
    emit: &mut dyn FnMut(Event) -> bool,
) -> Result<bool, DataError> {
    let mut batch = Batcher::new(split, bytes_read, emit);
    let io = |e| DataError::io(path, e);
    let too_long = |at: StoryAt| DataError::StoryTooLong {
        path: path.to_path_buf(),
        at,
        limit: max_story,
    };
    let max = usize::try_from(max_story).unwrap_or(usize::MAX);
    // A line of `max` bytes and its `\r\n`: a line that does not end within this many bytes is
    // longer than any story may be (a separator line always fits, however small `max`).
    let line_cap = max.max(ENDOFTEXT.len()).saturating_add(2);
    match format {
        Format::Txt => {
            let mut line = Vec::new();
            let mut story = String::new();
            let mut offset = 0u64;
            let mut story_start = 0u64;
            loop {
                line.clear();
                let (n, ended) = read_line_capped(&mut reader, &mut line, line_cap).map_err(io)?;
                if n == 0 {
                    break;
                }
                if story.is_empty() {
                    story_start = offset;
                }
                // A separator line is short: one cut off is a story line.
                if !ended {
                    return Err(too_long(StoryAt::Offset(story_start)));
                }
                check_utf8(&line, offset, path)?;
                offset += n as u64;
                let text = std::str::from_utf8(&line).unwrap_or_default();
                if text.trim_end_matches(['\n', '\r']) == ENDOFTEXT {
                    batch.push(&story);
                    story.clear();
                } else if story.len().saturating_add(content_len(&line)) > max {
                    return Err(too_long(StoryAt::Offset(story_start)));
                } else {
                    story.push_str(text);
                }
                if !batch.is_open() {
                    return Ok(false);
                }
            }
            batch.push(&story);
        }
        Format::Jsonl => {
            let mut line = Vec::new();
            let mut offset = 0u64;
            let mut line_no = 0u64;
            loop {
                line.clear();
                let (n, ended) = read_line_capped(&mut reader, &mut line, line_cap).map_err(io)?;
                if n == 0 {
                    break;
                }
                line_no += 1;
                if !ended || content_len(&line) > max {
                    return Err(too_long(StoryAt::Line {
                        line: line_no,
                        offset,
                    }));
                }
                check_utf8(&line, offset, path)?;
                offset += n as u64;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let bad = |message: String| DataError::BadJson {
                    path: path.to_path_buf(),
                    line: Some(line_no),
                    message,
                };
                // serde sees a one-line document: its line/column would contradict `line_no`.
                let rec: Record = serde_json::from_slice(line.trim_ascii_end())
                    .map_err(|e| bad(json_problem(&e)))?;
                let text = rec
                    .into_text()
                    .ok_or_else(|| bad("object has neither a `story` nor a `text` field".into()))?;
                batch.push(&text);
                if !batch.is_open() {
                    return Ok(false);
                }
            }
        }
        Format::Json => {
            let mut problem = None;
            let limit = ElementLimit::new(max_story);
            let mut de = serde_json::Deserializer::from_reader(Limited {
                inner: Utf8Checked::new(reader),
                limit: &limit,
            });
            let list = StoryList {
                batch: &mut batch,
                problem: &mut problem,
                limit: &limit,
            };
            if let Err(e) = list.deserialize(&mut de).and_then(|()| de.end()) {
                if !batch.is_open() {
                    return Ok(false);
                }
                if let Some(element) = limit.exceeded.get() {
                    return Err(too_long(StoryAt::Element(element)));
                }
                return Err(match problem {
                    Some(message) => DataError::BadJson {
                        path: path.to_path_buf(),
                        line: None,
                        message,
                    },
                    None => json_list_error(path, e),
                });
            }
        }
        Format::Parquet => unreachable!("Parquet is read by column, not as a byte stream"),
    }
    batch.finish(path)
}

/// Bytes of `line` without the line break that ends it (`\n` or `\r\n`).
fn content_len(line: &[u8]) -> usize {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line).len()
}

/// Append the next line of `reader`, its `\n` included, to `line`, reading at most `cap` bytes.
/// Returns the bytes read (0 at the end of the stream) and whether the line ended (with a `\n`
/// or the stream) within them; the rest of a longer line is left unread, so memory never holds
/// more than `cap` bytes of it (`read_until` would hold all of it).
fn read_line_capped(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<(usize, bool)> {
    let mut read = 0;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok((read, true));
        }
        let room = cap - read;
        let (n, ended) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) if i < room => (i + 1, true),
            _ => (buf.len().min(room), false),
        };
        line.extend_from_slice(&buf[..n]);
        reader.consume(n);
        read += n;
        if ended || read == cap {
            return Ok((read, ended));
        }
    }
}

/// How many bytes serde may read for one `.json` list element, shared by the [`Limited`]
/// reader (which counts) and the [`StoryList`] visitor (which starts each element's count).
struct ElementLimit {
    max: u64,
    /// Bytes read since the current element started; None between the list's end and EOF.
    used: Cell<Option<u64>>,
    element: Cell<u64>,
    /// The element that went over `max`, once one did.
    exceeded: Cell<Option<u64>>,
}

impl ElementLimit {
    fn new(max: u64) -> Self {
        Self {
            max,
            used: Cell::new(None),
            element: Cell::new(0),
            exceeded: Cell::new(None),
        }
    }

    fn start(&self, element: u64) {
        self.element.set(element);
        self.used.set(Some(0));
    }

    fn stop(&self) {
        self.used.set(None);
    }
}

/// A reader that fails once the current `.json` list element has taken more than its limit:
/// serde_json holds a string until it ends, so this is what bounds its memory.
struct Limited<'l, R> {
    inner: R,
    limit: &'l ElementLimit,
}

impl<R: Read> Read for Limited<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let Some(used) = self.limit.used.get() else {
            return self.inner.read(out);
        };
        let left = self.limit.max.saturating_sub(used);
        if left == 0 {
            self.limit.exceeded.set(Some(self.limit.element.get()));
            return Err(std::io::Error::other(
                "list element longer than --max-story-bytes",
            ));
        }
        let want = out.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut out[..want])?;
        self.limit.used.set(Some(used + n as u64));
        Ok(n)
    }
}

/// A `.json` list's elements, deserialized and handed to the batcher one at a time.
struct StoryList<'s, 'a> {
    batch: &'s mut Batcher<'a>,
    /// Set when an element has no story (serde's own error would carry a position that points
    /// past the element).
    problem: &'s mut Option<String>,
    limit: &'s ElementLimit,
}

impl<'de> DeserializeSeed<'de> for StoryList<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for StoryList<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of objects with a `story` or `text` field")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0u64;
        self.limit.start(i);
        while let Some(rec) = seq.next_element::<Record>()? {
            let Some(text) = rec.into_text() else {
                *self.problem = Some(format!(
                    "element {i} has neither a `story` nor a `text` field"
                ));
                return Err(de::Error::custom("element without a story"));
            };
            self.batch.push(&text);
            if !self.batch.is_open() {
                return Err(de::Error::custom("the consumer stopped listening"));
            }
            i += 1;
            self.limit.start(i);
        }
        // What follows the list (whitespace, or an error) is no element.
        self.limit.stop();
        Ok(())
    }
}

/// A streamed `.json` list's error: invalid UTF-8 found by [`Utf8Checked`], a read error, or
/// the JSON itself (serde's message, with its line and column).
fn json_list_error(path: &Path, e: serde_json::Error) -> DataError {
    if !e.is_io() {
        return DataError::BadJson {
            path: path.to_path_buf(),
            line: None,
            message: e.to_string(),
        };
    }
    let e = std::io::Error::from(e);
    match e.get_ref().and_then(|r| r.downcast_ref::<NotUtf8>()) {
        Some(NotUtf8(offset)) => DataError::NonUtf8 {
            path: path.to_path_buf(),
            offset: *offset,
        },
        None => DataError::io(path, e),
    }
}

/// The byte offset of a stream's first invalid UTF-8, carried through an `io::Error`.
#[derive(Debug)]
struct NotUtf8(u64);

impl std::fmt::Display for NotUtf8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not valid UTF-8 at byte offset {}", self.0)
    }
}

impl std::error::Error for NotUtf8 {}

/// How far [`Utf8Checked`] reads ahead of what it passes on.
const UTF8_CHECK_BYTES: usize = 1 << 16;

/// A reader that passes on only bytes known to be valid UTF-8 and fails with [`NotUtf8`] at the
/// first invalid sequence (one cut by the end of the stream included), so a streamed JSON list
/// is checked as a whole file was. A character split between two reads of `inner` is held back
/// until it is complete.
struct Utf8Checked<R> {
    inner: R,
    buf: Box<[u8]>,
    /// `buf[pos..valid]` is checked and not yet passed on; `buf[valid..end]` is the start of a
    /// character whose rest has not been read yet.
    pos: usize,
    valid: usize,
    end: usize,
    /// Stream offset of `buf[0]`.
    offset: u64,
}

impl<R: Read> Utf8Checked<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            buf: vec![0; UTF8_CHECK_BYTES].into_boxed_slice(),
            pos: 0,
            valid: 0,
            end: 0,
            offset: 0,
        }
    }

    /// Read more and check it; leaves `pos == valid` only at the end of the stream.
    fn fill(&mut self) -> std::io::Result<()> {
        self.offset += self.valid as u64;
        self.buf.copy_within(self.valid..self.end, 0);
        self.end -= self.valid;
        self.pos = 0;
        self.valid = 0;
        loop {
            let n = self.inner.read(&mut self.buf[self.end..])?;
            self.end += n;
            match std::str::from_utf8(&self.buf[..self.end]) {
                Ok(_) => self.valid = self.end,
                Err(e) => {
                    self.valid = e.valid_up_to();
                    // An invalid sequence, or one the end of the stream cuts short.
                    if e.error_len().is_some() || n == 0 {
                        let offset = self.offset + self.valid as u64;
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            NotUtf8(offset),
                        ));
                    }
                }
            }
            if self.valid > 0 || n == 0 {
                return Ok(());
            }
        }
    }
}

impl<R: Read> Read for Utf8Checked<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.valid {
            self.fill()?;
        }
        let n = out.len().min(self.valid - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn stories(text: &[u8], format: Format) -> Result<Vec<String>, DataError> {
        stories_from(text, format)
    }

    /// Every story [`read_stories`] hands over from `reader`.
    fn stories_from(reader: impl BufRead, format: Format) -> Result<Vec<String>, DataError> {
        stories_max(reader, format, u64::MAX)
    }

    /// [`stories_from`] with stories of at most `max_story` bytes.
    fn stories_max(
        reader: impl BufRead,
        format: Format,
        max_story: u64,
    ) -> Result<Vec<String>, DataError> {
        let mut out = Vec::new();
        let counter = AtomicU64::new(0);
        read_stories(
            reader,
            format,
            Path::new("t"),
            Split::Train,
            max_story,
            &counter,
            &mut |e| {
                if let Event::Stories { stories, .. } = e {
                    out.extend(stories);
                }
                true
            },
        )?;
        Ok(out)
    }

    #[test]
    fn txt_splits_on_exact_endoftext_lines_and_trims() {
        let got = stories(
            b"\nOne day.\n\nThe end.\n<|endoftext|>\n  Two <|endoftext|> inline\r\n<|endoftext|>\r\n<|endoftext|>\nThree",
            Format::Txt,
        )
        .unwrap();
        assert_eq!(
            got,
            vec!["One day.\n\nThe end.", "Two <|endoftext|> inline", "Three"]
        );
    }

    #[test]
    fn txt_reports_byte_offset_of_invalid_utf8() {
        let e = stories(b"ok\n<|endoftext|>\nab\xffc\n", Format::Txt).unwrap_err();
        assert!(matches!(e, DataError::NonUtf8 { offset: 19, .. }), "{e}");
    }

    #[test]
    fn jsonl_reads_story_or_text_and_names_bad_line() {
        let got = stories(
            b"{\"story\":\" a \"}\n\n{\"text\":\"b\",\"x\":1}\n",
            Format::Jsonl,
        )
        .unwrap();
        assert_eq!(got, vec!["a", "b"]);
        let e = stories(b"{\"story\":\"a\"}\n{\"other\":1}\n", Format::Jsonl).unwrap_err();
        assert_eq!(
            e.to_string(),
            "t:2: object has neither a `story` nor a `text` field"
        );
    }

    #[test]
    fn malformed_jsonl_line_is_named_once_without_serde_position() {
        for (text, problem) in [
            (
                &b"{\"story\":\"a\"}\n{\"story\": \"cut\n"[..],
                "EOF while parsing a string",
            ),
            (
                b"{\"story\":\"a\"}\r\n{\"story\": \"b\",}\r\n",
                "trailing comma",
            ),
            (
                b"{\"story\":\"a\"}\n{\"story\":\"b\"",
                "EOF while parsing an object",
            ),
        ] {
            let e = stories(text, Format::Jsonl).unwrap_err().to_string();
            assert_eq!(e, format!("t:2: {problem}"));
        }
    }

    #[test]
    fn json_list_of_story_objects() {
        let got = stories(
            br#"[{"story":"x","instruction":{"words":["a"]},"source":"GPT-4"},{"story":"y"}]"#,
            Format::Json,
        )
        .unwrap();
        assert_eq!(got, vec!["x", "y"]);
    }

    #[test]
    fn file_without_stories_is_an_error() {
        for (text, f) in [
            (&b""[..], Format::Txt),
            (b"<|endoftext|>\n  \n<|endoftext|>\n", Format::Txt),
            (b"[]", Format::Json),
            (b"\n", Format::Jsonl),
        ] {
            let e = stories(text, f).unwrap_err();
            assert!(matches!(e, DataError::NoStories { .. }), "{e}");
        }
    }

    #[test]
    fn json_list_errors_name_the_element_or_the_byte_offset() {
        let e = stories(br#"[{"story":"a"},{"title":"b"}]"#, Format::Json).unwrap_err();
        assert_eq!(
            e.to_string(),
            "t: element 1 has neither a `story` nor a `text` field"
        );
        let e = stories(b"[{\"story\":\"caf\xe9\"}]", Format::Json).unwrap_err();
        assert!(matches!(e, DataError::NonUtf8 { offset: 14, .. }), "{e}");
        let e = stories(br#"[{"story":"a"}] x"#, Format::Json).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("t: trailing characters at line 1"),
            "{e}"
        );
        let e = stories(br#"{"story":"a"}"#, Format::Json).unwrap_err();
        assert!(e.to_string().contains("expected a list of objects"), "{e}");
    }

    #[test]
    fn json_list_stops_when_the_consumer_stops() {
        let big = "x".repeat(crate::batch::BATCH_BYTES);
        let text = serde_json::to_vec(&vec![serde_json::json!({ "story": big }); 3]).unwrap();
        let counter = AtomicU64::new(0);
        let mut batches = 0;
        let open = read_stories(
            &text[..],
            Format::Json,
            Path::new("t"),
            Split::Train,
            u64::MAX,
            &counter,
            &mut |_| {
                batches += 1;
                false
            },
        )
        .unwrap();
        assert!(!open);
        assert_eq!(batches, 1);
    }

    /// Hands out one byte per read, so every character is split between reads.
    struct OneByte<'a>(&'a [u8]);

    impl Read for OneByte<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn checked(bytes: &[u8]) -> Result<Vec<u8>, u64> {
        let mut out = Vec::new();
        Utf8Checked::new(OneByte(bytes))
            .read_to_end(&mut out)
            .map(|_| out)
            .map_err(|e| e.get_ref().unwrap().downcast_ref::<NotUtf8>().unwrap().0)
    }

    #[test]
    fn utf8_check_passes_split_characters_and_finds_the_first_bad_byte() {
        let text = "Lily saw a 🐱 — très café.".as_bytes();
        assert_eq!(checked(text).unwrap(), text);
        assert_eq!(checked(b"ab\xffc"), Err(2));
        assert_eq!(checked(b"caf\xc3("), Err(3));
        // A character cut off by the end of the stream.
        assert_eq!(checked(b"ok \xf0\x9f\x90"), Err(3));
        assert_eq!(checked(b"").unwrap(), b"");
    }

    fn compressed_stories(bytes: Vec<u8>, codec: Codec) -> Result<Vec<String>, DataError> {
        let reader =
            decoded(&bytes[..], codec).map_err(|e| compressed_error(Path::new("t"), codec, e))?;
        stories_from(reader, Format::Jsonl).map_err(|e| match e {
            DataError::Io { path, error } => compressed_error(&path, codec, error),
            other => other,
        })
    }

    #[test]
    fn gzip_and_zstd_streams_decode_and_a_cut_stream_is_an_error() {
        let text: String = (0..2000)
            .map(|i| format!("{{\"text\":\"story {i}\"}}\n"))
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, text.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::stream::encode_all(text.as_bytes(), 3).unwrap();
        for (bytes, codec) in [(gz, Codec::Gzip), (zst, Codec::Zstd)] {
            let got = compressed_stories(bytes.clone(), codec).unwrap();
            assert_eq!(got.len(), 2000);
            assert_eq!(got[1999], "story 1999");
            let cut = bytes[..bytes.len() / 2].to_vec();
            let e = compressed_stories(cut, codec).unwrap_err();
            assert!(matches!(e, DataError::BadCompressed { .. }), "{e}");
            let want = format!("t: truncated or corrupt {} stream: ", codec.name());
            assert!(e.to_string().starts_with(&want), "{e}");
        }
    }

    #[test]
    fn format_is_chosen_by_extension() {
        assert_eq!(format_of("a.TXT"), Some((Format::Txt, Codec::Plain)));
        assert_eq!(format_of("data00.json"), Some((Format::Json, Codec::Plain)));
        assert_eq!(format_of("x.jsonl"), Some((Format::Jsonl, Codec::Plain)));
        assert_eq!(format_of("x.jsonl.gz"), Some((Format::Jsonl, Codec::Gzip)));
        assert_eq!(format_of("x.JSON.zst"), Some((Format::Json, Codec::Zstd)));
        assert_eq!(format_of("x.txt.zst"), Some((Format::Txt, Codec::Zstd)));
        assert_eq!(
            format_of("train-00000-of-00004.parquet"),
            Some((Format::Parquet, Codec::Plain))
        );
        for other in ["x.md", "x.gz", "x.parquet.gz", "x.tar.gz", "x.csv.zst"] {
            assert_eq!(format_of(other), None, "{other}");
        }
        assert!(is_archive("TinyStories_all_data.tar.gz") && is_archive("a.tgz"));
    }

    #[test]
    fn auto_val_prefers_a_parquet_validation_split_then_json() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            val_rank(&p("d/validation-00000-of-00001.parquet"), Format::Parquet),
            0
        );
        assert_eq!(
            val_rank(&p("d/validation/0000.parquet"), Format::Parquet),
            0
        );
        assert_eq!(
            val_rank(&p("d/train-00000-of-00004.parquet"), Format::Parquet),
            2
        );
        assert_eq!(val_rank(&p("d/validation.txt"), Format::Txt), 2);
        assert_eq!(val_rank(&p("d/data00.json.gz"), Format::Json), 1);
    }

    /// `prefix`, then `n` bytes of `x` without a line break, zstd-compressed: a few KB that
    /// decompress to one endless line.
    fn zstd_bomb(prefix: &[u8], n: u64, suffix: &[u8]) -> Vec<u8> {
        let mut z = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut z, prefix).unwrap();
        std::io::copy(&mut std::io::repeat(b'x').take(n), &mut z).unwrap();
        std::io::Write::write_all(&mut z, suffix).unwrap();
        z.finish().unwrap()
    }

    /// Read buffer of the hostile-input tests: what a reader may have pulled beyond what it used.
    const READ_AHEAD: usize = 1 << 16;

    /// The stories of zstd-compressed `bytes` read with `max_story`, and how many decompressed
    /// bytes were pulled from the stream.
    fn bomb_stories(
        bytes: &[u8],
        format: Format,
        max_story: u64,
    ) -> (Result<Vec<String>, DataError>, u64) {
        let pulled = Arc::new(AtomicU64::new(0));
        let source = Counting {
            inner: zstd::stream::read::Decoder::new(bytes).unwrap(),
            count: pulled.clone(),
        };
        let reader = BufReader::with_capacity(READ_AHEAD, source);
        let got = stories_max(reader, format, max_story);
        (got, pulled.load(Ordering::Relaxed))
    }

    fn too_long(at: &str, limit: u64) -> String {
        format!("t: {at} is longer than {limit} bytes (raise --max-story-bytes to read it)")
    }

    #[test]
    fn a_txt_line_longer_than_max_story_is_refused_before_it_is_held() {
        const MAX: u64 = 4096;
        // 64 MiB of one line in a few KB: read whole, it was held whole (issue 23: 2 GiB).
        let prefix = b"ok\n<|endoftext|>\n";
        let zst = zstd_bomb(prefix, 64 << 20, b"\n");
        assert!(zst.len() < 100_000, "{}", zst.len());
        let (got, pulled) = bomb_stories(&zst, Format::Txt, MAX);
        let e = got.unwrap_err();
        assert!(e.is_bad_input());
        assert_eq!(e.to_string(), too_long("the story at byte offset 17", MAX));
        // The prefix, at most a line's cap (MAX + "\r\n") of the story, one buffer of read-ahead.
        let bound = prefix.len() as u64 + MAX + 2 + READ_AHEAD as u64;
        assert!(pulled <= bound, "pulled {pulled} bytes, more than {bound}");
    }

    #[test]
    fn a_txt_story_is_limited_as_its_lines_add_up() {
        // k lines "abc\n": 4k bytes, 4k - 1 without the line break that ends the story.
        let k = 1000;
        let text = format!("a\n<|endoftext|>\n{}<|endoftext|>\nb\n", "abc\n".repeat(k));
        let max = 4 * k as u64 - 1;
        // Separator lines are no story's: they pass however small the limit.
        let tiny = stories_max(&b"a\n<|endoftext|>\r\nb\n"[..], Format::Txt, 1).unwrap();
        assert_eq!(tiny, ["a", "b"]);
        let got = stories_max(text.as_bytes(), Format::Txt, max).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].len() as u64, max); // trimmed of the "\n" that ends it
        let e = stories_max(text.as_bytes(), Format::Txt, max - 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            too_long("the story at byte offset 16", max - 1)
        );
        // A story of 16 MiB of short lines is refused within MAX bytes of where it starts.
        const MAX: u64 = 4096;
        let lines = "abc\n".repeat(4 << 20);
        let zst = zstd::stream::encode_all(lines.as_bytes(), 3).unwrap();
        let (got, pulled) = bomb_stories(&zst, Format::Txt, MAX);
        assert_eq!(
            got.unwrap_err().to_string(),
            too_long("the story at byte offset 0", MAX)
        );
        let bound = MAX + 2 + READ_AHEAD as u64;
        assert!(pulled <= bound, "pulled {pulled} bytes, more than {bound}");
    }

    #[test]
    fn a_jsonl_line_longer_than_max_story_is_refused_before_it_is_held() {
        let rec = br#"{"story":"xxx"}"#;
        let max = rec.len() as u64; // the line break is not counted
        let text = [&rec[..], b"\r\n", rec, b"\n", rec].concat();
        assert_eq!(stories_max(&text[..], Format::Jsonl, max).unwrap().len(), 3);
        let e = stories_max(&text[..], Format::Jsonl, max - 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            too_long("line 1 (at byte offset 0)", max - 1)
        );
        const MAX: u64 = 4096;
        let prefix = b"{\"story\":\"a\"}\n{\"story\":\"";
        let zst = zstd_bomb(prefix, 64 << 20, b"\"}\n");
        let (got, pulled) = bomb_stories(&zst, Format::Jsonl, MAX);
        assert_eq!(
            got.unwrap_err().to_string(),
            too_long("line 2 (at byte offset 14)", MAX)
        );
        let bound = prefix.len() as u64 + MAX + 2 + READ_AHEAD as u64;
        assert!(pulled <= bound, "pulled {pulled} bytes, more than {bound}");
    }

    #[test]
    fn a_json_list_element_longer_than_max_story_is_refused_before_it_is_held() {
        // Element 1 is read as `,{"story":"yyyy"}`: 17 bytes, its comma included.
        let text = br#"[{"story":"xxx"},{"story":"yyyy"}]  "#;
        assert_eq!(stories_max(&text[..], Format::Json, 17).unwrap().len(), 2);
        let e = stories_max(&text[..], Format::Json, 16).unwrap_err();
        assert!(matches!(e, DataError::StoryTooLong { .. }), "{e}");
        assert_eq!(e.to_string(), too_long("list element 1", 16));
        const MAX: u64 = 4096;
        let prefix = b"[{\"story\":\"a\"},{\"story\":\"";
        let zst = zstd_bomb(prefix, 64 << 20, b"\"}]");
        let (got, pulled) = bomb_stories(&zst, Format::Json, MAX);
        assert_eq!(
            got.unwrap_err().to_string(),
            too_long("list element 1", MAX)
        );
        // What serde took (the prefix and MAX bytes), the UTF-8 check's and the buffer's read-ahead.
        let bound = prefix.len() as u64 + MAX + (UTF8_CHECK_BYTES + READ_AHEAD) as u64;
        assert!(pulled <= bound, "pulled {pulled} bytes, more than {bound}");
    }

    #[test]
    fn max_story_bytes_reaches_the_readers_and_the_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bomb = dir.path().join("bomb.txt.zst");
        std::fs::write(&bomb, zstd_bomb(b"once\n<|endoftext|>\n", 64 << 20, b"")).unwrap();
        let plan = plan(std::slice::from_ref(&bomb), &[], None, 1 << 20, &|| false).unwrap();
        let counter = Arc::new(AtomicU64::new(0));
        let e = read_all(&plan, &counter, &mut |_| true).unwrap_err();
        assert!(matches!(e, DataError::StoryTooLong { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: the story at byte offset 19 is longer than 1048576 bytes (raise \
                 --max-story-bytes to read it)",
                bomb.display()
            )
        );
    }

    /// A `.tar.gz` whose first header is a GNU long name declaring `declared` bytes, followed by
    /// `present` bytes that do not compress (so reading them shows on disk).
    fn long_name_bomb(path: &Path, declared: u64, present: usize) {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(declared);
        h.set_cksum();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..present)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let file = File::create(path).unwrap();
        let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, h.as_bytes()).unwrap();
        std::io::Write::write_all(&mut gz, &noise).unwrap();
        gz.finish().unwrap();
    }

    #[test]
    fn a_tar_long_name_declaring_gigabytes_is_refused_after_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("names.tar.gz");
        // 3 GB declared (issue 23); 16 MiB present, which the tar crate read into memory whole.
        long_name_bomb(&archive, 3_000_000_000, 16 << 20);
        let want = format!(
            "{}: truncated or corrupt archive: tar header at byte offset 0: GNU long name of \
             3000000000 bytes (mla reads at most 8192)",
            archive.display()
        );
        let e = list_archive(&archive, &|| false).unwrap_err();
        assert!(matches!(e, DataError::BadArchive { .. }) && e.is_bad_input());
        assert_eq!(e.to_string(), want);
        let plan = Plan {
            jobs: vec![Job::Archive {
                path: archive.clone(),
                split: Split::Train,
                val_member: None,
            }],
            total_bytes: 0,
            auto_val: None,
            text_column: None,
            max_story_bytes: u64::MAX,
        };
        let counter = Arc::new(AtomicU64::new(0));
        let e = read_all(&plan, &counter, &mut |_| true).unwrap_err();
        assert_eq!(e.to_string(), want);
        // One read buffer of the file, not the 16 MiB behind the header.
        let read = counter.load(Ordering::Relaxed);
        assert!(
            read <= FILE_BUF_BYTES as u64,
            "read {read} bytes of the archive"
        );
    }

    #[test]
    fn a_tar_gz_cut_in_half_is_a_bad_archive_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("data.tar.gz");
        let text: String = (0..20_000)
            .map(|i| format!("story {i}\n<|endoftext|>\n"))
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        {
            let mut tar = tar::Builder::new(&mut gz);
            for name in ["a.txt", "b.txt"] {
                let mut h = tar::Header::new_gnu();
                h.set_size(text.len() as u64);
                h.set_mode(0o644);
                tar.append_data(&mut h, name, text.as_bytes()).unwrap();
            }
            tar.finish().unwrap();
        }
        let bytes = gz.finish().unwrap();
        std::fs::write(&archive, &bytes).unwrap();
        let whole = plan(std::slice::from_ref(&archive), &[], None, u64::MAX, &|| {
            false
        })
        .unwrap();
        let mut stories = 0;
        let counter = Arc::new(AtomicU64::new(0));
        read_all(&whole, &counter, &mut |e| {
            if let Event::Stories { stories: s, .. } = e {
                stories += s.len();
            }
            true
        })
        .unwrap();
        assert_eq!(stories, 40_000);
        std::fs::write(&archive, &bytes[..bytes.len() / 2]).unwrap();
        let e = read_all(&whole, &counter, &mut |_| true).unwrap_err();
        assert!(matches!(e, DataError::BadArchive { .. }), "{e}");
        // Named by the member being read when the stream broke: data.tar.gz/a.txt.
        let e = e.to_string();
        assert!(e.starts_with(&archive.display().to_string()), "{e}");
        assert!(e.contains(": truncated or corrupt archive: "), "{e}");
    }
}
