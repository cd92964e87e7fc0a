"""Mixture-of-experts MLPs (Mixtral, Qwen3-MoE) and the models built on them.

A step's tokens are routed (softmax over the router's logits in fp32, top-k, optionally
renormalised), the (token, expert) pairs sorted by expert, and each expert that got any runs once
over all its tokens: one gate/up matmul, SiLU-mul, one down matmul, scaled by the routing weight
and added into the tokens' rows. The Python loop is over experts, never over tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from engine.config import ModelConfig, MoEConfig
from engine.kernels import ops
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
        e, inter, hidden = self.moe.num_experts, self.moe.intermediate_size, config.hidden_size
        self.gate = nn.Linear(hidden, e, bias=False)  # the router
        self.gate_up = nn.Parameter(torch.empty(e, 2 * inter, hidden))  # [gate; up] per expert
        self.down = nn.Parameter(torch.empty(e, hidden, inter))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).float().softmax(dim=-1)
        weights, experts = probs.topk(self.moe.top_k, dim=-1)  # [T, k]
        if self.moe.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = (weights if self.weigh_in_float else weights.to(x.dtype)).reshape(-1)
        pairs = experts.reshape(-1)  # pair p is (token p // k, expert pairs[p])
        order = torch.argsort(pairs, stable=True)
        counts = torch.bincount(pairs, minlength=self.moe.num_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            chosen = order[start:start + n]
            start += n
            tokens = chosen // self.moe.top_k
            h = ops.silu_mul(torch.nn.functional.linear(x[tokens], self.gate_up[expert]))
            h = torch.nn.functional.linear(h, self.down[expert]) * weights[chosen, None]
            out.index_add_(0, tokens, h.to(x.dtype))
        return out


class _MoEModel(LlamaForCausalLM):
    """The Llama layers with `SparseMoE` MLPs; `expert_names` maps (layer prefix, expert) to the HF
    names of its (gate, up, down) matrices and `router_name` the router's. The experts are 3-D
    parameters, not nn.Linear modules, and routing reads counts back to the host each layer."""

    router_name = ""
    weigh_in_float = False
    supports_cuda_graphs = False
    all_linears_are_modules = False

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
        put(f"{ours}.gate_up", torch.stack([torch.cat([weights[g], weights[u]]) for g, u, _ in names]))
        put(f"{ours}.down", torch.stack([weights[d] for _, _, d in names]))


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
