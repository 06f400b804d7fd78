"""Fused linear cross-entropy: the causal-LM loss straight from the last hidden states.

    z = h W^T (+ b) (+ u B^T)         u = sum_a s_a * A_a(dropout_a(h)): LoRA on lm_head, optional
    loss = causal_lm_loss(z, t; softcap, n)                 (see cross_entropy.py)

The (tokens x vocab) logits are never materialized. Tokens whose target is ignored are dropped up
front (they contribute nothing), the rest are processed C at a time:

    z_c   = h_c W^T (+ b + u_c B^T)            (C x V, compute dtype, fp32 accumulation in the matmul)
    G_c   = n * d loss / d z_c                 written over z_c by the cross-entropy kernel (softmax - onehot)
    dh_c  = G_c W        du_c = G_c B
    dW   += G_c^T h_c    dB  += G_c^T u_c     db += sum_rows G_c      (only what requires grad)

all during the forward, into fp32 accumulators, so the backward only multiplies the stored gradients
by g / n (g the upstream gradient, n the normalizer). G_c is kept unscaled: scaled by 1/n its entries
fall below fp16's subnormal range at realistic token counts (p / n ~ 1e-9 for a 128K vocabulary).
Where a 16-bit matmul cannot write fp32 (torch < 2.8 on CUDA) the accumulators are 16-bit and G_c is
scaled by 1/n up front instead, so that a sum over many tokens cannot overflow fp16.
Peak extra memory: one C x V chunk plus dh (and dW when lm_head trains), instead of the logits
path's two N x V buffers. On CUDA the chunk's cross-entropy is the Triton kernel; elsewhere the same
math in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch
from .cross_entropy import (
    IGNORE_INDEX,
    _flat_targets,
    _normalizer,
    causal_lm_loss_reference,
    cross_entropy_rows,
)
from .matmul import fp32_accumulator, mm_into


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    return causal_lm_loss_reference(
        logits, labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index, softcap=softcap,
    )


# ----------------------------------------------------------------------------------------------


def _chunk_ce_torch(z, targets, scale, softcap, ignore_index, write_grad):
    """Per-row losses of the chunk; with write_grad, z is overwritten by d(sum loss * scale)/dz."""
    zf = z.float()
    c = zf if not softcap else softcap * torch.tanh(zf / softcap)
    lse = torch.logsumexp(c, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).unsqueeze(1)
    loss = (lse - c.gather(1, safe).squeeze(1)) * valid
    if write_grad:
        g = torch.exp(c - lse.unsqueeze(1))
        g.scatter_add_(1, safe, -torch.ones_like(safe, dtype=g.dtype))
        if softcap:
            g *= 1.0 - (c / softcap) ** 2
        g *= (valid.to(g.dtype) * scale).unsqueeze(1)
        z.copy_(g)
    return loss


def _chunk_ce(z, targets, scale, softcap, ignore_index, write_grad, use_triton, block_v):
    if use_triton:
        loss, _ = cross_entropy_rows(
            z, targets, softcap=softcap, ignore_index=ignore_index,
            grad_out=z if write_grad else None, grad_scale=scale, block_v=block_v,
        )
        return loss
    return _chunk_ce_torch(z, targets, scale, softcap, ignore_index, write_grad)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def _default_chunk(tokens: int, hidden: int, vocab: int, trains_weight: bool = False) -> int:
    """Tokens per chunk (a multiple of 64, at least 128), from the H100 measurements in
    benchmarks/results (scripts/kernel_sweep.py):
    - lm_head frozen (LoRA): the dX product (C x hidden outputs, each a sum over the vocabulary) needs
      C * hidden of about 4M outputs, one wave of 128x256 tiles on 132 SMs, or it runs at a fraction
      of the GPU (1024 tokens at Llama's hidden 4096, 1821 at Gemma-2-2B's 2304); but a chunk's logits
      stay within a quarter of the full logits (C <= N / 4: with dh and the rest, about 1/8 of the
      logits path's two N x V buffers), and are at least about twice the hidden states when that is
      larger (short vocabularies);
    - lm_head trained: every chunk re-reads and re-writes the fp32 dW (V x H), so few large chunks:
      a chunk's logits as large as half that accumulator (C = hidden), which training needs anyway."""
    if trains_weight:
        want = hidden
    else:
        by_memory = max(2 * tokens * hidden, 1 << 25) // max(vocab, 1)
        by_gemm = -(-(1 << 22) // max(hidden, 1))
        want = min(max(by_memory, by_gemm), tokens // 4)
    return max(128, want // 64 * 64)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_u, lora_b, targets, kept, n, softcap, ignore_index, chunk,
                use_triton, block_v):
        H, V = hidden.shape[-1], weight.shape[0]
        need_dh, need_dw, need_db, need_du, need_dbb = ctx.needs_input_grad[:5]
        need_any = need_dh or need_dw or need_db or need_du or need_dbb
        cdt = _compute_dtype(hidden, weight)
        h2 = hidden.reshape(-1, H)
        u2 = lora_u.reshape(-1, lora_u.shape[-1]) if lora_u is not None else None
        N = h2.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            K, keep = kept, None
            if K != N:  # the kept rows, in order (a stable sort: no host sync, unlike nonzero)
                keep = torch.argsort((targets == ignore_index).to(torch.int32), stable=True)[:K]
                hk, tk = h2.index_select(0, keep), targets.index_select(0, keep)
                uk = u2.index_select(0, keep) if u2 is not None else None
            else:
                hk, tk, uk = h2, targets, u2
            hk = hk.to(cdt)
            uk = uk.to(cdt) if uk is not None else None
            W = weight.to(cdt)
            b = bias.to(cdt) if bias is not None else None
            Bm = lora_b.to(cdt) if lora_b is not None else None
            # gradients stay fp32 until the backward has applied the upstream gradient: one rounding
            acc_dt = fp32_accumulator(cdt, hk.device)
            dhk = torch.empty(hk.shape, device=hk.device, dtype=acc_dt) if need_dh else None
            duk = torch.empty(uk.shape, device=hk.device, dtype=acc_dt) if need_du else None
            dW = torch.zeros(V, H, device=hk.device, dtype=acc_dt) if need_dw else None
            dB = torch.zeros(Bm.shape, device=hk.device, dtype=acc_dt) if need_dbb else None
            db = torch.zeros(V, device=hk.device, dtype=torch.float32) if need_db else None
            # unscaled chunk gradients into fp32 accumulators, 1/n applied in the backward (module doc)
            prescale = acc_dt != torch.float32
            scale = (1.0 / n).reshape(1) if prescale else torch.ones(1, device=hk.device)
            loss_sum = torch.zeros((), device=hk.device, dtype=torch.float32)
            C = int(chunk) if chunk else _default_chunk(K, H, V, trains_weight=need_dw)
            for s in range(0, K, C):
                h_c = hk[s:s + C]
                z = torch.addmm(b, h_c, W.t()) if b is not None else torch.mm(h_c, W.t())
                if Bm is not None:
                    z.addmm_(uk[s:s + C], Bm.t())
                loss_sum += _chunk_ce(z, tk[s:s + C], scale, softcap, ignore_index, need_any, use_triton,
                                      block_v).sum()
                if not need_any:
                    continue
                # z now holds the chunk's gradient G_c
                if need_dh:
                    mm_into(dhk[s:s + C], z, W, accumulate=False)
                if need_du:
                    mm_into(duk[s:s + C], z, Bm, accumulate=False)
                if need_dw:
                    mm_into(dW, z.t(), h_c, accumulate=True)
                if need_dbb:
                    mm_into(dB, z.t(), uk[s:s + C], accumulate=True)
                if need_db:
                    db += z.float().sum(0)
                del z
        stored = (dhk, dW, db, duk, dB)
        ctx.present = tuple(g is not None for g in stored)
        ctx.save_for_backward(keep, *(g for g in stored if g is not None))
        ctx.shapes = (hidden.shape, None if lora_u is None else lora_u.shape)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype,
                      None if lora_u is None else lora_u.dtype, None if lora_b is None else lora_b.dtype)
        ctx.rows, ctx.spent = N, False
        ctx.post_scale = None if prescale else n
        return loss_sum / n

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.spent:
            raise RuntimeError(
                "fused_linear_cross_entropy scales its precomputed gradients in place and supports one "
                "backward pass; recompute the loss to backpropagate again"
            )
        ctx.spent = True
        keep, *saved = ctx.saved_tensors
        saved = iter(saved)
        out = []
        for i, (present, dtype) in enumerate(zip(ctx.present, ctx.dtypes)):
            if not present:
                out.append(None)
                continue
            g = next(saved).mul_(grad_loss if ctx.post_scale is None else grad_loss / ctx.post_scale).to(dtype)
            if i in (0, 3):  # per-token gradients: scatter back over the ignored tokens
                shape = ctx.shapes[0 if i == 0 else 1]
                if keep is not None:
                    g = torch.zeros(ctx.rows, g.shape[-1], device=g.device, dtype=dtype).index_copy_(0, keep, g)
                g = g.view(shape)
            out.append(g)
        return (*out, None, None, None, None, None, None, None, None)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    chunk_tokens: int | None = None,
    lora: tuple[torch.Tensor, torch.Tensor] | None = None,
    use_triton: bool | None = None,
    block_v: int | None = None,
    prepared: PreparedTargets | None = None,
) -> torch.Tensor:
    """causal_lm_loss(F.linear(hidden, weight, bias) [+ u @ B^T], labels, ...) without the logits.
    `prepared` (PreparedTargets, made before the decoder ran) replaces labels / shift_labels.

    `lora=(u, B)` adds a low-rank term: u (..., r) is the already scaled LoRA down-projection of the
    hidden states (autograd carries its gradient on to lora_A and the hidden states), B (vocab, r).
    `use_triton` forces the chunk kernel choice (None: Triton on CUDA, PyTorch elsewhere)."""
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match lm_head weight {tuple(weight.shape)}")
    N = hidden.numel() // hidden.shape[-1]
    if prepared is None:
        prepared = PreparedTargets(labels, shift_labels, N, hidden.device, ignore_index)
    elif prepared.rows != N or prepared.ignore_index != ignore_index:
        raise ValueError(
            f"prepared targets are for {prepared.rows} rows (ignore_index {prepared.ignore_index}) but the hidden "
            f"states have {N} rows (ignore_index {ignore_index})"
        )
    targets = prepared.targets
    n = _normalizer(targets, num_items_in_batch, ignore_index)
    if use_triton is None:
        use_triton = dispatch.use_triton(hidden)
    u, B = lora if lora is not None else (None, None)
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, bias, u, B, targets, prepared.kept(), n, float(softcap) if softcap else None,
        int(ignore_index), chunk_tokens, bool(use_triton), block_v,
    )


