//! Raw inputs of `prepare`: finds the data files in the given paths, assigns each to the train
//! or val split, and streams their stories in batches.
//!
//! Inputs: `.txt` (stories separated by lines that are exactly `<|endoftext|>`), `.json` (a list
//! of objects with a `story` or `text` field, as `TinyStories_all_data/*.json`), `.jsonl` (one
//! such object per line), `.tar.gz`/`.tgz` archives of those, and directories of all of these
//! (walked recursively in sorted order; hidden entries and other extensions are skipped).
//! Archives are read in member order. Each story is trimmed; empty stories are skipped.
//!
//! Symlinks inside an input directory: file symlinks are followed; directory symlinks are
//! followed only when they stay inside that input directory (one pointing out of it is skipped
//! with a warning: the input tree is what the user named), and one leading back to a directory
//! being walked is an error ([`DataError::SymlinkLoop`]).
//!
//! Not here: tokenizing or writing (see `prepare`).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Deserialize;

use super::error::DataError;
use super::format::Split;
use super::tokenizer::ENDOFTEXT;

/// Stories are handed to the tokenizer in batches of about this many bytes of text.
const BATCH_BYTES: usize = 1 << 21;

/// Layout of a data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Txt,
    Json,
    Jsonl,
}

fn lower(name: &str) -> String {
    name.to_ascii_lowercase()
}

pub(crate) fn format_of(name: &str) -> Option<Format> {
    let n = lower(name);
    if n.ends_with(".txt") {
        Some(Format::Txt)
    } else if n.ends_with(".jsonl") {
        Some(Format::Jsonl)
    } else if n.ends_with(".json") {
        Some(Format::Json)
    } else {
        None
    }
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
}

