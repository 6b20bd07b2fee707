//! `mla report RUN_DIR… --out DIR`: the comparison of finished runs — report.md (table and
//! plots), report.csv, report.json and PNGs (report/ builds them).

use crate::device::{self, DeviceKind};
use crate::error::BadInput;
use crate::inference::{self, InferencePrecision};
use crate::report::{self, ReportOptions};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Run directories (a training out_dir: metrics.jsonl and a committed final/).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Where report.md, report.csv, report.json and the PNGs go.
    #[arg(long)]
    out: PathBuf,
    /// Title of report.md.
    #[arg(long, default_value = "Attention trade-off")]
    title: String,
    #[command(flatten)]
    decode: DecodeFlags,
    /// Compute device for the decode benchmark (default: CUDA when available, else CPU).
    #[arg(long, value_enum)]
    device: Option<DeviceKind>,
    /// Decode dtype (default: bf16-true on CUDA, 32-true on CPU).
    #[arg(long, value_enum)]
    precision: Option<InferencePrecision>,
}

/// How the report measures decode (also `mla study`'s flags for its report).
#[derive(Debug, clap::Args)]
pub struct DecodeFlags {
    /// Decode prompt lengths (default: block/8, block/2 and block − new tokens of each model).
    #[arg(long, value_delimiter = ',')]
    contexts: Vec<usize>,
    /// Decode batch size.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens generated per prompt, warm-up included.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Untimed decode steps before the timed ones.
    #[arg(long, default_value_t = 4)]
    warmup: usize,
    /// Decode rounds over all runs (each case keeps its best: noise only slows a case down).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

impl DecodeFlags {
    /// The options for `report::write`, measuring on `device` in `precision`; `command` is
    /// quoted in report.md.
    pub fn options(
        &self,
        title: String,
        device: Option<DeviceKind>,
        precision: Option<InferencePrecision>,
    ) -> anyhow::Result<ReportOptions> {
        let device = device::select(device, 0)?;
        Ok(ReportOptions {
            title,
            contexts: self.contexts.clone(),
            batch: self.batch,
            new_tokens: self.new_tokens,
            warmup: self.warmup,
            rounds: self.rounds.max(1),
            device,
            kind: inference::kind(precision, device),
            command: command_line(),
        })
    }
}

/// The command line as typed, for the report.
pub fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("mla {}", args.join(" "))
}

pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut seen = std::collections::HashSet::new();
    for r in &args.runs {
        let name = r.file_name().map(|n| n.to_owned());
        if !seen.insert(name) {
            return Err(BadInput(format!(
                "{}: two runs share the directory name; the report names rows by it",
                r.display()
            ))
            .into());
        }
    }
    let opts = args
        .decode
        .options(args.title.clone(), args.device, args.precision)?;
    let runs = report::write(&args.runs, &args.out, &opts)?;
    eprintln!(
        "report of {} runs in {:.1} s: {}",
        runs.len(),
        started.elapsed().as_secs_f64(),
        args.out.join("report.md").display()
    );
    Ok(())
}
