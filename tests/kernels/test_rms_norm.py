"""RMSNorm kernels against their reference: forward, dX and dW, fp32 / bf16 (fp16 on the GPU), under the
accuracy rule of kernel_rules.py."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_rules import (
    DEVICE,
    GPU_DTYPES,
    assert_all_no_worse,
    assert_no_worse,
    dispatched,
    needs_kernel,
    relayout,
    run_with_grads,
    uneven_upstream,
)

from fasttune.kernels.rms_norm import (
    AddRMSNormFunction,
    RMSNormFunction,
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)

# the package exports a function of the same name, so the module is fetched by its path
rn = importlib.import_module("fasttune.kernels.rms_norm")
EPS = 1e-6


pytestmark = needs_kernel(rn, "_rms_norm_fwd_kernel")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _truth(x, w, eps, offset):
    """Exact math in fp64 (no intermediate rounding)."""
    x = x.double()
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return n * (offset + w.double())


def _upstream(shape, dtype, device, layout="contiguous"):
    """fp16's range is kept clear of the all-zero input row, whose dx = dy * w / sqrt(eps) would overflow
    with a large dy in the reference and the kernel alike."""
    return uneven_upstream(shape, dtype, device, layout, top=-1.0 if dtype == torch.float16 else 2.0, zero_every=7)


def _inputs(shape, dtype, offset, device, layout="contiguous", w_dtype=None):
    x = torch.randn(shape, device=device) * 3 + 0.5
    x.reshape(-1, shape[-1])[3 % x.reshape(-1, shape[-1]).shape[0]] = 0  # an all-zero row: rstd = eps**-0.5
    x = relayout(x.to(dtype), layout)
    base = 0.0 if offset else 1.0
    w = (base + 0.2 * torch.randn(shape[-1], device=device)).to(w_dtype or dtype)
    return x, w


def check_rms(shape, dtype, offset, device=DEVICE, layout="contiguous", dy_layout="contiguous", w_dtype=None,
              want_x=True, want_w=True, fn=RMSNormFunction.apply):
    x, w = _inputs(shape, dtype, offset, device, layout, w_dtype)
    y_dtype = x.dtype if offset else torch.promote_types(x.dtype, w.dtype)
    dy = _upstream(shape, y_dtype, device, dy_layout)
    wanted = {"x": want_x, "w": want_w}

    def run(f, x, w, dy):
        return run_with_grads(f, {"x": x, "w": w}, wanted, dy, EPS, offset, out="y")

    got = run(fn, x, w, dy)
    ref = run(rms_norm_reference, x, w, dy)
    assert_all_no_worse(f"{tuple(shape)} {dtype} offset={offset} {layout}", got, ref,
                        run(_truth, x.double(), w.double(), dy.double()), dtype)
    if dtype == torch.float32 and w.dtype == torch.float32:
        torch.testing.assert_close(got["y"], ref["y"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# CPU (interpreter) or GPU at small sizes
# --------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "transposed", "col_strided"])
def test_rms_norm_odd_shape(dtype, offset, layout):
    check_rms((5, 123, 123), dtype, offset, layout=layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dy_layout", ["transposed", "col_strided", "expanded"])
def test_rms_norm_noncontiguous_upstream_grad(dtype, dy_layout):
    check_rms((4, 9, 80), dtype, 0.0, dy_layout=dy_layout)


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rms_norm_qk_norm_shape(offset):
    # q/k norms: (batch, seq, heads, head_dim) viewed out of a projection, many narrow rows per program
    check_rms((2, 11, 6, 64), torch.bfloat16, offset)


@pytest.mark.parametrize("shape", [(1, 3), (3, 2), (2, 1000), (7, 2, 257)])
def test_rms_norm_edge_shapes(shape):
    check_rms(shape, torch.float32, 0.0)
    check_rms(shape, torch.bfloat16, 1.0)


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rms_norm_mixed_weight_dtype(offset):
    # bf16 activations with an fp32 weight: Llama's product promotes to fp32, Gemma's returns bf16
    check_rms((3, 17, 96), torch.bfloat16, offset, w_dtype=torch.float32)


@pytest.mark.parametrize("want_x,want_w", [(True, False), (False, True)], ids=["dx_only", "dw_only"])
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rms_norm_dw_on_off(want_x, want_w, offset):
    check_rms((3, 21, 100), torch.bfloat16, offset, want_x=want_x, want_w=want_w)


def test_rms_norm_frozen_weight_skips_dw():
    x, w = _inputs((4, 33, 64), torch.float32, 0.0, DEVICE)
    x.requires_grad_()
    y = RMSNormFunction.apply(x, w, EPS, 0.0)
    y.sum().backward()
    assert x.grad is not None and w.grad is None


def test_rms_norm_empty_input():
    x = torch.empty(0, 5, 64, device=DEVICE, requires_grad=True)
    w = torch.ones(64, device=DEVICE, requires_grad=True)
    y = RMSNormFunction.apply(x, w, EPS, 0.0)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_rms_norm_weight_shape_mismatch_raises():
    with pytest.raises(ValueError, match="hidden size"):
        RMSNormFunction.apply(torch.randn(2, 8, device=DEVICE), torch.ones(7, device=DEVICE), EPS, 0.0)


def test_rms_norm_dispatch_off_cuda_is_reference():
    x, w = _inputs((2, 5, 32), torch.bfloat16, 0.0, "cpu")
    torch.testing.assert_close(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS), rtol=0, atol=0)


# --- fused residual add ---------------------------------------------------------------------


def _truth_add(x, r, w, eps, offset):
    s = x.double() + r.double()
    return _truth(s, w, eps, offset), s


def _run_add(fn, x, r, w, dy, ds, offset):
    x, r, w = (t.detach().requires_grad_() for t in (x, r, w))
    y, s = fn(x, r, w, EPS, offset)
    outs, gouts = zip(*[(o, g) for o, g in ((y, dy), (s, ds)) if g is not None])
    dx, dr, dw = torch.autograd.grad(outs, (x, r, w), gouts, allow_unused=True)
    dw = torch.zeros_like(w) if dw is None else dw
    return {"y": y.detach(), "s": s.detach(), "dx": dx, "dr": dr, "dw": dw}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("grads", ["both", "normed_only", "residual_only"])
def test_add_rms_norm(dtype, offset, grads):
    shape = (3, 41, 123)
    x, w = _inputs(shape, dtype, offset, DEVICE, "row_strided")
    r = relayout(torch.randn(shape, device=DEVICE).to(dtype), "transposed")
    dy = _upstream(shape, dtype, DEVICE) if grads != "residual_only" else None
    ds = _upstream(shape, dtype, DEVICE, "col_strided") if grads != "normed_only" else None
    got = _run_add(AddRMSNormFunction.apply, x, r, w, dy, ds, offset)
    ref = _run_add(add_rms_norm_reference, x, r, w, dy, ds, offset)
    dbl = lambda t: None if t is None else t.double()
    truth = _run_add(_truth_add, x.double(), r.double(), w.double(), dbl(dy), dbl(ds), offset)
    for k in got:
        assert_no_worse(f"add {k} {dtype} offset={offset} {grads}", got[k], ref[k], truth[k], dtype)


def test_add_rms_norm_dispatch_off_cuda_is_reference():
    x, w = _inputs((2, 5, 32), torch.float32, 1.0, "cpu")
    r = torch.randn_like(x)
    for a, b in zip(add_rms_norm(x, r, w, EPS, 1.0), add_rms_norm_reference(x, r, w, EPS, 1.0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# GPU at real sizes, through the public dispatch
# --------------------------------------------------------------------------------------------



_public = dispatched(rms_norm, "RMSNormFunction")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,offset",
    [
        ((4, 2048, 4096), 0.0),  # Llama-3-8B hidden
        ((4, 2048, 2304), 1.0),  # Gemma-2-2B hidden
        ((2, 1024, 32, 128), 0.0),  # Qwen3 q-norm over head_dim
        ((2, 4096, 256), 1.0),  # Gemma-3 q/k-norm head_dim 256
        ((1, 8192, 8192), 0.0),  # Llama-70B hidden, long sequence
    ],
    ids=["llama8b", "gemma2-2b", "qk-norm128", "qk-norm256-gemma", "llama70b"],
)
def test_gpu_rms_norm_real_sizes(dtype, shape, offset):
    check_rms(shape, dtype, offset, device="cuda", fn=_public)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["row_strided", "transposed", "col_strided"])
def test_gpu_rms_norm_noncontiguous(dtype, layout):
    check_rms((5, 123, 4096), dtype, 0.0, device="cuda", layout=layout, dy_layout="expanded", fn=_public)


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_gpu_rms_norm_dw_off_and_mixed(offset):
    check_rms((2, 2048, 4096), torch.bfloat16, offset, device="cuda", want_w=False, fn=_public)
    check_rms((2, 2048, 4096), torch.bfloat16, offset, device="cuda", w_dtype=torch.float32, fn=_public)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_gpu_add_rms_norm_real_sizes(dtype, offset):
    shape = (4, 2048, 4096)
    x, w = _inputs(shape, dtype, offset, "cuda")
    r = torch.randn(shape, device="cuda").to(dtype)
    dy, ds = _upstream(shape, dtype, "cuda"), _upstream(shape, dtype, "cuda")

    got = _run_add(dispatched(add_rms_norm, "AddRMSNormFunction"), x, r, w, dy, ds, offset)
    ref = _run_add(add_rms_norm_reference, x, r, w, dy, ds, offset)
    truth = _run_add(_truth_add, x.double(), r.double(), w.double(), dy.double(), ds.double(), offset)
    for k in got:
        assert_no_worse(f"add {k} {dtype} offset={offset}", got[k], ref[k], truth[k], dtype)


@pytest.mark.gpu
def test_gpu_rms_norm_inference_no_grad():
    x, w = _inputs((1, 7, 4096), torch.bfloat16, 0.0, "cuda")
    with torch.no_grad():
        y = rms_norm(x, w, EPS)
    assert_no_worse("no_grad y", y, rms_norm_reference(x, w, EPS), _truth(x, w, EPS, 0.0), torch.bfloat16)
