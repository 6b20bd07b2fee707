//! Low-rank factorisations W ≈ up · down of the projections that the latents replace.
//!
//! * [`Factor::Weights`], MHA2MLA's SVD_joint (arXiv 2502.14837; JT-Ushio/MHA2MLA
//!   `patch_func.py`): W = U Σ Vᵀ, down = V_rᵀ, up = U_r Σ_r. By Eckart–Young no rank-r
//!   product is closer to W in the Frobenius norm; the error is the discarded Σ.
//! * [`Factor::Activations`], TransMLA (arXiv 2502.07864; fxmeng/TransMLA `lora_qkv.py`): the
//!   PCA of the outputs y = W x on calibration data, Cov = W E[x xᵀ] Wᵀ, top-r eigenvectors R:
//!   down = Rᵀ W, up = R — the rank-r product closest to W on the data's inputs. For the
//!   keys/values, the key rows are first scaled by 1/α, α² = E‖k‖²/E‖v‖², so that the
//!   components kept serve both (and undone in `up`).
//!
//! At r = rank(W) both are exact. Biases are not factored: the nope keys' bias only adds a
//! constant to each query's scores (softmax ignores it) and is dropped; the values' bias goes
//! to `kv_b_proj`'s bias (exact, as the attention weights sum to one); the queries' to
//! `q_b_proj`'s.
//!
//! Notation as in mod.rs.

use super::rorope::Rope;
use super::source::{kv_b_rows, Source, F64};
use super::{Dims, Factor};
use tch::{Kind, Tensor};

/// W (rows, E) ≈ up (rows, r) · down (r, E).
pub(crate) struct LowRank {
    pub down: Tensor,
    pub up: Tensor,
    pub energy_kept: f64,
}

/// The latent of one layer: `kv_a_proj_with_mqa`'s latent rows and `kv_b_proj`.
pub(crate) struct Kv {
    /// (C, E)
    pub down: Tensor,
    /// Per head `[k_nope (hs) | v (hs)]` from the latent: (H·2·hs, C).
    pub up: Tensor,
    /// (H·2·hs): zero on the keys, the source's value bias on the values.
    pub up_bias: Tensor,
    pub energy_kept: f64,
}

fn trace(t: &Tensor) -> f64 {
    t.diagonal(0, 0, 1).sum(Kind::Double).double_value(&[])
}

/// Factor `w` (rows, E) at rank `r`; `sigma` = E[x xᵀ] (E, E); `row_scale` (rows) weighs the
/// rows in the activations PCA.
fn factorize(
    w: &Tensor,
    sigma: &Tensor,
    r: i64,
    factor: Factor,
    row_scale: Option<&Tensor>,
) -> LowRank {
    match factor {
        Factor::Activations => {
            let rows = w.size()[0];
            let scale = match row_scale {
                Some(s) => s.shallow_clone(),
                None => Tensor::ones([rows], F64),
            };
            let scaled = w * scale.unsqueeze(1);
            let cov = scaled.matmul(sigma).matmul(&scaled.tr());
            let (eigenvalues, eigenvectors) = cov.linalg_eigh("L"); // ascending
            let top = eigenvectors.narrow(1, rows - r, r); // (rows, r)
            let eigenvalues = eigenvalues.clamp_min(0.0);
            let total = eigenvalues.sum(Kind::Double).double_value(&[]);
            let kept = eigenvalues
                .narrow(0, rows - r, r)
                .sum(Kind::Double)
                .double_value(&[]);
            LowRank {
                down: top.tr().matmul(&scaled),
                up: top / scale.unsqueeze(1),
                energy_kept: super::fraction(kept, total),
            }
        }
        Factor::Weights | Factor::Identity => {
            let (u, s, v) = w.svd(true, true); // reduced: U (rows, k), S (k), V (E, k)
            let energy = s.square();
            let total = energy.sum(Kind::Double).double_value(&[]);
            let kept = energy.narrow(0, 0, r).sum(Kind::Double).double_value(&[]);
            LowRank {
                down: v.narrow(1, 0, r).tr(),
                up: u.narrow(1, 0, r) * s.narrow(0, 0, r),
                energy_kept: super::fraction(kept, total),
            }
        }
    }
}

/// The queries' factorisation at rank `r`: `q` augmented (rows, E+1), `moment` (E+1, E+1).
/// The identity factor has no meaning for the queries; they are then factored by weights.
pub(crate) fn low_rank(q: &Tensor, moment: &Tensor, r: i64, factor: Factor) -> LowRank {
    let e = q.size()[1] - 1;
    let sigma = moment.narrow(0, 0, e).narrow(1, 0, e);
    factorize(&q.narrow(1, 0, e), &sigma, r, factor, None)
}

/// The latent of one layer: the nope keys (after RoRoPE) and the values of every group,
/// stacked (2·G·hs, E), factored at rank C and laid out per head.
pub(crate) fn kv(src: &Source, rope: &Rope, moment: &Tensor, d: &Dims, factor: Factor) -> Kv {
    let e = d.e;
    let sigma = moment.narrow(0, 0, e).narrow(1, 0, e);
    let keys = rope.k_nope.narrow(1, 0, e);
    let values = src.v.narrow(1, 0, e);
    let joint = Tensor::cat(&[&keys, &values], 0); // (2·G·hs, E)
    let lr = match factor {
        Factor::Identity => LowRank {
            down: joint.shallow_clone(),
            up: Tensor::eye(d.joint(), F64),
            energy_kept: 1.0,
        },
        Factor::Weights => factorize(&joint, &sigma, d.c, factor, None),
        Factor::Activations => {
            let energy = |w: &Tensor| trace(&w.matmul(&sigma).matmul(&w.tr()));
            let (ek, ev) = (energy(&keys), energy(&values));
            let alpha = if ek > 0.0 && ev > 0.0 {
                (ek / ev).sqrt()
            } else {
                1.0
            };
            let gh = d.g * d.hs;
            let scale = Tensor::cat(
                &[
                    Tensor::full([gh], 1.0 / alpha, F64),
                    Tensor::ones([gh], F64),
                ],
                0,
            );
            factorize(&joint, &sigma, d.c, factor, Some(&scale))
        }
    };
    let rows = kv_b_rows(d);
    let joint_bias = Tensor::cat(&[Tensor::zeros([d.g * d.hs], F64), src.v.select(1, e)], 0);
    Kv {
        down: lr.down,
        up: lr.up.index_select(0, &rows),
        up_bias: joint_bias.index_select(0, &rows),
        energy_kept: lr.energy_kept,
    }
}
