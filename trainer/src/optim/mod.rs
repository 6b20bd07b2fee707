//! Optimisation over ONE flat buffer: every parameter of the model is re-pointed
//! (`set_data`) at a slice of a flat parameter tensor (FSDP's flat_param idea), and the AdamW
//! moments are two flat fp32 tensors with the same layout, so checkpoints and the weight
//! broadcast are one bulk copy each.
//!
//! Gradients are NOT kept in a flat buffer during backward: before the first micro-batch of a
//! step they are cleared (`p.grad = None`, [`FlatParams::clear_grads`]), so autograd hands
//! over each fresh gradient instead of adding it into a zeroed buffer (what PyTorch does with
//! `zero_grad(set_to_none=True)`). For DDP, [`FlatParams::gather_grads`] copies them into the
//! flat gradient buffer (one copy, no zero fill) and re-points each `.grad` at its slice, so
//! the bucketed all-reduce sees one contiguous buffer. Norm, clipping and AdamW then run as
//! torch's own foreach/fused kernels over the per-parameter lists (`cxx`, a C++ shim).
//!
//! Layout: parameters with ≥ 2 dims (weights, embeddings) first, then 1-D ones (biases, norms),
//! each group in name order, so decoupled weight decay applies to one contiguous prefix.
//! Sharded (ZeRO, `dist.shard`, zero.rs): the buffers are padded to world × S elements, rank r
//! owns [r·S, (r+1)·S), AdamW's moments exist for that slice only, and its gradient lives in
//! the [`Shard`]; every rank still holds all parameters.
//! Also here: the LR schedule (linear warmup, cosine to min_lr, by optimizer step) and
//! global-norm clipping. Not here: the loop that calls them (train.rs).

pub mod state;
pub mod sync;
pub mod zero;

pub use sync::GradSync;

use crate::cxx::{self, TorchError};
use crate::dist::Sharding;
use std::collections::HashMap;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// Where one parameter lives in the flat buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatEntry {
    pub name: String,
    pub offset: i64,
    pub shape: Vec<i64>,
}

impl FlatEntry {
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    fn of(&self, flat: &Tensor) -> Tensor {
        flat.narrow(0, self.offset, self.numel())
            .view(self.shape.as_slice())
    }
}

/// The model's parameters as one flat tensor, and a flat gradient buffer of the same layout.
#[derive(Debug)]
pub struct FlatParams {
    /// The parameters, N elements: a view of the first N of `padded`.
    pub params: Tensor,
    /// The storage of `params`, padded with zeros to a multiple of the world size when sharded
    /// (the all-gather moves equal chunks); `params` itself otherwise.
    pub padded: Tensor,
    /// Gradients gathered for the all-reduce ([`FlatParams::gather_grads`]); its slices are
    /// also the `.grad` of a parameter that got none. Stale while gradients are per-parameter.
    /// Empty when built [`FlatParams::without_grad_buffer`] (one rank: nothing to reduce) or
    /// sharded by gradients.
    pub grads: Tensor,
    /// The storage of `grads`, padded as `padded`.
    pub grads_padded: Tensor,
    grad_buffer: bool,
    /// This rank's slice when sharded (ZeRO).
    pub shard: Option<Shard>,
    pub entries: Vec<FlatEntry>,
    /// Elements [0, n_decay) are ≥2-D weights (weight decay applies).
    pub n_decay: i64,
    /// The model's variables in `entries` order (their data are views of `params`).
    vars: Vec<Tensor>,
}

impl FlatParams {
    /// Move every trainable variable of `vs` into one flat buffer of `kind` (values kept).
    /// Each `.grad` starts as its (zeroed) slice of the flat gradient buffer.
    pub fn new(vs: &VarStore, kind: Kind) -> Result<FlatParams, TorchError> {
        Self::build(vs, kind, true, None)
    }

    /// [`FlatParams::new`] sharded over `world` ranks, this one `rank` (ZeRO, zero.rs): with
    /// [`Sharding::Optimizer`] the flat gradient buffer is kept and this rank's gradient is
    /// its slice of it; with [`Sharding::Gradients`] there is no flat gradient buffer, only
    /// this rank's slice.
    pub fn sharded(
        vs: &VarStore,
        kind: Kind,
        sharding: Sharding,
        rank: usize,
        world: usize,
    ) -> Result<FlatParams, TorchError> {
        let layout = match sharding {
            Sharding::None => None,
            s => Some((s, rank, world)),
        };
        Self::build(vs, kind, sharding == Sharding::Optimizer, layout)
    }

    /// [`FlatParams::new`] without the flat gradient buffer, for a rank with no peer: autograd's
    /// own per-parameter gradients are all the norm, clipping and AdamW read, so a second copy
    /// of every gradient (the buffer, idle between all-reduces that never come) is not kept.
    pub fn without_grad_buffer(vs: &VarStore, kind: Kind) -> Result<FlatParams, TorchError> {
        Self::build(vs, kind, false, None)
    }

