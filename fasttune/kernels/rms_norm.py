"""RMSNorm, optionally fused with the residual add that precedes it.

Forward, per row x of length N (statistics always in fp32):

    r = 1 / sqrt(mean(x^2) + eps)              (saved, one fp32 per row)
    n = x * r
    y = w * cast(n, x.dtype)                   Llama (offset = 0): the order transformers uses, so the
                                               result matches bit for bit; y has the promoted dtype of
                                               w and x
    y = cast(n * (offset + w), x.dtype)        Gemma (offset = 1): the whole product in fp32

Backward, with w' = w (Llama) or offset + w (Gemma) and g = dy * w':

    dx = r * (g - n * mean(g * n))             (the row's mean over N)
    dw = sum over rows of dy * n               (n rounded to x.dtype first on the Llama path, as the
                                               reference's product sees it)

dW is only computed when the weight is trainable (full fine-tuning); each program of the backward
kernel walks a strided set of row tiles, accumulates its share of dW in fp32 registers and writes one
partial row, and the partials are summed afterwards.

Fused residual add (pre-norm decoder layers):

    s = x + residual                           (rounded to the dtype of the sum, as in PyTorch)
    returns (rms_norm(s), s)
    ds = dy-path of rms_norm + d(s)            and dx = dresidual = ds.
"""

from __future__ import annotations

import functools

import torch

from . import dispatch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works without Triton
    triton = None

from ._triton_utils import interpreting
from .launch import launch

if triton is not None:
    from ._triton_utils import rounded

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# One row is held in registers; wider rows (no real model has one) go to the reference.
MAX_FUSED_N = 65536


