//! Data-parallel training on CPU with the MPI backend (issue #5 acceptance), on the debug config
//! shrunk (16-wide, 32-token blocks) with global batch 8 = micro 2 × accumulation × ranks:
//! two ranks under `mla-launch` match one rank with 4× accumulation (losses and gradient norms
//! to fp32 rounding, final weights within AdamW's bounds: see the test for why); `mpirun -np 2 mla train` without the launcher trains identically; a
//! two-rank run stopped and resumed (`resume: auto`) is bit-exact; a step-20 checkpoint resumes
//! on another number of ranks (2 → 1, 1 → 2, local and s3://) with the straight run's losses to
//! rounding, and 3 ranks that cannot split the global batch are refused; `kill -9` of rank 1 ends the
//! launcher within 10 s naming rank 1 and leaves no process; SIGTERM to the launcher leaves a
//! verified checkpoint of the step the ranks agreed on; a stalled peer becomes a timeout error;
//! impossible backend choices are one-line errors (exit 2). ZeRO (`dist.shard: optimizer |
//! gradients`, issue 12): two sharded ranks train as unsharded DDP (losses within 1e-6
//! relative, weights within 1e-5), resume bit-exactly, and their checkpoints resume on one rank
//! and with the other sharding.
//!
//! Needs mpirun (OpenMPI) and `mla-launch` next to `mla` (`cargo test --workspace` builds it);
//! without them the tests are skipped with a note, except under CI=true, where that fails.

mod common;

use common::{prepared_data, repo, tokenizer_dir};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const STEPS: u64 = 20;

fn mla() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mla"))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn skip(why: &str) -> bool {
    assert!(!in_ci(), "{why} (required under CI)");
    eprintln!("note: {why}; skipping");
    true
}

/// `mla-launch` built beside `mla`, and mpirun on PATH; None (after a note) when missing.
fn launcher() -> Option<PathBuf> {
    let l = mla().with_file_name("mla-launch");
    if !l.exists()
        && skip(&format!(
            "{} not built (cargo build -p mla-launcher)",
            l.display()
        ))
    {
        return None;
    }
    if !have_mpirun() {
        return None;
    }
    Some(l)
}

fn have_mpirun() -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("mpirun").is_file()))
        .unwrap_or(false);
    found || !skip("mpirun not on PATH (apt-get install openmpi-bin)")
}

fn config() -> String {
    repo()
        .join("config_hub/pretrain/debug.yaml")
        .to_str()
        .unwrap()
        .to_string()
}

/// Arguments after `--config F`: the shrunk debug run into `out_dir`, then `extra`.
fn run_args(out_dir: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--out_dir",
        out_dir.to_str().unwrap(),
        "--data.train_data_path",
        prepared_data().to_str().unwrap(),
        "--data.val_data_path",
        "null",
        "--tokenizer_dir",
        tokenizer_dir().to_str().unwrap(),
        "--model_config.block_size",
        "32",
        "--model_config.n_embd",
        "16",
        "--model_config.n_head",
        "2",
        "--train.global_batch_size",
        "8",
        "--train.micro_batch_size",
        "2",
        "--train.max_steps",
        &steps.to_string(),
        "--train.lr_warmup_steps",
        "4",
        "--train.log_interval",
        "1",
        "--train.save_interval",
        "1000",
        "--eval.interval",
        "1000",
        "--eval.initial_validation",
        "false",
        "--eval.final_validation",
        "false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A command with no inherited rank environment.
fn clean(mut c: Command) -> Command {
    for k in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "PMI_RANK",
        "PMI_SIZE",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "MLA_TEST_STOP_AT_STEP",
    ] {
        c.env_remove(k);
    }
    c.current_dir(repo());
    c
}

fn one_rank(args: &[String]) -> Command {
    let mut c = clean(Command::new(mla()));
    c.args(["train", "--device", "cpu", "--config", &config()])
        .args(args);
    c
}

fn launch(launcher: &Path, args: &[String]) -> Command {
    let mut c = clean(Command::new(launcher));
    c.args(["--device", "cpu", "--nproc", "2", "--mla"])
        .arg(mla())
        .args(["--config", &config()])
        .args(args);
    c
}

fn mpirun(args: &[String]) -> Command {
    let mut c = clean(Command::new("mpirun"));
    c.args([
        "-np",
        "2",
        "--oversubscribe",
        "--allow-run-as-root",
        "-x",
        "OMP_NUM_THREADS=1",
    ])
    .arg(mla())
    .args(["train", "--device", "cpu", "--config", &config()])
    .args(args);
    c
}

