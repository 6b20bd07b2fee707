//! `mla-launch` as a library: parse flags, select the device, plan the ranks, then run attempts
//! (restarting the group with `--resume auto` up to `--max-restarts` times). The binary
//! (`main.rs`) only maps the result to an exit code. No tch: ranks are `mla train` processes and
//! everything passes through argv and environment (torchrun's contract, see README.md).
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod cli;
pub mod device;
pub mod output;
pub mod plan;
pub mod proctree;
pub mod run_config;
pub mod shim;
pub mod status;
pub mod supervise;

use crate::plan::{display_cmd, Launch, Plan};
use crate::status::{RankExit, Who, BAD_INPUT_CODE};
use crate::supervise::{Event, Outcome, Supervisor};
use anyhow::Context;
use std::ffi::OsString;
use std::fmt;
use std::sync::mpsc;

/// A problem with the flags or the environment the user can fix; exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadInput(pub String);

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// The group ended badly: the launcher exits with this rank's code (128+signal for a signal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupFailed {
    pub who: Who,
    pub exit: RankExit,
    /// Why the run ended here, e.g. "restarts exhausted (3)".
    pub note: String,
}

impl fmt::Display for GroupFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.who, self.exit)?;
        if !self.note.is_empty() {
            write!(f, " ({})", self.note)?;
        }
        Ok(())
    }
}

impl std::error::Error for GroupFailed {}

/// Exit code for an error chain: a failed group's rank code, 2 for bad input, else 1.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for e in err.chain() {
        if let Some(g) = e.downcast_ref::<GroupFailed>() {
            return u8::try_from(g.exit.code())
                .ok()
                .filter(|&c| c != 0)
                .unwrap_or(1);
        }
        if e.is::<BadInput>() {
            return BAD_INPUT_CODE as u8;
        }
    }
    1
}

/// Run the launcher on argv (without the program name). Ok means every rank exited 0 (or was
/// stopped cleanly on request).
pub fn run(argv: Vec<OsString>) -> anyhow::Result<()> {
    let (mut args, passthrough) = cli::parse(&argv);
    // litgpt's `devices` and `num_nodes` in the config are the defaults of --gpus/--nproc and
    // --nnodes: never silently ignored.
    let hints = run_config::read(&args.config, &passthrough)?;
    if args.gpus.is_none() && args.nproc.is_none() {
        if let Some(d) = hints.devices {
            tracing::info!(
                "{d} rank(s) per node from the config's devices: {d} (--gpus/--nproc override it)"
            );
            args.nproc = Some(d);
        }
    }
    if args.nnodes.is_none() {
        if let Some(n) = hints.num_nodes.filter(|&n| n > 1) {
            tracing::info!("{n} nodes from the config's num_nodes: {n} (--nnodes overrides it)");
        }
        args.nnodes = Some(hints.num_nodes.unwrap_or(1));
    }
    let sel = device::select(args.gpus, args.device, args.nproc, device::probe_gpus)?;
    if sel.defaulted {
        match sel.device {
            cli::Device::Cuda => {
                tracing::info!("using all {} visible GPUs (--gpus N to choose)", sel.nproc)
            }
            cli::Device::Cpu => tracing::info!(
                "no NVIDIA GPU visible: training on {} CPU rank(s) (--device cpu)",
                sel.nproc
            ),
        }
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()));
    let mla = plan::resolve_mla(args.mla.as_deref(), exe_dir.as_deref(), plan::which)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let omp_set = std::env::var_os("OMP_NUM_THREADS").is_some();
    let launcher = std::env::current_exe().context("locating mla-launch itself (the rank shim)")?;
    let plan = Plan::new(
        &args,
        sel,
        passthrough,
        mla,
        launcher,
        plan::which,
        omp_set,
        cores,
    )?;
    if let Some(t) = plan.omp_threads {
        tracing::info!(
            "OMP_NUM_THREADS={t} for each of {} ranks ({cores} cores; set OMP_NUM_THREADS to override)",
            plan.nproc
        );
    }

    proctree::become_subreaper();
    let (tx, rx) = mpsc::channel();
    watch_signals(tx.clone()).context("installing signal handlers")?;
    let sup = Supervisor {
        plan: &plan,
        tx,
        rx: &rx,
    };
    let mut attempt = 0;
    loop {
        let port = match plan.master_port {
            Some(p) => p,
            None => plan::free_port().context("finding a free port for MASTER_PORT")?,
        };
        let procs = plan.procs(attempt > 0, port);
        log_start(&plan, port, &procs);
        let outcome = sup.run_attempt(attempt, &procs)?;
        match outcome {
            Outcome::Succeeded => {
                tracing::info!("all {} ranks exited 0", plan.nproc);
                return Ok(());
            }
            Outcome::Interrupted { bad: None } => {
                tracing::info!("stopped on request: all ranks exited 0");
                return Ok(());
            }
            Outcome::Interrupted {
                bad: Some((who, exit)),
            } => {
                return Err(GroupFailed {
                    who,
                    exit,
                    note: "while stopping on request".into(),
                }
                .into())
            }
            Outcome::Failed {
                who,
                exit,
                signalled: during_stop,
            } => {
                let fail =
                    |note: String| -> anyhow::Error { GroupFailed { who, exit, note }.into() };
                if exit.code() == BAD_INPUT_CODE {
                    let note = if plan.max_restarts > 0 {
                        "bad input: not restarting"
                    } else {
                        ""
                    };
                    return Err(fail(note.into()));
                }
                if attempt >= plan.max_restarts {
                    let note = if plan.max_restarts > 0 {
                        format!("after {} restart(s)", plan.max_restarts)
                    } else {
                        String::new()
                    };
                    return Err(fail(note));
                }
                if during_stop || signalled(&rx) {
                    return Err(fail("launcher signalled: not restarting".into()));
                }
                attempt += 1;
                tracing::warn!(
                    "restart {attempt}/{}: {who} {exit}; restarting all ranks with --resume auto",
                    plan.max_restarts
                );
            }
        }
    }
}

/// Forward SIGINT/SIGTERM/SIGHUP to the supervisor as events, for the launcher's lifetime.
fn watch_signals(tx: mpsc::Sender<Event>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if tx.send(Event::Signal(sig)).is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// Whether a signal arrived between attempts (stale exit events are dropped).
fn signalled(rx: &mpsc::Receiver<Event>) -> bool {
    let mut any = false;
    while let Ok(ev) = rx.try_recv() {
        any |= matches!(ev, Event::Signal(_));
    }
    any
}

fn log_start(plan: &Plan, port: u16, procs: &[plan::ProcSpec]) {
    let nodes = if plan.nnodes > 1 {
        format!(
            ", node {} of {}, ranks {}..{}",
            plan.node_rank,
            plan.nnodes,
            plan.node_rank * plan.nproc,
            (plan.node_rank + 1) * plan.nproc - 1
        )
    } else {
        String::new()
    };
    match &plan.launch {
        Launch::Mpirun { .. } => tracing::info!(
            "starting {} CPU ranks under mpirun (MPI backend){nodes}: {}",
            plan.nproc,
            display_cmd(&procs[0].program, &procs[0].args)
        ),
        Launch::Direct => tracing::info!(
            "starting {} {} rank(s), world size {}{nodes}, MASTER_ADDR={} MASTER_PORT={port}: {}",
            plan.nproc,
            plan.device.as_str(),
            plan.world_size(),
            plan.master_addr,
            display_cmd(&procs[0].program, &procs[0].args)
        ),
    }
}
