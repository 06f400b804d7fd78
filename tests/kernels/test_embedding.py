"""The embedding gather kernel against F.embedding: exact rows for every float dtype (it copies bits), any
id layout, and NaN rows for ids outside the table. On a CPU it runs in Triton's interpreter (small
tables); `pytest -m gpu` runs it on a table in pinned host memory, as offload_embedding keeps it."""

from __future__ import annotations

import pytest
import torch
from kernel_rules import DEVICE, GPU_DTYPES

from fasttune.kernels.embedding import embedding, embedding_triton

triton = pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("width", [64, 300, 2048])  # one tile, a ragged tile, two tiles of 1024 on the GPU
def test_rows_are_the_tables_rows(dtype, width):
    vocab = 97
    weight = torch.randn(vocab, width, device=DEVICE).to(dtype)
    ids = torch.randint(0, vocab, (2, 5), device=DEVICE)
    ids[0, 0], ids[1, -1] = 0, vocab - 1  # both ends of the table
    out = embedding_triton(ids, weight)
    assert out.shape == (2, 5, width) and out.dtype == dtype
    assert torch.equal(out, torch.nn.functional.embedding(ids, weight))


def test_any_id_layout_and_int32_ids():
    weight = torch.randn(50, 64, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.randint(0, 50, (6, 4), device=DEVICE)
    for layout in (ids.t(), ids[:, ::2], ids.to(torch.int32), ids[0]):
        assert torch.equal(embedding_triton(layout, weight), torch.nn.functional.embedding(layout.long(), weight))


def test_ids_outside_the_table_give_nan_rows():
    weight = torch.randn(10, 64, device=DEVICE)
    ids = torch.tensor([3, 10, -1, 9], device=DEVICE)
    out = embedding_triton(ids, weight)
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
    assert torch.equal(out[0], weight[3]) and torch.equal(out[3], weight[9])


def test_empty_ids_and_bad_tables():
    weight = torch.randn(10, 64, device=DEVICE)
    assert embedding_triton(torch.empty(2, 0, dtype=torch.long, device=DEVICE), weight).shape == (2, 0, 64)
    with pytest.raises(ValueError, match="contiguous 2-D"):
        embedding_triton(torch.tensor([1], device=DEVICE), weight.t())


def test_dispatch_matches_the_reference():
    weight = torch.randn(30, 48, device=DEVICE, dtype=torch.float16)
    ids = torch.randint(0, 30, (3, 7), device=DEVICE)
    assert torch.equal(embedding(ids, weight), torch.nn.functional.embedding(ids, weight))
