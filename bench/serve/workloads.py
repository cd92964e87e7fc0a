"""Seeded, generated workloads (no downloads).

- `sharegpt`: prompt and answer lengths drawn from log-normals shaped like ShareGPT's (long-tailed
  prompts, answers a few times shorter), scaled down to what a 2-core CPU serves.
- `multiturn`: conversations that share one of a few system prompts and grow their history turn
  by turn (each turn's prompt is the previous one plus the model's real answer plus a new user
  message): the prefix cache and KV-aware routing have something to find.
- `long_prompt` (long prompt, short answer) and `long_answer` (short prompt, long answer).

Prompts are token ids for the completions API, except multi-turn, which sends chat messages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

WorkloadName = Literal["sharegpt", "multiturn", "long_prompt", "long_answer"]
WORKLOADS: tuple[WorkloadName, ...] = ("sharegpt", "multiturn", "long_prompt", "long_answer")

_WORDS = (
    "river", "mill", "bread", "flour", "water", "salt", "qubit", "moon", "orbit", "violin", "sarabande",
    "light", "sugar", "system", "network", "partition", "failure", "cache", "token", "model", "router",
    "worker", "prefill", "decode", "block", "page", "layer", "engine", "stream",
)


@dataclass(frozen=True)
class Turn:
    """One request: token ids (completions) or the new user message of a conversation (chat)."""

    max_tokens: int
    prompt_ids: tuple[int, ...] = ()
    user_message: str = ""


@dataclass(frozen=True)
class Session:
    """What one arrival starts: a single request, or a conversation whose turns run one after another."""

    turns: tuple[Turn, ...]
    system_prompt: str = ""
    chat: bool = False
    tags: dict[str, str] = field(default_factory=dict)


def _lognormal_int(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(0.0, sigma) * median)))


def _ids(rng: random.Random, count: int, vocab: int) -> tuple[int, ...]:
    return tuple(rng.randrange(100, vocab) for _ in range(count))


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def generate(name: WorkloadName, count: int, seed: int = 0, vocab: int = 49152, max_prompt: int = 1024,
             max_answer: int = 128) -> list[Session]:
    """`count` sessions of workload `name`, the same for the same seed."""
    rng = random.Random(seed)
    if name == "sharegpt":
        return [Session((Turn(_lognormal_int(rng, 48, 0.8, 4, max_answer),
                              _ids(rng, _lognormal_int(rng, 160, 1.0, 8, max_prompt), vocab)),))
                for _ in range(count)]
    if name == "long_prompt":
        return [Session((Turn(rng.randint(4, 16), _ids(rng, rng.randint(max_prompt // 2, max_prompt), vocab)),))
                for _ in range(count)]
    if name == "long_answer":
        return [Session((Turn(rng.randint(max_answer // 2, max_answer), _ids(rng, rng.randint(8, 32), vocab)),))
                for _ in range(count)]
    if name == "multiturn":
        # system prompts of about max_prompt / 2 tokens (~1.3 tokens per word in English BPEs)
        system_sentences = max(1, max_prompt // 32)
        user_sentences = 1 if max_prompt < 256 else 3
        words = max(3, min(12, max_prompt // 16))  # short sentences for small contexts
        systems = [" ".join(_sentence(rng, words) for _ in range(system_sentences)) for _ in range(4)]
        sessions = []
        for i in range(count):
            turns = tuple(Turn(rng.randint(max(1, max_answer // 4), max(1, max_answer // 2)),
                               user_message=" ".join(_sentence(rng, words) for _ in range(user_sentences)))
                          for _ in range(rng.randint(2, 4)))
            sessions.append(Session(turns, system_prompt=systems[i % len(systems)], chat=True,
                                    tags={"system": str(i % len(systems))}))
        return sessions
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")
