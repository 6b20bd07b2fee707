//! The loss of one micro-batch: next-token cross-entropy, forward and backward, with the
//! vocabulary projection run over chunks of rows so the full fp32 logits never exist at once.
//!
//! Not here: accumulation, scaling across ranks and the optimizer step (train/mod.rs).

use super::recompute::Staged;
use crate::config::ActivationCheckpointing;
use mla_model::Gpt;
use tch::{Device, Kind, Reduction, Tensor};

/// The inputs (B, T) and targets (B, T) of `micro` windows of `seq_len + 1` tokens, on `device`.
pub(crate) fn tokens_to_batch(
    tokens: &[i64],
    micro: usize,
    seq_len: usize,
    device: Device,
) -> anyhow::Result<(Tensor, Tensor)> {
    let t = Tensor::from_slice(tokens).view([micro as i64, seq_len as i64 + 1]);
    // To a GPU through page-locked memory, without waiting: a copy from pageable memory makes
    // the host wait for all queued work before it can launch the next micro-batch. The staging
    // buffer goes back to torch's pinned-memory cache only once the copy has run.
    let t = if device.is_cuda() {
        crate::cxx::pin_memory(&t)?.to_device_(
            device,
            Kind::Int64,
            /* non_blocking */ true,
            false,
        )
    } else {
        t
    };
    Ok((
        t.narrow(1, 0, seq_len as i64),
        t.narrow(1, 1, seq_len as i64),
    ))
}

/// Mean cross-entropy of next-token prediction for inputs (B, T) and targets (B, T), through
/// the whole (B, T, V) logits at once: the reference the chunked forms are tested against.
#[cfg(test)]
fn loss_of(model: &Gpt, x: &Tensor, y: &Tensor, autocast: bool) -> Tensor {
    crate::autocast::bf16(autocast, || {
        let logits = model.forward(x); // (B, T, V)
        let v = logits.size()[2];
        logits
            .view([-1, v])
            .to_kind(Kind::Float)
            .cross_entropy_for_logits(&y.reshape([-1]))
    })
}

/// fp32 logits materialised at once by [`loss_and_backward`]: rows per chunk are chosen so
/// that one chunk's logits take at most this many bytes.
pub(super) const LOGITS_CHUNK_BYTES: i64 = 256 << 20;

/// Forward and backward of the mean next-token cross-entropy, scaled by `scale` for the
/// backward; returns the unscaled loss (0-dim fp32, detached). The same gradients as
/// `(loss_of(..) * scale).backward()`, but the vocabulary projection and the loss run over
/// chunks of rows, each chunk's backward right after its forward, so at most one chunk of fp32
/// logits (and its log-softmax and gradient) is alive instead of all of them: for pythia-160m
/// at 4 × 2048 tokens that is 256 MiB instead of 1.6 GiB per copy. The trunk's backward then
/// runs once from the accumulated gradient of the hidden states.
pub(super) fn loss_and_backward(
    model: &Gpt,
    x: &Tensor,
    y: &Tensor,
    autocast: bool,
    scale: f64,
    recompute: ActivationCheckpointing,
) -> Tensor {
    chunked_loss_and_backward(model, x, y, autocast, scale, LOGITS_CHUNK_BYTES, recompute)
}

/// [`loss_and_backward`] with the chunk size as a parameter (tests force several chunks).
fn chunked_loss_and_backward(
    model: &Gpt,
    x: &Tensor,
    y: &Tensor,
    autocast: bool,
    scale: f64,
    chunk_bytes: i64,
    recompute: ActivationCheckpointing,
) -> Tensor {
    // The trunk, whole or in stages (recompute.rs).
    let (hidden, staged) = if recompute.is_none() {
        let hidden = crate::autocast::bf16(autocast, || model.hidden(x)); // (B, T, C)
        (hidden, None)
    } else {
        let staged = Staged::forward(model, x, autocast, recompute);
        (staged.hidden.shallow_clone(), Some(staged))
    };
    // A leaf cut from the trunk: the chunks' backward passes accumulate into its .grad.
    let cut = hidden.detach().set_requires_grad(true);
    let rows = y.numel() as f64;
    let mean = chunk_losses(model, &cut, y, autocast, chunk_bytes, |chunk_sum| {
        (chunk_sum * (scale / rows)).backward();
    });
    // d(loss)/d(hidden) is in cut.grad; push it through the trunk.
    match staged {
        Some(staged) => staged.backward(&cut.grad()),
        None => (hidden * cut.grad()).sum(Kind::Float).backward(),
    }
    mean
}

