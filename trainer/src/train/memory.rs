//! Will one rank's training fit? An estimate of its memory from the config alone, checked
//! against what the device has free before anything is allocated (issue 14: `--model_config
//! .n_layer 100000` grew to 15 GB for minutes before it was killed). `mla info` prints it too.
//!
//! The estimate is deliberately low: exact counts for what is exact (weights, gradients and
//! the flat gradient buffer, the AdamW moments — per rank, as `dist.shard` divides them — one
//! chunk of fp32 logits) and, for the activations, only
//! the tensors every block is sure to keep for its backward. A run it refuses cannot fit; a
//! run it passes may still not (measured: pythia-160m at 4 × 2048 in fp32 on CPU peaks at
//! 16.1 GiB, estimated ≥ 6.5 GiB; BENCHMARKS.md). `mla train --force` skips the check.
//!
//! Not here: measuring memory (device.rs), the chunked loss that bounds the logits (loss.rs).

use crate::config::TrainConfig;
use crate::device;
use crate::dist::{Backend, DistConfig, Sharding};
use crate::error::BadInput;
use crate::metrics::human_bytes;
use mla_model::{stats, ModelConfig};
use tch::{Device, Kind};

/// One rank's training memory, by part, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Estimate {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub logits: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.activations + self.logits
    }

    /// `4.1 GiB (weights 640 MiB, gradients …)`.
    pub fn describe(&self) -> String {
        format!(
            "{} (weights {}, gradients {}, AdamW moments {}, activations ≥ {}, logits {})",
            human_bytes(self.total()),
            human_bytes(self.weights),
            human_bytes(self.gradients),
            human_bytes(self.optimizer),
            human_bytes(self.activations),
            human_bytes(self.logits)
        )
    }
}

/// The estimate for one of `world` ranks training model `m` as `train:` and `dist:` say, with
/// parameters of `param_kind` and
/// activations in bf16 when `autocast` (else in the parameters' kind).
///
/// Gradients: autograd's own (N values, alive from the first backward to the reduction), plus
/// where gradients are reduced (several ranks, or a real communicator alone) the flat buffer
/// they are gathered into: N values, or with `dist.shard: gradients` only this rank's slice,
/// S = ⌈N / world⌉. AdamW's two fp32 moments: N values each, or S sharded (optim/zero.rs).
pub(crate) fn estimate(
    m: &ModelConfig,
    train: &TrainConfig,
    dist: &DistConfig,
    param_kind: Kind,
    autocast: bool,
    world: usize,
) -> Estimate {
    let n = stats::parameters(m) as u64;
    let w = param_kind.elt_size_in_bytes() as u64;
    let reduces = world > 1 || matches!(dist.backend, Backend::Mpi | Backend::Nccl);
    let sharding = if reduces { dist.shard } else { Sharding::None };
    let slice = n.div_ceil(world.max(1) as u64);
    let buffer = match sharding {
        _ if !reduces => 0,
        Sharding::Gradients => slice,
        Sharding::None | Sharding::Optimizer => n,
    };
    let moments = if sharding == Sharding::None { n } else { slice };
    let a = if autocast { 2 } else { w };
    let tokens = (train.micro_batch_size * train.max_seq_length.unwrap_or(m.block_size)) as u64;
    let (c, i, l) = (
        m.n_embd as u64,
        m.intermediate_size() as u64,
        m.n_layer as u64,
    );
    // Kept for the backward by every block, at least: its input and the normed input, the
    // attention output and the residual after it (4 × C), and the MLP's hidden state before
    // and after the activation (2 × intermediate). A recomputed block keeps only its input
    // (C) between the passes (recompute.rs). The backward frees each block's activations as
    // it passes, so the peak is either at its start (every kept block, every input) or when
    // the topmost recomputed block runs again (its activations, the inputs, and the kept
    // blocks below it).
    let per_block = tokens * (4 * c + 2 * i) * a;
    let input = tokens * c * a;
    let policy = train.activation_checkpointing;
    let recomputed: Vec<u64> = (0..l).filter(|&b| policy.recomputes(b as usize)).collect();
    let n_recomputed = recomputed.len() as u64;
    let at_start = (l - n_recomputed) * per_block + n_recomputed * input;
    let at_top = recomputed.last().map_or(0, |&top| {
        let kept_below = top - recomputed.iter().filter(|&&b| b < top).count() as u64;
        kept_below * per_block + n_recomputed * input + per_block
    });
    let activations = at_start.max(at_top);
    // One chunk of fp32 logits, its log-softmax and its gradient (loss.rs caps a chunk).
    let vocab = m.padded_vocab_size() as u64;
    let chunk = (tokens * vocab * 4).min(super::loss::LOGITS_CHUNK_BYTES as u64);
    Estimate {
        weights: n * w,
        gradients: (n + buffer) * w,
        optimizer: 2 * moments * 4,
        activations,
        logits: 3 * chunk,
    }
}

