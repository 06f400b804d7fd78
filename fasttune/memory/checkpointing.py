"""Gradient checkpointing modes.

fasttune's owned forward checkpoints each decoder layer itself (memory/offload.py: one autograd node per
layer, recomputed in the backward), so it works with frozen base weights without forcing the inputs to
require grad. Gradients must come from `loss.backward()` (as trainers do), not `torch.autograd.grad`.
- True: recompute checkpointing; the layer inputs stay on the GPU;
- "unsloth" / "fasttune": the same, with each layer input parked in pinned host memory until the
  backward (memory/offload.py) on CUDA; on a CPU there is nowhere cheaper to park it, so it recomputes.
  FASTTUNE_OFFLOAD_CHECKPOINTS=0 makes these recompute on CUDA too.
"""

from __future__ import annotations

import os

_OFFLOADED = ("unsloth", "fasttune")
_OFF = (False, None)


def checkpoint_mode(value):
    """False, "recompute" or "offload" for a use_gradient_checkpointing value."""
    if value is True:
        return "recompute"
    if isinstance(value, str) and value in _OFFLOADED:
        return "offload" if os.environ.get("FASTTUNE_OFFLOAD_CHECKPOINTS", "1") not in ("0", "false", "False") \
            else "recompute"
    if value in _OFF:
        return False
    if value in ("recompute", "offload"):  # a mode read back from a model
        return value
    raise ValueError(
        f"use_gradient_checkpointing={value!r} is not a known mode; use True, False, 'unsloth' or 'fasttune'"
    )


def set_gradient_checkpointing(model, enabled) -> None:
    """Turn checkpointing on (a mode from checkpoint_mode) or off for a (possibly PEFT-wrapped) model."""
    from ..models import fast_state

    state = fast_state(model)
    if state is not None:
        state.gradient_checkpointing = enabled
        return
    # A model on the transformers forward (unknown family): use its own checkpointing.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers renamed these (activation_*) after 5.17; use whichever this version has.
    if enabled and hasattr(inner, "activation_checkpointing_enable"):
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif enabled:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(inner, "activation_checkpointing_disable", None) or inner.gradient_checkpointing_disable)()
