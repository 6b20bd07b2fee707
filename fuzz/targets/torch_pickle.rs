//! Fuzz target: the pickle and the records of a `torch.save` archive, past the zip layer
//! (whose CRCs a mutated archive rarely passes). The input is `[len u16 LE][pickle][record]`;
//! the harness zips the pickle as `a/data.pkl`, the rest as record `a/data/0`, with fixed
//! records `1` (16 bytes) and `2` (64 bytes), and reads the archive as mla does.
#![no_main]

#[allow(dead_code)]
#[path = "../../storage/src/formats/mod.rs"]
mod formats;

use std::io::Write;

use formats::{torch_save, Limits};
use libfuzzer_sys::fuzz_target;

fn archive(pickle: &[u8], record: &[u8]) -> Option<Vec<u8>> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let entries: [(&str, &[u8]); 4] = [
        ("a/data.pkl", pickle),
        ("a/data/0", record),
        ("a/data/1", &[0; 16]),
        ("a/data/2", &[0; 64]),
    ];
    for (name, bytes) in entries {
        w.start_file(name, opts).ok()?;
        w.write_all(bytes).ok()?;
    }
    Some(w.finish().ok()?.into_inner())
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let len = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let (pickle, record) = data[2..].split_at(len);
    let Some(zip) = archive(pickle, record) else {
        return;
    };
    let _ = torch_save::read(
        std::io::Cursor::new(&zip),
        zip.len() as u64,
        "fuzz.pth",
        &Limits::default(),
    );
});