/// Refuse (exit 2) when the estimate exceeds the memory `device` has free now, unless
/// `force`; returns the free memory when known.
pub(crate) fn check(est: &Estimate, device: Device, force: bool) -> Result<Option<u64>, BadInput> {
    let free = device::available_memory_bytes(device);
    if let Some(free) = free {
        if est.total() > free && !force {
            return Err(BadInput(format!(
                "this run needs at least {} of memory but {} has {} free; shrink model_config, train.micro_batch_size or train.max_seq_length, or pass --force to try anyway",
                est.describe(),
                device::describe(device),
                human_bytes(free)
            )));
        }
    }
    Ok(free)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunConfig;

    #[test]
    fn estimate_counts_weights_gradients_and_moments_exactly() {
        let cfg = RunConfig::from_yaml("model_name: pythia-160m\n", "t.yaml", &[]).unwrap();
        let e = estimate(cfg.model(), &cfg.train, &cfg.dist, Kind::Float, false, 1);
        let n = stats::parameters(cfg.model()) as u64;
        assert_eq!((e.weights, e.gradients, e.optimizer), (4 * n, 4 * n, 8 * n));
        // micro 4 × 2048 tokens, 12 layers of (4·768 + 2·3072) fp32 values per token.
        assert_eq!(e.activations, 12 * 4 * 2048 * (4 * 768 + 2 * 3072) * 4);
        assert_eq!(e.logits, 3 * (256 << 20));
        let half = estimate(cfg.model(), &cfg.train, &cfg.dist, Kind::BFloat16, false, 1);
        assert_eq!(half.weights, 2 * n);
        assert_eq!(half.activations * 2, e.activations);
        // Recomputing every block: 12 inputs (768 per token) and block 11's activations again;
        // every 3rd block (0, 3, 6, 9): at the backward's start 8 kept blocks and 4 inputs
        // (more than block 9 again over the 6 kept blocks below it).
        let with = |policy: &str| {
            let yaml =
                format!("model_name: pythia-160m\ntrain: {{activation_checkpointing: {policy}}}\n");
            let cfg = RunConfig::from_yaml(&yaml, "t.yaml", &[]).unwrap();
            estimate(cfg.model(), &cfg.train, &cfg.dist, Kind::Float, false, 1).activations
        };
        let (tokens, block) = (4 * 2048, (4 * 768 + 2 * 3072) * 4);
        assert_eq!(with("blocks"), tokens * (12 * 768 * 4 + block));
        assert_eq!(with("{every_k: 3}"), tokens * (8 * block + 4 * 768 * 4));
        let bad = RunConfig::from_yaml(
            "model_name: pythia-160m\ntrain: {activation_checkpointing: {every_k: 0}}\n",
            "t.yaml",
            &[],
        );
        let err = format!("{:#}", bad.err().unwrap());
        assert!(
            err.contains("train.activation_checkpointing.every_k"),
            "{err}"
        );
    }

    /// Per rank of 8: DDP keeps autograd's gradients and the flat buffer (2N) and all moments;
    /// ZeRO-1 divides the moments by 8; ZeRO-2 the flat buffer too (N + ⌈N/8⌉).
    #[test]
    fn sharding_divides_the_moments_and_the_gradient_buffer_by_the_world_size() {
        let at = |shard: &str, world: usize| {
            let yaml = format!("model_name: pythia-160m\ndist: {{shard: {shard}}}\n");
            let cfg = RunConfig::from_yaml(&yaml, "t.yaml", &[]).unwrap();
            estimate(
                cfg.model(),
                &cfg.train,
                &cfg.dist,
                Kind::Float,
                false,
                world,
            )
        };
        let cfg = RunConfig::from_yaml("model_name: pythia-160m\n", "t.yaml", &[]).unwrap();
        let n = stats::parameters(cfg.model()) as u64;
        let s = n.div_ceil(8);
        let parts = |e: Estimate| (e.weights, e.gradients, e.optimizer);
        assert_eq!(parts(at("none", 1)), (4 * n, 4 * n, 8 * n));
        assert_eq!(
            parts(at("gradients", 1)),
            (4 * n, 4 * n, 8 * n),
            "one rank: no sharding"
        );
        assert_eq!(parts(at("none", 8)), (4 * n, 8 * n, 8 * n));
        assert_eq!(parts(at("optimizer", 8)), (4 * n, 8 * n, 8 * s));
        assert_eq!(parts(at("gradients", 8)), (4 * n, 4 * (n + s), 8 * s));
        let e = at("gradients", 8);
        assert_eq!(e.activations, at("none", 8).activations);
    }

    #[test]
    fn a_model_that_cannot_fit_is_refused_unless_forced() {
        let cfg = RunConfig::from_yaml(
            "model_name: pythia-14m\nmodel_config: {n_layer: 100000}\n",
            "t.yaml",
            &[],
        )
        .unwrap();
        let e = estimate(cfg.model(), &cfg.train, &cfg.dist, Kind::Float, false, 1);
        assert!(e.total() > 1 << 40, "{}", e.describe());
        let err = check(&e, Device::Cpu, false).unwrap_err();
        assert!(
            err.0.contains("--force") && err.0.contains("free"),
            "{}",
            err.0
        );
        assert!(check(&e, Device::Cpu, true).is_ok());
    }
}
