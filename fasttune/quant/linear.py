"""`QuantLinear`: a frozen linear layer whose weight is stored quantized (NF4, int8 or FP8).

It subclasses `nn.Linear` so that PEFT puts its LoRA adapters on it like on any linear layer (and
its `lora.Linear` calls this module's forward for the base term). The packed codes are the module's
`weight` parameter (frozen; bitsandbytes keeps them under the same name), the rest of the format's
state (block absmax, code tables) rides along in the format object and follows the module across
devices. `state_dict()` holds bitsandbytes' keys, so a saved model loads in transformers +
bitsandbytes as well as here. An FP8 layer saves transformers' "fp8" layout instead (`weight` as e4m3
codes plus `weight_scale_inv`, see fasttune.quant.fp8), and its forward multiplies through
`FP8Tensor.linear` (a scaled fp8 matmul where the GPU has one).

The forward dequantizes into a temporary and multiplies (`fasttune.lora.lora_linear`, whose
backward dequantizes again instead of keeping the dense weight alive between forward and backward).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..lora import lora_linear
from .fp8 import (
    FP8_DTYPE,
    GRANULARITIES,
    FP8Tensor,
    fp8_from_checkpoint,
    fp8_to_checkpoint,
    quantize_fp8,
)
from .int8 import (
    Int8Tensor,
    int8_from_bnb_state_dict,
    int8_to_bnb_state_dict,
    quantize_int8,
)
from .nf4 import NF4Tensor, nf4_from_bnb_state_dict, nf4_to_bnb_state_dict, quantize_nf4

FORMATS = ("nf4", "int8", "fp8")
_NF4_STATE_KEYS = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                   "weight.quant_state.bitsandbytes__nf4")
_INT8_STATE_KEYS = ("SCB", "weight_format")
# input_scale: a static activation scale (activation_scheme "static"), read and ignored: activations are
# quantized per row on the fly (or not at all)
_FP8_STATE_KEYS = ("weight_scale_inv", "input_scale")


def quant_keys_of(fmt: str) -> tuple[str, ...]:
    """Checkpoint keys (relative to the module) that mark a weight as stored in `fmt` already."""
    return {"nf4": _NF4_STATE_KEYS, "int8": _INT8_STATE_KEYS, "fp8": _FP8_STATE_KEYS}[fmt]


def quant_weight_from_checkpoint(fmt: str, tensors: dict[str, torch.Tensor], device, dtype=None):
    """The format object from a module's checkpoint tensors (keys relative to the module)."""
    if fmt == "nf4":
        return nf4_from_bnb_state_dict(tensors, "", device=device)
    if fmt == "fp8":
        return fp8_from_checkpoint(tensors, "", dtype=dtype or torch.bfloat16, device=device)
    return int8_from_bnb_state_dict(tensors, "", dtype=dtype or torch.bfloat16, device=device)