fn ok(mut c: Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed ({:?}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One training record of metrics.jsonl (appended across resumes).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Record {
    step: u64,
    loss: f64,
    grad_norm: f64,
    lr: f64,
}

fn records(out_dir: &Path) -> Vec<Record> {
    records_in(&out_dir.join("metrics.jsonl"))
}

fn records_in(metrics: &Path) -> Vec<Record> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["loss"].is_number())
        .map(|r| Record {
            step: r["step"].as_u64().unwrap(),
            loss: r["loss"].as_f64().unwrap(),
            grad_norm: r["grad_norm"].as_f64().unwrap(),
            lr: r["lr"].as_f64().unwrap(),
        })
        .collect()
}

/// (step, loss) of every training record of a run (appended across resumes).
fn losses(out_dir: &Path) -> Vec<(u64, f64)> {
    records(out_dir).iter().map(|r| (r.step, r.loss)).collect()
}

fn weights(step_dir: &Path) -> Vec<(String, Vec<f32>)> {
    fp32_tensors(&step_dir.join("model.safetensors"))
}

/// The fp32 tensors of a safetensors file, by name.
fn fp32_tensors(file: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, vals)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// AdamW's (beta1, beta2) from a checkpoint's resolved config.
fn adam_betas(step_dir: &Path) -> (f64, f64) {
    let cfg: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(step_dir.join("config.yaml")).unwrap())
            .unwrap();
    let betas = &cfg["optimizer"]["init_args"]["betas"];
    (betas[0].as_f64().unwrap(), betas[1].as_f64().unwrap())
}

/// The largest |m̂_t / √v̂_t| any gradient sequence can give at step t (t ≥ 1):
/// m_t = (1−β1) Σ β1^(t−k) g_k and v_t = (1−β2) Σ β2^(t−k) g_k², so by Cauchy–Schwarz
/// |m_t|/√v_t ≤ (1−β1)/√(1−β2) · √(Σ_{j<t} r^j), r = β1²/β2 < 1; then the bias corrections.
fn adam_step_bound(beta1: f64, beta2: f64, t: u64) -> f64 {
    let t = t as i32;
    let r = beta1 * beta1 / beta2;
    assert!(r < 1.0, "β1² < β2");
    (1.0 - beta1) / (1.0 - beta1.powi(t))
        * ((1.0 - beta2.powi(t)) / (1.0 - beta2)).sqrt()
        * ((1.0 - r.powi(t)) / (1.0 - r)).sqrt()
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn state(step_dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(step_dir.join("state.json")).unwrap()).unwrap()
}

/// The training records of two runs of the same global batches on other numbers of ranks (or
/// other accumulation): the same steps, `steps` of them, with losses and gradient norms equal
/// to fp32 rounding.
fn assert_same_training_to_rounding(a: &[Record], b: &[Record], steps: u64) {
    // Why the bounds are what they are. One rank adds the four micro-batch gradients as
    // ((g1+g2)+g3)+g4, two ranks as (g1+g2)+(g3+g4), and the ranks run their kernels on other
    // thread counts: the same arithmetic in another order, so every gradient differs from the
    // other run's in its last bits (relative u = 2^-24 of the terms it sums), and nothing more.
    assert_eq!(a.len(), steps as usize);
    assert_eq!(
        a.iter().map(|r| r.step).collect::<Vec<_>>(),
        b.iter().map(|r| r.step).collect::<Vec<_>>()
    );
    let rel = |x: f64, y: f64| ((x - y) / x).abs();
    let worst_loss = a
        .iter()
        .zip(b)
        .map(|(x, y)| rel(x.loss, y.loss))
        .fold(0.0, f64::max);
    let worst_norm = a
        .iter()
        .zip(b)
        .map(|(x, y)| rel(x.grad_norm, y.grad_norm))
        .fold(0.0, f64::max);
    // Losses and pre-clip gradient norms: the same windows through weights that agree to
    // rounding give the same fp32 sums to their rounding, ~log2(n)·u ≈ 1.2e-6 relative for the
    // 50304-way log-softmax and the 1.6M-term norm (blocked summation); 1e-5 is 8× that. The
    // norm also catches what the weights cannot: AdamW is blind to the gradient's scale, so a
    // sum-instead-of-average bug leaves the weights alone but doubles the norm.
    const REL_TOL: f64 = 1e-5;
    println!("Δ loss, relative, largest of {steps} steps: {worst_loss:.2e} (bound {REL_TOL:.1e})");
    println!(
        "Δ gradient norm, relative, largest of {steps} steps: {worst_norm:.2e} (bound {REL_TOL:.1e})"
    );
    assert!(worst_loss <= REL_TOL, "losses differ: {a:?}\n{b:?}");
    assert!(worst_norm <= REL_TOL, "gradient norms differ: {a:?}\n{b:?}");
}

