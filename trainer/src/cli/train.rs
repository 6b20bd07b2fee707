//! `mla train --config F [--device cpu|cuda] [--section.key value …]`: one training rank.
//! `mla-launch` starts one per GPU (or several CPU ranks under mpirun); run it directly for a
//! single rank, or under srun/mpirun for clusters.

use crate::config::{Override, RunConfig};
use crate::device::DeviceKind;
use crate::faults::Faults;
use crate::train::{self, TrainOptions};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Run config (litgpt pretrain YAML).
    #[arg(long)]
    config: PathBuf,
    /// Compute device (default: CUDA when available, else CPU).
    #[arg(long, value_enum)]
    device: Option<DeviceKind>,
    /// A fresh run (resume: false) into an out_dir that holds checkpoints deletes them first
    /// (same as --checkpoint.overwrite true); without it such a run is refused.
    #[arg(long)]
    overwrite: bool,
    /// Train even when the memory estimate exceeds what the device has free.
    #[arg(long)]
    force: bool,
}

pub fn run(args: &TrainArgs, overrides: &[Override]) -> anyhow::Result<()> {
    let mut cfg = RunConfig::load(&args.config, overrides)?;
    cfg.checkpoint.overwrite |= args.overwrite;
    train::run(
        cfg,
        &TrainOptions {
            device: args.device,
            force: args.force,
            faults: Faults::from_env()?,
        },
    )
}
