//! The GPT: token embedding, `n_layer` blocks (parallel or sequential residual), final norm,
//! untied LM head. Parameter paths equal litgpt 0.5.13 state-dict keys
//! (`transformer.h.0.attn.qkv.weight`, `lm_head.weight`, …), so weights move between the
//! two without a rename table.
//!
//! Notation: B batch, T time, C n_embd, V padded vocab.

use crate::attention::CausalSelfAttention;
use crate::cache::{InferenceCache, MlaDecode};
use crate::config::{AttentionKind, ConfigErrors, ModelConfig};
use crate::layers::{init_std, linear, Mlp, Norm, RopeCache};
use crate::mla::MultiheadLatentAttention;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(#[from] ConfigErrors),
    #[error("sequence of {len} tokens exceeds the block size {block_size}")]
    TooLong { len: i64, block_size: i64 },
    #[error("cache holds {len} of {capacity} positions; {new} more do not fit")]
    CacheFull { len: i64, capacity: i64, new: i64 },
}

#[derive(Debug)]
enum Attention {
    Standard(CausalSelfAttention),
    Latent(MultiheadLatentAttention),
}

#[derive(Debug)]
struct Block {
    norm_1: Norm,
    norm_2: Option<Norm>,
    attn: Attention,
    mlp: Mlp,
    parallel_residual: bool,
}

impl Block {
    fn new(p: nn::Path, cfg: &ModelConfig) -> Block {
        let attn = match cfg.attention_kind() {
            AttentionKind::Mla(spec) => {
                Attention::Latent(MultiheadLatentAttention::new(&p / "attn", cfg, &spec))
            }
            _ => Attention::Standard(CausalSelfAttention::new(&p / "attn", cfg)),
        };
        let shared = cfg.shared_attention_norm;
        Block {
            norm_1: Norm::new(&p / "norm_1", cfg.norm_class_name, cfg.n_embd, cfg.norm_eps),
            norm_2: (!shared)
                .then(|| Norm::new(&p / "norm_2", cfg.norm_class_name, cfg.n_embd, cfg.norm_eps)),
            attn,
            mlp: Mlp::new(&p / "mlp", cfg),
            parallel_residual: cfg.parallel_residual,
        }
    }

    /// The uncached attention of normed inputs (B, T, C) at positions 0..T.
    fn attention(&self, xn: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        match &self.attn {
            Attention::Standard(a) => a.forward(xn, cos, sin),
            Attention::Latent(a) => a.forward(xn, cos, sin),
        }
    }

    /// Residual wiring around an attention output computed by `attn` from norm_1(x).
    fn forward_with(&self, x: &Tensor, attn: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
        let x_normed = self.norm_1.forward(x);
        let a = attn(&x_normed);
        if self.parallel_residual {
            let m_in = match &self.norm_2 {
                Some(n) => n.forward(x),
                None => x_normed,
            };
            let x = a + x;
            self.mlp.forward(&m_in) + x
        } else {
            let x = a + x;
            let m_in = match &self.norm_2 {
                Some(n) => n.forward(&x),
                None => unreachable!("shared_attention_norm requires parallel_residual"),
            };
            self.mlp.forward(&m_in) + x
        }
    }
}

/// One block's uncached forward over positions 0..T with the RoPE tables (T, n).
fn block_forward(block: &Block, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    block.forward_with(x, |xn| block.attention(xn, cos, sin))
}

/// A litgpt-compatible GPT. Build it under a `VarStore` root path.
#[derive(Debug)]
pub struct Gpt {
    cfg: ModelConfig,
    wte: nn::Embedding,
    blocks: Vec<Block>,
    ln_f: Norm,
    lm_head: nn::Linear,
    rope: RopeCache,
}

impl Gpt {
    /// Create the parameters under `root` (weights initialised as litgpt's pretrain script:
    /// N(0, sqrt(2/5C)), attention/LLaMA-MLP output projections N(0, 1/sqrt(C)/n_layer), zero
    /// biases, unit norms). The config is validated (and derived fields filled) first.
    pub fn new(root: &nn::Path, cfg: &ModelConfig) -> Result<Gpt, ModelError> {
        let cfg = cfg.clone().resolve()?;
        let std = init_std(&cfg);
        let tr = root / "transformer";
        let wte = nn::embedding(
            &tr / "wte",
            cfg.padded_vocab_size() as i64,
            cfg.n_embd as i64,
            nn::EmbeddingConfig {
                ws_init: nn::Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
                ..Default::default()
            },
        );
        let h = &tr / "h";
        let blocks = (0..cfg.n_layer).map(|i| Block::new(&h / i, &cfg)).collect();
        let ln_f = Norm::new(&tr / "ln_f", cfg.norm_class_name, cfg.n_embd, cfg.norm_eps);
        let lm_head = if cfg.tie_embeddings {
            // One tensor for both uses (litgpt's `wte.weight = lm_head.weight`): the gradients
            // of both add up in it, and the store holds it once, as the embedding.
            nn::Linear {
                ws: wte.ws.shallow_clone(),
                bs: cfg
                    .lm_head_bias
                    .then(|| (root / "lm_head").zeros("bias", &[cfg.padded_vocab_size() as i64])),
            }
        } else {
            linear(
                root / "lm_head",
                cfg.n_embd,
                cfg.padded_vocab_size(),
                cfg.lm_head_bias,
                std,
            )
        };
        let rope = RopeCache::new(
            cfg.block_size,
            cfg.rope_n_elem(),
            cfg.rope_base,
            cfg.rope_condense_ratio,
            root.device(),
        );
        Ok(Gpt {
            cfg,
            wte,
            blocks,
            ln_f,
            lm_head,
            rope,
        })
    }

