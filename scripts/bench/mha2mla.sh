#!/usr/bin/env bash
# MHA → MLA conversion study (issue 11), on the CPU: train a small MHA model
# (scripts/bench/mha2mla.yaml, 4 × 128, ~14M parameters with the embeddings) on the TinyStories
# sample; convert it with `mla convert --to-mla` at two latent widths (KV cache ≈ 50% and ≈ 25%
# of MHA's), each by TransMLA's activation PCA and by MHA2MLA's weight SVD; fine-tune the PCA
# conversions for FT_STEPS (10% of the MHA run's tokens); train the same MLA architecture from
# scratch for the same total tokens (STEPS + FT_STEPS). Every model's val loss is measured by
# `mla eval` on the same 50 val batches (51,200 tokens). Prints one markdown table.
#
#   scripts/bench/mha2mla.sh            # STEPS=1000 FT_STEPS=100: ~40 min on 2 cores
#   STEPS=200 FT_STEPS=20 scripts/bench/mha2mla.sh   # a quick try
#
# Runs and conversions are kept under WORK (default .cache/bench/mha2mla-STEPS): a rerun
# reuses what finished.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
MLA=${MLA:-target/release/mla}
[ -x "$MLA" ] || cargo build --release --bin mla --quiet
PY=.venv/bin/python
steps=${STEPS:-1000}
ft=${FT_STEPS:-100}
work=${WORK:-.cache/bench/mha2mla-$steps}
data=$work/data
# MHA's cache: 2 · 4 heads · 32 = 256 values per layer. MLA's: C + Dr, Dr = the 16 rotated dims.
ranks=(112 48) # (112+16)/256 = 50%, (48+16)/256 = 25%
mkdir -p "$work"

if [ ! -f "$data/index.json" ]; then
  "$MLA" prepare ../shared/data/tinystories/train --val ../shared/data/tinystories/valid \
    --tokenizer-dir ../shared/data/tokenizers/gpt-neox-20b --out "$data" --overwrite --quiet
fi

# train OUT_DIR CONFIG [overrides…]: once (a finished run is kept).
train() {
  local out=$1 cfg=$2
  shift 2
  if [ -f "$out/final/manifest.json" ]; then return; fi
  echo "== training $out" >&2
  "$MLA" train --device cpu --config "$cfg" --data.train_data_path "$data" \
    --data.val_data_path null --out_dir "$out" --train.log_interval 100 "$@" 2>&1 |
    grep -E "step [0-9]+/|done" >&2
}
loss() {
  "$MLA" eval "$1" --data "$data" --max-iters 50 --json |
    "$PY" -c 'import json, sys; print(json.load(sys.stdin)["loss"])'
}

start=$(date +%s)
train "$work/mha" scripts/bench/mha2mla.yaml --train.max_steps "$steps"
# Controls: the MHA model continued as the conversions are, and converted at full rank (exact
# but for RoRoPE: what the positions alone cost).
train "$work/mha-continued" scripts/bench/mha2mla.yaml --initial_checkpoint_dir "$work/mha/final" \
  --train.max_steps "$ft" --train.lr_warmup_steps 10 --optimizer.init_args.lr 1.0e-4
if [ ! -f "$work/convert-full/final/manifest.json" ]; then
  "$MLA" convert "$work/mha/final" --to-mla "$work/convert-full" --data "$data" --calib-batches 16 --eval-batches 50
fi
for r in "${ranks[@]}"; do
  for f in activations weights; do
    c=$work/convert-$r-$f
    if [ ! -f "$c/final/manifest.json" ]; then
      echo "== converting at kv_lora_rank $r by $f" >&2
      "$MLA" convert "$work/mha/final" --to-mla "$c" --kv-lora-rank "$r" --factor "$f" \
        --data "$data" --calib-batches 16 --eval-batches 50
    fi
  done
  cfg=$work/convert-$r-activations/final/config.yaml
  # Continued pretraining at the MHA run's final rate (its min_lr, 1e-4), after a short warmup:
  # of 1e-4, 3e-4, 1e-3 and 3e-3 it recovered most (BENCHMARKS.md).
  train "$work/finetune-$r" "$cfg" --initial_checkpoint_dir "$work/convert-$r-activations/final" \
    --train.max_steps "$ft" --train.lr_warmup_steps 10 --optimizer.init_args.lr 1.0e-4
  # The converted architecture from scratch, with the MHA run's recipe and all the tokens.
  train "$work/scratch-$r" "$cfg" --initial_checkpoint_dir null --train.max_steps $((steps + ft))
done

tokens() { echo $(($1 * 16 * 128)); }
{
  echo "| model | KV cache values/token (% of MHA) | tokens | val loss | Δ vs MHA |"
  echo "|---|---|---|---|---|"
  mha=$(loss "$work/mha/final")
  printf '| MHA (4 × 128, 4 heads) | %d (100%%) | %s | %.4f | |\n' $((4 * 256)) "$(tokens "$steps")" "$mha"
  printf '| MHA + %s steps as the fine-tunes | %d (100%%) | %s | %.4f | %+.4f |\n' "$ft" $((4 * 256)) \
    "$(tokens $((steps + ft)))" "$(loss "$work/mha-continued/final")" "$("$PY" -c "print($(loss "$work/mha-continued/final") - $mha)")"
  full=$(loss "$work/convert-full/final")
  printf '| converted at full rank C=128 (exact but for RoRoPE), no fine-tune | %d (56%%) | %s | %.4f | %+.4f |\n' \
    $((4 * 144)) "$(tokens "$steps")" "$full" "$("$PY" -c "print($full - $mha)")"
  for r in "${ranks[@]}"; do
    kv=$((4 * (r + 16)))
    pct=$((100 * (r + 16) / 256))
    row() { printf '| %s | %d (%d%%) | %s | %.4f | %+.4f |\n' "$1" "$kv" "$pct" "$2" "$3" "$("$PY" -c "print($3 - $mha)")"; }
    row "converted C=$r, PCA of activations (TransMLA), no fine-tune" "$(tokens "$steps")" "$(loss "$work/convert-$r-activations/final")"
    row "converted C=$r, SVD of weights (MHA2MLA), no fine-tune" "$(tokens "$steps")" "$(loss "$work/convert-$r-weights/final")"
    row "converted C=$r (PCA) + $ft steps" "$(tokens $((steps + ft)))" "$(loss "$work/finetune-$r/final")"
    row "MLA C=$r from scratch" "$(tokens $((steps + ft)))" "$(loss "$work/scratch-$r/final")"
  done
} | tee "$work/table.md"
echo "mha2mla: table in $work/table.md ($(($(date +%s) - start)) s)" >&2
