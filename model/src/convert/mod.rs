//! MHA/GQA → MLA conversion of trained weights (issue 11; the design and its reasons are in
//! docs/design/mha2mla.md). Pure tensor math on litgpt-named weights: no I/O, no data loading
//! (the trainer's `mla convert` feeds it the weights and, optionally, calibration moments).
//!
//! Two steps per layer:
//! * positions ([`rorope`]): TransMLA's RoRoPE. For each kept RoPE frequency, a PCA across the
//!   key heads finds the one direction that keeps its rotation; it becomes that frequency's pair
//!   in MLA's shared `k_rope`, each query head's share of it is folded into its `q_rope`, and
//!   what the key heads hold outside it joins the position-free ("nope") keys;
//! * the latent ([`factor`]): the nope keys of every head and the values are stacked and
//!   factored into `kv_a_proj_with_mqa` (down) and `kv_b_proj` (up): MHA2MLA's joint SVD of the
//!   weights, or TransMLA's PCA of the outputs on calibration data. The queries are factored the
//!   same way when `q_lora_rank` is set. [`layout`] cuts the source's `qkv` into the pieces and
//!   assembles the MLA tensors.
//!
//! The converted model has no latent norms (`latent_norm: false`), nope and value heads of the
//! source's head size, and queries scaled by √((hs+Dr)/hs) for MLA's 1/√(Dn+Dr) softmax scale.
//! Before truncation (rank = the bound) it computes exactly what the "partial-RoPE" source
//! computes (the source with the keys' energy outside each principal component un-rotated);
//! for an MQA source that is the source itself.
//!
//! Notation: E n_embd, H query heads, G key/value heads, hs head size, n rotated dims of the
//! source, Dr rotated dims kept, C kv_lora_rank, Cq q_lora_rank.

mod factor;
mod layout;
mod rorope;
mod source;

use crate::config::{ConfigErrors, LatentAttention, MlaDims, ModelConfig};
use std::collections::HashMap;
use tch::Tensor;

/// How the stacked nope keys and values are factored into the latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// MHA2MLA's SVD_joint: the truncated SVD of the stacked weights, all of Σ on the up side.
    /// Needs no data; the error at rank C is the discarded singular values.
    Weights,
    /// TransMLA: the PCA of the stacked outputs on calibration data, the keys first scaled to
    /// the values' energy so that neither dominates the components kept.
    Activations,
    /// No factorisation: the latent is the nope keys and values themselves (C = 2·G·hs) and
    /// `kv_b_proj` picks each head's rows (TransMLA's first stage). The exact reference that
    /// the truncated forms approximate; not a useful model (its cache is larger than MHA's).
    Identity,
}

/// What to convert into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Latent width C; `None`: the largest that adds information, min(2·G·hs, E) (exact).
    pub kv_lora_rank: Option<usize>,
    /// `Some(Cq)`: factor the queries through a Cq-wide latent too; `None`: a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Rotated dims kept, Dr; `None`: all n of the source. Dr = n/s keeps every s-th frequency.
    pub rope_dims: Option<usize>,
    pub factor: Factor,
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("the source is already MLA (latent_attention is set): there is nothing to convert")]
    AlreadyMla,
    #[error("the source normalises q and k per head (norm_qk): a per-head norm of the keys cannot be factored into a shared latent")]
    NormQk,
    #[error("the source has a q/k/v bias but no output bias (attn_bias without bias): an MLA model carries the query and value biases only with `bias`")]
    BiasLayout,
    #[error(
        "the source rotates no dims (rotary_percentage × head_size = 0): MLA needs a RoPE part"
    )]
    NoRope,
    #[error("--rope-dims {got}: {why}")]
    RopeDims { got: usize, why: String },
    #[error("--kv-lora-rank {got}: {why}")]
    KvRank { got: usize, why: String },
    #[error("--q-lora-rank {got}: {why}")]
    QRank { got: usize, why: String },
    #[error("the activations factorisation needs calibration data")]
    NeedsData,
    #[error("calibration moments: {0}")]
    Moments(String),
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("{name}: shape {got:?}, the source config says {want:?}")]
    Shape {
        name: String,
        got: Vec<i64>,
        want: Vec<i64>,
    },
    #[error("the source config: {0}")]
    Source(ConfigErrors),
    #[error("the converted config: {0}")]
    Target(ConfigErrors),
}

