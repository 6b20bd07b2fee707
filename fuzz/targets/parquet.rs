//! Fuzz target: a Parquet file as `mla prepare` reads one column of it (`corpus/src/parquet.rs`
//! and its page-header check `thrift.rs`, compiled here from their source), under a 1 MiB
//! story limit. The reader takes a path: each input is written to one temp file first.
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

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use batch::{Batcher, Event};
use libfuzzer_sys::fuzz_target;

const MAX_STORY: u64 = 1 << 20;

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("mla-fuzz-parquet-{}.parquet", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    if std::fs::write(path, data).is_err() {
        return;
    }
    let counter = Arc::new(AtomicU64::new(0));
    let mut emit = |e: Event| {
        if let Event::Stories { stories, .. } = e {
            for s in stories {
                assert!(s.len() as u64 <= MAX_STORY, "{}", s.len());
            }
        }
        true
    };
    let mut batch = Batcher::new(format::Split::Train, &counter, &mut emit);
    let _ = parquet::read_column(path, None, MAX_STORY, &mut batch, &counter);
});
