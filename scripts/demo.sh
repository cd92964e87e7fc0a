#!/usr/bin/env bash
# Set everything up, then generate completions for a few prompts with the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ./.venv/bin/python -m engine.demo "$@"
