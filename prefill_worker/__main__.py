"""`python -m prefill_worker --etcd HOST:PORT [...]`: one prefill worker process (the same as
`tandem worker --role prefill`)."""

from cluster.cli import main

if __name__ == "__main__":
    main(["worker", "--role", "prefill"])
