#!/usr/bin/env bash
# Checkpoint cost during training: how long each save blocks the training loop (the copy to host
# memory, plus any wait for the previous upload: never two saves at once) against the time of
# one optimizer step, and the background upload throughput — for the debug model
# (config_hub/pretrain/debug.yaml, ~10M parameters) and pythia-160m-sized state (162M
# parameters: 1.8 GiB of weights + AdamW moments), to local disk and to the local S3 test server
# (moto, scripts/s3_server.sh). Then the storage crate's save_bench on the same number of bytes
# (upload, verify, load; no training). Not a training-speed benchmark (scripts/bench/train_throughput.sh).
#
#   scripts/bench/checkpoint.sh [--device cpu|cuda] [--only debug|pythia-160m]
#
# Reads the `training blocked` debug lines and `checkpoint … saved` lines of `mla train`, and
# step times from metrics.jsonl (median of consecutive elapsed_secs differences).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
device=cpu only=
while (($#)); do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    *) echo "usage: $0 [--device cpu|cuda] [--only debug|pythia-160m]" >&2; exit 2 ;;
  esac
done
MLA=${MLA:-target/release/mla}
[ -x "$MLA" ] || cargo build --release -p mla-trainer --quiet
cargo build --release -p mla-storage --example save_bench --quiet
PY=.venv/bin/python
root=$(pwd)

data=$root/.cache/bench/ckpt-data
if [ ! -f "$data/index.json" ]; then
  "$MLA" prepare ../shared/data/tinystories/train/tinystories_v1_train_head.txt \
    --val ../shared/data/tinystories/valid/tinystories_v1_valid_head.txt \
    --tokenizer-dir ../shared/data/tokenizers/gpt-neox-20b --out "$data" --overwrite --quiet >/dev/null
fi

own_server=
if ! scripts/s3_server.sh env >/dev/null 2>&1; then own_server=1; fi
eval "$(scripts/s3_server.sh start)"
tmp=$(mktemp -d)
prefix=bench-ckpt-$$-$(date +%s)
cleanup() {
  # Free the server's memory (moto keeps objects in RAM).
  AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY "$PY" - "$MLA_TEST_S3_BUCKET" "$prefix" <<'EOF' || true
import os, sys, boto3
s3 = boto3.resource("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=os.environ.get("AWS_REGION", "us-east-1"))
s3.Bucket(sys.argv[1]).objects.filter(Prefix=sys.argv[2] + "/").delete()
EOF
  rm -rf "$tmp"
  if [ -n "$own_server" ]; then scripts/s3_server.sh stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

echo "# $(date -u +%FT%TZ), mla $(git rev-parse --short HEAD), device $device, $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, load $(cut -d' ' -f1-3 /proc/loadavg)"

# run NAME OUT_DIR STEPS SAVE_INTERVAL [overrides…]
run() {
  local name=$1 out=$2 steps=$3 every=$4
  shift 4
  local cwd=$tmp/$name
  mkdir -p "$cwd"
  (cd "$cwd" && RUST_LOG=info,mla_trainer=debug "$root/$MLA" train --device "$device" \
    --config "$root/config_hub/pretrain/debug.yaml" --out_dir "$out" \
    --data.train_data_path "$data" --data.val_data_path null \
    --tokenizer_dir "$root/../shared/data/tokenizers/gpt-neox-20b" \
    --train.max_steps "$steps" --train.save_interval "$every" --train.log_interval 1 \
    --eval.initial_validation false --eval.final_validation false --eval.interval 1000000 \
    --checkpoint.keep_last 1 "$@" 2>"$cwd/log") || { cat "$cwd/log" >&2; exit 1; }
  local metrics=$out/metrics.jsonl
  [[ $out == s3://* ]] && metrics=$(ls "$cwd"/.cache/mla/runs/*/metrics.jsonl)
  "$PY" - "$name" "$cwd/log" "$metrics" <<'EOF'
import json, re, statistics, sys
name, log, metrics = sys.argv[1:]
text = re.sub(r"\x1b\[[0-9;]*m", "", open(log).read())
unit = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
blocked = [(float(a), float(b), float(c)) for a, b, c in re.findall(
    r"training blocked ([\d.]+) ms \(([\d.]+) ms host copy of [\d.]+ \w+, ([\d.]+) ms waiting", text)]
saved = [(float(n) * unit[u], float(s)) for n, u, s in re.findall(r"checkpoint \S+ saved: ([\d.]+) (\w+) in ([\d.]+) s", text)]
rows = [json.loads(l) for l in open(metrics) if '"loss"' in l]
step = statistics.median(b["elapsed_secs"] - a["elapsed_secs"] for a, b in zip(rows, rows[1:]))
first, rest = blocked[0], blocked[1:] or blocked[:1]
mean = lambda xs: sum(xs) / len(xs)
later_total, later_copy, later_wait = (mean([r[i] for r in rest]) for i in range(3))
size = saved[0][0] / 2**30
mibs = sum(b for b, _ in saved) / sum(s for _, s in saved) / 2**20
print(f"{name:<22} step {step*1e3:8.1f} ms | blocked per save: first {first[0]:7.1f} ms (copy {first[1]:.1f}), "
      f"later {later_total:7.1f} ms (copy {later_copy:.1f} + wait {later_wait:.1f}) = {later_copy/(step*1e3):6.1%} of a step in copy | "
      f"{len(saved)} uploads of {size:.2f} GiB, {mibs:6.0f} MiB/s")
EOF
}

pythia=(--model_name pythia-160m --model_config null --train.micro_batch_size 1
  --train.global_batch_size 1 --train.max_seq_length 128)
if [[ -z $only || $only == debug ]]; then
  run debug/local "$tmp/debug-local" 12 3
  run debug/s3 "s3://$MLA_TEST_S3_BUCKET/$prefix/debug" 12 3
fi
if [[ -z $only || $only == pythia-160m ]]; then
  run pythia-160m/local "$tmp/pythia-local" 6 2 "${pythia[@]}"
  run pythia-160m/s3 "s3://$MLA_TEST_S3_BUCKET/$prefix/pythia" 6 2 "${pythia[@]}"
fi

echo "# storage only (save_bench: one background save, verify, load; 3 objects)"
for mib in 115 1858; do
  target/release/examples/save_bench "$tmp/save-bench-$mib" "$mib" 3
  target/release/examples/save_bench "s3://$MLA_TEST_S3_BUCKET/$prefix/save-bench-$mib" "$mib" 3
done
