//! Inference caches. Standard attention keeps per-layer K and V, (B, G, T, hs) each, after
//! RoPE. MLA keeps the compressed cache: per position `[norm(c_kv) | RoPE(k_rope)]`,
//! (B, T, kv_lora_rank + qk_rope_head_dim), one shared rope key for all heads — stored
//! already rotated at its own position, so it is never re-rotated (the seed's decode bug).
//!
//! Not here: the attention math that reads them (attention.rs, mla.rs).

use tch::{Device, Kind, Tensor};

/// How MLA attends over its compressed cache at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MlaDecode {
    /// Up-project the cached latents to per-head K/V every step (what training computes).
    Naive,
    /// Absorb W_uk into the query and W_uv after attention: MQA over the latent, no
    /// per-head K/V materialised — wherever that costs fewer multiply-adds (decode steps,
    /// short chunks); a whole prompt is re-expanded once instead (mla.rs).
    #[default]
    Absorbed,
}

/// Cache of one layer.
#[derive(Debug)]
pub enum LayerCache {
    Kv {
        k: Tensor,
        v: Tensor,
    },
    Latent {
        kv: Tensor,
        /// Set for [`MlaDecode::Absorbed`]: kv_b_proj's weight split and laid out once per cache,
        /// W_uk (H, Dn, C) and W_uvᵀ (H, C, Dv), both contiguous (not counted as cache bytes:
        /// they are a view of the weights in another layout).
        folded: Option<(Tensor, Tensor)>,
    },
}

impl LayerCache {
    pub fn bytes(&self) -> i64 {
        let bytes = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        match self {
            LayerCache::Kv { k, v } => bytes(k) + bytes(v),
            LayerCache::Latent { kv, .. } => bytes(kv),
        }
    }
}

/// Caches for every layer of one batch of sequences, and how many positions they hold.
#[derive(Debug)]
pub struct InferenceCache {
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) len: i64,
    pub(crate) capacity: i64,
}

impl InferenceCache {
    pub(crate) fn new(layers: Vec<LayerCache>, capacity: i64) -> Self {
        InferenceCache {
            layers,
            len: 0,
            capacity,
        }
    }
    /// Positions already cached (the position of the next token).
    pub fn len(&self) -> i64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> i64 {
        self.capacity
    }
    /// Bytes allocated by the caches of all layers.
    pub fn bytes(&self) -> i64 {
        self.layers.iter().map(LayerCache::bytes).sum()
    }
    /// Forget every position (the buffers are reused).
    pub fn reset(&mut self) {
        self.len = 0;
    }
}

pub(crate) fn zeros(shape: &[i64], kind: Kind, device: Device) -> Tensor {
    Tensor::zeros(shape, (kind, device))
}

/// Write `new` at positions start.. along `dim` of `buf` and return the filled prefix.
pub(crate) fn append(buf: &Tensor, new: &Tensor, dim: i64, start: i64) -> Tensor {
    let t_new = new.size()[dim as usize];
    buf.narrow(dim, start, t_new).copy_(new);
    buf.narrow(dim, 0, start + t_new)
}
