#!/usr/bin/env bash
# scripts/chaos.sh — replay the ways a run's checkpoints used to get lost (issue 14) against
# the release binary and print what is left: one row per scenario with the exit code of the
# run that was hit, the steps kept, how many of them verify (`mla ckpt list --verify`), and
# how many steps a run reported as saved that are now missing or fail to verify ("lost").
# Every row must say lost 0; the script exits 1 otherwise.
#
#   scripts/chaos.sh [--short]
#
# Scenarios (the tiny 16-wide debug model, a save every step):
#   concurrent-local   a second run on the same local out_dir while the first trains
#   concurrent-s3      the same on the S3 test server
#   fresh-into-run     resume: false into an out_dir that holds a run's checkpoints
#   kill9-mid-save     kill -9 while a save uploads (slowed PUTs), then --resume auto
#   disk-full          out_dir on a 50 MiB tmpfs that fills after two saves (needs root)
#   s3-stopped         the S3 server stopped (SIGSTOP) during a save, then continued
# --short (what scripts/test.sh runs) skips disk-full and s3-stopped, the slow ones.
# S3 scenarios need the environment of `scripts/s3_server.sh start` (started here if absent).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MLA=$ROOT/target/release/mla
short=0
for arg in "$@"; do
  case "$arg" in
    --short) short=1 ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "chaos.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
[ -x "$MLA" ] || { echo "chaos.sh: $MLA missing: run scripts/setup.sh" >&2; exit 2; }
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || PY=python3
started_s3=0
if [ -z "${MLA_TEST_S3_BUCKET:-}" ]; then
  eval "$(scripts/s3_server.sh start)"
  started_s3=1
fi

WORK=$(mktemp -d -t mla-chaos.XXXXXX)
cleanup() {
  umount "$WORK/tmpfs" 2>/dev/null || true
  rm -rf "$WORK"
  # Stop the S3 server only if this script started it (scripts/test.sh runs its own).
  ((started_s3)) && scripts/s3_server.sh stop >/dev/null 2>&1
  true
}
trap cleanup EXIT
DATA=$WORK/data
SHARED=$ROOT/../shared/data
"$MLA" prepare "$SHARED/tinystories/train/tinystories_v1_train_head.txt" \
  --val "$SHARED/tinystories/valid/tinystories_v1_valid_head.txt" --tokenizer-dir "$SHARED/tokenizers/gpt-neox-20b" --out "$DATA" --quiet >/dev/null || exit 1

# ARGS=(train … the tiny run into $1, then the extra overrides $2…).
args_for() {
  local out=$1
  shift
  ARGS=(train --device cpu --config "$ROOT/config_hub/pretrain/debug.yaml" --out_dir "$out"
    --data.train_data_path "$DATA" --data.val_data_path null
    --tokenizer_dir "$SHARED/tokenizers/gpt-neox-20b"
    --model_config.block_size 32 --model_config.n_embd 16 --model_config.n_head 2
    --train.micro_batch_size 2 --train.global_batch_size 4 --train.lr_warmup_steps 2
    --train.save_interval 1 --train.log_interval 1 --eval.initial_validation false
    --eval.final_validation false --eval.interval 100000 "$@")
}

# Steps reported saved in the logs $2…, minus what `ckpt list --verify` verifies in $1:
# prints "kept verified lost".
tally() {
  local out=$1
  shift
  local saved
  saved=$(cat "$@" 2>/dev/null | sed -n 's/.*checkpoint \([a-z0-9-]*\) saved:.*/\1/p' | sort -u | tr '\n' ' ')
  "$MLA" ckpt list --verify --json "$out" 2>/dev/null | "$PY" -c '
import json, sys
rows = json.load(sys.stdin)
saved = set(sys.argv[1].split())
kept = [r["dir"] for r in rows if r["status"] in ("verified", "invalid", "committed")]
verified = {r["dir"] for r in rows if r["status"] == "verified"}
print(len(kept), len(verified), len(saved - verified))
' "$saved" || echo "? ? ?"
}

rows=()
failed=0
row() { # scenario exit kept verified lost [note]
  rows+=("$(printf '%-18s %5s %5s %9s %5s  %s' "$@")")
  [ "$5" = 0 ] || failed=1
}

# Wait until `mla ckpt list` of $1 shows at least $2 committed steps, while process $3 runs
# (at most 120 s).
wait_committed() {
  local deadline=$((SECONDS + 120)) n
  while ((SECONDS < deadline)) && kill -0 "$3" 2>/dev/null; do
    n=$("$MLA" ckpt list --json "$1" 2>/dev/null | "$PY" -c 'import json,sys; print(sum(r["status"]=="committed" for r in json.load(sys.stdin)))' 2>/dev/null || echo 0)
    [ "${n:-0}" -ge "$2" ] && return 0
    sleep 0.1
  done
  return 1
}

