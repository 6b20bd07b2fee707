#!/usr/bin/env bash
# scripts/test.sh — the whole CPU test suite, as CI runs it (.ci/run calls this).
#   1. scripts/setup.sh (idempotent: system packages, .venv with torch 2.11.0, release build)
#   2. formatting check
#   3. a local S3-compatible server for the storage/checkpoint tests (stopped on exit)
#   4. cargo test --release over the workspace (release: shares setup's build, runs the
#      numerics at full speed)
# Tests read the real TinyStories sample and tokenizers from ../shared/data (read-only).
# Extra arguments go to `cargo test` (e.g. scripts/test.sh -p mla-model).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
cargo fmt --all -- --check || { echo "test.sh: run 'cargo fmt --all'" >&2; exit 1; }
eval "$(scripts/s3_server.sh start)"
trap 'scripts/s3_server.sh stop >/dev/null 2>&1 || true' EXIT
export MLA_REQUIRE_S3=1
cargo test --release --workspace "$@"
