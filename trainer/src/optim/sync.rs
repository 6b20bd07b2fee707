//! How gradients and parameters travel between ranks around one optimizer step, as one value
//! ([`GradSync`]) that the step calls the same way for every setting, as torchtitan keeps
//! parallelism out of its train step:
//!
//! | | `reduce` | global norm | `clip` | after AdamW | save |
//! |---|---|---|---|---|---|
//! | `Local` (one rank, no communicator) | — | of the gradients | all of them | — | moments as held |
//! | `AllReduce` (DDP) | gather into the flat buffer, all-reduce it | of the gradients | all of them | — | moments as held |
//! | `Zero` (`dist.shard`: ZeRO-1/2) | reduce-scatter into the slice | √ of the summed slices' ‖·‖² | the slice | all-gather the parameters | moments gathered on rank 0 |
//!
//! The step itself (train/mod.rs) sums the squared slice norms in its one small all-reduce of
//! host values, so `Zero` costs no extra collective for the norm.
//!
//! Not here: the collectives (dist/), the ZeRO bucket mechanics (optim/zero.rs).

use super::{clip_grads, grad_norm, zero, AdamW, FlatParams};
use crate::dist::Communicator;
use tch::{Kind, Tensor};

/// The gradient synchronisation of a run, chosen once from its flat buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradSync {
    /// Nothing to synchronise: one rank without a communicator.
    Local,
    /// DDP: every rank holds everything; the flat gradient buffer is all-reduced.
    AllReduce,
    /// ZeRO-1/2: each rank owns a slice of the flat buffer (`FlatParams::shard`).
    Zero { bucket_mb: usize },
}

impl GradSync {
    /// The sync for `flat`: `Zero` when it is sharded, else `AllReduce` when gradients go
    /// through a communicator (`reduces`), else `Local`.
    pub fn for_flat(flat: &FlatParams, reduces: bool, bucket_mb: usize) -> GradSync {
        match (&flat.shard, reduces) {
            (Some(_), _) => GradSync::Zero { bucket_mb },
            (None, true) => GradSync::AllReduce,
            (None, false) => GradSync::Local,
        }
    }

    /// Sum the step's gradients over ranks (into this rank's slice when sharded). Returns
    /// whether anything went through the communicator.
    pub fn reduce(&self, flat: &mut FlatParams, comm: &dyn Communicator) -> anyhow::Result<bool> {
        match *self {
            GradSync::Local => Ok(false),
            GradSync::AllReduce => {
                // One flat buffer for the bucketed all-reduce: gather (copy) the gradients
                // into it. A real communicator reduces even alone (one GPU under
                // `--dist.backend nccl`), so scripts/gpu_check.sh passes gradients through
                // NCCL on a single card.
                flat.gather_grads()?;
                comm.all_reduce_sum(&mut flat.grads)?;
                Ok(true)
            }
            GradSync::Zero { bucket_mb } => {
                zero::reduce_scatter_grads(flat, comm, bucket_mb)?;
                Ok(true)
            }
        }
    }

    /// This rank's part of the squared global norm, a 0-dim fp64 tensor for the step's
    /// all-reduce of host values: the slice's ‖·‖² when sharded, else 0 (unused).
    pub fn norm_sq_part(&self, flat: &FlatParams) -> anyhow::Result<Tensor> {
        match self {
            GradSync::Zero { .. } => zero::norm_sq(flat),
            _ => Ok(Tensor::full([], 0.0, (Kind::Double, flat.params.device()))),
        }
    }

    /// The global gradient norm (0-dim fp32 on the device): √ of the summed parts when
    /// sharded, else the norm of the (already reduced) gradients.
    pub fn global_norm(
        &self,
        flat: &FlatParams,
        summed_norm_sq: &Tensor,
    ) -> anyhow::Result<Tensor> {
        match self {
            GradSync::Zero { .. } => {
                Ok(tch::no_grad(|| summed_norm_sq.sqrt().to_kind(Kind::Float)))
            }
            _ => Ok(grad_norm(flat)?),
        }
    }

    /// Clip by the global `norm` what this rank holds of the gradient.
    pub fn clip(&self, flat: &FlatParams, norm: &Tensor, max_norm: f64) -> anyhow::Result<()> {
        match self {
            GradSync::Zero { .. } => zero::clip(flat, norm, max_norm),
            _ => Ok(clip_grads(flat, norm, max_norm)?),
        }
    }

    /// After AdamW: every rank's updated slice to every rank when sharded. Returns whether
    /// anything went through the communicator.
    pub fn after_update(&self, flat: &FlatParams, comm: &dyn Communicator) -> anyhow::Result<bool> {
        match *self {
            GradSync::Zero { bucket_mb } => {
                zero::all_gather_params(flat, comm, bucket_mb)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// For a checkpoint, sharded: the whole moments gathered on rank 0 (every rank takes
    /// part; the others get `None`, and only rank 0 writes). Not sharded: `None`, each rank
    /// holds its moments whole ([`AdamW::moments`]).
    pub fn gather_moments(
        &self,
        flat: &FlatParams,
        opt: &AdamW,
        comm: &dyn Communicator,
    ) -> anyhow::Result<Option<(Tensor, Tensor)>> {
        match *self {
            GradSync::Zero { bucket_mb } => zero::gather_moments(flat, opt, comm, bucket_mb),
            _ => Ok(None),
        }
    }
}
