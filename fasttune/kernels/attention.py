"""Causal self-attention over (batch, heads, seq, head_dim) tensors.

    out = softmax(cap * tanh((q k^T * scale) / cap) + mask) v

The softcap (Gemma 2's attention-logit softcapping) is optional. Without it, PyTorch's
scaled_dot_product_attention runs its fused kernels; with it, the scores must be formed explicitly
(softmax in fp32, as transformers does). K/V may have fewer heads than Q (grouped-query attention):
kv head j serves query heads j*g ... (j+1)*g - 1.

Backend. SDPA tries its fused kernels in a fixed order with FlashAttention (v2) first. On Hopper
(sm_90) cuDNN's fused attention is faster for training shapes, so `attention` moves cuDNN to the front
of that order for the call (shapes cuDNN does not take fall through to the next backend, as before;
backends a user disabled stay disabled). Decode steps (one query) keep the default order.
FASTTUNE_CUDNN_ATTENTION=0 turns the preference off.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F


def attention_reference(q, k, v, *, mask=None, is_causal=False, scale: float, softcap: float | None = None,
                        dropout: float = 0.0) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    if softcap is None:
        if groups > 1 and mask is not None and q.is_cuda:
            # CUDA's masked (memory-efficient) SDPA kernel has no GQA support and would fall back to
            # the math kernel; sharing heads by expansion keeps it on the fast kernel.
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout, scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        q_len, k_len = scores.shape[-2:]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, v)


_CUDNN_PREFERRED = os.environ.get("FASTTUNE_CUDNN_ATTENTION", "1") not in ("", "0", "false", "False")


@functools.lru_cache(maxsize=None)
def _hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


@functools.lru_cache(maxsize=None)
def _cudnn_first_order() -> tuple | None:
    """SDPA's backend priority with cuDNN first, or None where this torch cannot set the order."""
    get = getattr(torch._C, "_get_sdp_priority_order", None)
    cudnn = getattr(getattr(torch.nn.attention, "SDPBackend", None), "CUDNN_ATTENTION", None)
    if get is None or cudnn is None or not hasattr(torch._C, "_set_sdp_priority_order"):
        return None
    return (int(cudnn), *[b for b in get() if b != int(cudnn)])


@contextlib.contextmanager
def _cudnn_first():
    """SDPA's priority order with cuDNN first, for the duration of one call."""
    order = _cudnn_first_order()
    if order is None:
        yield
        return
    previous = torch._C._get_sdp_priority_order()
    torch._C._set_sdp_priority_order(list(order))
    try:
        yield
    finally:
        torch._C._set_sdp_priority_order(previous)


def prefers_cudnn(q: torch.Tensor, softcap) -> bool:
    return (
        _CUDNN_PREFERRED and softcap is None and q.is_cuda and q.shape[-2] > 1
        and q.dtype in (torch.bfloat16, torch.float16) and _hopper(q.device.index or 0)
    )


def attention(q, k, v, **kwargs) -> torch.Tensor:
    if prefers_cudnn(q, kwargs.get("softcap")):
        with _cudnn_first():
            return attention_reference(q, k, v, **kwargs)
    return attention_reference(q, k, v, **kwargs)