/// Mean next-token cross-entropy without gradients (validation, `mla eval`), with the
/// vocabulary projection over chunks of rows as in [`loss_and_backward`]: at most one chunk
/// of fp32 logits and its log-softmax exist, not the whole (B·T, V) — about 4 GiB transient
/// for pythia-160m at 4 × 2048 tokens, on top of training's peak at every validation.
pub(crate) fn mean_loss(model: &Gpt, x: &Tensor, y: &Tensor, autocast: bool) -> Tensor {
    chunked_mean_loss(model, x, y, autocast, LOGITS_CHUNK_BYTES)
}

fn chunked_mean_loss(
    model: &Gpt,
    x: &Tensor,
    y: &Tensor,
    autocast: bool,
    chunk_bytes: i64,
) -> Tensor {
    tch::no_grad(|| {
        let hidden = crate::autocast::bf16(autocast, || model.hidden(x));
        chunk_losses(model, &hidden, y, autocast, chunk_bytes, |_| {})
    })
}

/// The mean cross-entropy of hidden states (B, T, C) against targets (B, T), projected onto
/// the vocabulary `chunk_bytes` of fp32 logits at a time; `each` sees every chunk's summed
/// loss (still attached to the graph when gradients are on) before the next is computed.
fn chunk_losses(
    model: &Gpt,
    hidden: &Tensor,
    y: &Tensor,
    autocast: bool,
    chunk_bytes: i64,
    mut each: impl FnMut(&Tensor),
) -> Tensor {
    let c = hidden.size()[2];
    let rows = hidden.numel() as i64 / c;
    let vocab = model.config().padded_vocab_size() as i64;
    let chunk = (chunk_bytes / (vocab * 4)).clamp(1, rows);
    let (flat, targets) = (hidden.view([rows, c]), y.reshape([rows]));
    let mut sum = Tensor::zeros([], (Kind::Float, hidden.device()));
    let mut start = 0;
    while start < rows {
        let n = chunk.min(rows - start);
        let chunk_sum = crate::autocast::bf16(autocast, || {
            model
                .logits(&flat.narrow(0, start, n))
                .to_kind(Kind::Float)
                .cross_entropy_loss::<Tensor>(
                    &targets.narrow(0, start, n),
                    None,
                    Reduction::Sum,
                    -100,
                    0.0,
                )
        });
        each(&chunk_sum);
        sum += chunk_sum.detach();
        start += n;
    }
    sum / rows as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use mla_model::{LatentAttention, ModelConfig};
    use tch::nn::VarStore;

    fn grads(vs: &VarStore) -> Vec<(String, Tensor)> {
        let mut out: Vec<_> = vs
            .variables()
            .into_iter()
            .map(|(name, v)| (name, v.grad().copy()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, v) in vs.variables() {
            let _ = v.grad().zero_();
        }
        out
    }

    #[test]
    fn chunked_loss_and_backward_equal_the_whole_logits_loss() {
        let cfg = ModelConfig {
            name: "t".into(),
            block_size: 16,
            n_layer: 2,
            n_embd: 48,
            n_head: 4,
            vocab_size: 100,
            padding_multiple: 64,
            rotary_percentage: 0.5,
            latent_attention: Some(LatentAttention::Flag(true)),
            ..ModelConfig::default()
        };
        let vs = VarStore::new(Device::Cpu);
        let model = Gpt::new(&vs.root(), &cfg).unwrap();
        let x = Tensor::randint(100, [3, 16], (Kind::Int64, Device::Cpu));
        let y = Tensor::randint(100, [3, 16], (Kind::Int64, Device::Cpu));
        let scale = 0.25;

        let reference = loss_of(&model, &x, &y, false);
        (&reference * scale).backward();
        let expected = grads(&vs);
        // 48 rows of 128 padded logits (512 B each): chunks of 5 rows leave a remainder of 3.
        let loss = chunked_loss_and_backward(
            &model,
            &x,
            &y,
            false,
            scale,
            5 * 128 * 4,
            ActivationCheckpointing::None,
        );
        let got = grads(&vs);

        // fp32 unit roundoff.
        const U: f64 = f32::EPSILON as f64 / 2.0;
        // The loss: the same 48 positive row losses summed in another order (chunk sums, then
        // their sum) differ by at most 2·γ_47 ≈ 94u of the total (Higham's bound for any
        // order), plus the divisions; and each row's logits come from a matmul of another
        // shape, ≤ 2·γ_48·Σ|h·w| ≈ 6e-6 per logit here (48 products of O(1)·O(0.02)), which
        // moves a row's cross-entropy by at most twice that: 2.5e-6 of a loss ≈ ln 100.
        let loss_tol = 100.0 * U + 2.5e-6;
        // A gradient: the 48 rows' contributions re-associated into 10 chunk sums, ≤ 2·γ_48 ≈
        // 5.7e-6 of the contributions' magnitude, which stays below twice the tensor's
        // largest entry for these default-initialised weights.
        let grad_tol = 2.0 * 2.0 * 48.0 * U;
        let (a, b) = (reference.double_value(&[]), loss.double_value(&[]));
        let rel = ((a - b) / a).abs();
        assert!(rel <= loss_tol, "loss {a} vs {b}");
        assert!(!loss.requires_grad(), "the returned loss is detached");
        // Validation's no-grad form: the same chunks, the same sums, so the same bits.
        let eval = chunked_mean_loss(&model, &x, &y, false, 5 * 128 * 4);
        assert!(!eval.requires_grad());
        assert_eq!(
            eval.double_value(&[]),
            b,
            "no-grad chunked loss = chunked loss"
        );
        let rel_eval = ((a - mean_loss(&model, &x, &y, false).double_value(&[])) / a).abs();
        assert!(
            rel_eval <= loss_tol,
            "one-chunk mean loss vs whole logits: {rel_eval:e}"
        );
        let mut worst: f64 = 0.0;
        for ((name, e), (_, g)) in expected.iter().zip(&got) {
            let diff = (e - g).abs().max().double_value(&[]);
            let size = e.abs().max().double_value(&[]);
            assert!(size > 0.0, "{name} gets a gradient");
            worst = worst.max(diff / size);
            assert!(
                diff <= grad_tol * size,
                "{name}: max |diff| {diff:e} of {size:e}"
            );
        }
        println!("Δ chunked loss, relative: {rel:.2e} (bound {loss_tol:.2e})");
        println!("Δ validation's chunked loss, relative: {rel_eval:.2e} (bound {loss_tol:.2e})");
        println!(
            "Δ chunked loss's gradients, of their largest entry: {worst:.2e} (bound {grad_tol:.2e})"
        );
    }

    /// Recomputing blocks in the backward gives the plain backward's loss and gradients: the
    /// recomputed forward repeats the first on the same input, and the staged backward pushes
    /// the same gradients through the same graphs, so fp32 agrees to the last bit here (the
    /// issue allows 1e-6 relative; a CPU kernel that chose another algorithm without autograd
    /// would show as a difference at rounding level).
    #[test]
    fn recomputed_blocks_give_the_plain_backwards_gradients() {
        for latent in [None, Some(LatentAttention::Flag(true))] {
            let cfg = ModelConfig {
                name: "t".into(),
                block_size: 16,
                n_layer: 4,
                n_embd: 48,
                n_head: 4,
                vocab_size: 100,
                padding_multiple: 64,
                rotary_percentage: 0.5,
                latent_attention: latent,
                ..ModelConfig::default()
            };
            let vs = VarStore::new(Device::Cpu);
            let model = Gpt::new(&vs.root(), &cfg).unwrap();
            let x = Tensor::randint(100, [3, 16], (Kind::Int64, Device::Cpu));
            let y = Tensor::randint(100, [3, 16], (Kind::Int64, Device::Cpu));
            let run = |policy| {
                let loss = loss_and_backward(&model, &x, &y, false, 0.5, policy);
                (loss.double_value(&[]), grads(&vs))
            };
            let (loss, expected) = run(ActivationCheckpointing::None);
            for policy in [
                ActivationCheckpointing::Blocks,
                ActivationCheckpointing::EveryK(2),
                ActivationCheckpointing::EveryK(3),
            ] {
                let (l, got) = run(policy);
                assert_eq!(l, loss, "{policy:?}: loss");
                for ((name, e), (_, g)) in expected.iter().zip(&got) {
                    let diff = (e - g).abs().max().double_value(&[]);
                    let size = e.abs().max().double_value(&[]);
                    assert!(size > 0.0, "{name} gets a gradient");
                    assert!(
                        diff <= 1e-6 * size,
                        "{policy:?} {name}: max |diff| {diff:e} of {size:e}"
                    );
                }
                let exact = expected.iter().zip(&got).all(|((_, e), (_, g))| e.equal(g));
                println!(
                    "{policy:?} (MLA: {}): gradients bit-identical: {exact}",
                    latent.is_some()
                );
            }
        }
    }
}
