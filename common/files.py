"""Reading the files an operator hands a component (PEM certificates and keys, API-key lists)."""

from __future__ import annotations

import os


def read_file(path: str, what: str) -> bytes:
    """The bytes of a file (PEM, key list); ValueError naming `what` and the path when unreadable."""
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} is not a file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{what} {path!r} is not readable: {e.strerror}") from e
