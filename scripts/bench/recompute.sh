#!/usr/bin/env bash
# Activation recomputation (issue 12, `train.activation_checkpointing`): peak RSS and step time
# of one CPU rank training the seed's pythia-160m MLA (config_hub/pretrain/cfg.yaml) in fp32 at
# micro batch 4 × 2048, once per policy, one after the other on the same machine. Peak RSS is
# /usr/bin/time's maximum resident set; tokens/s the mean of the steps after the first.
#
#   scripts/bench/recompute.sh [--steps N] [--policies none,blocks,{every_k:2}] [--layers L --width C --heads H]
#
# --layers/--width/--heads resize the model (pythia-410m: 24 / 1024 / 16).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
steps=3 policies=none,blocks layers= width= heads=
while (($#)); do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --policies) policies=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --width) width=$2; shift 2 ;;
    --heads) heads=$2; shift 2 ;;
    *) echo "usage: $0 [--steps N] [--policies none,blocks,…] [--layers L --width C --heads H]" >&2; exit 2 ;;
  esac
done
MLA=${MLA:-target/release/mla}
[ -x "$MLA" ] || cargo build --release --bin mla --quiet
PY=.venv/bin/python
data=.cache/bench/data
if [ ! -f "$data/index.json" ]; then
  "$MLA" prepare ../shared/data/tinystories/train --val ../shared/data/tinystories/valid \
    --tokenizer-dir ../shared/data/tokenizers/gpt-neox-20b --out "$data" --quiet >/dev/null
fi
resize=()
[ -n "$layers" ] && resize+=(--model_config.n_layer "$layers")
[ -n "$width" ] && resize+=(--model_config.n_embd "$width")
[ -n "$heads" ] && resize+=(--model_config.n_head "$heads" --model_config.n_query_groups "$heads")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "$(nproc) cores; pythia-160m MLA ${resize[*]:-} at 4 × 2048, fp32, $steps steps"
printf '| activation_checkpointing | estimate (mla info) | peak RSS | tokens/s (steps 2+) |\n|---|---|---|---|\n'
IFS=, read -ra list <<<"$policies"
for p in "${list[@]}"; do
  out=$tmp/run-${#p}-$RANDOM
  args=(--config config_hub/pretrain/cfg.yaml "${resize[@]}" --precision 32-true
    --train.activation_checkpointing "$p" --train.micro_batch_size 4 --train.global_batch_size 4)
  estimate=$("$MLA" info "${args[@]}" 2>/dev/null | sed -n 's/^memory *at least \([^ ]* [^ ]*\).*/\1/p' || true)
  /usr/bin/time -v "$MLA" train --device cpu "${args[@]}" --data.data_path "$data" \
    --tokenizer_dir ../shared/data/tokenizers/gpt-neox-20b --out_dir "$out" \
    --train.max_steps "$steps" --train.log_interval 1 --eval.initial_validation false \
    --eval.final_validation false --eval.interval 100000 --train.save_interval 100000 \
    2>"$tmp/log" >/dev/null || { tail -5 "$tmp/log" >&2; exit 1; }
  rss_kib=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$tmp/log")
  tps=$("$PY" -c "
import json
rows=[json.loads(l) for l in open('$out/metrics.jsonl') if '\"loss\"' in l]
print(round(sum(r['tokens_per_sec'] for r in rows[1:])/len(rows[1:])))")
  printf '| %s | %s | %.1f GiB | %s |\n' "$p" "${estimate:-?}" "$("$PY" -c "print($rss_kib / 1024 / 1024)")" "$tps"
  rm -rf "$out"
done
