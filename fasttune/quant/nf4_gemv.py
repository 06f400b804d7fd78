"""A 4-bit GEMV for decode: y = x W^T with W read as packed NF4 codes, never as a dense weight.

For a few rows of x (batch-1 decode, a handful of sequences or draft tokens, M <= MAX_ROWS) and
W stored as an `NF4Tensor` of shape (N, K):

    y[m, n] = sum_k x[m, k] W[n, k],      W[n, k] = code[q(n, k)] * absmax(n, k // blocksize)

Blocks are `blocksize` consecutive elements of the row-major flattened weight; with
K % blocksize == 0 (required here) every block lies inside one row, so the scale comes out of the
block's partial dot product:

    y[m, n] = sum_b absmax(n, b) * sum_{k in block b} code[q(n, k)] x[m, k]

With double quantization the block scale is itself decoded first, in bitsandbytes' order (the
product rounded to fp32 before the offset is added, as `NF4Tensor.absmax_fp32` and the dequantize
kernel do):

    absmax(n, b) = nested_code[absmax_u8[i]] * nested_absmax[i // nested_blocksize] + offset,
    i = n * (K / blocksize) + b

The kernel: each program owns BLOCK_N output rows and walks K in steps of BLOCK_K = 2 * block_kb
weights. A step loads the (BLOCK_N, block_kb) packed bytes (two weights per byte, the even element
in the high nibble), splits the nibbles, looks both codes up in the 16-entry fp32 table, multiplies
by the fp32 x chunk of every row m, sums each quantization block, scales the block sums by the
block absmax and accumulates in fp32. The result is rounded once to the output dtype.

Why this is worth a kernel: decode is bandwidth-bound, and per step the weight is read once.

    bytes read    ~ N*K/2 (codes) + N*K/blocksize (uint8 absmax with double quantization; 4x as many
                    bytes without) + M*K*x.itemsize + small tables;   written: M*N*out.itemsize

For blocksize 64 with double quantization that is ~0.52 bytes per weight. The dequantize-then-matmul
path reads the same 0.52 bytes, writes a 16-bit temporary (2 bytes) and reads it back (2 bytes):
~4.5 bytes per weight, ~8.7x the traffic, in two launches. E.g. Llama-3.2-1B's gate_proj
(8192 x 2048): 8.7 MB instead of 75 MB per decoded token.

The code lookup is a gather from the 16-entry table (64 bytes, resident in L1 after the first touch):
an address computation and one cached load per weight. A `tl.where` chain would cost 15 compares and
selects per weight, more instructions than the multiply-adds themselves; NF4's levels are normal
quantiles, so the exponent/bit tricks that turn int4 into floats do not apply. The table also makes
FP4 weights (quant_type "fp4") work unchanged.

Tuning (one function, `gemv_config`, for sweeps; reasoned for an H100 SXM, not yet measured):
no split-K. The smallest decode projection in the Llama family has N = 512 rows, so with
BLOCK_N >= 1 there are always >= 512 programs (>= 3.9 per SM on 132 SMs): enough parallelism without
the zero-fill, atomics or second reduction pass (and the run-to-run nondeterminism) split-K would
add. See `gemv_config` for the tile sizes.

`nf4_gemv_reference(x, q)` is the oracle: x @ W^T in fp32 with W = q.dequantize(fp32).
`use_nf4_gemv(x, q, bias)` is the dispatch decision `QuantLinear.forward` takes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..kernels import dispatch
from ..kernels._triton_utils import interpreting
from ..kernels.launch import launch
from .nf4 import NF4Tensor

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # the reference still works without Triton
    triton = None

if triton is not None:
    from ..kernels._triton_utils import rounded

__all__ = [
    "MAX_ROWS",
    "GemvConfig",
    "gemv_config",
    "gemv_supported",
    "nf4_gemv",
    "nf4_gemv_reference",
    "use_nf4_gemv",
]

# Rows of x one launch handles. Every row costs its own fp32 multiply-adds on every dequantized
# weight, so past a few rows the kernel stops being bandwidth-bound and a tensor-core matmul over the
# dequantized weight wins.
MAX_ROWS = 8
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Packed bytes one program loads per loop step: 32 bytes (two 16-byte vector loads) per thread at 4
# warps. See gemv_config.
_TILE_BYTES = 4096
_H100_SMS = 132


# --------------------------------------------------------------------------------------------
# Tunables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters: `block_n` output rows per program, `block_kb` packed bytes per row per loop
    step (2 * block_kb weights), both powers of two."""

    block_n: int
    block_kb: int
    num_warps: int = 4
    num_stages: int = 1


