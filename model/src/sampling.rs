//! Next-token sampling: greedy (temperature 0), temperature, top-k, top-p (nucleus).
//! Randomness comes from libtorch's generator: seed it with `tch::manual_seed` once.

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<i64>,
    /// Keep the smallest set of tokens whose probability mass reaches `top_p` (0 < p ≤ 1).
    pub top_p: Option<f64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: Some(50),
            top_p: None,
        }
    }
}

/// Sample one token per row from logits (B, V) → (B,) int64.
pub fn sample(logits: &Tensor, params: &SamplingParams) -> Tensor {
    let logits = logits.to_kind(Kind::Float);
    if params.temperature <= 0.0 {
        return logits.argmax(-1, false);
    }
    let mut logits = logits / params.temperature;
    if let Some(k) = params.top_k {
        let v = logits.size()[1];
        if k > 0 && k < v {
            let (top, _) = logits.topk(k, -1, true, true);
            let threshold = top.narrow(-1, k - 1, 1); // (B, 1)
            logits = logits.masked_fill(&logits.lt_tensor(&threshold), f64::NEG_INFINITY);
        }
    }
    if let Some(p) = params.top_p {
        if p < 1.0 {
            // Ascending sort: drop the low tail whose cumulative mass is ≤ 1 − p,
            // always keeping the most likely token.
            let (sorted, indices) = logits.sort(-1, false);
            let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
            let remove_sorted = cum.le(1.0 - p);
            let v = remove_sorted.size()[1];
            let _ = remove_sorted.narrow(-1, v - 1, 1).fill_(0);
            let remove = remove_sorted.scatter(-1, &indices, &remove_sorted);
            logits = logits.masked_fill(&remove, f64::NEG_INFINITY);
        }
    }
    logits
        .softmax(-1, Kind::Float)
        .multinomial(1, false)
        .squeeze_dim(-1)
}
