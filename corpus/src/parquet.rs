//! Parquet inputs of `prepare` (`.parquet`, the files of Hugging Face datasets): the stories of
//! one string column, through the `parquet` crate's low-level column reader (no Arrow).
//!
//! The column is `--text-column` when given; otherwise `text`, or `story` when the file has no
//! `text` column (JSON objects may hold either). It must be a top-level, non-repeated
//! `BYTE_ARRAY` column annotated as a string (`UTF8`/`STRING`). Values are read in file order,
//! row group by row group and [`ROWS_PER_READ`] rows at a time, from one page of that column at
//! a time: memory holds a page and a batch whatever the file size, and the other columns are
//! never read. Null values are skipped; each value is trimmed and an empty one skipped, as
//! stories are. Progress counts the bytes read from disk, and a row group's other columns as
//! done once it is read.
//!
//! Hostile files: the crate trusts a page header's sizes (it allocates the declared compressed
//! and uncompressed size, up to 2 GiB each, before reading) and panics on a column chunk with a
//! negative offset in the footer. So before the crate reads a column chunk, its range is checked
//! against the file and its page headers are walked ([`check_pages`], with `thrift.rs`): a page
//! may declare at most [`PAGE_STORIES`] × `--max-story-bytes` (1 MiB when that is less). A
//! chunk with a DELTA_BYTE_ARRAY page is read one row at a time, as each of its values may be
//! rebuilt as long as the page. What the crate still trusts inside a page (a dictionary page
//! declaring more values than it holds makes it slice out of range) ends in a panic that
//! [`guarded`] turns into an error naming the file.
//!
//! Not here: the other formats, archives, or tokenizing (see `input` and `prepare`).

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};

use ::parquet::basic::{Compression, ConvertedType, LogicalType, Type as PhysicalType};
use ::parquet::column::reader::ColumnReader;
use ::parquet::data_type::ByteArray;
use ::parquet::errors::ParquetError;
use ::parquet::file::metadata::{ColumnChunkMetaData, RowGroupMetaData};
use ::parquet::file::reader::{ChunkReader, FileReader, Length};
use ::parquet::file::serialized_reader::SerializedFileReader;
use ::parquet::schema::types::SchemaDescriptor;

use super::batch::{Batcher, Counting};
use super::error::{DataError, StoryAt};
use super::thrift::read_page_header;

/// Rows decoded per read of the column (a few MB of TinyStories-sized text).
const ROWS_PER_READ: usize = 1024;

/// A page may declare (compressed or not) at most this many times `--max-story-bytes`: room for
/// one longest story and the short ones a writer put beside it, not for gigabytes.
pub(crate) const PAGE_STORIES: u64 = 4;
/// ... and at least this much, whatever `--max-story-bytes` (writers cut pages at about 1 MiB).
const MIN_PAGE_LIMIT: u64 = 1 << 20;

/// Parquet's `PageType::INDEX_PAGE` (never read) and `Encoding::DELTA_BYTE_ARRAY`.
const INDEX_PAGE: i32 = 1;
const DELTA_BYTE_ARRAY: i32 = 7;

