"""Two transfer engines in one process (unit tests of a backend)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kv_transfer import TransferEngine

PAGE = 4096
PAGES = 64


@dataclass
class Pair:
    a: TransferEngine  # initiator
    b: TransferEngine  # target
    src: torch.Tensor  # a's segment "a"
    dst: torch.Tensor  # b's segment "b"
