//! Next-token sampling: greedy (temperature 0), temperature, top-k, top-p (nucleus).
//! Filtering runs on the logits' device; the draw itself uses the sampler's own seeded
//! ChaCha RNG on the host (inverse CDF), so a seed gives the same text whatever else runs
//! in the process (libtorch's global generator is shared by every thread).

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

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

/// Logits (B, V) → probabilities (B, V) after temperature, top-k and top-p filtering.
pub fn filtered_probs(logits: &Tensor, params: &SamplingParams) -> Tensor {
    let mut logits = logits.to_kind(Kind::Float) / params.temperature.max(f64::MIN_POSITIVE);
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
    logits.softmax(-1, Kind::Float)
}

/// A seeded sampler: same seed and logits → same tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Sampler {
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// One token per row of logits (B, V).
    pub fn sample(&mut self, logits: &Tensor) -> Vec<i64> {
        if self.params.temperature <= 0.0 {
            return Vec::<i64>::try_from(logits.argmax(-1, false).to_device(Device::Cpu))
                .unwrap_or_default();
        }
        let probs = filtered_probs(logits, &self.params).to_device(Device::Cpu);
        let v = probs.size()[1] as usize;
        let flat = Vec::<f32>::try_from(probs.reshape([-1])).unwrap_or_default();
        flat.chunks(v)
            .map(|row| {
                // Uniform in [0, 1) from 53 random bits, then the inverse CDF.
                let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                let total: f64 = row.iter().map(|&p| p as f64).sum();
                let mut acc = 0.0;
                let last = row.iter().rposition(|&p| p > 0.0).unwrap_or(0);
                for (i, &p) in row.iter().enumerate() {
                    acc += p as f64;
                    if u * total < acc {
                        return i as i64;
                    }
                }
                last as i64
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Tensor {
        Tensor::from_slice(&[0.1f32, 2.0, -1.0, 1.9, 0.0, 0.5]).view([2, 3])
    }

    fn params(temperature: f64, top_k: Option<i64>, top_p: Option<f64>) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
        }
    }

    #[test]
    fn temperature_zero_is_argmax() {
        assert_eq!(
            Sampler::new(params(0.0, None, None), 0).sample(&logits()),
            [1, 0]
        );
    }

    #[test]
    fn top_k_one_and_tiny_top_p_reduce_to_argmax() {
        for p in [params(5.0, Some(1), None), params(5.0, None, Some(1e-6))] {
            let mut s = Sampler::new(p, 1);
            for _ in 0..20 {
                assert_eq!(s.sample(&logits()), [1, 0], "{p:?}");
            }
        }
    }

    #[test]
    fn top_k_never_picks_outside_the_k_best() {
        let mut s = Sampler::new(params(10.0, Some(2), None), 2);
        for _ in 0..50 {
            let t = s.sample(&logits());
            assert!([1, 0].contains(&t[0]) && [0, 2].contains(&t[1]), "{t:?}");
        }
    }

    #[test]
    fn same_seed_same_samples_and_sampling_is_random() {
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, None, Some(0.95)), seed);
            (0..20)
                .flat_map(|_| s.sample(&logits()))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn high_temperature_frequencies_follow_the_distribution() {
        // temperature 1, no filtering: P(token 1 in row 0) = softmax([0.1, 2, -1])[1] ≈ 0.834
        let e = [0.1f64.exp(), 2f64.exp(), (-1f64).exp()];
        let p = e[1] / e.iter().sum::<f64>();
        let mut s = Sampler::new(params(1.0, None, None), 5);
        let n = 2000;
        let hits = (0..n).filter(|_| s.sample(&logits())[0] == 1).count() as f64 / n as f64;
        // The share of n draws has σ = √(p(1−p)/n) ≈ 0.0083: 4σ fails a correct sampler for
        // one seed in 16,000 (and the seeded ChaCha stream makes this one deterministic).
        let sigma = (p * (1.0 - p) / n as f64).sqrt();
        assert!((hits - p).abs() <= 4.0 * sigma, "{hits} vs {p}");
    }
}
