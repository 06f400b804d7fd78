"""SwiGLU / GeGLU kernels against their reference: forward, dgate and dup, fp32 / bf16 (fp16 on the GPU),
under the accuracy rule of kernel_rules.py."""

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

from fasttune.kernels.activations import (
    SUPPORTED_ACTIVATIONS,
    GLUFunction,
    glu_activation,
    glu_activation_reference,
)

act = importlib.import_module("fasttune.kernels.activations")


pytestmark = needs_kernel(act, "_glu_fwd_kernel")

# one name per kernel code; the aliases are checked separately
KINDS = ["silu", "gelu", "gelu_pytorch_tanh"]
DTYPES = [torch.float32, torch.bfloat16]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _layouts(g: torch.Tensor, u: torch.Tensor, layout: str):
    """The same values in another memory layout; "fused": both halves of one gate_up projection (row-strided
    views of one buffer, no copy)."""
    if layout == "fused":
        gu = torch.cat([g, u], dim=-1)
        n = g.shape[-1]
        return gu[..., :n], gu[..., n:]
    return relayout(g, layout), relayout(u, layout)


def _inputs(shape, dtype, device, layout="contiguous", up_dtype=None):
    g = torch.randn(shape, device=device) * 2.5
    g.view(-1)[:: max(1, g.numel() // 50)] = 30.0  # saturated tails: sigmoid -> 1, tanh -> 1
    g.view(-1)[1 :: max(1, g.numel() // 50)] = -30.0
    u = torch.randn(shape, device=device)
    return _layouts(g.to(dtype), u.to(up_dtype or dtype), layout)


def check_glu(shape, dtype, kind, device=DEVICE, layout="contiguous", dh_layout="contiguous", up_dtype=None,
              want_g=True, want_u=True, fn=GLUFunction.apply):
    g, u = _inputs(shape, dtype, device, layout, up_dtype)
    dh = uneven_upstream(shape, torch.promote_types(g.dtype, u.dtype), device, dh_layout)
    wanted = {"g": want_g, "u": want_u}

    def run(f, g, u, dh):
        return run_with_grads(f, {"g": g, "u": u}, wanted, dh, kind, out="h")

    truth = run(glu_activation_reference, g.double(), u.double(), dh.double())
    assert_all_no_worse(f"{tuple(shape)} {dtype} {kind} {layout}", run(fn, g, u, dh),
                        run(glu_activation_reference, g, u, dh), truth, dtype)


# --------------------------------------------------------------------------------------------
# CPU (interpreter) or GPU at small sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["contiguous", "fused", "transposed", "col_strided"])
def test_glu_odd_shape(dtype, kind, layout):
    check_glu((5, 123, 123), dtype, kind, layout=layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dh_layout", ["transposed", "expanded"])
def test_glu_noncontiguous_upstream_grad(dtype, dh_layout):
    check_glu((4, 9, 80), dtype, "silu", dh_layout=dh_layout)


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (2, 1500), (7, 2, 257)])
def test_glu_edge_shapes(shape):
    check_glu(shape, torch.float32, "gelu")
    check_glu(shape, torch.bfloat16, "silu")


@pytest.mark.parametrize("want_g,want_u", [(True, False), (False, True)], ids=["dgate_only", "dup_only"])
def test_glu_partial_grads(want_g, want_u):
    check_glu((3, 21, 100), torch.bfloat16, "gelu_pytorch_tanh", want_g=want_g, want_u=want_u)


def test_glu_mixed_dtypes():
    # bf16 gate with an fp32 up: the product promotes to fp32 as the reference's does
    check_glu((3, 17, 96), torch.bfloat16, "silu", up_dtype=torch.float32)


@pytest.mark.parametrize("alias,base", [("swish", "silu"), ("gelu_new", "gelu_pytorch_tanh"), ("gelu_fast", "gelu_pytorch_tanh")])
def test_glu_aliases(alias, base):
    g, u = _inputs((3, 40), torch.float32, DEVICE)
    torch.testing.assert_close(GLUFunction.apply(g, u, alias), GLUFunction.apply(g, u, base), rtol=0, atol=0)
    check_glu((3, 40), torch.bfloat16, alias)


def test_glu_saves_only_gate_and_up():
    g, u = _inputs((4, 33, 64), torch.bfloat16, DEVICE)
    g.requires_grad_()
    u.requires_grad_()
    h = GLUFunction.apply(g, u, "silu")
    saved = h.grad_fn.saved_tensors
    assert len(saved) == 2
    assert saved[0].data_ptr() == g.data_ptr() and saved[1].data_ptr() == u.data_ptr()


def test_glu_empty_input():
    g = torch.empty(0, 7, device=DEVICE, requires_grad=True)
    u = torch.empty(0, 7, device=DEVICE, requires_grad=True)
    h = GLUFunction.apply(g, u, "silu")
    h.sum().backward()
    assert h.shape == g.shape and g.grad.shape == g.shape and u.grad.shape == u.shape


def test_glu_unknown_kind_raises():
    g = torch.randn(2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="relu"):
        glu_activation(g, g, "relu")
    with pytest.raises(ValueError, match="relu"):
        GLUFunction.apply(g, g, "relu")


def test_glu_dispatch_off_cuda_is_reference():
    g, u = _inputs((2, 5, 32), torch.bfloat16, "cpu")
    for kind in sorted(SUPPORTED_ACTIVATIONS):
        torch.testing.assert_close(glu_activation(g, u, kind), glu_activation_reference(g, u, kind), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# GPU at real sizes, through the public dispatch
# --------------------------------------------------------------------------------------------



_public = dispatched(glu_activation, "GLUFunction")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,kind",
    [
        ((2, 2048, 14336), "silu"),  # Llama-3-8B intermediate
        ((2, 2048, 9216), "gelu_pytorch_tanh"),  # Gemma-2-2B intermediate
        ((2, 2048, 9216), "gelu"),
        ((3, 1001, 5003), "silu"),  # odd everything
    ],
    ids=["llama8b-swiglu", "gemma2-2b-geglu-tanh", "geglu-erf", "odd"],
)
def test_gpu_glu_real_sizes(dtype, shape, kind):
    check_glu(shape, dtype, kind, device="cuda", fn=_public)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["fused", "transposed", "col_strided"])
def test_gpu_glu_noncontiguous(dtype, layout):
    check_glu((4, 1024, 14336), dtype, "silu", device="cuda", layout=layout, dh_layout="expanded", fn=_public)


@pytest.mark.gpu
def test_gpu_glu_partial_grads_and_mixed():
    check_glu((2, 2048, 14336), torch.bfloat16, "silu", device="cuda", want_u=False, fn=_public)
    check_glu((2, 2048, 14336), torch.bfloat16, "gelu", device="cuda", want_g=False, fn=_public)
    check_glu((2, 1024, 9216), torch.bfloat16, "gelu_pytorch_tanh", device="cuda", up_dtype=torch.float32, fn=_public)


@pytest.mark.gpu
def test_gpu_glu_inference_no_grad():
    g, u = _inputs((1, 7, 14336), torch.bfloat16, "cuda")
    with torch.no_grad():
        h = glu_activation(g, u, "silu")
    truth = glu_activation_reference(g.double(), u.double(), "silu")
    assert_no_worse("no_grad h", h, glu_activation_reference(g, u, "silu"), truth, torch.bfloat16)


@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_pytorch_tanh"])
def test_written_out_backward_matches_autograd_of_the_reference(kind):
    from fasttune.kernels.activations import glu_backward_reference

    g = (torch.randn(5, 123, dtype=torch.float64) * 3).requires_grad_()
    u = torch.randn(5, 123, dtype=torch.float64).requires_grad_()
    dh = torch.randn(5, 123, dtype=torch.float64)
    glu_activation_reference(g, u, kind).backward(dh)
    dg, du = glu_backward_reference(dh, g.detach(), u.detach(), kind)
    # fp32 inside: agreement to fp32 precision
    torch.testing.assert_close(dg, g.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(du, u.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_glu_backward_with_h_in_place(dtype, kind):
    """The fused LoRA MLP's recompute backward: one pass writes dgate over gate, dup over up and the
    forward's h over dh. Same values as the separate launches, every element written."""
    g, u = _inputs((5, 123), dtype, DEVICE)
    dh = torch.randn(5, 123, device=DEVICE).to(dtype)
    want_dg, want_du = act.glu_backward(dh, g, u, kind)
    want_h = act.glu_forward(g, u, kind)[0]
    gi, ui, dhi = g.clone(), u.clone(), dh.clone()
    dg, du, h = act.glu_backward(dhi, gi, ui, kind, out=(gi, ui, dhi), with_h=True)
    assert (dg.data_ptr(), du.data_ptr(), h.data_ptr()) == (gi.data_ptr(), ui.data_ptr(), dhi.data_ptr())
    for got, want in ((dg, want_dg), (du, want_du), (h, want_h)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # out of place, new buffers: the inputs are untouched
    g0, u0, dh0 = g.clone(), u.clone(), dh.clone()
    dg, du, h = act.glu_backward(dh, g, u, kind, with_h=True)
    torch.testing.assert_close(h, want_h, rtol=0, atol=0)
    assert torch.equal(g, g0) and torch.equal(u, u0) and torch.equal(dh, dh0)
    # against the reference's math
    ref = act.glu_backward_reference
    truth = ref(dh.double(), g.double(), u.double(), kind)
    for name, got, cheap, exact in zip(("dg", "du"), (dg, du), ref(dh, g, u, kind), truth):
        assert_no_worse(name, got, cheap, exact, dtype)
    torch.testing.assert_close(h, glu_activation_reference(g, u, kind), **_tol(dtype))


def _tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}


def test_glu_backward_rejects_an_h_buffer_of_another_dtype():
    g, u = _inputs((2, 16), torch.bfloat16, DEVICE)
    with pytest.raises(ValueError, match="h buffer"):
        act.glu_backward(g, g, u, "silu", out=(None, None, torch.empty(2, 16, device=DEVICE)), with_h=True)
