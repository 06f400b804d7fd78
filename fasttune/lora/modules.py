"""Reading a projection module into the (weight, A, B, scaling) the fused LoRA functions take.

`lora_projection(module)` returns a `LoRAProjection` when calling the fused functions gives exactly
what `module(x)` gives, and None otherwise, so callers fall back to the module's own forward.
`why_not_fused(module)` says why (for a one-time note).

Eligible:
  * a PEFT `peft.tuners.lora.Linear` (its forward not overridden) where
      - adapters are not disabled and nothing is merged,
      - of the active adapters, at most one has weights in this module (none: the frozen base alone),
      - that adapter is vanilla LoRA: no DoRA or other variant, no lora bias, dropout Identity or p == 0,
      - fan_in_fan_out is off,
    and whose base layer is eligible as below;
  * a base layer on its own (A = B = None): a plain `nn.Linear` without bias whose weight does not
    require grad, or any module without bias exposing a quantized weight under one of
    `QUANT_WEIGHT_ATTRS` (an object with `.shape` (out, in) and `.dequantize(dtype=None)`, see
    `functions.is_quant_weight`); such a module promises its forward is x @ dequantize()^T.

Modules carrying forward hooks (or accelerate's `_hf_hook`, which moves offloaded weights in and out)
are not eligible: calling the fused function would skip them.
"""

from __future__ import annotations

from torch import nn

from .functions import LoRAProjection, is_quant_weight

__all__ = [
    "QUANT_WEIGHT_ATTRS",
    "base_bias",
    "lora_projection",
    "lora_projections",
    "quant_weight",
    "why_not_fused",
]

# The attribute a quantized base layer exposes its weight object under; the first found wins.
QUANT_WEIGHT_ATTRS = ("fasttune_quant_weight", "quant_weight")


def quant_weight(module):
    """The quantized-weight object `module` exposes, or None."""
    for attr in QUANT_WEIGHT_ATTRS:
        obj = getattr(module, attr, None)
        if obj is not None and is_quant_weight(obj):
            return obj
    return None


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks) or hasattr(
        module, "_hf_hook"
    )


def _base(module: nn.Module, allow_bias: bool = False):
    """(weight, None) for an eligible base layer, else (None, reason). With `allow_bias`, a frozen bias is
    accepted: the caller adds `base_bias(module)` itself."""
    if _hooked(module):
        return None, f"{type(module).__name__} has forward hooks"
    bias = getattr(module, "bias", None)
    if bias is not None and (not allow_bias or bias.requires_grad):
        return None, f"{type(module).__name__} has a {'trainable ' if allow_bias else ''}bias"
    qw = quant_weight(module)
    if qw is not None:
        if len(tuple(qw.shape)) != 2:
            return None, f"quantized weight has shape {tuple(qw.shape)}, not (out, in)"
        return qw, None
    if (
        not isinstance(module, nn.Linear)
        or type(module).forward is not nn.Linear.forward
    ):
        return (
            None,
            f"base layer {type(module).__name__} is neither nn.Linear nor exposes a quantized weight",
        )
    if module.weight.requires_grad:
        return (
            None,
            "the base weight requires grad (the fused functions give base weights no gradient)",
        )
    return module.weight, None


def _inspect(module: nn.Module, allow_bias: bool = False):
    """(LoRAProjection, None) or (None, reason)."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # no PEFT: only plain layers can be here
        LoraLinear = None

    if LoraLinear is None or not isinstance(module, LoraLinear):
        if hasattr(module, "lora_A") or hasattr(module, "base_layer"):
            return (
                None,
                f"{type(module).__name__} is an adapter layer other than peft.tuners.lora.Linear",
            )
        weight, reason = _base(module, allow_bias)
        return (
            (None, reason)
            if weight is None
            else (LoRAProjection(weight, None, None, 1.0), None)
        )

    if type(module).forward is not LoraLinear.forward:
        return None, f"{type(module).__name__} overrides peft's lora.Linear.forward"
    if _hooked(module):
        return None, "the LoRA layer has forward hooks"
    if module.disable_adapters:
        return None, "adapters are disabled"
    if module.merged:
        return None, "adapters are merged into the base weight"
    if getattr(module, "fan_in_fan_out", False):
        return None, "fan_in_fan_out is set"
    weight, reason = _base(module.get_base_layer(), allow_bias)
    if weight is None:
        return None, reason

    active = module.active_adapters
    active = [active] if isinstance(active, str) else list(active)
    applied = [
        name for name in active if name in module.lora_A
    ]  # as peft's forward skips the rest
    if not applied:
        return LoRAProjection(weight, None, None, 1.0), None
    if len(applied) > 1:
        return (
            None,
            f"{len(applied)} active adapters ({', '.join(applied)}); the fused path takes one",
        )
    name = applied[0]
    if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
        return (
            None,
            f"adapter {name!r} is a LoRA variant (DoRA or another), not vanilla LoRA",
        )
    if module.lora_bias.get(name, False):
        return None, f"adapter {name!r} has a lora bias"
    lora_A, lora_B = module.lora_A[name], module.lora_B[name]
    if not isinstance(lora_A, nn.Linear) or not isinstance(lora_B, nn.Linear):
        return None, f"adapter {name!r} A/B are not nn.Linear"
    if lora_A.bias is not None or lora_B.bias is not None:
        return None, f"adapter {name!r} has a lora bias"
    if _hooked(lora_A) or _hooked(lora_B):
        return None, f"adapter {name!r} A/B have forward hooks"
    dropout = module.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) and not (
        isinstance(dropout, nn.Dropout) and dropout.p == 0
    ):
        return (
            None,
            f"adapter {name!r} has lora_dropout {dropout!r}; the fused path needs dropout 0",
        )
    out_f, in_f = tuple(weight.shape)
    A, B = lora_A.weight, lora_B.weight
    if A.dim() != 2 or A.shape[1] != in_f or tuple(B.shape) != (out_f, A.shape[0]):
        return (
            None,
            f"adapter {name!r} shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit W {(out_f, in_f)}",
        )
    return LoRAProjection(weight, A, B, float(module.scaling[name])), None


def lora_projection(module: nn.Module, allow_bias: bool = False) -> LoRAProjection | None:
    """(weight, A, B, scaling) for the fused functions, or None when `module` must run its own forward.
    `allow_bias=True` also accepts a base layer with a frozen bias, which the caller then adds
    (`base_bias`): the projection itself never includes it."""
    return _inspect(module, allow_bias)[0]


def lora_projections(*modules: nn.Module, allow_bias: bool = False) -> list[LoRAProjection] | None:
    """All of `modules` as projections, or None if any one is not eligible (a fused MLP or QKV needs all)."""
    out = []
    for m in modules:
        p = lora_projection(m, allow_bias)
        if p is None:
            return None
        out.append(p)
    return out


def base_bias(module: nn.Module):
    """The bias of `module`'s base layer (of the module itself when it is not an adapter layer), or None."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return getattr(base, "bias", None)


def why_not_fused(module: nn.Module, allow_bias: bool = False) -> str | None:
    """Why `lora_projection(module, allow_bias)` is None, or None when it is eligible."""
    return _inspect(module, allow_bias)[1]