    fn build(
        vs: &VarStore,
        kind: Kind,
        grad_buffer: bool,
        layout: Option<(Sharding, usize, usize)>,
    ) -> Result<FlatParams, TorchError> {
        let vars: HashMap<String, Tensor> = vs.variables();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort_by_key(|n| (vars[*n].dim() < 2, n.to_string()));
        let device = vs.device();
        let mut entries = Vec::with_capacity(names.len());
        let mut offset = 0;
        let mut n_decay = 0;
        for name in &names {
            let t = &vars[*name];
            let e = FlatEntry {
                name: name.to_string(),
                offset,
                shape: t.size(),
            };
            offset += e.numel();
            if t.dim() >= 2 {
                n_decay = offset;
            }
            entries.push(e);
        }
        // Sharded: N padded up to world × S (S = ⌈N / world⌉ elements per rank).
        let size = layout.map(|(_, _, world)| (offset + world as i64 - 1) / world as i64);
        let padded_len = layout.map_or(offset, |(_, _, world)| size.unwrap_or(0) * world as i64);
        let padded = Tensor::zeros([padded_len], (kind, device));
        let params = padded.narrow(0, 0, offset);
        let grads_padded =
            Tensor::zeros([if grad_buffer { padded_len } else { 0 }], (kind, device));
        let grads = grads_padded.narrow(0, 0, if grad_buffer { offset } else { 0 });
        let shard = match (layout, size) {
            (Some((sharding, rank, world)), Some(size)) => Some(Shard {
                sharding,
                rank,
                world,
                size,
                numel: offset,
                grads: match sharding {
                    Sharding::Gradients => Tensor::zeros([size], (kind, device)),
                    _ => grads_padded.narrow(0, rank as i64 * size, size),
                },
            }),
            _ => None,
        };
        let ordered: Vec<Tensor> = entries
            .iter()
            .map(|e| vars[&e.name].shallow_clone())
            .collect();
        tch::no_grad(|| {
            for (e, var) in entries.iter().zip(&ordered) {
                let mut view = e.of(&params);
                view.copy_(var);
                var.shallow_clone().set_data(&view);
            }
        });
        let flat = FlatParams {
            params,
            padded,
            grads,
            grads_padded,
            grad_buffer,
            shard,
            entries,
            n_decay,
            vars: ordered,
        };
        if grad_buffer {
            flat.point_grads_at_flat()?;
        }
        Ok(flat)
    }

    pub fn numel(&self) -> i64 {
        self.params.numel() as i64
    }

    /// The elements [lo, hi) of the flat buffer whose AdamW step this rank takes: all of them
    /// unsharded, its slice (cut at N) when sharded.
    pub fn owned(&self) -> (i64, i64) {
        match &self.shard {
            None => (0, self.numel()),
            Some(s) => s.owned(),
        }
    }

    /// The flat slice of one parameter, shaped.
    pub fn param_view(&self, e: &FlatEntry) -> Tensor {
        e.of(&self.params)
    }

    /// The flat gradient slice of one parameter, shaped.
    pub fn grad_view(&self, e: &FlatEntry) -> Tensor {
        e.of(&self.grads)
    }

    /// Number of leading entries that are ≥2-D (decayed).
    fn n_decay_entries(&self) -> usize {
        self.entries
            .iter()
            .take_while(|e| e.shape.len() >= 2)
            .count()
    }

    /// `p.grad = None` for every parameter: the next backward hands its fresh gradients over
    /// (no zero fill, no add); later micro-batches accumulate into them as usual.
    pub fn clear_grads(&self) -> Result<(), TorchError> {
        self.vars.iter().try_for_each(|v| cxx::set_grad(v, None))
    }

    /// Zero the flat gradient buffer and make every `.grad` its slice again, so the next
    /// backward adds into the buffer (gradients end up there without a gather).
    pub fn zero_grad(&self) -> Result<(), TorchError> {
        self.need_grad_buffer("zero_grad")?;
        let _ = self.grads.shallow_clone().zero_();
        self.point_grads_at_flat()
    }

    fn need_grad_buffer(&self, op: &'static str) -> Result<(), TorchError> {
        if self.grad_buffer {
            Ok(())
        } else {
            Err(TorchError {
                op,
                message: "no flat gradient buffer (built without_grad_buffer, for one rank)".into(),
            })
        }
    }

    fn point_grads_at_flat(&self) -> Result<(), TorchError> {
        for (e, var) in self.entries.iter().zip(&self.vars) {
            let slice = self.grad_view(e);
            let g = var.grad();
            if !(g.defined() && g.data_ptr() == slice.data_ptr()) {
                cxx::set_grad(var, Some(&slice))?;
            }
        }
        Ok(())
    }

    /// Copy every gradient into its slice of `grads` (zeros for a parameter without one) and
    /// re-point the `.grad` at that slice, so an in-place all-reduce of `grads` is what the
    /// norm, clipping and AdamW read. Gradients already in the buffer are not copied.
    pub fn gather_grads(&self) -> Result<(), TorchError> {
        self.need_grad_buffer("gather_grads")?;
        tch::no_grad(|| {
            for (e, var) in self.entries.iter().zip(&self.vars) {
                let mut slice = self.grad_view(e);
                let g = var.grad();
                if g.defined() && g.data_ptr() == slice.data_ptr() {
                    continue;
                }
                if g.defined() {
                    slice.copy_(&g);
                } else {
                    let _ = slice.zero_();
                }
                cxx::set_grad(var, Some(&slice))?;
            }
            Ok(())
        })
    }

    /// Every parameter's gradient, in `entries` order. A parameter that got no gradient gets
    /// its zeroed flat slice, or zeros of its own without the buffer (AdamW still decays its
    /// moments, as with a zero gradient).
    pub fn grads_list(&self) -> Result<Vec<Tensor>, TorchError> {
        let mut out = Vec::with_capacity(self.vars.len());
        for (e, var) in self.entries.iter().zip(&self.vars) {
            let g = var.grad();
            if g.defined() {
                out.push(g);
            } else {
                let zeros = if self.grad_buffer {
                    let slice = self.grad_view(e);
                    let _ = tch::no_grad(|| slice.shallow_clone().zero_());
                    slice
                } else {
                    var.zeros_like()
                };
                cxx::set_grad(var, Some(&zeros))?;
                out.push(zeros);
            }
        }
        Ok(out)
    }
}

/// This rank's slice of a sharded flat buffer (ZeRO): elements [rank·size, (rank+1)·size) of
/// the buffer padded to world × size.
#[derive(Debug)]
pub struct Shard {
    pub sharding: Sharding,
    pub rank: usize,
    pub world: usize,
    /// Elements per rank (S).
    pub size: i64,
    /// Elements of the unpadded buffer (N).
    pub numel: i64,
    /// The slice's gradient, S elements (zeros past N): a view of the padded flat gradient
    /// buffer ([`Sharding::Optimizer`]) or a buffer of its own ([`Sharding::Gradients`]).
    pub grads: Tensor,
}

