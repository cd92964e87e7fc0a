"""Joins one rank's shard of a model to the others' (`connect_shard`), with forward hooks on the modules the
shard splits, so the model's code is the same at every degree:

- the embedding holds a range of vocabulary rows: ids outside it embed to zeros, and the ranks' rows are summed;
- each layer's attention (its query heads, through o_proj's matching columns) and MLP (its intermediate
  columns, through down_proj's) give partial sums of the layer's output: summed over the ranks;
- the lm_head gives this rank's vocabulary columns of the logits: rank 0 gathers them all.

Every rank runs the same modules on the same rows in the same order, so each hook's collective meets its peers'.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.models.llama import DecoderLayer, LlamaForCausalLM
from engine.parallel.group import TPGroup
from engine.parallel.shard import TPShard


def connect_shard(model: LlamaForCausalLM, shard: TPShard, group: TPGroup, vocab_size: int) -> None:
    """Hook `model` (this rank's shard, after packing and quantization: the lm_head module is final) to `group`."""
    rows = shard.vocab_rows(vocab_size)
    outside: list[torch.Tensor] = []  # the ids of the call in flight that another rank embeds

    def local_ids(_: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor]:
        (ids,) = args
        local = ids - rows.start
        out = (local < 0) | (local >= len(rows))
        outside[:] = [out]
        return (local.masked_fill(out, 0),)

    def summed_embedding(_: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        output = output.masked_fill(outside.pop().unsqueeze(-1), 0)
        return group.all_reduce(output)

    def summed(_: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return group.all_reduce(output.contiguous())

    def gathered(_: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return group.gather_columns(output, vocab_size)

    model.embed_tokens.register_forward_pre_hook(local_ids)
    model.embed_tokens.register_forward_hook(summed_embedding)
    for layer in model.layers:
        assert isinstance(layer, DecoderLayer)
        layer.self_attn.register_forward_hook(summed)
        layer.mlp.register_forward_hook(summed)
    model.lm_head.register_forward_hook(gathered)
