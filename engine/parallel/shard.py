"""Which part of a model rank r of N holds (`TPShard`): its query heads, KV heads (replicated where N exceeds
their number), intermediate columns and vocabulary rows, its model config, and its slice of a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from engine.config import ModelConfig
from engine.errors import ModelLoadError

# Hugging Face tensor names by how they split (the suffix after the layer prefix); any other tensor is replicated
_QUERY_ROWS = (".self_attn.q_proj.weight", ".self_attn.q_proj.bias")
_KV_ROWS = (".self_attn.k_proj.weight", ".self_attn.k_proj.bias", ".self_attn.v_proj.weight", ".self_attn.v_proj.bias")
_QUERY_COLUMNS = (".self_attn.o_proj.weight",)
_INTERMEDIATE_ROWS = (".gate_proj.weight", ".up_proj.weight", ".w1.weight", ".w3.weight")  # dense MLPs and experts
_INTERMEDIATE_COLUMNS = (".down_proj.weight", ".w2.weight")
_VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class TPShard:
    rank: int
    size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside a group of {self.size}")

    def check(self, config: ModelConfig) -> None:
        """Raise ModelLoadError, naming the numbers, where `config` does not split into `size` equal shards."""
        n, heads, kv = self.size, config.num_heads, config.num_kv_heads
        problems = []
        if heads % n:
            problems.append(f"{heads} query heads do not split into {n} ranks")
        if kv % n and n % kv:
            problems.append(f"{kv} KV heads neither split into {n} ranks nor replicate evenly over them")
        for name, width in (("intermediate size", config.intermediate_size),
                            ("expert intermediate size", config.moe.intermediate_size if config.moe else n)):
            if width % n:
                problems.append(f"the {name} {width} does not split into {n} ranks")
        if problems:
            raise ModelLoadError(f"tensor_parallel_size={n} does not fit {config.name}: " + "; ".join(problems))

    def query_heads(self, config: ModelConfig) -> range:
        per = config.num_heads // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def kv_heads(self, config: ModelConfig) -> range:
        """This rank's KV heads: its share of them, or where ranks outnumber them the one its query heads read."""
        kv = config.num_kv_heads
        if kv >= self.size:
            per = kv // self.size
            return range(self.rank * per, (self.rank + 1) * per)
        first = self.rank * kv // self.size
        return range(first, first + 1)

    def vocab_part(self, vocab_size: int) -> int:
        """Rows of the embedding and the lm_head on every rank (the last rank's padded with zero rows)."""
        return -(-vocab_size // self.size)

    def vocab_rows(self, vocab_size: int) -> range:
        part = self.vocab_part(vocab_size)
        return range(min(self.rank * part, vocab_size), min((self.rank + 1) * part, vocab_size))

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The config this rank's modules are built from (the model's own for what they do not split)."""
        self.check(config)
        moe = config.moe and replace(config.moe, intermediate_size=config.moe.intermediate_size // self.size)
        return replace(config, num_heads=len(self.query_heads(config)), num_kv_heads=len(self.kv_heads(config)),
                       intermediate_size=config.intermediate_size // self.size,
                       vocab_size=self.vocab_part(config.vocab_size), moe=moe)

    def weights(self, weights: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
        """This rank's slice of a Hugging Face-named checkpoint of `config`."""
        d = config.head_dim
        q, kv, vocab = self.query_heads(config), self.kv_heads(config), self.vocab_rows(config.vocab_size)
        part = self.vocab_part(config.vocab_size)
        out: dict[str, torch.Tensor] = {}
        for name, tensor in weights.items():
            if name.endswith(_QUERY_ROWS):
                out[name] = tensor[q.start * d:q.stop * d]
            elif name.endswith(_KV_ROWS):
                out[name] = tensor[kv.start * d:kv.stop * d]
            elif name.endswith(_QUERY_COLUMNS):
                out[name] = tensor[:, q.start * d:q.stop * d]
            elif name.endswith(_INTERMEDIATE_ROWS):
                out[name] = tensor[self._share(tensor.shape[0], name)]
            elif name.endswith(_INTERMEDIATE_COLUMNS):
                out[name] = tensor[:, self._share(tensor.shape[1], name)]
            elif name in _VOCAB_ROWS:
                rows = tensor[vocab.start:vocab.stop]
                out[name] = torch.cat([rows, rows.new_zeros(part - len(rows), *rows.shape[1:])])
            else:
                out[name] = tensor
        return {name: t.contiguous() for name, t in out.items()}

    def _share(self, width: int, name: str) -> slice:
        if width % self.size:
            raise ModelLoadError(f"{name}: {width} does not split into {self.size} ranks")
        per = width // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def group_kv_heads(config: ModelConfig, size: int) -> tuple[tuple[int, int], ...]:
    """Every rank's (first KV head, count) in a group of `size` ranks."""
    return tuple((heads.start, len(heads)) for heads in (TPShard(r, size).kv_heads(config) for r in range(size)))
