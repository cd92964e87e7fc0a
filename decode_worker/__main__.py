"""`python -m decode_worker --etcd HOST:PORT [...]`: one worker process, role "both" unless --role
decode says otherwise (the same as `tandem worker`)."""

from decode_worker.server import build
from worker_runtime.main import run_worker

if __name__ == "__main__":
    run_worker("python -m decode_worker", build)
