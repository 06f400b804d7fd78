"""Gated activations of the feed-forward block.

    h = act(g) * u                        g = gate, u = up (same shape), computed in fp32

with act = SiLU (SwiGLU: Llama, Mistral, Qwen) or GELU, exact or tanh-approximated (GeGLU: Gemma).
act(g) is rounded to g's dtype before the product, as the unfused reference rounds it.

Backward recomputes act(g) from the saved g and u (nothing else is stored):

    du = dh * act(g)
    dg = dh * u * act'(g)

    SiLU:        s = sigmoid(g),  act = g s,  act' = s (1 + g (1 - s))
    GELU (erf):  act = g Phi(g),  act' = Phi(g) + g phi(g),
                 Phi(g) = (1 + erf(g / sqrt 2)) / 2,  phi(g) = exp(-g^2 / 2) / sqrt(2 pi)
    GELU (tanh): t = tanh(k (g + c g^3)),  k = sqrt(2 / pi),  c = 0.044715
                 act = g (1 + t) / 2,  act' = (1 + t) / 2 + g (1 - t^2) k (1 + 3 c g^2) / 2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
}

SUPPORTED_ACTIVATIONS = frozenset(_ACTIVATIONS)

# The kernel's activation codes.
_SILU, _GELU_ERF, _GELU_TANH = 0, 1, 2
_KIND_CODE = {
    "silu": _SILU,
    "swish": _SILU,
    "gelu": _GELU_ERF,
    "gelu_pytorch_tanh": _GELU_TANH,
    "gelu_new": _GELU_TANH,
    "gelu_fast": _GELU_TANH,
}
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def glu_activation_reference(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    return _ACTIVATIONS[kind](gate) * up


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_C = 0.044715


def glu_backward_reference(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kind: str):
    """(d gate, d up) of h = act(gate) * up, written out (the math of the backward kernel) in fp32 with one
    rounding per output, for callers that hold gate and up rather than an autograd graph of them."""
    g = gate.float()
    code = _KIND_CODE[kind]
    if code == _SILU:
        sig = torch.sigmoid(g)
        a = g * sig
        da = sig * (1.0 + g * (1.0 - sig))
    elif code == _GELU_ERF:
        cdf = 0.5 * (1.0 + torch.erf(g * _SQRT_HALF))
        a = g * cdf
        da = cdf + g * _INV_SQRT_2PI * torch.exp(-0.5 * g * g)
    else:
        t = torch.tanh(_SQRT_2_OVER_PI * (g + _GELU_C * g * g * g))
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * _GELU_C * g * g)
    dhf = dh.float()
    return (dhf * up.float() * da).to(gate.dtype), (dhf * a).to(up.dtype)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _tanh_and_sech2(z):
        # tanh and 1 - tanh^2 through exp(-2|z|) (portable across Triton versions and the interpreter):
        # no overflow, and 1 - tanh^2 keeps its precision where tanh saturates.
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(z < 0, -t, t)
        return t, 4.0 * e / ((1.0 + e) * (1.0 + e))

    @triton.jit
    def _act(g, KIND: tl.constexpr):
        if KIND == 0:
            a = g * tl.sigmoid(g)
        elif KIND == 1:
            a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        else:
            t, _ = _tanh_and_sech2(0.7978845608028654 * (g + 0.044715 * g * g * g))
            a = 0.5 * g * (1.0 + t)
        return a

    @triton.jit
    def _act_and_grad(g, KIND: tl.constexpr):
        if KIND == 0:
            s = tl.sigmoid(g)
            a = g * s
            da = s * (1.0 + g * (1.0 - s))
        elif KIND == 1:
            cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
            a = g * cdf
            da = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
        else:
            t, sech2 = _tanh_and_sech2(0.7978845608028654 * (g + 0.044715 * g * g * g))
            a = 0.5 * g * (1.0 + t)
            da = 0.5 * (1.0 + t) + 0.5 * g * sech2 * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        return a, da

    @triton.jit
    def _glu_fwd_kernel(
        G, U, H, stride_g, stride_u, stride_h, M, N,
        KIND: tl.constexpr, EMULATE_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        # Loads are widened to fp32 at once: the interpreter's raw bf16 arithmetic is wrong.
        g = tl.load(G + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a = rounded(_act(g, KIND), G.dtype.element_ty, EMULATE_RTNE)
        h = rounded(a * u, H.dtype.element_ty, EMULATE_RTNE)
        tl.store(H + rows64 * stride_h + cols[None, :], h.to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd_kernel(
        DH, G, U, DG, DU, H, stride_dh, stride_g, stride_u, stride_dg, stride_du, stride_h, M, N,
        KIND: tl.constexpr, COMPUTE_DG: tl.constexpr, COMPUTE_DU: tl.constexpr, STORE_H: tl.constexpr,
        EMULATE_RTNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        # Every load comes before the first store: the outputs may overwrite the inputs (in place).
        dh = tl.load(DH + rows64 * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if COMPUTE_DG or STORE_H:
            u = tl.load(U + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, KIND)
        if COMPUTE_DU:
            du = rounded(dh * a, DU.dtype.element_ty, EMULATE_RTNE)
            tl.store(DU + rows64 * stride_du + cols[None, :], du.to(DU.dtype.element_ty), mask=mask)
        if COMPUTE_DG:
            dg = rounded(dh * u * da, DG.dtype.element_ty, EMULATE_RTNE)
            tl.store(DG + rows64 * stride_dg + cols[None, :], dg.to(DG.dtype.element_ty), mask=mask)
        if STORE_H:  # the forward's h again, rounded as the forward rounds it
            h = rounded(rounded(a, G.dtype.element_ty, EMULATE_RTNE) * u, H.dtype.element_ty, EMULATE_RTNE)
            tl.store(H + rows64 * stride_h + cols[None, :], h.to(H.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """A 2-D (rows, n) view with unit column stride; copies only when no such view exists
    (a gate/up pair sliced out of one fused projection stays a view)."""
    t2 = t.reshape(-1, n)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _config(m: int, n: int) -> tuple[int, int, int]:
    block_n = min(1024, triton.next_power_of_2(n))
    block_m = max(1, min(4096 // block_n, triton.next_power_of_2(max(m, 1))))
    return block_m, block_n, 8 if block_m * block_n >= 4096 else 4


def _check(gate: torch.Tensor, up: torch.Tensor, kind: str) -> None:
    if kind not in _KIND_CODE:
        raise ValueError(
            f"glu_activation: activation {kind!r} is not supported; use one of {sorted(SUPPORTED_ACTIVATIONS)}"
        )
    if gate.shape != up.shape:
        raise ValueError(f"glu_activation: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")


def glu_forward(gate: torch.Tensor, up: torch.Tensor, kind: str):
    """Launch the forward kernel. Returns (h shaped like gate, gate_rows, up_rows)."""
    _check(gate, up, kind)
    n = gate.shape[-1] if gate.dim() else 1
    g2, u2 = _rows(gate, n), _rows(up, n)
    h = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    h2 = h.view(-1, n)
    m = g2.shape[0]
    if m and n:
        block_m, block_n, num_warps = _config(m, n)
        launch(_glu_fwd_kernel, (triton.cdiv(m, block_m), triton.cdiv(n, block_n)),
            g2, u2, h2, g2.stride(0), u2.stride(0), h2.stride(0), m, n,
            KIND=_KIND_CODE[kind], EMULATE_RTNE=interpreting(),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return h, g2, u2


def glu_backward(dh: torch.Tensor, g2: torch.Tensor, u2: torch.Tensor, kind: str, need_dg=True, need_du=True,
                 *, out=None, with_h: bool = False):
    """Launch the backward kernel over the saved 2-D gate/up. Returns (dgate, dup) as (rows, n) or None,
    and with `with_h` also h = act(gate) * up as the forward computed it (one pass instead of two).

    `out` = (dg, du, h) buffers to write into, any of them None for a new one: they may be the inputs
    themselves (dg over g2, du over u2, h over dh), since every element is read before it is written."""
    m, n = g2.shape
    dh2 = _rows(dh, n)
    out_dg, out_du, out_h = out if out is not None else (None, None, None)

    def buffer(given, like, wanted):
        if not wanted:
            return None
        return given if given is not None else torch.empty((m, n), dtype=like.dtype, device=like.device)

    dg, du = buffer(out_dg, g2, need_dg), buffer(out_du, u2, need_du)
    h = buffer(out_h, g2, with_h)
    if h is not None and h.dtype != torch.promote_types(g2.dtype, u2.dtype):
        raise ValueError(f"glu_backward: h buffer is {h.dtype}, the forward's h is "
                         f"{torch.promote_types(g2.dtype, u2.dtype)}")
    if m and n and (need_dg or need_du or with_h):
        block_m, block_n, num_warps = _config(m, n)
        dg_, du_, h_ = (t if t is not None else dh2 for t in (dg, du, h))
        launch(_glu_bwd_kernel, (triton.cdiv(m, block_m), triton.cdiv(n, block_n)),
            dh2, g2, u2, dg_, du_, h_,
            dh2.stride(0), g2.stride(0), u2.stride(0), dg_.stride(0), du_.stride(0), h_.stride(0), m, n,
            KIND=_KIND_CODE[kind], COMPUTE_DG=need_dg, COMPUTE_DU=need_du, STORE_H=with_h,
            EMULATE_RTNE=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return (dg, du, h) if with_h else (dg, du)


class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, kind):
        h, g2, u2 = glu_forward(gate, up, kind)
        ctx.save_for_backward(g2, u2)
        ctx.kind = kind
        ctx.shape = gate.shape
        return h

    @staticmethod
    def backward(ctx, dh):
        g2, u2 = ctx.saved_tensors
        dg, du = glu_backward(dh, g2, u2, ctx.kind, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (
            dg.view(ctx.shape) if dg is not None else None,
            du.view(ctx.shape) if du is not None else None,
            None,
        )


def glu_activation(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    if kind not in _KIND_CODE:
        _check(gate, up, kind)
    if (
        dispatch.use_triton(gate)
        and gate.shape == up.shape
        and gate.device == up.device
        and gate.dim() > 0
        and gate.dtype in _SUPPORTED_DTYPES
        and up.dtype in _SUPPORTED_DTYPES
    ):
        return GLUFunction.apply(gate, up, kind)
    return glu_activation_reference(gate, up, kind)
