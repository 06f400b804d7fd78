"""Blockwise 4-bit weights (NF4, and FP4) in bitsandbytes' exact layout.

Quantization, per block of `blocksize` consecutive elements of the flattened weight (row-major; the
last block may be short):

    absmax_b = max |w_i|                                   (fp32)
    x_i      = fp32(w_i) * (1 / absmax_b)                  (a product with the fp32 reciprocal, as
                                                            bitsandbytes' CUDA kernel computes it)
    q_i      = index of the code value nearest to x_i      (ties to the lower code; an all-zero block
                                                            gives the code of 0.0, see below)

Dequantization: w_i = code[q_i] * absmax_b in fp32, rounded once to the output dtype.

Packing: two 4-bit indices per byte, the element with the even flat index in the HIGH nibble:
byte_j = q_{2j} << 4 | q_{2j+1}. The packed tensor is uint8 of shape ((numel + 1) // 2, 1); an odd
numel pads the last low nibble with the code of 0.0 (index 7 for NF4).

The NF4 code (QLoRA, Dettmers et al. 2023, appendix E) holds the quantiles of N(0, 1) that split it
into 8 equal-probability halves below and 9 above 0 (offset 0.9677083), normalized to [-1, 1], so
0.0 and +-1.0 are exact. FP4 (1 sign, 2 exponent, 1 mantissa bit) is indexed by its bit pattern.

Double quantization ("compress_statistics" in bitsandbytes) stores the fp32 absmax values in 8 bits:

    offset   = mean(absmax)                                (one fp32 value, torch's mean)
    a_k      = absmax_k - offset
    nested absmax_n = max |a_k| over blocks of 256 absmax values    (fp32)
    qabsmax_k = index of the entry of the signed 8-bit "dynamic" code (nested_quant_map) nearest to
                a_k * (1 / nested absmax_n)
    absmax_k ~ dynamic[qabsmax_k] * nested_absmax_n + offset         (fp32, in this order)

The dynamic code (Dettmers 2015, "8-bit approximations") is 0, 1 and, for each decade
10^-6 .. 10^0, 2^d linearly spaced midpoints of [0.1, 1] x 10^(d-6) with both signs (d = 0..6):
256 sorted values in (-1, 1].

Serialization (what `bnb.nn.Linear4bit` writes and transformers reads), for a weight at `prefix`:

    {prefix}weight                              uint8 ((numel + 1) // 2, 1)  the packed indices
    {prefix}weight.absmax                       fp32 (blocks,), or uint8 (blocks,) with double quant
    {prefix}weight.quant_map                    fp32 (16,)   the 4-bit code
    {prefix}weight.nested_absmax                fp32 (ceil(blocks / 256),)      double quant only
    {prefix}weight.nested_quant_map             fp32 (256,)  the dynamic code   double quant only
    {prefix}weight.quant_state.bitsandbytes__nf4   uint8 bytes of UTF-8 JSON (`json.dumps`, default
        separators) with, in this order: quant_type, blocksize, dtype (torch name without "torch."),
        shape (list), and with double quant nested_blocksize (256), nested_dtype ("float32"),
        nested_offset (the fp32 offset as a Python float).

How closely this follows bitsandbytes (checked against bitsandbytes 0.50.2 on a CPU, and against the
decision rules of its CUDA kernels, which made the Hub's checkpoints, by reading them):

- NF4 codes: bitsandbytes' CUDA kernel compares x against 15 thresholds that equal the fp32 midpoints
  used here, with `x > t` choosing the upper code; its CPU path gives the same bytes.
- 8-bit absmax codes: the CUDA kernel takes the nearest entry (a binary search, then the nearer of
  two neighbours); its CPU build searches approximately and now and then takes the second-nearest.
  Exact ties (measure zero for real absmax values) may break the other way than here.
- FP4: sign bit wherever x < 0 (so -0 is written for small negative values) and the kernel's own
  decimal thresholds (_FP4_THRESHOLDS); bitsandbytes' CPU path breaks ties and signs of zero its own way.
- All-zero blocks: the CUDA kernel multiplies 0 by 1 / 0 and its NF4 decision tree sends the NaN to
  index 0 (-1.0); with double quantization such a block then dequantizes to minus the small estimate
  of a zero absmax instead of 0. Here (as in bitsandbytes' CPU path) zeros get the code of 0.0 and stay
  exactly 0. Only the bytes of all-zero blocks differ; both load the same way everywhere.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch

from ..kernels import dispatch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works without Triton
    triton = None

from ..kernels._triton_utils import interpreting
from ..kernels.launch import launch
from .format import WEIGHT_DTYPES, QuantizedWeight

if triton is not None:
    from ..kernels._triton_utils import rounded

# The 16 NF4 levels as fp32 (QLoRA appendix E; bitsandbytes' `quant_map` holds the same bits). The test
# suite re-derives them from normal quantiles.
NF4_CODE_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 e2m1 with bitsandbytes' exponent bias of 2, by bit pattern (sign bit 0b1000); divided by 12 below.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
# bitsandbytes' CUDA kernel decides an FP4 magnitude by comparing against these decimal approximations
# of the midpoints between the sorted magnitudes (1/384, 11/128, 5/24, 7/24, 5/12, 7/12, 5/6); several
# are a few ulps off the exact fp32 midpoint, and values from bf16 weights land on them, so the same
# constants are used to write the same bits.
_FP4_THRESHOLDS = (
    0.00260417,
    0.0859375,
    0.20833333,
    0.29166667,
    0.4166667,
    0.583333,
    0.8333333,
)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
# Elements handled per step of the torch paths: bounds their fp32/int temporaries to a few x 16 MiB.
_CHUNK = 1 << 22
_DTYPES = WEIGHT_DTYPES
_BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def code_table(
    quant_type: str = "nf4", device: torch.device | str | None = None
) -> torch.Tensor:
    """The 16 fp32 code values of `quant_type`, indexed by the 4-bit pattern."""
    if quant_type == "nf4":
        values = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)
    elif quant_type == "fp4":
        mags = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32)
        values = torch.cat([mags, -mags]) / 12.0
    else:
        raise ValueError(f"quant_type {quant_type!r} is not one of {QUANT_TYPES}")
    return values.to(device) if device is not None else values


@functools.lru_cache(maxsize=1)
def _dynamic_code_cpu() -> torch.Tensor:
    values = [0.0, 1.0]
    for decade in range(7):
        # 2^decade linear steps per decade: more resolution near 1, fewer bits wasted on tiny values
        edges = torch.linspace(0.1, 1.0, 2**decade + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (mids * 10.0 ** (decade - 6)).tolist()
        values += scaled + [-v for v in scaled]
    table = torch.tensor(sorted(values), dtype=torch.float32)
    assert table.numel() == 256
    return table


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The signed 8-bit dynamic code that double quantization uses for the absmax values (256 fp32)."""
    table = _dynamic_code_cpu().clone()
    return table.to(device) if device is not None else table


