#!/usr/bin/env bash
# scripts/test.sh — the whole CPU test suite, as CI runs it (.ci/run calls this).
#   1. scripts/setup.sh (idempotent: system packages, .venv with torch 2.11.0, release build)
#   2. formatting check, the import graph (scripts/layers.py: no cycle between crates, modules
#      or a folder's files, no arrow up the trainer's layers) and function lengths
#      (scripts/fn_length.py: none over 150 lines)
#   3. a local S3-compatible server for the storage/checkpoint tests (stopped on exit)
#   4. cargo test --release --no-fail-fast over the workspace (release: shares setup's build,
#      runs the numerics at full speed; a failing test binary never hides the ones after it),
#      then the list of every failed test, as `binary: test`
#   5. the numerics-heavy quick tests again on the default (SSE) and AVX2 CPU kernel paths
#      (scripts/kernel_paths.sh), so no bound holds only on the kernels of this machine
#   6. scripts/chaos.sh --short: the data-loss scenarios, every one must lose nothing
#   7. scripts/fuzz.sh: every fuzz target for 15 s (under 3 minutes in all), no finding
# Tests read the real TinyStories sample and tokenizers from ../shared/data (read-only).
# Extra arguments go to `cargo test` (e.g. scripts/test.sh -p mla-model).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo fmt --all -- --check || { echo "test.sh: run 'cargo fmt --all'" >&2; exit 1; }
python3 scripts/layers.py || { echo "test.sh: an import cycle or an arrow up a layer (above)" >&2; exit 1; }
python3 scripts/fn_length.py || { echo "test.sh: a function over 150 lines (above)" >&2; exit 1; }
eval "$(scripts/s3_server.sh start)"
log=$(mktemp -t mla-test.XXXXXX)
export MLA_REQUIRE_S3=1
trap 'scripts/s3_server.sh stop >/dev/null 2>&1 || true; rm -f "$log"' EXIT
set +e
cargo test --release --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The numerics again on the kernels of machines without AVX-512 (skipped when arguments
# narrow the run to some tests).
paths_status=0
chaos_status=0
fuzz_status=0
if (($# == 0)); then
  scripts/kernel_paths.sh --quick default avx2 2>&1 | tee -a "$log"
  paths_status=${PIPESTATUS[0]}
  # The data-loss scenarios of issue 14, short form (the release binary against this S3 server).
  scripts/chaos.sh --short 2>&1 | tee -a "$log"
  chaos_status=${PIPESTATUS[0]}
  # The parsers of untrusted bytes under libFuzzer, briefly (issue 23; long runs: BENCHMARKS.md).
  scripts/fuzz.sh 2>&1 | tee -a "$log"
  fuzz_status=${PIPESTATUS[0]}
fi
set -e
# `Running … (target/release/deps/NAME-HASH)` names the binary of the `test … FAILED` lines
# after it; a binary that died without reporting a test (a crash) is named by cargo's
# `error: test failed, to rerun pass …` line.
failed=$(awk '
  /^ *Running / { bin = $NF; gsub(/[()]/, "", bin); sub(/.*\//, "", bin); sub(/-[0-9a-f]+$/, "", bin); n = 0; next }
  /^ *Doc-tests / { bin = "doc-tests " $2; n = 0; next }
  /^test .* \.\.\. FAILED$/ { sub(/^test /, ""); sub(/ \.\.\. FAILED$/, ""); print "  " bin ": " $0; n++; next }
  /^error: test failed, to rerun pass / { if (n == 0) print "  " bin ": (no test reported FAILED: " $0 ")" }
  /^kernel_paths.sh: FAILED / { sub(/^kernel_paths.sh: FAILED /, ""); print "  kernel path " $0 }
  /^chaos.sh: .*CHECKPOINTS LOST/ { print "  chaos.sh: checkpoints lost (see its table above)" }
  /^fuzz.sh: FINDINGS/ { print "  fuzz.sh: findings (see its table above)" }
' "$log")
if ((chaos_status != 0)) && ! grep -q "CHECKPOINTS LOST" "$log"; then
  failed="${failed:+$failed$'\n'}  chaos.sh: exit $chaos_status (see its output above)"
fi
if ((fuzz_status != 0)) && ! grep -q "^fuzz.sh: FINDINGS" "$log"; then
  failed="${failed:+$failed$'\n'}  fuzz.sh: exit $fuzz_status (see its output above)"
fi
if ((status != 0 || paths_status != 0 || chaos_status != 0 || fuzz_status != 0)); then
  echo >&2
  if [[ -n $failed ]]; then
    echo "test.sh: FAILED tests ($(wc -l <<<"$failed")):" >&2
    echo "$failed" >&2
  else
    echo "test.sh: cargo test failed (exit $status) before any test failed: see the build output above" >&2
  fi
  exit 1
fi
echo "test.sh: all tests passed" >&2