impl Shard {
    /// The owned elements [lo, hi) of the unpadded buffer (the padding is nobody's).
    pub fn owned(&self) -> (i64, i64) {
        let lo = (self.rank as i64 * self.size).min(self.numel);
        (lo, (lo + self.size).min(self.numel))
    }
}

/// Copy elements [start, start + dst.numel()) of a flat layout into the 1-D `dst`, taking each
/// from the per-entry tensor (`tensors[i]` shaped as `entries[i]`) it lies in; past the last
/// entry (padding) `dst` gets zeros.
pub(crate) fn copy_flat_range(entries: &[FlatEntry], tensors: &[Tensor], start: i64, dst: &Tensor) {
    let end = start + dst.numel() as i64;
    let first = entries.partition_point(|e| e.offset + e.numel() <= start);
    let mut filled = start;
    tch::no_grad(|| {
        for (e, t) in entries[first..].iter().zip(&tensors[first..]) {
            if e.offset >= end {
                break;
            }
            let (a, b) = (start.max(e.offset), end.min(e.offset + e.numel()));
            dst.narrow(0, a - start, b - a)
                .copy_(&t.reshape(-1).narrow(0, a - e.offset, b - a));
            filled = b;
        }
        if filled < end {
            let _ = dst.narrow(0, filled - start, end - filled).zero_();
        }
    });
}

/// LR at optimizer step `step` (0-based): linear warmup over `warmup_steps` (reaching `lr` at
/// the end of warmup), then cosine decay to `min_lr` at `total_steps`; constant after warmup
/// when the total is unknown.
pub fn lr_at(step: u64, lr: f64, min_lr: f64, warmup_steps: u64, total_steps: Option<u64>) -> f64 {
    if step < warmup_steps {
        return lr * (step + 1) as f64 / warmup_steps as f64;
    }
    let Some(total) = total_steps else {
        return lr;
    };
    if total <= warmup_steps {
        return lr;
    }
    let ratio = ((step - warmup_steps) as f64 / (total - warmup_steps) as f64).min(1.0);
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    min_lr + coeff * (lr - min_lr)
}

/// AdamW (decoupled weight decay, torch's formulation) with fp32 moments in two flat buffers
/// laid out as the parameters (sharded: as this rank's slice of them, S elements). Each step is torch's fused kernel (`_fused_adamw_`, what
/// `torch.optim.AdamW(fused=True)` runs): one pass reading parameter, gradient and moments,
/// called once for the decayed ≥2-D prefix and once for the rest.
#[derive(Debug)]
pub struct AdamW {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub step: u64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// The step count as the fused kernel reads it: 0-dim fp32 on the parameters' device.
    step_count: Tensor,
}

impl AdamW {
    pub fn new(flat: &FlatParams, betas: (f64, f64), eps: f64, weight_decay: f64) -> AdamW {
        let opts = (Kind::Float, flat.params.device());
        let len = flat.shard.as_ref().map_or(flat.numel(), |s| s.size);
        AdamW {
            exp_avg: Tensor::zeros([len], opts),
            exp_avg_sq: Tensor::zeros([len], opts),
            step: 0,
            betas,
            eps,
            weight_decay,
            step_count: Tensor::zeros([], opts),
        }
    }

    /// One update with learning rate `lr` from the parameters' gradients:
    /// m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
    /// p ← p·(1 − lr·wd) (≥2-D weights) − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε).
    /// Non-fp32 parameters (bf16-true) are updated through an fp32 copy, so the moments stay
    /// fp32 (the fused kernel wants one dtype for all four).
    pub fn step(&mut self, flat: &FlatParams, lr: f64) -> Result<(), TorchError> {
        self.update(flat, lr, None)?;
        self.applied();
        Ok(())
    }

    /// The update of [`AdamW::step`], skipped on the device where the 0-dim fp32 `found_inf`
    /// holds 1 (a non-finite loss or gradient): nothing waits for the device to decide. The
    /// step count moves only when the caller, once it knows, calls [`AdamW::applied`].
    pub fn step_unless(
        &mut self,
        flat: &FlatParams,
        lr: f64,
        found_inf: &Tensor,
    ) -> Result<(), TorchError> {
        self.update(flat, lr, Some(found_inf))
    }

    /// The fused kernel's hyperparameters for one group of parameters.
    fn args(&self, lr: f64, weight_decay: f64) -> cxx::AdamWArgs {
        cxx::AdamWArgs {
            lr,
            betas: self.betas,
            weight_decay,
            eps: self.eps,
        }
    }

    /// Count the update queued by [`AdamW::step_unless`] as applied.
    pub fn applied(&mut self) {
        self.step += 1;
    }

    /// The whole moments with the step count, for a checkpoint (unsharded; a sharded run
    /// gathers them first, zero.rs).
    pub fn moments(&self) -> Moments<'_> {
        Moments {
            exp_avg: &self.exp_avg,
            exp_avg_sq: &self.exp_avg_sq,
            step: self.step,
        }
    }

    fn update(
        &mut self,
        flat: &FlatParams,
        lr: f64,
        found_inf: Option<&Tensor>,
    ) -> Result<(), TorchError> {
        if let Some(shard) = &flat.shard {
            return self.update_slice(flat, shard, lr, found_inf);
        }
        let grads = flat.grads_list()?;
        let step = self.step + 1;
        let views =
            |buf: &Tensor| -> Vec<Tensor> { flat.entries.iter().map(|e| e.of(buf)).collect() };
        let (m, v) = (views(&self.exp_avg), views(&self.exp_avg_sq));
        let p32 = (flat.params.kind() != Kind::Float).then(|| flat.params.to_kind(Kind::Float));
        let (params, grads) = match &p32 {
            None => (flat.vars.iter().map(Tensor::shallow_clone).collect(), grads),
            Some(p) => (
                views(p),
                grads.iter().map(|g| g.to_kind(Kind::Float)).collect(),
            ),
        };
        let k = flat.n_decay_entries();
        let n = flat.entries.len();
        tch::no_grad(|| -> Result<(), TorchError> {
            let _ = self.step_count.fill_(step as f64);
            for (range, weight_decay) in [(0..k, self.weight_decay), (k..n, 0.0)] {
                let args = self.args(lr, weight_decay);
                cxx::fused_adamw(
                    &params[range.clone()],
                    &grads[range.clone()],
                    &m[range.clone()],
                    &v[range],
                    &self.step_count,
                    args,
                    found_inf,
                )?;
            }
            if let Some(p) = &p32 {
                flat.params.shallow_clone().copy_(p);
            }
            Ok(())
        })
    }
}