# --------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------


@dataclass
class NF4Tensor(QuantizedWeight):
    """A weight quantized to 4 bits per element in bitsandbytes' layout (see the module docstring).

    `absmax` is fp32 per block, or with double quantization uint8 indices into `nested_code` that
    `nested_absmax` (fp32 per 256 blocks) and `offset` turn back into fp32. `quant_type` is "nf4",
    or "fp4" for checkpoints that use it."""

    data: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int = 64
    quant_type: str = "nf4"
    offset: float | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    TENSORS = ("data", "absmax", "code", "nested_absmax", "nested_code")

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(
                f"NF4Tensor: quant_type {self.quant_type!r} is not one of {QUANT_TYPES}"
            )
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(
                f"NF4Tensor: blocksize {self.blocksize} is not one of {BLOCKSIZES}"
            )
        self._check_dtype()
        if self.data.dtype != torch.uint8 or self.data.numel() != (self.numel + 1) // 2:
            raise ValueError(
                f"NF4Tensor: packed data must be uint8 with (numel + 1) // 2 = {(self.numel + 1) // 2} bytes "
                f"for shape {tuple(self.shape)}, got {self.data.dtype} with {self.data.numel()}"
            )
        if self.code.shape != (16,) or self.code.dtype != torch.float32:
            raise ValueError(
                f"NF4Tensor: code must be 16 fp32 values, got {self.code.dtype} {tuple(self.code.shape)}"
            )
        if self.absmax.shape != (self.num_blocks,):
            raise ValueError(
                f"NF4Tensor: absmax must have {self.num_blocks} entries, got {tuple(self.absmax.shape)}"
            )
        if self.double_quant:
            if (
                self.absmax.dtype != torch.uint8
                or self.nested_absmax is None
                or self.nested_code is None
            ):
                raise ValueError(
                    "NF4Tensor: double quantization needs uint8 absmax, nested_absmax and nested_code"
                )
            if self.nested_blocksize <= 0 or self.nested_absmax.shape != (
                -(-self.num_blocks // self.nested_blocksize),
            ):
                raise ValueError(
                    f"NF4Tensor: nested_absmax of shape {tuple(self.nested_absmax.shape)} does not cover "
                    f"{self.num_blocks} blocks in groups of {self.nested_blocksize}"
                )
            if (
                self.nested_code.shape != (256,)
                or self.nested_code.dtype != torch.float32
            ):
                raise ValueError("NF4Tensor: nested_code must be 256 fp32 values")
            if self.nested_absmax.dtype != torch.float32:
                raise ValueError(
                    f"NF4Tensor: nested_absmax must be fp32, got {self.nested_absmax.dtype}"
                )
        elif self.absmax.dtype != torch.float32:
            raise ValueError(
                f"NF4Tensor: absmax must be fp32 without double quantization, got {self.absmax.dtype}"
            )

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block fp32 absmax, double quantization undone (the values the dequantization scales by)."""
        if not self.double_quant:
            return self.absmax
        nested = self.nested_absmax.repeat_interleave(self.nested_blocksize)[
            : self.num_blocks
        ]
        # product first, then the offset: bitsandbytes rounds in this order (no fused multiply-add)
        return self.nested_code[self.absmax.long()] * nested + self.offset

    def dequantize(
        self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return dequantize_nf4(self, dtype, out=out)

    def kernel_statistics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(absmax, nested_code, nested_absmax, offset) as the Triton kernels take them: contiguous, and
        without double quantization the unused pointers get a valid tensor and the offset is 0."""
        if self.double_quant:
            return (self.absmax.contiguous(), self.nested_code.contiguous(), self.nested_absmax.contiguous(),
                    float(self.offset))
        absmax = self.absmax.contiguous()
        return absmax, absmax, absmax, 0.0

    def linear(
        self, x2: torch.Tensor, out_dtype: torch.dtype | None = None, *, fallback: bool = True
    ) -> torch.Tensor | None:
        """x2 (M, in) @ W^T -> (M, out) in `out_dtype` (default x2's): the 4-bit GEMV that reads the packed
        codes, for a few rows on CUDA (decode), else the product with the dequantized weight (or None with
        `fallback=False`: the caller dequantizes itself)."""
        from .nf4_gemv import nf4_gemv, use_nf4_gemv  # that module builds on this one

        out_dtype = out_dtype or x2.dtype
        if use_nf4_gemv(x2, self):
            return nf4_gemv(x2, self, out_dtype)
        return torch.mm(x2.to(out_dtype), self.dequantize(out_dtype).t()) if fallback else None

    def __repr__(self) -> str:
        dq = f", double_quant(offset={self.offset:.6g})" if self.double_quant else ""
        return (
            f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, quant_type={self.quant_type}, "
            f"blocksize={self.blocksize}{dq}, device={self.device})"
        )


# --------------------------------------------------------------------------------------------
# Quantization (plain torch; CPU or CUDA)
# --------------------------------------------------------------------------------------------


def _nearest_index(x: torch.Tensor, sorted_code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the ascending `sorted_code` for each x; exact midpoints go to the
    lower entry (bitsandbytes compares `x > midpoint`)."""
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    return torch.bucketize(x, bounds, out_int32=True)


def _quantize_4bit_codes(
    x: torch.Tensor, quant_type: str, code: torch.Tensor
) -> torch.Tensor:
    """4-bit indices (int32) of scaled values x in [-1, 1]."""
    if quant_type == "nf4":
        return _nearest_index(x, code)  # the NF4 code is ascending: index == position
    # FP4: the nearest of the eight magnitudes, and the sign bit wherever x < 0 (also when the
    # magnitude rounds to zero: bitsandbytes' CUDA kernel writes -0 there)
    order = torch.argsort(code[:8]).to(torch.int32)
    thresholds = torch.tensor(_FP4_THRESHOLDS, dtype=torch.float32, device=x.device)
    idx = order[torch.bucketize(x.abs(), thresholds).long()]
    return torch.where(x < 0, idx | 8, idx)


def _blockwise_absmax_and_scaled(
    x: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, x / absmax in [-1, 1]) of fp32 `x`, whose length is a whole number of blocks
    except at the end; the result is padded with zeros to whole blocks."""
    pad = -x.numel() % blocksize
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    blocks = x.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # the reciprocal times x (not x / absmax): bitsandbytes' kernel rounds this way. A zero block gives
    # 0 * inf = nan, mapped to 0 so that zeros keep the exact code of 0.0.
    scaled = blocks * (1.0 / absmax)[:, None]
    scaled = scaled.nan_to_num_(nan=0.0).clamp_(-1.0, 1.0)
    return absmax, scaled.view(-1)


def _quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Blockwise absmax quantization of fp32 `values` to indices (uint8) into the ascending 256-entry
    `code`. Returns (indices, absmax per block)."""
    absmax, scaled = _blockwise_absmax_and_scaled(values, blocksize)
    idx = _nearest_index(scaled, code).to(torch.uint8).view(-1, blocksize)
    # An all-zero group (every absmax equal to the offset) decodes to the offset whatever its index;
    # bitsandbytes writes index 0 there, and so does this, to keep the bytes identical.
    idx[absmax == 0] = 0
    return idx.view(-1)[: values.numel()], absmax


def quantize_nf4(
    w: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    quant_type: str = "nf4",
) -> NF4Tensor:
    """Quantize `w` (fp32 / fp16 / bf16, any shape, CPU or CUDA) blockwise to 4 bits, in the layout
    bitsandbytes' `quantize_4bit(w, blocksize, compress_statistics=double_quant, quant_type)` produces.

    Works through the flattened weight in chunks, so the extra memory is a few x 16 MiB plus the
    result, whatever the weight's size."""
    if w.dtype not in _DTYPES:
        raise ValueError(
            f"quantize_nf4: weights of dtype {w.dtype} are not supported; use one of {_DTYPES}"
        )
    if blocksize not in BLOCKSIZES:
        raise ValueError(
            f"quantize_nf4: blocksize {blocksize} is not one of {BLOCKSIZES}"
        )
    if quant_type not in QUANT_TYPES:
        raise ValueError(
            f"quantize_nf4: quant_type {quant_type!r} is not one of {QUANT_TYPES}"
        )
    if w.numel() == 0:
        raise ValueError("quantize_nf4: cannot quantize an empty tensor")
    device = w.device
    flat = w.detach().reshape(-1)  # a view when `w` is contiguous
    n = flat.numel()
    code = code_table(quant_type, device)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    packed_flat = packed.view(-1)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)

    # whole blocks per chunk, hence an even number of elements: chunks split no byte
    chunk = max(_CHUNK // blocksize, 1) * blocksize
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        am, scaled = _blockwise_absmax_and_scaled(flat[start:stop].float(), blocksize)
        absmax[start // blocksize : start // blocksize + am.numel()] = am
        count = stop - start
        q = _quantize_4bit_codes(scaled[: count + (count & 1)], quant_type, code).to(
            torch.uint8
        )
        packed_flat[start // 2 : start // 2 + q.numel() // 2] = (q[0::2] << 4) | q[1::2]
        del am, scaled, q

    if not torch.isfinite(absmax).all():
        raise ValueError("quantize_nf4: the weight holds inf or nan values")

    if not double_quant:
        return NF4Tensor(packed, w.shape, w.dtype, absmax, code, blocksize, quant_type)
    offset = absmax.mean()
    nested_code = dynamic_code(device)
    qabsmax, nested_absmax = _quantize_blockwise_8bit(
        absmax - offset, nested_code, NESTED_BLOCKSIZE
    )
    return NF4Tensor(
        packed,
        w.shape,
        w.dtype,
        qabsmax,
        code,
        blocksize,
        quant_type,
        offset=offset.item(),
        nested_absmax=nested_absmax,
        nested_code=nested_code,
    )


# --------------------------------------------------------------------------------------------
# Dequantization: torch reference (the test oracle, and the CPU path)
# --------------------------------------------------------------------------------------------


def _output(
    q: NF4Tensor, dtype: torch.dtype | None, out: torch.Tensor | None
) -> torch.Tensor:
    if dtype is None:
        dtype = out.dtype if out is not None else q.dtype
    if dtype not in _DTYPES:
        raise ValueError(
            f"dequantize_nf4: output dtype {dtype} is not one of {_DTYPES}"
        )
    if out is None:
        return torch.empty(q.shape, dtype=dtype, device=q.device)
    if (
        out.dtype != dtype
        or out.numel() != q.numel
        or not out.is_contiguous()
        or out.device != q.device
    ):
        raise ValueError(
            f"dequantize_nf4: out must be a contiguous {dtype} tensor of {q.numel} elements on {q.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})"
        )
    return out


def dequantize_nf4_reference(
    q: NF4Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """code[index] * absmax in fp32, rounded once to `dtype` (default: the original weight's dtype);
    written into `out` when given. Plain torch, in chunks of the packed bytes."""
    result = _output(q, dtype, out)
    flat_out = result.view(-1)
    absmax = q.absmax_fp32()
    data = q.data.view(-1)
    # every byte value's two codes (high nibble first): one gather per byte instead of shift, mask, stack
    nibbles = torch.arange(256, device=data.device)
    pairs = q.code[torch.stack((nibbles >> 4, nibbles & 15), dim=1)]
    n, bs = q.numel, q.blocksize
    chunk = max(_CHUNK // bs, 1) * bs
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        byte = data[start // 2 : (stop + 1) // 2]
        vals = pairs[byte.long()].view(-1)
        pad = -vals.numel() % bs
        if pad:
            vals = torch.nn.functional.pad(vals, (0, pad))
        blocks = vals.view(-1, bs)
        blocks *= absmax[start // bs : start // bs + blocks.shape[0], None]
        flat_out[start:stop] = vals[: stop - start]
        del vals, blocks
    return result


# --------------------------------------------------------------------------------------------
# Dequantization: Triton kernel (one launch; CUDA, or the interpreter in the CPU tests)
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _dequantize_4bit_kernel(
        Q, CODE, ABSMAX, NESTED_CODE, NESTED_ABSMAX, OUT,
        nbytes, numel, offset,
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        EMULATE_RTNE: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # Each program turns BLOCK packed bytes into 2 * BLOCK outputs.
        pid = tl.program_id(0).to(tl.int64)
        b = pid * BLOCK + tl.arange(0, BLOCK)
        bmask = b < nbytes
        byte = tl.load(Q + b, mask=bmask, other=0).to(tl.int32)
        # Both nibbles of a byte share a quantization block: blocksizes are even.
        blk = (2 * b) // BLOCKSIZE
        if DOUBLE_QUANT:
            qa = tl.load(ABSMAX + blk, mask=bmask, other=0).to(tl.int32)
            nested = tl.load(
                NESTED_ABSMAX + blk // NESTED_BLOCKSIZE, mask=bmask, other=0.0
            )
            # launched with enable_fp_fusion=False: the product is rounded before the offset is
            # added, as in bitsandbytes and the reference
            absmax = tl.load(NESTED_CODE + qa) * nested + offset
        else:
            absmax = tl.load(ABSMAX + blk, mask=bmask, other=0.0)
        hi = tl.load(CODE + (byte >> 4)) * absmax
        lo = tl.load(CODE + (byte & 15)) * absmax
        vals = tl.interleave(hi, lo)  # element 2j is the high nibble of byte j
        vals = rounded(vals, OUT.dtype.element_ty, EMULATE_RTNE)
        e = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(OUT + e, vals.to(OUT.dtype.element_ty), mask=e < numel)


def dequantize_nf4_triton(
    q: NF4Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton launcher: same contract and bits as `dequantize_nf4_reference`."""
    if triton is None:
        raise RuntimeError("dequantize_nf4_triton: Triton is not installed")
    result = _output(q, dtype, out)
    data = q.data.contiguous()
    nbytes = data.numel()
    block = 1024 if not interpreting() else 512
    absmax, nested_code, nested_absmax, offset = q.kernel_statistics()
    launch(_dequantize_4bit_kernel, (triton.cdiv(nbytes, block),),
        data, q.code.contiguous(), absmax, nested_code, nested_absmax,
        result, nbytes, q.numel, offset,
        BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize, DOUBLE_QUANT=q.double_quant,
        EMULATE_RTNE=interpreting(), BLOCK=block, num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return result


def dequantize_nf4(
    q: NF4Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The weight back as `dtype` (default: the original dtype), shaped like it, or written into
    `out` (a contiguous buffer of the same number of elements, reused across calls). The Triton
    kernel runs on CUDA, the torch reference elsewhere; both give the same bits."""
    if dispatch.use_triton(q.data):
        return dequantize_nf4_triton(q, dtype, out)
    return dequantize_nf4_reference(q, dtype, out)


# --------------------------------------------------------------------------------------------
# bitsandbytes serialization
# --------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nf4_to_bnb_state_dict(q: NF4Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors `bnb.nn.Linear4bit` saves for its weight under `prefix` (e.g. "model.layers.0.mlp.
    down_proj."), byte for byte: what transformers + bitsandbytes load as a pre-quantized checkpoint."""
    key = f"{prefix}weight"
    # code tables are copied: weights may share one tensor, and safetensors refuses shared storage
    sd = {key: q.data, f"{key}.absmax": q.absmax, f"{key}.quant_map": q.code.clone()}
    meta = {
        "quant_type": q.quant_type,
        "blocksize": q.blocksize,
        "dtype": _dtype_name(q.dtype),
        "shape": list(q.shape),
    }
    if q.double_quant:
        sd[f"{key}.nested_absmax"] = q.nested_absmax
        sd[f"{key}.nested_quant_map"] = q.nested_code.clone()
        meta.update(
            nested_blocksize=q.nested_blocksize,
            nested_dtype="float32",
            nested_offset=float(q.offset),
        )
    payload = json.dumps(meta).encode("utf-8")
    sd[f"{key}.quant_state.bitsandbytes__{q.quant_type}"] = torch.tensor(
        list(payload), dtype=torch.uint8
    )
    return sd


def is_bnb_4bit(sd: dict[str, torch.Tensor], prefix: str = "") -> bool:
    """Whether `sd` holds a bitsandbytes 4-bit weight under `prefix`."""
    return any(k.startswith(f"{prefix}weight.quant_state.bitsandbytes__") for k in sd)


def nf4_from_bnb_state_dict(
    sd: dict[str, torch.Tensor],
    prefix: str = "",
    device: torch.device | str | None = None,
) -> NF4Tensor:
    """Read the 4-bit weight that `bnb.nn.Linear4bit` saved under `prefix` (as in `*-bnb-4bit`
    checkpoints) without bitsandbytes. Other keys of `sd` (bias, other modules) are ignored; an unknown
    `{prefix}weight.*` key or a missing one raises ValueError."""
    key = f"{prefix}weight"
    parts = {k[len(key) + 1 :]: v for k, v in sd.items() if k.startswith(f"{key}.")}
    state_keys = [k for k in parts if k.startswith("quant_state.")]
    if len(state_keys) != 1:
        raise ValueError(
            f"nf4_from_bnb_state_dict: expected exactly one '{key}.quant_state.bitsandbytes__<type>' tensor, "
            f"found {[f'{key}.{k}' for k in state_keys] or 'none'} (is this a bitsandbytes 4-bit checkpoint?)"
        )
    state_key = state_keys[0]
    quant_type = state_key.removeprefix("quant_state.bitsandbytes__")
    if quant_type not in QUANT_TYPES:
        raise NotImplementedError(
            f"nf4_from_bnb_state_dict: '{key}.{state_key}' names quant type {quant_type!r}; "
            f"only {QUANT_TYPES} are supported"
        )
    unknown = sorted(set(parts) - {state_key, *_BNB_SUFFIXES})
    if unknown:
        raise ValueError(
            f"nf4_from_bnb_state_dict: unknown keys {[f'{key}.{k}' for k in unknown]}"
        )
    try:
        meta = json.loads(
            bytes(parts[state_key].cpu().to(torch.uint8).tolist()).decode("utf-8")
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"nf4_from_bnb_state_dict: '{key}.{state_key}' is not UTF-8 JSON: {e}"
        ) from e
    if meta.get("quant_type", quant_type) != quant_type:
        raise ValueError(
            f"nf4_from_bnb_state_dict: '{key}.{state_key}' holds quant_type {meta['quant_type']!r}"
        )
    for field in ("blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(
                f"nf4_from_bnb_state_dict: '{key}.{state_key}' lacks '{field}'"
            )
    missing = [
        f"{key}{s}"
        for s, present in (("", key in sd), (".absmax", "absmax" in parts))
        if not present
    ]
    nested = "nested_offset" in meta
    if nested:
        missing += [
            f"{key}.{s}"
            for s in ("nested_absmax", "nested_quant_map")
            if s not in parts
        ]
    elif "nested_absmax" in parts or "nested_quant_map" in parts:
        raise ValueError(
            f"nf4_from_bnb_state_dict: '{key}' has nested tensors but its quant_state has no nested_offset"
        )
    if missing:
        raise ValueError(f"nf4_from_bnb_state_dict: missing keys {missing}")

    dtype = {_dtype_name(d): d for d in _DTYPES}.get(meta["dtype"])
    if dtype is None:
        raise ValueError(
            f"nf4_from_bnb_state_dict: unsupported dtype {meta['dtype']!r} in '{key}.{state_key}'"
        )
    data = sd[key]
    if (
        data.dtype != torch.uint8
    ):  # bnb's `quant_storage` option stores the same bytes as another dtype
        data = data.contiguous().view(torch.uint8)
    data = data.reshape(-1, 1)
    default_code = code_table(quant_type)
    code = parts.get("quant_map", default_code).float().cpu()
    if not torch.equal(code, default_code):
        raise ValueError(
            f"nf4_from_bnb_state_dict: '{key}.quant_map' is not the standard {quant_type} code"
        )

    def put(t):
        return t.to(device) if device is not None else t

    kwargs = {}
    if nested:
        if meta.get("nested_dtype", "float32") != "float32":
            raise ValueError(
                f"nf4_from_bnb_state_dict: nested_dtype {meta['nested_dtype']!r} is not float32"
            )
        kwargs = {
            "offset": float(meta["nested_offset"]),
            "nested_absmax": put(parts["nested_absmax"].float()),
            "nested_code": put(parts["nested_quant_map"].float()),
            "nested_blocksize": int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
        }
    return NF4Tensor(
        data=put(data),
        shape=torch.Size(meta["shape"]),
        dtype=dtype,
        absmax=put(parts["absmax"]),
        code=put(code),
        blocksize=int(meta["blocksize"]),
        quant_type=quant_type,
        **kwargs,
    )
