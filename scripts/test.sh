#!/usr/bin/env bash
# The test suite, offline. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
# a browser under any of its names, and its driver: else say so (the tests skip, saying why)
if ! command -v chromedriver >/dev/null || ! command -v chromium chromium-browser google-chrome >/dev/null; then
  echo "[test] no chromium + chromedriver here: the browser tests of tests/test_ui.py skip" \
       "(Debian: apt-get install -y chromium chromium-driver)" >&2
fi
exec .venv/bin/python -m pytest "$@"
