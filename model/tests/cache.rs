//! Cached inference equals the uncached forward for every attention kind, to fp32 rounding
//! (`common::FORWARD_TOL`: the cached, absorbed and uncached paths re-associate the same
//! products in other shapes, nothing more): prefill + 16 single-token decode steps, and a chunked prefill that needs the offset mask.
//! For MLA both the naive and the absorbed path over the compressed cache, and absorbed == naive;
//! the absorbed setting takes the latent form only where it is cheaper, and the chunks
//! 5+3+4+1+1+10 of the tiny mapping dims exercise both forms (3 and 4 tokens after 5 and 8
//! cached: absorbed; 5 and 10: expanded).
//! On the device of `MLA_TEST_DEVICE` (cpu by default; cuda in scripts/gpu_check.sh).

mod common;
use common::*;
use mla_model::{Gpt, MlaDecode, ModelConfig};
use tch::{Kind, Tensor};

/// Logits for every position of `idx` computed through the cache: prefill `chunks[0]`
/// tokens, then the other chunk sizes in order.
fn cached_logits(gpt: &Gpt, idx: &Tensor, chunks: &[i64], decode: MlaDecode) -> Tensor {
    let (b, t) = (idx.size()[0], idx.size()[1]);
    let mut cache = gpt
        .new_cache(b, t, decode, Kind::Float)
        .expect("cache fits");
    let mut start = 0;
    let mut out = Vec::new();
    for &n in chunks {
        out.push(
            gpt.forward_cached(&idx.narrow(1, start, n), &mut cache)
                .expect("fits"),
        );
        start += n;
    }
    assert_eq!(start, t, "chunks cover the sequence");
    assert_eq!(cache.len(), t);
    Tensor::cat(&out, 1)
}

fn prefill_then_decode(steps: i64, prefill: i64) -> Vec<i64> {
    std::iter::once(prefill)
        .chain(std::iter::repeat_n(1, steps as usize))
        .collect()
}

fn check(cfg: &ModelConfig, decode: MlaDecode) -> Tensor {
    let (_vs, gpt) = random_model(cfg, 7);
    let idx = tokens(2, 24, cfg.vocab_size as i64, 11);
    tch::no_grad(|| {
        let full = gpt.forward(&idx);
        for chunks in [prefill_then_decode(16, 8), vec![5, 3, 4, 1, 1, 10]] {
            let cached = cached_logits(&gpt, &idx, &chunks, decode);
            let diff = max_abs_diff(&full, &cached);
            let steps: Vec<String> = chunks.iter().map(i64::to_string).collect();
            println!(
                "Δ {} {:?} in steps of {} tokens on {:?} (max |logit| {:.1}): {diff:.2e} \
                 (bound {FORWARD_TOL:.1e})",
                cfg.attention_kind().name(),
                decode,
                steps.join("+"),
                test_device(),
                full.abs().max().double_value(&[])
            );
            assert!(
                diff <= FORWARD_TOL,
                "cached forward differs by {diff:e} (chunks {chunks:?})"
            );
        }
        cached_logits(&gpt, &idx, &prefill_then_decode(16, 8), decode)
    })
}

#[test]
fn mha_cached_decode_equals_uncached_forward() {
    let _ = check(&tiny(4), MlaDecode::Naive);
}

#[test]
fn gqa_cached_decode_equals_uncached_forward() {
    let _ = check(&tiny(2), MlaDecode::Naive);
}

#[test]
fn mqa_cached_decode_equals_uncached_forward() {
    let _ = check(&tiny(1), MlaDecode::Naive);
}

#[test]
fn mla_compressed_cache_naive_and_absorbed_equal_uncached_forward() {
    for cfg in [
        tiny_mla_seed(false),
        tiny_mla_seed(true),
        tiny_mla_dims(Some(16)),
        tiny_mla_dims(None),
        tiny_mla_dims_without_latent_norm(),
    ] {
        let naive = check(&cfg, MlaDecode::Naive);
        let absorbed = check(&cfg, MlaDecode::Absorbed);
        let diff = max_abs_diff(&naive, &absorbed);
        println!(
            "Δ MLA absorbed vs naive on {:?}: {diff:.2e} (bound {FORWARD_TOL:.1e})",
            test_device()
        );
        assert!(
            diff <= FORWARD_TOL,
            "absorbed differs from naive by {diff:e}"
        );
    }
}

#[test]
fn forward_cached_last_is_the_last_position_of_forward_cached() {
    for cfg in [tiny(2), tiny_mla_seed(false)] {
        let (_vs, gpt) = random_model(&cfg, 3);
        let idx = tokens(2, 12, cfg.vocab_size as i64, 5);
        tch::no_grad(|| {
            let full = gpt.forward(&idx);
            let mut cache = gpt
                .new_cache(2, 12, MlaDecode::Absorbed, Kind::Float)
                .expect("fits");
            let prompt = gpt
                .forward_cached_last(&idx.narrow(1, 0, 9), &mut cache)
                .expect("fits");
            assert_eq!(prompt.size(), [2, 1, full.size()[2]]);
            assert_eq!(cache.len(), 9);
            let step = gpt
                .forward_cached_last(&idx.narrow(1, 9, 3), &mut cache)
                .expect("fits");
            for (got, pos) in [(&prompt, 8), (&step, 11)] {
                let diff = max_abs_diff(&full.narrow(1, pos, 1), got);
                assert!(diff <= FORWARD_TOL, "position {pos}: {diff:e}");
            }
        });
    }
}

#[test]
fn mla_cache_holds_only_the_compressed_latent() {
    let cfg = tiny_mla_dims(Some(16)).resolve().expect("valid");
    let (_vs, gpt) = random_model(&cfg, 1);
    let cache = gpt
        .new_cache(3, 20, MlaDecode::Absorbed, Kind::Float)
        .expect("fits");
    // (kv_lora_rank + qk_rope_head_dim) fp32 values per position, batch and layer.
    let expected = 3 * 20 * (24 + 4) * 4 * cfg.n_layer as i64;
    assert_eq!(cache.bytes(), expected);
    assert_eq!(
        mla_model::stats::kv_cache_values_per_token(&cfg) as i64 * 3 * 20 * 4,
        expected
    );
}

#[test]
fn cache_rejects_positions_beyond_its_capacity() {
    let (_vs, gpt) = random_model(&tiny(4), 1);
    let mut cache = gpt
        .new_cache(1, 4, MlaDecode::Naive, Kind::Float)
        .expect("fits");
    let idx = tokens(1, 5, 64, 1);
    tch::no_grad(|| {
        assert!(gpt.forward_cached(&idx.narrow(1, 0, 4), &mut cache).is_ok());
        let err = gpt
            .forward_cached(&idx.narrow(1, 4, 1), &mut cache)
            .unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    });
    assert!(gpt.new_cache(1, 33, MlaDecode::Naive, Kind::Float).is_err());
}