class QuantLinear(nn.Linear):
    """y = x W^T (+ b) with W held as NF4, int8 or FP8 codes; W never trains.

    `granularity` ("row" or "block") is for fmt="fp8" only: the scales a 16-bit weight is quantized with. A
    weight read already quantized keeps the granularity it was stored with."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, fmt: str = "nf4",
                 granularity: str | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"QuantLinear: format {fmt!r} is not one of {FORMATS}")
        if fmt == "fp8":
            granularity = granularity or "row"
            if granularity not in GRANULARITIES:
                raise ValueError(f"QuantLinear: fp8 granularity {granularity!r} is not one of {GRANULARITIES}")
        elif granularity is not None:
            raise ValueError(f"QuantLinear: granularity is for fmt='fp8', not {fmt!r}")
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate the dense weight
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.granularity = granularity
        self.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8, device="meta"), requires_grad=False)
        self.register_parameter("bias", None)
        self._state: NF4Tensor | Int8Tensor | FP8Tensor | None = None  # the format object minus its codes
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False)

    # -- the quantized weight -----------------------------------------------------------------

    @property
    def quant_weight(self) -> NF4Tensor | Int8Tensor | FP8Tensor:
        """The whole format object (codes + state); what the fused LoRA functions dequantize."""
        if self._state is None:
            raise RuntimeError("QuantLinear holds no weight yet (set_quantized / quantize_from)")
        weight = self.weight
        if self._state.data.data_ptr() != weight.data_ptr() or self._state.data.device != weight.device:
            # the codes were replaced behind the module's back (param.data = ...): follow them, once
            self._state = replace(self._state, data=weight.data)
        return self._state  # built once, not per call: every forward of every projection asks for it

    def set_quantized(self, q: NF4Tensor | Int8Tensor | FP8Tensor) -> None:
        expected = (self.out_features, self.in_features)
        if tuple(q.shape) != expected:
            raise ValueError(f"QuantLinear: weight of shape {tuple(q.shape)} for a {expected} layer")
        kind = "nf4" if isinstance(q, NF4Tensor) else "fp8" if isinstance(q, FP8Tensor) else "int8"
        if kind != self.fmt:
            raise ValueError(f"QuantLinear({self.fmt}) got a {kind} weight")
        self.weight = nn.Parameter(q.data, requires_grad=False)
        self._state = q
        if kind == "fp8":
            self.granularity = q.granularity  # a stored weight keeps its scales

    def quantize_from(self, w: torch.Tensor) -> None:
        if self.fmt == "fp8":
            self.set_quantized(quantize_fp8(w, self.granularity))
            return
        self.set_quantized(quantize_nf4(w) if self.fmt == "nf4" else quantize_int8(w))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.quant_weight.dequantize(dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._state.dtype

    # -- nn.Module plumbing ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the format's own `linear` picks its fastest product (NF4: a GEMV reading the packed codes for a few
        # rows on CUDA, i.e. decode; FP8: the scaled matmul); the backward dequantizes
        y = lora_linear(x, self.quant_weight)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def _apply(self, fn, recurse=True):
        # torch counts fp8 as floating point, so model.to(dtype) / .half() would cast the codes' values: walk
        # the module with the codes seen as bytes, which only a device move touches.
        fp8_codes = self.weight.dtype == FP8_DTYPE
        if fp8_codes:
            self.weight.data = self.weight.data.view(torch.uint8)
        try:
            super()._apply(fn, recurse)
        finally:
            if fp8_codes:
                self.weight.data = self.weight.data.view(FP8_DTYPE)
        if self._state is not None:
            # the state follows the codes' device; a dtype cast of the model leaves the format alone. The
            # state's own reference to the codes is swapped for the moved ones first: moving it as well would
            # leave a second copy of the codes on the new device.
            self._state = replace(self._state, data=self.weight.data).to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._state is None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        q = self.quant_weight
        if self.fmt == "fp8":
            sd = fp8_to_checkpoint(q, prefix)
        else:
            sd = nf4_to_bnb_state_dict(q, prefix) if self.fmt == "nf4" else int8_to_bnb_state_dict(q, prefix)
        destination.update(sd)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        local = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if "weight" not in local:
            if strict:
                missing_keys.append(prefix + "weight")
            return
        device = self.weight.device if not self.weight.is_meta else local["weight"].device
        if set(quant_keys_of(self.fmt)) & set(local):
            # an fp8 checkpoint does not record the original dtype: keep the one this layer had
            dtype = self._state.dtype if self.fmt == "fp8" and self._state is not None else None
            self.set_quantized(quant_weight_from_checkpoint(self.fmt, local, device, dtype))
        else:
            self.quantize_from(local["weight"].to(device))
        if self.bias is not None and "bias" in local:
            self.bias = nn.Parameter(local["bias"].to(device), requires_grad=False)
        if strict:
            known = {"weight", "bias", *quant_keys_of(self.fmt)}
            unexpected_keys.extend(prefix + k for k in local if k not in known and "." not in k.removeprefix("weight."))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"format={self.fmt}" + (f", granularity={self.granularity}" if self.fmt == "fp8" else "")
