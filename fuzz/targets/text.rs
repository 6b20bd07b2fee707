//! Fuzz target: the text readers of `mla prepare` (`corpus/src/input.rs`, `archive.rs`, compiled
//! here from their source): `.txt`, `.jsonl` and `.json` lists, plain, gzip or zstd, and tar
//! archives' members, under a 1 MiB story limit. The first input byte picks the reader:
//! `b % 4` = txt, jsonl, json, tar; `b / 4 % 3` = plain, gzip, zstd (tar: uncompressed, so
//! its headers are what mutates).
#![no_main]

#[allow(dead_code)]
#[path = "../../corpus/src/archive.rs"]
mod archive;
#[allow(dead_code)]
#[path = "../../corpus/src/batch.rs"]
mod batch;
#[allow(dead_code)]
#[path = "../../corpus/src/error.rs"]
mod error;
#[allow(dead_code)]
#[path = "../../corpus/src/format.rs"]
mod format;
#[allow(dead_code)]
#[path = "../../corpus/src/input.rs"]
mod input;
#[allow(dead_code)]
#[path = "../../corpus/src/parquet.rs"]
mod parquet;
#[allow(dead_code)]
#[path = "../../corpus/src/thrift.rs"]
mod thrift;
/// What input.rs takes from the tokenizer module.
mod tokenizer {
    pub const ENDOFTEXT: &str = "<|endoftext|>";
}

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::atomic::AtomicU64;

use batch::Event;
use input::{read_stories, Format};
use libfuzzer_sys::fuzz_target;

const MAX_STORY: u64 = 1 << 20;

/// Every story of `reader` as `format`, checking what the tokenizer side relies on.
fn stories(reader: impl BufRead, format: Format) {
    let counter = AtomicU64::new(0);
    let _ = read_stories(
        reader,
        format,
        Path::new("fuzz"),
        format::Split::Train,
        MAX_STORY,
        &counter,
        &mut |e| {
            if let Event::Stories { stories, .. } = e {
                for s in stories {
                    assert!(!s.is_empty() && s.len() as u64 <= MAX_STORY, "{}", s.len());
                }
            }
            true
        },
    );
}

fn decoded<'a>(data: &'a [u8], codec: u8) -> Option<Box<dyn BufRead + 'a>> {
    Some(match codec {
        0 => Box::new(data),
        1 => Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(data))),
        _ => Box::new(BufReader::new(zstd::stream::read::Decoder::new(data).ok()?)),
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let format = match mode % 4 {
        0 => Format::Txt,
        1 => Format::Jsonl,
        2 => Format::Json,
        _ => {
            let mut members = archive::Members::new(data);
            while let Ok(Some(m)) = members.next_member() {
                assert!(m.name.len() as u64 <= archive::MAX_NAME_BYTES.max(archive::MAX_PAX_BYTES));
                let mut body = members.body();
                let mut first = [0u8; 64];
                let _ = body.read(&mut first);
            }
            return;
        }
    };
    if let Some(reader) = decoded(data, mode / 4 % 3) {
        stories(reader, format);
    }
});