/// The final weights of two such runs (`a`'s records for its learning rates), within what
/// AdamW can make of gradients that differ in their last bits.
fn assert_weights_within_adamw_bounds(a_step: &Path, b_step: &Path, a: &[Record]) {
    let (wa, wb) = (weights(a_step), weights(b_step));
    assert_eq!(wa.len(), wb.len());
    let (beta1, beta2) = adam_betas(a_step);
    // AdamW moves an element by lr_t·m̂/(√v̂ + eps) plus a decay that shrinks any difference;
    // |m̂/√v̂| ≤ A_t (Cauchy–Schwarz over the moments' sums) whatever the gradients. So an
    // element whose second moment sits at the rounding level (a rare token's embedding) can
    // have its step flipped, and no rounding can ever part the runs by more than Σ 2·lr_t·A_t.
    let hard: f64 = a
        .iter()
        .map(|r| 2.0 * r.lr * adam_step_bound(beta1, beta2, r.step))
        .sum();
    // Every other element sees its gradient to a relative κ·u (κ: how much its terms cancel):
    // its step differs by 1% only if κ ≳ 0.01/u ≈ 2e5, i.e. its gradient is itself at the
    // rounding level. Such elements are a few in a million, so at most 1 in 10,000 may be that
    // far apart; a real divergence (other data, a missing all-reduce) moves about half of all
    // elements by more (measured with half the global batch: 50%).
    const APART_SHARE: f64 = 1e-4;
    let lr_max = a.iter().map(|r| r.lr).fold(0.0, f64::max);
    let a_step_apart = 0.01 * lr_max;
    let (mut max_diff, mut n, mut apart) = (0.0f64, 0usize, 0usize);
    for ((na, va), (nb, vb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        assert_eq!(va.len(), vb.len(), "{na}");
        for (x, y) in va.iter().zip(vb) {
            let d = f64::from((x - y).abs());
            max_diff = max_diff.max(d);
            apart += usize::from(d > a_step_apart);
        }
        n += va.len();
    }
    println!("Δ final weights, largest: {max_diff:.2e} (bound {hard:.2e})");
    let share = apart as f64 / n as f64;
    println!(
        "Δ final weights, share more than 1% of a step ({a_step_apart:.1e}) apart: {share:.2e} \
         (bound {APART_SHARE:.1e}; {apart} of {n})"
    );
    assert!(
        max_diff <= hard,
        "final weights differ by {max_diff:e} > {hard:e}"
    );
    assert!(
        share <= APART_SHARE,
        "{apart} of {n} final weights differ by more than 1% of a step ({a_step_apart:e})"
    );
}

/// The two-rank launcher run of 20 steps, shared by the tests that compare against it.
struct LauncherRun {
    _dir: tempfile::TempDir,
    out: PathBuf,
    secs: f64,
}

fn launcher_run(launcher: &Path) -> &'static LauncherRun {
    static RUN: OnceLock<LauncherRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("launch");
        let t0 = Instant::now();
        ok(launch(launcher, &run_args(&out, STEPS, &[])));
        LauncherRun {
            secs: t0.elapsed().as_secs_f64(),
            _dir: dir,
            out,
        }
    })
}

#[test]
fn two_launcher_ranks_match_one_rank_with_four_times_the_accumulation() {
    let Some(launcher) = launcher() else { return };
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    let t0 = Instant::now();
    ok(one_rank(&run_args(&single, STEPS, &[])));
    let single_secs = t0.elapsed().as_secs_f64();
    let two = launcher_run(&launcher);
    println!(
        "{STEPS} steps: 1 rank {single_secs:.1} s, 2 ranks (mla-launch) {:.1} s",
        two.secs
    );

    assert_same_training_to_rounding(&records(&single), &records(&two.out), STEPS);
    assert_weights_within_adamw_bounds(
        &single.join("final"),
        &two.out.join("final"),
        &records(&single),
    );

    let s = state(&two.out.join("final"));
    assert_eq!(s["world_size"], 2);
    let loaders = s["loaders"].as_array().unwrap();
    assert_eq!(loaders.len(), 2, "every rank's loader position is recorded");
    assert_eq!(loaders[0], loaders[1]);
}

/// A real communicator reduces the gradients even alone (what lets scripts/gpu_check.sh pass
/// gradients through NCCL on one GPU): one rank with `--dist.backend mpi` gathers into the flat
/// buffer and all-reduces every step, and a sum over one rank changes no bit of the run.
#[test]
fn one_rank_with_a_communicator_all_reduces_and_trains_bit_exactly_as_single() {
    if !have_mpirun() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (single, mpi) = (dir.path().join("single"), dir.path().join("mpi"));
    let steps = 6;
    ok(one_rank(&run_args(
        &single,
        steps,
        &["--dist.backend", "single"],
    )));
    let mut c = one_rank(&run_args(&mpi, steps, &["--dist.backend", "mpi"]));
    c.env("RUST_LOG", "info,mla_trainer=debug");
    let run = ok(c);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("backend mpi"), "{err}");
    assert_eq!(
        err.matches("gradient all-reduce").count(),
        steps as usize,
        "an all-reduce every step (log_interval 1): {err}"
    );
    assert_eq!(losses(&mpi), losses(&single));
    assert_eq!(
        sha256(&mpi.join("final/model.safetensors")),
        sha256(&single.join("final/model.safetensors"))
    );
}

