//! `ModelConfig`: the litgpt `Config` schema (field names, defaults and derivation rules of
//! litgpt 0.5.13 `config.py`) for the architectures mla builds: GPT with MHA/GQA/MQA or MLA.
//!
//! Not here: reading YAML (trainer's `config` module owns the YAML crate) and the named
//! registry (`registry.rs`). litgpt keys mla does not implement (sliding windows, MoE,
//! soft-capping, …) are accepted only at their default value so that configs saved by
//! litgpt still load; any other value is a validation error naming the key.
//!
//! MLA: `latent_attention` is either `true` (the seed's shorthand, see [`LatentAttention`])
//! or a mapping with DeepSeek names (litgpt 0.5.13 semantics).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// One problem found while validating a config: the key (relative to `model_config`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem of one config, reported at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigIssue>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum NormClass {
    #[default]
    LayerNorm,
    RMSNorm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum MlpClass {
    #[default]
    GptNeoxMLP,
    LLaMAMLP,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GeluApproximate {
    #[default]
    None,
    Tanh,
}

impl GeluApproximate {
    pub fn as_str(self) -> &'static str {
        match self {
            GeluApproximate::None => "none",
            GeluApproximate::Tanh => "tanh",
        }
    }
}

/// MLA dimensions with DeepSeek/HF names (the `latent_attention:` mapping form).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlaDims {
    /// Rank of the query compression; `null` means a plain `q_proj` (DeepSeek-V2-Lite style).
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_rope_head_dim: usize,
    pub qk_nope_head_dim: usize,
    pub v_head_dim: usize,
    /// mla's own key (litgpt has no such field): `false` leaves out the RMSNorms on the latents,
    /// which a model converted from MHA/GQA by a factorisation computes without (issue 11).
    /// Default true; written only when false, so the mapping stays litgpt's otherwise.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub latent_norm: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// The `latent_attention` key: `true`/`false`, or the DeepSeek-named mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentAttention {
    /// `true`: the seed's MLA — q_lora_rank = n_embd/2, kv_lora_rank = 2·n_embd/3,
    /// rope = nope = head_size/2, v = head_size, no bias in any MLA linear, latent norms
    /// (of `norm_class_name`) only when `norm_qk`. `false`: ordinary attention.
    Flag(bool),
    /// Mapping (litgpt 0.5.13): RMSNorm on both latents; bias on q_b/kv_b/proj per `bias`,
    /// on q_a/kv_a per `attn_bias`.
    Dims(MlaDims),
}

impl Serialize for LatentAttention {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LatentAttention::Flag(b) => s.serialize_bool(*b),
            LatentAttention::Dims(d) => d.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for LatentAttention {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = LatentAttention;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`true`, `false`, or a mapping with q_lora_rank, kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(LatentAttention::Flag(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                MlaDims::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(LatentAttention::Dims)
            }
        }
        d.deserialize_any(V)
    }
}

/// `latent_attention`: absent, null and `false` are all ordinary attention (None).
fn latent_or_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<LatentAttention>, D::Error> {
    Ok(match Option::<LatentAttention>::deserialize(d)? {
        None | Some(LatentAttention::Flag(false)) => None,
        some => some,
    })
}

/// MLA as the model builds it: dimensions plus which optional pieces exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaSpec {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_rope_head_dim: usize,
    pub qk_nope_head_dim: usize,
    pub v_head_dim: usize,
    /// Bias on the down projections (q_a_proj, kv_a_proj_with_mqa).
    pub down_bias: bool,
    /// Bias on q_b_proj (or q_proj), kv_b_proj and the output proj.
    pub up_bias: bool,
    /// Norm on the latents c_q and c_kv, and its kind.
    pub latent_norm: Option<NormClass>,
}

impl MlaSpec {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
    /// Values per position and layer in the compressed cache: `[c_kv | k_rope]`.
    pub fn compressed_cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// Which attention a config builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    Mha,
    Gqa { n_query_groups: usize },
    Mqa,
    Mla(MlaSpec),
}

