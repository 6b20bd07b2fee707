//! The `mla-launch` command line: the launcher's own flags (clap) and the split of argv into
//! those flags and the arguments passed through, verbatim, to every `mla train` rank.
//! Not here: device detection (`device.rs`), rank commands (`plan.rs`), processes (`supervise.rs`).

use clap::{Parser, ValueEnum};
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;

/// Where ranks compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// One rank per NVIDIA GPU (NCCL); rank `i` on a node uses `cuda:LOCAL_RANK`.
    Cuda,
    /// CPU ranks (`--nproc`, default 1); more than one runs under `mpirun` (MPI backend).
    Cpu,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cuda => "cuda",
            Device::Cpu => "cpu",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "mla-launch",
    version,
    about = "Spawn and supervise `mla train` ranks: one per GPU, or CPU ranks under mpirun",
    after_help = "Every argument that is not a launcher flag is passed verbatim to each rank, e.g. \
                  `mla-launch --gpus 8 --config cfg.yaml --train.max_steps 20 --out_dir out/x`; \
                  everything after `--` is passed through even if it looks like a launcher flag.\n\
                  Ranks run `<mla> train --device cuda|cpu --config F <args>` with RANK, LOCAL_RANK, \
                  WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT set (torchrun's contract)."
)]
pub struct LaunchArgs {
    /// Run N ranks on this node, one per GPU (implies --device cuda). Default with CUDA: the
    /// config's `devices`, else all visible GPUs.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub gpus: Option<u32>,

    /// Train on `cuda` or `cpu`. Default: cuda when an NVIDIA GPU is visible, else one CPU rank.
    #[arg(long, value_enum)]
    pub device: Option<Device>,

    /// Ranks per node (CPU ranks with --device cpu; same as --gpus with cuda). Default on CPU:
    /// the config's `devices`, else 1.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub nproc: Option<u32>,

    /// Number of nodes (torchrun-style: start mla-launch once on every node). Default: the
    /// config's `num_nodes`, else 1.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub nnodes: Option<u32>,

    /// This node's index in 0..nnodes: RANK = node_rank * nproc + LOCAL_RANK.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub node_rank: u32,

    /// Address of node 0, where rank 0 listens for the rendezvous (required with --nnodes > 1).
    #[arg(long, value_name = "ADDR")]
    pub master_addr: Option<String>,

    /// Rendezvous port on the master. Default: a free port (one node) or 29500 (several nodes).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub master_port: Option<u16>,

    /// Restart the whole group up to K times after a rank fails, appending `--resume auto`.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub max_restarts: u32,

    /// The `mla` binary to run. Default: `mla` next to mla-launch, else `mla` on PATH.
    #[arg(long, value_name = "PATH")]
    pub mla: Option<PathBuf>,

    /// Prefix rank 0's output with `[rank 0] ` too (by default it is passed through unprefixed).
    #[arg(long)]
    pub prefix_rank0: bool,

    /// Run config (YAML), passed to every rank as `--config F`.
    #[arg(long, value_name = "F")]
    pub config: PathBuf,

    /// After a rank fails: seconds the other ranks get between SIGTERM and SIGKILL.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = parse_secs)]
    pub grace_secs: f64,

    /// After SIGINT/SIGTERM to the launcher: seconds ranks get to checkpoint and exit before SIGKILL.
    #[arg(long, value_name = "SECS", default_value_t = 300.0, value_parser = parse_secs)]
    pub stop_timeout_secs: f64,
}

fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds >= 0")),
    }
}

/// argv (without the program name) split into the launcher's own arguments and the ones passed
/// through to the ranks, each in its original order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SplitArgs {
    pub launcher: Vec<OsString>,
    pub passthrough: Vec<OsString>,
}