/// The dimensions of one conversion, checked before any tensor is touched.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The resolved source config.
    pub source: ModelConfig,
    /// The resolved config of the converted model.
    pub target: ModelConfig,
    pub factor: Factor,
    pub(crate) dims: Dims,
}

/// Sizes shared by the submodules.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub e: i64,
    pub h: i64,
    pub g: i64,
    pub hs: i64,
    /// Rotated dims of the source.
    pub n: i64,
    /// Rotated dims kept; source frequency `stride·j` becomes frequency j.
    pub dr: i64,
    pub stride: i64,
    pub c: i64,
    pub cq: Option<i64>,
    /// Factor on the queries: the source's softmax scale over the converted one.
    pub q_scale: f64,
    /// Whether the source's qkv has a bias.
    pub bias: bool,
}

impl Dims {
    /// Rows of the stacked nope keys and values, 2·G·hs.
    pub fn joint(&self) -> i64 {
        2 * self.g * self.hs
    }
}

/// `kept` of `total` energy as a fraction (all of nothing is all of it).
pub(crate) fn fraction(kept: f64, total: f64) -> f64 {
    if total > 0.0 {
        kept / total
    } else {
        1.0
    }
}

/// Check `source` and `opts` and derive the converted config.
pub fn plan(source: &ModelConfig, opts: &Options) -> Result<Plan, ConvertError> {
    let source = source.clone().resolve().map_err(ConvertError::Source)?;
    if source.mla().is_some() {
        return Err(ConvertError::AlreadyMla);
    }
    if source.norm_qk {
        return Err(ConvertError::NormQk);
    }
    let bias = source.bias || source.attn_bias;
    if source.attn_bias && !source.bias {
        return Err(ConvertError::BiasLayout);
    }
    let (e, h, g, hs) = (
        source.n_embd,
        source.n_head,
        source.n_query_groups(),
        source.head_size(),
    );
    let n = source.rope_n_elem();
    if n == 0 {
        return Err(ConvertError::NoRope);
    }
    let dr = opts.rope_dims.unwrap_or(n);
    let rope_bad = |why: String| ConvertError::RopeDims { got: dr, why };
    if dr == 0 || !dr.is_multiple_of(2) {
        return Err(rope_bad(
            "RoPE needs an even number of dims, at least 2".into(),
        ));
    }
    if dr > hs {
        return Err(rope_bad(format!("larger than the head ({hs} dims)")));
    }
    if dr > n || !n.is_multiple_of(dr) {
        let widths: Vec<String> = (1..=n / 2)
            .filter(|s| n.is_multiple_of(*s) && (n / s) % 2 == 0)
            .map(|s| (n / s).to_string())
            .collect();
        return Err(rope_bad(format!(
            "the source rotates {n} dims per head; keeping every s-th of its frequencies gives one of {}",
            widths.join(", ")
        )));
    }
    let joint = 2 * g * hs;
    let c_max = joint.min(e);
    let c = match (opts.factor, opts.kv_lora_rank) {
        (Factor::Identity, _) => joint,
        (_, None) => c_max,
        (_, Some(0)) => {
            return Err(ConvertError::KvRank {
                got: 0,
                why: "the latent needs at least one dim".into(),
            })
        }
        (_, Some(c)) if c > c_max => {
            return Err(ConvertError::KvRank {
                got: c,
                why: format!("at most {c_max}: the joint key/value projection has rank ≤ min(2·n_query_groups·head_size, n_embd) = min({joint}, {e})"),
            })
        }
        (_, Some(c)) => c,
    };
    let q_rows = h * (hs + dr);
    let cq_max = q_rows.min(e);
    if let Some(cq) = opts.q_lora_rank {
        if cq == 0 || cq > cq_max {
            return Err(ConvertError::QRank {
                got: cq,
                why: format!("between 1 and {cq_max}: the query projection has rank ≤ min(n_head·(head_size+rope dims), n_embd) = min({q_rows}, {e})"),
            });
        }
    }
    let mut target = source.clone();
    target.name = format!("{}-mla", source.name);
    target.hf_config.clear();
    target.n_query_groups = Some(h);
    target.attn_bias = bias; // kv_a carries k_rope's bias
    target.latent_attention = Some(LatentAttention::Dims(MlaDims {
        q_lora_rank: opts.q_lora_rank,
        kv_lora_rank: c,
        qk_rope_head_dim: dr,
        qk_nope_head_dim: hs,
        v_head_dim: hs,
        latent_norm: false,
    }));
    let target = target.resolve().map_err(ConvertError::Target)?;
    let q_scale = source.attention_scale() / target.attention_scale();
    let i = |v: usize| v as i64;
    Ok(Plan {
        dims: Dims {
            e: i(e),
            h: i(h),
            g: i(g),
            hs: i(hs),
            n: i(n),
            dr: i(dr),
            stride: i(n / dr),
            c: i(c),
            cq: opts.q_lora_rank.map(i),
            q_scale,
            bias,
        },
        source,
        target,
        factor: opts.factor,
    })
}