impl AttentionKind {
    pub fn name(&self) -> &'static str {
        match self {
            AttentionKind::Mha => "MHA",
            AttentionKind::Gqa { .. } => "GQA",
            AttentionKind::Mqa => "MQA",
            AttentionKind::Mla(_) => "MLA",
        }
    }
}

fn d_block_size() -> usize {
    4096
}
fn d_n_layer() -> usize {
    16
}
fn d_n_embd() -> usize {
    4096
}
fn d_vocab_size() -> usize {
    50254
}
fn d_padding_multiple() -> usize {
    512
}
fn d_norm_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_n_head() -> usize {
    32
}
fn d_rope_base() -> f64 {
    10000.0
}
fn d_rotary_percentage() -> f64 {
    0.25
}
fn d_one() -> usize {
    1
}

/// litgpt's `Config`, restricted to what mla builds. Field names, defaults and derivations
/// follow litgpt 0.5.13 so that its YAML (and its saved `model_config.yaml`) loads unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hf_config: BTreeMap<String, String>,
    #[serde(default = "d_block_size")]
    pub block_size: usize,
    #[serde(default = "d_n_layer")]
    pub n_layer: usize,
    #[serde(default = "d_n_embd")]
    pub n_embd: usize,
    #[serde(default = "d_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "d_padding_multiple")]
    pub padding_multiple: usize,
    /// Derived when absent: `vocab_size` rounded up to `padding_multiple`.
    #[serde(default)]
    pub padded_vocab_size: Option<usize>,
    #[serde(default)]
    pub norm_class_name: NormClass,
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    /// Per-head q/k norms (MHA/GQA/MQA); for `latent_attention: true`, norms on the latents.
    #[serde(default)]
    pub norm_qk: bool,
    #[serde(default = "d_true")]
    pub parallel_residual: bool,
    #[serde(default)]
    pub shared_attention_norm: bool,
    #[serde(default = "d_n_head")]
    pub n_head: usize,
    /// Derived when absent: `n_embd / n_head`.
    #[serde(default)]
    pub head_size: Option<usize>,
    /// `n_head` = MHA, 1 = MQA, in between = GQA. Derived when absent: `n_head`.
    #[serde(default)]
    pub n_query_groups: Option<usize>,
    #[serde(default)]
    pub attn_bias: bool,
    /// Attention scale is 1/sqrt(this) when set, else 1/sqrt(q/k head dim).
    #[serde(default)]
    pub attention_scores_scalar: Option<usize>,
    #[serde(default = "d_rope_base")]
    pub rope_base: f64,
    /// Fraction of each q/k head that is rotated (MHA/GQA/MQA; MLA uses qk_rope_head_dim).
    #[serde(default = "d_rotary_percentage")]
    pub rotary_percentage: f64,
    #[serde(default = "d_one")]
    pub rope_condense_ratio: usize,
    /// Derived when absent (GptNeoxMLP): `4 · n_embd`.
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    #[serde(default = "d_true")]
    pub bias: bool,
    #[serde(default)]
    pub mlp_class_name: MlpClass,
    #[serde(default)]
    pub gelu_approximate: GeluApproximate,
    #[serde(default)]
    pub scale_embeddings: bool,
    #[serde(default)]
    pub lm_head_bias: bool,
    /// The LM head reuses the input embedding's matrix (one parameter). Not a litgpt `Config`
    /// field but its `train.tie_embeddings`, so never read from or written to `model_config`:
    /// the run config sets it from its train section.
    #[serde(skip)]
    pub tie_embeddings: bool,
    /// MLA when set. `false` reads as absent and is never written: litgpt takes absent, null
    /// or a mapping, so a config mla writes for ordinary attention loads in litgpt unchanged.
    #[serde(
        default,
        deserialize_with = "latent_or_none",
        skip_serializing_if = "Option::is_none"
    )]
    pub latent_attention: Option<LatentAttention>,

    // litgpt keys accepted only at their default (mla does not implement them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_qk_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_attention_norm: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_mlp_norm: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_1: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_2: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_interleave: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_indices: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_logit_softcapping: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_adjustments: Option<BTreeMap<String, f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_indices: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe_intermediate_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_expert: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_expert_per_token: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_shared_expert: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_expert_groups: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_topk_groups: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_topk_scores_per_group: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_k_dense_replace: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed_scaling_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        // Every field has a serde default, so an empty mapping is the litgpt default config.
        serde::de::Deserialize::deserialize(serde::de::value::MapDeserializer::<
            '_,
            std::iter::Empty<(String, String)>,
            serde::de::value::Error,
        >::new(std::iter::empty()))
        .unwrap_or_else(|_| unreachable!("all ModelConfig fields have defaults"))
    }
}

