//! The training loop of one rank (DESIGN §4): micro-batches with gradient accumulation,
//! gradient all-reduce over the flat buffer, global-norm clipping, AdamW with warmup + cosine
//! by optimizer step, a non-finite guard, metrics, periodic validation and checkpoints.
//!
//! Precision: `32-true` fp32; `bf16-mixed` bf16 autocast on CUDA with fp32 master weights
//! (CPU autocast is a no-op, so CPU runs are fp32); `bf16-true` bf16 weights.
//! Several ranks (DDP, DESIGN §5): rank 0's initial weights are broadcast, gradients summed
//! over the one flat buffer after the last micro-batch (the loss is scaled by 1/(accum·world),
//! so the sum is the mean), the logged loss is the global mean, only rank 0 logs and writes;
//! ranks agree on stopping (signal, max_time) through the per-step host all-reduce, so all of
//! them checkpoint the same step.
//! Not here: where data comes from (datasource.rs), tensor ↔ bytes (checkpoint.rs).

use crate::budget::Budget;
use crate::checkpoint::{self, TrainState};
use crate::config::{Precision, RunConfig};
use crate::data::{EvalLoader, LoaderConfig, LoaderPosition, Split, TrainLoader};
use crate::device::{self, DeviceKind};
use crate::dist::{self, Communicator, RankInfo};
use crate::error::BadInput;
use crate::metrics::{self, EvalRecord, MetricsWriter, TrainRecord};
use crate::optim::{self, AdamW, FlatParams};
use crate::{datasource, signals};
use anyhow::{bail, Context};
use mla_model::{stats, Gpt};
use mla_storage::{BlockingCheckpointStore, StepName};
use std::path::PathBuf;
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Reduction, Tensor};
use tracing::{debug, info, warn};

/// Flags of `mla train` that are not config keys.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub device: Option<DeviceKind>,
}

/// Model, optimizer and the flat buffers they share.
pub(crate) struct Trainable {
    pub(crate) _vs: VarStore,
    pub(crate) model: Gpt,
    pub(crate) flat: FlatParams,
    pub(crate) opt: AdamW,
}

fn tokens_to_batch(
    tokens: &[i64],
    micro: usize,
    seq_len: usize,
    device: Device,
) -> (Tensor, Tensor) {
    let t = Tensor::from_slice(tokens)
        .view([micro as i64, seq_len as i64 + 1])
        .to_device(device);
    (
        t.narrow(1, 0, seq_len as i64),
        t.narrow(1, 1, seq_len as i64),
    )
}

/// Mean cross-entropy of next-token prediction for inputs (B, T) and targets (B, T).
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
const LOGITS_CHUNK_BYTES: i64 = 256 << 20;

/// Forward and backward of the mean next-token cross-entropy, scaled by `scale` for the
/// backward; returns the unscaled loss (0-dim fp32, detached). The same gradients as
/// `(loss_of(..) * scale).backward()`, but the vocabulary projection and the loss run over
/// chunks of rows, each chunk's backward right after its forward, so at most one chunk of fp32
/// logits (and its log-softmax and gradient) is alive instead of all of them: for pythia-160m
/// at 4 × 2048 tokens that is 256 MiB instead of 1.6 GiB per copy. The trunk's backward then
/// runs once from the accumulated gradient of the hidden states.
fn loss_and_backward(model: &Gpt, x: &Tensor, y: &Tensor, autocast: bool, scale: f64) -> Tensor {
    chunked_loss_and_backward(model, x, y, autocast, scale, LOGITS_CHUNK_BYTES)
}

/// [`loss_and_backward`] with the chunk size as a parameter (tests force several chunks).
fn chunked_loss_and_backward(
    model: &Gpt,
    x: &Tensor,
    y: &Tensor,
    autocast: bool,
    scale: f64,
    chunk_bytes: i64,
) -> Tensor {
    let hidden = crate::autocast::bf16(autocast, || model.hidden(x)); // (B, T, C)
    let c = hidden.size()[2];
    let rows = hidden.numel() as i64 / c;
    let vocab = model.config().padded_vocab_size() as i64;
    let chunk = (chunk_bytes / (vocab * 4)).clamp(1, rows);
    // A leaf cut from the trunk: the chunks' backward passes accumulate into its .grad.
    let cut = hidden.detach().set_requires_grad(true);
    let (flat, targets) = (cut.view([rows, c]), y.reshape([rows]));
    let mut sum = Tensor::zeros([], (Kind::Float, x.device()));
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
        (&chunk_sum * (scale / rows as f64)).backward();
        sum += chunk_sum.detach();
        start += n;
    }
    // d(loss)/d(hidden) is in cut.grad; push it through the trunk.
    (hidden * cut.grad()).sum(Kind::Float).backward();
    sum / rows as f64
}

