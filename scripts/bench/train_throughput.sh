#!/usr/bin/env bash
# Training throughput: mla vs the plain-PyTorch reference (scripts/ref/train_ref.py) on the same
# model (scripts/bench/throughput.yaml: MLA, 4 layers × 256, block 256, micro batch 8, GPT-NeoX
# vocabulary), the same data and the same torch 2.11, alternating runs. Prints tokens/s of each run,
# the medians and their ratio (mla / reference).
#
#   scripts/bench/train_throughput.sh [--device cpu|cuda] [--rounds N] [--steps N]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
device=cpu rounds=3 steps=12 warmup=2
while (($#)); do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    *) echo "usage: $0 [--device cpu|cuda] [--rounds N] [--steps N]" >&2; exit 2 ;;
  esac
done
MLA=${MLA:-target/release/mla}
[ -x "$MLA" ] || cargo build --release -p mla-trainer --quiet
data=.cache/bench/data
if [ ! -f "$data/index.json" ]; then
  "$MLA" prepare ../shared/data/tinystories/train --val ../shared/data/tinystories/valid \
    --tokenizer-dir ../shared/data/tokenizers/gpt-neox-20b --out "$data" --quiet >/dev/null
fi
cfg=scripts/bench/throughput.yaml
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "device $device, $rounds rounds of $steps steps (first $warmup untimed), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'), $(nproc) cores"
for r in $(seq "$rounds"); do
  out=$tmp/mla-$r
  "$MLA" train --config "$cfg" --device "$device" --out_dir "$out" --train.max_steps "$steps" 2>"$tmp/mla-$r.log" \
    || { cat "$tmp/mla-$r.log" >&2; exit 1; }
  mla_tps=$(.venv/bin/python -c "
import json,statistics,sys
rows=[json.loads(l) for l in open('$out/metrics.jsonl') if '\"loss\"' in l]
print(sum(r['tokens_per_sec'] for r in rows[$warmup:])/len(rows[$warmup:]))")
  ref_tps=$(.venv/bin/python scripts/ref/train_ref.py --config "$cfg" --data "$data" --device "$device" --steps "$steps" --warmup "$warmup" \
    | .venv/bin/python -c "import json,sys; print(json.load(sys.stdin)['tokens_per_sec'])")
  printf 'round %d: mla %8.0f tok/s   pytorch %8.0f tok/s\n' "$r" "$mla_tps" "$ref_tps"
  echo "$mla_tps" >>"$tmp/mla"; echo "$ref_tps" >>"$tmp/ref"
done
m=$(median <"$tmp/mla"); p=$(median <"$tmp/ref")
printf 'median: mla %.0f tok/s, pytorch %.0f tok/s, ratio %.3f\n' "$m" "$p" "$(.venv/bin/python -c "print($m / $p)")"
