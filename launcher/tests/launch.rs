//! End-to-end tests of `mla-launch` with fake ranks (shell scripts given as `--mla`): the env
//! contract, output prefixes, argument pass-through, failure handling, signals, restarts and
//! device selection. CUDA ranks are faked with `MLA_GPU_COUNT`; no GPU or trainer is needed.

mod common;

use common::Fixture;
use nix::sys::signal::Signal;
use std::collections::HashMap;
use std::time::Duration;

/// `[rank K] k=v k=v` → (prefix, map).
fn parse_env_line(line: &str) -> (String, HashMap<String, String>) {
    let (prefix, rest) = match line.strip_prefix("[rank ") {
        Some(r) => {
            let (n, rest) = r.split_once("] ").unwrap();
            (format!("[rank {n}] "), rest)
        }
        None => (String::new(), line),
    };
    let map = rest
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (prefix, map)
}

const PRINT_ENV: &str = r#"echo "rank=$RANK local=$LOCAL_RANK world=$WORLD_SIZE lws=$LOCAL_WORLD_SIZE addr=$MASTER_ADDR port=$MASTER_PORT group=$GROUP_RANK omp=$OMP_NUM_THREADS""#;

#[test]
fn env_contract_for_each_rank_on_one_node() {
    let f = Fixture::new();
    let mla = f.script("mla", PRINT_ENV);
    let mut cmd = f.launch(&mla, &["--gpus", "3"]);
    cmd.env("MLA_GPU_COUNT", "3").env("RANK", "99"); // a stale RANK must not leak
    let r = f.run(cmd);
    r.expect_code(0);
    let lines: Vec<_> = r.stdout.lines().map(parse_env_line).collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    let port = &lines[0].1["port"];
    assert!(port.parse::<u16>().is_ok(), "MASTER_PORT {port}");
    for (prefix, env) in &lines {
        let rank: u32 = env["rank"].parse().unwrap();
        let want_prefix = if rank == 0 {
            String::new()
        } else {
            format!("[rank {rank}] ")
        };
        assert_eq!(prefix, &want_prefix);
        assert_eq!(env["local"], rank.to_string());
        assert_eq!(env["world"], "3");
        assert_eq!(env["lws"], "3");
        assert_eq!(env["addr"], "127.0.0.1");
        assert_eq!(&env["port"], port, "one MASTER_PORT for all ranks");
        assert_eq!(env["group"], "0");
    }
    let mut ranks: Vec<_> = lines.iter().map(|(_, e)| e["rank"].clone()).collect();
    ranks.sort();
    assert_eq!(ranks, ["0", "1", "2"]);
    f.assert_nothing_left();
}

#[test]
fn multi_node_rank_arithmetic() {
    let f = Fixture::new();
    let mla = f.script("mla", PRINT_ENV);
    let mut cmd = f.launch(
        &mla,
        &[
            "--gpus",
            "2",
            "--nnodes",
            "3",
            "--node-rank",
            "1",
            "--master-addr",
            "10.1.2.3",
            "--master-port",
            "29555",
            "--prefix-rank0",
        ],
    );
    cmd.env("MLA_GPU_COUNT", "2").env("OMP_NUM_THREADS", "3"); // the user's setting wins
    let r = f.run(cmd);
    r.expect_code(0);
    let got = r.sorted_stdout();
    assert_eq!(
        got,
        [
            "[rank 2] rank=2 local=0 world=6 lws=2 addr=10.1.2.3 port=29555 group=1 omp=3",
            "[rank 3] rank=3 local=1 world=6 lws=2 addr=10.1.2.3 port=29555 group=1 omp=3",
        ]
    );
}