/// Split argv: a launcher flag (`--gpus 2`, `--gpus=2`, `-h`) may appear anywhere; every other
/// argument, and everything after a literal `--`, is passed through untouched. The flag table
/// comes from clap so the two never disagree.
pub fn split_args(argv: &[OsString]) -> SplitArgs {
    let flags = launcher_flags();
    let mut out = SplitArgs::default();
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            out.passthrough.extend(it.by_ref().cloned());
            break;
        }
        let name = arg.to_str().and_then(|s| {
            if let Some(long) = s.strip_prefix("--") {
                Some((long.split('=').next().unwrap_or(long), long.contains('=')))
            } else if s.len() == 2 && s.starts_with('-') {
                Some((s, false))
            } else {
                None
            }
        });
        match name.and_then(|(n, inline)| flags.get(n).map(|&takes| takes && !inline)) {
            Some(takes_next) => {
                out.launcher.push(arg.clone());
                if takes_next {
                    if let Some(v) = it.next() {
                        out.launcher.push(v.clone());
                    }
                }
            }
            None => out.passthrough.push(arg.clone()),
        }
    }
    out
}

/// Launcher flag names (`gpus`, and `-h`-style shorts) → whether the flag takes a value.
fn launcher_flags() -> HashMap<String, bool> {
    use clap::CommandFactory;
    let mut cmd = LaunchArgs::command();
    cmd.build(); // adds --help / --version
    let mut flags = HashMap::new();
    for arg in cmd.get_arguments() {
        let takes = arg.get_action().takes_values();
        if let Some(long) = arg.get_long() {
            flags.insert(long.to_string(), takes);
        }
        if let Some(short) = arg.get_short() {
            flags.insert(format!("-{short}"), takes);
        }
    }
    flags
}

/// Parse argv (without the program name). clap's own errors (and --help) exit the process
/// with clap's usual codes (2 for bad flags).
pub fn parse(argv: &[OsString]) -> (LaunchArgs, Vec<OsString>) {
    let split = split_args(argv);
    let args = match LaunchArgs::try_parse_from(
        std::iter::once(OsString::from("mla-launch")).chain(split.launcher),
    ) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    (args, split.passthrough)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn launcher_flags_anywhere_and_overrides_pass_through_in_order() {
        let s = split_args(&os(&[
            "--train.max_steps",
            "20",
            "--gpus",
            "2",
            "--out_dir=x",
            "--config=c.yaml",
            "--prefix-rank0",
            "positional",
            "--max-restarts",
            "3",
        ]));
        assert_eq!(
            s.launcher,
            os(&[
                "--gpus",
                "2",
                "--config=c.yaml",
                "--prefix-rank0",
                "--max-restarts",
                "3"
            ])
        );
        assert_eq!(
            s.passthrough,
            os(&["--train.max_steps", "20", "--out_dir=x", "positional"])
        );
    }

    #[test]
    fn everything_after_double_dash_passes_through() {
        let s = split_args(&os(&["--config", "c", "--", "--gpus", "3", "--"]));
        assert_eq!(s.launcher, os(&["--config", "c"]));
        assert_eq!(s.passthrough, os(&["--gpus", "3", "--"]));
    }

    #[test]
    fn devices_is_not_device() {
        // litgpt's top-level `devices` key belongs to the trainer, not the launcher.
        let s = split_args(&os(&["--devices", "2", "--device", "cpu"]));
        assert_eq!(s.launcher, os(&["--device", "cpu"]));
        assert_eq!(s.passthrough, os(&["--devices", "2"]));
    }

    #[test]
    fn help_and_version_are_launcher_flags() {
        let s = split_args(&os(&["-h", "--version", "-x"]));
        assert_eq!(s.launcher, os(&["-h", "--version"]));
        assert_eq!(s.passthrough, os(&["-x"]));
    }

    #[test]
    fn parses_a_full_command_line() {
        let s = split_args(&os(&[
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--master-addr",
            "10.0.0.1",
            "--master-port",
            "29400",
            "--gpus",
            "8",
            "--config",
            "cfg.yaml",
            "--grace-secs",
            "0.5",
        ]));
        let a = LaunchArgs::try_parse_from(std::iter::once(OsString::from("x")).chain(s.launcher))
            .unwrap();
        assert_eq!((a.nnodes, a.node_rank, a.gpus), (Some(2), 1, Some(8)));
        assert_eq!(a.master_addr.as_deref(), Some("10.0.0.1"));
        assert_eq!(a.master_port, Some(29400));
        assert_eq!(a.grace_secs, 0.5);
        assert!(s.passthrough.is_empty());
    }
}
