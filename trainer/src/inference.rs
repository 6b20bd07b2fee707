//! Inference settings shared by `mla generate`, `mla eval`, `mla bench` and `mla report`: the
//! weights' dtype and autocast for a `--precision`. Loading the model itself (an mla step, a
//! litgpt or Hugging Face directory) is interop's ([`crate::interop::load`]), re-exported here
//! for the commands.
//!
//! Not here: training resume (checkpoint/ restores optimizer and loader state too).

pub use crate::interop::load::{build, load, LoadedModel};
use tch::{Device, Kind};

/// Weights and compute dtype at inference (`--precision` of `mla generate` and `mla eval`,
/// litgpt's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InferencePrecision {
    /// bf16 weights, cache and compute.
    #[value(name = "bf16-true")]
    Bf16True,
    /// fp32 weights, bf16 autocast on CUDA (as training's bf16-mixed; fp32 on the CPU, where
    /// mla has no autocast).
    #[value(name = "bf16-mixed")]
    Bf16Mixed,
    /// fp32 throughout (bit-stable greedy decoding across attention paths).
    #[value(name = "32-true")]
    F32True,
}

/// The inference dtype of the weights: `precision` if given, else bf16 on CUDA (what training
/// used under bf16-mixed) and fp32 on CPU.
pub fn kind(precision: Option<InferencePrecision>, device: Device) -> Kind {
    match precision {
        Some(InferencePrecision::Bf16True) => Kind::BFloat16,
        Some(InferencePrecision::Bf16Mixed | InferencePrecision::F32True) => Kind::Float,
        None if device.is_cuda() => Kind::BFloat16,
        None => Kind::Float,
    }
}

/// Whether `precision` computes under bf16 autocast on `device`.
pub fn autocast(precision: Option<InferencePrecision>, device: Device) -> bool {
    precision == Some(InferencePrecision::Bf16Mixed) && device.is_cuda()
}