class PreparedTargets:
    """The flattened next-token targets, and how many are not ignored, counted on the GPU and copied to
    the host without waiting. The fused loss needs that count on the host (it sizes the chunk loop);
    reading it at the loss would stall the host until the GPU had finished the whole forward, with the
    GPU then idle while the host queues the backward. Made before the decoder runs (the owned forward
    does), the copy has long landed when the loss asks: the host waits at most until the GPU has reached
    the start of the step (as copying a batch to the GPU makes it wait), never for the step's own work."""

    def __init__(self, labels, shift_labels, rows: int, device, ignore_index: int = IGNORE_INDEX):
        self.targets = _flat_targets(labels, shift_labels, ignore_index, rows, device)
        self.rows, self.ignore_index = rows, ignore_index
        count = (self.targets != ignore_index).sum()
        self._ready = None
        if count.is_cuda:
            self._count = torch.empty((), dtype=count.dtype, pin_memory=True)
            self._count.copy_(count, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._count = count

    def kept(self) -> int:
        if self._ready is not None:
            self._ready.synchronize()
        return int(self._count)


# ----------------------------------------------------------------------------------------------
# lm_head modules: plain Linear, PEFT modules_to_save, PEFT LoRA
# ----------------------------------------------------------------------------------------------


def _active_names(module) -> list[str]:
    names = getattr(module, "active_adapters", None)
    if names is None:
        names = getattr(module, "active_adapter", [])
    return [names] if isinstance(names, str) else list(names)


def _plain_linear(module, what: str) -> torch.nn.Linear:
    if not isinstance(module, torch.nn.Linear) or type(module).forward is not torch.nn.Linear.forward:
        raise NotImplementedError(
            f"the fused cross-entropy cannot reproduce {what} of type {type(module).__name__} (quantized or "
            "custom forward); keep lm_head a plain 16/32-bit Linear or turn the fused loss off"
        )
    if not module.weight.is_floating_point():
        raise NotImplementedError(f"the fused cross-entropy needs a floating-point {what} weight")
    if module._forward_hooks or module._forward_pre_hooks or getattr(module, "_hf_hook", None) is not None:
        raise NotImplementedError(
            f"{what} carries forward hooks (offloading / device-map hooks?) that the fused cross-entropy would "
            "bypass; load lm_head onto the GPU or turn the fused loss off"
        )
    return module


def _resolve_lm_head(lm_head):
    """-> (linear, [(lora_A, lora_B, scaling, dropout), ...]) or NotImplementedError."""
    if hasattr(lm_head, "modules_to_save") and hasattr(lm_head, "original_module"):
        names = _active_names(lm_head)
        if getattr(lm_head, "disable_adapters", False) or not names or names[0] not in lm_head.modules_to_save:
            return _resolve_lm_head(lm_head.original_module)
        if len(names) > 1:
            raise NotImplementedError(f"lm_head trained in full for several active adapters {names}")
        return _resolve_lm_head(lm_head.modules_to_save[names[0]])
    if hasattr(lm_head, "base_layer") and hasattr(lm_head, "lora_A"):
        base = _plain_linear(lm_head.base_layer, "lm_head's base layer")
        if getattr(lm_head, "merged", False) and getattr(lm_head, "merged_adapters", None):
            raise NotImplementedError("lm_head has merged LoRA adapters; unmerge them before training")
        if getattr(lm_head, "disable_adapters", False):
            return base, []
        terms = []
        for name in _active_names(lm_head):
            if name not in lm_head.lora_A:
                continue
            if getattr(lm_head, "use_dora", {}).get(name, False):
                raise NotImplementedError(f"DoRA adapter {name!r} on lm_head is not supported by the fused loss")
            A, B = lm_head.lora_A[name], lm_head.lora_B[name]
            if not isinstance(A, torch.nn.Linear) or not isinstance(B, torch.nn.Linear) or B.bias is not None:
                raise NotImplementedError(
                    f"LoRA adapter {name!r} on lm_head has a form (lora_bias / non-Linear) the fused loss "
                    "does not reproduce"
                )
            terms.append((A, B, lm_head.scaling[name], lm_head.lora_dropout[name]))
        return base, terms
    if hasattr(lm_head, "base_layer"):
        raise NotImplementedError(
            f"lm_head is wrapped by {type(lm_head).__name__}, an adapter the fused cross-entropy does not know; "
            "it would be skipped, so fasttune refuses instead (drop lm_head from target_modules or turn the "
            "fused loss off)"
        )
    return _plain_linear(lm_head, "lm_head"), []


def lm_head_trains(lm_head) -> str | None:
    """What of `lm_head` receives gradients under the fused loss: None, "weight", "lora" or
    "weight+lora". Raises NotImplementedError for an lm_head the fused loss cannot reproduce."""
    linear, terms = _resolve_lm_head(lm_head)
    parts = []
    if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
        parts.append("weight")
    if any(p.requires_grad for A, B, _, _ in terms for p in (A.weight, B.weight)):
        parts.append("lora")
    return "+".join(parts) or None


def fused_lm_head_loss(
    lm_head,
    hidden: torch.Tensor,
    labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """causal_lm_loss(lm_head(hidden), labels, **kwargs) without the logits, for a plain Linear lm_head,
    a PEFT modules_to_save copy, or PEFT LoRA adapters on it (their low-rank term included)."""
    linear, terms = _resolve_lm_head(lm_head)
    lora = None
    if terms:
        us, bs = [], []
        for A, B, scaling, dropout in terms:
            x = hidden.to(A.weight.dtype)
            us.append(A(dropout(x)) * scaling)
            bs.append(B.weight)
        lora = (us[0], bs[0]) if len(terms) == 1 else (torch.cat(us, -1), torch.cat(bs, -1))
    return fused_linear_cross_entropy(hidden, linear.weight, labels, bias=linear.bias, lora=lora, **kwargs)