fn round_up(n: usize, k: usize) -> usize {
    n.div_ceil(k) * k
}

impl ModelConfig {
    /// Check every rule and fill the derived fields (as litgpt's `__post_init__`).
    /// All problems are reported at once; keys are relative to `model_config`.
    pub fn resolve(mut self) -> Result<ModelConfig, ConfigErrors> {
        let mut issues = Vec::new();
        let mut bad = |key: &str, message: String| {
            issues.push(ConfigIssue {
                key: key.to_string(),
                message,
            })
        };
        self.fill_derived(&mut bad);
        self.check_ranges(&mut bad);
        self.check_attention(&mut bad);
        self.check_unsupported(&mut bad);
        if issues.is_empty() {
            Ok(self)
        } else {
            Err(ConfigErrors(issues))
        }
    }

    /// Sizes at least 1, and the derived fields litgpt fills (head_size, padded_vocab_size,
    /// n_query_groups, intermediate_size) where they are not set.
    fn fill_derived(&mut self, bad: &mut impl FnMut(&str, String)) {
        for (key, value) in [
            ("n_layer", self.n_layer),
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
            ("vocab_size", self.vocab_size),
            ("block_size", self.block_size),
            ("padding_multiple", self.padding_multiple),
            ("rope_condense_ratio", self.rope_condense_ratio),
        ] {
            if value == 0 {
                bad(key, "must be at least 1".into());
            }
        }
        if self.n_head > 0 && self.head_size.is_none() {
            if !self.n_embd.is_multiple_of(self.n_head) {
                bad(
                    "n_embd",
                    format!(
                        "n_embd ({}) must be divisible by n_head ({}) unless head_size is set",
                        self.n_embd, self.n_head
                    ),
                );
            } else {
                self.head_size = Some(self.n_embd / self.n_head);
            }
        }
        if self.head_size == Some(0) {
            bad("head_size", "must be at least 1".into());
        }
        match self.padded_vocab_size {
            None if self.padding_multiple > 0 => {
                self.padded_vocab_size = Some(round_up(self.vocab_size, self.padding_multiple))
            }
            Some(p) => {
                if p == 0 {
                    bad("padded_vocab_size", "must be at least 1".into());
                }
                self.vocab_size = self.vocab_size.min(p);
            }
            None => {}
        }
        match self.n_query_groups {
            Some(0) => bad("n_query_groups", "must be at least 1".into()),
            Some(g) if !self.n_head.is_multiple_of(g) => bad(
                "n_query_groups",
                format!(
                    "n_head ({}) must be divisible by n_query_groups ({g})",
                    self.n_head
                ),
            ),
            Some(_) => {}
            None => self.n_query_groups = Some(self.n_head),
        }
        if self.intermediate_size.is_none() {
            match self.mlp_class_name {
                MlpClass::GptNeoxMLP => self.intermediate_size = Some(4 * self.n_embd),
                MlpClass::LLaMAMLP => bad(
                    "intermediate_size",
                    "must be set when mlp_class_name is LLaMAMLP".into(),
                ),
            }
        }
    }