#[test]
fn output_is_prefixed_by_rank_on_the_stream_it_was_written_to() {
    let f = Fixture::new();
    let mla = f.script(
        "mla",
        r#"echo "out $RANK"; echo "err $RANK" >&2; printf 'no newline %s' "$RANK""#,
    );
    let mut cmd = f.launch(&mla, &["--gpus", "2"]);
    cmd.env("MLA_GPU_COUNT", "2");
    let r = f.run(cmd);
    r.expect_code(0);
    assert!(r.stdout.lines().any(|l| l == "out 0"), "{}", r.stdout);
    assert!(
        r.stdout.lines().any(|l| l == "[rank 1] out 1"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.lines().any(|l| l == "[rank 1] no newline 1"),
        "{}",
        r.stdout
    );
    assert!(r.stderr.lines().any(|l| l == "err 0"), "{}", r.stderr);
    assert!(
        r.stderr.lines().any(|l| l == "[rank 1] err 1"),
        "{}",
        r.stderr
    );
    assert!(!r.stdout.contains("err"), "stderr stays on stderr");

    let mut cmd = f.launch(&mla, &["--gpus", "2", "--prefix-rank0"]);
    cmd.env("MLA_GPU_COUNT", "2");
    let r = f.run(cmd);
    assert!(
        r.stdout.lines().any(|l| l == "[rank 0] out 0"),
        "{}",
        r.stdout
    );
    assert!(
        r.stderr.lines().any(|l| l == "[rank 0] err 0"),
        "{}",
        r.stderr
    );
}

#[test]
fn arguments_pass_through_verbatim() {
    let f = Fixture::new();
    let mla = f.script("mla", r#"for a in "$@"; do printf 'arg:%s\n' "$a"; done"#);
    let cmd = f.launch(
        &mla,
        &[
            "--train.max_steps",
            "20",
            "--device",
            "cpu",
            "two words",
            "--out_dir=x/y",
            "--data.init_args.train_data_path",
            "-",
            "--",
            "--gpus",
            "5",
            "--config",
            "other",
        ],
    );
    let r = f.run(cmd);
    r.expect_code(0);
    let args: Vec<&str> = r
        .stdout
        .lines()
        .map(|l| l.strip_prefix("arg:").unwrap())
        .collect();
    let cfg = f.config.to_str().unwrap();
    assert_eq!(
        args,
        [
            "train",
            "--device",
            "cpu",
            "--config",
            cfg,
            "--train.max_steps",
            "20",
            "two words",
            "--out_dir=x/y",
            "--data.init_args.train_data_path",
            "-",
            "--gpus",
            "5",
            "--config",
            "other",
            // What the launcher started, after everything passed through.
            "--devices",
            "1",
            "--num_nodes",
            "1",
        ]
    );
}

/// Ranks that start a grandchild (marker in its command line), say they are up, then loop;
/// SIGTERM → exit 0.
const LOOPING_RANK: &str = r#"
trap 'exit 0' TERM
sh -c "while :; do sleep 0.05; done # $T grandchild" &
touch "$T/up-$RANK"
"#;

#[test]
fn rank_killed_with_sigkill_stops_the_group_within_10s_and_leaves_nothing() {
    let f = Fixture::new();
    let mla = f.script(
        "mla",
        &format!("{LOOPING_RANK}\necho $$ > \"$T/.pid-$RANK\" && mv \"$T/.pid-$RANK\" \"$T/pid-$RANK\"\nwhile :; do sleep 0.05; done"),
    );
    let mut cmd = f.launch(&mla, &["--gpus", "3"]);
    cmd.env("MLA_GPU_COUNT", "3");
    let run = f.start(cmd);
    for r in 0..3 {
        f.wait_for_file(&format!("up-{r}"), Duration::from_secs(10));
    }
    f.wait_for_file("pid-1", Duration::from_secs(10));
    f.kill_pid_in("pid-1", Signal::SIGKILL);
    let r = run.finish(Duration::from_secs(30));
    r.expect_code(137)
        .stderr_has("rank 1 was killed by signal 9 (SIGKILL); stopping the other ranks");
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}", r.elapsed);
    assert_eq!(
        r.stderr.lines().last().unwrap(),
        "mla-launch: error: rank 1 was killed by signal 9 (SIGKILL)"
    );
    f.assert_nothing_left();
}

#[test]
fn first_failing_rank_code_is_the_launcher_exit_code() {
    let f = Fixture::new();
    let mla = f.script(
        "mla",
        &format!(
            r#"{LOOPING_RANK}
if [ "$RANK" = 2 ]; then exit 7; fi
while :; do sleep 0.05; done"#
        ),
    );
    let mut cmd = f.launch(&mla, &["--gpus", "3"]);
    cmd.env("MLA_GPU_COUNT", "3");
    let r = f.run(cmd);
    r.expect_code(7).stderr_has("rank 2 exited with code 7");
    f.assert_nothing_left();
}

/// Ranks that "checkpoint" on SIGTERM (write a file) and exit 0.
const CHECKPOINTING_RANK: &str = r#"
trap 'echo "rank $RANK checkpointing"; touch "$T/ckpt-$RANK"; exit 0' TERM
touch "$T/up-$RANK"
while :; do sleep 0.05; done"#;

fn stop_on_signal(sig: Signal) {
    let f = Fixture::new();
    let mla = f.script("mla", CHECKPOINTING_RANK);
    let mut cmd = f.launch(&mla, &["--gpus", "3"]);
    cmd.env("MLA_GPU_COUNT", "3");
    let run = f.start(cmd);
    for r in 0..3 {
        f.wait_for_file(&format!("up-{r}"), Duration::from_secs(10));
    }
    run.signal(sig);
    let r = run.finish(Duration::from_secs(30));
    r.expect_code(0)
        .stderr_has(&format!(
            "{}: asking every rank to checkpoint and exit",
            sig.as_str()
        ))
        .stderr_has("stopped on request: all ranks exited 0");
    for rank in 0..3 {
        assert!(
            f.path().join(format!("ckpt-{rank}")).exists(),
            "rank {rank} did not checkpoint"
        );
    }
    assert!(
        r.stdout.contains("[rank 2] rank 2 checkpointing"),
        "{}",
        r.stdout
    );
    f.assert_nothing_left();
}

#[test]
fn sigterm_to_the_launcher_checkpoints_every_rank_and_exits_0() {
    stop_on_signal(Signal::SIGTERM);
}

#[test]
fn sigint_to_the_launcher_checkpoints_every_rank_and_exits_0() {
    stop_on_signal(Signal::SIGINT);
}

/// Rank 0 ignores SIGTERM (and so do its children: ignored signals survive exec).
const STUBBORN_RANK0: &str = r#"
if [ "$RANK" = 0 ]; then trap '' TERM; else trap 'exit 0' TERM; fi
touch "$T/up-$RANK"
"#;

#[test]
fn rank_ignoring_sigterm_after_a_failure_is_killed_after_the_grace_period() {
    let f = Fixture::new();
    let mla = f.script(
        "mla",
        &format!(
            r#"{STUBBORN_RANK0}
if [ "$RANK" = 1 ]; then
  while [ ! -e "$T/up-0" ]; do sleep 0.02; done
  exit 1
fi
while :; do sleep 0.05; done"#
        ),
    );
    let mut cmd = f.launch(&mla, &["--gpus", "2", "--grace-secs", "1"]);
    cmd.env("MLA_GPU_COUNT", "2");
    let r = f.run(cmd);
    r.expect_code(1)
        .stderr_has("rank 1 exited with code 1")
        .stderr_has("rank 0 still running after SIGTERM: sending SIGKILL");
    assert!(
        r.elapsed >= Duration::from_secs(1) && r.elapsed < Duration::from_secs(8),
        "took {:?}",
        r.elapsed
    );
    f.assert_nothing_left();
}

#[test]
fn signal_while_stopping_after_a_failure_prevents_the_restart() {
    let f = Fixture::new();
    let mla = f.script(
        "mla",
        &format!(
            r#"{STUBBORN_RANK0}
if [ "$RANK" = 1 ]; then
  while [ ! -e "$T/up-0" ]; do sleep 0.02; done
  exit 1
fi
while :; do sleep 0.05; done"#
        ),
    );
    let mut cmd = f.launch(
        &mla,
        &["--gpus", "2", "--grace-secs", "30", "--max-restarts", "3"],
    );
    cmd.env("MLA_GPU_COUNT", "2");
    let run = f.start(cmd);
    run.wait_for_stderr("stopping the other ranks", Duration::from_secs(10));
    run.signal(Signal::SIGTERM); // rank 0 ignores it; a second one kills
    std::thread::sleep(Duration::from_millis(200));
    run.signal(Signal::SIGTERM);
    let r = run.finish(Duration::from_secs(10));
    r.expect_code(1)
        .stderr_has("will not restart")
        .stderr_has("rank 1 exited with code 1 (launcher signalled: not restarting)");
    assert!(!r.stderr.contains("restart 1/3"), "{}", r.stderr);
    f.assert_nothing_left();
}

#[test]
fn rank_ignoring_sigterm_on_stop_is_killed_after_the_stop_timeout() {
    let f = Fixture::new();
    let mla = f.script(
        "mla",
        &format!("{STUBBORN_RANK0}\nwhile :; do sleep 0.05; done"),
    );
    let mut cmd = f.launch(&mla, &["--gpus", "2", "--stop-timeout-secs", "1"]);
    cmd.env("MLA_GPU_COUNT", "2");
    let run = f.start(cmd);
    f.wait_for_file("up-0", Duration::from_secs(10));
    f.wait_for_file("up-1", Duration::from_secs(10));
    run.signal(Signal::SIGTERM);
    let r = run.finish(Duration::from_secs(30));
    r.expect_code(137)
        .stderr_has("rank 0 still running after SIGTERM: sending SIGKILL")
        .stderr_has("rank 0 was killed by signal 9 (SIGKILL) (while stopping on request)");
    f.assert_nothing_left();
}

#[test]
fn second_signal_kills_at_once() {
    let f = Fixture::new();
    let mla = f.script(
        "mla",
        &format!("{STUBBORN_RANK0}\nwhile :; do sleep 0.05; done"),
    );
    let mut cmd = f.launch(&mla, &["--gpus", "2"]); // default stop timeout: 300 s
    cmd.env("MLA_GPU_COUNT", "2");
    let run = f.start(cmd);
    f.wait_for_file("up-0", Duration::from_secs(10));
    f.wait_for_file("up-1", Duration::from_secs(10));
    run.signal(Signal::SIGINT);
    std::thread::sleep(Duration::from_millis(300));
    run.signal(Signal::SIGINT);
    let r = run.finish(Duration::from_secs(10));
    r.expect_code(137)
        .stderr_has("SIGINT again: killing all ranks now");
    f.assert_nothing_left();
}

#[test]
fn ranks_die_with_a_killed_launcher() {
    let f = Fixture::new();
    let mla = f.script(
        "mla",
        r#"touch "$T/up-$RANK"; while :; do sleep 0.05; done"#,
    );
    let mut cmd = f.launch(&mla, &["--gpus", "2"]);
    cmd.env("MLA_GPU_COUNT", "2");
    let run = f.start(cmd);
    f.wait_for_file("up-0", Duration::from_secs(10));
    f.wait_for_file("up-1", Duration::from_secs(10));
    run.signal(Signal::SIGKILL);
    let r = run.finish(Duration::from_secs(10));
    assert_eq!(r.code, None, "killed");
    f.wait_nothing_left(Duration::from_secs(5));
}

/// Rank 1 logs its arguments and fails unless resumed (when `$FAIL_ALWAYS` is unset).
const FLAKY_RANK: &str = r#"
trap 'exit 0' TERM
if [ "$RANK" = 1 ]; then
  echo "$*" >> "$T/attempts"
  case "$*" in *"--resume auto"*) [ -z "$FAIL_ALWAYS" ] && exit 0;; esac
  exit "${FAIL_CODE:-1}"