#[test]
fn mpirun_without_the_launcher_trains_the_same_as_the_launcher() {
    let Some(launcher) = launcher() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mpirun");
    let run = ok(mpirun(&run_args(&out, STEPS, &[])));
    let two = launcher_run(&launcher);
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("backend mpi"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(losses(&out), losses(&two.out));
    assert_eq!(
        sha256(&out.join("final/model.safetensors")),
        sha256(&two.out.join("final/model.safetensors"))
    );
}

#[test]
fn a_two_rank_run_stopped_and_resumed_continues_bit_exactly() {
    let Some(launcher) = launcher() else { return };
    let (n, half) = (8u64, 4u64);
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    ok(launch(&launcher, &run_args(&straight, n, &[])));
    let resumed = dir.path().join("resumed");
    let mut first = launch(&launcher, &run_args(&resumed, n, &[]));
    first.env("MLA_TEST_STOP_AT_STEP", half.to_string());
    ok(first);
    let stop = resumed.join(format!("step-{half:08}"));
    assert!(
        stop.join("manifest.json").exists(),
        "checkpoint of step {half}"
    );
    assert!(!resumed.join("final").exists());
    assert_eq!(state(&stop)["loaders"].as_array().unwrap().len(), 2);
    ok(launch(
        &launcher,
        &run_args(&resumed, n, &["--resume", "auto"]),
    ));

    assert_eq!(losses(&resumed), losses(&straight));
    assert_eq!(losses(&straight).len(), n as usize);
    assert_eq!(
        sha256(&resumed.join("final/model.safetensors")),
        sha256(&straight.join("final/model.safetensors"))
    );
}

/// Elastic resume (issue 15): a run stopped at its step-20 checkpoint and resumed with
/// `--resume auto` on another number of ranks, 2 → 1 and 1 → 2, in `out` (a local directory or
/// an s3:// URL; `cwd` holds the metrics of an s3:// run). Returns both runs' records.
fn stop_at_20_and_resume_elsewhere(
    launcher: &Path,
    cwd: &Path,
    out: &str,
    first_on_two: bool,
) -> (Vec<Record>, String) {
    let args = |extra: &[&str]| {
        let mut a = run_args(Path::new(out), ELASTIC_STEPS, extra);
        a.extend(["--train.save_interval".to_string(), "20".to_string()]);
        a
    };
    let on = |two: bool, a: &[String]| {
        let mut c = if two {
            launch(launcher, a)
        } else {
            one_rank(a)
        };
        c.current_dir(cwd);
        c
    };
    let mut first = on(first_on_two, &args(&[]));
    first.env("MLA_TEST_STOP_AT_STEP", "20");
    ok(first);
    let second = ok(on(!first_on_two, &args(&["--resume", "auto"])));
    let log = String::from_utf8_lossy(&second.stderr).into_owned();
    let metrics = common::metrics_file(cwd, out);
    let records = records_in(&metrics);
    (records, log)
}

const ELASTIC_STEPS: u64 = 40;

/// A 2-rank run's step-20 checkpoint resumes on 1 rank, and a 1-rank run's on 2 ranks, from a
/// local out_dir and from s3:// (issue 15): steps 1-20 are the 2-rank straight run's bit for
/// bit where they ran on 2 ranks, steps 21-40 (and the 1-rank halves) its losses and gradient
/// norms to fp32 rounding with the same learning rates, the final weights within AdamW's bounds;
/// the start-up log says what changed. A world size that cannot split the global batch is
/// refused naming those that can.
#[test]
fn a_checkpoint_resumes_on_another_number_of_ranks_with_the_same_global_batches() {
    let Some(launcher) = launcher() else { return };
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    ok(launch(&launcher, &run_args(&straight, ELASTIC_STEPS, &[])));
    let want = records(&straight);

    let mut outs = vec![
        (
            dir.path()
                .join("two-then-one")
                .to_str()
                .unwrap()
                .to_string(),
            true,
        ),
        (
            dir.path()
                .join("one-then-two")
                .to_str()
                .unwrap()
                .to_string(),
            false,
        ),
    ];
    if let Some(s3) = common::s3_out_dir("elastic-2-1") {
        outs.push((s3, true));
    }
    if let Some(s3) = common::s3_out_dir("elastic-1-2") {
        outs.push((s3, false));
    }
    for (i, (out, first_on_two)) in outs.into_iter().enumerate() {
        println!(
            "{out}: first half on {} rank(s)",
            if first_on_two { 2 } else { 1 }
        );
        // Each run's own working directory: an s3:// run keeps its metrics under it.
        let cwd = dir.path().join(format!("cwd-{i}"));
        std::fs::create_dir(&cwd).unwrap();
        let (got, log) = stop_at_20_and_resume_elsewhere(&launcher, &cwd, &out, first_on_two);
        let (from, to) = if first_on_two { (2, 1) } else { (1, 2) };
        assert!(
            log.contains(&format!("was saved by {from} rank(s), this run has {to}")),
            "{log}"
        );
        assert_same_training_to_rounding(&want, &got, ELASTIC_STEPS);
        for (w, g) in want.iter().zip(&got) {
            assert_eq!(w.lr, g.lr, "step {}: the schedule carries over", w.step);
            if first_on_two && w.step <= 20 {
                assert_eq!(w, g, "step {}: the same 2-rank run so far", w.step);
            }
        }
        if !out.starts_with("s3://") {
            let fin = Path::new(&out).join("final");
            assert_weights_within_adamw_bounds(&straight.join("final"), &fin, &want);
            let s = state(&fin);
            assert_eq!(s["world_size"], to);
            assert_eq!(s["loaders"].as_array().unwrap().len(), to);
        }
    }

    // 3 ranks cannot split 8 sequences into micro-batches of 2.
    let three = dir.path().join("three");
    let mut c = clean(Command::new(&launcher));
    c.args(["--device", "cpu", "--nproc", "3", "--mla"])
        .arg(mla())
        .args(["--config", &config()])
        .args(run_args(&three, ELASTIC_STEPS, &[]));
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("world sizes that can with this micro_batch_size: 1, 2, 4"),
        "{err}"
    );
}

