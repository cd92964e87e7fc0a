"""Simulation profiles for the tests (engine.simulated): a checkpoint's architecture and tokenizer with
made-up step times, labelled as such, and the tokens its simulated model streams."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

from engine import LLM
from engine.loader.api import load_model, load_tokenizer
from engine.loader.weight_cache import config_to_json
from engine.simulated.parts import simulated_avoids
from engine.simulated.runner import SimulatedRunner, simulated_continuation
from tests.support.cluster_workload import Expected, Job, reference

PREFILL = [[16, 0.002], [256, 0.02], [2048, 0.16]]
DECODE = [[1, 0.003], [8, 0.005], [64, 0.02]]
# decode at ~10 steps/s: a stream of a few hundred tokens (20 s) outlasts a test's round trips (a full batch stays
# full, a cancelled stream is caught mid-way), as the default model's long streams on a CPU do
SLOW_DECODE = [[1, 0.1], [8, 0.12], [64, 0.2]]


def write_profile(directory: pathlib.Path, checkpoint: pathlib.Path, **overrides: object) -> pathlib.Path:
    profile = {"name": "tiny-test", "source": "published: made-up figures for the tests",
               "model": json.loads(config_to_json(load_model(str(checkpoint)).config)), "tokenizer": str(checkpoint),
               "prefill": PREFILL, "decode": DECODE, "decode_context": 0, "context_s_per_token": 1e-7, **overrides}
    path = directory / "profile.json"
    path.write_text(json.dumps(profile))
    return path


def expected(llm: LLM, prompt: list[int], count: int) -> list[int]:
    """What `llm` (a simulated engine) streams greedily after `prompt`."""
    runner = llm.engine.runner
    assert isinstance(runner, SimulatedRunner)
    return runner.continuation(prompt, count)


def expected_of(checkpoint: pathlib.Path, prompt: list[int], count: int) -> list[int]:
    """The same without an engine: from the checkpoint's tokenizer and config."""
    tokenizer = load_tokenizer(str(checkpoint))
    avoid = simulated_avoids(tokenizer, load_model(str(checkpoint)).config)
    return simulated_continuation(prompt, count, tokenizer.vocab_size, avoid)


@dataclass(frozen=True)
class Engines:
    """The engines of a cluster test's workers: the real model in fp32, or (with `profile`) simulated
    engines of it. The contracts a test checks (membership, faults) hold for both; the streams are each
    engine's own, exact."""
    checkpoint: pathlib.Path
    profile: pathlib.Path | None = None

    @property
    def args(self) -> tuple[str, ...]:
        """`tandem up` and `tandem worker` flags."""
        simulate = ("--simulate", str(self.profile)) if self.profile is not None else ()
        return "--model", str(self.checkpoint), "--dtype", "float32", *simulate

    def reference(self, jobs: list[Job]) -> list[Expected]:
        return reference(str(self.checkpoint), jobs, simulate=None if self.profile is None else str(self.profile))
