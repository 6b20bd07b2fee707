//! ZeRO-1 and ZeRO-2 over the flat buffer (`dist.shard: optimizer | gradients`, DESIGN §8):
//! the buffer is padded to world × S elements and rank r owns [r·S, (r+1)·S).
//!
//! One optimizer step of a sharded rank:
//! 1. [`reduce_scatter_grads`]: the step's gradients are summed over ranks into each rank's
//!    slice only ([`Shard::grads`]), bucket by bucket (`dist.bucket_mb`): each bucket packs the
//!    same S-offset range of every rank's region into one staging buffer, world × len, and
//!    reduce-scatters it. `optimizer` packs from the flat gradient buffer (gathered first, as
//!    DDP does); `gradients` packs straight from autograd's per-parameter gradients and frees
//!    them, so no full gradient buffer exists.
//! 2. [`norm_sq`]: the slice's squared L2 norm; summed over ranks (in the step's one small
//!    all-reduce of host values), its root is the global norm that clipping and the
//!    non-finite guard use — the same on every rank, so all skip or all step.
//! 3. [`clip`], then AdamW on the owned slice only (optim `update_slice`): moments exist for
//!    S elements per rank.
//! 4. [`all_gather_params`]: every rank's updated slice to every rank, bucket by bucket
//!    through a staging buffer, so each rank holds all parameters again.
//!
//! Checkpoints stay world-size independent: [`gather_moments`] assembles the whole moments on
//! rank 0 (in host memory, bucket by bucket), which writes the same optimizer.safetensors an
//! unsharded run does; on resume every rank copies its own slice out of it. So a sharded
//! checkpoint resumes unsharded, on another world size, or with another `dist.shard`.
//!
//! Not here: where this runs in the step (train/mod.rs), the collectives (dist/).

use super::{clip_coefficient, copy_flat_range, AdamW, FlatParams, Shard};
use crate::dist::Sharding;
use crate::dist::{buckets, Communicator};
use anyhow::Context;
use tch::{Device, Kind, Tensor};

fn shard_of(flat: &FlatParams) -> anyhow::Result<&Shard> {
    flat.shard
        .as_ref()
        .context("ZeRO: the flat buffer is not sharded")
}

/// Bucket ranges of one rank's S elements, and a staging buffer of world × the largest.
fn staged_buckets(
    shard: &Shard,
    kind: Kind,
    device: Device,
    bucket_mb: usize,
) -> (Vec<(i64, i64)>, Tensor) {
    let b: Vec<(i64, i64)> = buckets(shard.size as usize, kind.elt_size_in_bytes(), bucket_mb)
        .into_iter()
        .map(|(o, l)| (o as i64, l as i64))
        .collect();
    let largest = b.iter().map(|&(_, l)| l).max().unwrap_or(0);
    let staging = Tensor::empty([shard.world as i64 * largest], (kind, device));
    (b, staging)
}

/// Sum the step's gradients over ranks into this rank's [`Shard::grads`] (module docs, 1).
pub fn reduce_scatter_grads(
    flat: &FlatParams,
    comm: &dyn Communicator,
    bucket_mb: usize,
) -> anyhow::Result<()> {
    let shard = shard_of(flat)?;
    let (w, s) = (shard.world as i64, shard.size);
    let (kind, device) = (shard.grads.kind(), shard.grads.device());
    let (ranges, staging) = staged_buckets(shard, kind, device, bucket_mb);
    match shard.sharding {
        Sharding::Gradients => {
            let grads = flat.grads_list()?;
            for (off, len) in ranges {
                let send = staging.narrow(0, 0, w * len);
                for r in 0..w {
                    let row = send.narrow(0, r * len, len);
                    copy_flat_range(&flat.entries, &grads, r * s + off, &row);
                }
                comm.reduce_scatter_sum(&send, &mut shard.grads.narrow(0, off, len))?;
            }
            drop(grads);
            flat.clear_grads()?; // autograd's gradients are summed into the slice: free them
        }
        _ => {
            flat.gather_grads()?;
            let regions = flat.grads_padded.view([w, s]);
            for (off, len) in ranges {
                let send = staging.narrow(0, 0, w * len);
                tch::no_grad(|| send.view([w, len]).copy_(&regions.narrow(1, off, len)));
                comm.reduce_scatter_sum(&send, &mut shard.grads.narrow(0, off, len))?;
            }
        }
    }
    Ok(())
}