/// Build the plan. Without explicit `val` inputs, the first `.json` data file among the train
/// inputs (by path; archive members by name), or if there is none the first data file, becomes
/// the val split, provided there are at least two data files (litgpt: TinyStories keeps
/// `data00.json` for validation, TextFiles the first file). Otherwise there is no val split.
/// Choosing it may decompress whole archives, so `stop` is polled between their members.
pub(crate) fn plan(
    train: &[PathBuf],
    val: &[PathBuf],
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
    let mut total_bytes = 0;
    for j in &jobs {
        total_bytes += std::fs::metadata(j.path())
            .map_err(|e| DataError::io(j.path(), e))?
            .len();
    }
    Ok(Plan {
        jobs,
        total_bytes,
        auto_val,
    })
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
    } else if let Some(format) = format_of(&name) {
        jobs.push(Job::File {
            path: path.to_path_buf(),
            format,
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

/// Pick the auto-val data file (see [`plan`]) and re-route it; returns its display name.
fn choose_auto_val(jobs: &mut [Job], stop: &dyn Fn() -> bool) -> Result<Option<String>, DataError> {
    // (is not json, sort key, job index, archive member)
    let mut candidates: Vec<(bool, PathBuf, usize, Option<String>)> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        match job {
            Job::File { path, format, .. } => {
                candidates.push((*format != Format::Json, path.clone(), i, None));
            }
            Job::Archive { path, .. } => {
                for (member, format) in list_archive(path, stop)? {
                    candidates.push((format != Format::Json, path.join(&member), i, Some(member)));
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
) -> Result<tar::Archive<Box<dyn Read + Send>>, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let inner: Box<dyn Read + Send> = match counter {
        Some(c) => Box::new(Counting {
            inner: file,
            count: c,
        }),
        None => Box::new(file),
    };
    let gz = flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, inner));
    Ok(tar::Archive::new(Box::new(gz)))
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

/// Data members of an archive in member order (one decompression pass over headers and bodies).
fn list_archive(path: &Path, stop: &dyn Fn() -> bool) -> Result<Vec<(String, Format)>, DataError> {
    let mut archive = open_archive(path, None)?;
    let mut out = Vec::new();
    for entry in archive.entries().map_err(|e| archive_error(path, e))? {
        if stop() {
            return Err(DataError::Interrupted);
        }
        let entry = entry.map_err(|e| archive_error(path, e))?;
        if let Some((name, format)) = data_member(&entry) {
            out.push((name, format));
        }
    }
    Ok(out)
}

fn data_member<R: Read>(entry: &tar::Entry<'_, R>) -> Option<(String, Format)> {
    if !entry.header().entry_type().is_file() {
        return None;
    }
    let name = entry.path().ok()?.to_string_lossy().into_owned();
    let base = name.rsplit('/').next().unwrap_or(&name);
    if base.starts_with('.') {
        return None; // e.g. macOS `._data00.json` resource forks
    }
    format_of(base).map(|f| (name, f))
}

/// Counts bytes read from the underlying file (compressed bytes for archives), for progress.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
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
                format,
                split,
            } => {
                let file = File::open(path).map_err(|e| DataError::io(path, e))?;
                let reader = BufReader::with_capacity(
                    1 << 20,
                    Counting {
                        inner: file,
                        count: bytes_read.clone(),
                    },
                );
                if !emit(Event::Source {
                    split: *split,
                    name: path.display().to_string(),
                }) {
                    return Ok(());
                }
                if !read_stories(reader, *format, path, *split, bytes_read, emit)? {
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
                for entry in archive.entries().map_err(|e| archive_error(path, e))? {
                    let entry = entry.map_err(|e| archive_error(path, e))?;
                    let Some((name, format)) = data_member(&entry) else {
                        continue;
                    };
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
                    let read = read_stories(
                        BufReader::new(entry),
                        format,
                        &display,
                        split,
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

/// Batches stories and emits them; remembers whether the consumer still listens.
struct Batcher<'a> {
    split: Split,
    bytes_read: &'a AtomicU64,
    stories: Vec<String>,
    bytes: usize,
    total: u64,
    emit: &'a mut dyn FnMut(Event) -> bool,
    open: bool,
}

impl Batcher<'_> {
    fn push(&mut self, story: &str) {
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
pub(crate) fn read_stories<R: BufRead>(
    mut reader: R,
    format: Format,
    path: &Path,
    split: Split,
    bytes_read: &AtomicU64,
    emit: &mut dyn FnMut(Event) -> bool,
) -> Result<bool, DataError> {
    let mut batch = Batcher {
        split,
        bytes_read,
        stories: Vec::new(),
        bytes: 0,
        total: 0,
        emit,
        open: true,
    };
    let io = |e| DataError::io(path, e);
    match format {
        Format::Txt => {
            let mut line = Vec::new();
            let mut story = String::new();
            let mut offset = 0u64;
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line).map_err(io)?;
                if n == 0 {
                    break;
                }
                check_utf8(&line, offset, path)?;
                offset += n as u64;
                let text = std::str::from_utf8(&line).unwrap_or_default();
                if text.trim_end_matches(['\n', '\r']) == ENDOFTEXT {
                    batch.push(&story);
                    story.clear();
                } else {
                    story.push_str(text);
                }
                if !batch.open {
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
                let n = reader.read_until(b'\n', &mut line).map_err(io)?;
                if n == 0 {
                    break;
                }
                line_no += 1;
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
                if !batch.open {
                    return Ok(false);
                }
            }
        }
        Format::Json => {
            let mut bytes = Vec::new();
            reader.read_to_end(&mut bytes).map_err(io)?;
            check_utf8(&bytes, 0, path)?;
            let bad = |message: String| DataError::BadJson {
                path: path.to_path_buf(),
                line: None,
                message,
            };
            let records: Vec<Record> =
                serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
            drop(bytes);
            for (i, rec) in records.into_iter().enumerate() {
                let text = rec.into_text().ok_or_else(|| {
                    bad(format!(
                        "element {i} has neither a `story` nor a `text` field"
                    ))
                })?;
                batch.push(&text);
                if !batch.open {
                    return Ok(false);
                }
            }
        }
    }
    batch.flush();
    if batch.total == 0 {
        return Err(DataError::NoStories {
            path: path.to_path_buf(),
        });
    }
    Ok(batch.open)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stories(text: &[u8], format: Format) -> Result<Vec<String>, DataError> {
        let mut out = Vec::new();
        let counter = AtomicU64::new(0);
        read_stories(
            text,
            format,
            Path::new("t"),
            Split::Train,
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
    fn format_is_chosen_by_extension() {
        assert_eq!(format_of("a.TXT"), Some(Format::Txt));
        assert_eq!(format_of("data00.json"), Some(Format::Json));
        assert_eq!(format_of("x.jsonl"), Some(Format::Jsonl));
        assert_eq!(format_of("x.md"), None);
        assert!(is_archive("TinyStories_all_data.tar.gz") && is_archive("a.tgz"));
    }
}