concurrent() { # name out_dir
  local name=$1 out=$2 log=$WORK/$1
  args_for "$out" --train.max_steps 12 --seed 1
  MLA_STORE_TEST_PUT_DELAY_MS=100 "$MLA" "${ARGS[@]}" >"$log.a" 2>&1 &
  local a=$!
  wait_committed "$out" 1 "$a"
  args_for "$out" --train.max_steps 12 --seed 2
  "$MLA" "${ARGS[@]}" >"$log.b" 2>&1
  local code=$?
  wait "$a"
  local code_a=$?
  read -r kept verified lost < <(tally "$out" "$log.a" "$log.b")
  row "$name" "$code" "$kept" "$verified" "$lost" "second run: $(tail -1 "$log.b" | cut -c1-60)…; first exited $code_a"
}

fresh_into_run() {
  local out=$WORK/fresh log=$WORK/fresh
  args_for "$out" --train.max_steps 3
  "$MLA" "${ARGS[@]}" >"$log.a" 2>&1
  args_for "$out" --train.max_steps 3 --seed 9
  "$MLA" "${ARGS[@]}" >"$log.b" 2>&1
  local code=$?
  read -r kept verified lost < <(tally "$out" "$log.a")
  row fresh-into-run "$code" "$kept" "$verified" "$lost" "$(tail -1 "$log.b" | cut -c1-70)…"
}

kill9_mid_save() {
  local out=$WORK/kill9 log=$WORK/kill9
  args_for "$out" --train.max_steps 6
  MLA_STORE_TEST_PUT_DELAY_MS=300 "$MLA" "${ARGS[@]}" >"$log.a" 2>&1 &
  local a=$!
  wait_committed "$out" 2 "$a"
  sleep 0.4 # the next save is uploading
  kill -9 "$a"
  wait "$a" 2>/dev/null
  local code=$?
  args_for "$out" --train.max_steps 6 --resume auto
  "$MLA" "${ARGS[@]}" >"$log.b" 2>&1
  local code_b=$?
  local partial
  partial=$(find "$out" -name '*#*' | wc -l)
  read -r kept verified lost < <(tally "$out" "$log.a" "$log.b")
  row kill9-mid-save "$code" "$kept" "$verified" "$lost" "resume exited $code_b; partial files left: $partial"
}

disk_full() {
  local mnt=$WORK/tmpfs log=$WORK/full
  mkdir -p "$mnt"
  if ! mount -t tmpfs -o size=50m tmpfs "$mnt" 2>/dev/null; then
    rows+=("$(printf '%-18s %5s %5s %9s %5s  %s' disk-full - - - - 'skipped: cannot mount a tmpfs (needs root)')")
    return
  fi
  # Each checkpoint is ~21 MiB (weights, AdamW moments, tokenizer): the third save finds
  # the disk full.
  args_for "$mnt/run" --train.max_steps 5
  "$MLA" "${ARGS[@]}" >"$log.a" 2>&1
  local code=$?
  local partial used
  partial=$(find "$mnt" -name '*#*' | wc -l)
  used=$(df --output=pcent "$mnt" | tail -1 | tr -d ' ')
  read -r kept verified lost < <(tally "$mnt/run" "$log.a")
  row disk-full "$code" "$kept" "$verified" "$lost" "partial files left: $partial; tmpfs $used used"
  umount "$mnt"
}

s3_stopped() {
  local out=s3://$MLA_TEST_S3_BUCKET/chaos-$$/stopped log=$WORK/stopped
  args_for "$out" --train.max_steps 8 --train.save_interval 2
  MLA_STORE_TEST_PUT_DELAY_MS=200 MLA_STORE_REQUEST_TIMEOUT_SECS=1 MLA_STORE_CONNECT_TIMEOUT_SECS=1 \
    MLA_STORE_MAX_RETRIES=1 MLA_STORE_RETRY_TIMEOUT_SECS=2 \
    "$MLA" "${ARGS[@]}" >"$log.a" 2>&1 &
  local a=$!
  wait_committed "$out" 1 "$a"
  kill -STOP "$MLA_TEST_S3_PID"
  sleep 4
  kill -CONT "$MLA_TEST_S3_PID"
  wait "$a"
  local code=$?
  local failed_saves
  failed_saves=$(grep -c 'FAILED' "$log.a")
  read -r kept verified lost < <(tally "$out" "$log.a")
  row s3-stopped "$code" "$kept" "$verified" "$lost" "failed saves reported: $failed_saves"
}

started=$(date +%s)
concurrent concurrent-local "$WORK/concurrent"
concurrent concurrent-s3 "s3://$MLA_TEST_S3_BUCKET/chaos-$$/concurrent"
fresh_into_run
kill9_mid_save
if ((!short)); then
  disk_full
  s3_stopped
fi

printf '%-18s %5s %5s %9s %5s  %s\n' scenario exit kept verified lost note
for r in "${rows[@]}"; do echo "$r"; done
echo "chaos.sh: ${#rows[@]} scenario(s) in $(($(date +%s) - started)) s: $([ $failed = 0 ] && echo 'nothing lost' || echo 'CHECKPOINTS LOST')"
exit $failed