/// Hand the stories of `path`'s text column (`column`, or the default, see the module comment)
/// to `batch`, adding the file's bytes to `bytes_read` as they are read. Stops early, without
/// an error, when the batcher's consumer stops listening. A value longer than `max_story` bytes
/// is [`DataError::StoryTooLong`].
pub(super) fn read_column(
    path: &Path,
    column: Option<&str>,
    max_story: u64,
    batch: &mut Batcher<'_>,
    bytes_read: &Arc<AtomicU64>,
) -> Result<(), DataError> {
    let bad = |message: String| DataError::BadParquet {
        path: path.to_path_buf(),
        message,
    };
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let mut headers = BufReader::new(file.try_clone().map_err(|e| DataError::io(path, e))?);
    let page_limit = max_story.saturating_mul(PAGE_STORIES).max(MIN_PAGE_LIMIT);
    let start = bytes_read.load(Ordering::Relaxed);
    let counting = CountingFile {
        file,
        count: bytes_read.clone(),
    };
    let reader = guarded(path, || SerializedFileReader::new(counting))?;
    let meta = reader.metadata();
    let schema = meta.file_metadata().schema_descr();
    let (leaf, name) = text_column(schema, column).map_err(bad)?;
    let max_def = schema.column(leaf).max_def_level();
    // Where the file's row groups end: what follows (the footer) was read first.
    let groups_end = meta.row_groups().iter().map(group_end).max().unwrap_or(0);
    let footer = file_len.saturating_sub(groups_end);

    let mut defs: Vec<i16> = Vec::new();
    let mut values: Vec<ByteArray> = Vec::new();
    let mut row = 0u64;
    for g in 0..meta.num_row_groups() {
        let group = guarded(path, || reader.get_row_group(g))?;
        let chunk = group.metadata().column(leaf);
        check_codec(chunk.compression(), &name).map_err(bad)?;
        let walk = check_pages(&mut headers, chunk, file_len, page_limit).map_err(|e| match e {
            PageProblem::Io(e) => DataError::io(path, e),
            PageProblem::Bad(m) => bad(format!("column `{name}`, row group {g}: {m}")),
        })?;
        // A DELTA_BYTE_ARRAY value is rebuilt from the one before it: one row at a time, no
        // batch of values as long as the page each.
        let rows_per_read = if walk.delta_byte_array {
            1
        } else {
            ROWS_PER_READ
        };
        let ColumnReader::ByteArrayColumnReader(mut col) =
            guarded(path, || group.get_column_reader(leaf))?
        else {
            return Err(bad(format!("column `{name}` is not a string column")));
        };
        loop {
            defs.clear();
            values.clear();
            let (rows, _, _) = guarded(path, || {
                col.read_records(rows_per_read, Some(&mut defs), None, &mut values)
            })?;
            if rows == 0 {
                break;
            }
            let mut value = values.iter();
            for i in 0..rows {
                // Without a definition level above 0 the column has no nulls.
                if max_def > 0 && defs.get(i).is_none_or(|&d| d < max_def) {
                    continue;
                }
                let Some(bytes) = value.next() else {
                    return Err(bad(format!(
                        "truncated or corrupt Parquet file: column `{name}` has fewer values than rows"
                    )));
                };
                if bytes.len() as u64 > max_story {
                    return Err(DataError::StoryTooLong {
                        path: path.to_path_buf(),
                        at: StoryAt::Row {
                            column: name.clone(),
                            row: row + i as u64,
                        },
                        limit: max_story,
                    });
                }
                let text = std::str::from_utf8(bytes.data()).map_err(|e| {
                    bad(format!(
                        "column `{name}`, row {}: not valid UTF-8 at byte {} of the value",
                        row + i as u64,
                        e.valid_up_to()
                    ))
                })?;
                batch.push(text);
            }
            row += rows as u64;
            if !batch.is_open() {
                return Ok(());
            }
        }
        // The row group's other columns were skipped, not read: count them as done.
        catch_up(bytes_read, start, group_end(group.metadata()) + footer);
    }
    catch_up(bytes_read, start, file_len);
    Ok(())
}

