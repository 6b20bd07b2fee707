#!/usr/bin/env bash
# Data-parallel CPU benchmark: the debug model (config_hub/pretrain/debug.yaml: MLA 2 layers × 96,
# block 128, global batch 16 = micro 8 × accumulation × ranks) trained by 1 rank and by 2 ranks
# (mla-launch --device cpu --nproc 2: MPI backend, OMP_NUM_THREADS = cores / 2 per rank) on the
# same data. Prints, per setup, the median tokens/s and step time over the timed steps and, for
# 2 ranks, the gradient all-reduce time per step and its share of step time (the trainer's debug
# line "gradient all-reduce … ms per step, …% of step time", measured on rank 0 around
# comm.all_reduce_sum of the flat gradient buffer; it includes waiting for the slower rank).
#
#   scripts/bench/dist_cpu.sh [--steps N] [--warmup N] [--rounds N]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
steps=30 warmup=5 rounds=2
while (($#)); do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) echo "usage: $0 [--steps N] [--warmup N] [--rounds N]" >&2; exit 2 ;;
  esac
done
MLA=${MLA:-target/release/mla}
LAUNCH=${LAUNCH:-target/release/mla-launch}
[ -x "$MLA" ] && [ -x "$LAUNCH" ] || cargo build --release -p mla-trainer -p mla-launcher --bins --quiet
data=.cache/bench/data
if [ ! -f "$data/index.json" ]; then
  "$MLA" prepare ../shared/data/tinystories/train --val ../shared/data/tinystories/valid \
    --tokenizer-dir ../shared/data/tokenizers/gpt-neox-20b --out "$data" --quiet >/dev/null
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
args=(--config config_hub/pretrain/debug.yaml --data.train_data_path "$data" --data.val_data_path null
  --train.max_steps "$steps" --train.log_interval 1 --train.save_interval 100000
  --eval.initial_validation false --eval.final_validation false --eval.interval 100000)

# Median tokens/s and step time (ms) of the timed steps of a run's metrics.jsonl.
stats() {
  python3 - "$1" "$warmup" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"loss"' in l][int(sys.argv[2]):]
tps = statistics.median(r["tokens_per_sec"] for r in rows)
tokens = rows[1]["tokens"] - rows[0]["tokens"]
print(f"{tps:.0f} {1000 * tokens / tps:.1f}")
EOF
}
# Median all-reduce ms per step and share of step time from the debug lines of a log.
reduce_stats() {
  python3 - "$1" "$warmup" <<'EOF'
import re, statistics, sys
pat = re.compile(r"gradient all-reduce ([0-9.]+) ms per step, ([0-9.]+)% of step time")
found = [m.groups() for m in map(pat.search, open(sys.argv[1], errors="replace")) if m][int(sys.argv[2]):]
print(f"{statistics.median(float(a) for a, _ in found):.1f} {statistics.median(float(b) for _, b in found):.1f}")
EOF
}

echo "debug model, $rounds rounds of $steps steps (first $warmup untimed), $(nproc) cores, $(mpirun --version | head -1)"
for r in $(seq "$rounds"); do
  "$MLA" train --device cpu "${args[@]}" --out_dir "$tmp/one-$r" 2>"$tmp/one-$r.log" \
    || { cat "$tmp/one-$r.log" >&2; exit 1; }
  read -r tps1 ms1 < <(stats "$tmp/one-$r")
  RUST_LOG=info,mla_trainer::train=debug "$LAUNCH" --device cpu --nproc 2 --mla "$MLA" "${args[@]}" \
    --out_dir "$tmp/two-$r" >"$tmp/two-$r.log" 2>&1 || { cat "$tmp/two-$r.log" >&2; exit 1; }
  read -r tps2 ms2 < <(stats "$tmp/two-$r")
  read -r red_ms red_pct < <(reduce_stats "$tmp/two-$r.log")
  printf 'round %d: 1 rank %6.0f tok/s (%6.1f ms/step) | 2 ranks %6.0f tok/s (%6.1f ms/step), all-reduce %5.1f ms/step = %4.1f%% of step time\n' \
    "$r" "$tps1" "$ms1" "$tps2" "$ms2" "$red_ms" "$red_pct"
done
