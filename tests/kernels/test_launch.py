"""fasttune.kernels.launch: the low-host-time launch runs the kernel Triton would have run, with the
same arguments, and leaves everything it does not mirror (the interpreter, a new specialization,
launch hooks) to Triton's own launch."""

from __future__ import annotations

import pytest
import torch
from kernel_rules import DEVICE

from fasttune.kernels import launch as launch_mod
from fasttune.kernels._triton_utils import interpreting, triton
from fasttune.kernels.rms_norm import rms_norm_forward, rms_norm_reference
from fasttune.quant.nf4 import dequantize_nf4_reference, dequantize_nf4_triton, quantize_nf4

needs_triton = pytest.mark.skipif(triton is None, reason="Triton is not installed")
on_gpu = pytest.mark.gpu


def _counts():
    return dict(launch_mod.stats)


@needs_triton
@pytest.mark.skipif(not interpreting(), reason="the interpreter's launches (CPU runs)")
def test_the_interpreter_always_takes_tritons_own_launch():
    w = torch.randn(8, 64)
    q = quantize_nf4(w)
    before = _counts()
    for _ in range(2):
        got = dequantize_nf4_triton(q, torch.float32)
    assert torch.equal(got, dequantize_nf4_reference(q, torch.float32))
    assert launch_mod.stats["fast"] == before["fast"]
    assert launch_mod.stats["slow"] == before["slow"] + 2


@on_gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_launches_give_tritons_bits(dtype):
    q = quantize_nf4(torch.randn(1024, 512, device=DEVICE))
    want = dequantize_nf4_reference(q, dtype)
    outs = []
    before = _counts()
    for _ in range(3):
        outs.append(dequantize_nf4_triton(q, dtype))
    torch.cuda.synchronize()
    for out in outs:
        assert torch.equal(out, want)
    # the first launch of this specialization may compile (Triton's path); the rest are fast
    assert launch_mod.stats["fast"] - before["fast"] >= 2


@on_gpu
@needs_triton
def test_a_new_specialization_goes_through_triton_and_is_right():
    """The same kernel on rows that are not 16-byte aligned and with one row (Triton specializes both
    pointers' alignment and integers equal to 1): each first meeting is Triton's own launch, with a
    kernel compiled for it, and the results match the reference."""
    launch_mod._compiled.clear()  # every specialization below is new to the fast path
    n = 256
    w = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
    aligned = torch.randn(4, n, device=DEVICE, dtype=torch.bfloat16)
    rms_norm_forward(aligned, w, 1e-6)
    rms_norm_forward(aligned, w, 1e-6)  # compiled by now
    base = torch.randn(4 * n + 1, device=DEVICE, dtype=torch.bfloat16)
    shifted = base[1:].view(4, n)  # data pointer 2 bytes past a 16-byte boundary
    assert shifted.data_ptr() % 16
    one_row = torch.randn(1, n, device=DEVICE, dtype=torch.bfloat16)
    for x in (shifted, one_row):
        before = _counts()
        y = rms_norm_forward(x, w, 1e-6)[0]
        assert launch_mod.stats["slow"] == before["slow"] + 1, "a new specialization must take Triton's launch"
        torch.testing.assert_close(y.float(), rms_norm_reference(x, w, 1e-6).float(), atol=2e-2, rtol=2e-2)
        before = _counts()
        y2 = rms_norm_forward(x, w, 1e-6)[0]
        assert launch_mod.stats["fast"] == before["fast"] + 1
        assert torch.equal(y, y2)


@on_gpu
@needs_triton
def test_launch_hooks_are_left_to_triton():
    from triton import knobs

    hook = knobs.runtime.launch_enter_hook
    if not hasattr(hook, "add"):
        pytest.skip(f"this Triton's launch hook is not a HookChain ({type(hook).__name__})")
    q = quantize_nf4(torch.randn(256, 256, device=DEVICE))
    dequantize_nf4_triton(q, torch.bfloat16)
    seen = []

    def record(metadata):
        seen.append(metadata)

    hook.add(record)
    try:
        before = _counts()
        out = dequantize_nf4_triton(q, torch.bfloat16)
    finally:
        hook.remove(record)
    assert len(seen) == 1 and launch_mod.stats["slow"] == before["slow"] + 1
    assert torch.equal(out, dequantize_nf4_reference(q, torch.bfloat16))
