//! Fuzz target: a step's `manifest.json` as the checkpoint store reads it from an out_dir
//! (`storage/src/manifest.rs`, compiled here with the two storage errors it names).
#![no_main]

#[allow(dead_code)]
#[path = "../../storage/src/manifest.rs"]
mod manifest;

use libfuzzer_sys::fuzz_target;
use manifest::{Manifest, StepName};

/// The errors of mla-storage that manifest.rs returns.
#[allow(dead_code)]
#[derive(Debug)]
pub enum Error {
    NotAStepDir { location: String },
    InvalidObjectName { name: String, reason: String },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

type Result<T> = std::result::Result<T, Error>;

fuzz_target!(|data: &[u8]| {
    let _ = Manifest::from_json(data, &StepName::Step(400));
    let _ = Manifest::from_json(data, &StepName::Final);
});
