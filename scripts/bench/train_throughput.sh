#!/usr/bin/env bash
# Training throughput: mla vs the plain-PyTorch reference (scripts/ref/train_ref.py) on the same
# model (scripts/bench/throughput.yaml: MLA, 4 layers × 256, block 256, micro batch 8, GPT-NeoX
# vocabulary), the same data and the same torch 2.11, alternating runs. Prints tokens/s of each run,
# the medians and their ratio (mla / reference).
#
# --same-malloc also runs the reference with mla's glibc malloc setting (freed memory kept in the
# heap: trainer/src/main.rs) through GLIBC_TUNABLES, and prints both ratios, so the allocator's
# share of the difference is visible.
#
#   scripts/bench/train_throughput.sh [--device cpu|cuda] [--rounds N] [--steps N] [--same-malloc]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
device=cpu rounds=3 steps=12 warmup=2 same_malloc=0
while (($#)); do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --same-malloc) same_malloc=1; shift ;;
    *) echo "usage: $0 [--device cpu|cuda] [--rounds N] [--steps N] [--same-malloc]" >&2; exit 2 ;;
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

# mla's mallopt (M_MMAP_MAX 0, no trimming) as glibc tunables, for the reference.
mla_malloc=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647
ref() {
  .venv/bin/python scripts/ref/train_ref.py --config "$cfg" --data "$data" --device "$device" --steps "$steps" --warmup "$warmup" \
    | .venv/bin/python -c "import json,sys; print(json.load(sys.stdin)['tokens_per_sec'])"
}
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
  ref_tps=$(ref)
  printf 'round %d: mla %8.0f tok/s   pytorch %8.0f tok/s' "$r" "$mla_tps" "$ref_tps"
  echo "$mla_tps" >>"$tmp/mla"; echo "$ref_tps" >>"$tmp/ref"
  if ((same_malloc)); then
    tuned_tps=$(GLIBC_TUNABLES=$mla_malloc ref)
    printf '   pytorch, mla malloc %8.0f tok/s' "$tuned_tps"
    echo "$tuned_tps" >>"$tmp/ref-tuned"
  fi
  echo
done
m=$(median <"$tmp/mla"); p=$(median <"$tmp/ref")
ratio() { .venv/bin/python -c "print(f'{$1 / $2:.3f}')"; }
printf 'median: mla %.0f tok/s, pytorch %.0f tok/s, ratio %s\n' "$m" "$p" "$(ratio "$m" "$p")"
if ((same_malloc)); then
  q=$(median <"$tmp/ref-tuned")
  printf 'median: pytorch with mla malloc (GLIBC_TUNABLES=%s) %.0f tok/s, ratio %s\n' "$mla_malloc" "$q" "$(ratio "$m" "$q")"
fi
