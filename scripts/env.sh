# scripts/env.sh — source me: the build environment for cargo in this repo (tch finds libtorch
# through the project's .venv python). `source scripts/env.sh && cargo test` works by hand.
_mla_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$_mla_root/.venv/bin:$PATH"
export VIRTUAL_ENV="$_mla_root/.venv"
export LIBTORCH_USE_PYTORCH=1
unset _mla_root
