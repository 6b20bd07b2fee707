#!/usr/bin/env bash
# scripts/kernel_paths.sh — the numerics-heavy tests once per CPU kernel path, so the tests'
# floating-point bounds are shown to hold on machines with AVX-512, with AVX2 only, and with
# neither, all from this one machine. Each path caps every library that picks its own kernels:
# ATen (ATEN_CPU_CAPABILITY), MKL's BLAS (MKL_ENABLE_INSTRUCTIONS) and oneDNN (ONEDNN_MAX_CPU_ISA).
# A path above what the CPU has falls back to the best it has (torch and MKL do that themselves).
#
#   scripts/kernel_paths.sh [--quick] [default|avx2|avx512 …]     (default: all three)
#
# --quick runs the binaries that take seconds (model parity and cache, the trainer's unit tests,
# the DDP equivalence test); without it also the end-to-end debug run and the checkpoint tests
# (a few minutes a path). Prints, per path, each binary's result, how many differences its
# tests measured (their `Δ what: value (bound b)` lines) and the one closest to its bound, then
# one summary line; exit 1 if a test failed. Expects scripts/setup.sh to have run; starts the local S3 server for ckpt_s3.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

quick=0
paths=()
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    default | avx2 | avx512) paths+=("$arg") ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "kernel_paths.sh: unknown argument $arg (default, avx2, avx512 or --quick)" >&2; exit 2 ;;
  esac
done
((${#paths[@]})) || paths=(default avx2 avx512)

# "package test-target [filter]" per line; --lib for unit tests.
binaries=(
  "mla-model --lib"
  "mla-model --test cache"
  "mla-model --test parity"
  "mla-trainer --lib"
  "mla-trainer --test dist_cpu two_launcher_ranks_match_one_rank"
)
if ((!quick)); then
  binaries+=(
    "mla-trainer --test train_e2e"
    "mla-trainer --test ckpt_local"
    "mla-trainer --test ckpt_s3"
  )
  eval "$(scripts/s3_server.sh start)"
  trap 'scripts/s3_server.sh stop >/dev/null 2>&1 || true' EXIT
fi

cargo test --release --workspace --no-run --quiet
logs=$(mktemp -d -t mla-kernel-paths.XXXXXX)
failed=()
started=$(date +%s)
for path in "${paths[@]}"; do
  case "$path" in
    default) mkl=SSE4_2 dnnl=SSE41 ;;
    avx2) mkl=AVX2 dnnl=AVX2 ;;
    avx512) mkl=AVX512 dnnl=AVX512_CORE ;;
  esac
  echo "== $path: ATEN_CPU_CAPABILITY=$path MKL_ENABLE_INSTRUCTIONS=$mkl ONEDNN_MAX_CPU_ISA=$dnnl"
  for b in "${binaries[@]}"; do
    read -r pkg kind target filter <<<"$b"
    [[ $kind == --lib ]] && { filter=$target; target=""; }
    log="$logs/$path-${target:-$pkg-lib}.log"
    # shellcheck disable=SC2086 # $target and $filter are single words or empty
    if ATEN_CPU_CAPABILITY=$path MKL_ENABLE_INSTRUCTIONS=$mkl ONEDNN_MAX_CPU_ISA=$dnnl \
      cargo test --release --quiet -p "$pkg" $kind $target -- ${filter:-} --nocapture >"$log" 2>&1; then
      result=ok
    else
      result=FAILED
      failed+=("$path: $pkg ${target:-(unit tests)}")
    fi
    # The tests print each measured difference as `Δ what: value (bound b)`: report how many
    # and the one closest to its bound.
    worst=$(sed -nE 's/^[.]*Δ (.*): ([-+0-9.e]+) \(bound ([-+0-9.e]+).*$/\2 \3 \1/p' "$log" | awk '
      { n++; r = ($2 > 0) ? $1 / $2 : 0; if (n == 1 || r > best) { best = r; line = $0 } }
      END { if (n) { split(line, f, " "); w = line; sub(/^[^ ]+ [^ ]+ /, "", w)
            printf "%d measured, closest to its bound: %s %s of %s (%.1f%%)", n, w, f[1], f[2], 100 * best } }')
    printf '  %-6s %-34s %s\n' "$result" "$pkg ${target:-(unit tests)}" "$worst"
    grep -h -E 'validation loss .* → ' "$log" | sed 's/^[.]*/         /' || true
    [[ $result == ok ]] || grep -h -E -A2 'panicked' "$log" | sed 's/^/      /' | head -12
  done
done
echo "kernel_paths.sh: ${#paths[@]} path(s) × ${#binaries[@]} binaries in $(($(date +%s) - started)) s, ${#failed[@]} failed (logs: $logs)"
for f in "${failed[@]}"; do echo "kernel_paths.sh: FAILED $f"; done
((${#failed[@]} == 0))
