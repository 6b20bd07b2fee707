//! mla-trainer: everything behind the `mla` binary — run configuration (YAML → typed,
//! validated sections), data, optimizer, communicator, training loop, checkpoints, generation.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod autocast;
pub mod budget;
pub mod checkpoint;
pub mod cli;
pub mod config;
mod cxx;
/// Data preparation, the shard format and the loaders: the `mla-corpus` crate (no tch).
pub use mla_corpus as data;
pub mod datasource;
pub mod device;
pub mod dist;
pub mod error;
pub mod faults;
pub mod inference;
pub mod interop;
pub mod logging;
pub mod metrics;
pub mod optim;
pub mod report;
pub mod signals;
pub mod tensorboard;
pub mod tensors;
pub mod train;
