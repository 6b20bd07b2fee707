#!/usr/bin/env bash
# The largest pythia + MLA model that trains on 8 GPUs of 16 GiB at micro batch 4 × 2048 in
# bf16-mixed, per `dist.shard` and `train.activation_checkpointing` (issue 12), from the
# measured memory model (BENCHMARKS.md, "ZeRO"):
#   per rank = weights, gradients and moments (exact: `mla info --json` at --devices 8, which
#              counts 4 + 4 + 4 + 8 B per parameter unsharded, 4 + 4 + 4 + 8/8 with `optimizer`,
#              4 + 4 + (4 + 8)/8 with `gradients`)
#            + activations, fitted to CPU runs in fp32 with glibc's malloc (not halved for bf16
#              autocast: a GPU run keeps less, so this errs towards "does not fit"): without
#              recomputation a · n_embd bytes per token and layer (--a, default 70); with
#              `blocks` b · n_embd per token and layer (--b, default 4: the fp32 block input)
#              plus one block's a · n_embd per token
#            + one logits chunk with its log-softmax and gradient (`mla info`'s logits term)
#            + a fixed overhead (CUDA context, cuBLAS workspace, allocator slack), --overhead GiB.
#
#   scripts/bench/zero_fit.sh [--a B] [--b B] [--overhead GIB] [--gpu-gib G]
set -euo pipefail
cd "$(dirname "$0")/../.."
a=70 b=4 overhead=1.5 gpu=16
while (($#)); do
  case "$1" in
    --a) a=$2; shift 2 ;;
    --b) b=$2; shift 2 ;;
    --overhead) overhead=$2; shift 2 ;;
    --gpu-gib) gpu=$2; shift 2 ;;
    *) echo "usage: $0 [--a B] [--b B] [--overhead GIB] [--gpu-gib G]" >&2; exit 2 ;;
  esac
done
MLA=${MLA:-target/release/mla}
[ -x "$MLA" ] || { source scripts/env.sh; cargo build --release --bin mla --quiet; }
PY=python3
# name layers width heads (the pythia family's shapes; MLA dims from latent_attention: true)
sizes="160m 12 768 12
410m 24 1024 16
1b 16 2048 8
1.4b 24 2048 16
2.8b 32 2560 32
6.9b 32 4096 32"
echo "8 ranks × micro batch 4 × 2048, bf16-mixed; activations per token, layer and unit of width: $a B (none), $b B (blocks) as measured on CPU in fp32; overhead $overhead GiB; fits: ≤ $gpu GiB"
printf '| model | parameters | dist.shard | recompute | weights+grads+moments | activations | per GPU | fits |\n|---|---|---|---|---|---|---|---|\n'
while read -r name layers width heads; do
  for shard in none optimizer gradients; do
    for policy in none blocks; do
      json=$("$MLA" info --config config_hub/pretrain/cfg.yaml --model_config.n_layer "$layers" \
        --model_config.n_embd "$width" --model_config.n_head "$heads" \
        --model_config.n_query_groups "$heads" --precision bf16-mixed --devices 8 \
        --dist.shard "$shard" --train.activation_checkpointing "$policy" --json 2>/dev/null)
      "$PY" - "$json" "$name" "$layers" "$width" "$shard" "$policy" "$a" "$b" "$overhead" "$gpu" <<'EOF'
import json, sys
j = json.loads(sys.argv[1]); name, L, C, shard, policy = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
a, b, overhead, gpu = (float(x) for x in sys.argv[7:11])
m = j["training_memory_bytes_at_least"]
gib = 2**30
tokens = 4 * 2048
per_layer = a * C * tokens
acts = L * per_layer if policy == "none" else L * tokens * C * b + per_layer
state = m["weights"] + m["gradients"] + m["optimizer"]
total = state + acts + m["logits"] + overhead * gib
print(f"| {name} | {j['parameters']/1e9:.2f} B | {shard} | {policy} | {state/gib:.1f} GiB | {acts/gib:.1f} GiB | {total/gib:.1f} GiB | {'yes' if total <= gpu * gib else 'no'} |")
EOF
    done
  done
done <<<"$sizes"