    /// Every float a finite number in its range, and the flags that need one another.
    fn check_ranges(&self, bad: &mut impl FnMut(&str, String)) {
        // Every float must be a finite number in range: `.inf`/`.nan` in YAML would give a
        // model of NaNs that trains "fine" (issue 14).
        let positive = [
            ("norm_eps", Some(self.norm_eps)),
            ("rope_base", Some(self.rope_base)),
            (
                "attention_logit_softcapping",
                self.attention_logit_softcapping,
            ),
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("rope_local_base_freq", self.rope_local_base_freq),
            ("routed_scaling_factor", self.routed_scaling_factor),
        ];
        for (key, value) in positive {
            if let Some(v) = value.filter(|v| !(v.is_finite() && *v > 0.0)) {
                bad(key, format!("must be a positive finite number, got {v}"));
            }
        }
        for (k, v) in self.rope_adjustments.iter().flatten() {
            if !v.is_finite() {
                bad(
                    &format!("rope_adjustments.{k}"),
                    format!("must be a finite number, got {v}"),
                );
            }
        }
        if !(0.0..=1.0).contains(&self.rotary_percentage) {
            bad(
                "rotary_percentage",
                format!("must be in [0, 1], got {}", self.rotary_percentage),
            );
        }
        if self.shared_attention_norm && !self.parallel_residual {
            bad(
                "shared_attention_norm",
                "requires parallel_residual: true (as litgpt)".into(),
            );
        }
    }

    /// The attention's shapes: latent attention's dims, and even RoPE dimensions.
    fn check_attention(&self, bad: &mut impl FnMut(&str, String)) {
        match self.latent_attention {
            Some(LatentAttention::Flag(true)) | Some(LatentAttention::Dims(_)) => {
                if self.n_query_groups.is_some_and(|g| g != self.n_head) {
                    bad(
                        "n_query_groups",
                        format!(
                            "latent attention needs n_query_groups == n_head ({}), got {}",
                            self.n_head,
                            self.n_query_groups.unwrap_or_default()
                        ),
                    );
                }
                if let Some(LatentAttention::Dims(d)) = self.latent_attention {
                    for (key, value) in [
                        ("kv_lora_rank", d.kv_lora_rank),
                        ("qk_rope_head_dim", d.qk_rope_head_dim),
                        ("qk_nope_head_dim", d.qk_nope_head_dim),
                        ("v_head_dim", d.v_head_dim),
                    ] {
                        if value == 0 {
                            bad(
                                &format!("latent_attention.{key}"),
                                "must be at least 1".into(),
                            );
                        }
                    }
                    if d.q_lora_rank == Some(0) {
                        bad(
                            "latent_attention.q_lora_rank",
                            "must be at least 1 (or null for a plain q_proj)".into(),
                        );
                    }
                    if d.qk_rope_head_dim % 2 != 0 {
                        bad(
                            "latent_attention.qk_rope_head_dim",
                            format!("RoPE needs an even dimension, got {}", d.qk_rope_head_dim),
                        );
                    }
                } else if let Some(hs) = self.head_size {
                    if hs % 2 != 0 {
                        bad(
                        "head_size",
                        format!("latent_attention: true splits each head in two halves (rope, nope); head_size {hs} is odd"),
                    );
                    } else if (hs / 2) % 2 != 0 {
                        bad(
                        "head_size",
                        format!("latent_attention: true rotates head_size/2 = {} dims; RoPE needs an even dimension", hs / 2),
                    );
                    }
                }
            }
            _ => {
                if let Some(hs) = self.head_size {
                    let n = self.rope_n_elem_for(hs);
                    if !n.is_multiple_of(2) {
                        bad(
                        "rotary_percentage",
                        format!(
                            "rotary_percentage {} × head_size {hs} = {n} rotated dims; RoPE needs an even dimension",
                            self.rotary_percentage
                        ),
                    );
                    }
                }
            }
        }
    }

