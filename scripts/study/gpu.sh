#!/usr/bin/env bash
# scripts/study/gpu.sh — the pythia-160m attention study (config_hub/study/pythia-160m.yaml) on
# one GPU at a reduced budget, on a machine with torch 2.11 (CUDA 13 wheels) and no cargo or
# internet: 7 variants × --max-tokens (default 5,242,880 = 20 steps of 128 × 2048) in bf16-mixed,
# then the report (decode at batch 8, bf16) into out/study/pythia-160m/report. Aimed at ≤ 10 min
# on an H100/H200 (not yet measured: no GPU has been lent).
#
#   scripts/gpu_check.sh --prepare     # here: binaries and the tokenized TinyStories sample in .device/
#   scripts/study/gpu.sh [--max-tokens N] [--torch-lib DIR]     # on the GPU machine
#
# With internet and cargo, the same study is simply
#   mla study config_hub/study/pythia-160m.yaml [--max-tokens N]
set -euo pipefail
cd "$(dirname "$0")/../.."
max_tokens=5242880
torch_lib=${TORCH_LIB:-}
while (($#)); do
  case "$1" in
    --max-tokens) max_tokens=$2; shift 2 ;;
    --torch-lib) torch_lib=$2; shift 2 ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
# shellcheck source=scripts/device_env.sh
source scripts/device_env.sh
device_env "$torch_lib"
MLA=${MLA:-.device/bin/mla}
[ -x "$MLA" ] && [ -f .device/data/tinystories/index.json ] \
  || { echo "gpu.sh: .device/bin/mla or .device/data missing: run scripts/gpu_check.sh --prepare on a build machine first" >&2; exit 2; }
start=$(date +%s)
"$MLA" study config_hub/study/pythia-160m.yaml --max-tokens "$max_tokens" --device cuda \
  --data.data_path .device/data/tinystories --tokenizer_dir .device/data/tokenizer \
  --eval.max_iters 20
echo "gpu.sh: study and report in $(($(date +%s) - start)) s: out/study/pythia-160m/report/report.md"
