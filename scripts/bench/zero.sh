#!/usr/bin/env bash
# ZeRO sharding and activation recomputation (issue 12): peak RSS of every CPU rank training
# the seed's pythia-160m MLA (config_hub/pretrain/cfg.yaml) in fp32 at micro batch 4 × 2048,
# one setup after the other on the same machine: ranks × dist.shard × activation_checkpointing.
# Peak RSS is /usr/bin/time's maximum resident set of each rank (2 ranks: mpirun, one thread
# each); "rank 0 training" is rank 0's peak RSS when its last metric line was written, before
# the final checkpoint (metrics.jsonl `peak_memory_bytes`: the save's host snapshot, and with
# dist.shard the moments gathered for it, come on top on rank 0); tokens/s the mean over the
# steps after the first (all ranks together); "estimate" is the per-rank lower bound
# `mla train` checks before it starts (train/memory.rs).
#
#   scripts/bench/zero.sh [--steps N] [--setups 1:none:none,2:gradients:blocks,…] [--micro B --seq T] [--layers L --width C --heads H]
#
# A setup is RANKS:SHARD:RECOMPUTE. --layers/--width/--heads resize the model (pythia-410m:
# 24 / 1024 / 16).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
steps=3 layers= width= heads= micro=4 seq=2048
setups=1:none:none,1:none:blocks,2:none:blocks,2:optimizer:blocks,2:gradients:blocks
while (($#)); do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --setups) setups=$2; shift 2 ;;
    --micro) micro=$2; shift 2 ;;
    --seq) seq=$2; shift 2 ;;
    --layers) layers=$2; shift 2 ;;
    --width) width=$2; shift 2 ;;
    --heads) heads=$2; shift 2 ;;
    *) echo "usage: $0 [--steps N] [--setups R:SHARD:RECOMPUTE,…] [--micro B --seq T] [--layers L --width C --heads H]" >&2; exit 2 ;;
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
gib() { "$PY" -c "print(f'{$1 / 1024 / 1024:.2f}')"; }

params=$("$MLA" info --config config_hub/pretrain/cfg.yaml "${resize[@]}" --json 2>/dev/null \
  | "$PY" -c "import json,sys; print(json.load(sys.stdin)['parameters'])")
echo "$(nproc) cores; pythia-160m MLA ${resize[*]:-} ($params parameters) at $micro × $seq per rank, fp32, $steps steps${MLA_DEFAULT_MALLOC:+, MLA_DEFAULT_MALLOC=$MLA_DEFAULT_MALLOC}"
printf '| ranks | dist.shard | activation_checkpointing | estimate per rank | peak RSS rank 0 (training) | peak RSS rank 0 (with the final save) | peak RSS rank 1 | tokens/s (all ranks) |\n|---|---|---|---|---|---|---|---|\n'
IFS=, read -ra list <<<"$setups"
for setup in "${list[@]}"; do
  IFS=: read -r ranks shard policy <<<"$setup"
  out=$tmp/run-$RANDOM
  args=(--config config_hub/pretrain/cfg.yaml "${resize[@]}" --precision 32-true
    --train.activation_checkpointing "$policy" --dist.shard "$shard"
    --train.micro_batch_size "$micro" --train.global_batch_size $((micro * ranks)) --devices "$ranks"
    --train.max_seq_length "$seq")
  estimate=$("$MLA" info "${args[@]}" 2>/dev/null | sed -n 's/^memory *at least \([^ ]* [^ ]*\).*/\1/p' || true)
  run=(train --device cpu "${args[@]}" --data.data_path "$data"
    --tokenizer_dir ../shared/data/tokenizers/gpt-neox-20b --out_dir "$out"
    --train.max_steps "$steps" --train.log_interval 1 --eval.initial_validation false
    --eval.final_validation false --eval.interval 100000 --train.save_interval 100000)
  if [ "$ranks" = 1 ]; then
    /usr/bin/time -v -o "$tmp/time.0" "$MLA" "${run[@]}" 2>"$tmp/log" >/dev/null \
      || { tail -5 "$tmp/log" >&2; exit 1; }
  else
    mpirun -np "$ranks" --oversubscribe --allow-run-as-root -x OMP_NUM_THREADS=1 ${MLA_DEFAULT_MALLOC:+-x MLA_DEFAULT_MALLOC} \
      bash -c 'exec /usr/bin/time -v -o "$0.$OMPI_COMM_WORLD_RANK" "$@"' "$tmp/time" "$MLA" "${run[@]}" \
      2>"$tmp/log" >/dev/null || { tail -5 "$tmp/log" >&2; exit 1; }
  fi
  rss=()
  for r in 0 1; do
    if [ -f "$tmp/time.$r" ]; then
      rss+=("$(gib "$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$tmp/time.$r")") GiB")
    else
      rss+=("–")
    fi
  done
  read -r tps trained < <("$PY" -c "
import json
rows=[json.loads(l) for l in open('$out/metrics.jsonl') if '\"loss\"' in l]
print(round(sum(r['tokens_per_sec'] for r in rows[1:])/len(rows[1:])), f\"{max(r['peak_memory_bytes'] for r in rows) / 2**30:.2f}\")")
  printf '| %s | %s | %s | %s | %s GiB | %s | %s | %s |\n' "$ranks" "$shard" "$policy" "${estimate:-?}" "$trained" "${rss[0]}" "${rss[1]}" "$tps"
  rm -rf "$out" "$tmp"/time.*
done
