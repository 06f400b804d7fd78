"""Fused LoRA projections over frozen base weights (dense or quantized), with hand-written backward.

One projection, W frozen (out, in), adapter A (r, in), B (out, r), scaling s, no dropout, no bias:

    y  = x W^T + s (x A^T) B^T

    dx = dy W + s (dy B) A
    dB = s dy^T (x A^T)
    dA = s (dy B)^T x                     W gets no gradient.

Saved for backward: x and the (N, r) term x A^T. W is never saved as an activation: a dense W is a
frozen parameter that outlives the step, and a quantized W is dequantized again in backward (the
dense copy lives only inside one matmul). A and B are small and are saved as they are.

Order of the products. The rank-r term s (x A^T) B^T is written first and the base GEMM adds onto it in
its epilogue (beta = 1): the (N, out) output is written once and read once inside a compute-bound GEMM,
instead of being read and rewritten by a memory-bound rank-r product afterwards, and the sum rounds once.
The backward's dx the same way. Projections of one input take x A^T from one GEMM over their adapters
stacked, and their dx's rank-r terms from one GEMM over [s dy_1 B_1 | s dy_2 B_2 | ...] and the stacked A.

`lora_qkv` runs three projections of one input (q, k, v) as one autograd node: x is saved once and
dx accumulates the three contributions in one buffer.

`lora_mlp` is the whole gated feed-forward block as one node:

    g = proj_gate(x),  u = proj_up(x),  h = act(g) * u,  out = proj_down(h)

Saved: x, g, u and the small x A_gate^T, x A_up^T, h A_down^T. Backward recomputes h from g and u
(never stored) and runs the activation's backward (fasttune.kernels.activations: the Triton kernel
on CUDA, the same fp32 math in PyTorch elsewhere):

    du = dh * act(g),   dg = dh * u * act'(g)

Dtypes. The compute dtype is x's dtype, or the autocast dtype when autocast is on for x's device.
x, W (dequantized to that dtype) and A, B (PEFT keeps adapters in fp32) are cast to it for the
matmuls, as autocast would cast them for F.linear (the adapters once per node: the backward uses the
forward's casts, saved); the output is in the compute dtype. dx comes back in x's own dtype, dA and dB
in the adapters' own dtype. The r-sized gradient products dA and dB are written in fp32 straight from
the matmul's accumulator where the backend can (CUDA), and the scaling is applied in fp32 after the
product, so it adds no rounding.

`output=False` (lora_o, lora_mlp) is for a recompute under checkpointing, when the result only feeds a
residual add and nobody reads its value: the last projection's base matmul (and its dequantization) is
skipped and the returned tensor holds zeros, while the backward is exactly the normal one (it never needs
the output). For Llama-8B that is a third of the recompute's GEMM work (o_proj and down_proj). lora_mlp's
recompute also leaves out the activation and h A_down^T: its backward's activation pass writes h anyway.

The base weight is a Tensor, or any object with `.shape` (out, in) and `.dequantize(dtype=None)`
returning the dense (out, in) Tensor (see `is_quant_weight`). An object that also has
`.linear(x2, dtype, fallback=False)` may compute the forward's base term x W^T with a kernel of its own
(FP8 weights: a scaled fp8 matmul; NF4: the decode GEMV), returning None where it has none; the
backward's dx still goes through `.dequantize`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from ..kernels import activations as _act
from ..kernels import dispatch
from ..kernels.matmul import fp32_accumulator, mm_f32, mm_into

__all__ = [
    "MLP_ACTIVATIONS",
    "LoRAProjection",
    "dense_weight",
    "is_quant_weight",
    "lora_linear",
    "lora_mlp",
    "lora_o",
    "lora_qkv",
]


class LoRAProjection(NamedTuple):
    """(weight, A, B, scaling) of one projection; A and B are None for a plain frozen linear."""

    weight: Any
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    scaling: float = 1.0


# --------------------------------------------------------------------------------------------
# Base weights: a Tensor or the quantized-weight protocol
# --------------------------------------------------------------------------------------------


def is_quant_weight(obj) -> bool:
    """The quantized-weight protocol: not a Tensor, has `.shape` and a callable `.dequantize`.
    (torch.Tensor has its own `dequantize`, so Tensors are excluded first.)"""
    return (
        not isinstance(obj, torch.Tensor)
        and callable(getattr(obj, "dequantize", None))
        and hasattr(obj, "shape")
    )


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) base weight as a dense Tensor of `dtype` (no copy for a dense weight already in it)."""
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype)
    w = weight.dequantize(dtype=dtype)
    return w if w.dtype == dtype else w.to(dtype)


