"""What the kernel tests share: where they run, the accuracy rule, and inputs in odd memory layouts.

The rule for low precision: the kernel's error against an fp64 ground truth is no worse than that of
the plain PyTorch reference run in the same dtype. On a CPU the kernels run in Triton's interpreter
(tests/conftest.py turns it on) at small sizes; `pytest -m gpu` runs them at real sizes.
"""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t` in another memory layout (the launchers must read any of them right)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "row_strided":  # a view of a wider buffer: rows strided, columns unit-stride
        buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 17, dtype=t.dtype, device=t.device)
        buf[..., : t.shape[-1]] = t
        return buf[..., : t.shape[-1]]
    if layout == "transposed":  # rows not evenly strided: the launcher must copy
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "col_strided":  # last dim not unit-stride, and a storage offset
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        buf[..., 1::2] = t
        return buf[..., 1::2]
    if layout == "expanded":  # stride-0 rows (e.g. an upstream gradient of a broadcast)
        return t[:1].expand_as(t)
    raise ValueError(layout)


def kernels_runnable(jit_function) -> bool:
    """On a GPU always; on a CPU only in Triton's interpreter (TRITON_INTERPRET=1 before the import)."""
    return torch.cuda.is_available() or type(jit_function).__name__ == "InterpretedFunction"


def kernel_runs(module, name: str) -> bool:
    """Whether `module`'s Triton kernel `name` exists (Triton is installed) and can run here."""
    fn = getattr(module, name, None)
    return fn is not None and kernels_runnable(fn)


def needs_kernel(module, name: str):
    """Skip marker for tests of `module`'s Triton kernel `name` where it cannot run (never on a GPU)."""
    return pytest.mark.skipif(
        not kernel_runs(module, name), reason="Triton kernels need a GPU or TRITON_INTERPRET=1 set before import"
    )


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


def uneven_upstream(shape, dtype, device, layout="contiguous", *, top=2.0, zero_every=5) -> torch.Tensor:
    """Upstream gradients as a loss hands them over: rows scaled over four orders of magnitude (up to
    10**top), every `zero_every`-th row all zero (tokens whose loss is ignored), in `layout`."""
    dy = torch.randn(shape, device=device)
    rows = dy.reshape(-1, shape[-1])
    scales = torch.logspace(top - 4, top, rows.shape[0], device=device)[torch.randperm(rows.shape[0], device=device)]
    rows.mul_(scales[:, None])
    rows[::zero_every] = 0
    return relayout(dy.to(dtype), layout)


def run_with_grads(fn, inputs: dict, wanted: dict, upstream, *args, out: str) -> dict:
    """{out: fn(*inputs, *args)} and "d<name>" for every input whose gradient is wanted (against `upstream`)."""
    leaves = {k: t.detach().requires_grad_(wanted[k]) for k, t in inputs.items()}
    y = fn(*leaves.values(), *args)
    result = {out: y.detach()}
    wrt = [k for k in leaves if wanted[k]]
    if wrt:
        for k, g in zip(wrt, torch.autograd.grad(y, [leaves[k] for k in wrt], upstream)):
            result[f"d{k}"] = g
    return result


def assert_all_no_worse(label: str, got: dict, ref: dict, truth: dict, dtype) -> None:
    """assert_no_worse for every output and gradient `run_with_grads` returned."""
    assert set(got) == set(ref) == set(truth), (label, set(got), set(ref))
    for k, value in got.items():
        assert_no_worse(f"{k} {label}", value, ref[k], truth[k], dtype)


def dispatched(public, function_name: str):
    """`public` (a kernel's public entry point) checked to have picked the Triton kernel's autograd Function
    `function_name` wherever it records a graph: a GPU test through the dispatch must not pass on the
    reference."""

    def call(*args):
        out = public(*args)
        first = out[0] if isinstance(out, tuple) else out
        if first.requires_grad:
            assert type(first.grad_fn).__name__.startswith(function_name), f"dispatch did not pick {function_name}"
        return out

    return call
