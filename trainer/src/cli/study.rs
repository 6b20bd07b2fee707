//! `mla study STUDY.yaml`: train every variant of a study (report/study.rs reads it), one
//! `mla train` process each, then write the report over the finished ones into
//! `<out_dir>/report`. A rerun skips finished variants and resumes interrupted ones.
//! Config overrides after the flags (`--data.data_path DIR`) apply to every variant.

use crate::config::Override;
use crate::error::BadInput;
use crate::report::{self, study};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct StudyArgs {
    /// Study file: out_dir, a base run config and the variants (config_hub/study/*.yaml).
    study: PathBuf,
    /// Cap every variant's training tokens (a short run of the same study).
    #[arg(long)]
    max_tokens: Option<u64>,
    /// Train only these variants (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Train, but do not write the report.
    #[arg(long)]
    no_report: bool,
    /// Check the study and print the plan without training.
    #[arg(long)]
    dry_run: bool,
    /// Compute device of each `mla train` and of the report (default: CUDA when available).
    #[arg(long, value_enum)]
    device: Option<crate::device::DeviceKind>,
    /// The report's decode settings (see `mla report --help`).
    #[command(flatten)]
    report: super::report::DecodeFlags,
}

enum Outcome {
    Skipped,
    Trained(f64),
    Failed(String),
    Stopped,
}

/// Run one `mla train` to its end. It runs in its own process group, so a Ctrl-C reaches only
/// the study, which passes one SIGTERM on: the variant saves its step and exits as a lone run
/// would (two signals would make it exit at once). If the study dies, the child gets SIGTERM.
fn train(cmd: &mut Command) -> anyhow::Result<std::process::ExitStatus> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let mut forwarded = false;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if !forwarded && crate::signals::stop_requested() {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            forwarded = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Train one variant in a child `mla train --resume auto` of its config file (so that a rerun
/// goes on from its last checkpoint); a stop signal is forwarded to the child.
fn train_variant(
    exe: &Path,
    cfg_path: &Path,
    out_dir: &Path,
    args: &StudyArgs,
    overrides: &[Override],
    tag: &str,
) -> anyhow::Result<Outcome> {
    let t0 = Instant::now();
    let mut cmd = Command::new(exe);
    cmd.arg("train")
        .arg("--config")
        .arg(cfg_path)
        .args(["--resume", "auto"]);
    if let Some(d) = args.device {
        let name = match d {
            crate::device::DeviceKind::Cpu => "cpu",
            crate::device::DeviceKind::Cuda => "cuda",
        };
        cmd.args(["--device", name]);
    }
    for o in overrides {
        cmd.arg(format!("--{}", o.key)).arg(&o.value);
    }
    let status = train(&mut cmd)?;
    if crate::signals::stop_requested() {
        eprintln!(
            "{tag}: stopped by a signal ({status}); rerun the same command to go on from its last checkpoint"
        );
        return Ok(Outcome::Stopped);
    }
    Ok(if status.success() && study::finished(out_dir)? {
        Outcome::Trained(t0.elapsed().as_secs_f64())
    } else if status.success() {
        Outcome::Failed("stopped before its final checkpoint".into())
    } else {
        Outcome::Failed(format!("mla train exited with {status}"))
    })
}

pub fn run(args: &StudyArgs, overrides: &[Override]) -> anyhow::Result<()> {
    let started = Instant::now();
    let s = study::Study::load(&args.study, args.max_tokens, overrides)?;
    for name in &args.only {
        if !s.variants.iter().any(|v| &v.name == name) {
            let names: Vec<&str> = s.variants.iter().map(|v| v.name.as_str()).collect();
            return Err(BadInput(format!(
                "--only {name}: no such variant in {} (variants: {})",
                args.study.display(),
                names.join(", ")
            ))
            .into());
        }
    }
    let chosen: Vec<&study::Variant> = s
        .variants
        .iter()
        .filter(|v| args.only.is_empty() || args.only.contains(&v.name))
        .collect();
    let configs = s.out_dir.join("configs");
    if !args.dry_run {
        std::fs::create_dir_all(&configs)
            .map_err(|e| BadInput(format!("{}: cannot create: {e}", configs.display())))?;
    }
    crate::signals::install();
    eprintln!(
        "study {}: {} variants → {}",
        s.name,
        chosen.len(),
        s.out_dir.display()
    );
    let exe = std::env::current_exe()?;
    let mut outcomes = Vec::new();
    for (i, v) in chosen.iter().enumerate() {
        let tag = format!("[{}/{}] {}", i + 1, chosen.len(), v.name);
        let cfg_path = configs.join(format!("{}.yaml", v.name));
        let budget = v
            .config
            .train
            .max_tokens
            .map_or(String::new(), |t| format!(", up to {t} tokens"));
        let attention = v.config.model().attention_kind().name();
        if study::finished(&v.out_dir)? {
            eprintln!(
                "{tag}: finished before ({}/final); delete the directory to retrain it",
                v.out_dir.display()
            );
            outcomes.push((v.name.clone(), Outcome::Skipped));
            continue;
        }
        if args.dry_run {
            eprintln!(
                "{tag}: would train {attention}{budget} into {}",
                v.out_dir.display()
            );
            continue;
        }
        std::fs::write(&cfg_path, &v.yaml)?;
        eprintln!(
            "{tag}: training {attention}{budget} ({})",
            cfg_path.display()
        );
        let outcome = train_variant(&exe, &cfg_path, &v.out_dir, args, overrides, &tag)?;
        match &outcome {
            Outcome::Failed(why) => eprintln!("{tag}: FAILED: {why}; going on with the others"),
            Outcome::Trained(secs) => eprintln!("{tag}: trained in {:.1} min", secs / 60.0),
            Outcome::Skipped | Outcome::Stopped => {}
        }
        let stopped = matches!(outcome, Outcome::Stopped);
        outcomes.push((v.name.clone(), outcome));
        if stopped {
            break;
        }
    }
    if args.dry_run {
        return Ok(());
    }
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
        .map(|(n, _)| n.clone())
        .collect();
    let done: Vec<PathBuf> = s
        .variants
        .iter()
        .filter(|v| study::finished(&v.out_dir).unwrap_or(false))
        .map(|v| v.out_dir.clone())
        .collect();
    let mut report_note = String::new();
    if !args.no_report && !crate::signals::stop_requested() && !done.is_empty() {
        let out = s.out_dir.join("report");
        let opts = args.report.options(
            format!("Attention trade-off: study {}", s.name),
            args.device,
            None,
        )?;
        let runs = report::write(&done, &out, &opts)?;
        report_note = format!(
            "; report of {} runs: {}",
            runs.len(),
            out.join("report.md").display()
        );
    }
    let trained = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Trained(_)))
        .count();
    let skipped = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Skipped))
        .count();
    let stopped = if outcomes.iter().any(|(_, o)| matches!(o, Outcome::Stopped)) {
        ", stopped by a signal (rerun to go on)"
    } else {
        ""
    };
    eprintln!(
        "study {}: {trained} trained, {skipped} already finished, {} failed{}{stopped} in {:.1} min{report_note}",
        s.name,
        failed.len(),
        if failed.is_empty() { String::new() } else { format!(" ({})", failed.join(", ")) },
        started.elapsed().as_secs_f64() / 60.0
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "{} of {} variants failed: {}",
            failed.len(),
            chosen.len(),
            failed.join(", ")
        ))
    }
}
