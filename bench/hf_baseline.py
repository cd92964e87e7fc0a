"""The anchor: Hugging Face transformers `generate` on the engine's weights, one static batch at a time.

Prompts are left-padded into one `[B, L]` batch, decoding is greedy with exactly `max_new_tokens`
new tokens per row (`min_new_tokens` equal to it, so EOS never ends a row early).
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HFDecodeResult:
    batch_size: int
    prompt_len: int
    max_tokens: int
    output_tokens: int  # new tokens actually returned by generate, all rows together
    prefill_s: float  # generate(max_new_tokens=1) on the same batch: prompt forward + first token
    total_s: float
    decode_tok_s: float | None  # tokens after the first of each row / (total_s - prefill_s)
    overall_tok_s: float


@dataclass(frozen=True)
class HFPrefillResult:
    num_prompts: int
    prompt_len: int
    seconds: float
    tok_s: float  # prompt tokens per second


class HFBaseline:
    def __init__(self, source: pathlib.Path, dtype: torch.dtype, device: torch.device) -> None:
        """Load `source` (a .gguf file or a Hugging Face checkpoint folder) in `dtype` onto `device`."""
        from transformers import AutoModelForCausalLM

        started = time.perf_counter()
        if source.suffix.lower() == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        self.model = model.to(device).eval()  # type: ignore[arg-type]
        self.device = device
        self.dtype = dtype
        self.load_s = time.perf_counter() - started
        config = self.model.config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        if isinstance(pad, list):
            pad = pad[0]
        self.pad_id = int(pad) if pad is not None else 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _batch(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(prompts), width), dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.int64)
            mask[row, width - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> tuple[torch.Tensor, float]:
        """The new tokens `[B, new_tokens]` of one greedy static-batch `generate`, and its seconds."""
        ids, mask = self._batch(prompts)
        self._sync()
        started = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  pad_token_id=self.pad_id, temperature=None, top_p=None, top_k=None)
        self._sync()
        return out[:, ids.shape[1]:].cpu(), time.perf_counter() - started

    def warm_up(self, prompt: Sequence[int]) -> None:
        self.generate([prompt], 4)

    def decode(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> HFDecodeResult:
        _, prefill_s = self.generate(prompts, 1)
        new, total_s = self.generate(prompts, max_tokens)
        batch = len(prompts)
        decode_s = total_s - prefill_s
        decode_tokens = batch * (max_tokens - 1)
        return HFDecodeResult(
            batch_size=batch, prompt_len=max(len(p) for p in prompts), max_tokens=max_tokens,
            output_tokens=int(new.numel()), prefill_s=prefill_s, total_s=total_s,
            decode_tok_s=decode_tokens / decode_s if decode_tokens and decode_s > 0 else None,
            overall_tok_s=new.numel() / total_s)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> HFPrefillResult:
        _, seconds = self.generate(prompts, 1)
        tokens = sum(len(p) for p in prompts)
        return HFPrefillResult(len(prompts), max(len(p) for p in prompts), seconds, tokens / seconds)