impl AdamW {
    /// The update of a sharded rank: the fused kernel over its owned slice [lo, hi) as two
    /// flat pieces, cut where the decayed ≥2-D prefix ends (a slice may straddle it), with the
    /// shard's gradient. Element for element the arithmetic of the per-parameter update.
    fn update_slice(
        &mut self,
        flat: &FlatParams,
        shard: &Shard,
        lr: f64,
        found_inf: Option<&Tensor>,
    ) -> Result<(), TorchError> {
        let (lo, hi) = shard.owned();
        let step = self.step + 1;
        let cut = flat.n_decay.clamp(lo, hi);
        tch::no_grad(|| -> Result<(), TorchError> {
            let _ = self.step_count.fill_(step as f64);
            for ((a, b), weight_decay) in [((lo, cut), self.weight_decay), ((cut, hi), 0.0)] {
                if a == b {
                    continue;
                }
                let piece = |t: &Tensor| t.narrow(0, a - lo, b - a);
                let p = flat.params.narrow(0, a, b - a);
                let g = piece(&shard.grads);
                let p32 = (p.kind() != Kind::Float).then(|| p.to_kind(Kind::Float));
                let g = if g.kind() == Kind::Float {
                    g
                } else {
                    g.to_kind(Kind::Float)
                };
                let target = p32
                    .as_ref()
                    .map_or(p.shallow_clone(), Tensor::shallow_clone);
                let args = self.args(lr, weight_decay);
                cxx::fused_adamw(
                    &[target],
                    &[g],
                    &[piece(&self.exp_avg)],
                    &[piece(&self.exp_avg_sq)],
                    &self.step_count,
                    args,
                    found_inf,
                )?;
                if let Some(p32) = &p32 {
                    p.shallow_clone().copy_(p32);
                }
            }
            Ok(())
        })
    }
}

/// AdamW's moments and step count as a checkpoint holds them: the whole flat layout.
#[derive(Debug, Clone, Copy)]
pub struct Moments<'a> {
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
    pub step: u64,
}

/// Global L2 norm of the gradients (fp32 scalar tensor, not synchronised to the host), as
/// torch's clip_grad_norm_: the norm of the per-parameter norms.
pub fn grad_norm(flat: &FlatParams) -> Result<Tensor, TorchError> {
    if flat.entries.is_empty() {
        return Ok(Tensor::zeros([], (Kind::Float, flat.params.device())));
    }
    cxx::grad_norm(&flat.grads_list()?)
}

/// Scale gradients so their global norm is at most `max_norm`, as torch's clip_grad_norm_:
/// coefficient min(1, max_norm / (norm + 1e-6)) from the 0-dim `norm`, all on the device (no
/// host sync). The coefficient is computed in fp64 and rounded once to fp32, the value the
/// host-scalar form multiplied by; a coefficient of 1 leaves every gradient as it was. On CUDA,
/// bf16 gradients take it rounded to bf16, as clip_grad_norm_ does with bf16 norms.
pub fn clip_grads(flat: &FlatParams, norm: &Tensor, max_norm: f64) -> Result<(), TorchError> {
    let grads = flat.grads_list()?;
    let kind = match grads.first() {
        Some(g) if norm.device().is_cuda() => g.kind(), // the multi-tensor kernel wants one dtype
        _ => Kind::Float,
    };
    cxx::foreach_mul_(&grads, &clip_coefficient(norm, max_norm, kind))
}

