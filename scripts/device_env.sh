# scripts/device_env.sh — sourced by the scripts that run on a GPU machine without cargo
# (gpu_check.sh, study/gpu.sh): `device_env [TORCH_LIB]` points LD_LIBRARY_PATH at torch's lib
# directory (default: the first CUDA libtorch of /opt/torch/.venv and .venv), every
# <site-packages>/nvidia/*/lib beside it (CUDA runtime, cuDNN, NCCL) and .device/lib (what
# `gpu_check.sh --prepare` copied), and sets TORCH_LIB. Prints torch's version; exits 2 with
# a one-line reason when there is no CUDA libtorch or it is not torch 2.11.0.
device_env() {
  local torch_lib=${1:-${TORCH_LIB:-}}
  if [ -z "$torch_lib" ]; then
    for cand in /opt/torch/.venv/lib/python3.*/site-packages/torch/lib .venv/lib/python3.*/site-packages/torch/lib; do
      [ -f "$cand/libtorch_cuda.so" ] && { torch_lib=$cand; break; }
    done
  fi
  [ -n "$torch_lib" ] && [ -f "$torch_lib/libtorch_cuda.so" ] \
    || { echo "$(basename "$0"): no CUDA libtorch found; pass --torch-lib <venv>/lib/python3.*/site-packages/torch/lib" >&2; exit 2; }
  # Our binaries link libtorch 2.11.0: another torch would fail to load or, worse, load.
  local version
  version=$(grep -o "__version__ = '[^']*'" "$torch_lib/../version.py" 2>/dev/null | cut -d"'" -f2)
  case "$version" in
    2.11.0 | 2.11.0+*) echo "$(basename "$0"): torch $version at $torch_lib" >&2 ;;
    *) echo "$(basename "$0"): torch ${version:-of unknown version} at $torch_lib; mla needs torch 2.11.0 (pass --torch-lib)" >&2; exit 2 ;;
  esac
  local site libs l
  site=$(cd "$torch_lib/../.." && pwd)
  libs=$(cd "$torch_lib" && pwd)
  for l in "$site"/nvidia/*/lib; do [ -d "$l" ] && libs="$libs:$l"; done
  export LD_LIBRARY_PATH="$libs:$PWD/.device/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  TORCH_LIB=$torch_lib
}
