//! The training loop of one rank (DESIGN §4) as a [`Trainer`] value, in three parts as
//! torchtitan's trainer: `Trainer::new` sets the run up (communicator, data, model, resume),
//! `Trainer::step` runs one optimizer step (micro-batches with gradient accumulation, gradient
//! all-reduce over the flat buffer, a non-finite guard, global-norm clipping, AdamW with warmup
//! and cosine by optimizer step) and what falls due after it (metrics, validation, periodic
//! checkpoints), and `Trainer::finish` validates, saves the last checkpoint and reports.
//!
//! Precision: `32-true` fp32; `bf16-mixed` bf16 autocast on CUDA with fp32 master weights
//! (CPU autocast is a no-op, so CPU runs are fp32); `bf16-true` bf16 weights.
//! Several ranks (DDP, DESIGN §5): rank 0's initial weights are broadcast, gradients summed
//! over the one flat buffer after the last micro-batch (the loss is scaled by 1/(accum·world),
//! so the sum is the mean), the logged loss is the global mean, only rank 0 logs and writes;
//! ranks agree on stopping (signal, max_time) through the per-step all-reduce, so all of
//! them checkpoint the same step.
//! Host syncs: one per step, after the whole step (loss, flags, norm, clipping, AdamW skipped
//! on the device when the loss or norm is not finite) is queued; tokens reach a GPU from
//! pinned memory without a sync.
//!
//! Test faults (faults.rs, given in [`TrainOptions`]): a NaN gradient at chosen optimizer steps
//! (the non-finite guard end to end), a stop at a chosen step (as a signal).
//! Not here: the loss and its chunked backward (train/loss.rs), validation
//! (train/validation.rs), initial weights (train/initial.rs), where data comes from
//! (datasource.rs), how gradients travel between ranks (optim/sync.rs), tensor ↔ bytes
//! (checkpoint/).

mod initial;
pub(crate) mod loss;
pub(crate) mod memory;
mod outdir;
mod recompute;
mod validation;

use crate::budget::Budget;
use crate::checkpoint::{self, TrainState};
use crate::config::{Precision, RunConfig, Sharding};
use crate::data::{EvalLoader, LoaderConfig, LoaderPosition, Split, TrainLoader};
use crate::device::{self, DeviceKind};
use crate::dist::{self, Backend, Communicator, RankInfo};
use crate::error::BadInput;
use crate::faults::Faults;
use crate::metrics::{self, MetricsWriter, TrainRecord};
use crate::optim::{self, AdamW, FlatParams, GradSync};
use crate::{datasource, signals};
use anyhow::{bail, Context};
use loss::{loss_and_backward, tokens_to_batch};
use mla_model::{stats, Gpt};
use mla_storage::{BlockingCheckpointStore, StepName};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use tracing::{debug, info, warn};
use validation::Validation;

/// Flags of `mla train` that are not config keys.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub device: Option<DeviceKind>,
    /// Skip the memory check (`mla train --force`).
    pub force: bool,
    /// Faults injected by the end-to-end tests (`Faults::none()` otherwise).
    pub faults: Faults,
}

/// Model, optimizer and the flat buffers they share.
pub(crate) struct Trainable {
    pub(crate) _vs: VarStore,
    pub(crate) model: Gpt,
    pub(crate) flat: FlatParams,
    pub(crate) opt: AdamW,
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

/// Run training as configured: set up, optimizer steps until the budget is spent or a stop is
/// agreed, then finish (validation, the last checkpoint, the summary).
pub fn run(cfg: RunConfig, opts: &TrainOptions) -> anyhow::Result<()> {
    let mut trainer = match Trainer::new(cfg, opts) {
        Ok(t) => t,
        // SIGTERM/SIGINT while the data was being prepared: stop now, with nothing to save.
        Err(e) if stopped_preparing_data(&e) => {
            info!("stop requested during data preparation: nothing was trained, nothing is saved");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let end = loop {
        if let Some(end) = trainer.end()? {
            break end;
        }
        trainer.step()?;
    };
    trainer.finish(end)
}

/// Whether `e` is the data preparation's answer to a stop request.
fn stopped_preparing_data(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<crate::data::DataError>(),
            Some(crate::data::DataError::Interrupted)
        )
    })
}

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The step budget (max_steps, max_tokens, epochs) or max_time is spent.
    Budget,
    /// A signal (or the test hook) asked to stop: checkpoint this step and exit 0.
    Stopped,
}

