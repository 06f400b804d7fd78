"""Causal self-attention over (batch, heads, seq, head_dim) tensors.

    out = softmax(cap * tanh((q k^T * scale) / cap) + mask) v

The softcap (Gemma 2's attention-logit softcapping) is optional. Without it, PyTorch's
scaled_dot_product_attention runs its fused kernels; with it, the scores must be formed explicitly
(softmax in fp32, as transformers does). K/V may have fewer heads than Q (grouped-query attention):
kv head j serves query heads j*g ... (j+1)*g - 1.
"""

from __future__ import annotations

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


def attention(q, k, v, **kwargs) -> torch.Tensor:
    return attention_reference(q, k, v, **kwargs)