/// Processes whose command line mentions `marker` (what `pgrep -f` would find), except us.
fn leftovers(marker: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().into_owned();
            if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(marker).then(|| format!("pid {pid}: {cmd}"))
        })
        .collect()
}

/// The pid of the `mla train` process of `rank` whose command line mentions `marker`.
fn rank_pid(marker: &str, rank: u32) -> Option<i32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|e| {
            let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmd
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_rank = args.first()?.ends_with("/mla")
                && args.get(1).map(String::as_str) == Some("train")
                && args.iter().any(|a| a.contains(marker));
            let env = std::fs::read(e.path().join("environ")).ok()?;
            let env_has = env.split(|&b| b == 0).any(|v| v == want.as_bytes());
            (is_rank && env_has).then_some(pid)
        })
}

fn spawn(mut c: Command, dir: &Path) -> Child {
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("launcher.err")).unwrap())
        .spawn()
        .unwrap()
}

/// Wait until the run logged `steps` training steps.
fn wait_for_steps(out: &Path, steps: usize, child: &mut Child, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if n >= steps {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "launcher ended early ({status}):\n{}",
                std::fs::read_to_string(dir.join("launcher.err")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "no training progress");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn killing_rank_1_ends_the_launcher_within_10s_naming_it_and_leaves_no_process() {
    let Some(launcher) = launcher() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let marker = out.to_str().unwrap().to_string();
    let mut child = spawn(launch(&launcher, &run_args(&out, 100_000, &[])), dir.path());
    wait_for_steps(&out, 2, &mut child, dir.path());
    let pid = rank_pid(&marker, 1).expect("rank 1's mla train process");
    let killed = Instant::now();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let secs = killed.elapsed().as_secs_f64();
    let err = std::fs::read_to_string(dir.path().join("launcher.err")).unwrap();
    let Some(status) = status else {
        let _ = child.kill();
        panic!("mla-launch still running 10 s after rank 1 was killed:\n{err}");
    };
    println!("launcher exited {status} {secs:.1} s after kill -9 of rank 1");
    assert!(!status.success(), "{err}");
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(last.contains("rank 1"), "last line names rank 1: {last}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !leftovers(&marker).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        leftovers(&marker).is_empty(),
        "left behind: {:#?}",
        leftovers(&marker)
    );
}

#[test]
fn sigterm_to_the_launcher_leaves_a_verified_checkpoint_of_the_agreed_step() {
    let Some(launcher) = launcher() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let marker = out.to_str().unwrap().to_string();
    let mut child = spawn(launch(&launcher, &run_args(&out, 100_000, &[])), dir.path());
    wait_for_steps(&out, 3, &mut child, dir.path());
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(60)).expect("launcher stops");
    let err = std::fs::read_to_string(dir.path().join("launcher.err")).unwrap();
    assert!(status.success(), "{status}:\n{err}");
    let steps: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("step-")
        })
        .collect();
    assert_eq!(
        steps.len(),
        1,
        "one checkpoint, of the stop step: {steps:?}"
    );
    let step = &steps[0];
    let s = state(step);
    let logged = losses(&out).last().unwrap().0;
    assert_eq!(
        s["step"].as_u64(),
        Some(logged),
        "checkpoint of the last step trained"
    );
    assert_eq!(s["loaders"].as_array().unwrap().len(), 2);
    let verify = Command::new(mla())
        .args(["ckpt", "verify"])
        .arg(step)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(leftovers(&marker).is_empty());
}