/// Throughput bookkeeping between two metric lines.
struct Window {
    start: Instant,
    tokens: u64,
    data_secs: f64,
    reduce_secs: f64,
}

impl Window {
    fn new() -> Window {
        Window {
            start: Instant::now(),
            tokens: 0,
            data_secs: 0.0,
            reduce_secs: 0.0,
        }
    }
}

/// Warn when the config's `devices × num_nodes` is not the number of ranks this run has (srun
/// and mpirun start what they are told, not what the config says).
fn warn_if_other_ranks(cfg: &RunConfig, world_size: usize) {
    if let crate::config::Devices::Count(d) = cfg.devices {
        let want = d * cfg.num_nodes;
        if want != world_size {
            warn!(
                "the config's devices: {d} × num_nodes: {} ask for {want} rank(s), but this run has {world_size}: mla-launch starts what they say; srun and mpirun start what they are told",
                cfg.num_nodes
            );
        }
    }
}

/// The run's data on this rank: the tokenizer directory, the training loader (this rank's
/// windows of each global batch) and validation over this rank's share of the val split.
fn open_data(
    cfg: &RunConfig,
    rank: &RankInfo,
    comm: &dyn Communicator,
    device: Device,
    autocast: bool,
) -> anyhow::Result<(PathBuf, TrainLoader, Validation)> {
    let (tokenizer_dir, dataset) = datasource::open_once_per_node(cfg, rank, comm)?;
    crate::data::check_vocab(&dataset, cfg.model().padded_vocab_size() as u64)?;
    let seq_len = cfg.train.max_seq_length.unwrap_or(cfg.model().block_size);
    let micro = cfg.train.micro_batch_size;
    let accum = cfg.grad_accum_steps(rank.world_size).map_err(BadInput)?;
    let data_seed = cfg
        .data
        .as_ref()
        .and_then(|d| d.init_args.seed)
        .unwrap_or(cfg.seed);
    let loader = TrainLoader::new(
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
    Ok((tokenizer_dir, loader, validation))
}

/// The model in `param_kind` on `device`, its flat buffers (a gradient buffer only where
/// gradients are all-reduced; sharded only with `dist.shard`) and AdamW over them.
fn build_trainable(
    cfg: &RunConfig,
    rank: &RankInfo,
    comm: &dyn Communicator,
    device: Device,
    param_kind: Kind,
) -> anyhow::Result<(Trainable, GradSync)> {
    let mut vs = VarStore::new(device);
    let model = Gpt::new(&vs.root(), cfg.model())?;
    if param_kind == Kind::BFloat16 {
        vs.bfloat16();
    }
    let reduces = all_reduces(rank.world_size, comm);
    let sharding = cfg.dist.shard;
    if sharding != Sharding::None && !reduces && rank.is_main() {
        info!(
            "dist.shard {}: one rank without a communicator holds everything anyway; not sharded",
            sharding.as_str()
        );
    }
    let flat = match sharding {
        Sharding::None if reduces => FlatParams::new(&vs, param_kind)?,
        _ if !reduces => FlatParams::without_grad_buffer(&vs, param_kind)?,
        s => FlatParams::sharded(&vs, param_kind, s, rank.rank, rank.world_size)?,
    };
    // p.grad = None: the first backward of each step hands its gradients over (optim.rs).
    flat.clear_grads()?;
    let a = &cfg.optimizer.init_args;
    let opt = AdamW::new(&flat, a.betas, a.eps, a.weight_decay);
    let sync = GradSync::for_flat(&flat, reduces, cfg.dist.bucket_mb);
    Ok((
        Trainable {
            _vs: vs,
            model,
            flat,
            opt,
        },
        sync,
    ))
}

/// The state the run starts from: a resumed checkpoint's (its weights, moments and data
/// position restored), or step 0 with `initial_checkpoint_dir`'s weights when set. Every rank
/// must arrive at the same step.
fn restore_or_start(
    cfg: &RunConfig,
    rank: &RankInfo,
    comm: &dyn Communicator,
    store: &BlockingCheckpointStore,
    t: &mut Trainable,
    loader: &mut TrainLoader,
    tokenizer_dir: &Path,
) -> anyhow::Result<TrainState> {
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
        cfg,
        store,
        &t.flat,
        &mut t.opt,
        rank.world_size,
        tokenizer_dir,
    )? {
        let s = restored.state;
        loader.restore(step_position(&s.loaders, rank.world_size)?)?;
        state = TrainState {
            world_size: rank.world_size,
            ..s
        };
    } else if let Some(dir) = &cfg.initial_checkpoint_dir {
        initial::load(cfg, &t.flat, dir, tokenizer_dir)?;
    }
    if rank.world_size > 1 {
        // Every rank must continue from the same step (out_dir is storage all ranks see).
        let steps = dist::all_gather_host(comm, &[state.step as f64])?;
        if let Some((r, s)) = steps.iter().enumerate().find(|(_, s)| s[0] != steps[0][0]) {
            bail!(
                "rank {r} resumed at step {} but rank 0 at step {}: every rank must see the same out_dir ({})",
                s[0], steps[0][0], cfg.out_dir
            );
        }
    }
    Ok(state)
}

