//! mla-model: a litgpt-compatible GPT whose attention is MHA, GQA, MQA or MLA (DeepSeek-V2).
//!
//! Owns the model configuration (`ModelConfig`, the named registry), the modules, RoPE,
//! the inference caches (standard KV and compressed latent), the absorbed MLA decode path
//! and sampling. It does no I/O and knows nothing of training: see the `mla-trainer` crate.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
