"""Gated activations of the feed-forward block.

    h = act(gate) * up

with act = SiLU (SwiGLU: Llama, Mistral, Qwen) or GELU, exact or tanh-approximated (GeGLU: Gemma).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
}

SUPPORTED_ACTIVATIONS = frozenset(_ACTIVATIONS)


def glu_activation_reference(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    return _ACTIVATIONS[kind](gate) * up


def glu_activation(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    return glu_activation_reference(gate, up, kind)