    fn check_unsupported(&self, bad: &mut impl FnMut(&str, String)) {
        let mut unsupported = |key: &str, set: bool| {
            if set {
                bad(key, "is a litgpt option mla does not implement; remove it or leave it at its default".into());
            }
        };
        unsupported(
            "norm_qk_type",
            self.norm_qk_type.as_deref().is_some_and(|t| t != "default"),
        );
        unsupported(
            "post_attention_norm",
            self.post_attention_norm == Some(true),
        );
        unsupported("post_mlp_norm", self.post_mlp_norm == Some(true));
        unsupported("norm_1", self.norm_1 == Some(false));
        unsupported("norm_2", self.norm_2 == Some(false));
        unsupported("rope_interleave", self.rope_interleave == Some(true));
        unsupported("sliding_window_size", self.sliding_window_size.is_some());
        unsupported(
            "sliding_window_indices",
            self.sliding_window_indices.is_some(),
        );
        unsupported(
            "attention_logit_softcapping",
            self.attention_logit_softcapping.is_some(),
        );
        unsupported(
            "final_logit_softcapping",
            self.final_logit_softcapping.is_some(),
        );
        unsupported("rope_adjustments", self.rope_adjustments.is_some());
        unsupported("rope_local_base_freq", self.rope_local_base_freq.is_some());
        unsupported("rope_indices", self.rope_indices.is_some());
        unsupported(
            "moe_intermediate_size",
            self.moe_intermediate_size.is_some(),
        );
        unsupported("n_expert", self.n_expert.is_some_and(|n| n > 0));
        unsupported(
            "n_expert_per_token",
            self.n_expert_per_token.is_some_and(|n| n > 0),
        );
        unsupported("n_shared_expert", self.n_shared_expert.is_some());
        unsupported("n_expert_groups", self.n_expert_groups.is_some());
        unsupported("n_topk_groups", self.n_topk_groups.is_some());
        unsupported(
            "n_topk_scores_per_group",
            self.n_topk_scores_per_group.is_some(),
        );
        unsupported(
            "first_k_dense_replace",
            self.first_k_dense_replace.is_some(),
        );
        unsupported(
            "routed_scaling_factor",
            self.routed_scaling_factor.is_some_and(|f| f != 1.0),
        );
        unsupported("norm_topk_prob", self.norm_topk_prob == Some(true));
    }

    fn rope_n_elem_for(&self, head_size: usize) -> usize {
        // litgpt: int(rotary_percentage * head_size)
        (self.rotary_percentage * head_size as f64) as usize
    }

    // Accessors for derived values. They are meaningful on a resolved config (`resolve`),
    // where the derived fields are set; on an unresolved one they fall back to litgpt's rules.

    pub fn head_size(&self) -> usize {
        self.head_size
            .unwrap_or_else(|| self.n_embd / self.n_head.max(1))
    }
    pub fn n_query_groups(&self) -> usize {
        self.n_query_groups.unwrap_or(self.n_head)
    }
    pub fn padded_vocab_size(&self) -> usize {
        self.padded_vocab_size
            .unwrap_or_else(|| round_up(self.vocab_size, self.padding_multiple.max(1)))
    }
    pub fn intermediate_size(&self) -> usize {
        self.intermediate_size.unwrap_or(4 * self.n_embd)
    }