def _weight_shape(weight) -> tuple[int, int]:
    shape = tuple(weight.shape)
    if len(shape) != 2:
        raise ValueError(
            f"fused LoRA: base weight must be 2-D (out, in), got shape {shape}"
        )
    return shape


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What F.linear would compute in: the autocast dtype when autocast is on, else x's."""
    dev = x.device.type
    if dev in ("cuda", "cpu", "xpu", "mps") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _phantom(x2: torch.Tensor, out_features: int, dtype) -> torch.Tensor:
    """Stands for an (N, out) result whose value nobody reads (`output=False`): zeros, no memory."""
    return torch.zeros((), dtype=dtype, device=x2.device).expand(x2.shape[0], out_features)


def _in_dtype(projs, dtype):
    """The projections with their adapters in `dtype`, and the A's stacked: (projs, stack or None). The A's
    are cast once, as one stack, and each projection's A is a row block of it; x A^T and dx's rank-r terms
    take the stack whole. The backward gets the same casts (saved), not new ones."""
    As = [p[1] for p in projs if p[1] is not None]
    if not As:
        return list(projs), None
    stack = (As[0] if len(As) == 1 else torch.cat(As)).to(dtype)
    Bs = [p[2].to(dtype) for p in projs if p[2] is not None]
    return _with_stack(projs, _ranks(projs), stack, Bs), stack


def _ranks(projs) -> list:
    return [None if p[1] is None else p[1].shape[0] for p in projs]


def _with_stack(projs, ranks, stack, Bs) -> list:
    """(weight, A, B, scaling) of each of `projs` (whose own A and B are not read) with A its row block of
    `stack` and B the next of `Bs`, where `ranks` gives it an adapter."""
    out, row, Bs = [], 0, iter(Bs)
    for (w, _, _, s), r in zip(projs, ranks):
        if r is None:
            out.append((w, None, None, s))
        else:
            out.append((w, stack[row : row + r], next(Bs), s))
            row += r
    return out


def _adapter_inputs(x2, projs, stack) -> list:
    """x A^T of each projection (None where it has no adapter) from one GEMM over the stacked A's (x is read
    once): column views of one (N, sum of ranks) product."""
    if stack is None:
        return [None] * len(projs)
    xa = torch.mm(x2, stack.t())
    views, col = [], 0
    for p in projs:
        r = 0 if p[1] is None else p[1].shape[0]
        views.append(None if p[1] is None else xa[:, col : col + r])
        col += r
    return views


def _proj_forward(x2, proj, dtype, xa, output: bool = True) -> torch.Tensor:
    """y = x W^T + s (x A^T) B^T for 2-D x in `dtype`, xa = x A^T (None without an adapter). With
    `output=False` y is a phantom (zeros): nothing is computed."""
    weight, A, B, s = proj
    if not output:
        return _phantom(x2, weight.shape[0], dtype)
    own = None
    if not isinstance(weight, torch.Tensor) and callable(getattr(weight, "linear", None)):
        own = weight.linear(x2, dtype, fallback=False)  # the format's own kernel (FP8's scaled matmul)
    if own is not None:
        if A is not None:
            own.addmm_(xa, B.to(dtype).t(), alpha=s)
        return own
    w = dense_weight(weight, dtype)  # a quantized W is dequantized into a temporary, freed on return
    if A is None:
        return torch.mm(x2, w.t())
    # The rank-r term first, written once; the base GEMM then adds onto it in its epilogue (beta = 1):
    # the sum rounds once, and no (N, out) result is read back and rewritten for the small product.
    y = torch.empty(x2.shape[0], w.shape[0], device=x2.device, dtype=dtype)
    mm_into(y, xa, B.to(dtype).t(), accumulate=False, alpha=s)
    return y.addmm_(x2, w.t())


def _scaled_dyB(dy, proj, dtype, wanted: bool) -> torch.Tensor | None:
    """s dy B (N, r) in `dtype`, the scaling applied to the fp32 sums; None without an adapter or when not
    `wanted`. It feeds both dx (times A) and dA."""
    _, A, B, s = proj
    if A is None or not wanted:
        return None
    out = torch.empty(dy.shape[0], B.shape[1], device=dy.device, dtype=dtype)
    mm_into(out, dy, B.to(dtype), accumulate=False, alpha=s)
    return out