/// The second moments E[x̃ x̃ᵀ], x̃ = [x; 1], of every layer's attention input, accumulated
/// over calibration batches ([`crate::Gpt::attention_inputs`]), in fp64 on the CPU.
pub struct Calibration {
    sums: Vec<Tensor>,
    tokens: u64,
}

impl Calibration {
    pub fn new(n_layer: usize, n_embd: usize) -> Calibration {
        let e1 = n_embd as i64 + 1;
        Calibration {
            sums: (0..n_layer)
                .map(|_| Tensor::zeros([e1, e1], source::F64))
                .collect(),
            tokens: 0,
        }
    }

    /// Add one batch: `inputs[l]` is layer l's attention input (…, E).
    pub fn add(&mut self, inputs: &[Tensor]) {
        for (sum, x) in self.sums.iter_mut().zip(inputs) {
            let e = *x.size().last().unwrap_or(&0);
            let x = x
                .reshape([-1, e])
                .to_device(tch::Device::Cpu)
                .to_kind(tch::Kind::Double);
            let x = Tensor::cat(&[&x, &Tensor::ones([x.size()[0], 1], source::F64)], 1);
            *sum += x.tr().matmul(&x);
        }
        if let Some(x) = inputs.first() {
            let e = *x.size().last().unwrap_or(&1);
            self.tokens += (x.numel() as i64 / e.max(1)) as u64;
        }
    }

    /// Positions seen.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The moments, one (E+1, E+1) per layer.
    pub fn moments(&self) -> Vec<Tensor> {
        let n = self.tokens.max(1) as f64;
        self.sums.iter().map(|s| s / n).collect()
    }
}

/// What the conversion kept, per layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerReport {
    /// Of the keys' energy in the source's rotated dims, the fraction that stays rotated (in
    /// `k_rope`); the rest loses its position dependence.
    pub rope_energy_kept: f64,
    /// Of the stacked nope keys' and values' energy (weights: squared singular values;
    /// activations: the balanced output variance), the fraction the latent keeps.
    pub kv_energy_kept: f64,
    /// The same for the queries when they are factored.
    pub q_energy_kept: Option<f64>,
}

/// A converted model.
pub struct Converted {
    /// Weights by litgpt name, fp32 on the CPU.
    pub weights: HashMap<String, Tensor>,
    pub layers: Vec<LayerReport>,
}