/// This rank's share of the squared global gradient norm: ‖slice‖² as a 0-dim fp64 tensor
/// (the norm in fp32, as torch's, squared in fp64), not synchronised to the host.
pub fn norm_sq(flat: &FlatParams) -> anyhow::Result<Tensor> {
    let g = &shard_of(flat)?.grads;
    Ok(tch::no_grad(|| {
        g.norm_scalaropt_dtype(2.0, Kind::Float)
            .to_kind(Kind::Double)
            .square()
    }))
}

/// Scale the slice's gradient by min(1, max_norm / (norm + 1e-6)), `norm` the global one
/// (0-dim, on the device): the coefficient every rank computes alike, so the slices are
/// clipped as the whole gradient would be.
pub fn clip(flat: &FlatParams, norm: &Tensor, max_norm: f64) -> anyhow::Result<()> {
    let g = &shard_of(flat)?.grads;
    let kind = if g.device().is_cuda() {
        g.kind()
    } else {
        Kind::Float
    };
    let coef = clip_coefficient(norm, max_norm, kind);
    let _ = tch::no_grad(|| g.shallow_clone().g_mul_(&coef));
    Ok(())
}

/// Every rank's updated slice to every rank (module docs, 4).
pub fn all_gather_params(
    flat: &FlatParams,
    comm: &dyn Communicator,
    bucket_mb: usize,
) -> anyhow::Result<()> {
    let shard = shard_of(flat)?;
    let (w, s, r) = (shard.world as i64, shard.size, shard.rank as i64);
    let padded = &flat.padded;
    let (ranges, staging) = staged_buckets(shard, padded.kind(), padded.device(), bucket_mb);
    let regions = padded.view([w, s]);
    for (off, len) in ranges {
        let mut recv = staging.narrow(0, 0, w * len);
        comm.all_gather(&padded.narrow(0, r * s + off, len), &mut recv)?;
        tch::no_grad(|| regions.narrow(1, off, len).copy_(&recv.view([w, len])));
    }
    Ok(())
}

/// The whole AdamW moments (N elements each, fp32, in host memory) on rank 0, None on the
/// others: every rank takes part (a collective), bucket by bucket, so no rank ever holds a
/// device copy of more than its slice and one bucket per rank.
pub fn gather_moments(
    flat: &FlatParams,
    opt: &AdamW,
    comm: &dyn Communicator,
    bucket_mb: usize,
) -> anyhow::Result<Option<(Tensor, Tensor)>> {
    let shard = shard_of(flat)?;
    let (w, s) = (shard.world as i64, shard.size);
    let main = comm.rank() == 0;
    let device = opt.exp_avg.device();
    let (ranges, staging) = staged_buckets(shard, Kind::Float, device, bucket_mb);
    let gather = |moment: &Tensor| -> anyhow::Result<Tensor> {
        let whole = Tensor::zeros([if main { w * s } else { 0 }], (Kind::Float, Device::Cpu));
        for &(off, len) in &ranges {
            let mut recv = staging.narrow(0, 0, w * len);
            comm.all_gather(&moment.narrow(0, off, len), &mut recv)?;
            if main {
                tch::no_grad(|| {
                    whole
                        .view([w, s])
                        .narrow(1, off, len)
                        .copy_(&recv.view([w, len]))
                });
            }
        }
        Ok(whole.narrow(0, 0, if main { shard.numel } else { 0 }))
    };
    let (m, v) = (gather(&opt.exp_avg)?, gather(&opt.exp_avg_sq)?);
    Ok(main.then_some((m, v)))
}
