"""FP8 (e4m3) weights with per-row or 128x128-block fp32 scales, and a forward through a scaled matmul.

Format. A weight W of shape (out, in) is held as e4m3 codes q (torch.float8_e4m3fn, (out, in)) and fp32
scales s, one per group of weights:

    granularity "row":    one group per output row           s has shape (out,)
    granularity "block":  one group per 128 x 128 block       s has shape (ceil(out/128), ceil(in/128));
                          the last row and column of blocks may be partial

    s_g  = max_{(r,c) in g} |W_rc| / 448                       (fp32; 448 = largest finite e4m3fn value)
    q_rc = e4m3(clamp(fp32(W_rc) / s_g, -448, 448))            (the division in fp32, then one round to
                                                                nearest even into e4m3)
    W_rc ~ fp32(q_rc) * s_g                                    (fp32, then rounded once to the dtype)

A group that is all zero gets s = 1 and zero codes: a reader that inverts s never sees 0 (transformers'
own quantizer does the same). e4m3 keeps 3 mantissa bits, so a weight in its normal range
(|W| >= 2^-6 s, i.e. above max|W| / 28672 of its group) is off by at most 2^-4 of itself.

Forward (`FP8Tensor.linear`), y = x W^T for x of shape (M, in). With row scales, on a CUDA GPU of compute
capability >= 8.9, in 16-bit compute, x is quantized per row on the fly and the tensor cores multiply
the codes:

    a_m    = max_k |x_mk| / 448            x8_mk = e4m3(x_mk / a_m)        (fp32 math; a zero row: a = 1)
    y_mn   = a_m * s_n * sum_k x8_mk q_nk  torch._scaled_mm(x8, q^T, scale_a=a (M,1), scale_b=s (1,out))

with fp32 accumulation and one rounding to the output dtype. _scaled_mm needs x8 row-major and q^T
column-major (q^T of a contiguous q is), and in and out multiples of 16. Everywhere else (block scales,
other shapes, fp32 compute, CPU, older GPUs) it is y = x dequantize(W)^T. Rounding x to e4m3 adds a
relative error of about 2^-4 / sqrt(7) ~ 2.4% RMS per element (uniform rounding error within a binade),
and because those errors are independent across k, the same ~2.5% of y's RMS on the output; the weights'
own rounding is the same in both paths. The backward (fasttune.lora.functions) computes dx = dy W through
dequantize: gradients are not quantized.

Checkpoint layout, transformers' "fp8" quant_method (e.g. the Qwen3-*-FP8 repositories), with
config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128],
"activation_scheme": "dynamic"}. A quantized module at `prefix` holds

    {prefix}weight             float8_e4m3fn (out, in)          the codes q
    {prefix}weight_scale_inv   float32 (ceil(out/128), ceil(in/128))   the block scales s

`weight_scale_inv` *multiplies* the codes to dequantize, despite its name: it is the inverse of the
quantization factor 448 / absmax. Read from transformers 5.23 (integrations/finegrained_fp8.py), not
copied: `Fp8Quantize` multiplies a block by 448 / absmax and stores the reciprocal as weight_scale_inv;
`Fp8Dequantize` and the backward's `_dequantize_fp8_weight` multiply the fp32 codes by it; `FP8Linear`
allocates it as (ceil(out/128), ceil(in/128)) and expands it over partial last blocks.

Row scales are written as weight_scale_inv of shape (out, 1), a "block" of one row by all columns, which
transformers' Fp8Dequantize reads (it derives the block from the scale grid) but its FP8Linear under
weight_block_size [128, 128] does not. A per-tensor scale (weight_block_size null, one scalar) reads as
row scales that are all equal, which is exact.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from .format import WEIGHT_DTYPES, QuantizedWeight

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = 128
GRANULARITIES = ("row", "block")
_DTYPES = WEIGHT_DTYPES
_CHUNK = 1 << 22  # elements per step of (de)quantization: bounds the fp32 temporaries
# fp32 compute asks for full precision: no fp8 activations there
_SCALED_MM_OUT = (torch.bfloat16, torch.float16)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(shape, granularity: str) -> tuple[int, ...]:
    """The shape of the scales of an (out, in) weight at `granularity`."""
    rows, cols = shape
    return (
        (rows,)
        if granularity == "row"
        else (_ceil_div(rows, BLOCK), _ceil_div(cols, BLOCK))
    )


@dataclass
class FP8Tensor(QuantizedWeight):
    """An (out, in) weight as e4m3 codes and fp32 scales per row or per 128 x 128 block."""

    TENSORS = ("data", "scale")

    data: torch.Tensor
    scale: torch.Tensor
    granularity: str = "row"
    # what dequantize() returns by default: the weight's original dtype
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"FP8Tensor: granularity {self.granularity!r} is not one of {GRANULARITIES}"
            )
        if self.data.dtype != FP8_DTYPE or self.data.dim() != 2:
            raise ValueError(
                f"FP8Tensor: data must be a 2-D {FP8_DTYPE} tensor, got {self.data.dtype} {tuple(self.data.shape)}"
            )
        want = scale_shape(self.data.shape, self.granularity)
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != want:
            raise ValueError(
                f"FP8Tensor: {self.granularity} scales of a {tuple(self.data.shape)} weight must be fp32 of shape "
                f"{want}, got {self.scale.dtype} {tuple(self.scale.shape)}"
            )
        self._check_dtype()

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_fp8(self, dtype)

    def linear(
        self, x2: torch.Tensor, out_dtype: torch.dtype | None = None, *, fallback: bool = True
    ) -> torch.Tensor | None:
        """x2 (M, in) @ W^T -> (M, out) in `out_dtype` (default x2's): through torch._scaled_mm where
        `scaled_mm_applies`, else through the dequantized weight (or None with `fallback=False`)."""
        out_dtype = out_dtype or x2.dtype
        if scaled_mm_applies(x2, self, out_dtype):
            key = (x2.device.index, out_dtype)
            if key not in _scaled_mm_refused:
                try:
                    return scaled_mm_rowwise(x2, self, out_dtype)
                except (RuntimeError, ValueError) as err:
                    # this torch / cuBLAS build lacks the row-wise kernel: say so once, then dequantize
                    _scaled_mm_refused.add(key)
                    warnings.warn(
                        f"fasttune: torch._scaled_mm refused row-wise fp8 scaling ({err}); FP8 weights are "
                        "dequantized for the forward instead (slower, same weights)",
                        stacklevel=2,
                    )
        return torch.mm(x2.to(out_dtype), self.dequantize(out_dtype).t()) if fallback else None


def _check_weight(w: torch.Tensor, granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"quantize_fp8: granularity {granularity!r} is not one of {GRANULARITIES}"
        )
    if w.dim() != 2:
        raise ValueError(
            f"quantize_fp8: expected a 2-D (out, in) weight, got shape {tuple(w.shape)}"
        )
    if w.dtype not in _DTYPES:
        raise ValueError(
            f"quantize_fp8: weights of dtype {w.dtype} are not supported; use one of {_DTYPES}"
        )


def _rows_per_step(rows: int, cols: int, granularity: str) -> int:
    step = max(1, _CHUNK // max(cols, 1))
    # whole blocks only for block scales: a block's scale needs all of its rows
    if granularity == "block":
        step = max(BLOCK, step - step % BLOCK)
    return min(step, max(rows, 1))


def _apply_block_scales(t: torch.Tensor, s: torch.Tensor, op: str) -> torch.Tensor:
    """t (rows, cols) fp32, in place: each element divided (`div_`) or multiplied (`mul_`) by the scale of
    its block; s (ceil(rows/128), ceil(cols/128)). The scales are expanded over rows only and broadcast over
    columns through views of t, so no second t-sized tensor is made."""
    rows, cols = t.shape
    full = cols // BLOCK
    s_rows = s.repeat_interleave(BLOCK, dim=0)[:rows]  # (rows, blocks per row)
    if full:
        getattr(t[:, : full * BLOCK].view(rows, full, BLOCK), op)(
            s_rows[:, :full, None]
        )
    if cols % BLOCK:
        getattr(t[:, full * BLOCK :], op)(s_rows[:, full:])
    return t


def _block_absmax(a: torch.Tensor) -> torch.Tensor:
    """max |.| of each 128 x 128 block of a non-negative (rows, cols) tensor; zero padding fills partial
    blocks, which leaves a maximum of non-negative values unchanged."""
    rows, cols = a.shape
    nr, nc = _ceil_div(rows, BLOCK), _ceil_div(cols, BLOCK)
    padded = torch.nn.functional.pad(a, (0, nc * BLOCK - cols, 0, nr * BLOCK - rows))
    return padded.view(nr, BLOCK, nc, BLOCK).amax(dim=(1, 3))


def quantize_fp8(w: torch.Tensor, granularity: str = "row") -> FP8Tensor:
    """e4m3 codes and fp32 scales (absmax / 448 per row or per 128 x 128 block) of a 2-D weight (fp32 / fp16 /
    bf16, CPU or CUDA), a few million elements at a time so that the fp32 temporaries stay small."""
    _check_weight(w, granularity)
    w = w.detach()
    rows, cols = w.shape
    data = torch.empty((rows, cols), dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(
        scale_shape(w.shape, granularity), dtype=torch.float32, device=w.device
    )
    step = _rows_per_step(rows, cols, granularity)
    for r0 in range(0, rows, step):
        # a copy in fp32, divided in place below
        chunk = w[r0 : r0 + step].to(torch.float32, copy=True)
        if cols == 0:  # nothing to reduce over: every group is empty, hence zero
            absmax = torch.zeros(scale_shape(chunk.shape, granularity), device=w.device)
        else:
            absmax = (
                chunk.abs().amax(dim=1)
                if granularity == "row"
                else _block_absmax(chunk.abs())
            )
        if not torch.isfinite(absmax).all():
            raise ValueError("quantize_fp8: the weight holds inf or nan values")
        s = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
        if granularity == "row":
            chunk.div_(s[:, None])
            scale[r0 : r0 + step] = s
        else:
            _apply_block_scales(chunk, s, "div_")
            scale[r0 // BLOCK : r0 // BLOCK + s.shape[0]] = s
        # the clamp keeps a quotient a hair above 448 (absmax / (absmax / 448) in fp32) from rounding to nan
        # where the cast does not saturate
        data[r0 : r0 + step] = chunk.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return FP8Tensor(data, scale, granularity, w.dtype)


def dequantize_fp8(q: FP8Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight back as `dtype` (default: the original dtype): fp32(code) * scale, rounded once."""
    dtype = dtype or q.dtype
    if dtype not in _DTYPES:
        raise ValueError(
            f"dequantize_fp8: output dtype {dtype} is not one of {_DTYPES}"
        )
    rows, cols = q.shape
    out = torch.empty((rows, cols), dtype=dtype, device=q.device)
    step = _rows_per_step(rows, cols, q.granularity)
    for r0 in range(0, rows, step):
        chunk = q.data[r0 : r0 + step].to(torch.float32)
        if q.granularity == "row":
            chunk.mul_(q.scale[r0 : r0 + step, None])
        else:
            _apply_block_scales(
                chunk,
                q.scale[r0 // BLOCK : _ceil_div(r0 + chunk.shape[0], BLOCK)],
                "mul_",
            )
        out[r0 : r0 + step] = chunk
    return out


# --------------------------------------------------------------------------------------------
# The scaled matmul
# --------------------------------------------------------------------------------------------

# (device index, out dtype) where _scaled_mm raised once: not tried there again
_scaled_mm_refused: set = set()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def has_fp8_matmul(device: torch.device | str | int | None = None) -> bool:
    """Whether a CUDA device has fp8 tensor cores (compute capability >= 8.9: Ada, Hopper and later)."""
    if not torch.cuda.is_available():
        return False
    device = (
        torch.device("cuda", device)
        if isinstance(device, int)
        else torch.device(device or "cuda")
    )
    if device.type != "cuda":
        return False
    index = torch.cuda.current_device() if device.index is None else device.index
    return _capability(index) >= (8, 9)


def scaled_mm_applies(x2: torch.Tensor, q: FP8Tensor, out_dtype: torch.dtype) -> bool:
    """Whether `q.linear(x2, out_dtype)` runs through torch._scaled_mm: row scales, x2 and q on one CUDA device
    with fp8 tensor cores, 16-bit output, in and out multiples of 16 (_scaled_mm's constraint), x2 non-empty."""
    rows, cols = q.shape
    return (
        q.granularity == "row"
        and x2.is_cuda
        and x2.device == q.device
        and x2.dim() == 2
        and x2.shape[0] > 0
        and x2.shape[1] == cols
        and out_dtype in _SCALED_MM_OUT
        and x2.dtype in _DTYPES
        and rows % 16 == 0
        and cols % 16 == 0
        and hasattr(torch, "_scaled_mm")
        and has_fp8_matmul(x2.device)
    )


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes (M, K), fp32 scales (M, 1)) of x2 quantized per row: absmax / 448, a zero row gets 1."""
    # abs and max are exact in x's own dtype
    absmax = x2.abs().amax(dim=1, keepdim=True).float()
    a = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
    codes = (
        x2.to(torch.float32, copy=True).div_(a).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    )
    return codes, a


def scaled_mm_rowwise(
    x2: torch.Tensor, q: FP8Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """x2 @ W^T with x2 quantized per row and W's row-scaled codes, through torch._scaled_mm (no shape checks:
    see scaled_mm_applies; CPU builds of torch run it too, which the tests use)."""
    if q.granularity != "row":
        raise ValueError("scaled_mm_rowwise: needs row scales")
    x8, a = quantize_rows(x2)
    # q is (out, in) row-major, so q.t() is the column-major (in, out) operand _scaled_mm wants.
    return torch._scaled_mm(
        x8, q.data.t(), scale_a=a, scale_b=q.scale.view(1, -1), out_dtype=out_dtype
    )


# --------------------------------------------------------------------------------------------
# Checkpoint layout
# --------------------------------------------------------------------------------------------


def is_fp8_checkpoint(tensors: dict[str, torch.Tensor], prefix: str = "") -> bool:
    """Whether `tensors` holds an FP8 weight (codes + weight_scale_inv) under `prefix`."""
    return f"{prefix}weight_scale_inv" in tensors


def fp8_to_checkpoint(q: FP8Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of `q` in the FP8 checkpoint layout (block scales as they are, row scales as (out, 1))."""
    scale = q.scale.view(-1, 1) if q.granularity == "row" else q.scale
    return {f"{prefix}weight": q.data, f"{prefix}weight_scale_inv": scale}