fi
while [ ! -e "$T/done" ]; do sleep 0.05; done"#;

#[test]
fn max_restarts_restarts_with_resume_auto_and_stops_after_k() {
    let f = Fixture::new();
    let mla = f.script("mla", FLAKY_RANK);
    let mut cmd = f.launch(
        &mla,
        &[
            "--gpus",
            "2",
            "--max-restarts",
            "2",
            "--train.max_steps",
            "5",
        ],
    );
    cmd.env("MLA_GPU_COUNT", "2").env("FAIL_ALWAYS", "1");
    let r = f.run(cmd);
    r.expect_code(1)
        .stderr_has(
            "restart 1/2: rank 1 exited with code 1; restarting all ranks with --resume auto",
        )
        .stderr_has("restart 2/2:")
        .stderr_has("rank 1 exited with code 1 (after 2 restart(s))");
    let cfg = f.config.to_str().unwrap();
    let first =
        format!("train --device cuda --config {cfg} --train.max_steps 5 --devices 2 --num_nodes 1");
    let resumed = format!("{first} --resume auto");
    assert_eq!(
        f.read("attempts").lines().collect::<Vec<_>>(),
        [&first, &resumed, &resumed]
    );
    f.assert_nothing_left();
}

#[test]
fn restart_recovers_when_the_resumed_ranks_succeed() {
    let f = Fixture::new();
    let mla = f.script("mla", FLAKY_RANK);
    std::fs::write(f.path().join("done"), "").unwrap(); // rank 0 exits 0 at once
    let mut cmd = f.launch(&mla, &["--gpus", "2", "--max-restarts", "3"]);
    cmd.env("MLA_GPU_COUNT", "2");
    let r = f.run(cmd);
    r.expect_code(0).stderr_has("restart 1/3");
    assert_eq!(f.read("attempts").lines().count(), 2);
}

