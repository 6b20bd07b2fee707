//! Multi-head Latent Attention (DeepSeek-V2 §2.1), litgpt 0.5.13 `MultiheadLatentAttention`
//! parameter names and layout, plus the compressed cache and the absorbed decode path.
//!
//! Notation: B batch, T time, L cached positions, H heads, Dn/Dr/Dv nope/rope/value head
//! dims, C kv_lora_rank, Cq q_lora_rank.
//!
//! ```text
//! q    = q_b_proj(norm(q_a_proj x))           per head [q_nope Dn | q_rope Dr], q_rope rotated
//! kv_a = kv_a_proj_with_mqa x                 [c_kv C | k_rope Dr], k_rope rotated, one head
//! kv   = kv_b_proj(norm(c_kv))                per head [k_nope Dn | v Dv]
//! y    = proj(SDPA([q_nope|q_rope], [k_nope|k_rope], v, causal, s = 1/sqrt(Dn+Dr)))
//! ```
//! Absorbed (inference): with W_kv_b = per head [W_uk (Dn×C) ; W_uv (Dv×C)] and bias [b_k ; b_v],
//! score_ij = s·((W_ukᵀ q_nope_i)·c_j + q_rope_i·k_rope_j) (q·b_k is the same for every key,
//! so softmax drops it), and Σ_j p_ij v_j = W_uv (Σ_j p_ij c_j) + b_v because Σ_j p_ij = 1.
//! That is MQA over the latent: the heads fold into query rows against one shared key/value.
//!
//! With `MlaDecode::Absorbed` each cached call takes whichever form costs fewer multiply-adds
//! ([`MultiheadLatentAttention::absorbed_is_cheaper`]): a prompt re-expands its latents once
//! (the absorbed form would run T×L attention over the C-wide latent), single-token decode
//! steps and short chunks attend over the latent — as production MLA inference does.

use crate::cache::{self, LayerCache, MlaDecode};
use crate::config::{MlaSpec, ModelConfig};
use crate::layers::{apply_rope, attend, init_std, linear, Norm};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

#[derive(Debug)]
enum QueryProj {
    /// q_a_proj → (q_a_norm) → q_b_proj
    LowRank {
        q_a_proj: nn::Linear,
        q_a_norm: Option<Norm>,
        q_b_proj: nn::Linear,
    },
    /// q_proj (q_lora_rank: null)
    Full { q_proj: nn::Linear },
}

#[derive(Debug)]
pub(crate) struct MultiheadLatentAttention {
    q: QueryProj,
    kv_a_proj_with_mqa: nn::Linear,
    kv_a_norm: Option<Norm>,
    kv_b_proj: nn::Linear,
    proj: nn::Linear,
    n_head: i64,
    dn: i64,
    dr: i64,
    dv: i64,
    c: i64,
    scale: f64,
}

impl MultiheadLatentAttention {
    pub(crate) fn new(p: nn::Path, cfg: &ModelConfig, spec: &MlaSpec) -> Self {
        let std = init_std(cfg);
        let h = cfg.n_head;
        let norm = |name: &str, size: usize| {
            spec.latent_norm
                .map(|kind| Norm::new(&p / name, kind, size, cfg.norm_eps))
        };
        let q = match spec.q_lora_rank {
            Some(r) => QueryProj::LowRank {
                q_a_proj: linear(&p / "q_a_proj", cfg.n_embd, r, spec.down_bias, std),
                q_a_norm: norm("q_a_norm", r),
                q_b_proj: linear(
                    &p / "q_b_proj",
                    r,
                    h * spec.qk_head_dim(),
                    spec.up_bias,
                    std,
                ),
            },
            None => QueryProj::Full {
                q_proj: linear(
                    &p / "q_proj",
                    cfg.n_embd,
                    h * spec.qk_head_dim(),
                    spec.up_bias,
                    std,
                ),
            },
        };
        MultiheadLatentAttention {
            q,
            kv_a_proj_with_mqa: linear(
                &p / "kv_a_proj_with_mqa",
                cfg.n_embd,
                spec.kv_lora_rank + spec.qk_rope_head_dim,
                spec.down_bias,
                std,
            ),
            kv_a_norm: norm("kv_a_norm", spec.kv_lora_rank),
            kv_b_proj: linear(
                &p / "kv_b_proj",
                spec.kv_lora_rank,
                h * (spec.qk_nope_head_dim + spec.v_head_dim),
                spec.up_bias,
                std,
            ),
            // litgpt's initialize_weights scales only CausalSelfAttention.proj, not MLA's.
            proj: linear(
                &p / "proj",
                h * spec.v_head_dim,
                cfg.n_embd,
                spec.up_bias,
                std,
            ),
            n_head: h as i64,
            dn: spec.qk_nope_head_dim as i64,
            dr: spec.qk_rope_head_dim as i64,
            dv: spec.v_head_dim as i64,
            c: spec.kv_lora_rank as i64,
            scale: cfg.attention_scale(),
        }
    }

