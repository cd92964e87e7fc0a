"""Exceptions the engine raises. Request errors are `ValueError`s so callers can map them to 400."""


class TandemError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(TandemError, ValueError):
    """A request (prompt or sampling parameters) the engine refuses; the message says what to change."""


class ModelLoadError(TandemError, ValueError):
    """A model path or file that cannot be loaded (missing, unsupported or corrupt)."""


class EngineDeadError(TandemError, RuntimeError):
    """The engine's compute loop failed; no further requests will be served."""


class OutOfKVBlocksError(TandemError):
    """Not enough free KV blocks to reserve for a request right now (retry later or elsewhere)."""


class PoolIntegrityError(TandemError, RuntimeError):
    """The KV block pool's bookkeeping is inconsistent (a leak, a double free, a stale hash). Raised by
    `check_integrity`, never switched off (it does not use `assert`)."""


class RankCommandError(TandemError, RuntimeError):
    """A tensor-parallel rank past 0 could not do what rank 0 asked between steps (engine.parallel.leader)."""
