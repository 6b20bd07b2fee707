#!/usr/bin/env bash
# Activation recomputation (issue 12, `train.activation_checkpointing`): peak RSS and step time
# of one CPU rank training the seed's pythia-160m MLA (config_hub/pretrain/cfg.yaml) in fp32 at
# micro batch 4 × 2048, once per policy, one after the other on the same machine — the one-rank
# setups of scripts/bench/zero.sh, which measures them (and sharded ranks) and prints the table.
#
#   scripts/bench/recompute.sh [--steps N] [--policies none,blocks,{every_k:2}] [--layers L --width C --heads H]
#
# --layers/--width/--heads resize the model (pythia-410m: 24 / 1024 / 16).
set -euo pipefail
cd "$(dirname "$0")/../.."
policies=none,blocks
args=()
while (($#)); do
  case "$1" in
    --policies) policies=$2; shift 2 ;;
    --steps | --layers | --width | --heads) args+=("$1" "$2"); shift 2 ;;
    *) echo "usage: $0 [--steps N] [--policies none,blocks,…] [--layers L --width C --heads H]" >&2; exit 2 ;;
  esac
done
IFS=, read -ra list <<<"$policies"
setups=$(printf '1:none:%s,' "${list[@]}")
exec scripts/bench/zero.sh --setups "${setups%,}" "${args[@]}"
