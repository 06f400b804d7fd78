"""Fused LoRA autograd functions over frozen base weights (dense or quantized).

    y = x W^T + s (x A^T) B^T,   W frozen: no gradient, never saved as an activation.

`lora_linear` / `lora_o` (one projection), `lora_qkv` (three projections of one input) and
`lora_mlp` (the whole gated MLP as one autograd node) take (weight, A, B, scaling) tuples;
`lora_projection(module)` reads one from a PEFT LoRA layer or a plain frozen linear, or returns
None when the module must run its own forward. The math is in `functions`' docstring.
"""

from .functions import (
    MLP_ACTIVATIONS,
    LoRAProjection,
    dense_weight,
    is_quant_weight,
    lora_linear,
    lora_mlp,
    lora_o,
    lora_qkv,
)
from .modules import (
    QUANT_WEIGHT_ATTRS,
    base_bias,
    lora_projection,
    lora_projections,
    quant_weight,
    why_not_fused,
)

__all__ = [
    "MLP_ACTIVATIONS",
    "QUANT_WEIGHT_ATTRS",
    "base_bias",
    "LoRAProjection",
    "dense_weight",
    "is_quant_weight",
    "lora_linear",
    "lora_mlp",
    "lora_o",
    "lora_projection",
    "lora_projections",
    "lora_qkv",
    "quant_weight",
    "why_not_fused",
]