    /// The fields of two resolved configs that make their models compute differently, as
    /// `(key, self's value, other's value)`: weights of one loaded into the other would run,
    /// or fail on shapes, but not compute what they were trained to. Names and `hf_config`
    /// are not compared; neither is `vocab_size` below the padded size (it masks nothing).
    pub fn differences(&self, other: &ModelConfig) -> Vec<(&'static str, String, String)> {
        let mut out = Vec::new();
        let mut cmp = |key: &'static str, a: String, b: String| {
            if a != b {
                out.push((key, a, b));
            }
        };
        macro_rules! field {
            ($($f:ident),*) => {$(
                cmp(stringify!($f), format!("{:?}", self.$f), format!("{:?}", other.$f));
            )*};
        }
        field!(
            block_size,
            n_layer,
            n_embd,
            norm_class_name,
            norm_eps,
            parallel_residual,
            shared_attention_norm,
            n_head,
            attn_bias,
            rope_base,
            rope_condense_ratio,
            bias,
            mlp_class_name,
            gelu_approximate,
            scale_embeddings,
            lm_head_bias,
            attention_scores_scalar
        );
        // An MLA takes its rope dims and latent norms from its spec alone: rotary_percentage and
        // norm_qk change its computation only through it.
        match (self.mla(), other.mla()) {
            (Some(a), Some(b)) => {
                if a != b {
                    field!(latent_attention);
                    if self.latent_attention == other.latent_attention {
                        field!(norm_qk);
                    }
                }
            }
            _ => {
                field!(latent_attention, rotary_percentage, norm_qk);
            }
        }
        // Derived when unset: compared as resolved.
        macro_rules! derived {
            ($($f:ident),*) => {$(
                cmp(stringify!($f), self.$f().to_string(), other.$f().to_string());
            )*};
        }
        derived!(
            head_size,
            n_query_groups,
            padded_vocab_size,
            intermediate_size
        );
        out
    }

    /// The MLA the config builds, if any.
    pub fn mla(&self) -> Option<MlaSpec> {
        let hs = self.head_size();
        match self.latent_attention? {
            LatentAttention::Flag(false) => None,
            LatentAttention::Flag(true) => Some(MlaSpec {
                q_lora_rank: Some(self.n_embd / 2),
                kv_lora_rank: 2 * self.n_embd / 3,
                qk_rope_head_dim: hs / 2,
                qk_nope_head_dim: hs / 2,
                v_head_dim: hs,
                down_bias: false,
                up_bias: false,
                latent_norm: self.norm_qk.then_some(self.norm_class_name),
            }),
            LatentAttention::Dims(d) => Some(MlaSpec {
                q_lora_rank: d.q_lora_rank,
                kv_lora_rank: d.kv_lora_rank,
                qk_rope_head_dim: d.qk_rope_head_dim,
                qk_nope_head_dim: d.qk_nope_head_dim,
                v_head_dim: d.v_head_dim,
                down_bias: self.attn_bias,
                up_bias: self.bias,
                latent_norm: d.latent_norm.then_some(NormClass::RMSNorm),
            }),
        }
    }

    pub fn attention_kind(&self) -> AttentionKind {
        if let Some(spec) = self.mla() {
            return AttentionKind::Mla(spec);
        }
        match self.n_query_groups() {
            g if g == self.n_head => AttentionKind::Mha,
            1 => AttentionKind::Mqa,
            g => AttentionKind::Gqa { n_query_groups: g },
        }
    }

    /// Rotated dims per q/k head (litgpt `rope_n_elem`).
    pub fn rope_n_elem(&self) -> usize {
        match self.mla() {
            Some(m) => m.qk_rope_head_dim,
            None => self.rope_n_elem_for(self.head_size()),
        }
    }

    /// q/k and v head dims seen by scaled-dot-product attention in training.
    pub fn sdpa_head_dims(&self) -> (usize, usize) {
        match self.mla() {
            Some(m) => (m.qk_head_dim(), m.v_head_dim),
            None => (self.head_size(), self.head_size()),
        }
    }

    /// Softmax scale: 1/sqrt(attention_scores_scalar or the q/k head dim).
    pub fn attention_scale(&self) -> f64 {
        let d = self
            .attention_scores_scalar
            .unwrap_or_else(|| self.sdpa_head_dims().0);
        1.0 / (d as f64).sqrt()
    }
}

#[cfg(test)]
mod tests {

