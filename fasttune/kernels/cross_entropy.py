"""Causal language-model loss.

    loss = sum_i [label_i != ignore] * (logsumexp(z_i) - z_i[label_i]) / n

over next-token targets (labels shifted left by one, the last position ignored), with the logits
upcast to fp32. n is `num_items_in_batch` when the trainer passes it (the count of real targets over
all micro-batches of one optimizer step, which makes gradient accumulation exact), otherwise the
number of real targets in this batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels_left(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat((labels[..., 1:], pad), dim=-1)


def causal_lm_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs `labels` or `shift_labels`")
        shift_labels = shift_labels_left(labels, ignore_index)
    targets = shift_labels.reshape(-1).to(logits.device)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    if num_items_in_batch is None:
        return F.cross_entropy(flat, targets, ignore_index=ignore_index, reduction="mean")
    total = F.cross_entropy(flat, targets, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def causal_lm_loss(logits, labels=None, **kwargs) -> torch.Tensor:
    return causal_lm_loss_reference(logits, labels, **kwargs)
