//! Fuzz target: a run config's YAML (`trainer/src/config.rs`: raw YAML → typed sections →
//! one validation pass), as `mla train --config` and every checkpoint's `config.yaml` are
//! read; the model section resolves through mla-model (not instrumented here).
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../trainer/src/config.rs"]
pub mod config;

// config.rs takes its `dist:` section from dist/config.rs (crate::dist::config).
#[path = "../../trainer/src/dist/config.rs"]
pub mod dist_config;
mod dist {
    pub use super::dist_config as config;
}

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = config::RunConfig::from_yaml(text, "fuzz.yaml", &[]);
    }
});