/// One rank's training run: everything [`Trainer::new`] sets up and [`Trainer::step`] and
/// [`Trainer::finish`] use.
pub(crate) struct Trainer {
    cfg: RunConfig,
    rank: RankInfo,
    device: Device,
    comm: Box<dyn Communicator>,
    autocast: bool,
    micro: usize,
    seq_len: usize,
    accum: usize,
    loader: TrainLoader,
    validation: Validation,
    budget: Budget,
    t: Trainable,
    /// How gradients and parameters travel between ranks (DDP, ZeRO, or not at all).
    sync: GradSync,
    store: BlockingCheckpointStore,
    saver: checkpoint::Saver,
    metrics: Option<MetricsWriter>,
    state: TrainState,
    flops_per_token: f64,
    peak_flops: Option<f64>,
    stop_at_step: Option<u64>,
    /// Steps whose gradients a test fault poisons (faults.rs).
    nan_grad_steps: Vec<u64>,
    run_start: Instant,
    /// Training wall time of the run before this process (from the checkpoint).
    elapsed_before: f64,
    window: Window,
    consecutive_nonfinite: usize,
    /// Stop consensus: any rank's stop request or max_time ends the run for all, at one step.
    stop_agreed: bool,
    time_agreed: bool,
    /// The step this process started from (0, or the resumed step).
    first_step: u64,
    /// Rank 0's ownership of the out_dir, held until the run ends.
    lease: Option<mla_storage::Lease>,
}

