//! The run's arithmetic, computed once and printed at start-up: tokens per optimizer step,
//! gradient accumulation, total steps (from max_steps / max_tokens / epochs), warmup, and
//! whether save/eval intervals can ever fire (the seed's run saved every 1000 of 381 steps).

use crate::config::{EvalConfig, TrainConfig};

#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub world_size: usize,
    pub micro_batch_size: usize,
    pub grad_accum_steps: usize,
    pub global_batch_size: usize,
    /// Training window length T.
    pub seq_len: usize,
    pub tokens_per_step: u64,
    /// Optimizer steps to run (None: until max_time).
    pub total_steps: Option<u64>,
    /// Which limit set `total_steps`.
    pub limited_by: &'static str,
    pub warmup_steps: u64,
    pub windows_per_epoch: u64,
    pub steps_per_epoch: f64,
}

impl Budget {
    /// The budget of `train:` for `world_size` ranks, a model of `block_size` and a dataset
    /// of `windows_per_epoch` training windows.
    pub fn new(
        t: &TrainConfig,
        block_size: usize,
        world_size: usize,
        windows_per_epoch: u64,
    ) -> Result<Budget, String> {
        let grad_accum_steps = t.grad_accum_steps(world_size)?;
        let seq_len = t.max_seq_length.unwrap_or(block_size);
        let tokens_per_step = (t.global_batch_size * seq_len) as u64;
        let steps_per_epoch = windows_per_epoch as f64 / t.global_batch_size as f64;
        let mut limits: Vec<(u64, &'static str)> = Vec::new();
        if let Some(s) = t.max_steps {
            limits.push((s as u64, "train.max_steps"));
        }
        if let Some(tok) = t.max_tokens {
            limits.push((tok / tokens_per_step, "train.max_tokens"));
        }
        if let Some(e) = t.epochs {
            limits.push(((e as f64 * steps_per_epoch).floor() as u64, "train.epochs"));
        }
        let (total_steps, limited_by) = match limits.into_iter().min_by_key(|(s, _)| *s) {
            Some((s, by)) => (Some(s), by),
            None if t.max_time.is_some() => (None, "train.max_time"),
            None => {
                return Err(
                    "no training budget: set train.max_steps, train.max_tokens, train.epochs or train.max_time".into(),
                )
            }
        };
        if total_steps == Some(0) {
            return Err(format!(
                "{limited_by} allows 0 optimizer steps of {tokens_per_step} tokens ({} samples × {seq_len} tokens)",
                t.global_batch_size
            ));
        }
        let warmup_steps = match (t.lr_warmup_steps, t.lr_warmup_fraction) {
            (_, Some(f)) => (f * steps_per_epoch).ceil() as u64,
            (Some(s), None) => s as u64,
            (None, None) => 0,
        };
        let warmup_steps = total_steps.map_or(warmup_steps, |n| warmup_steps.min(n));
        Ok(Budget {
            world_size,
            micro_batch_size: t.micro_batch_size,
            grad_accum_steps,
            global_batch_size: t.global_batch_size,
            seq_len,
            tokens_per_step,
            total_steps,
            limited_by,
            warmup_steps,
            windows_per_epoch,
            steps_per_epoch,
        })
    }

    /// Human lines: the arithmetic, then warnings for intervals that never fire.
    pub fn report(&self, train: &TrainConfig, eval: &EvalConfig) -> (Vec<String>, Vec<String>) {
        let mut lines = vec![format!(
            "batch: {} samples/step = {} micro × {} accumulation × {} rank(s); {} tokens/step ({} × {} tokens)",
            self.global_batch_size,
            self.micro_batch_size,
            self.grad_accum_steps,
            self.world_size,
            self.tokens_per_step,
            self.global_batch_size,
            self.seq_len
        )];
        match self.total_steps {
            Some(n) => lines.push(format!(
                "budget: {n} optimizer steps ({} tokens, {:.2} epochs; limited by {}), warmup {} steps, cosine to min_lr {}",
                n * self.tokens_per_step,
                n as f64 / self.steps_per_epoch.max(1e-12),
                self.limited_by,
                self.warmup_steps,
                train.min_lr
            )),
            None => lines.push(format!(
                "budget: until train.max_time = {} s; warmup {} steps then constant lr",
                train.max_time.unwrap_or_default(),
                self.warmup_steps
            )),
        }
        lines.push(format!(
            "data: {} windows of {} tokens per epoch = {:.1} steps/epoch",
            self.windows_per_epoch,
            self.seq_len + 1,
            self.steps_per_epoch
        ));
        let mut warnings = Vec::new();
        if let Some(n) = self.total_steps {
            if let Some(s) = train.save_interval {
                if s as u64 > n {
                    warnings.push(format!(
                        "train.save_interval = {s} but the run has only {n} steps: no intermediate checkpoint will be written (only final/)"
                    ));
                }
            }
            if eval.interval as u64 > n {
                let when = match (eval.initial_validation, eval.final_validation) {
                    (true, true) => "validation runs only at the start and at the end",
                    (false, true) => "validation runs only at the end",
                    (true, false) => "validation runs only at the start",
                    (false, false) => {
                        "validation never runs (eval.initial_validation and eval.final_validation are false)"
                    }
                };
                warnings.push(format!(
                    "eval.interval = {} but the run has only {n} steps: {when}",
                    eval.interval
                ));
            }
            if self.warmup_steps >= n && n > 1 {
                warnings.push(format!(
                    "warmup ({} steps) covers the whole run ({n} steps)",
                    self.warmup_steps
                ));
            }
        }
        if self.steps_per_epoch < 1.0 {
            warnings.push(format!(
                "one epoch holds only {} windows, fewer than one global batch ({}): batches repeat data within a step",
                self.windows_per_epoch, self.global_batch_size
            ));
        }
        (lines, warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunConfig;

    fn budget(c: &RunConfig, world: usize, windows: u64) -> Result<Budget, String> {
        Budget::new(&c.train, c.model().block_size, world, windows)
    }

    fn cfg(extra: &str) -> RunConfig {
        let yaml = format!(
            "model_name: pythia-160m\ntrain:\n  global_batch_size: 128\n  micro_batch_size: 4\n  max_tokens: 100000000\n  save_interval: 1000\n{extra}eval:\n  interval: 1000\n"
        );
        RunConfig::from_yaml(&yaml, "t.yaml", &[]).unwrap()
    }

    #[test]
    fn the_seed_run_has_381_steps_and_its_intervals_never_fire() {
        let c = cfg("");
        let b = budget(&c, 1, 1_000_000).unwrap();
        assert_eq!(b.tokens_per_step, 128 * 2048);
        assert_eq!(b.grad_accum_steps, 32);
        assert_eq!(b.total_steps, Some(381));
        assert_eq!(b.limited_by, "train.max_tokens");
        let (_, warnings) = b.report(&c.train, &c.eval);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("save_interval = 1000")
                && warnings[1].contains("eval.interval = 1000")
        );
    }

    #[test]
    fn the_eval_warning_says_when_validation_still_runs() {
        let when = |initial: bool, fin: bool| {
            let yaml = format!(
                "model_name: pythia-14m\ntrain:\n  global_batch_size: 4\n  micro_batch_size: 4\n  max_steps: 10\neval:\n  interval: 100\n  initial_validation: {initial}\n  final_validation: {fin}\n"
            );
            let c = RunConfig::from_yaml(&yaml, "t.yaml", &[]).unwrap();
            let (_, warnings) = budget(&c, 1, 1_000_000).unwrap().report(&c.train, &c.eval);
            warnings
                .into_iter()
                .find(|w| w.starts_with("eval.interval = 100 "))
                .unwrap()
        };
        assert!(when(true, true).ends_with("only at the start and at the end"));
        assert!(when(false, true).ends_with("only at the end"));
        assert!(when(true, false).ends_with("only at the start"));
        assert!(when(false, false).contains("validation never runs"));
    }

    #[test]
    fn the_smallest_limit_wins_and_accumulation_splits_over_ranks() {
        let c = cfg("  max_steps: 50\n");
        let b = budget(&c, 4, 1_000_000).unwrap();
        assert_eq!((b.total_steps, b.limited_by), (Some(50), "train.max_steps"));
        assert_eq!(b.grad_accum_steps, 8);
        assert!(budget(&c, 3, 1_000_000).is_err());
    }

    #[test]
    fn a_run_without_any_limit_is_refused() {
        let c = RunConfig::from_yaml("model_name: pythia-14m\n", "t.yaml", &[]).unwrap();
        assert!(budget(&c, 1, 1000)
            .unwrap_err()
            .contains("no training budget"));
    }
}
