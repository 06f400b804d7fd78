"""Causal language-model loss.

    c_ij   = s * tanh(z_ij / s)                  (final-logit softcap s; c = z without one)
    lse_i  = log sum_j exp(c_ij)
    loss   = sum_i [t_i != ignore] * (lse_i - c_i,t_i) / n

over next-token targets t (labels shifted left by one, the last position ignored), in fp32 whatever
the logits' dtype. n is `num_items_in_batch` when the trainer passes it (the count of real targets
over all micro-batches of one optimizer step, which makes gradient accumulation exact), otherwise the
number of real targets in this batch, at least 1: a batch without a single real target gives loss 0
and zero gradients instead of 0/0 = NaN.

    d loss / d z_ij = (softmax(c_i)_j - [j == t_i]) * (1 - (c_ij / s)^2) * [t_i != ignore] * g / n

(g the upstream gradient; the middle factor is tanh' and is 1 without a softcap).

Triton kernel, one program per row: one pass over the vocabulary in BLOCK_V chunks with an online
max / rescaled sum gives lse (fp32), so a 128K-256K vocabulary never sits in registers at once.
The gradient needs only (z, lse, t), so either
  - the forward keeps the logits and the backward recomputes the gradient into a fresh buffer
    (`inplace_grad=False`, the public default: logits the model returns stay intact), or
  - the forward writes the gradient (with g = 1) over the logits buffer itself and the backward only
    multiplies by g (`inplace_grad=True`: no second vocab-sized buffer; for callers that own the logits
    and never read them again, e.g. the chunks of the fused linear cross-entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .launch import launch

IGNORE_INDEX = -100

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works; dispatch never picks the kernel
    triton = None


def shift_labels_left(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat((labels[..., 1:], pad), dim=-1)


def _flat_targets(labels, shift_labels, ignore_index, rows: int, device) -> torch.Tensor:
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs `labels` or `shift_labels`")
        shift_labels = shift_labels_left(labels, ignore_index)
    targets = shift_labels.reshape(-1).to(device=device, dtype=torch.long)
    if targets.numel() != rows:
        raise ValueError(
            f"causal_lm_loss: {targets.numel()} targets for {rows} rows of logits; labels must have the "
            "logits' leading shape (batch, sequence)"
        )
    return targets.contiguous()


def _normalizer(targets, num_items_in_batch, ignore_index) -> torch.Tensor:
    """n as an fp32 0-d tensor on the targets' device (no host sync)."""
    if num_items_in_batch is None:
        return (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(device=targets.device, dtype=torch.float32).reshape(())
    return torch.tensor(float(num_items_in_batch), device=targets.device)


def _softcapped(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if not softcap else softcap * torch.tanh(z / softcap)


def causal_lm_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
) -> torch.Tensor:
    """`logits` are the raw lm_head output when `softcap` is given (the cap is applied here, in fp32);
    pass softcap=None for logits that are already capped."""
    flat = logits.reshape(-1, logits.shape[-1])
    targets = _flat_targets(labels, shift_labels, ignore_index, flat.shape[0], logits.device)
    flat = _softcapped(flat.float(), softcap)
    total = F.cross_entropy(flat, targets, ignore_index=ignore_index, reduction="sum")
    return total / _normalizer(targets, num_items_in_batch, ignore_index)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _cap(z, softcap, HAS_SOFTCAP: tl.constexpr):
        if HAS_SOFTCAP:
            # tanh through exp: not every Triton version has tl.tanh, and exp saturates cleanly
            # (e -> inf gives +1, e -> 0 gives -1)
            e = tl.exp(2.0 * z / softcap)
            z = softcap * (1.0 - 2.0 / (e + 1.0))
        return z

    @triton.jit
    def _store_zero_row(g_row, V, BLOCK_V: tl.constexpr):
        cols = tl.arange(0, BLOCK_V)
        zero = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            tl.store(g_row + idx, zero.to(g_row.dtype.element_ty), mask=idx < V)

    @triton.jit
    def _store_grad_row(z_row, g_row, target, lse, scale, V, softcap,
                        HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
        # z_row may equal g_row (gradient over the logits): each chunk is read before it is written
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            mask = idx < V
            z = tl.load(z_row + idx, mask=mask, other=0.0).to(tl.float32)
            c = _cap(z, softcap, HAS_SOFTCAP)
            g = tl.exp(c - lse) - tl.where(idx == target, 1.0, 0.0)
            if HAS_SOFTCAP:
                # tanh'(z/s) = 1 - tanh^2 = 4 / (e + 2 + 1/e) with e = exp(2z/s): no cancellation near
                # saturation (1 - r*r loses every digit there), and 0 at e = 0 or inf
                e = tl.exp(2.0 * z / softcap)
                g = g * (4.0 / (e + 2.0 + 1.0 / e))
            tl.store(g_row + idx, (g * scale).to(g_row.dtype.element_ty), mask=mask)

    @triton.jit
    def _ce_forward_kernel(
        z_ptr, stride_zb, stride_zt, T,
        t_ptr, loss_ptr, lse_ptr,
        g_ptr, stride_gb, stride_gt, scale_ptr,
        V, ignore_index, softcap,
        HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // T
        t = row - b * T
        z_row = z_ptr + b * stride_zb + t * stride_zt
        g_row = g_ptr + b * stride_gb + t * stride_gt
        target = tl.load(t_ptr + row).to(tl.int64)
        if target == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            if WRITE_GRAD:
                _store_zero_row(g_row, V, BLOCK_V)
        else:
            cols = tl.arange(0, BLOCK_V)
            m = float("-inf")
            s = 0.0
            for start in range(0, V, BLOCK_V):
                idx = start + cols
                mask = idx < V
                c = _cap(tl.load(z_row + idx, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
                c = tl.where(mask, c, float("-inf"))  # after the cap, which would map -inf to -softcap
                m_new = tl.maximum(m, tl.max(c, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(c - m_new), axis=0)
                m = m_new
            lse = m + tl.log(s)
            valid = (target >= 0) & (target < V)
            c_t = _cap(tl.load(z_row + target, mask=valid, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            # an out-of-range label poisons the loss instead of reading out of bounds
            tl.store(loss_ptr + row, tl.where(valid, lse - c_t, float("nan")))
            tl.store(lse_ptr + row, lse)
            if WRITE_GRAD:
                scale = tl.load(scale_ptr)
                _store_grad_row(z_row, g_row, target, lse, scale, V, softcap, HAS_SOFTCAP, BLOCK_V)

    @triton.jit
    def _ce_backward_kernel(
        z_ptr, stride_zb, stride_zt, T,
        t_ptr, lse_ptr,
        g_ptr, stride_gb, stride_gt, scale_ptr,
        V, ignore_index, softcap,
        HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // T
        t = row - b * T
        g_row = g_ptr + b * stride_gb + t * stride_gt
        target = tl.load(t_ptr + row).to(tl.int64)
        if target == ignore_index:
            _store_zero_row(g_row, V, BLOCK_V)
        else:
            lse = tl.load(lse_ptr + row)
            scale = tl.load(scale_ptr)
            _store_grad_row(z_ptr + b * stride_zb + t * stride_zt, g_row, target, lse, scale, V, softcap,
                            HAS_SOFTCAP, BLOCK_V)


def _rows3(x: torch.Tensor) -> torch.Tensor:
    """A (B, T, V) view with unit vocab stride, so strided (sliced) logits need no copy."""
    if x.dim() < 2:
        raise ValueError(f"logits must have a vocabulary dimension, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 2:
        return x.unsqueeze(0)
    try:
        return x.view(-1, x.shape[-2], x.shape[-1])
    except RuntimeError:
        return x.contiguous().view(-1, x.shape[-2], x.shape[-1])


def _launch_config(V: int, block_v: int | None):
    if block_v is None:
        block_v = min(triton.next_power_of_2(V), 8192)
    num_warps = 4 if block_v <= 1024 else (8 if block_v <= 4096 else 16)
    return block_v, num_warps


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    grad_out: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    block_v: int | None = None,
):
    """Triton launcher. Returns (per-row loss, per-row lse), fp32, 0 on ignored rows. With `grad_out`
    (a tensor shaped like the logits; it may be the logits themselves) also writes
    d(sum of row losses * grad_scale)/d logits into it. `grad_scale` is a 1-element fp32 device tensor."""
    z3 = _rows3(logits)
    B, T, V = z3.shape
    N = B * T
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    if N == 0:
        return loss, lse
    write = grad_out is not None
    if write:
        g3 = _rows3(grad_out)
        if g3.data_ptr() != grad_out.data_ptr() or g3.shape != z3.shape:  # _rows3 had to copy
            raise ValueError("grad_out must be a unit-stride tensor shaped like the logits")
        scale = grad_scale.reshape(1).to(device=logits.device, dtype=torch.float32)
    else:
        g3, scale = z3, loss  # placeholders, never touched
    block, warps = _launch_config(V, block_v)
    launch(_ce_forward_kernel, (N,),
        z3, z3.stride(0), z3.stride(1), T,
        targets, loss, lse,
        g3, g3.stride(0), g3.stride(1), scale,
        V, ignore_index, float(softcap or 0.0),
        HAS_SOFTCAP=bool(softcap), WRITE_GRAD=write, BLOCK_V=block, num_warps=warps,
    )
    return loss, lse


def _cross_entropy_grad(z3, targets, lse, scale, softcap, ignore_index, block_v) -> torch.Tensor:
    B, T, V = z3.shape
    grad = torch.empty(z3.shape, device=z3.device, dtype=z3.dtype)
    block, warps = _launch_config(V, block_v)
    launch(_ce_backward_kernel, (B * T,),
        z3, z3.stride(0), z3.stride(1), T,
        targets, lse,
        grad, grad.stride(0), grad.stride(1), scale.reshape(1),
        V, ignore_index, float(softcap or 0.0),
        HAS_SOFTCAP=bool(softcap), BLOCK_V=block, num_warps=warps,
    )
    return grad


class _TritonCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, n, softcap, ignore_index, inplace_grad, block_v):
        need_grad = ctx.needs_input_grad[0]
        # in place only into the caller's own storage (a strided input copied by _rows3 is not it)
        inplace = bool(inplace_grad) and need_grad and _rows3(logits).data_ptr() == logits.data_ptr()
        if inplace:
            loss_rows, _ = cross_entropy_rows(
                logits, targets, softcap=softcap, ignore_index=ignore_index,
                grad_out=logits, grad_scale=1.0 / n, block_v=block_v,
            )
            ctx.save_for_backward(logits)
        else:
            z3 = _rows3(logits)
            loss_rows, lse = cross_entropy_rows(z3, targets, softcap=softcap, ignore_index=ignore_index,
                                                block_v=block_v)
            if need_grad:
                ctx.save_for_backward(z3, targets, lse, n)
        ctx.inplace, ctx.softcap, ctx.ignore_index, ctx.block_v = inplace, softcap, ignore_index, block_v
        ctx.shape, ctx.spent = logits.shape, False
        return loss_rows.sum() / n

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.inplace:
            if ctx.spent:
                raise RuntimeError(
                    "causal_lm_loss(inplace_grad=True) keeps its gradient in the logits buffer and supports "
                    "one backward pass; use inplace_grad=False to backpropagate through it again"
                )
            ctx.spent = True
            (grad,) = ctx.saved_tensors
            return grad.mul_(grad_loss), None, None, None, None, None, None
        z3, targets, lse, n = ctx.saved_tensors
        scale = grad_loss.to(torch.float32) / n
        grad = _cross_entropy_grad(z3, targets, lse, scale, ctx.softcap, ctx.ignore_index, ctx.block_v)
        return grad.view(ctx.shape), None, None, None, None, None, None


def causal_lm_loss_triton(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    inplace_grad: bool = False,
    block_v: int | None = None,
) -> torch.Tensor:
    """The Triton path, whatever the device (tests call it on the CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("causal_lm_loss_triton needs Triton; install it or use causal_lm_loss")
    V = logits.shape[-1]
    targets = _flat_targets(labels, shift_labels, ignore_index, logits.numel() // max(V, 1), logits.device)
    n = _normalizer(targets, num_items_in_batch, ignore_index)
    return _TritonCrossEntropy.apply(
        logits, targets, n, float(softcap) if softcap else None, int(ignore_index), bool(inplace_grad), block_v
    )


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    inplace_grad: bool = False,
) -> torch.Tensor:
    """Mean next-token cross-entropy (see the module docstring). `softcap` caps the logits inside the
    loss: pass the raw lm_head output with it. `inplace_grad=True` lets the CUDA kernel overwrite
    `logits` with their gradient during the forward: only for callers that never read those logits again."""
    if dispatch.use_triton(logits):
        return causal_lm_loss_triton(
            logits, labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index, softcap=softcap, inplace_grad=inplace_grad,
        )
    return causal_lm_loss_reference(
        logits, labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index, softcap=softcap,
    )