impl Trainer {
    /// Set up one rank: device and communicator, data, model and optimizer, the checkpoint
    /// store and resume, metrics and the start-up report.
    pub(crate) fn new(cfg: RunConfig, opts: &TrainOptions) -> anyhow::Result<Trainer> {
        let rank = RankInfo::from_env().map_err(BadInput)?;
        device::apply_omp_num_threads();
        let device = device::select(opts.device, rank.local_rank)?;
        dist::choose_backend(cfg.dist.backend, rank.world_size, device.is_cuda())
            .map_err(BadInput)?;
        let stall = opts.faults.stall_rank == Some(rank.rank);
        let comm = dist::connect(&cfg.dist, &rank, device, stall)?;
        let (precision, autocast, param_kind) = precision_for(&cfg, device);
        let main = rank.is_main();
        if main {
            warn_if_other_ranks(&cfg, rank.world_size);
        }
        signals::install();

        // Before any work: will it fit, and may this run write its out_dir (rank 0 probes it,
        // takes its lease, refuses to overwrite another run, clears crashed saves' leftovers).
        let estimate = memory::estimate(
            cfg.model(),
            &cfg.train,
            &cfg.dist,
            param_kind,
            autocast,
            rank.world_size,
        );
        let free = memory::check(&estimate, device, opts.force)?;
        // A location that cannot be opened (a local path under a file, a read-only disk) is
        // the user's choice of out_dir: one line, exit 2, before any work.
        let store = BlockingCheckpointStore::open(&cfg.out_dir)
            .map_err(|e| BadInput(format!("out_dir {}: {e}", cfg.out_dir)))?;
        let lease = if main {
            Some(outdir::claim(&cfg, &store)?)
        } else {
            None
        };
        tch::manual_seed(cfg.seed as i64);

        // Data: a first run downloads/tokenizes into a cache, once per node.
        let (tokenizer_dir, mut loader, validation) =
            open_data(&cfg, &rank, comm.as_ref(), device, autocast)?;
        let (seq_len, micro) = (validation.seq_len, validation.micro);
        let accum = loader.config().grad_accum_steps;
        let budget = Budget::new(
            &cfg.train,
            cfg.model().block_size,
            rank.world_size,
            loader.windows_per_epoch(),
        )
        .map_err(BadInput)?;

        // Model, flat buffers, optimizer: the same initial weights on every rank.
        let (mut t, sync) = build_trainable(&cfg, &rank, comm.as_ref(), device, param_kind)?;
        comm.broadcast(&mut t.flat.params, 0)?;

        // Resume, or start fresh (from initial_checkpoint_dir's weights when set).
        let state = restore_or_start(
            &cfg,
            &rank,
            comm.as_ref(),
            &store,
            &mut t,
            &mut loader,
            &tokenizer_dir,
        )?;

        let metrics = if main {
            let dir = local_metrics_dir(&cfg);
            // What stops these files is in the out_dir (a link planted there, no permission).
            Some(
                MetricsWriter::create(&dir, cfg.logger_name)
                    .map_err(|e| BadInput(format!("metrics files in {}: {e}", dir.display())))?,
            )
        } else {
            None
        };
        let flops_per_token = stats::flops_per_token(cfg.model());
        if main {
            report_start(
                &cfg,
                &rank,
                comm.as_ref(),
                device,
                (precision, autocast, param_kind),
                &budget,
                &state,
                flops_per_token,
                &t.flat,
            );
            match free {
                Some(free) => info!(
                    "memory: this run needs at least {}; {} free",
                    estimate.describe(),
                    metrics::human_bytes(free)
                ),
                None => info!("memory: this run needs at least {}", estimate.describe()),
            }
        }

        let saver = checkpoint::Saver::new(&cfg, &store, &tokenizer_dir, main)?;
        let stop_at_step = opts.faults.stop_at_step;
        let mut stop_agreed = false;
        if rank.world_size > 1 {
            let mut flag = [f64::from(u8::from(
                signals::stop_requested() || stop_at_step == Some(state.step),
            ))];
            comm.all_reduce_host(&mut flag)?;
            stop_agreed = flag[0] > 0.0;
        }
        let elapsed_before = state.elapsed_secs;
        let first_step = state.step;
        let mut trainer = Trainer {
            cfg,
            rank,
            device,
            comm,
            autocast,
            micro,
            seq_len,
            accum,
            loader,
            validation,
            budget,
            t,
            sync,
            store,
            saver,
            metrics,
            state,
            flops_per_token,
            peak_flops: device::peak_flops(device),
            stop_at_step,
            nan_grad_steps: opts.faults.nan_grad_steps.clone(),
            run_start: Instant::now(),
            elapsed_before,
            window: Window::new(),
            consecutive_nonfinite: 0,
            stop_agreed,
            time_agreed: false,
            first_step,
            lease,
        };
        if trainer.cfg.eval.initial_validation && trainer.state.step == 0 {
            trainer.validate()?;
        }
        Ok(trainer)
    }

