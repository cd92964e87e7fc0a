#!/usr/bin/env bash
# Set everything up, start a local disaggregated cluster (etcd, a prefill worker, a decode worker,
# the router), ask it one chat question through the official openai client, stop it.
# Extra arguments go to `tandem up`, e.g. `bash scripts/demo.sh --prefill 2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ./.venv/bin/python -m cluster.demo "$@"
