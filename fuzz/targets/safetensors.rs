//! Fuzz target: a safetensors file as mla reads checkpoints and Hugging Face weights
//! (`storage/src/formats/safetensors.rs`): the full read, what it promises the trainer, and
//! the header index.
#![no_main]

#[allow(dead_code)]
#[path = "../../storage/src/formats/mod.rs"]
mod formats;

use formats::safetensors;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((tensors, _)) = safetensors::read(data, "fuzz.safetensors") {
        for t in tensors {
            // What the trainer relies on before it hands the bytes to libtorch.
            let numel = t.shape.iter().try_fold(1i64, |a, &d| a.checked_mul(d));
            let bytes = numel.and_then(|n| usize::try_from(n).ok()?.checked_mul(t.dtype.size()));
            assert_eq!(bytes, Some(t.data.len()), "{}", t.name);
        }
    }
    let _ = safetensors::index(data, "fuzz.safetensors");
});
