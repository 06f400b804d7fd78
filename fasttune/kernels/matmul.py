"""16-bit products kept in fp32: the one place that knows how.

cuBLAS accumulates a bf16/fp16 GEMM in fp32 and can write that accumulator out as fp32 (and add it to
an fp32 `out`), which torch >= 2.8 exposes as `mm` / `addmm` with `out_dtype=torch.float32` on CUDA.
Sums of several products (the fused LoRA's dX over q, k, v and the adapters; the fused loss's dW over
token chunks) then round once, at the end, instead of once per term, at no extra cost beyond the
fp32 output's traffic. Elsewhere (the CPU, an older torch) the operands are upcast instead: exact
for the small CPU test shapes, and never a silent 16-bit accumulation.
"""

from __future__ import annotations

import functools

import torch

_LOW = (torch.bfloat16, torch.float16)


@functools.cache
def fp32_out_supported(device: str) -> bool:
    """Whether mm / addmm write 16-bit products straight into fp32 on `device` (probed once)."""
    if not device.startswith("cuda"):
        return False
    try:
        a = torch.ones(8, 16, device=device, dtype=torch.bfloat16)
        acc = torch.ones(8, 8, device=device, dtype=torch.float32)
        torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
        out = torch.mm(a, a.t(), out_dtype=torch.float32)
        return bool((acc == 17).all()) and bool((out == 16).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool, alpha: float = 1.0) -> None:
    """out (+)= alpha * a @ b, without an out-sized temporary where the GPU can write fp32 directly.
    `out` is fp32 or the operands' dtype."""
    kw = {}
    if out.dtype != a.dtype:
        if a.dtype in _LOW and fp32_out_supported(str(a.device)):
            kw["out_dtype"] = out.dtype
        else:
            a, b = a.to(out.dtype), b.to(out.dtype)
    if accumulate:
        torch.addmm(out, a, b, alpha=alpha, out=out, **kw)
    elif alpha != 1.0:  # beta=0: out's old contents (garbage, NaN) are ignored, alpha scales the fp32 sums
        torch.addmm(out, a, b, beta=0, alpha=alpha, out=out, **kw)
    else:
        torch.mm(a, b, out=out, **kw)


def mm_f32(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """alpha * a @ b as a new fp32 tensor (see mm_into)."""
    out = torch.empty(a.shape[0], b.shape[1], device=a.device, dtype=torch.float32)
    mm_into(out, a, b, accumulate=False, alpha=alpha)
    return out


def fp32_accumulator(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype to sum products of `dtype` operands in: fp32 for 16-bit operands, except on a GPU whose
    torch cannot write 16-bit products as fp32 (there an fp32 sum would cost a copy of every product)."""
    if dtype not in _LOW:
        return dtype
    device = str(device)
    return torch.float32 if not device.startswith("cuda") or fp32_out_supported(device) else dtype
