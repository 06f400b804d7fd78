"""Rotary position embedding.

For a head vector x of size d split in halves (x1, x2) and angle theta_j = p * inv_freq_j:

    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half(x) = (-x2, x1)

with cos/sin of shape (batch, seq, d) built from `cat(freqs, freqs)` and multiplied by the rope
type's attention scaling. Rope scaling (linear, llama3, yarn, ...) only changes inv_freq and that
scaling factor, so it is entirely inside `rope_cos_sin`'s inputs.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * attention_scaling
    sin = emb.sin() * attention_scaling
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (b, hq, s, d), k: (b, hk, s, d), cos/sin: (b, s, d)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rope_reference(q, k, cos, sin)