def _input_grad(dys, dyBs, projs, stack, dtype, acc_dtype) -> torch.Tensor:
    """dx = sum_i dy_i W_i + (s_i dy_i B_i) A_i over projections of one input, in `acc_dtype` (fp32 where
    several terms meet: kernels.matmul). The rank-r terms go first, as one GEMM over the stacked A's, and
    write dx; each base GEMM then adds onto it in its epilogue (W dequantized again, freed after)."""
    dx = torch.empty(dys[0].shape[0], projs[0][0].shape[1], device=dys[0].device, dtype=acc_dtype)
    if stack is not None:
        terms = [t for t in dyBs if t is not None]
        mm_into(dx, terms[0] if len(terms) == 1 else torch.cat(terms, dim=1), stack, accumulate=False)
    for i, (dy, proj) in enumerate(zip(dys, projs)):
        mm_into(dx, dy, dense_weight(proj[0], dtype), accumulate=stack is not None or i > 0)
    return dx


def _adapter_grads(dy, dyB, inp, inp_a, s, dtypes, need_A: bool, need_B: bool):
    """(dA, dB) = ((s dy B)^T inp, s dy^T (inp A^T)) in `dtypes` (the adapters' own), from fp32 products;
    dyB carries s already (_scaled_dyB), dB gets it on the fp32 sums."""
    dA = mm_f32(dyB.t(), inp).to(dtypes[0]) if need_A else None
    dB = mm_f32(dy.t(), inp_a, alpha=s).to(dtypes[1]) if need_B else None
    return dA, dB


def _adapter_dtypes(projs) -> list:
    return [None if p[1] is None else (p[1].dtype, p[2].dtype) for p in projs]


def _check_projection(name: str, proj, in_features: int):
    """Validate a (weight, A, B, scaling) tuple. Returns ((W, A, B, s), out_features)."""
    if not isinstance(proj, (tuple, list)) or len(proj) != 4:
        raise TypeError(
            f"fused LoRA: {name} must be a (weight, A, B, scaling) tuple, "
            f"got {type(proj).__name__}"
        )
    weight, A, B, s = proj
    if not isinstance(weight, torch.Tensor) and not is_quant_weight(weight):
        raise TypeError(
            f"fused LoRA: {name} weight must be a Tensor or an object with .shape and "
            f".dequantize(dtype), got {type(weight).__name__}"
        )
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError(
            f"fused LoRA: {name} base weight requires grad, but the fused functions "
            "treat base weights as frozen and give them no gradient; call the module's "
            "own forward instead (lora_projection() returns None for such a module)"
        )
    out_f, in_f = _weight_shape(weight)
    if in_f != in_features:
        raise ValueError(
            f"fused LoRA: {name} weight is ({out_f}, {in_f}) but the input has "
            f"{in_features} features"
        )
    if (A is None) != (B is None):
        raise ValueError(f"fused LoRA: {name} needs both A and B, or neither")
    if A is not None:
        r = A.shape[0]
        if A.dim() != 2 or tuple(A.shape) != (r, in_f) or tuple(B.shape) != (out_f, r):
            raise ValueError(
                f"fused LoRA: {name} adapter shapes A {tuple(A.shape)}, "
                f"B {tuple(B.shape)} do not fit W ({out_f}, {in_f}); "
                f"expected A (r, {in_f}) and B ({out_f}, r)"
            )
    return (weight, A, B, 1.0 if s is None else float(s)), out_f


def _split(flat) -> list[tuple]:
    return [tuple(flat[i : i + 4]) for i in range(0, len(flat), 4)]


def _needs(ctx, first: int, n: int) -> list[tuple[bool, bool]]:
    """(A needs grad, B needs grad) of the n projections flattened from argument `first`."""
    g = ctx.needs_input_grad
    return [(g[first + 4 * i + 1], g[first + 4 * i + 2]) for i in range(n)]


# --------------------------------------------------------------------------------------------
# Projections of one shared input: lora_linear / lora_o (one), lora_qkv (three)
# --------------------------------------------------------------------------------------------


