//! Optimisation over ONE flat buffer: every parameter of the model is re-pointed
//! (`set_data`) at a slice of a flat parameter tensor, and every gradient at a slice of a flat
//! gradient tensor (FSDP's flat_param idea). Zeroing, clipping, all-reduce and AdamW are then a
//! handful of large kernels instead of several per parameter.
//!
//! Layout: parameters with ≥ 2 dims (weights, embeddings) first, then 1-D ones (biases, norms),
//! each group in name order, so decoupled weight decay applies to one contiguous prefix.
//! Also here: the LR schedule (linear warmup, cosine to min_lr, by optimizer step) and
//! global-norm clipping. Not here: the loop that calls them (train.rs).

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
}

/// The model's parameters and gradients as two flat tensors.
#[derive(Debug)]
pub struct FlatParams {
    pub params: Tensor,
    pub grads: Tensor,
    pub entries: Vec<FlatEntry>,
    /// Elements [0, n_decay) are ≥2-D weights (weight decay applies).
    pub n_decay: i64,
}

impl FlatParams {
    /// Move every trainable variable of `vs` into one flat buffer of `kind` (values kept),
    /// and give each a gradient that is a view into one flat gradient buffer.
    pub fn new(vs: &VarStore, kind: Kind) -> FlatParams {
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
        let params = Tensor::zeros([offset], (kind, device));
        let grads = Tensor::zeros([offset], (kind, device));
        tch::no_grad(|| {
            for e in &entries {
                let mut view = params
                    .narrow(0, e.offset, e.numel())
                    .view(e.shape.as_slice());
                view.copy_(&vars[&e.name]);
                let mut var = vars[&e.name].shallow_clone();
                var.set_data(&view);
            }
        });
        // Materialise every .grad with a zero backward, then re-point it at the flat buffer;
        // autograd accumulates in place into an existing grad, so it stays a view.
        let zero: Tensor = entries
            .iter()
            .map(|e| vars[&e.name].sum(Kind::Float) * 0.0)
            .fold(Tensor::zeros([], (Kind::Float, device)), |a, b| a + b);
        zero.backward();
        for e in &entries {
            let mut g = vars[&e.name].grad();
            g.set_data(
                &grads
                    .narrow(0, e.offset, e.numel())
                    .view(e.shape.as_slice()),
            );
        }
        let _ = grads.shallow_clone().zero_();
        FlatParams {
            params,
            grads,
            entries,
            n_decay,
        }
    }

    pub fn numel(&self) -> i64 {
        self.params.numel() as i64
    }

    pub fn zero_grad(&self) {
        let _ = self.grads.shallow_clone().zero_();
    }

    /// The flat slice of one parameter, shaped.
    pub fn param_view(&self, e: &FlatEntry) -> Tensor {
        self.params
            .narrow(0, e.offset, e.numel())
            .view(e.shape.as_slice())
    }
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

/// AdamW (decoupled weight decay, torch's formulation) over the flat buffers. Moments are fp32.
/// The update runs in place with one scratch buffer: no per-step allocation of model-sized
/// temporaries (each pass is one large elementwise kernel).
#[derive(Debug)]
pub struct AdamW {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub step: u64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    scratch: Tensor,
}

impl AdamW {
    pub fn new(flat: &FlatParams, betas: (f64, f64), eps: f64, weight_decay: f64) -> AdamW {
        let opts = (Kind::Float, flat.params.device());
        AdamW {
            exp_avg: Tensor::zeros([flat.numel()], opts),
            exp_avg_sq: Tensor::zeros([flat.numel()], opts),
            step: 0,
            betas,
            eps,
            weight_decay,
            scratch: Tensor::zeros([flat.numel()], opts),
        }
    }

    /// One update with learning rate `lr` from the gradients in `flat.grads`:
    /// m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
    /// p ← p·(1 − lr·wd) (≥2-D weights) − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε).
    pub fn step(&mut self, flat: &FlatParams, lr: f64) {
        tch::no_grad(|| {
            self.step += 1;
            let (b1, b2) = self.betas;
            let g = flat.grads.to_kind(Kind::Float); // no copy for fp32 grads
            let mut p32 = if flat.params.kind() == Kind::Float {
                flat.params.shallow_clone()
            } else {
                flat.params.to_kind(Kind::Float)
            };
            if self.weight_decay != 0.0 && flat.n_decay > 0 {
                let _ = p32
                    .narrow(0, 0, flat.n_decay)
                    .g_mul_scalar_(1.0 - lr * self.weight_decay);
            }
            let _ = self.exp_avg.lerp_(&g, 1.0 - b1);
            let s = &mut self.scratch;
            s.copy_(&g);
            let _ = s.g_mul_(&g); // g²
            let _ = self.exp_avg_sq.lerp_(s, 1.0 - b2);
            let bias1 = 1.0 - b1.powi(self.step as i32);
            let bias2 = 1.0 - b2.powi(self.step as i32);
            let _ = self.exp_avg_sq.sqrt_out(s);
            let _ = s.g_mul_scalar_(1.0 / bias2.sqrt());
            let _ = s.g_add_scalar_(self.eps); // denominator
            let _ = s.reciprocal_();
            let _ = s.g_mul_(&self.exp_avg);
            let _ = s.g_mul_scalar_(lr / bias1); // the step
            let _ = p32.g_sub_(s);
            if flat.params.kind() != Kind::Float {
                flat.params.shallow_clone().copy_(&p32);
            }
        });
    }
}

/// Global L2 norm of the gradients (fp32 scalar tensor, not synchronised to the host).
pub fn grad_norm(flat: &FlatParams) -> Tensor {
    flat.grads.to_kind(Kind::Float).norm()
}

/// Scale gradients so their global norm is at most `max_norm` (norm given, as torch's
/// clip_grad_norm_: coefficient max_norm / (norm + 1e-6), applied only when < 1).
pub fn clip_grads(flat: &FlatParams, norm: f64, max_norm: f64) {
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        let _ = flat.grads.shallow_clone().g_mul_scalar_(coef);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device};

