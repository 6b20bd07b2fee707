//! TransMLA's RoRoPE (arXiv 2502.07864; fxmeng/TransMLA `partial_rope.py`): concentrating the
//! key heads' rotary part into MLA's one shared rope key.
//!
//! RoPE rotates the pair (dim i, dim i + n/2) of every key head by the same angle t·θ_i. A real
//! G×G mix of the heads' pairs commutes with that rotation, so for each frequency an orthogonal
//! U_i can rotate the G key heads: k'_i = U_i k_i, and each query head folds its share in,
//! q_h·k_{g(h),i} = Σ_j U_i[j, g(h)] (q_h · k'_{j,i}). U_i is the PCA of the heads' pairs over
//! the data: its first component k'_{0,i} carries the most energy and keeps its rotation as
//! the shared `k_rope` pair of frequency i (q_rope of head h: U_i[0, g(h)]·q_{h,i}). The rest,
//! k_{g,i} − U_i[0, g] k'_{0,i}, stays in head g's position-free key (so does every frequency
//! not kept when Dr < n, and the source's unrotated dims): that is the approximation, zero when
//! the components beyond the first are zero (always for G = 1).
//!
//! Notation as in mod.rs; F = n/2 frequencies of the source, K = Dr/2 kept.

use super::source::Source;
use super::Dims;
use tch::Tensor;

/// One layer's keys and queries after RoRoPE, augmented (bias as the last column).
pub(crate) struct Rope {
    /// Queries in MLA's layout, per head `[nope (hs) | rope (Dr)]`, scaled for MLA's softmax
    /// scale: (H·(hs+Dr), E+1).
    pub q: Tensor,
    /// Position-free keys per group: the source keys less what went into `k_rope`, (G·hs, E+1).
    pub k_nope: Tensor,
    /// The shared rope key, (Dr, E+1), rotate-half layout (pair j at dims j and j + Dr/2).
    pub k_rope: Tensor,
    /// Of the moment-weighted key energy in the source's rotated dims, the fraction kept rotated.
    pub energy_kept: f64,
}

/// RoRoPE of one layer under the input moment `moment` (E+1, E+1).
pub(crate) fn split(src: &Source, moment: &Tensor, d: &Dims) -> Rope {
    let (g, hs, e1) = (d.g, d.hs, d.e + 1);
    let (f, k) = (d.n / 2, d.dr / 2);
    let keys = src.k.view([g, hs, e1]);
    // The two dims of every frequency's pair: (F, 2, G, E+1).
    let pairs = Tensor::stack(
        &[keys.narrow(1, 0, f), keys.narrow(1, f, f)],
        0, // (2, G, F, E+1)
    )
    .permute([2, 0, 1, 3]);
    // Per frequency, the heads' second moment summed over the pair's two dims: (F, G, G).
    let m = pairs
        .matmul(moment)
        .matmul(&pairs.transpose(2, 3))
        .sum_dim_intlist(1, false, tch::Kind::Double);
    let total: f64 = m.diagonal(0, 1, 2).sum(tch::Kind::Double).double_value(&[]);
    let kept_freqs =
        Tensor::arange_start_step(0, f, d.stride, (tch::Kind::Int64, tch::Device::Cpu));
    let (eigenvalues, eigenvectors) = m.index_select(0, &kept_freqs).linalg_eigh("L");
    // eigh sorts ascending: the principal component is the last. u: (K, G)
    let u = eigenvectors.select(2, g - 1);
    let kept: f64 = eigenvalues
        .select(1, g - 1)
        .sum(tch::Kind::Double)
        .double_value(&[]);

    let kept_pairs = pairs.index_select(0, &kept_freqs); // (K, 2, G, E+1)
    let u4 = u.view([k, 1, g, 1]);
    // k_rope pair j = Σ_g u_g k_g: (K, 2, E+1) → rows (Dr, E+1) as [first dims; second dims].
    let k_rope = (&kept_pairs * &u4)
        .sum_dim_intlist(2, false, tch::Kind::Double)
        .transpose(0, 1)
        .reshape([d.dr, e1]);
    // Each head's key less its share of k_rope, written back into the kept frequencies' dims.
    let residual = &kept_pairs - &u4 * k_rope.view([2, k, 1, e1]).transpose(0, 1);
    let mut k_nope = keys.copy();
    let rows = |first: bool| &kept_freqs + if first { 0 } else { f };
    for (half, first) in [(0, true), (1, false)] {
        let _ = k_nope.index_copy_(
            1,
            &rows(first),
            &residual.select(1, half).permute([1, 0, 2]),
        );
    }

    // Queries: scaled; nope = all hs dims; rope pair j of head h = u_j[g(h)]·(q_h's pair).
    let per_group = d.h / g;
    let q = (&src.q * d.q_scale).view([d.h, hs, e1]);
    let head_group = Tensor::from_slice(&(0..d.h).map(|h| h / per_group).collect::<Vec<i64>>());
    let u_heads = u.index_select(1, &head_group).transpose(0, 1).unsqueeze(2); // (H, K, 1)
    let q_rope = Tensor::cat(
        &[
            q.index_select(1, &rows(true)) * &u_heads,
            q.index_select(1, &rows(false)) * &u_heads,
        ],
        1,
    ); // (H, Dr, E+1)
    let q = Tensor::cat(&[q, q_rope], 1).reshape([d.h * (hs + d.dr), e1]);
    Rope {
        q,
        k_nope: k_nope.reshape([g * hs, e1]),
        k_rope,
        energy_kept: super::fraction(kept, total),
    }
}
