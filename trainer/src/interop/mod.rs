//! Models to and from other programs' files. What each format can hold, and its configs and
//! key maps, are pure data in `mla_model::formats`; here are the files.
//!
//! * [`litgpt`]: writing a litgpt checkpoint directory (`mla export --to litgpt`).

pub mod litgpt;
