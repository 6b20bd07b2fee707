//! Fuzz target: the token-shard format of a prepared dataset (`corpus/src/format.rs`):
//! `index.json`, a worker's partial index, and a shard's 32-byte header.
#![no_main]

#[allow(dead_code)]
#[path = "../../corpus/src/error.rs"]
mod error;
#[allow(dead_code)]
#[path = "../../corpus/src/format.rs"]
mod format;

use std::path::Path;

use format::{DatasetIndex, PartialIndex, ShardHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz/index.json");
    if let Ok(index) = DatasetIndex::from_json(data, path) {
        let _ = index.summary();
        let _ = index.to_json();
    }
    let _ = PartialIndex::from_json(data, path);
    let _ = ShardHeader::decode(data, Path::new("fuzz/train-00000.bin"));
});
