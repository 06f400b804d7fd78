"""Embedding lookup: rows of a table gathered by token id, for tables kept in host memory.

fasttune keeps a frozen input embedding in pinned host memory (memory/host_embedding.py), mapped into
the GPU's address space, so that GPU kernels read it over PCIe. `torch.nn.functional.embedding` reads such
a table correctly but slowly for a few rows (~240 us for one token's row on an H100: its loads go out a
few bytes at a time, each a PCIe round trip). This kernel gives each (token, 1024-column tile) its own
program, whose loads all go out at once: one round trip per tile. It copies bits (the rows are read and
written as integers of the element's width), so any floating dtype comes back exactly, under Triton's
interpreter too.

Ids outside [0, vocab) give rows of NaN (all bits set), where `F.embedding` would stop the CUDA context
with a device-side assert: the loss turns NaN instead, and the GPU stays usable.
"""

from __future__ import annotations

import torch

from . import dispatch
from ._triton_utils import interpreting, triton
from .launch import launch

if triton is not None:
    import triton.language as tl

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TILE = 1024


def embedding_reference(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.embedding(ids, weight)


if triton is not None:

    @triton.jit
    def _gather_rows_kernel(W, IDS, OUT, vocab, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        idx = tl.load(IDS + row).to(tl.int64) + tl.zeros([BLOCK], dtype=tl.int64)  # the row's id, per column
        keep = cols < width
        # an id outside the table: every bit set, a NaN in any floating format
        bits = tl.load(W + idx * width + cols, mask=keep & (idx >= 0) & (idx < vocab), other=-1)
        tl.store(OUT + row * width + cols, bits, mask=keep)


def embedding_triton(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.embedding(ids, weight)` for a 2-D contiguous `weight` (ids outside the table: NaN rows)."""
    if triton is None:
        raise RuntimeError("embedding_triton: Triton is not installed")
    if weight.dim() != 2 or not weight.is_contiguous() or weight.element_size() not in _BITS:
        raise ValueError("embedding_triton: the table must be a contiguous 2-D tensor")
    vocab, width = weight.shape
    flat = ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    bits = _BITS[weight.element_size()]
    out = torch.empty(flat.numel(), width, dtype=bits, device=weight.device)
    if flat.numel() and width:
        block = min(_TILE, triton.next_power_of_2(width)) if not interpreting() else min(256, triton.next_power_of_2(width))
        launch(_gather_rows_kernel, (flat.numel(), triton.cdiv(width, block)),
               weight.view(bits), flat, out, vocab, width, BLOCK=block, num_warps=4)
    return out.view(weight.dtype).view(*ids.shape, width)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Rows of `weight` by id: the Triton gather on CUDA, `F.embedding` elsewhere."""
    if dispatch.use_triton(weight) and weight.is_contiguous() and weight.dim() == 2:
        return embedding_triton(ids, weight)
    return embedding_reference(ids, weight)
