//! `--device cpu --nproc N` runs the ranks under OpenMPI's `mpirun`: rank env (OMPI_COMM_WORLD_*),
//! output prefixes from `--tag-output`, failures named by rank, SIGTERM reaching the ranks.
//! Skipped, with a note, where `mpirun` is not installed (scripts/setup.sh installs OpenMPI).

mod common;

use common::Fixture;
use nix::sys::signal::Signal;
use std::time::Duration;

fn have_mpirun() -> bool {
    let found = mla_launcher::plan::which("mpirun").is_some();
    if !found {
        eprintln!("note: mpirun not on PATH; skipping (apt-get install openmpi-bin)");
    }
    found
}

#[test]
fn cpu_ranks_start_under_mpirun_with_mpi_rank_env() {
    if !have_mpirun() {
        return;
    }
    let f = Fixture::new();
    let mla = f.script(
        "mla",
        r#"echo "rank=$OMPI_COMM_WORLD_RANK size=$OMPI_COMM_WORLD_SIZE local=$OMPI_COMM_WORLD_LOCAL_RANK lsize=$OMPI_COMM_WORLD_LOCAL_SIZE torchrun=${RANK-unset}/${WORLD_SIZE-unset} master=${MASTER_ADDR:+set} args=$*"
echo "err $OMPI_COMM_WORLD_RANK" >&2
printf 'half' >&2; sleep 0.1; printf ' a line\n' >&2"#,
    );
    let mut cmd = f.launch(
        &mla,
        &["--device", "cpu", "--nproc", "2", "--train.max_steps", "3"],
    );
    cmd.env("RANK", "5").env("WORLD_SIZE", "9"); // stale torchrun vars must not reach MPI ranks
    let r = f.run(cmd);
    r.expect_code(0)
        .stderr_has("starting 2 CPU ranks under mpirun");
    let cfg = f.config.to_str().unwrap();
    let args = format!(
        "args=train --device cpu --config {cfg} --train.max_steps 3 --devices 2 --num_nodes 1"
    );
    assert_eq!(
        r.sorted_stdout(),
        [
            format!(
                "[rank 1] rank=1 size=2 local=1 lsize=2 torchrun=unset/unset master=set {args}"
            ),
            format!("rank=0 size=2 local=0 lsize=2 torchrun=unset/unset master=set {args}"),
        ]
    );
    assert!(
        r.stderr.lines().any(|l| l == "[rank 1] err 1"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.lines().any(|l| l == "err 0"), "{}", r.stderr);
    // A line written in two pieces (mpirun tags each piece) comes out whole.
    assert!(
        r.stderr.lines().any(|l| l == "[rank 1] half a line"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.lines().any(|l| l == "half a line"), "{}", r.stderr);
    f.assert_nothing_left();
}

#[test]
fn mpirun_rank_killed_is_named_and_nothing_is_left() {
    if !have_mpirun() {
        return;
    }
    let f = Fixture::new();
    let mla = f.script(
        "mla",
        r#"trap 'exit 0' TERM
sh -c "while :; do sleep 0.05; done # $T grandchild" &
R=$OMPI_COMM_WORLD_RANK; echo $$ > "$T/.pid-$R" && mv "$T/.pid-$R" "$T/pid-$R"
while :; do sleep 0.05; done"#,
    );
    let run = f.start(f.launch(&mla, &["--device", "cpu", "--nproc", "2"]));
    f.wait_for_file("pid-0", Duration::from_secs(20));
    f.wait_for_file("pid-1", Duration::from_secs(20));
    // The rank process itself (`mla train`), as `pgrep -f "mla train"` would find it.
    let pid = f.read("pid-1");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("mla\0train\0"));
    f.kill_pid_in("pid-1", Signal::SIGKILL);
    let r = run.finish(Duration::from_secs(30));
    r.expect_code(137)
        .stderr_has("rank 1 was killed by signal 9 (SIGKILL)");
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}", r.elapsed);
    assert_eq!(
        r.stderr.lines().last().unwrap(),
        "mla-launch: error: rank 1 was killed by signal 9 (SIGKILL)"
    );
    f.assert_nothing_left();
}

#[test]
fn mpirun_rank_exit_code_is_named() {
    if !have_mpirun() {
        return;
    }
    let f = Fixture::new();
    let mla = f.script(
        "mla",
        r#"trap 'exit 0' TERM
touch "$T/up-$OMPI_COMM_WORLD_RANK"
if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then
  while [ ! -e "$T/up-0" ]; do sleep 0.02; done
  sleep 0.2
  exit 3
fi
while :; do sleep 0.05; done"#,
    );
    let r = f.run(f.launch(&mla, &["--device", "cpu", "--nproc", "2"]));
    r.expect_code(3).stderr_has("rank 1 exited with code 3");
    f.assert_nothing_left();
}

#[test]
fn sigterm_reaches_mpi_ranks_which_checkpoint_and_exit_0() {
    if !have_mpirun() {
        return;
    }
    let f = Fixture::new();
    let mla = f.script(
        "mla",
        r#"trap 'touch "$T/ckpt-$OMPI_COMM_WORLD_RANK"; exit 0' TERM
touch "$T/up-$OMPI_COMM_WORLD_RANK"
while :; do sleep 0.05; done"#,
    );
    let run = f.start(f.launch(&mla, &["--device", "cpu", "--nproc", "2"]));
    f.wait_for_file("up-0", Duration::from_secs(20));
    f.wait_for_file("up-1", Duration::from_secs(20));
    run.signal(Signal::SIGTERM);
    let r = run.finish(Duration::from_secs(30));
    r.expect_code(0)
        .stderr_has("stopped on request: all ranks exited 0");
    assert!(f.path().join("ckpt-0").exists() && f.path().join("ckpt-1").exists());
    f.assert_nothing_left();
}

#[test]
fn mpi_ranks_die_with_a_killed_launcher() {
    if !have_mpirun() {
        return;
    }
    let f = Fixture::new();
    let mla = f.script(
        "mla",
        r#"touch "$T/up-$OMPI_COMM_WORLD_RANK"; while :; do sleep 0.05; done"#,
    );
    let run = f.start(f.launch(&mla, &["--device", "cpu", "--nproc", "2"]));
    f.wait_for_file("up-0", Duration::from_secs(20));
    f.wait_for_file("up-1", Duration::from_secs(20));
    run.signal(Signal::SIGKILL);
    let r = run.finish(Duration::from_secs(10));
    assert_eq!(r.code, None, "killed");
    f.wait_nothing_left(Duration::from_secs(5));
}
