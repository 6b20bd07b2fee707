#!/usr/bin/env bash
# scripts/fuzz.sh — coverage-guided fuzzing of every parser of untrusted bytes (issue 23), on
# the stable toolchain: libFuzzer (libfuzzer-sys) with rustc's sanitizer-coverage pass.
#
#   scripts/fuzz.sh [--seconds N] [--parallel P] [TARGET…]
#
# Each target (fuzz/targets/*.rs) compiles the mla module it fuzzes from its own source, and
# `cargo rustc` instruments exactly that crate (with overflow checks and debug assertions on),
# while every dependency is the release build's: building all targets after scripts/setup.sh
# takes seconds. Seeds are real files (scripts/fuzz/seeds.py: torch.save and safetensors
# files from the Python writers; a tiny `mla train` / `prepare` / `export` for mla's own
# checkpoints, manifests, datasets and configs; TinyStories text as .txt/.jsonl/.json, gz/zst
# and Parquet). The corpus grows in target/fuzz/corpus/<target> across runs.
#
# Limits per input: 2 GiB RSS, 2 GiB in one allocation, 10 s. A crash, an abort, an overflow,
# a leak past the RSS limit or a timeout is a finding: its input is kept in
# target/fuzz/artifacts/<target>/ (replay: target/release/fuzz_<target> FILE) and the script
# exits 1. Prints one row per target: executions, executions/s, corpus, findings.
#
# MLA_FUZZ_DIR moves target/fuzz (binaries, seeds, corpus, artifacts, logs) elsewhere.
# Defaults: every target, 15 s each (CI: `scripts/fuzz.sh` runs them all in under 3 minutes),
# P = 1 target at a time. BENCHMARKS.md has the long runs (--seconds 1800).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

seconds=15
parallel=1
targets=()
while (($#)); do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --parallel) parallel=$2; shift 2 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
all=(torch_save torch_pickle safetensors manifest shard_index config_yaml text parquet)
((${#targets[@]})) || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [[ " ${all[*]} " == *" $t "* ]] || { echo "fuzz.sh: unknown target $t (one of: ${all[*]})" >&2; exit 2; }
done

say() { printf '\033[1m[fuzz]\033[0m %s\n' "$*" >&2; }
# shellcheck source=scripts/env.sh
source scripts/env.sh
work=${MLA_FUZZ_DIR:-$ROOT/target/fuzz}
mkdir -p "$work"
# config_yaml links mla-model, which links libtorch (unused by the config code).
torch_lib=$(ls -d "$ROOT"/.venv/lib/python3*/site-packages/torch/lib 2>/dev/null | head -1)
[ -n "$torch_lib" ] && export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# ---- build ------------------------------------------------------------------------------------
coverage=(-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Coverflow-checks=on
  -Cdebug-assertions=on)
say "building ${#targets[@]} target(s), instrumenting mla's parsers only"
for t in "${targets[@]}"; do
  cargo rustc --quiet --release -p mla-fuzz --bin "fuzz_$t" -- "${coverage[@]}"
  # The normal build of the same binary is uninstrumented: keep the instrumented one aside.
  cp target/release/"fuzz_$t" "$work/fuzz_$t"
done

# ---- seeds ------------------------------------------------------------------------------------
seeds=$work/seeds
if [ ! -e "$seeds/.done" ]; then
  say "making seeds (real files from torch, safetensors and the mla binary)"
  rm -rf "$seeds"
  mkdir -p "$seeds"
  .venv/bin/python scripts/fuzz/seeds.py "$seeds" >&2
  scripts/fuzz/mla_seeds.sh "$seeds" >&2
  touch "$seeds/.done"
fi

# ---- run --------------------------------------------------------------------------------------
max_len() {
  case "$1" in
    torch_save | safetensors | parquet) echo 1048576 ;;
    torch_pickle | text) echo 65536 ;;
    *) echo 16384 ;;
  esac
}

run_one() {
  local t=$1 corpus=$work/corpus/$1 art=$work/artifacts/$1/ log=$work/logs/$1.log
  mkdir -p "$corpus" "$art" "$work/logs"
  local status=0
  "$work/fuzz_$t" "$corpus" "$seeds/$t" -max_total_time="$seconds" -rss_limit_mb=2048 \
    -malloc_limit_mb=2048 -timeout=10 -max_len="$(max_len "$t")" -print_final_stats=1 \
    -artifact_prefix="$art" -close_fd_mask=3 >"$log" 2>&1 || status=$?
  echo "$status" >"$log.status"
}

say "running each target for ${seconds} s (${parallel} at a time)"
started=$(date +%s)
running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if ((running >= parallel)); then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true

# ---- report -----------------------------------------------------------------------------------
failed=0
printf '%-14s %12s %10s %8s %9s  %s\n' target execs execs/s corpus "peak MiB" findings
for t in "${targets[@]}"; do
  log=$work/logs/$t.log
  stat() { awk -v k="stat::$1:" '$1 == k { print $2 }' "$log" | tail -1; }
  execs=$(stat number_of_executed_units)
  rate=$(stat average_exec_per_sec)
  rss=$(stat peak_rss_mb)
  corpus=$(find "$work/corpus/$t" -type f | wc -l)
  findings=$(find "$work/artifacts/$t" -type f | wc -l)
  status=$(cat "$log.status")
  note=""
  if ((status != 0 || findings > 0)); then
    failed=1
    note=" FAILED (exit $status; $(grep -m1 -E '^==[0-9]+== ERROR|panicked at|^SUMMARY' "$log" || echo "see $log"))"
  fi
  printf '%-14s %12s %10s %8s %9s  %s%s\n' "$t" "${execs:-0}" "${rate:-0}" "$corpus" "${rss:-?}" "$findings" "$note"
done
say "done in $(($(date +%s) - started)) s; logs in $work/logs"
if ((failed)); then
  echo "fuzz.sh: FINDINGS: inputs in $work/artifacts/<target>/ (replay: $work/fuzz_<target> FILE)" >&2
  exit 1
fi
