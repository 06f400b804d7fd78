"""Hot-path operations, each with a pure-PyTorch reference.

This module is the single dispatch point of DESIGN.md: model code calls the names exported here and
never chooses an implementation itself. Until the Triton kernels land, every name resolves to its
pure-PyTorch reference, which is also the test oracle and the benchmark baseline.
"""

from .activations import glu_activation, glu_activation_reference
from .attention import attention, attention_reference
from .cross_entropy import causal_lm_loss, causal_lm_loss_reference
from .rms_norm import rms_norm, rms_norm_reference
from .rope import apply_rope, apply_rope_reference, rope_cos_sin

__all__ = [
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
