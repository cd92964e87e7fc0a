"""Tandem's model-execution core: paged KV, continuous batching, Llama-family models.

    from engine import LLM, SamplingParams
    llm = LLM()  # SmolLM2-135M-Instruct
    print(llm.generate(["The capital of France is"], SamplingParams(temperature=0))[0].text)
"""

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, SpeculativeConfig
from engine.errors import EngineDeadError, InvalidRequestError, ModelLoadError, PoolIntegrityError, TandemError
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM", "AsyncEngine", "EngineConfig", "EngineDeadError", "EngineRequest", "InvalidRequestError", "LLMEngine",
    "ModelLoadError", "PoolIntegrityError", "RequestOutput", "SamplingParams", "SpeculativeConfig", "TandemError",
]