/// The leaf index and name of the column to read, or why there is none (a one-line message).
fn text_column(schema: &SchemaDescriptor, wanted: Option<&str>) -> Result<(usize, String), String> {
    let fields: Vec<&str> = schema
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name())
        .collect();
    let listed = || {
        if fields.is_empty() {
            "it has no columns".to_owned()
        } else {
            let names: Vec<String> = fields.iter().map(|f| format!("`{f}`")).collect();
            format!("its columns: {}", names.join(", "))
        }
    };
    let name = match wanted {
        Some(name) if fields.contains(&name) => name,
        Some(name) => return Err(format!("no column `{name}`; {}", listed())),
        None if fields.contains(&"text") => "text",
        None if fields.contains(&"story") => "story",
        None => {
            return Err(format!(
                "no `text` or `story` column; {} (choose one with --text-column)",
                listed()
            ))
        }
    };
    let Some(leaf) = schema
        .columns()
        .iter()
        .position(|c| c.path().parts() == [name])
    else {
        return Err(format!(
            "column `{name}` is nested (a struct, list or map), not a string column"
        ));
    };
    let c = schema.column(leaf);
    if c.max_rep_level() > 0 {
        return Err(format!(
            "column `{name}` is repeated (a list), not a string column"
        ));
    }
    let annotated = matches!(c.logical_type_ref(), Some(LogicalType::String))
        || c.converted_type() == ConvertedType::UTF8;
    match c.physical_type() {
        PhysicalType::BYTE_ARRAY if annotated => Ok((leaf, name.to_owned())),
        PhysicalType::BYTE_ARRAY => Err(format!(
            "column `{name}` holds {}, not strings",
            match c.logical_type_ref() {
                Some(t) => format!("{t:?} values"),
                None => "binary values (BYTE_ARRAY without a string annotation)".to_owned(),
            }
        )),
        other => Err(format!("column `{name}` holds {other} values, not strings")),
    }
}

/// Refuse a codec this build cannot decompress, naming it (the crate's own error would not).
fn check_codec(codec: Compression, column: &str) -> Result<(), String> {
    let name = match codec {
        Compression::UNCOMPRESSED
        | Compression::SNAPPY
        | Compression::GZIP(_)
        | Compression::LZ4
        | Compression::LZ4_RAW
        | Compression::ZSTD(_) => return Ok(()),
        Compression::LZO => "LZO",
        Compression::BROTLI(_) => "BROTLI",
    };
    Err(format!(
        "column `{column}` is compressed with {name}, which mla does not read \
         (it reads uncompressed, SNAPPY, GZIP, LZ4 and ZSTD)"
    ))
}

/// The file offset where a row group's column chunks end (for progress only: a chunk with an
/// impossible range counts as ending at 0).
fn group_end(group: &RowGroupMetaData) -> u64 {
    group
        .columns()
        .iter()
        .filter_map(|c| chunk_range(c).and_then(|(start, len)| start.checked_add(len)))
        .max()
        .unwrap_or(0)
}

/// A column chunk's (start, length) as the crate's `byte_range` gives it, or None when the
/// footer says a negative one (where `byte_range` panics).
fn chunk_range(c: &ColumnChunkMetaData) -> Option<(u64, u64)> {
    let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
    Some((
        u64::try_from(start).ok()?,
        u64::try_from(c.compressed_size()).ok()?,
    ))
}

/// Why a column chunk is refused before the crate reads it.
enum PageProblem {
    /// The OS failed to read the file.
    Io(std::io::Error),
    /// The file itself: a one-line message.
    Bad(String),
}

/// What the walk of a column chunk's pages found.
struct PageWalk {
    delta_byte_array: bool,
}

