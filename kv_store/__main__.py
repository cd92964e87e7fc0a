"""`python -m kv_store`: one KV store process from flags and TANDEM_* variables (the same as `tandem kvstore`)."""

from __future__ import annotations

import argparse
import asyncio

from common.settings import add_settings_flags, apply_ucx_defaults, configure_logging, settings_from_args
from kv_store.server import serve
from kv_store.settings import KVStoreSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kv_store", description=__doc__)
    add_settings_flags(parser, KVStoreSettings)
    args = parser.parse_args(argv)
    configure_logging()
    apply_ucx_defaults()
    asyncio.run(serve(settings_from_args(KVStoreSettings, args)))


if __name__ == "__main__":
    main()
