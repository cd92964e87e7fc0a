"""`python -m prefill_worker --etcd HOST:PORT [...]`: one prefill worker process (the same as
`tandem worker --role prefill`)."""

from prefill_worker.server import build
from worker_runtime.main import run_worker

if __name__ == "__main__":
    run_worker("python -m prefill_worker", build, role="prefill")
