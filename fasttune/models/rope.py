"""Rotary frequencies from a config, computed once at patch time in fp32.

The frequencies are kept outside the module tree on purpose: a model cast to bf16 would otherwise
round them, and positions beyond a few thousand would then rotate by visibly wrong angles.
"""

from __future__ import annotations

import math

import torch


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The rope settings as one flat dict, for transformers 5 (`rope_parameters`) and older configs."""
    params = getattr(config, "rope_parameters", None)
    if params and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if not params:
        scaling = dict(getattr(config, "rope_scaling", None) or {})
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0), **scaling}
    params = dict(params)
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def rope_inv_freq(config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim // 2] in fp32, attention scaling)."""
    p = rope_parameters(config, layer_type)
    dim = int(head_dim * p.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    base = float(p.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = p["rope_type"]
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(p["factor"]), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, p), 1.0
    return _transformers_rope(config, kind, head_dim)


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    # Llama 3.1: wavelengths longer than the original context are stretched by `factor`, short ones
    # are kept, and the band in between is interpolated smoothly.
    factor = float(p["factor"])
    low = float(p.get("low_freq_factor", 1.0))
    high = float(p.get("high_freq_factor", 4.0))
    old_len = float(p["original_max_position_embeddings"])
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, interpolated, scaled)


def _transformers_rope(config, kind: str, head_dim: int) -> tuple[torch.Tensor, float]:
    # Rarer rope types (yarn, longrope, ...) are computed by transformers' own initialiser, once,
    # at patch time; the hot path only ever sees the resulting tensor.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS or kind == "dynamic":
        raise NotImplementedError(
            f"rope_type={kind!r} is not supported by fasttune's forward yet; "
            "use a static rope type (default, linear, llama3, yarn) or load without fasttune"
        )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)
