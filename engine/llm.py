"""The offline API: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]
Messages = list[dict[str, str]]


class LLM:
    """Generate completions for a batch of prompts with continuous batching.

    `LLM()` loads the default model (SmolLM2-135M-Instruct); `LLM(model="dir-or-file.gguf")` another;
    any `EngineConfig` field may be passed as a keyword.
    """

    def __init__(self, model: str | None = None, **engine_options: object) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))  # type: ignore[arg-type]
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """One final output per prompt, in the order given."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list = list(prompts)  # type: ignore[arg-type]
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or SamplingParams()] * len(prompt_list)
        else:
            param_list = list(params)
            if len(param_list) != len(prompt_list):
                raise InvalidRequestError(f"{len(param_list)} SamplingParams for {len(prompt_list)} prompts")
        ids = [f"llm-{next(self._ids)}" for _ in prompt_list]
        try:
            for request_id, prompt, p in zip(ids, prompt_list, param_list, strict=True):
                self.engine.add_request(self.engine.make_request(request_id, prompt, p))
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finals: dict[str, RequestOutput] = {}
        while len(finals) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    finals[out.request_id] = out
        return [finals[i] for i in ids]

    def chat(self, messages: Messages | Sequence[Messages],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate the assistant reply."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[Prompt] = [self.tokenizer.apply_chat_template(list(m)) for m in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params)
