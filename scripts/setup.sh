#!/usr/bin/env bash
# scripts/setup.sh — make a fresh Debian/Ubuntu machine ready for mla, then build the release
# binaries (target/release/mla, target/release/mla-launch).
#
# What it does, each step skipped when already done (a re-run with nothing changed takes seconds):
#   1. apt: a C/C++ toolchain, OpenMPI (CPU data-parallel backend), clang/libclang (bindgen for
#      the MPI bindings), pkg-config, python3-venv.
#   2. Rust toolchain check (rustup's cargo must be on PATH).
#   3. .venv: python venv with torch==2.11.0 (libtorch for tch) and the packages in
#      scripts/requirements.txt; re-installed only when that file changes.
#   4. cargo build --release with LIBTORCH_USE_PYTORCH=1: the binaries carry an rpath to the
#      venv's torch/lib, so they run without LD_LIBRARY_PATH.
#
# Usage: scripts/setup.sh [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

build=1
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# 1. System packages ---------------------------------------------------------------------------
apt_packages=(build-essential pkg-config clang libclang-dev openmpi-bin libopenmpi-dev python3-venv python3-pip curl ca-certificates)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing system packages: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. Rust --------------------------------------------------------------------------------------
if ! command -v cargo >/dev/null; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || { echo "setup.sh: cargo not found; install Rust with rustup (https://rustup.rs)" >&2; exit 1; }

# 3. Python venv with torch 2.11.0 --------------------------------------------------------------
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$python" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python packages (torch 2.11.0 is ~3 GB with its CUDA libraries; first time only)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r scripts/requirements.txt
  echo "$want" >"$stamp"
fi
torch_version=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
[ "$torch_version" = "2.11.0" ] || { echo "setup.sh: .venv has torch $torch_version, need 2.11.0 (delete .venv and re-run)" >&2; exit 1; }

# 4. Build -------------------------------------------------------------------------------------
# shellcheck source=scripts/env.sh
source scripts/env.sh
if ((build)); then
  say "building release binaries"
  cargo build --release --workspace --bins --quiet
  say "ready: $ROOT/target/release/mla, $ROOT/target/release/mla-launch"
fi
