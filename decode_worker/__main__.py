"""`python -m decode_worker --etcd HOST:PORT [...]`: one worker process, role "both" unless
--role says otherwise (the same as `tandem worker`)."""

from cluster.cli import main

if __name__ == "__main__":
    main(["worker"])
