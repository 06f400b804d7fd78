"""The accuracy rule the kernel tests share, and when their kernels can run at all."""

from __future__ import annotations

import torch


def kernels_runnable(jit_function) -> bool:
    """On a GPU always; on a CPU only in Triton's interpreter (TRITON_INTERPRET=1 before the import)."""
    return torch.cuda.is_available() or type(jit_function).__name__ == "InterpretedFunction"


def max_err(a: torch.Tensor, truth: torch.Tensor) -> float:
    return (a.double() - truth).abs().max().item()


def assert_no_worse(name, kernel, ref, truth, dtype):
    """Low precision: the kernel's error against the fp64 truth is no worse than the plain PyTorch
    reference's in the same dtype (1.5x, plus a slack relative to the values' scale)."""
    assert kernel.shape == ref.shape, (name, kernel.shape, ref.shape)
    assert kernel.dtype == ref.dtype, (name, kernel.dtype, ref.dtype)
    assert torch.isfinite(kernel).all(), name
    k, r = max_err(kernel, truth), max_err(ref, truth)
    scale = truth.abs().max().item()
    slack = (1e-5 if dtype == torch.float32 else 1e-3) * scale + 1e-6
    assert k <= 1.5 * r + slack, f"{name}: kernel err {k:.3g} vs reference err {r:.3g} (scale {scale:.3g})"
