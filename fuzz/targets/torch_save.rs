//! Fuzz target: a whole `torch.save` archive (zip + pickle + records) as mla reads
//! `lit_model.pth` / `pytorch_model.bin` (`storage/src/formats`, compiled here from its
//! source so that only it is instrumented). Every input must end in `Ok` or a `FormatError`:
//! no panic, no overflow, no allocation past libFuzzer's malloc limit.
#![no_main]

#[allow(dead_code)]
#[path = "../../storage/src/formats/mod.rs"]
mod formats;

use formats::{torch_save, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cursor = std::io::Cursor::new(data);
    let _ = torch_save::read(cursor, data.len() as u64, "fuzz.pth", &Limits::default());
});