/// Walk the page headers of `chunk` as the crate's page reader will (from its first page through
/// its declared length, without a page index): the chunk must lie inside the file, and each
/// page's header and declared sizes fit in what is left of the chunk and in `page_limit`.
fn check_pages(
    headers: &mut BufReader<File>,
    chunk: &ColumnChunkMetaData,
    file_len: u64,
    page_limit: u64,
) -> Result<PageWalk, PageProblem> {
    let bad = |m: String| Err(PageProblem::Bad(m));
    let Some((start, len)) = chunk_range(chunk) else {
        return bad(format!(
            "column chunk with a negative offset or size in the footer (offset {}, {} bytes)",
            chunk
                .dictionary_page_offset()
                .unwrap_or(chunk.data_page_offset()),
            chunk.compressed_size()
        ));
    };
    if start.checked_add(len).is_none_or(|end| end > file_len) {
        return bad(format!(
            "column chunk of {len} bytes at byte offset {start} runs past the end of the file \
             ({file_len} bytes)"
        ));
    }
    let raise = "raise --max-story-bytes to read it";
    let mut walk = PageWalk {
        delta_byte_array: false,
    };
    let (mut at, mut left) = (start, len);
    while left > 0 {
        headers.seek(SeekFrom::Start(at)).map_err(PageProblem::Io)?;
        let h = match read_page_header(&mut *headers, left.min(page_limit)) {
            Ok(h) => h,
            Err(e) if e.raw_os_error().is_some() => return Err(PageProblem::Io(e)),
            Err(e) => {
                return bad(format!(
                    "page header at byte offset {at} is truncated or corrupt ({e})"
                ))
            }
        };
        let (compressed, uncompressed) = (h.compressed_size, h.uncompressed_size);
        let body_left = left - h.header_bytes;
        if compressed < 0 || uncompressed < 0 || compressed as u64 > body_left {
            return bad(format!(
                "page at byte offset {at} declares {compressed} bytes ({uncompressed} \
                 uncompressed), but its column chunk has {body_left} left"
            ));
        }
        if h.kind != INDEX_PAGE && (compressed as u64).max(uncompressed as u64) > page_limit {
            return bad(format!(
                "page at byte offset {at} declares {uncompressed} bytes uncompressed \
                 ({compressed} compressed), more than the {page_limit}-byte page limit \
                 (the larger of {PAGE_STORIES} × --max-story-bytes and 1 MiB; {raise})"
            ));
        }
        walk.delta_byte_array |= h.encoding == Some(DELTA_BYTE_ARRAY);
        at += h.header_bytes + compressed as u64;
        left = body_left - compressed as u64;
    }
    Ok(walk)
}

/// Raise `count` to `start + done` if it is lower (only this reader thread adds to it).
fn catch_up(count: &AtomicU64, start: u64, done: u64) {
    let now = count.load(Ordering::Relaxed) - start;
    if done > now {
        count.fetch_add(done - now, Ordering::Relaxed);
    }
}

/// Run `f`, a call into the parquet crate, turning a panic of the crate on a malformed file into
/// an error naming `path`. The crate trusts some bytes it reads: a dictionary page declaring
/// more values than it holds ends in an out-of-range slice inside the crate (parquet 60.2, the
/// newest; found by `scripts/fuzz.sh parquet`). Its panic is caught here, its message goes into
/// the error, and nothing is printed for it; a panic anywhere else (mla's own code, another
/// thread) still reaches the process's panic hook as before. The reader is dropped with the
/// error, never used again.
fn guarded<T>(
    path: &Path,
    f: impl FnOnce() -> ::parquet::errors::Result<T>,
) -> Result<T, DataError> {
    thread_local! {
        /// Set while this thread runs a guarded call; the panic message lands in `CAUGHT`.
        static GUARDED: Cell<bool> = const { Cell::new(false) };
        static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
    }
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(Cell::get) {
                let payload = info.payload();
                let message = (payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned());
                CAUGHT.with(|c| *c.borrow_mut() = Some(message));
            } else {
                previous(info);
            }
        }));
    });
    GUARDED.with(|g| g.set(true));
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(false));
    match outcome {
        Ok(result) => result.map_err(|e| parquet_error(path, e)),
        Err(_) => {
            let message = CAUGHT.with(|c| c.borrow_mut().take());
            Err(DataError::BadParquet {
                path: path.to_path_buf(),
                message: format!(
                    "corrupt Parquet file: the parquet reader failed on it ({})",
                    message.as_deref().unwrap_or("no message")
                ),
            })
        }
    }
}

/// A Parquet reading error: the OS's is an I/O failure, any other (bad magic, a footer or page
/// that does not decode, a file too short) is the file's own fault.
fn parquet_error(path: &Path, e: ParquetError) -> DataError {
    let message = match e {
        ParquetError::External(inner) => match inner.downcast::<std::io::Error>() {
            Ok(io) if io.raw_os_error().is_some() => return DataError::io(path, *io),
            Ok(io) => io.to_string(),
            Err(other) => other.to_string(),
        },
        ParquetError::General(message) => message,
        other => other.to_string(),
    };
    DataError::BadParquet {
        path: path.to_path_buf(),
        message: format!("not a Parquet file, or truncated or corrupt: {message}"),
    }
}