#[test]
fn a_stalled_peer_becomes_a_timeout_error_naming_rank_and_collective() {
    if !have_mpirun() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut c = mpirun(&run_args(&out, 5, &["--dist.timeout_secs", "2"]));
    c.env("MLA_TEST_DIST_STALL_RANK", "1");
    let t0 = Instant::now();
    let run = c.output().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(
        err.contains("error: rank 0: mpi all_reduce timed out after 2 s"),
        "{err}"
    );
    assert!(secs < 60.0, "took {secs:.0} s");
    assert!(leftovers(out.to_str().unwrap()).is_empty());
}

#[test]
fn impossible_backend_choices_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 2] = [
        (
            &["--dist.backend", "nccl"],
            &[],
            "dist.backend nccl needs CUDA tensors (--device cuda)",
        ),
        (
            &["--dist.backend", "single"],
            &[("RANK", "0"), ("WORLD_SIZE", "2")],
            "dist.backend single cannot run 2 ranks",
        ),
    ];
    for (extra, env, msg) in cases {
        let mut c = one_rank(&run_args(&out, 2, extra));
        c.envs(env.iter().copied());
        let r = c.output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{err}");
        let last = err.trim_end().lines().last().unwrap_or_default();
        assert!(last.starts_with("error: ") && last.contains(msg), "{err}");
    }
}

/// Issue #10 item 8: a job of two "nodes" of two ranks each, on this machine, each node with its
/// own data cache (as nodes without a shared filesystem have). One mpirun starts the four
/// ranks; a wrapper gives them the torchrun variables a two-node launch sets (local ranks 0, 1,
/// 0, 1) and their node's cache. Raw text is tokenized exactly once per node: by rank 0 and by
/// rank 2 (node 1's first rank), while ranks 1 and 3 open their node's copy. Before the fix,
/// ranks 2 and 3 both tokenized into node 1's cache at once.
#[test]
fn raw_data_is_tokenized_once_per_node_of_a_two_node_job() {
    if !have_mpirun() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Raw text (a slice of the TinyStories validation head) that the ranks must tokenize.
    let text = std::fs::read_to_string(
        common::shared_data().join("tinystories/valid/tinystories_v1_valid_head.txt"),
    )
    .unwrap();
    let cut = text[..text.len().min(200_000)]
        .rfind("<|endoftext|>")
        .unwrap();
    let (train, val) = (dir.path().join("train.txt"), dir.path().join("val.txt"));
    std::fs::write(&train, &text[..cut]).unwrap();
    std::fs::write(&val, &text[..cut / 4]).unwrap();
    let out = dir.path().join("run");
    let cache = dir.path().join("cache");
    let mut args = run_args(&out, 2, &[]);
    for (key, value) in [
        ("--data.train_data_path", &train),
        ("--data.val_data_path", &val),
    ] {
        let at = args.iter().position(|a| a == key).unwrap();
        args[at + 1] = value.to_str().unwrap().to_string();
    }
    let wrapper = r#"R=$OMPI_COMM_WORLD_RANK
exec env RANK=$R WORLD_SIZE=$OMPI_COMM_WORLD_SIZE LOCAL_RANK=$((R % 2)) LOCAL_WORLD_SIZE=2 \
  "$0" "$@" --data.cache_dir "$NODE_CACHE/node$((R / 2))""#;
    let mut c = clean(Command::new("mpirun"));
    c.args(["-np", "4", "--oversubscribe", "--allow-run-as-root"])
        .args([
            "--tag-output",
            "-x",
            "OMP_NUM_THREADS=1",
            "-x",
            "NODE_CACHE",
        ])
        .env("NODE_CACHE", &cache)
        .args(["sh", "-c", wrapper])
        .arg(mla())
        .args(["train", "--device", "cpu", "--config", &config()])
        .args(&args);
    let run = ok(c);
    let err = String::from_utf8_lossy(&run.stderr).to_string();
    // `[1,R]<stderr>:` tags each line with its rank; each node's cache is named in its lines.
    let ranks_saying = |what: &str, node: usize| -> Vec<usize> {
        let node_dir = cache.join(format!("node{node}"));
        let mut ranks: Vec<usize> = err
            .lines()
            .filter(|l| l.contains(what) && l.contains(node_dir.to_str().unwrap()))
            .map(|l| {
                let tag = l.split_once(']').unwrap().0;
                tag.rsplit(',').next().unwrap().parse().unwrap()
            })
            .collect();
        ranks.sort();
        ranks
    };
    assert_eq!(ranks_saying("data: tokenizing", 0), [0], "{err}");
    assert_eq!(ranks_saying("data: tokenizing", 1), [2], "{err}");
    assert_eq!(ranks_saying("data: using prepared", 0), [1], "{err}");
    assert_eq!(ranks_saying("data: using prepared", 1), [3], "{err}");
    // Both nodes hold the same tokens, and the job trained on them.
    let index = |node: usize| -> Value {
        let root = cache.join(format!("node{node}"));
        let prepared: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(prepared.len(), 1, "{prepared:?}");
        let mut v: Value =
            serde_json::from_slice(&std::fs::read(prepared[0].join("index.json")).unwrap())
                .unwrap();
        v.as_object_mut().unwrap().remove("created");
        v
    };
    assert_eq!(index(0), index(1));
    assert_eq!(losses(&out).len(), 2, "{err}");
}

