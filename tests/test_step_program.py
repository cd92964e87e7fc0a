"""One-token steps as one C call (engine/step_program.py) against the eager forward they replace.

The program calls the eager path's own kernels on the same inputs in the same order, so outputs
must be bit for bit equal: greedy tokens and every logprob, alone and beside other sequences.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from engine import LLM, SamplingParams
from engine.attention.metadata import AttentionMetadata
from engine.attention.planning import SeqSpan, attention_metadata
from engine.loader.packing import onednn_packs
from engine.step_program import StepProgram

PROMPTS = [[3, 17, 99, 5, 41], [3, 250, 7, 7, 7, 7, 61, 12, 90, 33, 1, 8]]


def has_one_row_kernels(kwargs: dict) -> bool:  # type: ignore[type-arg]
    """Whether every linear of an engine made with `kwargs` has a one-row C kernel on this CPU: quantized
    ones always, plain bf16 ones only where oneDNN packs bf16 (not on an AVX2-only CPU: those stay torch's
    own linears, and one-token steps run eagerly)."""
    return kwargs.get("dtype") != "bfloat16" or "quantization" in kwargs or onednn_packs(torch.bfloat16)


def _run(path: pathlib.Path, eager: bool, **kwargs: object) -> tuple[list[list[int]], list[list[float]], int]:
    """Greedy tokens and their top-3 logprobs of each prompt, alone and then together, and how many
    steps the program ran."""
    llm = LLM(str(path), num_kv_blocks=64, enforce_eager=eager, **kwargs)  # type: ignore[arg-type]
    program = llm.engine.runner.program
    assert (program is not None) == (not eager and has_one_row_kernels(kwargs)), \
        "the program is built unless the engine is eager or a linear has no one-row C kernel here"
    runs = [0]
    if program is not None:
        run = program.run

        def counted(*args: torch.Tensor) -> torch.Tensor:
            runs[0] += 1
            return run(*args)

        program.run = counted  # type: ignore[method-assign]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    outs = [o for prompt in PROMPTS for o in llm.generate([prompt], params)] + llm.generate(PROMPTS, params)
    llm.engine.check_integrity()
    tokens = [o.token_ids for o in outs]
    logprobs = [[lp for step in o.logprobs or [] if step is not None
                 for lp in (step.logprob, *(p for _, p in step.top))] for o in outs]
    return tokens, logprobs, runs[0]


@pytest.mark.parametrize(("fixture", "kwargs"), [
    ("tiny_llama_dir", {"dtype": "float32"}),
    ("tiny_llama_dir", {"dtype": "bfloat16"}),
    ("tiny_llama_dir", {"dtype": "float32", "quantization": "int4"}),
    ("tiny_llama_dir", {"dtype": "bfloat16", "quantization": "int8"}),
    ("tiny_qwen2_dir", {"dtype": "float32"}),  # q/k/v biases through the one-row kernel
    ("tiny_mistral_window_dir", {"dtype": "bfloat16"}),  # a sliding window per layer
])
def test_program_steps_equal_eager_steps(request: pytest.FixtureRequest, fixture: str, kwargs: dict) -> None:
    path = request.getfixturevalue(fixture)
    eager_tokens, eager_logprobs, _ = _run(path, eager=True, **kwargs)
    tokens, logprobs, runs = _run(path, eager=False, **kwargs)
    if has_one_row_kernels(kwargs):
        assert runs >= 2 * 11, "the one-token steps of the lone prompts went through the program"
    assert tokens == eager_tokens
    assert logprobs == eager_logprobs  # exact floats: the same kernels in the same order


def test_families_with_other_layers_step_eagerly(tiny_qwen3_dir: pathlib.Path) -> None:
    llm = LLM(str(tiny_qwen3_dir), num_kv_blocks=64)  # q/k norms: no C kernel in the program for them
    assert llm.engine.runner.program is None
    assert llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3))[0].token_ids


def test_only_one_planned_token_runs_through_the_program() -> None:
    def meta(*spans: SeqSpan) -> AttentionMetadata:
        return attention_metadata(list(spans), 16, torch.device("cpu"), torch.float32, True, 64)

    assert StepProgram.can_run(meta(SeqSpan([0, 1], 20, 1)))  # a decode
    assert StepProgram.can_run(meta(SeqSpan([0], 0, 1)))  # a one-token prompt
    assert not StepProgram.can_run(meta(SeqSpan([0, 1], 20, 1), SeqSpan([2], 3, 1)))  # two sequences
    assert not StepProgram.can_run(meta(SeqSpan([0, 1], 18, 3)))  # a draft verified, a prompt chunk
