//! Small building blocks shared by the attention kinds and the GPT: linear layers with
//! litgpt's initialisation, LayerNorm/RMSNorm, the two MLPs, and RoPE.
//!
//! Notation: B batch, T time, H heads, D rotated dims. RoPE is litgpt's (GPT-NeoX) form:
//! the rotated dims are split in two halves, not interleaved.

use crate::config::{GeluApproximate, MlpClass, ModelConfig, NormClass};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// A linear layer initialised as litgpt's `initialize_weights`: weight ~ N(0, std), bias = 0.
pub(crate) fn linear(
    p: nn::Path,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    std: f64,
) -> nn::Linear {
    nn::linear(
        p,
        in_dim as i64,
        out_dim as i64,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: std,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias,
        },
    )
}

/// Weight std for every Linear and Embedding (GPT-NeoX init: sqrt(2 / (5 · n_embd))).
pub(crate) fn init_std(cfg: &ModelConfig) -> f64 {
    (2.0 / 5.0 / cfg.n_embd as f64).sqrt()
}

/// Weight std for the output projections litgpt scales down (CausalSelfAttention.proj and
/// LLaMAMLP.proj): 1 / sqrt(n_embd) / n_layer.
pub(crate) fn small_init_std(cfg: &ModelConfig) -> f64 {
    1.0 / (cfg.n_embd as f64).sqrt() / cfg.n_layer as f64
}

/// LayerNorm (weight + bias) or RMSNorm (weight; computed in fp32 as litgpt).
#[derive(Debug)]
pub(crate) enum Norm {
    Layer {
        weight: Tensor,
        bias: Tensor,
        eps: f64,
        size: i64,
    },
    Rms {
        weight: Tensor,
        eps: f64,
        size: i64,
    },
}

impl Norm {
    pub(crate) fn new(p: nn::Path, kind: NormClass, size: usize, eps: f64) -> Norm {
        let size = size as i64;
        match kind {
            NormClass::LayerNorm => Norm::Layer {
                weight: p.var("weight", &[size], nn::Init::Const(1.0)),
                bias: p.var("bias", &[size], nn::Init::Const(0.0)),
                eps,
                size,
            },
            NormClass::RMSNorm => Norm::Rms {
                weight: p.var("weight", &[size], nn::Init::Const(1.0)),
                eps,
                size,
            },
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Norm::Layer {
                weight,
                bias,
                eps,
                size,
            } => x.layer_norm([*size], Some(weight), Some(bias), *eps, true),
            Norm::Rms { weight, eps, size } => {
                let kind = x.kind();
                x.to_kind(Kind::Float)
                    .rms_norm([*size], Some(&weight.to_kind(Kind::Float)), *eps)
                    .to_kind(kind)
            }
        }
    }
}

/// GptNeoxMLP (fc → GELU → proj) or LLaMAMLP (silu(fc_1) · fc_2 → proj).
#[derive(Debug)]
pub(crate) enum Mlp {
    GptNeox {
        fc: nn::Linear,
        proj: nn::Linear,
        gelu: GeluApproximate,
    },
    Llama {
        fc_1: nn::Linear,
        fc_2: nn::Linear,
        proj: nn::Linear,
    },
}

impl Mlp {
    pub(crate) fn new(p: nn::Path, cfg: &ModelConfig) -> Mlp {
        let (c, i, b, std) = (cfg.n_embd, cfg.intermediate_size(), cfg.bias, init_std(cfg));
        match cfg.mlp_class_name {
            MlpClass::GptNeoxMLP => Mlp::GptNeox {
                fc: linear(&p / "fc", c, i, b, std),
                // litgpt scales only LLaMAMLP.proj, not GptNeoxMLP.proj.
                proj: linear(&p / "proj", i, c, b, std),
                gelu: cfg.gelu_approximate,
            },
            MlpClass::LLaMAMLP => Mlp::Llama {
                fc_1: linear(&p / "fc_1", c, i, b, std),
                fc_2: linear(&p / "fc_2", c, i, b, std),
                proj: linear(&p / "proj", i, c, b, small_init_std(cfg)),
            },
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Mlp::GptNeox { fc, proj, gelu } => proj.forward(&fc.forward(x).gelu(gelu.as_str())),
            Mlp::Llama { fc_1, fc_2, proj } => {
                proj.forward(&(fc_1.forward(x).silu() * fc_2.forward(x)))
            }
        }
    }
}

/// cos/sin tables of RoPE for positions 0..seq_len, each (seq_len, n_elem), fp32.
#[derive(Debug)]
pub(crate) struct RopeCache {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

impl RopeCache {
    /// litgpt `build_rope_cache`: θ_i = base^(−2i/n), angles = pos/condense · θ, repeated twice.
    pub(crate) fn new(
        seq_len: usize,
        n_elem: usize,
        base: f64,
        condense_ratio: usize,
        device: tch::Device,
    ) -> RopeCache {
        let opts = (Kind::Float, device);
        let exponents = Tensor::arange_start_step(0, n_elem as i64, 2, opts) / n_elem as f64;
        let theta = Tensor::pow_scalar(base, &exponents).reciprocal();
        let pos = Tensor::arange(seq_len as i64, opts) / condense_ratio as f64;
        let angles = pos.outer(&theta).repeat([1, 2]); // (T, n_elem)
        RopeCache {
            cos: angles.cos(),
            sin: angles.sin(),
        }
    }

    /// Tables for positions start..start+len, shaped (len, n_elem).
    pub(crate) fn slice(&self, start: i64, len: i64) -> (Tensor, Tensor) {
        (
            self.cos.narrow(0, start, len),
            self.sin.narrow(0, start, len),
        )
    }
}

/// Rotate `x` (…, T, D) with cos/sin (T, D): x·cos + rotate_half(x)·sin, computed in the
/// dtype of the tables (fp32) and cast back, as litgpt's `apply_rope`.
pub(crate) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let d = x.size().last().copied().unwrap_or(0);
    let half = d / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, d - half);
    let rotated = Tensor::cat(&[x2.neg(), x1], -1);
    (x * cos + rotated * sin).to_kind(x.kind())
}

/// Boolean mask (t_new, total) for queries at positions total−t_new.. attending keys 0..total
/// causally: true = attend (torch SDPA semantics).
pub(crate) fn causal_mask(t_new: i64, total: i64, device: tch::Device) -> Tensor {
    let offset = total - t_new;
    let q_pos = Tensor::arange(t_new, (Kind::Int64, device)).unsqueeze(1) + offset;
    let k_pos = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
    k_pos.le_tensor(&q_pos)
}

/// Scaled dot-product attention over (B, H, Tq, D) queries and (B, G, Tk, D) keys/values
/// (G divides H) for queries at the END of the key range: causal without a mask when the
/// ranges coincide, no mask for a single new query, an explicit offset mask otherwise.
pub(crate) fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let (tq, tk) = (q.size()[2], k.size()[2]);
    let gqa = q.size()[1] != k.size()[1];
    if tq == tk {
        Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, true, scale, gqa)
    } else if tq == 1 {
        Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, scale, gqa)
    } else {
        let mask = causal_mask(tq, tk, q.device());
        Tensor::scaled_dot_product_attention(q, k, v, Some(mask), 0.0, false, scale, gqa)
    }
}
