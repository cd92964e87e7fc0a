"""Deterministic prompts of varied lengths (1 to ~1000 tokens) for equality tests."""

from __future__ import annotations

import random

SENTENCES = [
    "The river bends twice before it reaches the old mill.",
    "Quantum computers use qubits, which can hold superpositions of states.",
    "In 1969, two astronauts walked on the Moon while a third orbited above.",
    "A good recipe for bread needs flour, water, salt and patience.",
    "Distributed systems must tolerate partial failures and network partitions.",
    "The violinist tuned her instrument, then played a slow sarabande.",
    "Photosynthesis converts light energy into chemical energy stored in sugars.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Les montagnes étaient couvertes de neige, et le ciel était d'un bleu profond.",
    "東京は日本の首都であり、世界最大の都市圏の一つです。",
    "Numbers: 3.14159, 2.71828, 1.41421 and 42 appear in many puzzles.",
    "She asked, \"Where does the road lead?\" and nobody answered.",
]


def text_of_about(tokenizer, num_tokens: int, seed: int) -> list[int]:
    """Token ids of a text built from shuffled sentences, cut to exactly `num_tokens` tokens."""
    rng = random.Random(seed)
    text = ""
    while len(tokenizer.encode(text)) < num_tokens:
        text += rng.choice(SENTENCES) + " "
    return tokenizer.encode(text)[:num_tokens]


def varied_prompts(tokenizer) -> list[list[int]]:
    """16 prompts: chat-formatted questions plus raw texts from 1 to 1000 tokens."""
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in (
        "What is the capital of France?", "Write a haiku about autumn.", "List three prime numbers.")]
    raw = [text_of_about(tokenizer, n, seed) for seed, n in enumerate(
        (1, 2, 5, 17, 33, 64, 100, 128, 200, 257, 511, 1000))]
    return chats + raw + [[1], ]