    /// Queries split per head: q_nope (B, H, T, Dn) and rotated q_rope (B, H, T, Dr).
    fn queries(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let q = match &self.q {
            QueryProj::LowRank {
                q_a_proj,
                q_a_norm,
                q_b_proj,
            } => {
                let c_q = q_a_proj.forward(x);
                let c_q = match q_a_norm {
                    Some(n) => n.forward(&c_q),
                    None => c_q,
                };
                q_b_proj.forward(&c_q)
            }
            QueryProj::Full { q_proj } => q_proj.forward(x),
        };
        let q = q
            .view([b, t, self.n_head, self.dn + self.dr])
            .transpose(1, 2); // (B, H, T, Dn+Dr)
        let parts = q.split_with_sizes([self.dn, self.dr], -1);
        (parts[0].shallow_clone(), apply_rope(&parts[1], cos, sin))
    }

    /// The compressed cache entry of each new position: [norm(c_kv) | RoPE(k_rope)], (B, T, C+Dr).
    fn latent(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let parts = self
            .kv_a_proj_with_mqa
            .forward(x)
            .split_with_sizes([self.c, self.dr], -1);
        let c_kv = match &self.kv_a_norm {
            Some(n) => n.forward(&parts[0]),
            None => parts[0].shallow_clone(),
        };
        Tensor::cat(&[c_kv, apply_rope(&parts[1], cos, sin)], -1)
    }

    /// Naive attention: per-head K/V up-projected from the latents (B, L, C+Dr).
    fn attend_naive(&self, q_nope: &Tensor, q_rope: &Tensor, latent: &Tensor) -> Tensor {
        let (b, l) = (latent.size()[0], latent.size()[1]);
        let (h, dn, dr, dv) = (self.n_head, self.dn, self.dr, self.dv);
        let c_kv = latent.narrow(-1, 0, self.c);
        let k_rope = latent.narrow(-1, self.c, dr).unsqueeze(1); // (B, 1, L, Dr)
        let kv = self
            .kv_b_proj
            .forward(&c_kv)
            .view([b, l, h, dn + dv])
            .transpose(1, 2); // (B, H, L, Dn+Dv)
        let parts = kv.split_with_sizes([dn, dv], -1);
        let k = Tensor::cat(
            &[
                parts[0].shallow_clone(),
                k_rope.expand([b, h, l, dr], false),
            ],
            -1,
        );
        let q = Tensor::cat(&[q_nope, q_rope], -1);
        attend(&q, &k, &parts[1], self.scale) // (B, H, T, Dv)
    }

    /// kv_b_proj's weight as the absorbed path uses it: W_uk (H, Dn, C) and W_uvᵀ (H, C, Dv),
    /// contiguous, so that each step is two batched matmuls without re-layout.
    fn folded_weights(&self) -> (Tensor, Tensor) {
        let (h, dn, dv, c) = (self.n_head, self.dn, self.dv, self.c);
        let w = self.kv_b_proj.ws.detach().view([h, dn + dv, c]);
        (
            w.narrow(1, 0, dn).contiguous(),
            w.narrow(1, dn, dv).transpose(1, 2).contiguous(),
        )
    }