# --------------------------------------------------------------------------------------------
# Reference (the tests' oracle and the benchmark baseline)
# --------------------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (offset + weight.float())).to(dtype)
    return weight * normed.to(dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    return rms_norm_reference(s, weight, eps, offset), s


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(
        X, R, S, Y, W, RSTD,
        stride_x, stride_r, stride_s, stride_y,
        M, N, eps, offset,
        HAS_RESIDUAL: tl.constexpr, GEMMA: tl.constexpr, EMULATE_RTNE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_mask = rows < M
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]

        # Loads are widened to fp32 at once: the interpreter's raw bf16 arithmetic is wrong.
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            res = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            # The sum is rounded to its storage dtype before the statistics, as the unfused x + residual is.
            x = rounded(x + res, S.dtype.element_ty, EMULATE_RTNE)
            tl.store(S + rows64 * stride_s + cols[None, :], x.to(S.dtype.element_ty), mask=mask)

        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        tl.store(RSTD + rows, rstd, mask=row_mask)
        n = x * rstd[:, None]
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        if GEMMA:
            y = n * (offset + w[None, :])
        else:
            # S is the normalised input's storage (X itself without a residual): n is rounded to its dtype.
            y = rounded(n, S.dtype.element_ty, EMULATE_RTNE) * w[None, :]
        y = rounded(y, Y.dtype.element_ty, EMULATE_RTNE)
        tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY, X, W, RSTD, DRES, DX, DW_PARTIAL,
        stride_dy, stride_x, stride_dres, stride_dx,
        M, N, offset, num_tiles,
        GEMMA: tl.constexpr, HAS_DY: tl.constexpr, HAS_DRES: tl.constexpr,
        COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, EMULATE_RTNE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < N
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        if GEMMA:
            w = w + offset
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)

        for tile in range(pid, num_tiles, tl.num_programs(0)):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < M
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows.to(tl.int64)[:, None]
            if HAS_DY:
                dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
                n = x * rstd[:, None]
                if COMPUTE_DW:
                    if GEMMA:
                        dw_acc += tl.sum(dy * n, axis=0)
                    else:
                        dw_acc += tl.sum(dy * rounded(n, X.dtype.element_ty, EMULATE_RTNE), axis=0)
                if COMPUTE_DX:
                    g = dy * w[None, :]
                    c = tl.sum(g * n, axis=1) / N
                    dx = (g - n * c[:, None]) * rstd[:, None]
                    if HAS_DRES:
                        dx += tl.load(DRES + rows64 * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                    dx = rounded(dx, DX.dtype.element_ty, EMULATE_RTNE)
                    tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            else:
                # Only the residual output received a gradient: it passes straight through.
                dx = tl.load(DRES + rows64 * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                dx = rounded(dx, DX.dtype.element_ty, EMULATE_RTNE)
                tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

        if COMPUTE_DW:
            tl.store(DW_PARTIAL + pid * N + cols, dw_acc, mask=col_mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """A 2-D (rows, n) view with unit column stride; copies only when no such view exists."""
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _config(m: int, n: int) -> tuple[int, int, int]:
    block_n = triton.next_power_of_2(n)
    # Narrow rows (q/k norms over head_dim) are batched several to a program.
    block_m = max(1, min(4096 // block_n, triton.next_power_of_2(max(m, 1)), 64))
    num_warps = min(16, max(2, block_m * block_n // 512))
    return block_m, block_n, num_warps


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_programs(num_tiles: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        return max(1, min(num_tiles, 2 * sms))  # each program sums dW over its tiles (measured best: 2 per SM)
    return max(1, min(num_tiles, 4))  # the interpreter: few programs, each looping


def rms_norm_forward(x, weight, eps, offset=0.0, residual=None):
    """Launch the forward kernel. Returns (y, s, x_rows, rstd): y shaped like x, s the summed residual
    (None without one), x_rows the 2-D input the statistics were taken over (s when fused)."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} does not match hidden size {n}")
    x2 = _rows(x, n)
    m = x2.shape[0]
    gemma = bool(offset)
    y_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    y2 = y.view(-1, n)
    weight = weight.contiguous()
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} and x {tuple(x.shape)} differ in shape")
        r2 = _rows(residual, n)
        s = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        s2 = s.view(-1, n)
    else:
        r2, s, s2 = x2, None, x2
    if m == 0:
        return y, s, s2, rstd
    block_m, block_n, num_warps = _config(m, n)
    launch(_rms_norm_fwd_kernel, (triton.cdiv(m, block_m),),
        x2, r2, s2, y2, weight, rstd,
        x2.stride(0), r2.stride(0), s2.stride(0), y2.stride(0),
        m, n, float(eps), float(offset),
        HAS_RESIDUAL=residual is not None, GEMMA=gemma, EMULATE_RTNE=interpreting(),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y, s, s2, rstd


def rms_norm_backward(dy, x2, weight, rstd, offset=0.0, dres=None, dx_dtype=None, need_dx=True, need_dw=False):
    """Launch the backward kernel over the saved 2-D input `x2`. `dy` or `dres` may be None.
    Returns (dx shaped (rows, n) or None, dw or None)."""
    m, n = x2.shape
    dy2 = _rows(dy, n) if dy is not None else None
    dres2 = _rows(dres, n) if dres is not None else None
    need_dw = need_dw and dy is not None
    dx = torch.empty((m, n), dtype=dx_dtype or x2.dtype, device=x2.device) if need_dx else None
    if m == 0 or (not need_dx and not need_dw):
        dw = torch.zeros_like(weight) if need_dw else None
        return dx, dw
    block_m, block_n, num_warps = _config(m, n)
    if need_dw and block_m == 1 and m > 1:
        # With dW, two rows per tile halve the partial-sum work per row (H100, scripts/kernel_sweep.py:
        # 0.105 -> 0.088 ms at 8192 x 4096, 77% of copy bandwidth).
        block_m, num_warps = 2, min(16, max(2, block_n // 512))
    num_tiles = triton.cdiv(m, block_m)
    programs = _num_programs(num_tiles, x2.device) if need_dw else num_tiles
    partial = torch.empty((programs, n), dtype=torch.float32, device=x2.device) if need_dw else rstd
    any2 = dy2 if dy2 is not None else dres2
    launch(_rms_norm_bwd_kernel, (programs,),
        any2, x2, weight.contiguous(), rstd,
        dres2 if dres2 is not None else any2, dx if dx is not None else any2, partial,
        any2.stride(0), x2.stride(0), (dres2 if dres2 is not None else any2).stride(0), n,
        m, n, float(offset), num_tiles,
        GEMMA=bool(offset), HAS_DY=dy2 is not None, HAS_DRES=dres2 is not None,
        COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, EMULATE_RTNE=interpreting(),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    dw = partial.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset=0.0):
        y, _, x2, rstd = rms_norm_forward(x, weight, eps, offset)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = offset
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(
            dy, x2, weight, rstd, ctx.offset, dx_dtype=ctx.x_dtype,
            need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1],
        )
        return (dx.view(ctx.x_shape) if dx is not None else None), dw, None, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, offset=0.0):
        y, s, s2, rstd = rms_norm_forward(x, weight, eps, offset, residual=residual)
        ctx.save_for_backward(s2, weight, rstd)
        ctx.offset = offset
        ctx.shape, ctx.x_dtype, ctx.r_dtype = x.shape, x.dtype, residual.dtype
        ctx.set_materialize_grads(False)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        s2, weight, rstd = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if dy is None and ds is None:
            return None, None, None, None, None
        dsum, dw = rms_norm_backward(
            dy, s2, weight, rstd, ctx.offset, dres=ds, dx_dtype=s2.dtype,
            need_dx=need_dx, need_dw=ctx.needs_input_grad[2],
        )
        dx = dres = None
        if dsum is not None:
            dsum = dsum.view(ctx.shape)
            dx = dsum.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
            dres = dsum.to(ctx.r_dtype) if ctx.needs_input_grad[1] else None
        return dx, dres, dw, None, None


# --------------------------------------------------------------------------------------------
# Public entry points (the dispatch of DESIGN.md)
# --------------------------------------------------------------------------------------------


def _kernel_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        dispatch.use_triton(x)
        and x.dtype in _SUPPORTED_DTYPES
        and weight.dtype in _SUPPORTED_DTYPES
        and weight.device == x.device
        and weight.dim() == 1
        and 0 < x.shape[-1] <= MAX_FUSED_N
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    if _kernel_ok(x, weight):
        return RMSNormFunction.apply(x, weight, eps, offset)
    return rms_norm_reference(x, weight, eps, offset)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass over memory."""
    if _kernel_ok(x, weight) and residual.shape == x.shape and residual.dtype in _SUPPORTED_DTYPES:
        return AddRMSNormFunction.apply(x, residual, weight, eps, offset)
    return add_rms_norm_reference(x, residual, weight, eps, offset)
