"""Hot-path operations, each with a pure-PyTorch reference.

Model code calls the names exported here and never chooses an implementation itself: each public
function asks `dispatch.use_triton` (the one place that decides) and runs its Triton kernel on CUDA,
its pure-PyTorch reference elsewhere. The reference is also the test oracle and the benchmark baseline.
"""

from .activations import glu_activation, glu_activation_reference
from .attention import attention, attention_reference
from .cross_entropy import causal_lm_loss, causal_lm_loss_reference
from .fused_linear_ce import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    fused_lm_head_loss,
    lm_head_trains,
)
from .rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from .rope import apply_rope, apply_rope_reference, rope_cos_sin

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "fused_lm_head_loss",
    "lm_head_trains",
    "attention",
    "attention_reference",
    "apply_rope",
    "apply_rope_reference",
    "causal_lm_loss",
    "causal_lm_loss_reference",
    "glu_activation",
    "glu_activation_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_cos_sin",
]
