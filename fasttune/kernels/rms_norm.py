"""RMSNorm.

    y = w' * (x / sqrt(mean(x^2) + eps))

statistics in fp32, the normalised value cast back to the input dtype before the scale is applied
(the order transformers uses, so results match bit for bit in fp32). `w' = w` for Llama-style norms
and `w' = 1 + w` for Gemma-style norms (`offset=1.0`), where the whole product stays in fp32.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (offset + weight.float())).to(dtype)
    return weight * normed.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps, offset)