    /// `latent_norm: false` (mla's own key) drops both latent norms; the mapping without it
    /// keeps them and is written exactly as litgpt's, with no `latent_norm` key.
    #[test]
    fn latent_norm_false_drops_the_latent_norms_and_is_written_only_when_false() {
        let dims = r#""kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
            "v_head_dim": 8"#;
        let plain: ModelConfig = serde_json::from_str(&format!(
            r#"{{"n_embd": 32, "n_head": 4, "latent_attention": {{{dims}}}}}"#
        ))
        .unwrap();
        let bare: ModelConfig = serde_json::from_str(&format!(
            r#"{{"n_embd": 32, "n_head": 4, "latent_attention": {{{dims}, "latent_norm": false}}}}"#
        ))
        .unwrap();
        assert_eq!(plain.mla().unwrap().latent_norm, Some(NormClass::RMSNorm));
        assert_eq!(bare.mla().unwrap().latent_norm, None);
        assert!(!serde_json::to_string(&plain)
            .unwrap()
            .contains("latent_norm"));
        assert!(serde_json::to_string(&bare)
            .unwrap()
            .contains(r#""latent_norm":false"#));
        assert_eq!(plain.differences(&bare)[0].0, "latent_attention");
    }
    use super::*;

    fn parse(json: &str) -> ModelConfig {
        serde_json::from_str(json).unwrap()
    }

    fn keys(err: ConfigErrors) -> Vec<String> {
        err.0.into_iter().map(|i| i.key).collect()
    }

    #[test]
    fn derives_litgpt_defaults() {
        let c =
            parse(r#"{"n_embd": 768, "n_head": 12, "vocab_size": 50254, "padding_multiple": 128}"#)
                .resolve()
                .unwrap();
        assert_eq!(c.head_size, Some(64));
        assert_eq!(c.n_query_groups, Some(12));
        assert_eq!(c.padded_vocab_size, Some(50304));
        assert_eq!(c.intermediate_size, Some(3072));
        assert_eq!(c.rope_n_elem(), 16); // 0.25 × 64
        assert_eq!(c.attention_kind(), AttentionKind::Mha);
    }

    #[test]
    fn latent_attention_true_is_the_seed_shorthand() {
        let c = parse(r#"{"n_embd": 768, "n_head": 12, "latent_attention": true}"#)
            .resolve()
            .unwrap();
        let m = c.mla().unwrap();
        assert_eq!(
            (
                m.q_lora_rank,
                m.kv_lora_rank,
                m.qk_rope_head_dim,
                m.qk_nope_head_dim,
                m.v_head_dim
            ),
            (Some(384), 512, 32, 32, 64)
        );
        assert!(!m.up_bias && !m.down_bias && m.latent_norm.is_none());
        assert_eq!(c.rope_n_elem(), 32);
    }

    #[test]
    fn differences_name_what_changes_the_computation_and_nothing_else() {
        let a = parse(r#"{"name": "a", "n_embd": 64, "n_head": 4, "rotary_percentage": 1.0}"#)
            .resolve()
            .unwrap();
        let mut b = parse(r#"{"name": "b", "n_embd": 64, "n_head": 4}"#)
            .resolve()
            .unwrap();
        assert_eq!(
            a.differences(&b),
            [("rotary_percentage", "1.0".to_string(), "0.25".to_string())]
        );
        b.rotary_percentage = 1.0;
        assert!(a.differences(&b).is_empty(), "names differ only");
        b.block_size = 128;
        assert_eq!(a.differences(&b)[0].0, "block_size");
        // Two MLAs of one spec compute alike whatever rotary_percentage and norm_qk say.
        let mla = r#""latent_attention": {"kv_lora_rank": 8, "qk_rope_head_dim": 4,
            "qk_nope_head_dim": 4, "v_head_dim": 8}"#;
        let c = parse(&format!(
            r#"{{"n_embd": 64, "n_head": 4, "norm_qk": true, {mla}}}"#
        ))
        .resolve()
        .unwrap();
        let d = parse(&format!(
            r#"{{"n_embd": 64, "n_head": 4, "rotary_percentage": 1.0, {mla}}}"#
        ))
        .resolve()
        .unwrap();
        assert!(c.differences(&d).is_empty(), "{:?}", c.differences(&d));
        // The seed's `true` differs from its own dims in the latent norms (none without norm_qk).
        let seed = parse(r#"{"n_embd": 64, "n_head": 4, "latent_attention": true}"#)
            .resolve()
            .unwrap();
        let mut normed = seed.clone();
        normed.norm_qk = true;
        assert_eq!(seed.differences(&normed)[0].0, "norm_qk");
        assert_eq!(seed.differences(&c)[0].0, "latent_attention");
    }

    /// litgpt takes `latent_attention` absent, null or a mapping: `false` reads as absent and
    /// is never written back (issue 9: checkpoints' config.yaml carried `false`).
    #[test]
    fn latent_attention_false_is_ordinary_attention_and_is_never_written() {
        for json in [
            r#"{"n_head": 4, "latent_attention": false}"#,
            r#"{"n_head": 4, "latent_attention": null}"#,
            r#"{"n_head": 4}"#,
        ] {
            let c = parse(json);
            assert_eq!(c.latent_attention, None, "{json}");
            let written = serde_json::to_string(&c).unwrap();
            assert!(!written.contains("latent_attention"), "{json} → {written}");
        }
        let seed = serde_json::to_string(&parse(r#"{"latent_attention": true}"#)).unwrap();
        assert!(seed.contains(r#""latent_attention":true"#), "{seed}");
    }

    #[test]
    fn latent_attention_mapping_uses_litgpt_semantics_and_round_trips() {
        let json = r#"{"n_embd": 64, "n_head": 4, "latent_attention": {"q_lora_rank": null, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}}"#;
        let c = parse(json).resolve().unwrap();
        let m = c.mla().unwrap();
        assert_eq!(m.q_lora_rank, None);
        assert!(m.up_bias && m.latent_norm == Some(NormClass::RMSNorm));
        let back: ModelConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn latent_attention_rejects_unknown_fields_and_wrong_types() {
        let err = serde_json::from_str::<ModelConfig>(
            r#"{"latent_attention": {"kv_lora_rank": 8, "qk_rope_head_dim": 2, "qk_nope_head_dim": 2, "v_head_dim": 4, "rank": 3}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `rank`"), "{err}");
        let err =
            serde_json::from_str::<ModelConfig>(r#"{"latent_attention": "yes"}"#).unwrap_err();
        assert!(
            err.to_string().contains("`true`, `false`, or a mapping"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_rejected() {
        let err = serde_json::from_str::<ModelConfig>(r#"{"n_layers": 2}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `n_layers`"),
            "{err}"
        );
    }

    #[test]
    fn n_embd_not_divisible_by_n_head_names_n_embd() {
        let err = parse(r#"{"n_embd": 100, "n_head": 12}"#)
            .resolve()
            .unwrap_err();
        assert_eq!(keys(err.clone()), ["n_embd"]);
        assert!(err.to_string().contains("divisible by n_head"), "{err}");
    }

    #[test]
    fn n_head_not_divisible_by_n_query_groups_names_n_query_groups() {
        let err = parse(r#"{"n_embd": 96, "n_head": 12, "n_query_groups": 5}"#)
            .resolve()
            .unwrap_err();
        assert_eq!(keys(err), ["n_query_groups"]);
    }

    #[test]
    fn odd_rope_dims_are_rejected() {
        // 0.5 × 6 = 3 rotated dims
        let err = parse(r#"{"n_embd": 24, "n_head": 4, "rotary_percentage": 0.5}"#)
            .resolve()
            .unwrap_err();
        assert_eq!(keys(err), ["rotary_percentage"]);
        let err = parse(r#"{"n_embd": 64, "n_head": 4, "latent_attention": {"q_lora_rank": 8, "kv_lora_rank": 8, "qk_rope_head_dim": 3, "qk_nope_head_dim": 8, "v_head_dim": 8}}"#)
            .resolve()
            .unwrap_err();
        assert_eq!(keys(err), ["latent_attention.qk_rope_head_dim"]);
        // latent_attention: true rotates head_size/2 = 3
        let err = parse(r#"{"n_embd": 24, "n_head": 4, "latent_attention": true}"#)
            .resolve()
            .unwrap_err();
        assert_eq!(keys(err), ["head_size"]);
    }

    #[test]
    fn mla_rejects_grouped_queries() {
        let err =
            parse(r#"{"n_embd": 64, "n_head": 4, "n_query_groups": 2, "latent_attention": true}"#)
                .resolve()
                .unwrap_err();
        assert_eq!(keys(err), ["n_query_groups"]);
    }

    #[test]
    fn unimplemented_litgpt_keys_load_at_default_and_fail_otherwise() {
        let ok = parse(
            r#"{"n_embd": 64, "n_head": 4, "sliding_window_size": null, "n_expert": 0, "post_attention_norm": false, "rope_adjustments": null}"#,
        );
        assert!(ok.resolve().is_ok());
        let err =
            parse(r#"{"n_embd": 64, "n_head": 4, "n_expert": 8, "sliding_window_size": 128}"#)
                .resolve()
                .unwrap_err();
        assert_eq!(keys(err), ["sliding_window_size", "n_expert"]);
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let err = parse(r#"{"n_embd": 100, "n_head": 12, "n_query_groups": 5, "n_layer": 0}"#)
            .resolve()
            .unwrap_err();
        assert_eq!(keys(err), ["n_layer", "n_embd", "n_query_groups"]);
    }
}
