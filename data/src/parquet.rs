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
//! Not here: the other formats, archives, or tokenizing (see `input` and `prepare`).

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ::parquet::basic::{Compression, ConvertedType, LogicalType, Type as PhysicalType};
use ::parquet::column::reader::ColumnReader;
use ::parquet::data_type::ByteArray;
use ::parquet::errors::ParquetError;
use ::parquet::file::metadata::RowGroupMetaData;
use ::parquet::file::reader::{ChunkReader, FileReader, Length};
use ::parquet::file::serialized_reader::SerializedFileReader;
use ::parquet::schema::types::SchemaDescriptor;

use super::error::{DataError, StoryAt};
use super::input::{Batcher, Counting};

/// Rows decoded per read of the column (a few MB of TinyStories-sized text).
const ROWS_PER_READ: usize = 1024;

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
    let start = bytes_read.load(Ordering::Relaxed);
    let reader = SerializedFileReader::new(CountingFile {
        file,
        count: bytes_read.clone(),
    })
    .map_err(|e| parquet_error(path, e))?;
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
        let group = reader
            .get_row_group(g)
            .map_err(|e| parquet_error(path, e))?;
        check_codec(group.metadata().column(leaf).compression(), &name).map_err(bad)?;
        let ColumnReader::ByteArrayColumnReader(mut col) = group
            .get_column_reader(leaf)
            .map_err(|e| parquet_error(path, e))?
        else {
            return Err(bad(format!("column `{name}` is not a string column")));
        };
        loop {
            defs.clear();
            values.clear();
            let (rows, _, _) = col
                .read_records(ROWS_PER_READ, Some(&mut defs), None, &mut values)
                .map_err(|e| parquet_error(path, e))?;
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

/// The file offset where a row group's column chunks end.
fn group_end(group: &RowGroupMetaData) -> u64 {
    group
        .columns()
        .iter()
        .map(|c| {
            let (start, len) = c.byte_range();
            start + len
        })
        .max()
        .unwrap_or(0)
}

/// Raise `count` to `start + done` if it is lower (only this reader thread adds to it).
fn catch_up(count: &AtomicU64, start: u64, done: u64) {
    let now = count.load(Ordering::Relaxed) - start;
    if done > now {
        count.fetch_add(done - now, Ordering::Relaxed);
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
mod tests {
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
    fn write_parquet(path: &Path, values: &[String], compression: Compression) {
        use ::parquet::file::properties::WriterProperties;
        use ::parquet::file::writer::SerializedFileWriter;
        let schema = ::parquet::schema::parser::parse_message_type(
            "message m { optional binary text (STRING); }",
        )
        .unwrap();
        let props = WriterProperties::builder()
            .set_compression(compression)
            .set_dictionary_enabled(false)
            .build();
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
            if let super::super::input::Event::Stories { stories, .. } = e {
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
}