    /// The resolved config this model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device the parameters live on.
    pub fn device(&self) -> tch::Device {
        self.lm_head.ws.device()
    }

    fn embed(&self, idx: &Tensor) -> Tensor {
        let x = self.wte.forward(idx); // (B, T, C)
        if self.cfg.scale_embeddings {
            x * (self.cfg.n_embd as f64).sqrt()
        } else {
            x
        }
    }

    /// Hidden states after the final norm, (B, T, C), for token ids (B, T), T ≤ block_size.
    /// Panics if T > block_size: callers check with [`Gpt::check_len`].
    pub fn hidden(&self, idx: &Tensor) -> Tensor {
        let t = idx.size()[1];
        let (cos, sin) = self.rope.slice(0, t);
        let mut x = self.embed(idx);
        for block in &self.blocks {
            x = block_forward(block, &x, &cos, &sin);
        }
        self.ln_f.forward(&x)
    }

    // The trunk of `hidden` in pieces, embedding → blocks → final norm, for a backward run
    // in stages (the trainer's activation recomputation): the same operations in the same
    // order, so the pieces chained give `hidden`'s values.

    /// The scaled token embedding (B, T, C) of token ids (B, T).
    pub fn embed_tokens(&self, idx: &Tensor) -> Tensor {
        self.embed(idx)
    }

    /// Blocks in the trunk.
    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Block `i` on hidden states (B, T, C) at positions 0..T. Panics if i ≥ n_blocks or
    /// T > block_size.
    pub fn block(&self, i: usize, x: &Tensor) -> Tensor {
        let (cos, sin) = self.rope.slice(0, x.size()[1]);
        block_forward(&self.blocks[i], x, &cos, &sin)
    }

    /// The final norm of the last block's output.
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        self.ln_f.forward(x)
    }

    /// Each block's attention input, norm_1(x) (B, T, C), for token ids (B, T): what the
    /// MHA → MLA conversion calibrates on ([`crate::convert::Calibration`]). Run under
    /// `tch::no_grad`. Panics if T > block_size, as [`Gpt::hidden`].
    pub fn attention_inputs(&self, idx: &Tensor) -> Vec<Tensor> {
        let t = idx.size()[1];
        let (cos, sin) = self.rope.slice(0, t);
        let mut x = self.embed(idx);
        let mut inputs = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            x = block.forward_with(&x, |xn| {
                inputs.push(xn.shallow_clone());
                block.attention(xn, &cos, &sin)
            });
        }
        inputs
    }

    /// Logits (…, V) for hidden states (…, C).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        self.lm_head.forward(hidden)
    }

    /// Logits (B, T, V) for token ids (B, T).
    pub fn forward(&self, idx: &Tensor) -> Tensor {
        self.logits(&self.hidden(idx))
    }

    pub fn check_len(&self, len: i64) -> Result<(), ModelError> {
        let block_size = self.cfg.block_size as i64;
        if len > block_size {
            return Err(ModelError::TooLong { len, block_size });
        }
        Ok(())
    }

    /// Empty caches for `batch` sequences of up to `capacity` positions (≤ block_size).
    /// `decode` selects naive or absorbed attention for MLA layers (ignored otherwise).
    pub fn new_cache(
        &self,
        batch: i64,
        capacity: i64,
        decode: MlaDecode,
        kind: Kind,
    ) -> Result<InferenceCache, ModelError> {
        self.check_len(capacity)?;
        let device = self.device();
        let layers = self
            .blocks
            .iter()
            .map(|b| match &b.attn {
                Attention::Standard(a) => a.new_cache(batch, capacity, kind, device),
                Attention::Latent(a) => a.new_cache(batch, capacity, decode, kind, device),
            })
            .collect();
        Ok(InferenceCache::new(layers, capacity))
    }

    /// Logits (B, T, V) for new tokens (B, T) placed after the positions already in `cache`,
    /// whose keys/values (or latents) are appended. Run under `tch::no_grad`.
    pub fn forward_cached(
        &self,
        idx: &Tensor,
        cache: &mut InferenceCache,
    ) -> Result<Tensor, ModelError> {
        self.forward_cached_from(idx, cache, 0)
    }

    /// [`Self::forward_cached`] returning only the last position's logits (B, 1, V): what
    /// sampling needs, without the (B, T, V) logits of a whole prompt.
    pub fn forward_cached_last(
        &self,
        idx: &Tensor,
        cache: &mut InferenceCache,
    ) -> Result<Tensor, ModelError> {
        self.forward_cached_from(idx, cache, idx.size()[1] - 1)
    }

    /// Cached forward returning the logits of positions `first..` of `idx`.
    fn forward_cached_from(
        &self,
        idx: &Tensor,
        cache: &mut InferenceCache,
        first: i64,
    ) -> Result<Tensor, ModelError> {
        let t = idx.size()[1];
        let start = cache.len;
        if start + t > cache.capacity {
            return Err(ModelError::CacheFull {
                len: start,
                capacity: cache.capacity,
                new: t,
            });
        }
        let (cos, sin) = self.rope.slice(start, t);
        let mut x = self.embed(idx);
        for (block, layer_cache) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = block.forward_with(&x, |xn| match &block.attn {
                Attention::Standard(a) => a.forward_cached(xn, &cos, &sin, layer_cache, start),
                Attention::Latent(a) => a.forward_cached(xn, &cos, &sin, layer_cache, start),
            });
        }
        cache.len = start + t;
        Ok(self.logits(&self.ln_f.forward(&x.narrow(1, first, t - first))))
    }
}
