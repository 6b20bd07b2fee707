//! Helpers shared by the model integration tests: tiny configs for every attention kind,
//! models whose every parameter (biases and norm weights too) is randomised, and the device
//! the tests run on (`MLA_TEST_DEVICE`: `cpu`, the default, or `cuda`; scripts/gpu_check.sh
//! runs the parity and cache tests on the GPU that way).
#![allow(dead_code)]

use mla_model::{Gpt, LatentAttention, MlaDims, ModelConfig};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// fp32 unit roundoff: one rounding moves a value by at most u = 2^-24 ≈ 6e-8 of itself.
pub const U: f64 = f32::EPSILON as f64 / 2.0;

/// |Δ| between two fp32 evaluations of these tiny models' logits that do the same sums in
/// another order (another kernel path, shape, device, or the PyTorch reference). The rounding
/// errors of n chained operations add like a random walk, ≈ λ·√n·u of the values carried
/// (Higham & Mary 2019, λ ≈ 4 for a safe bound): n ≈ 17 chained reductions (2 layers × 8 +
/// the head) × K ≤ 64 terms ≈ 1100 over activations of size O(1) (NOISE_STD):
/// 4·√1100·u ≈ 8e-6.
pub const FORWARD_TOL: f64 = 1e-5;

/// |Δ| of the mean cross-entropy: its gradient in the logits (softmax − one-hot) has L1 norm
/// ≤ 2, so logits within FORWARD_TOL move it by at most 2·FORWARD_TOL.
pub const LOSS_TOL: f64 = 2.0 * FORWARD_TOL;

/// |Δ| of a gradient relative to its tensor's largest entry: the backward doubles the chain of
/// the forward and sums over the batch's positions, n ≈ 2·1100 + 64, and 4·√n·u ≈ 1.1e-5.
pub const GRAD_REL_TOL: f64 = 1.2e-5;

/// Parameter noise: large enough that biases and norms matter, small enough that logits stay
/// O(1) as in a real model, so fp32 tolerances are meaningful.
pub const NOISE_STD: f64 = 0.15;

/// libtorch's generator is process-wide and the test harness runs tests on several threads:
/// seeding and drawing happen under this lock, so a seed always gives the same tensors.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The device of `MLA_TEST_DEVICE` (default cpu). Asking for cuda where there is none fails the
/// test: a GPU check that silently ran on the CPU would pass for the wrong reason.
pub fn test_device() -> Device {
    match std::env::var("MLA_TEST_DEVICE").as_deref() {
        Err(_) | Ok("" | "cpu") => Device::Cpu,
        Ok("cuda") => {
            assert!(
                tch::Cuda::is_available(),
                "MLA_TEST_DEVICE=cuda but libtorch sees no CUDA device"
            );
            Device::Cuda(0)
        }
        Ok(other) => panic!("MLA_TEST_DEVICE={other}: expected cpu or cuda"),
    }
}

/// Largest |a − b|, compared on the CPU (a and b may live on different devices).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a.to(Device::Cpu) - b.to(Device::Cpu))
        .abs()
        .max()
        .double_value(&[])
}

pub fn tiny(n_query_groups: usize) -> ModelConfig {
    ModelConfig {
        name: "tiny".into(),
        block_size: 32,
        n_layer: 2,
        n_embd: 32,
        n_head: 4,
        vocab_size: 64,
        padding_multiple: 64,
        n_query_groups: Some(n_query_groups),
        rotary_percentage: 0.5,
        intermediate_size: Some(64),
        ..ModelConfig::default()
    }
}

/// The seed's `latent_attention: true` (n_embd 48 so that 2·n_embd/3 is whole).
pub fn tiny_mla_seed(norm_qk: bool) -> ModelConfig {
    ModelConfig {
        n_embd: 48,
        latent_attention: Some(LatentAttention::Flag(true)),
        norm_qk,
        ..tiny(4)
    }
}

/// The DeepSeek-named mapping (litgpt semantics: RMSNorm latents, biases per `bias`).
pub fn tiny_mla_dims(q_lora_rank: Option<usize>) -> ModelConfig {
    ModelConfig {
        latent_attention: Some(LatentAttention::Dims(MlaDims {
            q_lora_rank,
            kv_lora_rank: 24,
            qk_rope_head_dim: 4,
            qk_nope_head_dim: 6,
            v_head_dim: 10,
            latent_norm: true,
        })),
        ..tiny(4)
    }
}

/// The mapping without latent norms (`latent_norm: false`, mla's own key: what a model
/// converted from MHA computes), with biases.
pub fn tiny_mla_dims_without_latent_norm() -> ModelConfig {
    let mut cfg = tiny_mla_dims(Some(16));
    if let Some(LatentAttention::Dims(d)) = &mut cfg.latent_attention {
        d.latent_norm = false;
    }
    cfg
}

/// A model on [`test_device`] with every parameter drawn from N(0, NOISE_STD²) (norm weights
/// around 1). The draws happen on the CPU, so a seed gives the same weights on every device.
pub fn random_model(cfg: &ModelConfig, seed: i64) -> (VarStore, Gpt) {
    let _rng = rng_lock();
    tch::manual_seed(seed);
    let vs = VarStore::new(test_device());
    let gpt = Gpt::new(&vs.root(), cfg).expect("valid config");
    tch::no_grad(|| {
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0)); // HashMap order is random; noise must not be
        for (name, mut var) in vars {
            let noise = Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) * NOISE_STD;
            let base = if name.contains("norm") && name.ends_with("weight") {
                1.0
            } else {
                0.0
            };
            var.copy_(&(noise + base));
        }
    });
    (vs, gpt)
}

/// Random token ids on [`test_device`] (drawn on the CPU).
pub fn tokens(batch: i64, len: i64, vocab: i64, seed: i64) -> Tensor {
    let _rng = rng_lock();
    tch::manual_seed(seed);
    Tensor::randint(vocab, [batch, len], (Kind::Int64, Device::Cpu)).to(test_device())
}