/// A Parquet file that adds the bytes the reader takes from it to a progress counter.
struct CountingFile {
    file: File,
    count: Arc<AtomicU64>,
}

impl Length for CountingFile {
    fn len(&self) -> u64 {
        self.file.len()
    }
}

impl ChunkReader for CountingFile {
    type T = Counting<<File as ChunkReader>::T>;

    fn get_read(&self, start: u64) -> ::parquet::errors::Result<Self::T> {
        Ok(Counting {
            inner: self.file.get_read(start)?,
            count: self.count.clone(),
        })
    }

    fn get_bytes(&self, start: u64, length: usize) -> ::parquet::errors::Result<bytes::Bytes> {
        let bytes = self.file.get_bytes(start, length)?;
        self.count.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn only_codecs_this_build_decompresses_pass() {
        check_codec(Compression::SNAPPY, "text").unwrap();
        check_codec(Compression::ZSTD(Default::default()), "text").unwrap();
        check_codec(Compression::GZIP(Default::default()), "text").unwrap();
        let e = check_codec(Compression::BROTLI(Default::default()), "text").unwrap_err();
        assert!(
            e.starts_with("column `text` is compressed with BROTLI"),
            "{e}"
        );
    }

    #[test]
    fn io_errors_of_the_os_stay_io_errors_and_the_rest_are_bad_parquet() {
        let os = std::io::Error::from_raw_os_error(libc::EIO);
        let e = parquet_error(Path::new("x.parquet"), ParquetError::External(Box::new(os)));
        assert!(matches!(e, DataError::Io { .. }), "{e}");
        let e = parquet_error(
            Path::new("x.parquet"),
            ParquetError::General("Invalid Parquet file. Corrupt footer".into()),
        );
        assert_eq!(
            e.to_string(),
            "x.parquet: not a Parquet file, or truncated or corrupt: Invalid Parquet file. Corrupt footer"
        );
    }

    /// A Parquet file of one optional string column `text` holding `values`, one row group.
    pub(crate) fn write_parquet(path: &Path, values: &[String], compression: Compression) {
        write_parquet_encoded(path, values, compression, None);
    }

    /// [`write_parquet`] with the values in `encoding` (None: PLAIN; RLE_DICTIONARY: a
    /// dictionary page, as writers do by default).
    fn write_parquet_encoded(
        path: &Path,
        values: &[String],
        compression: Compression,
        encoding: Option<::parquet::basic::Encoding>,
    ) {
        use ::parquet::file::properties::WriterProperties;
        use ::parquet::file::writer::SerializedFileWriter;
        let schema = ::parquet::schema::parser::parse_message_type(
            "message m { optional binary text (STRING); }",
        )
        .unwrap();
        // One page for the whole column, however long (the hostile tests patch its header).
        let mut props = WriterProperties::builder()
            .set_compression(compression)
            .set_dictionary_enabled(false)
            .set_data_page_size_limit(64 << 20);
        match encoding {
            Some(::parquet::basic::Encoding::RLE_DICTIONARY) => {
                props = props.set_dictionary_enabled(true);
            }
            Some(encoding) => props = props.set_encoding(encoding),
            None => {}
        }
        let props = props.build();
        let file = File::create(path).unwrap();
        let mut w = SerializedFileWriter::new(file, Arc::new(schema), props.into()).unwrap();
        let values: Vec<ByteArray> = values.iter().map(|v| ByteArray::from(v.as_str())).collect();
        let defs = vec![1; values.len()];
        let mut group = w.next_row_group().unwrap();
        let mut col = group.next_column().unwrap().unwrap();
        match col.untyped() {
            ::parquet::column::writer::ColumnWriter::ByteArrayColumnWriter(c) => {
                c.write_batch(&values, Some(&defs), None).unwrap();
            }
            _ => unreachable!(),
        }
        col.close().unwrap();
        group.close().unwrap();
        w.close().unwrap();
    }

    /// The stories of `path`'s text column, read with `max_story`.
    fn column_stories(path: &Path, max_story: u64) -> Result<Vec<String>, DataError> {
        let mut out = Vec::new();
        let counter = Arc::new(AtomicU64::new(0));
        let mut emit = |e| {
            if let super::super::batch::Event::Stories { stories, .. } = e {
                out.extend(stories);
            }
            true
        };
        let mut batch = Batcher::new(super::super::format::Split::Train, &counter, &mut emit);
        read_column(path, None, max_story, &mut batch, &counter)?;
        batch.finish(path)?;
        Ok(out)
    }

    #[test]
    fn a_value_longer_than_max_story_is_refused_naming_its_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let values: Vec<String> = (1..=5).map(|n| "x".repeat(n)).collect();
        write_parquet(&path, &values, Compression::SNAPPY);
        assert_eq!(column_stories(&path, 5).unwrap(), values);
        let e = column_stories(&path, 3).unwrap_err();
        assert!(matches!(e, DataError::StoryTooLong { .. }) && e.is_bad_input());
        assert_eq!(
            e.to_string(),
            format!(
                "{}: row 3 of column `text` is longer than 3 bytes (raise --max-story-bytes to \
                 read it)",
                path.display()
            )
        );
    }