/// `devices`/`num_nodes` that ask for more ranks than the run has are said, not silently
/// ignored (issue 9: `devices: 2` started one rank without a word); the run still trains.
/// (mla-launch starts what they say, and passes what it started to the ranks.)
#[test]
fn devices_the_run_does_not_have_are_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let r = ok(one_rank(&run_args(&out, 1, &["--devices", "2"])));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains(
            "the config's devices: 2 × num_nodes: 1 ask for 2 rank(s), but this run has 1"
        ),
        "{err}"
    );
}

/// The largest |Δ| between two checkpoints' tensors of one file (the same names and shapes).
fn max_abs_difference(a: &Path, b: &Path) -> f64 {
    let (wa, wb) = (fp32_tensors(a), fp32_tensors(b));
    let names = |w: &[(String, Vec<f32>)]| w.iter().map(|(n, v)| (n.clone(), v.len())).collect();
    let (na, nb): (Vec<_>, Vec<_>) = (names(&wa), names(&wb));
    assert_eq!(
        na,
        nb,
        "{} and {} hold other tensors",
        a.display(),
        b.display()
    );
    wa.iter()
        .zip(&wb)
        .flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| f64::from((p - q).abs())))
        .fold(0.0, f64::max)
}

/// Clipping that acts at every step of the shrunk debug run (its gradient norms stay above
/// 0.6 over 20 steps), so the sharded runs' global norm is what scales every update.
const CLIP: [&str; 2] = ["--train.max_norm", "0.5"];

/// ZeRO (issue 12): 2 ranks with `dist.shard: optimizer` and with `gradients` train as
/// unsharded DDP over 20 steps — losses within 1e-6 relative, final weights within 1e-5 — and
/// save the optimizer state whole, in the unsharded layout.
#[test]
fn sharded_ranks_train_as_unsharded_ddp() {
    let Some(launcher) = launcher() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ddp = dir.path().join("ddp");
    ok(launch(&launcher, &run_args(&ddp, STEPS, &CLIP)));
    let want = records(&ddp);
    assert!(
        want.iter().all(|r| r.grad_norm > 0.5),
        "clipping acts at every step: {want:?}"
    );
    // Why the bounds hold. With 2 ranks every gradient element is the same sum of two terms
    // (a reduce-scatter adds them as the all-reduce does), and AdamW is the same elementwise
    // formula on the same values; what differs is the global norm: DDP takes torch's norm of
    // the per-parameter norms, ZeRO the root of the two slices' squared norms summed, two
    // fp32 evaluations of one sum of n ≈ 1.6M squares, each within log2(n)·u ≈ 1.3e-6 of it.
    // The norm only sets the clipping coefficient c, a common scale of all gradients, and
    // AdamW's step m̂/(√v̂ + ε) sees a common scale only through ε; with a scale that differs
    // from step to step by δ ≤ 2.6e-6 (both norms' errors) the step differs by ≤ 2δ of itself.
    // After 20 steps of lr ≤ 3e-3 and |m̂/√v̂| ≤ 3 the weights agree to 20 · 3e-3 · 3 · 5.2e-6
    // ≈ 1e-6, and the losses (the same windows through those weights) to ~1e-7 relative: the
    // issue's bounds, 1e-6 and 1e-5, hold with margin.
    for shard in ["optimizer", "gradients"] {
        let out = dir.path().join(shard);
        let mut args = run_args(&out, STEPS, &CLIP);
        args.extend(["--dist.shard".to_string(), shard.to_string()]);
        let run = ok(launch(&launcher, &args));
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains(&format!("dist.shard {shard} (ZeRO-")), "{err}");
        let got = records(&out);
        assert_eq!(got.len(), want.len());
        let rel = |x: f64, y: f64| ((x - y) / x).abs();
        let worst = |f: fn(&Record) -> f64| {
            want.iter()
                .zip(&got)
                .map(|(a, b)| rel(f(a), f(b)))
                .fold(0.0, f64::max)
        };
        let (loss, norm) = (worst(|r| r.loss), worst(|r| r.grad_norm));
        println!(
            "shard {shard}: Δ loss, relative, largest of {STEPS} steps: {loss:.2e} (bound 1e-6)"
        );
        println!("shard {shard}: Δ gradient norm, relative, largest: {norm:.2e} (bound 1e-5)");
        assert!(loss <= 1e-6, "{want:?}\n{got:?}");
        assert!(norm <= 1e-5, "{want:?}\n{got:?}");
        for (a, b) in want.iter().zip(&got) {
            assert_eq!((a.step, a.lr), (b.step, b.lr));
        }
        let (fa, fb) = (ddp.join("final"), out.join("final"));
        let dw = max_abs_difference(&fa.join("model.safetensors"), &fb.join("model.safetensors"));
        println!("shard {shard}: Δ final weights, largest: {dw:.2e} (bound 1e-5)");
        assert!(dw <= 1e-5);
        // The whole moments, under the unsharded names and shapes, gathered from both ranks.
        let dm = max_abs_difference(
            &fa.join("optimizer.safetensors"),
            &fb.join("optimizer.safetensors"),
        );
        println!("shard {shard}: Δ final AdamW moments, largest: {dm:.2e}");
        assert!(dm <= 1e-5);
    }
}

