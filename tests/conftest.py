"""Shared fixtures: the default model's path and tiny random Llama / Qwen2 checkpoints (with tokenizers).

In CI (`CI=true`) a skipped test fails, whatever the reason (a missing tool, package or privilege):
a green CI means every feature was exercised. Only tests marked `gpu` may skip there (no GPU in CI).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from engine.loader.default_model import default_model_path as _default_model_path
from tests.support.simulation import PREFILL, Engines, write_profile

TINY_VOCAB = 512
STRICT_SKIPS = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    """A whole module skipped while collecting it (`pytest.skip(allow_module_level=True)`, a
    module-level `importorskip`) fails in CI too."""
    outcome = yield
    report = outcome.get_result()
    if STRICT_SKIPS and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must exercise every feature (only gpu tests may skip): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if STRICT_SKIPS and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("gpu") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must exercise every feature (only gpu tests may skip): {reason}"
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Hello, world! Paris is the capital of France; Berlin of Germany.",
    "def f(x):\n    return x * 2  # code\n",
    "naïve café résumé — “quotes” 日本語のテキスト 中文 한국어 🎉🚀",
] * 20 + [f"token{i} number {i * 7919} item_{i % 13}" for i in range(300)]


def build_tiny_tokenizer(directory: pathlib.Path, add_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE of TINY_VOCAB ids (0..3 special) saved into `directory`; BOS added if `add_bos`."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(_CORPUS, trainer)
    assert raw.get_vocab_size() == TINY_VOCAB
    if add_bos:
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    else:
        raw.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(str(directory))
    return tok


def _common(**extra: object) -> dict[str, object]:
    return dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                eos_token_id=2, bos_token_id=3, pad_token_id=0, **extra)


def _perturb(model: torch.nn.Module, qk_norms: bool = False, mlp_scale: float = 1.0, all_norms: bool = False,
             qk_scale: float = 1.0) -> None:
    """Make a random checkpoint's weights matter: q/k norm weights (or every norm's) away from their
    init, MLP (router and experts) weights scaled, and q/k projections scaled up (sharper attention:
    windows and score caps bite), so that a wrong mapping, routing or weighting changes the tokens."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if qk_norms and name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 1.5)
            elif all_norms and name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
            elif mlp_scale != 1.0 and ".mlp." in name:
                param.mul_(mlp_scale)
            elif qk_scale != 1.0 and name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                param.mul_(qk_scale)


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Any:
    """An engine sets this process's torch threads (EngineConfig.num_threads; a tensor-parallel rank 0 its share of
    the cores): the next test starts with the count this one started with."""
    count = torch.get_num_threads()
    yield
    torch.set_num_threads(count)


