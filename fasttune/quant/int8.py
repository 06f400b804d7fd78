"""Int8 weight-only quantization, symmetric per output channel (row), in bitsandbytes' LLM.int8() layout.

For a weight W of shape (out, in), per row r:

    absmax_r = max_j |W_rj|                              (fp32; bitsandbytes calls it SCB)
    q_rj     = round(fp32(W_rj) * (127 / absmax_r))      (round half to even, in [-127, 127];
                                                          an all-zero row gives zeros)
    W_rj    ~ (q_rj * absmax_r) * (1 / 127)              (fp32, in this order, then the dtype)

The scale of a row is absmax_r / 127 (`Int8Tensor.scale`).

Serialization: `bnb.nn.Linear8bitLt` (has_fp16_weights=False) saves for its weight at `prefix`

    {prefix}weight          int8 (out, in)   the row-major codes
    {prefix}SCB             fp32 (out,)      absmax_r (not divided by 127)
    {prefix}weight_format   uint8 scalar 0   "row"; older checkpoints may lack it, other layouts
                                             (col32, col_turing, col_ampere) are not supported

Checked against bitsandbytes 0.50.2 on a CPU (`int8_vectorwise_quant`, `Linear8bitLt.state_dict()`,
`int8_vectorwise_dequant`): the same bytes. `Linear8bitLt` casts a weight to fp16 before it quantizes;
quantize_int8 works from the weight's own values in fp32, which gives the same codes for fp16 weights
and for bf16 rows inside fp16's normal range. bitsandbytes' CUDA kernel computes 127 / absmax with a
fast approximate division (by reading its source; not run here), so a value within a few ulps of a
half-way point may get the neighbouring code there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .format import WEIGHT_DTYPES, QuantizedWeight

_DTYPES = WEIGHT_DTYPES
_CHUNK = 1 << 22  # elements per step of quantization: bounds the fp32 temporaries
_WEIGHT_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


@dataclass
class Int8Tensor(QuantizedWeight):
    """An (out, in) weight as int8 codes and one fp32 absmax per row (scale = absmax / 127)."""

    TENSORS = ("data", "absmax")

    data: torch.Tensor
    absmax: torch.Tensor
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        if self.data.dtype != torch.int8 or self.data.dim() != 2:
            raise ValueError(
                f"Int8Tensor: data must be a 2-D int8 tensor, got {self.data.dtype} {tuple(self.data.shape)}"
            )
        if self.absmax.dtype != torch.float32 or self.absmax.shape != (
            self.data.shape[0],
        ):
            raise ValueError(
                f"Int8Tensor: absmax must be fp32 with one value per row ({self.data.shape[0]}), "
                f"got {self.absmax.dtype} {tuple(self.absmax.shape)}"
            )
        self._check_dtype()

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def scale(self) -> torch.Tensor:
        """fp32 (out,): the per-row step, absmax / 127."""
        return self.absmax / 127.0

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(self, dtype)


def quantize_int8(w: torch.Tensor) -> Int8Tensor:
    """Per-row symmetric int8 quantization of a 2-D weight (fp32 / fp16 / bf16, CPU or CUDA), in row
    chunks so that the fp32 temporaries stay small."""
    if w.dim() != 2:
        raise ValueError(
            f"quantize_int8: expected a 2-D (out, in) weight, got shape {tuple(w.shape)}"
        )
    if w.dtype not in _DTYPES:
        raise ValueError(
            f"quantize_int8: weights of dtype {w.dtype} are not supported; use one of {_DTYPES}"
        )
    w = w.detach()
    rows, cols = w.shape
    data = torch.empty((rows, cols), dtype=torch.int8, device=w.device)
    absmax = torch.empty(rows, dtype=torch.float32, device=w.device)
    step = max(1, _CHUNK // max(cols, 1))
    for r0 in range(0, rows, step):
        block = w[r0 : r0 + step].to(torch.float32, copy=True)  # scaled in place below
        am = (
            block.abs().amax(dim=1)
            if cols
            else torch.zeros(block.shape[0], device=w.device)
        )
        if not torch.isfinite(am).all():
            raise ValueError("quantize_int8: the weight holds inf or nan values")
        # 127 / absmax times the value (not value * 127 / absmax): bitsandbytes rounds this way. A zero row
        # gets a zero factor instead of inf.
        factor = torch.where(am > 0, 127.0 / am, torch.zeros_like(am))
        data[r0 : r0 + step] = (
            block.mul_(factor[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        )
        absmax[r0 : r0 + step] = am
    return Int8Tensor(data, absmax, w.dtype)


def dequantize_int8(q: Int8Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight back as `dtype` (default: the original dtype); the same fp32 values as
    bitsandbytes' `int8_vectorwise_dequant`, rounded once."""
    dtype = dtype or q.dtype
    if dtype not in _DTYPES:
        raise ValueError(
            f"dequantize_int8: output dtype {dtype} is not one of {_DTYPES}"
        )
    return (q.data * q.absmax[:, None] * (1.0 / 127.0)).to(dtype)


def int8_to_bnb_state_dict(q: Int8Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors `bnb.nn.Linear8bitLt` saves for its weight under `prefix`."""
    return {
        f"{prefix}weight": q.data,
        f"{prefix}SCB": q.absmax,
        f"{prefix}weight_format": torch.tensor(0, dtype=torch.uint8),
    }


def is_bnb_int8(sd: dict[str, torch.Tensor], prefix: str = "") -> bool:
    """Whether `sd` holds a bitsandbytes 8-bit weight under `prefix`."""
    return f"{prefix}SCB" in sd


def int8_from_bnb_state_dict(
    sd: dict[str, torch.Tensor],
    prefix: str = "",
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
) -> Int8Tensor:
    """Read the 8-bit weight `bnb.nn.Linear8bitLt` saved under `prefix`, without bitsandbytes. The
    checkpoint does not record the original dtype: `dtype` is what `dequantize()` returns by default."""
    wkey, skey, fkey = f"{prefix}weight", f"{prefix}SCB", f"{prefix}weight_format"
    missing = [k for k in (wkey, skey) if k not in sd]
    if missing:
        raise ValueError(
            f"int8_from_bnb_state_dict: missing keys {missing} (is this a bitsandbytes 8-bit checkpoint?)"
        )
    fmt = sd.get(fkey, 0)
    fmt = fmt.item() if isinstance(fmt, torch.Tensor) else fmt
    name = _WEIGHT_FORMATS.get(fmt, fmt) if isinstance(fmt, int) else fmt
    if name != "row":
        if name in _WEIGHT_FORMATS.values():
            raise NotImplementedError(
                f"int8_from_bnb_state_dict: '{fkey}' is {name!r}; only the 'row' layout is supported"
            )
        raise ValueError(
            f"int8_from_bnb_state_dict: '{fkey}' holds unknown weight format {fmt!r}"
        )
    data, absmax = sd[wkey], sd[skey]
    if data.dtype != torch.int8:
        raise ValueError(
            f"int8_from_bnb_state_dict: '{wkey}' must be int8, got {data.dtype}"
        )
    absmax = absmax.float()
    if device is not None:
        data, absmax = data.to(device), absmax.to(device)
    return Int8Tensor(data, absmax, dtype)