    /// Absorbed attention over the latents (B, L, C+Dr) without per-head K/V; `folded` from
    /// [`Self::folded_weights`].
    fn attend_absorbed(
        &self,
        q_nope: &Tensor,
        q_rope: &Tensor,
        latent: &Tensor,
        folded: &(Tensor, Tensor),
    ) -> Tensor {
        let (b, h, t) = (q_nope.size()[0], self.n_head, q_nope.size()[2]);
        let (dn, dv, c) = (self.dn, self.dv, self.c);
        let l = latent.size()[1];
        let (w_uk, w_uv_t) = folded;
        // (B, H, T, Dn) @ (H, Dn, C) = (B, H, T, C)
        let q_lat = q_nope.matmul(w_uk);
        // Fold heads into query rows: (B, 1, T·H, C+Dr) against one key/value head.
        let q = Tensor::cat(&[q_lat, q_rope.shallow_clone()], -1)
            .transpose(1, 2)
            .reshape([b, 1, t * h, -1]);
        let k = latent.unsqueeze(1); // (B, 1, L, C+Dr)
        let v = latent.narrow(-1, 0, c).unsqueeze(1); // (B, 1, L, C)
        let o_lat = if t == 1 {
            Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                false,
                self.scale,
                false,
            )
        } else {
            // Row r = t·H + h is the query of time t: causal mask per time, repeated per head.
            let mask =
                crate::layers::causal_mask(t, l, q.device()).repeat_interleave_self_int(h, 0, None);
            Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(mask),
                0.0,
                false,
                self.scale,
                false,
            )
        }; // (B, 1, T·H, C)
        let o_lat = o_lat.view([b, t, h, c]).transpose(1, 2); // (B, H, T, C)
        let mut o = o_lat.matmul(w_uv_t); // (B, H, T, C) @ (H, C, Dv) = (B, H, T, Dv)
        if let Some(bias) = &self.kv_b_proj.bs {
            o += bias.view([h, 1, dn + dv]).narrow(2, dn, dv);
        }
        o
    }

    fn project_out(&self, y: &Tensor) -> Tensor {
        // y: (B, H, T, Dv) → (B, T, H·Dv)
        let (b, t) = (y.size()[0], y.size()[2]);
        self.proj
            .forward(&y.transpose(1, 2).reshape([b, t, self.n_head * self.dv]))
    }

    /// Whether `t` new queries over `l` cached latents cost fewer multiply-adds per head in
    /// the absorbed form. Naive: expand every latent, l·C·(Dn+Dv), then attend,
    /// t·l·(Dn+Dr+Dv). Absorbed: fold W_uk into and W_uv out of each query, t·C·(Dn+Dv), then
    /// attend over the latent, t·l·(2C+Dr). A decode step (t = 1) is absorbed once l > 1; a
    /// whole prompt (t = l) never is (that needs 2C < Dn+Dv); a chunk of a few tokens after a
    /// long cache is.
    fn absorbed_is_cheaper(&self, t: i64, l: i64) -> bool {
        let (c, dn, dr, dv) = (self.c, self.dn, self.dr, self.dv);
        let naive = l * c * (dn + dv) + t * l * (dn + dr + dv);
        let absorbed = t * c * (dn + dv) + t * l * (2 * c + dr);
        absorbed < naive
    }

    /// Training / uncached forward (naive form, as litgpt).
    pub(crate) fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let (q_nope, q_rope) = self.queries(x, cos, sin);
        let latent = self.latent(x, cos, sin);
        self.project_out(&self.attend_naive(&q_nope, &q_rope, &latent))
    }

    /// Forward for new tokens at positions `start..`, appending their latents to `cache`.
    pub(crate) fn forward_cached(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: &mut LayerCache,
        start: i64,
    ) -> Tensor {
        let (q_nope, q_rope) = self.queries(x, cos, sin);
        let new = self.latent(x, cos, sin);
        let LayerCache::Latent { kv, folded, .. } = cache else {
            unreachable!("an MLA layer always gets a compressed cache")
        };
        let latent = cache::append(kv, &new, 1, start);
        let (t, l) = (x.size()[1], latent.size()[1]);
        let y = match folded {
            Some(f) if self.absorbed_is_cheaper(t, l) => {
                self.attend_absorbed(&q_nope, &q_rope, &latent, f)
            }
            _ => self.attend_naive(&q_nope, &q_rope, &latent),
        };
        self.project_out(&y)
    }

    pub(crate) fn new_cache(
        &self,
        batch: i64,
        capacity: i64,
        decode: MlaDecode,
        kind: Kind,
        device: tch::Device,
    ) -> LayerCache {
        LayerCache::Latent {
            kv: cache::zeros(&[batch, capacity, self.c + self.dr], kind, device),
            folded: (decode == MlaDecode::Absorbed).then(|| self.folded_weights()),
        }
    }
}