/// Resolved precision policy for a device.
fn precision_for(cfg: &RunConfig, device: Device) -> (Precision, bool, Kind) {
    let p = cfg.precision.unwrap_or(if device.is_cuda() {
        Precision::Bf16Mixed
    } else {
        Precision::Fp32
    });
    match p {
        Precision::Fp32 => (p, false, Kind::Float),
        Precision::Bf16Mixed => (p, device.is_cuda(), Kind::Float),
        Precision::Bf16True => (p, false, Kind::BFloat16),
    }
}

/// Validation over the eval loader: mean loss of every rank's micro-batches.
struct Validation {
    loader: EvalLoader,
    micro: usize,
    seq_len: usize,
    device: Device,
    autocast: bool,
}

impl Validation {
    fn loss(&self, model: &Gpt, comm: &dyn Communicator) -> anyhow::Result<f64> {
        let mut sums = [0.0, 0.0];
        tch::no_grad(|| -> anyhow::Result<()> {
            for batch in self.loader.iter() {
                let (x, y) = tokens_to_batch(&batch?, self.micro, self.seq_len, self.device);
                sums[0] += loss_of(model, &x, &y, self.autocast).double_value(&[]);
                sums[1] += 1.0;
            }
            Ok(())
        })?;
        comm.all_reduce_host(&mut sums)?;
        Ok(sums[0] / sums[1].max(1.0))
    }