class _SharedInputProjections(torch.autograd.Function):
    """n projections of one input x; `flat` holds (weight, A, B, scaling) n times."""

    @staticmethod
    def forward(ctx, x, dtype, output, *flat):
        projs = _split(flat)
        needs = _needs(ctx, 3, len(projs))
        lead = x.shape[:-1]
        ctx.grad_dtypes, ctx.ranks = _adapter_dtypes(projs), _ranks(projs)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            projs, stack = _in_dtype(projs, dtype)
            xas = _adapter_inputs(x2, projs, stack)
            outs = [_proj_forward(x2, p, dtype, xa, output) for p, xa in zip(projs, xas)]
            outs = [y.view(*lead, y.shape[-1]) for y in outs]
        # x feeds only dA, and x A^T only dB: save what the wanted gradients need.
        ctx.save_for_backward(
            x2 if any(nA for nA, _ in needs) else None,
            *[xa if nB else None for xa, (_, nB) in zip(xas, needs)],
            stack,
            *[p[2] for p in projs if p[2] is not None],
        )
        # Base weights ride on ctx, not through save_for_backward: they are frozen
        # parameters (or quantized objects) that outlive the step, and saved-tensor hooks
        # (offloading, checkpointing) must not copy or park them as activations.
        ctx.projs = [(p[0], None, None, p[3]) for p in projs]
        ctx.dtype, ctx.x_shape, ctx.x_dtype = dtype, x.shape, x.dtype
        return tuple(outs)

    @staticmethod
    @once_differentiable  # the backward is hand-written: no double backward
    def backward(ctx, *dys):
        n, dtype = len(dys), ctx.dtype
        x2, *rest = ctx.saved_tensors
        xas, stack, Bs = rest[:n], rest[n], rest[n + 1 :]
        need_dx = ctx.needs_input_grad[0]
        needs = _needs(ctx, 3, n)
        projs = _with_stack(ctx.projs, ctx.ranks, stack, Bs)
        grads = []
        with torch.autocast(dys[0].device.type, enabled=False):
            dys = [d.reshape(-1, d.shape[-1]).to(dtype) for d in dys]
            dyBs = [_scaled_dyB(dy, p, dtype, need_dx or nA) for dy, p, (nA, _) in zip(dys, projs, needs)]
            dx = None
            if need_dx:
                acc = fp32_accumulator(dtype, dys[0].device) if n > 1 else dtype
                dx = _input_grad(dys, dyBs, projs, stack, dtype, acc).view(ctx.x_shape).to(ctx.x_dtype)
            for dy, dyB, xa, p, dt, (nA, nB) in zip(dys, dyBs, xas, projs, ctx.grad_dtypes, needs):
                grads += [None, *_adapter_grads(dy, dyB, x2, xa, p[3], dt, nA, nB), None]
        return (dx, None, None, *grads)


def _shared_input(x: torch.Tensor, named_projs, output: bool = True) -> tuple[torch.Tensor, ...]:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError("fused LoRA: x must be a Tensor with a feature dimension")
    flat = []
    for name, proj in named_projs:
        flat += _check_projection(name, proj, x.shape[-1])[0]
    return _SharedInputProjections.apply(x, _compute_dtype(x), bool(output), *flat)


