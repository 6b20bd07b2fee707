#!/usr/bin/env bash
# Regenerate model/tests/goldens/ from litgpt 0.5.13 (MHA/GQA/MQA/MLA-mapping) and the plain
# PyTorch reference gpt_ref.py (the seed's latent_attention: true). litgpt comes with
# scripts/requirements.txt (the interop tests use it too); it is checked here, and installed
# with torch held at 2.11.0 by a constraint when missing. CI never runs this: it compares
# against the committed goldens (model/tests/parity.rs).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || { echo "error: .venv missing — run scripts/setup.sh first" >&2; exit 2; }
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
echo "torch==2.11.0" >"$constraint"
.venv/bin/python -c "import litgpt" 2>/dev/null && .venv/bin/python -c "import importlib.metadata as m; assert m.version('litgpt') == '0.5.13'" \
  || .venv/bin/pip install -q -c "$constraint" "litgpt==0.5.13"
.venv/bin/python scripts/ref/gen_goldens.py
