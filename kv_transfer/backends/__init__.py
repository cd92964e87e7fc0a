"""Transports behind the one `Backend` interface. Imported lazily: NIXL and NCCL load heavy
libraries that a process using only shared memory or TCP never needs."""

from __future__ import annotations

import importlib

from kv_transfer.backends.base import Backend, BackendContext
from kv_transfer.datatypes import BackendName

_MODULES: dict[str, tuple[str, str]] = {
    "shm": ("kv_transfer.backends.shm", "SharedMemoryBackend"),
    "tcp": ("kv_transfer.backends.tcp", "TcpBackend"),
    "nixl": ("kv_transfer.backends.nixl", "NixlBackend"),
    "nccl": ("kv_transfer.backends.nccl", "NcclBackend"),
}


def backend_class(name: BackendName) -> type[Backend] | None:
    """The class of backend `name`, or None when its module cannot load here."""
    module_name, class_name = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    cls: type[Backend] = getattr(module, class_name)
    return cls


__all__ = ["Backend", "BackendContext", "backend_class"]
