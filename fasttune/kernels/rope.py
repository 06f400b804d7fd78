"""Rotary position embedding.

For a head vector x of size d split in halves (x1, x2) and angle theta_j = p * inv_freq_j:

    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half(x) = (-x2, x1)

with cos/sin of shape (batch, seq, d) built from `cat(freqs, freqs)` and multiplied by the rope
type's attention scaling. Rope scaling (linear, llama3, yarn, ...) only changes inv_freq and that
scaling factor, so it is entirely inside `rope_cos_sin`'s inputs. Packed batches need nothing
special either: cos/sin are built from per-token `position_ids`, so a position that restarts inside
a row is already in them, and the kernel only indexes cos/sin by (batch, seq).

Written per half, with (c1, c2) and (s1, s2) the halves of cos and sin:

    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2

The backward is the transpose of that linear map:

    dx1 = dy1 * c1 + dy2 * s2
    dx2 = dy2 * c2 - dy1 * s1

which, since `rope_cos_sin` makes the two halves equal (c1 = c2, s1 = s2), is the inverse rotation:
the same formula as the forward with sin negated. The kernel uses the exact transpose, so it is the
gradient of the reference for any cos/sin. Both forms are one kernel: each term is
`y1 = x1 * a1 + x2 * b1`, `y2 = x2 * a2 + x1 * b2` with the coefficients picked at compile time.

The kernel (forward and backward alike) rotates Q and K in one launch. Its grid is
(batch * seq rows) x (blocks of heads over max(hq, hk)); a program loads its row's cos/sin once and
applies them to its block of q heads and of k heads (GQA: hk < hq simply leaves the k part of the
later head blocks empty). All arithmetic is in fp32 whatever the storage dtype, every operand is
addressed through its own strides (q and k arrive as transposed views (b, h, s, d) of (b, s, h, d)
projection outputs, cos/sin may be broadcast over the batch), and the result is cast once on store.

In place or not:
- No autograd graph being recorded (inference, and the no-grad first pass of gradient
  checkpointing): q and k are rotated in place and returned, when that is safe (dense, no overlap
  between them, the result dtype is the input dtype). This saves an allocation per layer.
- A graph being recorded: fresh outputs, in the inputs' memory layout. Rotating in place with
  `mark_dirty` would bump the version counter of the projection output, and any op that saved it
  for its own backward (a LoRA variant, a q/k norm kernel that keeps its output) would then fail at
  backward time. Out of place costs no extra memory traffic (the same bytes are read and written)
  and no extra peak memory (the Function saves only cos/sin, so the unrotated q/k are freed as
  soon as nothing else holds them).
The backward writes fresh gradients and never modifies the incoming ones.
"""