    /// Training wall time of the whole run so far (across resumes).
    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.run_start.elapsed().as_secs_f64()
    }

    /// Whether the run ends before the next step, and why.
    pub(crate) fn end(&self) -> anyhow::Result<Option<End>> {
        let alone = self.rank.world_size == 1;
        let max_time = self.cfg.train.max_time;
        if self
            .budget
            .total_steps
            .is_some_and(|n| self.state.step >= n)
            || self.time_agreed
            || (alone && max_time.is_some_and(|m| self.elapsed() >= m))
        {
            return Ok(Some(End::Budget));
        }
        if self.stop_agreed
            || (alone && (signals::stop_requested() || self.stop_at_step == Some(self.state.step)))
        {
            return Ok(Some(End::Stopped));
        }
        Ok(None)
    }

    /// One optimizer step: forward/backward over the accumulation micro-batches, gradient
    /// all-reduce, the non-finite guard, clipping and AdamW; then what falls due after it
    /// (metric line, validation, periodic checkpoint).
    pub(crate) fn step(&mut self) -> anyhow::Result<()> {
        let (loss, norm, lr) = self.optimizer_step()?;
        self.saver.poll()?; // report a background save that finished
        let tokens = self.budget.tokens_per_step;
        self.state.step += 1;
        self.state.tokens_seen += tokens;
        self.window.tokens += tokens;

        let total = self.budget.total_steps;
        let step = self.state.step;
        if step.is_multiple_of(self.cfg.train.log_interval as u64) || total == Some(step) {
            self.log_step(loss, norm, lr)?;
        }
        let last = total == Some(step);
        if step.is_multiple_of(self.cfg.eval.interval as u64)
            && !(last && self.cfg.eval.final_validation)
        {
            self.validate()?;
            self.window.start = Instant::now(); // keep eval time out of tokens/s
        }
        if self
            .cfg
            .train
            .save_interval
            .is_some_and(|s| step.is_multiple_of(s as u64))
            && !last
        {
            self.save(StepName::Step(step), false)?;
            self.window.start = Instant::now();
        }
        Ok(())
    }

    /// The step's arithmetic; returns (global mean loss, gradient norm, learning rate).
    fn optimizer_step(&mut self) -> anyhow::Result<(f64, f64, f64)> {
        let (device, world) = (self.device, self.rank.world_size);
        let mut loss_sum = Tensor::zeros([], (Kind::Float, device));
        for _ in 0..self.accum {
            let data_start = Instant::now();
            let tokens = self.loader.next_micro_batch()?;
            self.window.data_secs += data_start.elapsed().as_secs_f64();
            let (x, y) = tokens_to_batch(&tokens, self.micro, self.seq_len, device)?;
            let scale = 1.0 / (self.accum * world) as f64;
            loss_sum += loss_and_backward(
                &self.t.model,
                &x,
                &y,
                self.autocast,
                scale,
                self.cfg.train.activation_checkpointing,
            );
        }
        if self.nan_grad_steps.contains(&(self.state.step + 1)) {
            // Before the reduction, so it reaches every rank as a real NaN gradient would.
            if let Some(g) = self.t.flat.grads_list()?.first() {
                let _ = tch::no_grad(|| g.shallow_clone().fill_(f64::NAN));
            }
        }
        let reduce_start = Instant::now();
        if self.sync.reduce(&mut self.t.flat, self.comm.as_ref())? {
            self.window.reduce_secs += reduce_start.elapsed().as_secs_f64();
        }
        // Queued on the device, read back once at the end: this rank's mean loss and its stop
        // flags (and, sharded, its slice's squared gradient norm), summed over ranks in one
        // small all-reduce; the gradient norm; the non-finite flag that skips AdamW on the
        // device; clipping by a coefficient that stays there.
        let time_up = self.cfg.train.max_time.is_some_and(|m| self.elapsed() >= m);
        let stop = signals::stop_requested() || self.stop_at_step == Some(self.state.step + 1);
        let flag = |on: bool| Tensor::full([], f64::from(u8::from(on)), (Kind::Double, device));
        let norm_sq = self.sync.norm_sq_part(&self.t.flat)?;
        let mut shared = Tensor::stack(
            &[
                loss_sum.to_kind(Kind::Double) / self.accum as f64,
                flag(stop),
                flag(time_up),
                norm_sq,
            ],
            0,
        );
        self.comm.all_reduce_sum(&mut shared)?;
        let norm = self.sync.global_norm(&self.t.flat, &shared.get(3))?;
        let found_inf = tch::no_grad(|| {
            (shared.get(0).isfinite().logical_and(&norm.isfinite()))
                .logical_not()
                .to_kind(Kind::Float)
        });
        if let Some(max_norm) = self.cfg.train.max_norm {
            self.sync.clip(&self.t.flat, &norm, max_norm)?;
        }
        let lr = optim::lr_at(
            self.state.step,
            self.cfg.optimizer.init_args.lr,
            self.cfg.train.min_lr,
            self.budget.warmup_steps,
            self.budget.total_steps,
        );
        self.t.opt.step_unless(&self.t.flat, lr, &found_inf)?;
        // Sharded: every rank's updated slice to every rank (unchanged slices when skipped).
        let gather_start = Instant::now();
        if self.sync.after_update(&self.t.flat, self.comm.as_ref())? {
            self.window.reduce_secs += gather_start.elapsed().as_secs_f64();
        }
        // The step's one host sync, with all of the step's work already queued.
        let host = Vec::<f64>::try_from(
            Tensor::cat(
                &[
                    shared,
                    norm.to_kind(Kind::Double).reshape([1]),
                    found_inf.to_kind(Kind::Double).reshape([1]),
                ],
                0,
            )
            .to_device(Device::Cpu),
        )?;
        let loss = host[0] / world as f64;
        self.stop_agreed = host[1] > 0.0;
        self.time_agreed = host[2] > 0.0;
        let norm = host[4];
        if host[5] > 0.0 {
            self.consecutive_nonfinite += 1;
            self.state.skipped_steps += 1;
            let n = self.consecutive_nonfinite;
            warn!(
                "step {}: non-finite {} — update skipped ({n} in a row)",
                self.state.step + 1,
                if loss.is_finite() {
                    format!("gradient norm ({norm})")
                } else {
                    format!("loss ({loss})")
                }
            );
            if n >= self.cfg.train.max_nonfinite_steps {
                bail!(
                    "{n} optimizer steps in a row had a non-finite loss or gradient (train.max_nonfinite_steps); stopping — lower optimizer.init_args.lr or check the data"
                );
            }
        } else {
            self.consecutive_nonfinite = 0;
            self.t.opt.applied();
        }
        self.t.flat.clear_grads()?;
        Ok((loss, norm, lr))
    }

    /// The metric line of this step (rank 0), and a fresh throughput window.
    fn log_step(&mut self, loss: f64, norm: f64, lr: f64) -> anyhow::Result<()> {
        let world = self.rank.world_size;
        let secs = self.window.start.elapsed().as_secs_f64();
        let tps = self.window.tokens as f64 / secs.max(1e-9);
        let record = TrainRecord {
            step: self.state.step,
            tokens: self.state.tokens_seen,
            loss,
            lr,
            grad_norm: norm,
            tokens_per_sec: tps,
            mfu: self
                .peak_flops
                .map(|p| self.flops_per_token * tps / (p * world as f64)),
            peak_memory_bytes: peak_memory(self.device),
            elapsed_secs: self.elapsed(),
            skipped_steps: self.state.skipped_steps,
            data_wait_frac: (self.window.data_secs / secs.max(1e-9)).min(1.0),
        };
        if let Some(m) = &mut self.metrics {
            info!("{}", metrics::train_line(&record, self.budget.total_steps));
            m.train(&record).context("writing metrics")?;
            if self.window.reduce_secs > 0.0 {
                let w = &self.window;
                debug!(
                    "step {}: gradient all-reduce {:.1} ms per step, {:.1}% of step time",
                    self.state.step,
                    w.reduce_secs * 1e3 * self.budget.tokens_per_step as f64 / w.tokens as f64,
                    100.0 * w.reduce_secs / secs.max(1e-9)
                );
            }
        }
        self.window = Window::new();
        Ok(())
    }

    fn validate(&mut self) -> anyhow::Result<()> {
        self.validation.run(
            &self.t.model,
            self.comm.as_ref(),
            &mut self.metrics,
            &mut self.state,
        )
    }

    /// Checkpoint the current step as `name` (every rank's loader position goes into it);
    /// `last`: the run's last save. Never after another run took the out_dir over (rank 0's
    /// lease says so).
    fn save(&mut self, name: StepName, last: bool) -> anyhow::Result<()> {
        if let Some(lease) = &self.lease {
            lease
                .check()
                .with_context(|| format!("checkpoint {name} not saved"))?;
        }
        self.state.loaders = loader_positions(self.comm.as_ref(), &self.loader)?;
        self.state.elapsed_secs = self.elapsed();
        let (flat, opt) = (&self.t.flat, &self.t.opt);
        // Sharded, the whole moments are gathered on rank 0 (every rank takes part); only
        // rank 0 writes, so the others' slices never reach the saver.
        let gathered = self.sync.gather_moments(flat, opt, self.comm.as_ref())?;
        let moments = match &gathered {
            Some((exp_avg, exp_avg_sq)) => optim::Moments {
                exp_avg,
                exp_avg_sq,
                step: opt.step,
            },
            None => opt.moments(),
        };
        if last {
            self.saver.save_last(name, flat, moments, &self.state)
        } else {
            self.saver.save(name, flat, moments, &self.state)
        }
    }

    /// Final validation (unless stopped), the last checkpoint (`final/`, or the step a stop
    /// was agreed at), the end of the uploads and of the communicator, and the summary line.
    pub(crate) fn finish(mut self, end: End) -> anyhow::Result<()> {
        let stopped = end == End::Stopped;
        if self.cfg.eval.final_validation && !stopped {
            self.validate()?;
        }
        let name = if stopped {
            StepName::Step(self.state.step)
        } else {
            StepName::Final
        };
        let main = self.rank.is_main();
        if stopped && self.state.step == self.first_step {
            // Nothing was trained in this process: a save would only write untrained (or
            // already saved) weights, and rewriting a resumed step hides it meanwhile.
            if main {
                info!(
                    "stop requested before the first optimizer step: nothing new to save (step {})",
                    self.state.step
                );
            }
            self.saver.finish()?;
            self.comm.finish()?;
            return Ok(());
        }
        if stopped && main {
            info!(
                "stop requested: saving step {} before exiting",
                self.state.step
            );
        }
        self.save(name.clone(), true)?;
        self.saver.finish()?;
        self.comm.finish()?;
        if main {
            info!(
                "done: {} steps, {} tokens in {:.1} s; checkpoint {}/{}",
                self.state.step,
                self.state.tokens_seen,
                self.run_start.elapsed().as_secs_f64(),
                self.store.url().trim_end_matches('/'),
                name
            );
        }
        Ok(())
    }
}