@pytest.fixture
def cache_tmp(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A private disk cache (engine.disk_cache) for a test that converts files."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(directory))
    return directory


@pytest.fixture(scope="session")
def default_model_path() -> pathlib.Path:
    return _default_model_path()


@pytest.fixture(params=["real", "simulated"])
def tiny_llama_engines(request: pytest.FixtureRequest, tiny_llama_dir: pathlib.Path,
                       tmp_path: pathlib.Path) -> Engines:
    """The tiny Llama's real engine, then a simulated one of it (engine.simulated; the tests' profile):
    a cluster test that checks contracts, not the model's numbers, runs against both."""
    if request.param == "real":
        return Engines(tiny_llama_dir)
    # prefill 5x the tests' profile (a 200-token prompt ~0.1 s): slow enough that a fault test can catch a
    # prefill worker computing prompts, as it does the real one
    slow_prefill = [[n, 5 * s] for n, s in PREFILL]
    return Engines(tiny_llama_dir, write_profile(tmp_path, tiny_llama_dir, prefill=slow_prefill))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Untied Llama, theta 10000, tokenizer adds BOS. Treat as read-only."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_common(tie_word_embeddings=False)))  # type: ignore[arg-type]
    model.save_pretrained(str(directory))
    build_tiny_tokenizer(directory, add_bos=True)
    return directory


def _tiny_checkpoint(factory: pytest.TempPathFactory, name: str, seed: int, build: Callable[[], torch.nn.Module],
                    add_bos: bool, **perturb: Any) -> pathlib.Path:
    directory = factory.mktemp(name)
    torch.manual_seed(seed)
    model = build()
    _perturb(model, **perturb)
    model.save_pretrained(str(directory))  # type: ignore[operator]
    build_tiny_tokenizer(directory, add_bos=add_bos)
    return directory


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Tied Qwen2 (q/k/v biases), theta 1e6, tokenizer adds no BOS. Treat as read-only."""
    config = Qwen2Config(**_common(tie_word_embeddings=True, rope_theta=1e6))  # type: ignore[arg-type]
    return _tiny_checkpoint(tmp_path_factory, "tiny_qwen2", 1, lambda: Qwen2ForCausalLM(config), add_bos=False)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Qwen3: per-head q/k RMSNorm (weights randomised: a checkpoint's are not all ones), no q/k/v
    bias, head_dim 32 while hidden / heads is 16. Treat as read-only."""
    config = Qwen3Config(**_common(tie_word_embeddings=False, rope_theta=1e6, head_dim=32))  # type: ignore[arg-type]
    return _tiny_checkpoint(tmp_path_factory, "tiny_qwen3", 3, lambda: Qwen3ForCausalLM(config), add_bos=False,
                            qk_norms=True)


@pytest.fixture(scope="session")
def tiny_mistral_window_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Mistral with a sliding window of 8 in every layer (shorter than most test prompts, and than a
    block of 16). Treat as read-only."""
    config = MistralConfig(**_common(tie_word_embeddings=False, sliding_window=8))  # type: ignore[arg-type]
    return _tiny_checkpoint(tmp_path_factory, "tiny_mistral_window", 6, lambda: MistralForCausalLM(config),
                            add_bos=True)


@pytest.fixture(scope="session")
def tiny_qwen2_window_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Qwen2 with `use_sliding_window`: layer 0 global, layer 1 a window of 6 (from
    `max_window_layers` 1 on), so windowed and global layers share the pool. Treat as read-only."""
    config = Qwen2Config(**_common(tie_word_embeddings=True, rope_theta=1e6, use_sliding_window=True,  # type: ignore[arg-type]
                                   sliding_window=6, max_window_layers=1))
    return _tiny_checkpoint(tmp_path_factory, "tiny_qwen2_window", 7, lambda: Qwen2ForCausalLM(config),
                            add_bos=False)


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Gemma 2: GeGLU, four (1 + w) norms per layer (randomised), layer 0 windowed (6), layer 1 global,
    query_pre_attn_scalar 24 (not head_dim 16), attention scores capped at 2 and logits at 1.5, tied
    embeddings; q/k projections scaled up so that the window and the caps bite. Treat as read-only."""
    config = Gemma2Config(**_common(tie_word_embeddings=True, head_dim=16, query_pre_attn_scalar=24,  # type: ignore[arg-type]
                                    sliding_window=6, attn_logit_softcapping=2.0, final_logit_softcapping=1.5))
    return _tiny_checkpoint(tmp_path_factory, "tiny_gemma2", 8, lambda: Gemma2ForCausalLM(config), add_bos=True,
                            all_norms=True, qk_scale=4.0)


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Gemma 3 (text): Gemma 2's layers with (1 + w) q/k norms (randomised), three layers: two windowed
    (6) with RoPE base 10000, one global with base 1e6 scaled linearly by 4; query_pre_attn_scalar
    24; q/k projections scaled up so that windows and bases bite. Treat as read-only."""
    ropes = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
             "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}}
    config = Gemma3TextConfig(**{**_common(tie_word_embeddings=True, head_dim=16, query_pre_attn_scalar=24,  # type: ignore[arg-type]
                                           sliding_window=6, rope_parameters=ropes,
                                           layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
                                 "num_hidden_layers": 3})
    return _tiny_checkpoint(tmp_path_factory, "tiny_gemma3", 9, lambda: Gemma3ForCausalLM(config), add_bos=True,
                            all_norms=True, qk_scale=4.0)


@pytest.fixture(scope="session")
def tiny_gemma3_padded_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Gemma 3 (text) with nine layers: the fifth global, the others windowed (6), so that its hybrid KV layout
    (engine.kv_groups: at most 8 groups) has groups of two layers and a slot no layer fills. Treat as read-only."""
    kinds = ["full_attention" if i == 4 else "sliding_attention" for i in range(9)]
    config = Gemma3TextConfig(**{**_common(tie_word_embeddings=True, head_dim=16, sliding_window=6,  # type: ignore[arg-type]
                                           layer_types=kinds), "num_hidden_layers": 9})
    return _tiny_checkpoint(tmp_path_factory, "tiny_gemma3_padded", 10, lambda: Gemma3ForCausalLM(config),
                            add_bos=True, all_norms=True, qk_scale=4.0)


PHI3_ORIGINAL_CONTEXT = 64  # tiny_phi3_dir's LongRoPE switches sets beyond it


@pytest.fixture(scope="session")
def tiny_phi3_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Phi-3 (fused qkv_proj and gate_up_proj in the checkpoint): LongRoPE over an original context of
    PHI3_ORIGINAL_CONTEXT of 512 (attention factor ~1.15), short and long factors far apart; partial rotary
    (12 of 16 dims, as Phi-4-mini's 0.75); a sliding window of 12 in every layer; q/k/v scaled up so that
    the window and the factors bite. Treat as read-only."""
    rope = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.4, 2.0, 3.0, 4.5],
            "long_factor": [1.3, 2.0, 3.5, 6.0, 10.0, 16.0],
            "original_max_position_embeddings": PHI3_ORIGINAL_CONTEXT, "partial_rotary_factor": 0.75}
    fields = _common(tie_word_embeddings=False, sliding_window=12, rope_parameters=rope, partial_rotary_factor=0.75,
                     original_max_position_embeddings=PHI3_ORIGINAL_CONTEXT)
    config = Phi3Config(**{**fields, "max_position_embeddings": 512})  # type: ignore[arg-type]
    return _tiny_checkpoint(tmp_path_factory, "tiny_phi3", 10, lambda: Phi3ForCausalLM(config), add_bos=True,
                            qk_scale=3.0)


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Mixtral: 4 experts, top-2 renormalised, every layer sparse; MLP weights scaled up so that a
    wrong routing or weighting changes the greedy tokens. Treat as read-only."""
    config = MixtralConfig(**_common(tie_word_embeddings=False, num_local_experts=4,  # type: ignore[arg-type]
                                     num_experts_per_tok=2, sliding_window=None))
    return _tiny_checkpoint(tmp_path_factory, "tiny_mixtral", 4, lambda: MixtralForCausalLM(config), add_bos=True,
                            mlp_scale=8.0)


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Qwen3-MoE: q/k norms, 6 experts of width 48, top-3 not renormalised, layer 0 dense (in
    `mlp_only_layers`), layer 1 sparse; MLP weights scaled up as Mixtral's. Treat as read-only."""
    config = Qwen3MoeConfig(**_common(tie_word_embeddings=True, rope_theta=1e6, head_dim=16,  # type: ignore[arg-type]
                                      num_experts=6, num_experts_per_tok=3, moe_intermediate_size=48,
                                      norm_topk_prob=False, mlp_only_layers=[0]))
    return _tiny_checkpoint(tmp_path_factory, "tiny_qwen3_moe", 5, lambda: Qwen3MoeForCausalLM(config),
                            add_bos=False, qk_norms=True, mlp_scale=8.0)


@pytest.fixture(scope="session")
def tiny_llama3_scaled_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Llama with llama3-style RoPE scaling whose original context (64) is shorter than the prompts."""
    directory = tmp_path_factory.mktemp("tiny_llama3")
    torch.manual_seed(2)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    config = LlamaConfig(**_common(tie_word_embeddings=False, rope_theta=500000.0,  # type: ignore[arg-type]
                                   rope_scaling=scaling))
    LlamaForCausalLM(config).save_pretrained(str(directory))
    build_tiny_tokenizer(directory, add_bos=True)
    return directory
