#!/usr/bin/env bash
# The main job, offline: build small fine-tuned checkpoints here, merge them, report.
# Usage: bash scripts/demo.sh [--out DIR] [--help for more]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python examples/demo.py "$@"