/// Rank 0's start-up report: model, device, precision, dist, SDPA backend, budget.
#[allow(clippy::too_many_arguments)]
fn report_start(
    cfg: &RunConfig,
    rank: &RankInfo,
    comm: &dyn Communicator,
    device: Device,
    (precision, autocast, param_kind): (Precision, bool, Kind),
    budget: &Budget,
    state: &TrainState,
    flops_per_token: f64,
    flat: &FlatParams,
) {
    let m = cfg.model();
    let (micro, seq_len) = (
        cfg.train.micro_batch_size,
        cfg.train.max_seq_length.unwrap_or(m.block_size),
    );
    info!(
        "model {}: {} attention, {} parameters, {:.3e} FLOPs/token; device {}; precision {}",
        m.name,
        m.attention_kind().name(),
        stats::parameters(m),
        flops_per_token,
        device::describe(device),
        precision.as_str(),
    );
    if rank.world_size > 1 || comm.backend() != Backend::Single {
        info!(
            "dist: {} rank(s) ({}), backend {}, gradient buckets of {} MiB, collective timeout {} s",
            rank.world_size,
            rank.source,
            comm.backend().as_str(),
            cfg.dist.bucket_mb,
            cfg.dist.timeout_secs
        );
    }
    if let Some(s) = &flat.shard {
        let (lo, hi) = s.owned();
        let what = match s.sharding {
            Sharding::Gradients => "AdamW moments and gradients",
            _ => "AdamW moments",
        };
        info!(
            "dist.shard {} (ZeRO-{}): each rank keeps the {what} of its 1/{} slice ({} parameters here, [{lo}, {hi}) of {}); gradients are reduce-scattered, parameters all-gathered after each step",
            s.sharding.as_str(),
            if s.sharding == Sharding::Gradients { 2 } else { 1 },
            s.world,
            hi - lo,
            s.numel
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
    // MLA trains through per-head K/V (the naive form); the others pass their K/V groups.
    let kv_heads = match m.attention_kind() {
        mla_model::AttentionKind::Mla(_) => m.n_head,
        _ => m.n_query_groups(),
    };
    info!(
        "SDPA backend for (B={micro}, H={}, KV heads {kv_heads}, T={seq_len}, q/k {dqk}, v {dv}, {kind:?}): {}",
        m.n_head,
        device::sdpa_backend(
            micro as i64,
            (m.n_head as i64, kv_heads as i64),
            seq_len as i64,
            (dqk as i64, dv as i64),
            kind,
            device
        )
    );
    let (lines, warnings) = budget.report(&cfg.train, &cfg.eval);
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

/// The data position a checkpoint's `loaders` (one per rank that saved it, all equal at a step
/// boundary) give every rank of a run of `world_size`: the position counts global batches, so
/// any world size that splits the global batch continues it (issue 15). A position inside a
/// step (never saved, but refused) only continues on the world size that saved it.
fn step_position(
    loaders: &[LoaderPosition],
    world_size: usize,
) -> Result<&LoaderPosition, BadInput> {
    let first = loaders
        .first()
        .ok_or_else(|| BadInput("checkpoint state has no loader position".into()))?;
    if let Some((r, other)) = loaders.iter().enumerate().find(|(_, p)| *p != first) {
        return Err(BadInput(format!(
            "checkpoint state: loader position of rank {r} (epoch {}, cursor {}, micro-step {}) differs from rank 0's (epoch {}, cursor {}, micro-step {}); the checkpoint was not taken at a step boundary",
            other.epoch, other.cursor, other.micro_step, first.epoch, first.cursor, first.micro_step
        )));
    }
    if first.micro_step != 0 && loaders.len() != world_size {
        return Err(BadInput(format!(
            "checkpoint state: saved by {} rank(s) inside a step (micro-step {}); resume it with {} rank(s)",
            loaders.len(),
            first.micro_step,
            loaders.len()
        )));
    }
    Ok(first)
}

/// Whether the gradients go through the communicator every step: with a peer, and with a real
/// communicator even alone (one GPU under `--dist.backend nccl` in scripts/gpu_check.sh).
fn all_reduces(world_size: usize, comm: &dyn Communicator) -> bool {
    world_size > 1 || comm.backend() != Backend::Single
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

    fn at(cursor: u64, micro_step: u64) -> LoaderPosition {
        LoaderPosition {
            version: 1,
            epoch: 0,
            cursor,
            micro_step,
            seed: 7,
            block_size: 8,
            windows_per_epoch: 100,
            global_batch_windows: 8,
        }
    }

    /// A step-boundary position of 2 ranks continues on 1 or 4; one inside a step only on 2;
    /// ranks that disagree are refused.
    #[test]
    fn a_step_position_continues_on_any_world_size_at_a_step_boundary() {
        let two = [at(16, 0), at(16, 0)];
        for world in [1, 2, 4] {
            assert_eq!(step_position(&two, world).unwrap(), &at(16, 0));
        }
        let inside = [at(16, 1), at(16, 1)];
        assert!(step_position(&inside, 2).is_ok());
        let e = step_position(&inside, 4).unwrap_err().0;
        assert!(e.contains("resume it with 2 rank(s)"), "{e}");
        let e = step_position(&[at(16, 0), at(24, 0)], 2).unwrap_err().0;
        assert!(e.contains("not taken at a step boundary"), "{e}");
        assert!(step_position(&[], 1).is_err());
    }
}
