//! Where the conversion's tensors come from: the source's fused litgpt `qkv`
//! (`[q (H·hs) | k (G·hs) | v (G·hs)]` rows, head h reading key/value group h / (H/G)) cut into
//! per-layer pieces, and the row order of `kv_b_proj` over them.
//!
//! Weights are carried "augmented", (rows, E+1) with the bias as the last column (zero when
//! the source has none), so that a moment E[x̃ x̃ᵀ] of x̃ = [x; 1] weighs weight and bias alike.
//!
//! Notation as in mod.rs. Not here: writing the MLA tensors (layout.rs).

use super::{ConvertError, Dims};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

pub(crate) const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

/// The source tensors this module replaces.
pub(crate) fn is_source_qkv(name: &str) -> bool {
    name.starts_with("transformer.h.")
        && (name.ends_with(".attn.qkv.weight") || name.ends_with(".attn.qkv.bias"))
}

/// One layer's source projections, augmented, fp64 on the CPU.
pub(crate) struct Source {
    /// (H·hs, E+1)
    pub q: Tensor,
    /// (G·hs, E+1)
    pub k: Tensor,
    /// (G·hs, E+1)
    pub v: Tensor,
}

impl Source {
    pub(crate) fn read(
        weights: &HashMap<String, Tensor>,
        layer: usize,
        d: &Dims,
    ) -> Result<Source, ConvertError> {
        let rows = (d.h + 2 * d.g) * d.hs;
        let get = |name: String, want: Vec<i64>| -> Result<Tensor, ConvertError> {
            let t = weights
                .get(&name)
                .ok_or_else(|| ConvertError::MissingTensor(name.clone()))?;
            if t.size() != want {
                return Err(ConvertError::Shape {
                    name,
                    got: t.size(),
                    want,
                });
            }
            Ok(t.to_device(Device::Cpu).to_kind(Kind::Double))
        };
        let prefix = format!("transformer.h.{layer}.attn.qkv");
        let w = get(format!("{prefix}.weight"), vec![rows, d.e])?;
        let b = if d.bias {
            get(format!("{prefix}.bias"), vec![rows])?
        } else {
            Tensor::zeros([rows], F64)
        };
        let aug = Tensor::cat(&[w, b.unsqueeze(1)], 1); // (rows, E+1)
        let parts = aug.split_with_sizes([d.h * d.hs, d.g * d.hs, d.g * d.hs], 0);
        Ok(Source {
            q: parts[0].shallow_clone(),
            k: parts[1].shallow_clone(),
            v: parts[2].shallow_clone(),
        })
    }
}

/// Row indices into the stacked `[k_nope (G·hs); v (G·hs)]` that give `kv_b_proj`'s layout:
/// per head h `[k_nope of group g(h) (hs) | v of group g(h) (hs)]`, (H·2·hs).
pub(crate) fn kv_b_rows(d: &Dims) -> Tensor {
    let per_group = d.h / d.g;
    let mut rows = Vec::with_capacity((d.h * 2 * d.hs) as usize);
    for h in 0..d.h {
        let g = h / per_group;
        rows.extend((0..d.hs).map(|i| g * d.hs + i));
        rows.extend((0..d.hs).map(|i| (d.g + g) * d.hs + i));
    }
    Tensor::from_slice(&rows)
}
