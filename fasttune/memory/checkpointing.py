"""Gradient checkpointing modes.

fasttune's owned forward checkpoints each decoder layer itself (non-reentrant recompute), so it works
with frozen base weights without forcing the inputs to require grad. The offloaded kind, which parks
the saved layer inputs in pinned CPU memory, is a later feature; until then "unsloth"/"fasttune"
mean recompute checkpointing.
"""

from __future__ import annotations

_ON = (True, "unsloth", "fasttune")
_OFF = (False, None)


def checkpoint_mode(value) -> bool:
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(
        f"use_gradient_checkpointing={value!r} is not a known mode; use True, False, 'unsloth' or 'fasttune'"
    )


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """Turn checkpointing on or off for a (possibly PEFT-wrapped) model."""
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