/// A sharded checkpoint is an ordinary one: a 2-rank `shard: gradients` run stopped at step 4
/// and resumed continues bit-exactly; its step-4 checkpoint resumes on 1 rank (another world
/// size) and as `shard: optimizer`, with the straight run's losses to rounding; a NaN gradient
/// on one rank skips the update on both (the norm they share is NaN).
#[test]
fn a_sharded_run_resumes_bit_exactly_and_on_another_world_size() {
    let Some(launcher) = launcher() else { return };
    let (n, half) = (8u64, 4u64);
    let dir = tempfile::tempdir().unwrap();
    let args = |out: &Path, shard: &str, extra: &[&str]| {
        let mut a = run_args(out, n, &CLIP);
        a.extend(["--dist.shard", shard].iter().map(|s| s.to_string()));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let straight = dir.path().join("straight");
    ok(launch(&launcher, &args(&straight, "gradients", &[])));
    let resumed = dir.path().join("resumed");
    let mut first = launch(&launcher, &args(&resumed, "gradients", &[]));
    first.env("MLA_TEST_STOP_AT_STEP", half.to_string());
    ok(first);
    let stop = resumed.join(format!("step-{half:08}"));
    assert!(stop.join("manifest.json").exists());
    ok(launch(
        &launcher,
        &args(&resumed, "gradients", &["--resume", "auto"]),
    ));
    assert_eq!(losses(&resumed), losses(&straight));
    assert_eq!(
        sha256(&resumed.join("final/model.safetensors")),
        sha256(&straight.join("final/model.safetensors"))
    );
    assert_eq!(
        sha256(&resumed.join("final/optimizer.safetensors")),
        sha256(&straight.join("final/optimizer.safetensors"))
    );

    // The step-4 checkpoint on 1 rank, and on 2 ranks sharded otherwise.
    let want = records(&straight);
    let from = stop.to_str().unwrap();
    let one = dir.path().join("one");
    let run = ok(one_rank(&args(&one, "gradients", &["--resume", from])));
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(
        log.contains("was saved by 2 rank(s), this run has 1"),
        "{log}"
    );
    let other = dir.path().join("optimizer");
    ok(launch(
        &launcher,
        &args(&other, "optimizer", &["--resume", from]),
    ));
    for got in [records(&one), records(&other)] {
        assert_same_training_to_rounding(&want[half as usize..], &got, n - half);
    }

    // A NaN gradient at step 3 (the test hook poisons it on every rank before the reduction).
    let nan = dir.path().join("nan");
    let mut c = launch(&launcher, &args(&nan, "gradients", &[]));
    c.env("MLA_TEST_NAN_GRAD_STEPS", "3");
    let run = ok(c);
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(log.contains("step 3: non-finite"), "{log}");
    let s = state(&nan.join("final"));
    assert_eq!(s["skipped_steps"], 1, "{s}");
    assert_eq!(s["step"], n, "{s}");
}
