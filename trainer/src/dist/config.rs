//! `dist:` — the run config's section for data parallelism (mla extension): which
//! communicator, its timeout and bucket size, and what ZeRO shards. The run config
//! (config.rs) holds it; only dist/ and the gradient sync (optim/sync.rs) read it.

use serde::{Deserialize, Serialize};

/// `dist.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// nccl on CUDA, mpi for several CPU ranks, single otherwise.
    #[default]
    Auto,
    Single,
    Mpi,
    Nccl,
}

/// `dist.shard`: what each rank keeps only its 1/N slice of (ZeRO stages over the flat buffer,
/// optim/zero.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Sharding {
    /// Every rank holds everything (DDP): gradients all-reduced, AdamW on the whole buffer.
    #[default]
    None,
    /// ZeRO-1: AdamW moments of the owned slice only; the full gradient buffer is kept and
    /// reduce-scattered, the parameters all-gathered after the step.
    Optimizer,
    /// ZeRO-2: ZeRO-1 without the full gradient buffer: gradients are reduce-scattered straight
    /// from autograd's into the owned slice, and autograd's are freed at once.
    Gradients,
}

impl Sharding {
    pub fn as_str(&self) -> &'static str {
        match self {
            Sharding::None => "none",
            Sharding::Optimizer => "optimizer",
            Sharding::Gradients => "gradients",
        }
    }
}

/// `dist:` (mla extension).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    pub backend: Backend,
    /// A collective that takes longer than this is an error, not a hang.
    pub timeout_secs: u64,
    /// Gradient all-reduce (and reduce-scatter / all-gather) bucket size.
    pub bucket_mb: usize,
    /// ZeRO sharding of optimizer state and gradients over the ranks.
    pub shard: Sharding,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Single => "single",
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
        }
    }
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            backend: Backend::Auto,
            timeout_secs: 600,
            bucket_mb: 25,
            shard: Sharding::None,
        }
    }
}