    #[test]
    fn warmup_then_cosine_to_min_lr() {
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

    fn toy() -> (VarStore, nn::Linear, nn::Linear) {
        let vs = VarStore::new(Device::Cpu);
        tch::manual_seed(0);
        let a = nn::linear(vs.root() / "a", 3, 4, Default::default());
        let b = nn::linear(vs.root() / "b", 4, 2, Default::default());
        (vs, a, b)
    }

    fn loss(a: &nn::Linear, b: &nn::Linear, x: &Tensor) -> Tensor {
        use tch::nn::Module;
        b.forward(&a.forward(x).tanh()).square().sum(Kind::Float)
    }

    #[test]
    fn parameters_and_gradients_are_views_of_the_flat_buffers() {
        let (vs, a, b) = toy();
        let before: Vec<f32> = Vec::try_from(a.ws.flatten(0, -1)).unwrap();
        let flat = FlatParams::new(&vs, Kind::Float);
        assert_eq!(flat.numel(), 3 * 4 + 4 + 4 * 2 + 2);
        assert_eq!(flat.n_decay, 12 + 8, "weights first");
        let after: Vec<f32> = Vec::try_from(a.ws.flatten(0, -1)).unwrap();
        assert_eq!(before, after, "values survive the move");
        let x = Tensor::ones([5, 3], (Kind::Float, Device::Cpu));
        loss(&a, &b, &x).backward();
        loss(&a, &b, &x).backward(); // accumulates in place
        let g_flat = flat.grads.abs().sum(Kind::Float).double_value(&[]);
        assert!(g_flat > 0.0, "gradients landed in the flat buffer");
        let entry = flat.entries.iter().find(|e| e.name == "b.bias").unwrap();
        let via_flat = flat.grads.narrow(0, entry.offset, entry.numel());
        assert!(via_flat.allclose(&b.bs.as_ref().unwrap().grad(), 0.0, 0.0, false));
        flat.zero_grad();
        assert_eq!(b.ws.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
        // Writing the flat buffer moves the parameters.
        let _ = flat.params.shallow_clone().fill_(0.5);
        assert_eq!(a.ws.mean(Kind::Float).double_value(&[]), 0.5);
    }

    #[test]
    fn adamw_matches_the_reference_formula_and_decays_only_weights() {
        let (vs, a, b) = toy();
        let flat = FlatParams::new(&vs, Kind::Float);
        let x = Tensor::ones([5, 3], (Kind::Float, Device::Cpu));
        let p0 = flat.params.copy();
        loss(&a, &b, &x).backward();
        let g = flat.grads.copy();
        let mut opt = AdamW::new(&flat, (0.9, 0.95), 1e-8, 0.1);
        opt.step(&flat, 0.01);
        // Step 1: m̂ = g, v̂ = g², update = lr·g/(|g| + eps); decay on the weight prefix only.
        let decay = Tensor::ones([flat.numel()], (Kind::Float, Device::Cpu));
        let _ = decay.narrow(0, 0, flat.n_decay).fill_(1.0 - 0.01 * 0.1);
        let expected = &p0 * &decay - (&g / (g.abs() + 1e-8)) * 0.01;
        assert!(flat.params.allclose(&expected, 1e-6, 1e-7, false));
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let (vs, a, b) = toy();
        let flat = FlatParams::new(&vs, Kind::Float);
        loss(&a, &b, &Tensor::ones([5, 3], (Kind::Float, Device::Cpu))).backward();
        let n = grad_norm(&flat).double_value(&[]);
        clip_grads(&flat, n, n / 4.0);
        let after = grad_norm(&flat).double_value(&[]);
        assert!((after - n / 4.0).abs() < 1e-4 * n, "{after} vs {}", n / 4.0);
    }
}