from __future__ import annotations

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
    from ._triton_utils import round_to_bf16


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * attention_scaling
    sin = emb.sin() * attention_scaling
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (b, hq, s, d), k: (b, hk, s, d), cos/sin: (b, s, d)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rotate_heads(src_row, s_h, s_d, dst_row, d_h, d_d, h, H, d, dmask, a1, b1, a2, b2,
                      HALF: tl.constexpr, ROUND: tl.constexpr, COMPUTE: tl.constexpr):
        """Heads `h` (< H) of one token: (x1, x2) -> (x1 a1 + x2 b1, x2 a2 + x1 b2), read at src_row and
        written at dst_row (which may be src_row) with their head and dim strides."""
        m = (h < H)[:, None] & dmask[None, :]
        src = src_row + h[:, None] * s_h + d[None, :] * s_d
        x1 = tl.load(src, mask=m, other=0.0).to(COMPUTE)
        x2 = tl.load(src + HALF * s_d, mask=m, other=0.0).to(COMPUTE)
        y1 = x1 * a1 + x2 * b1
        y2 = x2 * a2 + x1 * b2
        if ROUND:
            y1 = round_to_bf16(y1.to(tl.float32))
            y2 = round_to_bf16(y2.to(tl.float32))
        dst = dst_row + h[:, None] * d_h + d[None, :] * d_d
        tl.store(dst, y1.to(dst_row.dtype.element_ty), mask=m)
        tl.store(dst + HALF * d_d, y2.to(dst_row.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_qk_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
        S, HQ, HK,
        sq_b, sq_h, sq_s, sq_d,
        sk_b, sk_h, sk_s, sk_d,
        sqo_b, sqo_h, sqo_s, sqo_d,
        sko_b, sko_h, sko_s, sko_d,
        sc_b, sc_s, sc_d,
        ss_b, ss_s, ss_d,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BACKWARD: tl.constexpr,
        ROUND_Q: tl.constexpr,
        ROUND_K: tl.constexpr,
        COMPUTE: tl.constexpr,
    ):
        # int64 row index: batch * seq * heads * head_dim overflows int32 at long contexts.
        row = tl.program_id(0).to(tl.int64)
        head0 = tl.program_id(1) * BLOCK_H
        bi = row // S
        si = row - bi * S

        d = tl.arange(0, BLOCK_D)
        dmask = d < HALF
        cos_row = cos_ptr + bi * sc_b + si * sc_s
        sin_row = sin_ptr + bi * ss_b + si * ss_s
        # Loads are cast to fp32 at once (fp64 when an operand is fp64): the interpreter's bf16
        # arithmetic is wrong, and fp32 math makes the kernel at least as accurate as the reference.
        c1 = tl.load(cos_row + d * sc_d, mask=dmask, other=0.0).to(COMPUTE)
        c2 = tl.load(cos_row + (d + HALF) * sc_d, mask=dmask, other=0.0).to(COMPUTE)
        s1 = tl.load(sin_row + d * ss_d, mask=dmask, other=0.0).to(COMPUTE)
        s2 = tl.load(sin_row + (d + HALF) * ss_d, mask=dmask, other=0.0).to(COMPUTE)
        if BACKWARD:
            a1 = c1
            b1 = s2
            a2 = c2
            b2 = -s1
        else:
            a1 = c1
            b1 = -s1
            a2 = c2
            b2 = s2
        a1 = a1[None, :]
        b1 = b1[None, :]
        a2 = a2[None, :]
        b2 = b2[None, :]

        h = head0 + tl.arange(0, BLOCK_H)
        if head0 < HQ:
            _rotate_heads(q_ptr + bi * sq_b + si * sq_s, sq_h, sq_d, qo_ptr + bi * sqo_b + si * sqo_s, sqo_h, sqo_d,
                          h, HQ, d, dmask, a1, b1, a2, b2, HALF, ROUND_Q, COMPUTE)
        if head0 < HK:
            _rotate_heads(k_ptr + bi * sk_b + si * sk_s, sk_h, sk_d, ko_ptr + bi * sko_b + si * sko_s, sko_h, sko_d,
                          h, HK, d, dmask, a1, b1, a2, b2, HALF, ROUND_K, COMPUTE)

# Elements of one half-head tile a program holds per tensor; bounds registers at large head counts.
_MAX_TILE = 2048


def _rope_config(heads: int, half: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps) for `heads` heads of `half` elements per half."""
    block_d = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(heads), max(1, _MAX_TILE // block_d))
    tile = block_h * block_d
    # H100 (scripts/kernel_sweep.py): 4 warps on Llama-8B's 2048-element tiles (88% of copy bandwidth,
    # 8 warps 80%); one warp on smaller tiles (Gemma-2-2B's 1024: 80%, against 68-78% with more)
    return block_h, block_d, 4 if tile >= 2048 else 1


def _launch(q, k, qo, ko, cos, sin, backward: bool) -> None:
    """Rotates q -> qo and k -> ko (qo may be q, ko may be k). q or k may be None (nothing to do
    for it). All 4-D tensors are (b, h, s, d); cos/sin are (b, s, d) with any strides."""
    ref = q if q is not None else k
    if ref is None:
        return
    b, _, s, hd = ref.shape
    hq = q.shape[1] if q is not None else 0
    hk = k.shape[1] if k is not None else 0
    if b * s == 0 or max(hq, hk) == 0:
        return
    # A tensor with no heads to rotate still needs a valid pointer and strides; its part is skipped.
    if q is None:
        q = qo = k
    if k is None:
        k = ko = q
    half = hd // 2
    interpret = interpreting()
    block_h, block_d, num_warps = _rope_config(max(hq, hk), half)
    grid = (b * s, triton.cdiv(max(hq, hk), block_h))
    launch(_rope_qk_kernel, grid,
        q, k, qo, ko, cos, sin,
        s, hq, hk,
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(),
        *cos.stride(), *sin.stride(),
        HALF=half, BLOCK_H=block_h, BLOCK_D=block_d, BACKWARD=backward,
        ROUND_Q=interpret and qo.dtype == torch.bfloat16, ROUND_K=interpret and ko.dtype == torch.bfloat16,
        COMPUTE=tl.float64 if torch.float64 in (q.dtype, k.dtype, cos.dtype, sin.dtype) else tl.float32,
        num_warps=num_warps,
    )


def _empty_in_layout(shape, stride, dtype, device) -> torch.Tensor:
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


def _rope_out_of_place(q, k, cos, sin):
    # The reference's dtype promotion (bf16 q with fp32 cos gives fp32), in the inputs' layout.
    qo = torch.empty_like(q, dtype=torch.promote_types(q.dtype, cos.dtype))
    ko = torch.empty_like(k, dtype=torch.promote_types(k.dtype, cos.dtype))
    _launch(q, k, qo, ko, cos, sin, backward=False)
    return qo, ko


class RopeQK(torch.autograd.Function):
    """Out-of-place rope of q and k; backward is the inverse rotation. cos/sin get no gradient."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        qo, ko = _rope_out_of_place(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        # Gradients are written in the layout of the rotated outputs (empty_like keeps a dense
        # layout such as the transposed projection output), so the view/transpose backward
        # upstream needs no copy.
        ctx.q_meta = (q.shape, qo.stride(), q.dtype)
        ctx.k_meta = (k.shape, ko.stride(), k.dtype)
        ctx.set_materialize_grads(False)
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        cos, sin = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dq = dk = None
        if need_q and dqo is not None:
            shape, stride, dtype = ctx.q_meta
            dq = _empty_in_layout(shape, stride, dtype, dqo.device)
        if need_k and dko is not None:
            shape, stride, dtype = ctx.k_meta
            dk = _empty_in_layout(shape, stride, dtype, dko.device)
        _launch(
            dqo if dq is not None else None, dko if dk is not None else None,
            dq, dk, cos, sin, backward=True,
        )
        return dq, dk, None, None


def _non_overlapping(t: torch.Tensor) -> bool:
    """No two elements share memory (gaps allowed): writing element by element in place is safe.
    Sufficient test: sorted by stride, each dim steps past everything the smaller dims reach."""
    reach = 0
    for size, stride in sorted(((sz, st) for sz, st in zip(t.shape, t.stride()) if sz != 1), key=lambda p: p[1]):
        if stride <= reach:
            return False
        reach += (size - 1) * stride
    return True


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Conservative: whether the byte ranges the two tensors span intersect (interleaved views of
    one fused projection count as overlapping and simply take the out-of-place path)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, a1 = _byte_span(a)
    b0, b1 = _byte_span(b)
    return a0 < b1 and b0 < a1


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    # Strides are non-negative for every tensor PyTorch can make.
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.storage_offset() * t.element_size()
    return start, start + (last + 1) * t.element_size()


def _check(q, k, cos, sin) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"apply_rope expects q and k as (batch, heads, seq, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    b, _, s, hd = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != hd:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, seq or head_dim")
    if hd % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {hd}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"apply_rope: q is on {q.device} but {name} is on {t.device}; move them to one device")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or t.shape[1] != s:
            raise ValueError(
                f"apply_rope: {name} must be (batch, seq, head_dim) = ({b}, {s}, {hd}), got {tuple(t.shape)}"
            )
        if t.shape[2] != hd:
            raise ValueError(
                f"apply_rope: {name} has {t.shape[2]} columns but head_dim is {hd}; partial rotary "
                "embeddings (rotary dim < head_dim) are not supported, build cos/sin over the full head_dim"
            )


