#!/usr/bin/env bash
# Set everything up, then run the whole test suite (slow tests included) and the linters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
./.venv/bin/ruff check .
./.venv/bin/mypy
exec ./.venv/bin/python -m pytest "$@"