/// min(1, max_norm / (norm + 1e-6)) on the norm's device: computed in fp64, rounded once to
/// `kind`.
pub(crate) fn clip_coefficient(norm: &Tensor, max_norm: f64, kind: Kind) -> Tensor {
    tch::no_grad(|| {
        let device = norm.device();
        (Tensor::full([], max_norm, (Kind::Double, device)) / (norm.to_kind(Kind::Double) + 1e-6))
            .clamp_max(1.0)
            .to_kind(kind)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Sharding;
    use tch::{nn, Device};

    /// fp32 unit roundoff: one rounding moves a value by at most u = 2^-24 of itself.
    const U: f64 = f32::EPSILON as f64 / 2.0;

    /// Two fp32 evaluations of one formula that each round `k`/2 times per element at most
    /// (other op order or fusion) differ by ≤ k·u of the values involved; the tensor's
    /// largest entry stands for them, so cancellation near 0 does not need a separate bound.
    fn assert_close(what: &str, got: &Tensor, want: &Tensor, k: f64) {
        let scale = want.abs().max().double_value(&[]);
        let d = (got - want).abs().max().double_value(&[]);
        println!(
            "Δ {what}, of its largest entry: {:.2e} (bound {:.2e} = {k}·u)",
            d / scale,
            k * U
        );
        assert!(
            d <= k * U * scale,
            "{what}: max |Δ| {d:e} > {k}·u·{scale:e}"
        );
    }

    /// A tied LM head is the embedding's tensor: once the variables live in the flat buffer,
    /// new values written into the embedding's slice are the head's (an untied head keeps its
    /// own), and the buffer holds the matrix once.
    #[test]
    fn a_tied_head_follows_the_embedding_into_the_flat_buffer() {
        for tied in [false, true] {
            let cfg = mla_model::ModelConfig {
                n_layer: 1,
                n_embd: 16,
                n_head: 2,
                block_size: 4,
                padded_vocab_size: Some(16),
                tie_embeddings: tied,
                ..Default::default()
            };
            let vs = VarStore::new(Device::Cpu);
            let gpt = mla_model::Gpt::new(&vs.root(), &cfg).unwrap();
            let flat = FlatParams::new(&vs, Kind::Float).unwrap();
            let names: Vec<&str> = flat.entries.iter().map(|e| e.name.as_str()).collect();
            assert_eq!(names.contains(&"lm_head.weight"), !tied, "{names:?}");
            let wte = flat
                .entries
                .iter()
                .find(|e| e.name == "transformer.wte.weight")
                .unwrap();
            // An identity embedding: the head then gives back the hidden state it is fed.
            let eye = Tensor::eye(16, (Kind::Float, Device::Cpu));
            tch::no_grad(|| {
                flat.params
                    .narrow(0, wte.offset, wte.numel())
                    .copy_(&eye.view([-1]));
            });
            let hidden = Tensor::randn([3, 16], (Kind::Float, Device::Cpu));
            let same = gpt.logits(&hidden).equal(&hidden);
            assert_eq!(same, tied, "tied {tied}");
        }
    }

    #[test]
    fn warmup_then_cosine_to_min_lr() {
        // f64 (u ≈ 1.1e-16) through one cos and a few products: ≤ 1e-15; 1e-12 is far above
        // that and far below any schedule mistake.
        let lr = |s| lr_at(s, 1.0, 0.1, 10, Some(110));
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!((lr(60) - 0.55).abs() < 1e-12);
        assert!((lr(110) - 0.1).abs() < 1e-12);
        assert!((lr(500) - 0.1).abs() < 1e-12);
        assert_eq!(lr_at(50, 1.0, 0.1, 10, None), 1.0);
        assert_eq!(lr_at(0, 1.0, 0.1, 0, Some(0)), 1.0);
    }

    /// Two small layers with the same values on every call: set from a formula, not from
    /// torch's global generator, which tests running in parallel threads share.
    fn toy() -> (VarStore, nn::Linear, nn::Linear) {
        let vs = VarStore::new(Device::Cpu);
        let a = nn::linear(vs.root() / "a", 3, 4, Default::default());
        let b = nn::linear(vs.root() / "b", 4, 2, Default::default());
        tch::no_grad(|| {
            for (i, t) in [&a.ws, a.bs.as_ref().unwrap(), &b.ws, b.bs.as_ref().unwrap()]
                .into_iter()
                .enumerate()
            {
                let n = t.numel() as i64;
                let v = ((Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.7 + i as f64).sin()
                    * 0.5)
                    .view(t.size().as_slice());
                t.shallow_clone().copy_(&v);
            }
        });
        (vs, a, b)
    }

    fn loss(a: &nn::Linear, b: &nn::Linear, x: &Tensor) -> Tensor {
        use tch::nn::Module;
        b.forward(&a.forward(x).tanh()).square().sum(Kind::Float)
    }

    /// Any range of the flat layout, across entry boundaries and into the padding, is the
    /// entries' values there (zeros past the last).
    #[test]
    fn a_flat_range_is_copied_from_the_entries_it_spans() {
        let (vs, _a, _b) = toy();
        let flat = FlatParams::new(&vs, Kind::Float).unwrap();
        let n = flat.numel();
        let whole = Tensor::arange(n, (Kind::Float, Device::Cpu)) + 1.0;
        let per_entry: Vec<Tensor> = flat
            .entries
            .iter()
            .map(|e| {
                whole
                    .narrow(0, e.offset, e.numel())
                    .view(e.shape.as_slice())
            })
            .collect();
        for (start, len) in [
            (0, n),
            (0, 1),
            (5, 13),
            (11, 2),
            (n - 3, 3),
            (n - 2, 7),
            (n, 4),
        ] {
            let dst = Tensor::full([len], -1.0, (Kind::Float, Device::Cpu));
            copy_flat_range(&flat.entries, &per_entry, start, &dst);
            let got: Vec<f32> = Vec::try_from(&dst).unwrap();
            let want: Vec<f32> = (start..start + len)
                .map(|i| if i < n { (i + 1) as f32 } else { 0.0 })
                .collect();
            assert_eq!(got, want, "[{start}, {})", start + len);
        }
    }

    /// Each rank of a sharded buffer steps exactly its slice [lo, hi) — 26 elements, the decayed
    /// prefix ending at 20, so with 2 and 3 ranks a slice straddles it, and with 30 some own
    /// only padding — as the whole-buffer step does, and leaves the rest alone (the all-gather
    /// brings it). Both are the same elementwise formula; they may round differently only where
    /// one runs a vector body and the other a scalar tail (FMA contraction): ≤ 2 roundings of
    /// each of its ~10 operations per step, 3 steps: k = 60.
    #[test]
    fn each_shard_steps_its_slice_as_the_whole_buffer_would() {
        let x = Tensor::ones([5, 3], (Kind::Float, Device::Cpu));
        let (vs, a, b) = toy();
        let flat = FlatParams::new(&vs, Kind::Float).unwrap();
        let initial = flat.params.copy();
        let mut opt = AdamW::new(&flat, (0.9, 0.95), 1e-8, 0.1);
        let mut step_grads = Vec::new();
        for t in 0..3 {
            flat.clear_grads().unwrap();
            loss(&a, &b, &(&x * (t + 1) as f64)).backward();
            let g = flat.grads_list().unwrap();
            step_grads.push(Tensor::cat(
                &g.iter().map(|g| g.reshape(-1)).collect::<Vec<_>>(),
                0,
            ));
            opt.step(&flat, 0.01).unwrap();
        }
        let n = flat.numel();
        for world in [1usize, 2, 3, 30] {
            let mut covered = 0;
            for rank in 0..world {
                let (vs, _a, _b) = toy();
                let sharded =
                    FlatParams::sharded(&vs, Kind::Float, Sharding::Gradients, rank, world)
                        .unwrap();
                let shard = sharded.shard.as_ref().unwrap();
                let (lo, hi) = shard.owned();
                let mut opt = AdamW::new(&sharded, (0.9, 0.95), 1e-8, 0.1);
                for g in &step_grads {
                    let _ = shard.grads.shallow_clone().zero_();
                    shard
                        .grads
                        .narrow(0, 0, hi - lo)
                        .copy_(&g.narrow(0, lo, hi - lo));
                    opt.step(&sharded, 0.01).unwrap();
                }
                let what = format!("rank {rank} of {world}, [{lo}, {hi})");
                if hi > lo {
                    let got = sharded.params.narrow(0, lo, hi - lo);
                    assert_close(&what, &got, &flat.params.narrow(0, lo, hi - lo), 60.0);
                }
                for (a, b) in [(0, lo), (hi, n)] {
                    let rest = sharded.params.narrow(0, a, b - a);
                    assert!(rest.equal(&initial.narrow(0, a, b - a)), "{what}: outside");
                }
                covered += hi - lo;
            }
            assert_eq!(covered, n, "the slices of {world} ranks tile the buffer");
        }
    }

    #[test]
    fn parameters_are_views_of_the_flat_buffer_and_gradients_gather_into_its_twin() {
        let (vs, a, b) = toy();
        let before: Vec<f32> = Vec::try_from(a.ws.flatten(0, -1)).unwrap();
        let flat = FlatParams::new(&vs, Kind::Float).unwrap();
        assert_eq!(flat.numel(), 3 * 4 + 4 + 4 * 2 + 2);
        assert_eq!(flat.n_decay, 12 + 8, "weights first");
        let after: Vec<f32> = Vec::try_from(a.ws.flatten(0, -1)).unwrap();
        assert_eq!(before, after, "values survive the move");
        let x = Tensor::ones([5, 3], (Kind::Float, Device::Cpu));
        flat.clear_grads().unwrap();
        loss(&a, &b, &x).backward();
        let entry = flat.entries.iter().find(|e| e.name == "b.bias").unwrap();
        let once = b.bs.as_ref().unwrap().grad().copy();
        assert_ne!(
            b.bs.as_ref().unwrap().grad().data_ptr(),
            flat.grad_view(entry).data_ptr(),
            "after clear_grads the backward's own gradient is kept, not added into the buffer"
        );
        loss(&a, &b, &x).backward(); // accumulates into it
        let twice = b.bs.as_ref().unwrap().grad();
        // The same backward gives the same bits, and g + g = 2g exactly in binary floating point.
        assert!(twice.equal(&(&once * 2.0)));
        flat.gather_grads().unwrap();
        assert!(flat.grad_view(entry).equal(&twice));
        let g_flat = flat.grads.abs().sum(Kind::Float).double_value(&[]);
        assert!(g_flat > 0.0, "gradients landed in the flat buffer");
        assert_eq!(
            b.bs.as_ref().unwrap().grad().data_ptr(),
            flat.grad_view(entry).data_ptr(),
            "after the gather .grad is the flat slice (what the all-reduce writes)"
        );
        flat.zero_grad().unwrap();
        assert_eq!(b.ws.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
        loss(&a, &b, &x).backward(); // adds into the buffer
        assert!(flat.grad_view(entry).equal(&once), "0 + g = g exactly");
        // Writing the flat buffer moves the parameters.
        let _ = flat.params.shallow_clone().fill_(0.5);
        assert_eq!(a.ws.mean(Kind::Float).double_value(&[]), 0.5);
    }

    /// torch.optim.AdamW's single-tensor update, op by op (the formula of the fused kernel).
    fn reference_adamw(
        p: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        decay: &Tensor,
        t: i32,
        lr: f64,
    ) -> (Tensor, Tensor, Tensor) {
        let (b1, b2, eps) = (0.9, 0.95, 1e-8);
        let p = p * (1.0 - lr * decay);
        let m = m * b1 + g * (1.0 - b1);
        let v = v * b2 + g * g * (1.0 - b2);
        let denom = v.sqrt() / (1.0 - f64::powi(b2, t)).sqrt() + eps;
        let p = p - &m / denom * (lr / (1.0 - f64::powi(b1, t)));
        (p, m, v)
    }

    /// One rank without the flat gradient buffer: the same steps as with it (norm, clipping
    /// and AdamW read the same per-parameter gradients), bit for bit; a parameter without a
    /// gradient gets zeros of its own; a gather, which needs the buffer, is an error.
    #[test]
    fn without_the_gradient_buffer_one_rank_steps_exactly_as_with_it() {
        let x = Tensor::ones([5, 3], (Kind::Float, Device::Cpu));
        let run = |buffer: bool| {
            let (vs, a, b) = toy();
            let unused = vs.root().var("unused", &[3], nn::Init::Const(1.0));
            let flat = if buffer {
                FlatParams::new(&vs, Kind::Float).unwrap()
            } else {
                FlatParams::without_grad_buffer(&vs, Kind::Float).unwrap()
            };
            assert_eq!(
                flat.grads.numel(),
                if buffer { flat.params.numel() } else { 0 }
            );
            let mut opt = AdamW::new(&flat, (0.9, 0.95), 1e-8, 0.1);
            for t in 1..=3 {
                flat.clear_grads().unwrap();
                loss(&a, &b, &(&x * t as f64)).backward();
                let norm = grad_norm(&flat).unwrap();
                clip_grads(&flat, &norm, norm.double_value(&[]) / 2.0).unwrap();
                opt.step(&flat, 0.01).unwrap();
            }
            assert!(
                unused.grad().defined(),
                "zeros for a parameter without a gradient"
            );
            assert_eq!(unused.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
            if !buffer {
                let e = flat.gather_grads().unwrap_err().to_string();
                assert!(e.contains("no flat gradient buffer"), "{e}");
            }
            (
                flat.params.copy(),
                opt.exp_avg.copy(),
                opt.exp_avg_sq.copy(),
            )
        };
        let (with, without) = (run(true), run(false));
        assert!(with.0.equal(&without.0), "parameters");
        assert!(with.1.equal(&without.1), "exp_avg");
        assert!(with.2.equal(&without.2), "exp_avg_sq");
    }

    #[test]
    fn fused_adamw_matches_the_reference_formula_and_decays_only_weights() {
        let (vs, a, b) = toy();
        let flat = FlatParams::new(&vs, Kind::Float).unwrap();
        let x = Tensor::ones([5, 3], (Kind::Float, Device::Cpu));
        let mut opt = AdamW::new(&flat, (0.9, 0.95), 1e-8, 0.1);
        let decay = Tensor::zeros([flat.numel()], (Kind::Float, Device::Cpu));
        let _ = decay.narrow(0, 0, flat.n_decay).fill_(0.1);
        let mut p = flat.params.copy();
        let mut m = Tensor::zeros_like(&p);
        let mut v = Tensor::zeros_like(&p);
        for t in 1..=5 {
            flat.clear_grads().unwrap();
            loss(&a, &b, &(&x * t as f64)).backward();
            flat.gather_grads().unwrap();
            let g = flat.grads.copy();
            let lr = 0.01 / t as f64;
            opt.step(&flat, lr).unwrap();
            (p, m, v) = reference_adamw(&p, &g, &m, &v, &decay, t, lr);
            // Per step ≤ 10 roundings of p (decay, the moments' quotient, the update) and ≤ 4
            // of m and v, in each implementation; the differences add up over t steps.
            let t_f = f64::from(t);
            assert_close(&format!("params, step {t}"), &flat.params, &p, 20.0 * t_f);
            assert_close(&format!("exp_avg, step {t}"), &opt.exp_avg, &m, 8.0 * t_f);
            assert_close(
                &format!("exp_avg_sq, step {t}"),
                &opt.exp_avg_sq,
                &v,
                8.0 * t_f,
            );
        }
        assert_eq!(opt.step, 5);
        // Step 1 in closed form: m̂ = g, v̂ = g², update = lr·g/(|g| + eps).
        let (vs, a, b) = toy();
        let flat = FlatParams::new(&vs, Kind::Float).unwrap();
        let p0 = flat.params.copy();
        flat.clear_grads().unwrap();
        loss(&a, &b, &x).backward();
        let g = Tensor::cat(
            &flat
                .grads_list()
                .unwrap()
                .iter()
                .map(|g| g.flatten(0, -1))
                .collect::<Vec<_>>(),
            0,
        );
        let mut opt = AdamW::new(&flat, (0.9, 0.95), 1e-8, 0.1);
        opt.step(&flat, 0.01).unwrap();
        let keep = Tensor::ones([flat.numel()], (Kind::Float, Device::Cpu));
        let _ = keep.narrow(0, 0, flat.n_decay).fill_(1.0 - 0.01 * 0.1);
        let expected = &p0 * &keep - (&g / (g.abs() + 1e-8)) * 0.01;
        assert_close("params after step 1", &flat.params, &expected, 20.0);
    }

    #[test]
    fn bf16_weights_step_through_fp32_and_keep_fp32_moments() {
        let (vs, a, b) = toy();
        let flat32 = FlatParams::new(&vs, Kind::Float).unwrap();
        let x = Tensor::ones([5, 3], (Kind::Float, Device::Cpu));
        loss(&a, &b, &x).backward();
        let g = flat32.grads.copy();
        let (mut vs16, _, _) = toy();
        vs16.bfloat16();
        let flat = FlatParams::new(&vs16, Kind::BFloat16).unwrap();
        let p0 = flat.params.to_kind(Kind::Float);
        flat.grads.shallow_clone().copy_(&g); // .grad are the flat slices after new()
        let mut opt = AdamW::new(&flat, (0.9, 0.95), 1e-8, 0.1);
        opt.step(&flat, 0.01).unwrap();
        assert_eq!(flat.params.kind(), Kind::BFloat16);
        assert_eq!(opt.exp_avg.kind(), Kind::Float);
        let g16 = g.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let decay = Tensor::zeros([flat.numel()], (Kind::Float, Device::Cpu));
        let _ = decay.narrow(0, 0, flat.n_decay).fill_(0.1);
        let zeros = Tensor::zeros_like(&p0);
        let (p, m, _) = reference_adamw(&p0, &g16, &zeros, &zeros, &decay, 1, 0.01);
        assert_close("bf16 run's exp_avg", &opt.exp_avg, &m, 8.0);
        // The fp32 result rounded once to bf16, which keeps 8 significant bits: ≤ 2^-8 ≈ 3.9e-3
        // of the value; 4e-3 leaves room for the fp32 update's own few roundings, which may
        // send a value near a rounding midpoint to the other bf16 neighbour.
        let got = flat.params.to_kind(Kind::Float);
        assert!(got.allclose(&p, 4e-3, 0.0, false));
        assert!(!got.equal(&p0), "the update is not lost to bf16 rounding");
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let (vs, a, b) = toy();
        let flat = FlatParams::new(&vs, Kind::Float).unwrap();
        flat.clear_grads().unwrap();
        loss(&a, &b, &Tensor::ones([5, 3], (Kind::Float, Device::Cpu))).backward();
        let n = grad_norm(&flat).unwrap().double_value(&[]);
        flat.gather_grads().unwrap();
        let flat_norm = flat.grads.norm().double_value(&[]);
        // Two sums of the same N positive squares in other orders: each within γ_N ≈ N·u of
        // the exact sum (Higham), the square root halves it and rounds once more.
        let numel = flat.numel() as f64;
        println!(
            "Δ foreach vs flat gradient norm, relative: {:.2e} (bound {:.2e})",
            (n - flat_norm).abs() / n,
            (numel + 2.0) * U
        );
        assert!(
            (n - flat_norm).abs() <= (numel + 2.0) * U * n,
            "{n} vs {flat_norm}"
        );
        flat.clear_grads().unwrap();
        loss(&a, &b, &Tensor::ones([5, 3], (Kind::Float, Device::Cpu))).backward();
        clip_grads(&flat, &Tensor::from(n as f32), n / 4.0).unwrap();
        let after = grad_norm(&flat).unwrap().double_value(&[]);
        // The coefficient is max_norm / (norm + 1e-6) (torch's), so the result falls short of
        // n/4 by ≤ 1e-6/4; the scaling and the new norm add ≤ (N + 4) roundings of n/4.
        let tol = 1e-6 / 4.0 + (numel + 4.0) * U * n / 4.0;
        println!(
            "Δ clipped norm: {:.2e} (bound {tol:.2e})",
            (after - n / 4.0).abs()
        );
        assert!((after - n / 4.0).abs() <= tol, "{after} vs {}", n / 4.0);
    }

    /// The device-side coefficient multiplies by exactly the fp32 value the host form used
    /// (max_norm / (norm + 1e-6) in f64, rounded once), and a coefficient ≥ 1 changes nothing.
    #[test]
    fn clipping_on_the_device_is_the_host_scalar_form_bit_for_bit() {
        let (vs, a, b) = toy();
        let flat = FlatParams::new(&vs, Kind::Float).unwrap();
        let x = Tensor::ones([5, 3], (Kind::Float, Device::Cpu));
        let fresh = || {
            flat.clear_grads().unwrap();
            loss(&a, &b, &x).backward();
            flat.grads_list().unwrap()
        };
        let _ = fresh();
        let norm = grad_norm(&flat).unwrap(); // a new tensor: later backwards leave it alone
        for max_norm in [norm.double_value(&[]) / 3.0, 1e9] {
            let before: Vec<Tensor> = fresh().iter().map(Tensor::copy).collect();
            clip_grads(&flat, &norm, max_norm).unwrap();
            let coef = (max_norm / (norm.double_value(&[]) + 1e-6)).min(1.0) as f32;
            for (g, g0) in flat.grads_list().unwrap().iter().zip(&before) {
                assert!(g.equal(&(g0 * Tensor::from(coef))), "max_norm {max_norm}");
                if coef == 1.0 {
                    assert!(g.equal(g0));
                }
            }
        }
    }

    /// A found_inf of 1 leaves parameters and moments bit for bit (and the step count, until
    /// `applied`); a found_inf of 0 is the plain step.
    #[test]
    fn a_step_flagged_non_finite_on_the_device_changes_nothing() {
        let x = Tensor::ones([5, 3], (Kind::Float, Device::Cpu));
        let run = |flags: &[f32]| {
            let (vs, a, b) = toy();
            let flat = FlatParams::new(&vs, Kind::Float).unwrap();
            let mut opt = AdamW::new(&flat, (0.9, 0.95), 1e-8, 0.1);
            let mut snapshots = Vec::new();
            for (t, &flag) in flags.iter().enumerate() {
                flat.clear_grads().unwrap();
                loss(&a, &b, &(&x * (t + 1) as f64)).backward();
                if flag < 0.0 {
                    opt.step(&flat, 0.01).unwrap();
                } else {
                    opt.step_unless(&flat, 0.01, &Tensor::from(flag)).unwrap();
                    if flag == 0.0 {
                        opt.applied();
                    }
                }
                snapshots.push((
                    flat.params.copy(),
                    opt.exp_avg.copy(),
                    opt.exp_avg_sq.copy(),
                    opt.step,
                ));
            }
            snapshots
        };
        let skipped = run(&[0.0, 1.0, 0.0]);
        let (s0, s1) = (&skipped[0], &skipped[1]);
        assert!(s1.0.equal(&s0.0) && s1.1.equal(&s0.1) && s1.2.equal(&s0.2));
        assert_eq!((s0.3, s1.3, skipped[2].3), (1, 1, 2));
        let plain = run(&[-1.0, -1.0]);
        let unflagged = run(&[0.0, 0.0]);
        for (p, u) in plain.iter().zip(&unflagged) {
            assert!(p.0.equal(&u.0) && p.1.equal(&u.1) && p.2.equal(&u.2) && p.3 == u.3);
        }
    }

    #[test]
    fn a_parameter_without_gradient_gets_a_zero_one() {
        let (vs, a, _b) = toy();
        let flat = FlatParams::new(&vs, Kind::Float).unwrap();
        flat.clear_grads().unwrap();
        use tch::nn::Module;
        a.forward(&Tensor::ones([2, 3], (Kind::Float, Device::Cpu)))
            .sum(Kind::Float)
            .backward();
        let grads = flat.grads_list().unwrap();
        let i = flat
            .entries
            .iter()
            .position(|e| e.name == "b.weight")
            .unwrap();
        assert_eq!(grads[i].abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(grad_norm(&flat).unwrap().double_value(&[]) > 0.0);
    }

    #[test]
    fn libtorch_errors_come_back_as_errors_not_panics() {
        let (vs, a, _b) = toy();
        let _flat = FlatParams::new(&vs, Kind::Float).unwrap();
        let wrong = Tensor::zeros([7], (Kind::Float, Device::Cpu));
        let e = cxx::set_grad(&a.ws, Some(&wrong)).unwrap_err();
        assert!(
            e.to_string().contains("set_grad: gradient of shape [7]"),
            "{e}"
        );
        let p = [Tensor::zeros([4], (Kind::Float, Device::Cpu))];
        let g = [Tensor::zeros([4], (Kind::Double, Device::Cpu))];
        let mv = [Tensor::zeros([4], (Kind::Float, Device::Cpu))];
        let mv2 = [Tensor::zeros([4], (Kind::Float, Device::Cpu))];
        let step = Tensor::ones([], (Kind::Float, Device::Cpu));
        let args = cxx::AdamWArgs {
            lr: 0.1,
            betas: (0.9, 0.95),
            weight_decay: 0.0,
            eps: 1e-8,
        };
        let e = cxx::fused_adamw(&p, &g, &mv, &mv2, &step, args, None).unwrap_err();
        assert!(e.to_string().starts_with("libtorch fused_adamw: "), "{e}");
        let e = cxx::fused_adamw(&p, &[], &mv, &mv2, &step, args, None).unwrap_err();
        assert!(e.to_string().contains("list lengths differ"), "{e}");
        let e = cxx::grad_norm(&[]).unwrap_err();
        assert!(e.to_string().contains("no gradients"), "{e}");
    }
}