def apply_rope_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of `apply_rope` (called directly by the tests, also under the interpreter)."""
    _check(q, k, cos, sin)
    b, _, s, hd = q.shape
    cos = cos.expand(b, s, hd)
    sin = sin.expand(b, s, hd)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        # The kernel gives no gradient to cos/sin; learned angles take the reference path.
        return apply_rope_reference(q, k, cos, sin)
    recording = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    in_place = (
        not recording
        and torch.promote_types(q.dtype, cos.dtype) == q.dtype
        and torch.promote_types(k.dtype, cos.dtype) == k.dtype
        and _non_overlapping(q) and _non_overlapping(k) and not _overlap(q, k)
        and not _overlap(q, cos) and not _overlap(q, sin) and not _overlap(k, cos) and not _overlap(k, sin)
    )
    if in_place:
        _launch(q, k, q, k, cos, sin, backward=False)
        # The kernel writes through raw pointers; bumping the version counters keeps autograd's
        # "modified by an inplace operation" check loud should anything have saved q or k.
        _bump_version(q, k)
        return q, k
    if not recording:
        return _rope_out_of_place(q, k, cos, sin)
    return RopeQK.apply(q, k, cos, sin)


def _bump_version(*tensors) -> None:
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None and not torch.is_inference_mode_enabled():
        for t in tensors:
            if not t.is_inference():
                bump(t)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q (b, hq, s, d) and k (b, hk, s, d) by cos/sin (b, s, d); returns (q, k).

    On CUDA this may rotate q and k in place when no gradient is being recorded: use the returned
    tensors, not the arguments, afterwards."""
    if dispatch.use_triton(q):
        return apply_rope_triton(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)