#[test]
fn bad_input_exit_code_2_is_not_restarted() {
    let f = Fixture::new();
    let mla = f.script("mla", FLAKY_RANK);
    let mut cmd = f.launch(&mla, &["--gpus", "2", "--max-restarts", "3"]);
    cmd.env("MLA_GPU_COUNT", "2").env("FAIL_CODE", "2");
    let r = f.run(cmd);
    r.expect_code(2)
        .stderr_has("rank 1 exited with code 2 (bad input: not restarting)");
    assert_eq!(f.read("attempts").lines().count(), 1);
    f.assert_nothing_left();
}

#[test]
fn gpus_without_a_visible_gpu_is_a_one_line_error_exit_2() {
    let f = Fixture::new();
    let mla = f.script("mla", r#"touch "$T/started""#);
    let mut cmd = f.launch(&mla, &["--gpus", "1"]);
    // Real detection, with every GPU hidden the way CUDA itself honours it.
    cmd.env_remove("MLA_GPU_COUNT")
        .env("CUDA_VISIBLE_DEVICES", "");
    let r = f.run(cmd);
    r.expect_code(2);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    r.stderr_has("mla-launch: error: --gpus 1 needs CUDA, but no NVIDIA GPU is visible")
        .stderr_has("use --device cpu");
    assert!(!f.path().join("started").exists());
}

#[test]
fn more_gpus_than_visible_is_an_error() {
    let f = Fixture::new();
    let mla = f.script("mla", "true");
    let mut cmd = f.launch(&mla, &["--gpus", "4"]);
    cmd.env("MLA_GPU_COUNT", "2");
    f.run(cmd)
        .expect_code(2)
        .stderr_has("--gpus 4 asks for 4 GPUs but only 2 are visible");
}

#[test]
fn no_device_flag_and_no_gpu_runs_one_cpu_rank_and_says_so() {
    let f = Fixture::new();
    let mla = f.script("mla", r#"echo "$RANK/$WORLD_SIZE $*""#);
    let r = f.run(f.launch(&mla, &[]));
    r.expect_code(0)
        .stderr_has("no NVIDIA GPU visible: training on 1 CPU rank(s) (--device cpu)");
    let cfg = f.config.to_str().unwrap();
    assert_eq!(
        r.stdout.trim(),
        format!("0/1 train --device cpu --config {cfg} --devices 1 --num_nodes 1")
    );
}

#[test]
fn no_device_flag_uses_all_visible_gpus() {
    let f = Fixture::new();
    let mla = f.script("mla", r#"echo "$RANK/$WORLD_SIZE $3""#);
    let mut cmd = f.launch(&mla, &[]);
    cmd.env("MLA_GPU_COUNT", "2");
    let r = f.run(cmd);
    r.expect_code(0).stderr_has("using all 2 visible GPUs");
    assert_eq!(r.sorted_stdout(), ["0/2 cuda", "[rank 1] 1/2 cuda"]);
}

#[test]
fn bad_flags_and_input_exit_2_with_one_line() {
    let f = Fixture::new();
    let mla = f.script("mla", "true");
    let cases: &[(&[&str], &str)] = &[
        (&["--gpus", "0"], "--gpus"),
        (&["--device", "tpu"], "tpu"),
        (&["--nnodes", "2"], "--nnodes 2 needs --master-addr"),
        (&["--device", "cpu", "--gpus", "1"], "--gpus needs CUDA"),
    ];
    for (args, needle) in cases {
        let r = f.run(f.launch(&mla, args));
        r.expect_code(2).stderr_has(needle);
    }
    let cfg = f.config.to_str().unwrap();
    let m = mla.to_str().unwrap();
    let raw: &[(&[&str], &str)] = &[
        (
            &["--mla", "/nonexistent/mla", "--config", cfg],
            "--mla /nonexistent/mla: not an executable file",
        ),
        (
            &["--mla", m, "--config", "/nonexistent/cfg.yaml"],
            "--config /nonexistent/cfg.yaml: no such file",
        ),
        (&["--mla", m], "--config"),
    ];
    for (args, needle) in raw {
        let r = f.run(f.launch_raw(args));
        r.expect_code(2).stderr_has(needle);
    }
    // --help is not an error.
    let r = f.run(f.launch(&mla, &["--help"]));
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("--max-restarts"), "{}", r.stdout);
}

/// litgpt's `devices` and `num_nodes` in the config are the defaults of --gpus/--nproc and
/// --nnodes, never silently ignored (issue 9): `devices: 2` on 3 visible GPUs starts 2 ranks
/// (and tells them so); a flag wins; more devices than GPUs and `num_nodes: 2` without
/// --master-addr are one-line errors.
#[test]
fn devices_and_num_nodes_of_the_config_are_the_defaults_of_the_flags() {
    let f = Fixture::new();
    let mla = f.script("mla", PRINT_ENV);
    std::fs::write(&f.config, "devices: 2\nnum_nodes: 1\n").unwrap();
    let mut cmd = f.launch(&mla, &[]);
    cmd.env("MLA_GPU_COUNT", "3");
    let r = f.run(cmd);
    r.expect_code(0)
        .stderr_has("2 rank(s) per node from the config's devices: 2");
    let lines: Vec<_> = r.stdout.lines().map(parse_env_line).collect();
    assert_eq!(lines.len(), 2, "{}", r.stdout);
    assert!(lines.iter().all(|(_, env)| env["world"] == "2"));

    let mut cmd = f.launch(&mla, &["--gpus", "3"]);
    cmd.env("MLA_GPU_COUNT", "3");
    let r = f.run(cmd);
    r.expect_code(0);
    assert_eq!(r.stdout.lines().count(), 3, "the flag wins: {}", r.stdout);

    std::fs::write(&f.config, "devices: 8\n").unwrap();
    let mut cmd = f.launch(&mla, &[]);
    cmd.env("MLA_GPU_COUNT", "3");
    f.run(cmd).expect_code(2).stderr_has(
        "8 ranks per node asked (--nproc or the config's devices) but only 3 GPUs are visible",
    );

    std::fs::write(&f.config, "devices: 1\nnum_nodes: 2\n").unwrap();
    let mut cmd = f.launch(&mla, &[]);
    cmd.env("MLA_GPU_COUNT", "3");
    f.run(cmd)
        .expect_code(2)
        .stderr_has("--nnodes 2 needs --master-addr");
}
