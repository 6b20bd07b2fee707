//! Activation recomputation (`train.activation_checkpointing`, issue 12): the trunk's forward
//! and backward in stages, so that a recomputed block keeps nothing for its backward but its
//! input, and runs its forward a second time, with autograd, when the backward reaches it.
//!
//! The same staged-backward technique as the chunked loss, one level down, and no custom
//! autograd function: every block reads its input from a leaf cut from the previous block's
//! output; the backward goes from the last block to the first, each time pushing the gradient
//! of the block's output through the block (its kept graph, or the graph of its recomputed
//! forward) into its leaf, whose `.grad` is the next gradient upstream; the embedding last.
//! The recomputed forward is the first one again on the same input: the same values, so the
//! gradients are those of the plain backward (train::loss tests).
//!
//! Memory: a recomputed block holds one (B, T, C) input between the passes instead of its
//! activations (≈ 4·C + 2·intermediate per position, train/memory.rs); at most one block's
//! activations exist at a time in the backward. Cost: one more forward of the recomputed
//! blocks (≈ +1/3 of their forward + backward).
//!
//! Not here: the loss over the vocabulary (loss.rs), the choice of blocks (config.rs).

use crate::config::ActivationCheckpointing;
use mla_model::Gpt;
use tch::{Kind, Tensor};

/// One block between the passes: its input, and its output's graph when it keeps it.
struct Stage {
    input: Tensor,
    output: Option<Tensor>,
}

/// The trunk after the staged forward, waiting for the gradient of its output.
pub(super) struct Staged<'a> {
    model: &'a Gpt,
    idx: Tensor,
    autocast: bool,
    stages: Vec<Stage>,
    /// The leaf the final norm reads: the last block's output, cut.
    last: Tensor,
    /// Hidden states after the final norm (B, T, C), with the final norm's graph.
    pub hidden: Tensor,
}

impl<'a> Staged<'a> {
    /// The forward of token ids `idx` (B, T): recomputed blocks under `no_grad` (their
    /// input kept), the others with autograd from a leaf (their graph kept).
    pub(super) fn forward(
        model: &'a Gpt,
        idx: &Tensor,
        autocast: bool,
        policy: ActivationCheckpointing,
    ) -> Staged<'a> {
        let bf16 = |f: &dyn Fn() -> Tensor| crate::autocast::bf16(autocast, f);
        let mut h = tch::no_grad(|| bf16(&|| model.embed_tokens(idx)));
        let mut stages = Vec::with_capacity(model.n_blocks());
        for i in 0..model.n_blocks() {
            if policy.recomputes(i) {
                let out = tch::no_grad(|| bf16(&|| model.block(i, &h)));
                stages.push(Stage {
                    input: h,
                    output: None,
                });
                h = out;
            } else {
                let input = h.set_requires_grad(true);
                let out = bf16(&|| model.block(i, &input));
                h = out.detach();
                stages.push(Stage {
                    input,
                    output: Some(out),
                });
            }
        }
        let last = h.set_requires_grad(true);
        let hidden = bf16(&|| model.final_norm(&last));
        Staged {
            model,
            idx: idx.shallow_clone(),
            autocast,
            stages,
            last,
            hidden,
        }
    }

    /// The backward from `d_hidden`, the loss's gradient in `hidden`: parameter gradients
    /// accumulate into `.grad` as one backward of the whole graph would leave them.
    pub(super) fn backward(self, d_hidden: &Tensor) {
        let bf16 = |f: &dyn Fn() -> Tensor| crate::autocast::bf16(self.autocast, f);
        (&self.hidden * d_hidden).sum(Kind::Float).backward();
        let mut grad = self.last.grad();
        for (i, stage) in self.stages.into_iter().enumerate().rev() {
            let (input, output) = match stage.output {
                Some(out) => (stage.input, out),
                None => {
                    let input = stage.input.set_requires_grad(true);
                    let out = bf16(&|| self.model.block(i, &input));
                    (input, out)
                }
            };
            (output * &grad).sum(Kind::Float).backward();
            grad = input.grad();
        }
        let embedded = bf16(&|| self.model.embed_tokens(&self.idx));
        (embedded * grad).sum(Kind::Float).backward();
    }
}
