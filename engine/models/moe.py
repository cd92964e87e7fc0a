"""Mixture-of-experts MLPs (Mixtral, Qwen3-MoE) and the models built on them.

A step's tokens are routed (softmax over the router's logits in fp32, top-k, optionally
renormalised), the (token, expert) pairs sorted by expert, and each expert that got any runs once
over all its tokens: one gate/up matmul, SiLU-mul, one down matmul, scaled by the routing weight
and added into the tokens' rows. The Python loop is over experts, never over tokens.

Each expert is a dense MLP of `nn.Linear`s, so everything dense linears get, experts get: packing
for this CPU (engine.loader.packing: oneDNN, and the matrix-vector kernel for an expert's single
token while the model's linears total at most SINGLE_ROW_COPY_BYTES: not for the large MoE models),
int8/int4 weights (on CUDA an int8 expert widens its weights each call: less memory, slower), and
deterministic mode's batch-invariance check. A token's expert
outputs are added in expert order whatever else is in the batch, so the layer is batch-invariant
when its linears are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from engine.config import ModelConfig, MoEConfig
from engine.models.llama import MLP, LlamaForCausalLM
from engine.models.qwen3 import Qwen3Attention


class SparseMoE(nn.Module):
    """`weigh_in_float`: multiply an expert's output by the fp32 routing weight in fp32 and round
    the product once to the model dtype (Mixtral in transformers); otherwise the weight is rounded
    to the model dtype first (Qwen3-MoE). Equal in fp32, different roundings in bf16."""

    def __init__(self, config: ModelConfig, weigh_in_float: bool) -> None:
        super().__init__()
        assert config.moe is not None
        self.moe: MoEConfig = config.moe
        self.weigh_in_float = weigh_in_float
        self.gate = nn.Linear(config.hidden_size, self.moe.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(MLP(config, self.moe.intermediate_size) for _ in range(self.moe.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        order, counts = self.dispatch(experts)
        return self.run_experts(x, weights, order, counts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each (token, slot) pair's routing weight and expert, flattened: pair p is token p // top_k."""
        probs = self.gate(x).float().softmax(dim=-1)
        weights, experts = probs.topk(self.moe.top_k, dim=-1)  # [T, k]
        if self.moe.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights if self.weigh_in_float else weights.to(x.dtype)).reshape(-1), experts.reshape(-1)

    def dispatch(self, experts: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The pairs sorted by expert (stable: token order within an expert) and each expert's count,
        read back to the host (the loop over experts needs it)."""
        order = torch.argsort(experts, stable=True)
        return order, torch.bincount(experts, minlength=self.moe.num_experts).tolist()

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                    counts: list[int]) -> torch.Tensor:
        """Each expert with tokens, once over all of them: gather, gate/up, SiLU-mul, down, weigh, add."""
        out = torch.zeros_like(x)
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            chosen = order[start:start + n]
            start += n
            tokens = chosen // self.moe.top_k
            h = self.experts[expert](x[tokens]) * weights[chosen, None]
            out.index_add_(0, tokens, h.to(x.dtype))
        return out


class _MoEModel(LlamaForCausalLM):
    """The Llama layers with `SparseMoE` MLPs; `expert_names` maps (layer prefix, expert) to the HF
    names of its (gate, up, down) matrices and `router_name` the router's. Routing reads counts back
    to the host each layer (no CUDA graphs)."""

    router_name = ""
    weigh_in_float = False
    supports_cuda_graphs = False

    @classmethod
    def mlp_factory(cls, config: ModelConfig, layer: int) -> nn.Module:  # type: ignore[override]
        assert config.moe is not None
        return MLP(config) if layer in config.moe.dense_layers else SparseMoE(config, cls.weigh_in_float)

    @staticmethod
    def expert_names(prefix: str, expert: int) -> tuple[str, str, str]:
        raise NotImplementedError

    def load_mlp(self, layer: int, weights: Mapping[str, torch.Tensor],
                 put: Callable[[str, torch.Tensor], None]) -> None:
        assert self.config.moe is not None
        if layer in self.config.moe.dense_layers:
            super().load_mlp(layer, weights, put)
            return
        pre, ours = f"model.layers.{layer}", f"layers.{layer}.mlp"
        names = [self.expert_names(pre, e) for e in range(self.config.moe.num_experts)]
        put(f"{ours}.gate.weight", weights[f"{pre}.{self.router_name}.weight"])
        for e, (gate, up, down) in enumerate(names):
            put(f"{ours}.experts.{e}.gate_up_proj.weight", torch.cat([weights[gate], weights[up]]))
            put(f"{ours}.experts.{e}.down_proj.weight", weights[down])


class MixtralForCausalLM(_MoEModel):
    router_name = "block_sparse_moe.gate"
    weigh_in_float = True

    @staticmethod
    def expert_names(prefix: str, expert: int) -> tuple[str, str, str]:
        base = f"{prefix}.block_sparse_moe.experts.{expert}"
        return f"{base}.w1.weight", f"{base}.w3.weight", f"{base}.w2.weight"


class Qwen3MoeForCausalLM(_MoEModel):
    attention = Qwen3Attention
    extra_weights = (("self_attn.q_norm", "self_attn.q_norm"), ("self_attn.k_norm", "self_attn.k_norm"))
    router_name = "mlp.gate"

    @staticmethod
    def expert_names(prefix: str, expert: int) -> tuple[str, str, str]:
        base = f"{prefix}.mlp.experts.{expert}"
        return f"{base}.gate_proj.weight", f"{base}.up_proj.weight", f"{base}.down_proj.weight"