def _pow2_divisor(n: int) -> int:
    return n & -n


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return _H100_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemv_config(M: int, N: int, K: int, blocksize: int, device: torch.device | None = None) -> GemvConfig:
    """The launch parameters for an (M, K) x (N, K)^T GEMV; the one place to sweep them.

    Reasoning for an H100 SXM (3.35 TB/s, 132 SMs; not yet measured):

    - Bytes in flight. Each SM must keep ~15-25 KB of loads outstanding to cover HBM latency
      (~14.5 B/cycle/SM x ~1000+ cycles). Without software pipelining (num_stages=1: the loop has no
      dot for Triton's pipeliner to target, and most projections take one to seven steps anyway) that
      comes from occupancy: a program loads a 4 KB tile per step (32 bytes per thread at 4 warps),
      and 4-6 such programs per SM are resident.
    - block_kb: a whole row segment of up to 4 KB per step, the largest power of two that divides K/2,
      so no step is partly masked (K = 2048 -> 1024 bytes, one step per row; 4096 -> 2048; 8192 -> 4096;
      14336 -> 1024, seven steps). Contiguous runs of >= 128 bytes per row (for any K that is a
      multiple of 256) keep every load coalesced.
    - block_n: the rest of the 4 KB tile (K = 2048: 4 rows), halved while that leaves fewer than
      4 programs per SM, down to one row (N = 512: 512 programs). The GEMV is tiny in time
      (a 2 MB weight is ~0.7 us at full bandwidth), so spreading it across every SM matters more
      than per-program efficiency.
    - num_warps: 32 bytes (64 weights) per thread, i.e. tile bytes / 1 KB (1 to 4 warps;
      up to 8 for M > 4, below).
    - M: the weight is dequantized once per step and reused from registers for every row of x, each
      row adding fp32 multiply-adds per weight and its own 64 x values per thread. Above 4 rows the
      same tile is spread over twice the warps (16 bytes per thread) to keep registers from spilling.
    """
    del blocksize  # the tile does not depend on it yet; kept for sweeps
    kb = K // 2
    block_kb = min(_pow2_divisor(kb), _TILE_BYTES)
    if block_kb < 64 < kb:  # an awkward K: wider, partly masked steps beat many tiny ones
        block_kb = min(1 << (kb - 1).bit_length(), _TILE_BYTES)
    block_n = max(1, _TILE_BYTES // block_kb)
    sms = _sm_count(device.index if device is not None and device.type == "cuda" else None)
    while block_n > 1 and -(-N // block_n) < 4 * sms:
        block_n //= 2
    bytes_per_thread = 32 if M <= 4 else 16
    num_warps = max(1, min(8, block_n * block_kb // (32 * bytes_per_thread)))
    return GemvConfig(block_n=block_n, block_kb=block_kb, num_warps=num_warps)


# --------------------------------------------------------------------------------------------
# Reference and dispatch
# --------------------------------------------------------------------------------------------


def _out_dtype(x: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    """What F.linear would return: the autocast dtype where autocast is on for x's device, else x's."""
    if out_dtype is None:
        dev = x.device.type
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
            out_dtype = torch.get_autocast_dtype(dev)
        else:
            out_dtype = x.dtype
    if out_dtype not in _DTYPES:
        raise ValueError(f"nf4_gemv: output dtype {out_dtype} is not one of {_DTYPES}")
    return out_dtype


def nf4_gemv_reference(x: torch.Tensor, q: NF4Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x @ W^T computed in fp32 with W = q.dequantize(fp32), rounded once to `out_dtype` (default: as
    `nf4_gemv`). Any number of rows, any K: the oracle of the kernel and its CPU stand-in."""
    out_dtype = _out_dtype(x, out_dtype)
    w = q.dequantize(torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return (x.float() @ w.t()).to(out_dtype)


def gemv_supported(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `nf4_gemv` can compute y = x W^T (+ bias) here, the device aside: no autograd graph to
    record (the kernel has no backward), at most MAX_ROWS rows, a 2-D weight on x's device whose
    blocks do not straddle rows (K % blocksize == 0), and a floating x the kernel reads."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    if len(q.shape) != 2 or x.dim() < 1 or x.shape[-1] != q.shape[1]:
        return False
    return (
        x.dtype in _DTYPES
        and x.numel() // max(x.shape[-1], 1) <= MAX_ROWS
        and q.shape[1] % q.blocksize == 0
        and x.device == q.device
    )


def use_nf4_gemv(x: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None = None) -> bool:
    """The dispatch decision: a CUDA tensor with Triton available (fasttune.kernels.dispatch), and
    `gemv_supported`."""
    return dispatch.use_triton(x) and gemv_supported(x, q, bias)


# --------------------------------------------------------------------------------------------
# The Triton kernel
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rounded_product(a, b, EXACT: tl.constexpr):
        # a * b rounded to fp32 on its own: with fp fusion on, `a * b + c` would compile to one fused
        # multiply-add (one rounding), unlike bitsandbytes and the reference. The interpreter (numpy)
        # never fuses, and has no libdevice.
        if EXACT:
            return libdevice.mul_rn(a, b)
        else:
            return a * b

    @triton.jit
    def _nf4_gemv_kernel(
        X, Q, CODE, ABSMAX, NESTED_CODE, NESTED_ABSMAX, OUT,
        N, K, stride_xm, stride_om, offset,
        M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr, HB: tl.constexpr,
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        EXACT_PRODUCT: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    ):  # fmt: skip
        # A step covers NB column groups of HB packed bytes (2 * HB weights) per row; HB <= blocksize / 2,
        # so a group lies inside one quantization block and shares one absmax.
        BLOCK_K: tl.constexpr = 2 * NB * HB
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        grp = tl.arange(0, NB)
        byte_col = grp[:, None] * HB + tl.arange(0, HB)[None, :]  # (NB, HB) within the step
        elem_col = grp[:, None] * (2 * HB) + tl.arange(0, 2 * HB)[None, :]  # (NB, 2 HB)
        q_ptr = Q + rows64[:, None, None] * (K // 2) + byte_col[None, :, :]
        blk_row = rows64[:, None] * (K // BLOCKSIZE)  # first block of each row
        m_ids = tl.arange(0, BLOCK_M)
        # per (row of x, output row, column group) sums; reduced over the groups once at the end
        acc = tl.zeros((BLOCK_M, BLOCK_N, NB), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_grp = k0 + grp * (2 * HB)  # first weight of each group
            grp_ok = k_grp < K  # whole groups only: K is a multiple of blocksize, hence of 2 * HB
            ok = row_ok[:, None] & grp_ok[None, :]  # (BLOCK_N, NB)
            # the weight is read once: keep it from evicting x and the tables in L2
            byte = tl.load(q_ptr + k0 // 2, mask=ok[:, :, None], other=0, eviction_policy="evict_first")
            byte = byte.to(tl.int32)
            w = tl.load(CODE + tl.interleave(byte >> 4, byte & 15))  # (BLOCK_N, NB, 2 HB), element order

            blk = blk_row + (k_grp // BLOCKSIZE)[None, :]
            if DOUBLE_QUANT:
                qa = tl.load(ABSMAX + blk, mask=ok, other=0).to(tl.int32)
                nested = tl.load(NESTED_ABSMAX + blk // NESTED_BLOCKSIZE, mask=ok, other=0.0)
                absmax = _rounded_product(tl.load(NESTED_CODE + qa), nested, EXACT_PRODUCT) + offset
                absmax = tl.where(ok, absmax, 0.0)
            else:
                absmax = tl.load(ABSMAX + blk, mask=ok, other=0.0)

            # the dequantized codes stay in registers for all M rows of x
            for m in tl.static_range(M):
                xm = tl.load(X + m * stride_xm + k0 + elem_col, mask=grp_ok[:, None], other=0.0)
                part = tl.sum(w * xm.to(tl.float32)[None, :, :], axis=2) * absmax  # (BLOCK_N, NB)
                if BLOCK_M == 1:
                    acc += part[None, :, :]
                else:
                    acc += tl.where(m_ids[:, None, None] == m, part[None, :, :], 0.0)

        y = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
        y = rounded(y, OUT.dtype.element_ty, EMULATE_RTNE)
        out_ptr = OUT + m_ids[:, None] * stride_om + rows[None, :]
        tl.store(out_ptr, y.to(OUT.dtype.element_ty), mask=(m_ids[:, None] < M) & row_ok[None, :])


def _check_config(cfg: GemvConfig) -> None:
    for name in ("block_n", "block_kb", "num_warps"):
        v = getattr(cfg, name)
        if v < 1 or v & (v - 1):
            raise ValueError(f"nf4_gemv: config {name}={v} must be a power of two")


def nf4_gemv(
    x: torch.Tensor,
    q: NF4Tensor,
    out_dtype: torch.dtype | None = None,
    *,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """y = x @ W^T for x of shape (..., K) with at most MAX_ROWS rows in all and W = `q` (N, K),
    reading the packed 4-bit codes directly. Returns (..., N) in `out_dtype` (default: x's dtype, or
    the autocast dtype where autocast is on, as F.linear). x is read in its own dtype and the sums
    are fp32, rounded once. `config` overrides `gemv_config` (for sweeps).

    Needs K % q.blocksize == 0 (blocks within rows); more rows than MAX_ROWS are a matmul's job:
    dequantize + matmul (`q.dequantize()`, or fasttune.lora.lora_linear). Both raise ValueError."""
    if triton is None:
        raise RuntimeError("nf4_gemv: Triton is not installed")
    if len(q.shape) != 2:
        raise ValueError(f"nf4_gemv: the weight must be 2-D (N, K), got shape {tuple(q.shape)}")
    N, K = q.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"nf4_gemv: x of shape {tuple(x.shape)} does not end in K = {K}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"nf4_gemv: x of dtype {x.dtype} is not one of {_DTYPES}")
    if x.device != q.device:
        raise ValueError(f"nf4_gemv: x is on {x.device}, the weight on {q.device}")
    if K % q.blocksize:
        raise ValueError(
            f"nf4_gemv: K = {K} is not a multiple of the blocksize {q.blocksize} (blocks would straddle "
            "rows); use dequantize + matmul"
        )
    lead = x.shape[:-1]
    M = math.prod(lead)
    if M > MAX_ROWS:
        raise ValueError(
            f"nf4_gemv: {M} rows of x; the GEMV handles at most {MAX_ROWS}, more is a matmul's job: "
            "use dequantize + matmul (q.dequantize(), or fasttune.lora.lora_linear)"
        )
    out = torch.empty((M, N), dtype=_out_dtype(x, out_dtype), device=x.device)
    if M == 0:
        return out.view(*lead, N)
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    cfg = config or gemv_config(M, N, K, q.blocksize, x.device)
    _check_config(cfg)
    hb = min(q.blocksize // 2, cfg.block_kb)
    absmax, nested_code, nested_absmax, offset = q.kernel_statistics()
    launch(_nf4_gemv_kernel, (triton.cdiv(N, cfg.block_n),),
        x2, q.data.contiguous(), q.code.contiguous(), absmax, nested_code, nested_absmax, out, N, K, x2.stride(0), out.stride(0), offset,
        M=M, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=cfg.block_n, NB=cfg.block_kb // hb, HB=hb,
        BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize, DOUBLE_QUANT=q.double_quant,
        EXACT_PRODUCT=not interpreting(), EMULATE_RTNE=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out.view(*lead, N)