impl Plan {
    /// Convert `weights` (the source's, by litgpt name). `moments[l]`: the second moment
    /// E[x̃ x̃ᵀ] of layer l's attention input with a 1 appended, x̃ = [x; 1], (E+1, E+1) —
    /// from calibration data. Without them the input is taken as white (identity moment),
    /// which the activations factorisation refuses.
    pub fn convert(
        &self,
        weights: &HashMap<String, Tensor>,
        moments: Option<&[Tensor]>,
    ) -> Result<Converted, ConvertError> {
        let d = self.dims;
        let n_layer = self.source.n_layer;
        if let Some(m) = moments {
            if m.len() != n_layer {
                return Err(ConvertError::Moments(format!(
                    "{} layers, the model has {n_layer}",
                    m.len()
                )));
            }
            if let Some(bad) = m.iter().find(|m| m.size() != [d.e + 1, d.e + 1]) {
                return Err(ConvertError::Moments(format!(
                    "shape {:?}, expected [{}, {}]",
                    bad.size(),
                    d.e + 1,
                    d.e + 1
                )));
            }
        } else if self.factor == Factor::Activations {
            return Err(ConvertError::NeedsData);
        }
        let mut out: HashMap<String, Tensor> = weights
            .iter()
            .filter(|(name, _)| !source::is_source_qkv(name))
            .map(|(name, t)| (name.clone(), t.to_kind(tch::Kind::Float).copy()))
            .collect();
        let mut layers = Vec::with_capacity(n_layer);
        tch::no_grad(|| -> Result<(), ConvertError> {
            for l in 0..n_layer {
                let src = source::Source::read(weights, l, &d)?;
                let moment = match moments {
                    Some(m) => m[l].to_kind(tch::Kind::Double).to_device(tch::Device::Cpu),
                    None => Tensor::eye(d.e + 1, source::F64),
                };
                let rope = rorope::split(&src, &moment, &d);
                let kv = factor::kv(&src, &rope, &moment, &d, self.factor);
                let q =
                    d.cq.map(|cq| factor::low_rank(&rope.q, &moment, cq, self.factor));
                layers.push(LayerReport {
                    rope_energy_kept: rope.energy_kept,
                    kv_energy_kept: kv.energy_kept,
                    q_energy_kept: q.as_ref().map(|q| q.energy_kept),
                });
                layout::write(&mut out, l, &d, &rope, &kv, q.as_ref());
            }
            Ok(())
        })?;
        Ok(Converted {
            weights: out,
            layers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(groups: usize) -> ModelConfig {
        ModelConfig {
            n_embd: 32,
            n_head: 4,
            n_query_groups: Some(groups),
            rotary_percentage: 0.5,
            ..ModelConfig::default()
        }
    }

    fn opts() -> Options {
        Options {
            kv_lora_rank: None,
            q_lora_rank: None,
            rope_dims: None,
            factor: Factor::Weights,
        }
    }

    #[test]
    fn the_plan_defaults_to_the_full_rank_and_every_rotated_dim() {
        let p = plan(&cfg(2), &opts()).unwrap();
        // hs 8, n 4; joint 2·2·8 = 32 = E.
        assert_eq!((p.dims.c, p.dims.dr, p.dims.stride), (32, 4, 1));
        let spec = p.target.mla().unwrap();
        assert_eq!(
            (spec.qk_nope_head_dim, spec.v_head_dim, spec.latent_norm),
            (8, 8, None)
        );
        assert!((p.dims.q_scale - (12.0f64 / 8.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn bad_ranks_and_rope_dims_are_refused_with_the_bound() {
        let with = |f: fn(&mut Options)| {
            let mut o = opts();
            f(&mut o);
            plan(&cfg(2), &o).unwrap_err().to_string()
        };
        assert!(with(|o| o.kv_lora_rank = Some(33)).contains("at most 32"));
        assert!(with(|o| o.kv_lora_rank = Some(0)).contains("at least one"));
        assert!(with(|o| o.q_lora_rank = Some(100)).contains("between 1 and 32"));
        assert!(with(|o| o.rope_dims = Some(3)).contains("even"));
        assert!(with(|o| o.rope_dims = Some(10)).contains("larger than the head"));
        assert!(with(|o| o.rope_dims = Some(6)).contains("one of 4, 2"));
        let mla = ModelConfig {
            latent_attention: Some(LatentAttention::Flag(true)),
            n_embd: 48,
            ..cfg(4)
        };
        assert!(matches!(plan(&mla, &opts()), Err(ConvertError::AlreadyMla)));
        let qk = ModelConfig {
            norm_qk: true,
            ..cfg(4)
        };
        assert!(matches!(plan(&qk, &opts()), Err(ConvertError::NormQk)));
    }
}
