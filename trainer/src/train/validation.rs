//! Validation during training: the mean loss over the eval loader's micro-batches of every
//! rank, logged by rank 0 and recorded in the train state.
//!
//! Not here: `mla eval` of a saved checkpoint (cli/eval.rs).

use super::loss::{mean_loss, tokens_to_batch};
use crate::checkpoint::TrainState;
use crate::data::EvalLoader;
use crate::dist::Communicator;
use crate::metrics::{EvalRecord, MetricsWriter};
use anyhow::Context;
use mla_model::Gpt;
use std::time::Instant;
use tch::Device;
use tracing::info;

/// Validation over the eval loader: mean loss of every rank's micro-batches.
pub(super) struct Validation {
    pub(super) loader: EvalLoader,
    pub(super) micro: usize,
    pub(super) seq_len: usize,
    pub(super) device: Device,
    pub(super) autocast: bool,
}

impl Validation {
    fn loss(&self, model: &Gpt, comm: &dyn Communicator) -> anyhow::Result<f64> {
        let mut sums = [0.0, 0.0];
        tch::no_grad(|| -> anyhow::Result<()> {
            for batch in self.loader.iter() {
                let (x, y) = tokens_to_batch(&batch?, self.micro, self.seq_len, self.device)?;
                sums[0] += mean_loss(model, &x, &y, self.autocast).double_value(&[]);
                sums[1] += 1.0;
            }
            Ok(())
        })?;
        comm.all_reduce_host(&mut sums)?;
        Ok(sums[0] / sums[1].max(1.0))
    }

    /// Evaluate, log (rank 0) and record the loss in `state`.
    pub(super) fn run(
        &self,
        model: &Gpt,
        comm: &dyn Communicator,
        metrics: &mut Option<MetricsWriter>,
        state: &mut TrainState,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        let val = self.loss(model, comm)?;
        log_eval(metrics, state.step, state.tokens_seen, val, start)?;
        state.last_val_loss = Some(val);
        Ok(())
    }
}

fn log_eval(
    metrics: &mut Option<MetricsWriter>,
    step: u64,
    tokens: u64,
    val: f64,
    start: Instant,
) -> anyhow::Result<()> {
    if let Some(m) = metrics {
        let r = EvalRecord {
            step,
            tokens,
            val_loss: val,
            val_ppl: val.exp(),
            eval_secs: start.elapsed().as_secs_f64(),
        };
        info!(
            "step {step} | val loss {val:.4} | val ppl {:.2} | {:.1} s",
            r.val_ppl, r.eval_secs
        );
        m.eval(&r).context("writing metrics")?;
    }
    Ok(())
}