    /// The largest single allocation the calling thread makes while it runs `f`.
    fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
        LARGEST.with(|l| l.set(0));
        TRACKING.with(|t| t.set(true));
        let out = f();
        TRACKING.with(|t| t.set(false));
        (out, LARGEST.with(|l| l.get()))
    }

    thread_local! {
        static TRACKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        static LARGEST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// The system allocator, noting the largest request of a thread that asked for it.
    struct Tracked;

    fn note(size: usize) {
        let _ = TRACKING.try_with(|t| {
            if t.get() {
                let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
            }
        });
    }

    // SAFETY: every call is passed on to `System` unchanged.
    unsafe impl std::alloc::GlobalAlloc for Tracked {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: the caller's contract is System's.
            unsafe { std::alloc::System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: as above.
            unsafe { std::alloc::System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
            note(new);
            // SAFETY: as above.
            unsafe { std::alloc::System.realloc(ptr, layout, new) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            // SAFETY: as above.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Tracked = Tracked;

    /// A file of one page of `text` holding 1100 stories of about 1 KB: at least 2^20 bytes
    /// uncompressed, so the page's sizes are 4-byte varints (room for 2^27 - 1 when patched).
    fn one_page_file(path: &Path, compression: Compression) -> Vec<String> {
        let values: Vec<String> = (0..1100)
            .map(|i| format!("story {i:04}{}", " once upon a time".repeat(58)))
            .collect();
        write_parquet(path, &values, compression);
        values
    }

    /// The first page header of the text column: its file offset and its bytes (a header is
    /// shorter than 64 bytes here: no statistics in it).
    fn first_page(path: &Path) -> (usize, Vec<u8>) {
        let reader = SerializedFileReader::new(File::open(path).unwrap()).unwrap();
        let at = reader.metadata().row_group(0).column(0).data_page_offset() as usize;
        let bytes = std::fs::read(path).unwrap();
        (at, bytes[at..at + 64].to_vec())
    }

    /// Overwrite the varint at `span` of `bytes` with `value`, in as many bytes.
    fn patch(bytes: &mut [u8], span: std::ops::Range<usize>, value: i64) {
        let len = span.len();
        bytes[span].copy_from_slice(&crate::thrift::padded_zigzag(value, len));
    }

    /// The footer's Thrift bytes and where they start.
    fn footer(bytes: &[u8]) -> std::ops::Range<usize> {
        let n = bytes.len();
        let len = u32::from_le_bytes(bytes[n - 8..n - 4].try_into().unwrap()) as usize;
        n - 8 - len..n - 8
    }

    /// The largest value a 4-byte varint field holds: 128 MiB.
    const DECLARED: i64 = (1 << 27) - 1;

    #[test]
    fn a_page_declaring_more_than_the_page_limit_is_refused_before_it_is_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let values = one_page_file(&path, Compression::SNAPPY);
        // 1 MiB stories: pages of up to 4 MiB, which holds the real one.
        const MAX: u64 = 1 << 20;
        let limit = MAX * PAGE_STORIES;
        assert!(column_stories(&path, MAX).unwrap() == values);
        // The page's uncompressed size (PageHeader field 2) says 128 MiB: the crate allocated
        // that before decompressing (2 GiB with a 5-byte varint).
        let (at, header) = first_page(&path);
        let span = crate::thrift::field_spans(&header, &[2])[0].clone();
        assert_eq!(span.len(), 4);
        let mut bytes = std::fs::read(&path).unwrap();
        patch(&mut bytes, at + span.start..at + span.end, DECLARED);
        std::fs::write(&path, &bytes).unwrap();
        let (got, largest) = largest_allocation(|| column_stories(&path, MAX));
        let e = got.unwrap_err();
        assert!(matches!(e, DataError::BadParquet { .. }) && e.is_bad_input());
        let compressed = crate::thrift::read_page_header(&header[..], 64)
            .unwrap()
            .compressed_size;
        assert_eq!(
            e.to_string(),
            format!(
                "{}: column `text`, row group 0: page at byte offset {at} declares {DECLARED} \
                 bytes uncompressed ({compressed} compressed), more than the {limit}-byte page \
                 limit (the larger of 4 × --max-story-bytes and 1 MiB; raise --max-story-bytes \
                 to read it)",
                path.display()
            )
        );
        assert!(largest as u64 <= limit, "allocated {largest} bytes at once");
    }

    #[test]
    fn a_column_chunk_past_the_end_of_the_file_is_refused_before_it_is_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        one_page_file(&path, Compression::UNCOMPRESSED);
        let mut bytes = std::fs::read(&path).unwrap();
        // The footer's ColumnMetaData.total_compressed_size (FileMetaData.row_groups[0]
        // .columns[0].meta_data field 7) and the page's compressed size (PageHeader field 3)
        // both say 128 MiB: the crate checked one against the other, never against the file,
        // and allocated the page's before reading it.
        let f = footer(&bytes);
        let span = crate::thrift::field_spans(&bytes[f.clone()], &[4, 1, 3, 7])[0].clone();
        assert_eq!(span.len(), 4);
        patch(
            &mut bytes,
            f.start + span.start..f.start + span.end,
            DECLARED,
        );
        let (at, header) = first_page(&path);
        let header_len = crate::thrift::read_page_header(&header[..], 64)
            .unwrap()
            .header_bytes as i64;
        let span = crate::thrift::field_spans(&header, &[3])[0].clone();
        patch(
            &mut bytes,
            at + span.start..at + span.end,
            DECLARED - header_len,
        );
        std::fs::write(&path, &bytes).unwrap();
        let (got, largest) = largest_allocation(|| column_stories(&path, u64::MAX));
        assert_eq!(
            got.unwrap_err().to_string(),
            format!(
                "{}: column `text`, row group 0: column chunk of {DECLARED} bytes at byte offset \
                 {at} runs past the end of the file ({} bytes)",
                path.display(),
                bytes.len()
            )
        );
        // The file is about 1 MiB: nothing near the 128 MiB declared.
        assert!(largest < bytes.len(), "allocated {largest} bytes at once");
    }

    #[test]
    fn dictionary_and_delta_encoded_columns_are_read_whole() {
        use ::parquet::basic::Encoding;
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<String> = (0..3000)
            .map(|i| format!("story {} of many", i % 700))
            .collect();
        for encoding in [
            Encoding::RLE_DICTIONARY,
            Encoding::DELTA_BYTE_ARRAY,
            Encoding::DELTA_LENGTH_BYTE_ARRAY,
        ] {
            let path = dir.path().join(format!("{encoding}.parquet"));
            write_parquet_encoded(&path, &values, Compression::SNAPPY, Some(encoding));
            let file = File::open(&path).unwrap();
            let meta = SerializedFileReader::new(file.try_clone().unwrap())
                .unwrap()
                .metadata()
                .clone();
            let chunk = meta.row_group(0).column(0);
            let walk = check_pages(&mut BufReader::new(file), chunk, u64::MAX, 1 << 20);
            let delta = walk.ok().map(|w| w.delta_byte_array);
            assert_eq!(delta, Some(encoding == Encoding::DELTA_BYTE_ARRAY));
            assert!(
                column_stories(&path, u64::MAX).unwrap() == values,
                "{encoding}"
            );
        }
    }

    #[test]
    fn a_negative_column_chunk_offset_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        write_parquet(&path, &["a story".to_owned()], Compression::SNAPPY);
        let mut bytes = std::fs::read(&path).unwrap();
        // ColumnMetaData.data_page_offset (field 9): 4, a one-byte varint; -4 is one too. The
        // crate's ColumnChunkMetaData::byte_range asserts it is not negative.
        let f = footer(&bytes);
        let span = crate::thrift::field_spans(&bytes[f.clone()], &[4, 1, 3, 9])[0].clone();
        assert_eq!(bytes[f.start + span.start], 8, "data_page_offset 4");
        patch(&mut bytes, f.start + span.start..f.start + span.end, -4);
        std::fs::write(&path, &bytes).unwrap();
        let e = column_stories(&path, u64::MAX).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: column `text`, row group 0: column chunk with a negative offset or size in \
                 the footer (offset -4, {} bytes)",
                path.display(),
                SerializedFileReader::new(File::open(&path).unwrap())
                    .unwrap()
                    .metadata()
                    .row_group(0)
                    .column(0)
                    .compressed_size()
            )
        );
    }

    #[test]
    fn a_dictionary_page_declaring_more_values_than_it_holds_is_an_error_not_a_panic() {
        use ::parquet::basic::Encoding;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let values: Vec<String> = (0..3000).map(|i| format!("story {}", i % 700)).collect();
        write_parquet_encoded(
            &path,
            &values,
            Compression::UNCOMPRESSED,
            Some(Encoding::RLE_DICTIONARY),
        );
        assert!(column_stories(&path, u64::MAX).unwrap() == values);
        // DictionaryPageHeader.num_values (PageHeader field 7, its field 1): 700, two varint
        // bytes; 8000 fits in two too. The crate then reads lengths past the page's end
        // (found by the parquet fuzz target: a panic, exit 101, before this guard).
        let at = SerializedFileReader::new(File::open(&path).unwrap())
            .unwrap()
            .metadata()
            .row_group(0)
            .column(0)
            .dictionary_page_offset()
            .unwrap() as usize;
        let mut bytes = std::fs::read(&path).unwrap();
        let span = crate::thrift::field_spans(&bytes[at..at + 64], &[7, 1])[0].clone();
        assert_eq!(span.len(), 2, "num_values 700");
        patch(&mut bytes, at + span.start..at + span.end, 8000);
        std::fs::write(&path, &bytes).unwrap();
        let e = column_stories(&path, u64::MAX).unwrap_err();
        assert!(matches!(e, DataError::BadParquet { .. }) && e.is_bad_input());
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "{}: corrupt Parquet file: the parquet reader failed on it (",
                path.display()
            )),
            "{text}"
        );
        // The guard leaves other panics to the process's hook: a panic outside it still
        // unwinds (caught here only to observe it) after the guarded one.
        assert!(std::panic::catch_unwind(|| panic!("outside the guard")).is_err());
    }
}