    /// Evaluate, log (rank 0) and record the loss in `state`.
    fn run(
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

/// Run training as configured; returns when the budget is spent (or on SIGTERM, after a
/// checkpoint of the current step).
pub fn run(cfg: RunConfig, opts: &TrainOptions) -> anyhow::Result<()> {
    let rank = RankInfo::from_env().map_err(BadInput)?;
    device::apply_omp_num_threads();
    let device = device::select(opts.device, rank.local_rank)?;
    dist::choose_backend(cfg.dist.backend, rank.world_size, device.is_cuda()).map_err(BadInput)?;
    let mut comm = dist::connect(&cfg.dist, &rank, device)?;
    let (precision, autocast, param_kind) = precision_for(&cfg, device);
    let main = rank.is_main();
    signals::install();
    tch::manual_seed(cfg.seed as i64);

    // Data. Rank 0 first: a first run downloads/tokenizes into a cache all ranks share, which
    // the others then open (their wait is bounded by dist.timeout_secs).
    if !main {
        comm.barrier()?;
    }
    let tokenizer_dir = datasource::tokenizer_dir(&cfg)?;
    let dataset = datasource::open(&cfg, &tokenizer_dir)?;
    if main && rank.world_size > 1 {
        comm.barrier()?;
    }
    crate::data::check_vocab(&dataset, cfg.model().padded_vocab_size() as u64)?;
    let seq_len = cfg.train.max_seq_length.unwrap_or(cfg.model().block_size);
    let micro = cfg.train.micro_batch_size;
    let accum = cfg.grad_accum_steps(rank.world_size).map_err(BadInput)?;
    let data_seed = cfg
        .data
        .as_ref()
        .and_then(|d| d.init_args.seed)
        .unwrap_or(cfg.seed);
    let mut loader = TrainLoader::new(
        dataset.split(Split::Train),
        LoaderConfig {
            block_size: seq_len,
            micro_batch_size: micro,
            grad_accum_steps: accum,
            rank: rank.rank,
            world_size: rank.world_size,
            seed: data_seed,
        },
    )?;
    let validation = Validation {
        loader: EvalLoader::new(
            dataset.split(Split::Val),
            seq_len,
            micro,
            rank.rank,
            rank.world_size,
            Some(cfg.eval.max_iters as u64),
        )?,
        micro,
        seq_len,
        device,
        autocast,
    };
    let budget =
        Budget::new(&cfg, rank.world_size, loader.windows_per_epoch()).map_err(BadInput)?;

    // Model, flat buffers, optimizer.
    let mut vs = VarStore::new(device);
    let model = Gpt::new(&vs.root(), cfg.model())?;
    if param_kind == Kind::BFloat16 {
        vs.bfloat16();
    }
    let flat = FlatParams::new(&vs, param_kind)?;
    // p.grad = None: the first backward of each step hands its gradients over (optim.rs).
    flat.clear_grads()?;
    let a = &cfg.optimizer.init_args;
    let opt = AdamW::new(&flat, a.betas, a.eps, a.weight_decay);
    let mut t = Trainable {
        _vs: vs,
        model,
        flat,
        opt,
    };
    comm.broadcast(&mut t.flat.params, 0)?;

    // Checkpoint store and resume.
    let store = BlockingCheckpointStore::open(&cfg.out_dir)
        .with_context(|| format!("out_dir {}", cfg.out_dir))?;
    let mut state = TrainState {
        version: checkpoint::STATE_VERSION,
        step: 0,
        tokens_seen: 0,
        loaders: Vec::new(),
        world_size: rank.world_size,
        seed: cfg.seed,
        skipped_steps: 0,
        elapsed_secs: 0.0,
        last_val_loss: None,
    };
    if let Some(restored) = checkpoint::resume(
        &cfg,
        &store,
        &t.flat,
        &mut t.opt,
        rank.world_size,
        &tokenizer_dir,
    )? {
        let s = restored.state;
        loader.restore(rank_position(&s.loaders, rank.rank)?)?;
        state = TrainState {
            world_size: rank.world_size,
            ..s
        };
    }

    if rank.world_size > 1 {
        // Every rank must continue from the same step (out_dir is storage all ranks see).
        let steps = dist::all_gather_host(comm.as_ref(), &[state.step as f64])?;
        if let Some((r, s)) = steps.iter().enumerate().find(|(_, s)| s[0] != steps[0][0]) {
            bail!(
                "rank {r} resumed at step {} but rank 0 at step {}: every rank must see the same out_dir ({})",
                s[0], steps[0][0], cfg.out_dir
            );
        }
    }

    let flops_per_token = stats::flops_per_token(cfg.model());
    let peak_flops = device::peak_flops(device);
    let mut metrics = if main {
        Some(
            MetricsWriter::create(&local_metrics_dir(&cfg), cfg.logger_name)
                .context("metrics files")?,
        )
    } else {
        None
    };
    if main {
        let m = cfg.model();
        info!(
            "model {}: {} attention, {} parameters, {:.3e} FLOPs/token; device {}; precision {}",
            m.name,
            m.attention_kind().name(),
            stats::parameters(m),
            flops_per_token,
            device::describe(device),
            precision.as_str(),
        );
        if rank.world_size > 1 || comm.backend() != "single" {
            info!(
                "dist: {} rank(s) ({}), backend {}, gradient buckets of {} MiB, collective timeout {} s",
                rank.world_size,
                rank.source,
                comm.backend(),
                cfg.dist.bucket_mb,
                cfg.dist.timeout_secs
            );
        }
        if precision == Precision::Bf16Mixed && !device.is_cuda() {
            info!("bf16-mixed: autocast is CUDA-only, so this CPU run computes in fp32");
        } else if autocast {
            crate::autocast::set_cuda_bf16();
            info!(
                "bf16-mixed: CUDA autocast computes in {} over fp32 master weights",
                crate::autocast::cuda_dtype_name()
            );
        }
        let (dqk, dv) = m.sdpa_head_dims();
        let kind = if autocast { Kind::BFloat16 } else { param_kind };
        info!(
            "SDPA backend for (B={micro}, H={}, T={seq_len}, q/k {dqk}, v {dv}, {kind:?}): {}",
            m.n_head,
            device::sdpa_backend(
                micro as i64,
                m.n_head as i64,
                seq_len as i64,
                (dqk as i64, dv as i64),
                kind,
                device
            )
        );
        let (lines, warnings) = budget.report(&cfg);
        for l in lines {
            info!("{l}");
        }
        for w in warnings {
            warn!("{w}");
        }
        if state.step > 0 {
            info!(
                "resumed at step {} ({} tokens seen)",
                state.step, state.tokens_seen
            );
        }
    }

    let mut saver = checkpoint::Saver::new(&cfg, &store, &tokenizer_dir, main)?;
    let stop_at_step = checkpoint::stop_at_step_from_env()?;
    let total = budget.total_steps;
    let run_start = Instant::now();
    let elapsed_before = state.elapsed_secs;
    let mut window_start = Instant::now();
    let mut window_tokens = 0u64;
    let mut consecutive_nonfinite = 0usize;
    let mut stopped_by_signal = false;
    // Stop consensus: any rank's stop request or max_time ends the run for all, at one step.
    let mut stop_agreed = false;
    let mut time_agreed = false;
    let mut window_reduce_secs = 0.0;
    let mut window_data_secs = 0.0;
    if rank.world_size > 1 {
        let mut flag = [f64::from(u8::from(
            signals::stop_requested() || stop_at_step == Some(state.step),
        ))];
        comm.all_reduce_host(&mut flag)?;
        stop_agreed = flag[0] > 0.0;
    }

    if cfg.eval.initial_validation && state.step == 0 {
        validation.run(&t.model, comm.as_ref(), &mut metrics, &mut state)?;
    }

    loop {
        let elapsed = elapsed_before + run_start.elapsed().as_secs_f64();
        let alone = rank.world_size == 1;
        if total.is_some_and(|n| state.step >= n)
            || time_agreed
            || (alone && cfg.train.max_time.is_some_and(|m| elapsed >= m))
        {
            break;
        }
        if stop_agreed || (alone && (signals::stop_requested() || stop_at_step == Some(state.step)))
        {
            stopped_by_signal = true;
            break;
        }
        // Forward/backward over the accumulation micro-batches.
        let mut loss_sum = Tensor::zeros([], (Kind::Float, device));
        for _ in 0..accum {
            let data_start = Instant::now();
            let tokens = loader.next_micro_batch()?;
            window_data_secs += data_start.elapsed().as_secs_f64();
            let (x, y) = tokens_to_batch(&tokens, micro, seq_len, device);
            let scale = 1.0 / (accum * rank.world_size) as f64;
            loss_sum += loss_and_backward(&t.model, &x, &y, autocast, scale);
        }
        if rank.world_size > 1 {
            // One flat buffer for the bucketed all-reduce: gather (copy) the gradients into it.
            let reduce_start = Instant::now();
            t.flat.gather_grads()?;
            comm.all_reduce_sum(&mut t.flat.grads)?;
            window_reduce_secs += reduce_start.elapsed().as_secs_f64();
        }
        let time_up = cfg
            .train
            .max_time
            .is_some_and(|m| elapsed_before + run_start.elapsed().as_secs_f64() >= m);
        let stop = signals::stop_requested() || stop_at_step == Some(state.step + 1);
        let mut host = [
            loss_sum.double_value(&[]) / accum as f64,
            f64::from(u8::from(stop)),
            f64::from(u8::from(time_up)),
        ];
        comm.all_reduce_host(&mut host)?;
        let loss = host[0] / rank.world_size as f64;
        stop_agreed = host[1] > 0.0;
        time_agreed = host[2] > 0.0;
        let norm = optim::grad_norm(&t.flat)?.double_value(&[]);
        let lr = optim::lr_at(
            state.step,
            cfg.optimizer.init_args.lr,
            cfg.train.min_lr,
            budget.warmup_steps,
            total,
        );
        if !loss.is_finite() || !norm.is_finite() {
            consecutive_nonfinite += 1;
            state.skipped_steps += 1;
            warn!(
                "step {}: non-finite {} — update skipped ({consecutive_nonfinite} in a row)",
                state.step + 1,
                if loss.is_finite() {
                    format!("gradient norm ({norm})")
                } else {
                    format!("loss ({loss})")
                }
            );
            if consecutive_nonfinite >= cfg.train.max_nonfinite_steps {
                bail!(
                    "{consecutive_nonfinite} optimizer steps in a row had a non-finite loss or gradient (train.max_nonfinite_steps); stopping — lower optimizer.init_args.lr or check the data"
                );
            }
        } else {
            consecutive_nonfinite = 0;
            if let Some(max_norm) = cfg.train.max_norm {
                optim::clip_grads(&t.flat, norm, max_norm)?;
            }
            t.opt.step(&t.flat, lr)?;
        }
        t.flat.clear_grads()?;
        saver.poll()?; // report a background save that finished
        state.step += 1;
        state.tokens_seen += budget.tokens_per_step;
        window_tokens += budget.tokens_per_step;

        if state.step % cfg.train.log_interval as u64 == 0 || total == Some(state.step) {
            let secs = window_start.elapsed().as_secs_f64();
            let tps = window_tokens as f64 / secs.max(1e-9);
            let record = TrainRecord {
                step: state.step,
                tokens: state.tokens_seen,
                loss,
                lr,
                grad_norm: norm,
                tokens_per_sec: tps,
                mfu: peak_flops.map(|p| flops_per_token * tps / (p * rank.world_size as f64)),
                peak_memory_bytes: peak_memory(device),
                elapsed_secs: elapsed_before + run_start.elapsed().as_secs_f64(),
                skipped_steps: state.skipped_steps,
                data_wait_frac: (window_data_secs / secs.max(1e-9)).min(1.0),
            };
            if let Some(m) = &mut metrics {
                info!("{}", metrics::train_line(&record, total));
                m.train(&record).context("writing metrics")?;
                if rank.world_size > 1 {
                    debug!(
                        "step {}: gradient all-reduce {:.1} ms per step, {:.1}% of step time",
                        state.step,
                        window_reduce_secs * 1e3 * budget.tokens_per_step as f64
                            / window_tokens as f64,
                        100.0 * window_reduce_secs / secs.max(1e-9)
                    );
                }
            }
            window_reduce_secs = 0.0;
            window_data_secs = 0.0;
            window_start = Instant::now();
            window_tokens = 0;
        }
        let last = total == Some(state.step);
        if state.step % cfg.eval.interval as u64 == 0 && !(last && cfg.eval.final_validation) {
            validation.run(&t.model, comm.as_ref(), &mut metrics, &mut state)?;
            window_start = Instant::now(); // keep eval time out of tokens/s
        }
        if cfg
            .train
            .save_interval
            .is_some_and(|s| state.step % s as u64 == 0)
            && !last
        {
            state.loaders = loader_positions(comm.as_ref(), &loader)?;
            state.elapsed_secs = elapsed_before + run_start.elapsed().as_secs_f64();
            saver.save(StepName::Step(state.step), &t.flat, &t.opt, &state)?;
            window_start = Instant::now();
        }
    }

    if cfg.eval.final_validation && !stopped_by_signal {
        validation.run(&t.model, comm.as_ref(), &mut metrics, &mut state)?;
    }
    state.loaders = loader_positions(comm.as_ref(), &loader)?;
    state.elapsed_secs = elapsed_before + run_start.elapsed().as_secs_f64();
    let name = if stopped_by_signal {
        info!("stop requested: saving step {} before exiting", state.step);
        StepName::Step(state.step)
    } else {
        StepName::Final
    };
    saver.save(name.clone(), &t.flat, &t.opt, &state)?;
    saver.finish()?;
    comm.finish()?;
    if main {
        info!(
            "done: {} steps, {} tokens in {:.1} s; checkpoint {}/{}",
            state.step,
            state.tokens_seen,
            run_start.elapsed().as_secs_f64(),
            store.url().trim_end_matches('/'),
            name
        );
    }
    Ok(())
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

fn peak_memory(device: Device) -> Option<u64> {
    match device {
        Device::Cpu => device::peak_host_memory_bytes(),
        Device::Cuda(i) => device::peak_gpu_memory_bytes(i),
        _ => None,
    }
}

/// Every rank's loader position, by rank. At optimizer-step boundaries they are equal by
/// construction; they are gathered so the checkpoint records what each rank had.
fn loader_positions(
    comm: &dyn Communicator,
    loader: &TrainLoader,
) -> anyhow::Result<Vec<LoaderPosition>> {
    let mine = loader.state();
    if comm.world_size() == 1 {
        return Ok(vec![mine]);
    }
    let at = [mine.epoch, mine.cursor, mine.micro_step].map(|v| v as f64);
    Ok(dist::all_gather_host(comm, &at)?
        .iter()
        .map(|v| LoaderPosition {
            epoch: v[0] as u64,
            cursor: v[1] as u64,
            micro_step: v[2] as u64,
            ..mine.clone()
        })
        .collect())
}

/// This rank's position from a checkpoint's `loaders`, which must hold one per rank, all equal.
fn rank_position(loaders: &[LoaderPosition], rank: usize) -> Result<&LoaderPosition, BadInput> {
    let mine = loaders.get(rank).ok_or_else(|| {
        BadInput(format!(
            "checkpoint state has {} loader position(s), rank {rank} needs its own",
            loaders.len()
        ))
    })?;
    if let Some((r, other)) = loaders.iter().enumerate().find(|(_, p)| *p != mine) {
        return Err(BadInput(format!(
            "checkpoint state: loader position of rank {r} (epoch {}, cursor {}, micro-step {}) differs from rank {rank}'s (epoch {}, cursor {}, micro-step {}); the checkpoint was not taken at a step boundary",
            other.epoch, other.cursor, other.micro_step, mine.epoch, mine.cursor, mine.micro_step
        )));
    }
    Ok(mine)
}

/// Where metrics files go: out_dir itself when local, else `.cache/mla/runs/<name>`.
fn local_metrics_dir(cfg: &RunConfig) -> PathBuf {
    let out = &cfg.out_dir;
    match out.split_once("://") {
        None => PathBuf::from(out),
        Some(("file", path)) => PathBuf::from(path),
        Some((_, rest)) => PathBuf::from(".cache/mla/runs").join(rest.replace('/', "_")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mla_model::{LatentAttention, ModelConfig};

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
        let loss = chunked_loss_and_backward(&model, &x, &y, false, scale, 5 * 128 * 4);
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
        println!(
            "Δ chunked loss's gradients, of their largest entry: {worst:.2e} (bound {grad_tol:.2e})"
        );
    }
}
