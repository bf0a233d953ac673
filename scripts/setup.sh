#!/usr/bin/env bash
# Create .venv (once) and install hf_ame with its test extras. Installs the CPU build of torch
# first when no torch is present (a bare `torch` requirement would pull a multi-GB CUDA build).
# GPU users: install your CUDA torch into .venv first (see README); this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
stamp=.venv/.hf_ame-installed
want=$(cat pyproject.toml | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import hf_ame, torch" 2>/dev/null; then
  exit 0
fi
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch (CPU build)" >&2
  "$VPY" -m pip install -q "torch==2.13.0"
fi
echo "[setup] installing hf_ame and its dependencies" >&2
"$VPY" -m pip install -q -e ".[test]"
# FusionBench, the reference of tsv / iso_c / iso_cts (tests/test_svd_methods.py): without its own requirements,
# which pull far more than its import needs (those modules are in the test extra)
"$VPY" -m pip install -q --no-deps "fusion-bench==0.2.33"
echo "$want" > "$stamp"