def fp8_from_checkpoint(
    tensors: dict[str, torch.Tensor],
    prefix: str = "",
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
) -> FP8Tensor:
    """The FP8Tensor of a module's checkpoint tensors: `weight` (e4m3) and `weight_scale_inv` (multiplied to
    dequantize) of shape (ceil(out/128), ceil(in/128)) -> block, (out, 1) or (out,) -> row, or one scalar (a
    per-tensor scale) -> row. The checkpoint does not record the original dtype: `dtype` is what
    `dequantize()` returns by default."""
    wkey, skey = f"{prefix}weight", f"{prefix}weight_scale_inv"
    missing = [k for k in (wkey, skey) if k not in tensors]
    if missing:
        raise ValueError(
            f"fp8_from_checkpoint: missing keys {missing} (is this an FP8 checkpoint?)"
        )
    data, scale = tensors[wkey], tensors[skey]
    if data.dtype != FP8_DTYPE:
        raise ValueError(
            f"fp8_from_checkpoint: '{wkey}' must be {FP8_DTYPE}, got {data.dtype}"
        )
    if data.dim() != 2:
        raise ValueError(
            f"fp8_from_checkpoint: '{wkey}' must be 2-D (out, in), got shape {tuple(data.shape)}"
        )
    if not scale.is_floating_point():
        raise ValueError(
            f"fp8_from_checkpoint: '{skey}' must hold floating-point scales, got {scale.dtype}"
        )
    rows, cols = data.shape
    # fp32 holds fp16 / bf16 / e8m0 (power-of-two) scales exactly
    scale = scale.to(torch.float32)
    # Tried in this order, a small weight's (1, 1) block grid reads as one block, and a per-tensor scalar
    # (shape () or (1,)) as equal row scales.
    if tuple(scale.shape) in ((rows, 1), (rows,)):
        granularity, scale = "row", scale.reshape(rows)
    elif tuple(scale.shape) == scale_shape(data.shape, "block"):
        granularity = "block"
    elif scale.numel() == 1:
        granularity, scale = "row", scale.reshape(1).expand(rows)
    else:
        raise NotImplementedError(
            f"fp8_from_checkpoint: '{skey}' has shape {tuple(scale.shape)} for a ({rows}, {cols}) weight; fasttune "
            f"reads 128 x 128 block scales {scale_shape(data.shape, 'block')}, row scales ({rows}, 1) or one "
            "per-tensor scale"
        )
    if device is not None:
        data, scale = data.to(device), scale.to(device)
    return FP8Tensor(data, scale.contiguous(), granularity, dtype)
