"""Which model class serves an architecture (`ModelConfig.architecture`, from config.json's
`architectures` or GGUF's `general.architecture`)."""

from __future__ import annotations

from engine.models.gemma2 import Gemma2ForCausalLM
from engine.models.gemma3 import Gemma3ForCausalLM
from engine.models.llama import LlamaForCausalLM
from engine.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM
from engine.models.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "mixtral": MixtralForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "gemma2": Gemma2ForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "phi3": LlamaForCausalLM,  # Llama's layers; the loader splits its fused q/k/v and gate/up tensors
}


def model_class(architecture: str) -> type[LlamaForCausalLM]:
    try:
        return MODEL_CLASSES[architecture]
    except KeyError:
        raise ValueError(f"architecture {architecture!r} is not supported; use one of "
                         f"{', '.join(MODEL_CLASSES)}") from None
