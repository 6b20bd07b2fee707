//! mla-model: a litgpt-compatible GPT whose attention is MHA, GQA, MQA or MLA (DeepSeek-V2).
//!
//! Owns the model configuration (`ModelConfig`, the named registry), the modules, RoPE,
//! the inference caches (standard KV and compressed latent), the absorbed MLA decode path,
//! sampling and the analytic model figures (`stats`). It does no I/O and knows nothing of
//! training: see the `mla-trainer` crate.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod attention;
pub mod cache;
pub mod config;
pub mod convert;
pub mod formats;
mod gpt;
mod layers;
mod mla;
pub mod registry;
pub mod sampling;
pub mod stats;

pub use cache::{InferenceCache, MlaDecode};
pub use config::{
    AttentionKind, ConfigErrors, ConfigIssue, LatentAttention, MlaDims, MlaSpec, ModelConfig,
};
pub use gpt::{Gpt, ModelError};