def lora_linear(
    x: torch.Tensor,
    weight,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """y = x W^T + scaling (x A^T) B^T over a frozen base weight (Tensor or quantized
    object). A = B = None: the plain frozen linear x W^T (backward re-dequantizes too)."""
    return _shared_input(x, [("weight", (weight, A, B, scaling))])[0]


def lora_o(x: torch.Tensor, o, output: bool = True) -> torch.Tensor:
    """The attention output projection; `o` is a (weight, A, B, scaling) tuple. `output=False`: a
    recompute that reads only the gradients (module docstring)."""
    return _shared_input(x, [("o", o)], output)[0]


def lora_qkv(
    x: torch.Tensor, q, k, v
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, K, V): three LoRA projections of one x, each a (weight, A, B, scaling) tuple.
    One autograd node: x is saved once and dx accumulates in one buffer."""
    return _shared_input(x, [("q", q), ("k", k), ("v", v)])


# --------------------------------------------------------------------------------------------
# The gated MLP
# --------------------------------------------------------------------------------------------

# The activation names lora_mlp accepts -> the name fasttune.kernels.activations uses.
MLP_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "gelu_pytorch_tanh": "gelu_pytorch_tanh",
    "gelu_new": "gelu_pytorch_tanh",
    "gelu_fast": "gelu_pytorch_tanh",
}


def _use_glu_kernel(g2: torch.Tensor) -> bool:
    return (
        dispatch.use_triton(g2)
        and g2.dtype in _act._SUPPORTED_DTYPES
        and g2.numel() > 0
    )


def _glu_forward(g2: torch.Tensor, u2: torch.Tensor, kind: str) -> torch.Tensor:
    if _use_glu_kernel(g2):
        return _act.glu_forward(g2, u2, kind)[0]
    return _act.glu_activation_reference(g2, u2, kind)


def _glu_backward(dh: torch.Tensor, g2: torch.Tensor, u2: torch.Tensor, kind: str, in_place: bool):
    """(dgate, dup, h) of h = act(g) * u, h as the forward computed it, in one pass: the Triton kernel on
    CUDA, elsewhere the same math in PyTorch. h is written over dh (a private buffer of the caller's), and
    with `in_place` dgate and dup over g2 and u2 (their last reader is this pass)."""
    out = (g2, u2, dh) if in_place else (None, None, dh)
    if _use_glu_kernel(g2):
        return _act.glu_backward(dh, g2, u2, kind, out=out, with_h=True)
    dg, du = _act.glu_backward_reference(dh, g2, u2, kind)
    h = _act.glu_activation_reference(g2, u2, kind)
    return tuple(o.copy_(t) if o is not None else t for o, t in zip(out, (dg, du, h)))


_MLP_FLAT = 6  # _LoRAMLP.forward's arguments before `flat`


class _LoRAMLP(torch.autograd.Function):
    """flat = gate, up, down as (weight, A, B, scaling) each."""

    @staticmethod
    def forward(ctx, x, dtype, kind, output, up_value, up_sink, *flat):
        gate, up, down = _split(flat)
        (nA_g, _), (nA_u, _), _ = _needs(ctx, _MLP_FLAT, 3)
        lead = x.shape[:-1]
        ctx.grad_dtypes, ctx.ranks = _adapter_dtypes((gate, up, down)), _ranks((gate, up, down))
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            (gate, up), stack_gu = _in_dtype((gate, up), dtype)  # gate's and up's A's: one stack
            (down,), stack_d = _in_dtype((down,), dtype)
            xa_g, xa_u = _adapter_inputs(x2, (gate, up), stack_gu)
            g2 = _proj_forward(x2, gate, dtype, xa_g)
            if up_value is None:
                u2 = _proj_forward(x2, up, dtype, xa_u)
            else:  # the forward's value, kept: up's matmuls are skipped (x A_up^T, for dB_up, is above)
                u2 = up_value.reshape(g2.shape).to(dtype)
            if up_sink is not None:
                up_sink(u2)
            if output:
                h = _glu_forward(g2, u2, kind)
                (ha_d,) = _adapter_inputs(h, (down,), stack_d)
                out = _proj_forward(h, down, dtype, ha_d)
                del h  # recomputed in backward from g and u
            else:  # a recompute: the backward's GLU pass writes h anyway, and h A_down^T is taken there
                ha_d, out = None, _phantom(x2, down[0].shape[0], dtype)
        ctx.save_for_backward(
            x2 if (nA_g or nA_u) else None, g2, u2, xa_g, xa_u, ha_d, stack_gu, stack_d,
            *[p[2] for p in (gate, up, down) if p[2] is not None],
        )
        # Frozen / quantized base weights ride on ctx (see _SharedInputProjections).
        ctx.projs = [(p[0], None, None, p[3]) for p in (gate, up, down)]
        ctx.kind, ctx.dtype, ctx.x_shape, ctx.x_dtype = kind, dtype, x.shape, x.dtype
        # A checkpoint's recompute (output=False) builds this node for one backward and drops it: its
        # saved g and u have no other reader, so that backward may overwrite them (never under
        # retain_graph, which only a graph of the user's own, output=True, can have).
        ctx.private_saved = not output
        return out.view(*lead, out.shape[-1])

    @staticmethod
    @once_differentiable  # the backward is hand-written: no double backward
    def backward(ctx, dout):
        x2, g2, u2, xa_g, xa_u, ha_d, stack_gu, stack_d, *Bs = ctx.saved_tensors
        n_gu = sum(r is not None for r in ctx.ranks[:2])
        gate, up = _with_stack(ctx.projs[:2], ctx.ranks[:2], stack_gu, Bs[:n_gu])
        (down,) = _with_stack(ctx.projs[2:], ctx.ranks[2:], stack_d, Bs[n_gu:])
        dt_g, dt_u, dt_d = ctx.grad_dtypes
        (nA_g, nB_g), (nA_u, nB_u), (nA_d, nB_d) = _needs(ctx, _MLP_FLAT, 3)
        need_dx = ctx.needs_input_grad[0]
        need_dh = need_dx or nA_g or nB_g or nA_u or nB_u  # all upstream of down
        dtype, kind = ctx.dtype, ctx.kind
        dx = dAg = dBg = dAu = dBu = None
        with torch.autocast(dout.device.type, enabled=False):
            dy = dout.reshape(-1, dout.shape[-1]).to(dtype)
            dyB_d = _scaled_dyB(dy, down, dtype, need_dh or nA_d)
            if need_dh:
                # One pass gives dg, du and h (for down's adapter gradients): h over dh, and in a checkpoint
                # recompute (g2 and u2 private to this backward) dg and du over g2 and u2: no (N, inter)
                # buffer is new.
                dh = _input_grad([dy], [dyB_d], [down], stack_d, dtype, dtype)
                dg, du, h = _glu_backward(dh, g2, u2, kind, in_place=ctx.private_saved)
                del dh
            else:
                dg = du = None
                h = _glu_forward(g2, u2, kind) if nA_d or (nB_d and ha_d is None) else None
            del g2, u2
            if nB_d and ha_d is None:  # a recompute left h A_down^T to this pass
                (ha_d,) = _adapter_inputs(h, (down,), stack_d)
            dAd, dBd = _adapter_grads(dy, dyB_d, h, ha_d, down[3], dt_d, nA_d, nB_d)
            del h
            if need_dh:
                dyB_g = _scaled_dyB(dg, gate, dtype, need_dx or nA_g)
                dyB_u = _scaled_dyB(du, up, dtype, need_dx or nA_u)
                if need_dx:
                    acc = fp32_accumulator(dtype, dg.device)  # gate and up both feed dX
                    dx = _input_grad([dg, du], [dyB_g, dyB_u], [gate, up], stack_gu, dtype, acc)
                    dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
                dAg, dBg = _adapter_grads(dg, dyB_g, x2, xa_g, gate[3], dt_g, nA_g, nB_g)
                dAu, dBu = _adapter_grads(du, dyB_u, x2, xa_u, up[3], dt_u, nA_u, nB_u)
        grads = [None, dAg, dBg, None, None, dAu, dBu, None, None, dAd, dBd, None]
        return (dx, None, None, None, None, None, *grads)


def lora_mlp(x: torch.Tensor, gate, up, down, activation: str, output: bool = True, *,
             up_value: torch.Tensor | None = None, up_sink=None) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) with LoRA on each projection, as one autograd node.

    gate, up, down: (weight, A, B, scaling) tuples (A = B = None: no adapter there).
    activation: "silu" (SwiGLU), "gelu" (exact GeGLU) or "gelu_tanh" (tanh GeGLU); the
    transformers names "swish", "gelu_pytorch_tanh", "gelu_new", "gelu_fast" work too.
    output=False: a recompute that reads only the gradients (down's base matmul skipped; module docstring).
    up_sink: called with the up projection's (N, intermediate) output, adapter term included (a checkpoint's
    forward parks it); up_value: that value, given back to a recompute, which then skips up's base matmul.
    """
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(
            f"lora_mlp: activation {activation!r} is not supported; "
            f"use one of {sorted(MLP_ACTIVATIONS)}"
        )
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError("lora_mlp: x must be a Tensor with a feature dimension")
    gate, inter = _check_projection("gate", gate, x.shape[-1])
    up, inter_up = _check_projection("up", up, x.shape[-1])
    if inter_up != inter:
        raise ValueError(f"lora_mlp: gate has {inter} outputs but up has {inter_up}")
    down, _ = _check_projection("down", down, inter)
    kind = MLP_ACTIVATIONS[activation]
    rows = x.numel() // max(x.shape[-1], 1)
    if up_value is not None and (up_value.shape[-1] != inter or up_value.numel() != rows * inter):
        raise ValueError(f"lora_mlp: up_value has shape {tuple(up_value.shape)}; expected {rows} rows of {inter}")
    return _LoRAMLP.apply(x, _compute_dtype(x), kind, bool(output), up_value, up_sink, *gate, *up, *down)
