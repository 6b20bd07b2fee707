//! Causal self-attention with grouped K/V heads: MHA (G = H), GQA (1 < G < H), MQA (G = 1).
//! litgpt 0.5.13 `CausalSelfAttention`: one fused `qkv` projection laid out
//! `[q (H·hs) | k (G·hs) | v (G·hs)]`, optional per-head q/k norms, RoPE on the first
//! `rope_n_elem` dims of each head, SDPA with an explicit scale.
//!
//! Notation: B batch, T time, H query heads, G key/value heads, hs head size.

use crate::cache::{self, LayerCache};
use crate::config::ModelConfig;
use crate::layers::{apply_rope, attend, init_std, linear, small_init_std, Norm};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

#[derive(Debug)]
pub(crate) struct CausalSelfAttention {
    qkv: nn::Linear,
    proj: nn::Linear,
    norm_q: Option<Norm>,
    norm_k: Option<Norm>,
    n_head: i64,
    n_query_groups: i64,
    head_size: i64,
    rope_n_elem: i64,
    scale: f64,
}

impl CausalSelfAttention {
    pub(crate) fn new(p: nn::Path, cfg: &ModelConfig) -> Self {
        let (h, g, hs) = (cfg.n_head, cfg.n_query_groups(), cfg.head_size());
        let std = init_std(cfg);
        let qkv_bias = cfg.bias || cfg.attn_bias;
        let (norm_q, norm_k) = if cfg.norm_qk {
            (
                Some(Norm::new(
                    &p / "norm_q",
                    cfg.norm_class_name,
                    hs,
                    cfg.norm_eps,
                )),
                Some(Norm::new(
                    &p / "norm_k",
                    cfg.norm_class_name,
                    hs,
                    cfg.norm_eps,
                )),
            )
        } else {
            (None, None)
        };
        CausalSelfAttention {
            qkv: linear(&p / "qkv", cfg.n_embd, (h + 2 * g) * hs, qkv_bias, std),
            proj: linear(
                &p / "proj",
                h * hs,
                cfg.n_embd,
                cfg.bias,
                small_init_std(cfg),
            ),
            norm_q,
            norm_k,
            n_head: h as i64,
            n_query_groups: g as i64,
            head_size: hs as i64,
            rope_n_elem: cfg.rope_n_elem() as i64,
            scale: cfg.attention_scale(),
        }
    }

    /// q (B, H, T, hs), k and v (B, G, T, hs), RoPE applied with the given tables (T, n).
    fn qkv(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (h, g, hs) = (self.n_head, self.n_query_groups, self.head_size);
        let parts = self
            .qkv
            .forward(x)
            .split_with_sizes([h * hs, g * hs, g * hs], -1);
        let q = parts[0].view([b, t, h, hs]).transpose(1, 2); // (B, H, T, hs)
        let k = parts[1].view([b, t, g, hs]).transpose(1, 2); // (B, G, T, hs)
        let v = parts[2].view([b, t, g, hs]).transpose(1, 2); // (B, G, T, hs)
        let (q, k) = match (&self.norm_q, &self.norm_k) {
            (Some(nq), Some(nk)) => (nq.forward(&q), nk.forward(&k)),
            _ => (q, k),
        };
        let n = self.rope_n_elem;
        let rope = |x: &Tensor| {
            if n == 0 {
                return x.shallow_clone();
            }
            let roped = apply_rope(&x.narrow(-1, 0, n), cos, sin);
            Tensor::cat(&[roped, x.narrow(-1, n, hs - n)], -1)
        };
        (rope(&q), rope(&k), v)
    }

    fn project_out(&self, y: &Tensor) -> Tensor {
        // y: (B, H, T, hs) → (B, T, H·hs)
        let (b, t) = (y.size()[0], y.size()[2]);
        self.proj.forward(
            &y.transpose(1, 2)
                .reshape([b, t, self.n_head * self.head_size]),
        )
    }

    /// Training / uncached forward over a whole sequence.
    pub(crate) fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let (q, k, v) = self.qkv(x, cos, sin);
        self.project_out(&attend(&q, &k, &v, self.scale))
    }

    /// Forward for new tokens at positions `start..`, appending their K/V to `cache`.
    pub(crate) fn forward_cached(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: &mut LayerCache,
        start: i64,
    ) -> Tensor {
        let (q, k, v) = self.qkv(x, cos, sin);
        let LayerCache::Kv { k: kbuf, v: vbuf } = cache else {
            unreachable!("a standard attention layer always gets a K/V cache")
        };
        let k = cache::append(kbuf, &k, 2, start);
        let v = cache::append(vbuf, &v, 2, start);
        self.project_out(&attend(&q, &k, &v, self.scale))
    }

    pub(crate) fn new_cache(
        &self,
        batch: i64,
        capacity: i64,
        kind: Kind,
        device: tch::Device,
    ) -> LayerCache {
        let shape = [batch, self.n_query_groups, capacity, self.head_size];
        LayerCache::Kv {
            k: cache::zeros(&shape, kind, device),
            v: cache::zeros(&shape, kind, device),
        }
    }
}
