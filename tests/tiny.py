"""Tiny random configs of every supported family, shared by the tests."""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

FAMILY_CONFIGS = {
    "llama": dict(model_type="llama"),
    "llama3-rope": dict(
        model_type="llama",
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "mistral": dict(model_type="mistral", sliding_window=6, head_dim=16),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "gemma": dict(model_type="gemma", head_dim=24),
    "gemma2": dict(
        model_type="gemma2", head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
    ),
    "gemma3": dict(
        model_type="gemma3_text", head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
        },
    ),
}


def tiny_config(name: str, **overrides):
    kwargs = dict(COMMON)
    kwargs.update(FAMILY_CONFIGS[name])
    kwargs.update(overrides)
    if "layer_types" in kwargs and len(kwargs["layer_types"]) != kwargs["num_hidden_layers"]:
        pattern = kwargs["layer_types"]  # repeat the family's pattern over a deeper override
        kwargs["layer_types"] = [pattern[i % len(pattern)] for i in range(kwargs["num_hidden_layers"])]
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_pair(name: str, dtype=torch.float32, seed: int = 0, **overrides):
    """(reference HF model, identical copy) in eval mode, on CPU."""
    torch.manual_seed(seed)
    config = tiny_config(name, **overrides)
    config._attn_implementation = "eager"
    ref = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for p in ref.parameters():  # norms start at exactly 1; perturb so that their math is exercised
            p.add_(torch.randn_like(p) * 0.02)
    fast = copy.deepcopy(ref)
    return ref, fast


def save_tiny(directory, name: str, tokenizer_dir: str, seed: int = 0, **overrides) -> str:
    """Write a tiny random model of family `name` with a real tokenizer (SmolLM2's, 49152 tokens) to
    `directory`, loadable by FastLanguageModel.from_pretrained and by plain transformers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    overrides.setdefault("vocab_size", len(tokenizer))
    overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
    overrides.setdefault("bos_token_id", tokenizer.bos_token_id)
    overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
    ref, _ = tiny_pair(name, seed=seed, **overrides)
    ref.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
