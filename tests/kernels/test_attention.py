"""Attention's backend preference (fasttune/kernels/attention.py): cuDNN first on Hopper for one call,
the caller's SDPA settings untouched, and the numbers no worse than FlashAttention's against fp64."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_rules import assert_no_worse

attn = importlib.import_module("fasttune.kernels.attention")

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def test_the_priority_order_is_restored_and_cpu_keeps_the_default():
    before = torch._C._get_sdp_priority_order()
    with attn._cudnn_first():
        inside = torch._C._get_sdp_priority_order()
    assert torch._C._get_sdp_priority_order() == before
    assert inside[0] == int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION) and sorted(inside) == sorted(before)
    q = torch.randn(1, 4, 8, 16, dtype=torch.bfloat16)
    assert not attn.prefers_cudnn(q, None)


def _layout(b, s, heads, kv_heads, d, device):
    """q, k, v as the owned forward hands them over: (b, s, heads, d) projections viewed as (b, h, s, d)."""
    q = torch.randn(b, s, heads, d, device=device).transpose(1, 2)
    k = torch.randn(b, s, kv_heads, d, device=device).transpose(1, 2)
    v = torch.randn(b, s, kv_heads, d, device=device).transpose(1, 2)
    return q, k, v


def _run(q, k, v, dout, backends=None):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    kwargs = dict(is_causal=True, scale=q.shape[-1] ** -0.5)
    if backends is None:
        out = attn.attention(*leaves, **kwargs)
    else:
        with torch.nn.attention.sdpa_kernel(backends):
            out = attn.attention_reference(*leaves, **kwargs)
    out.backward(dout)
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the cuDNN preference applies on Hopper (sm_90) only")
@pytest.mark.parametrize("heads, kv_heads", [(32, 8), (16, 16)])
def test_gpu_cudnn_attention_is_no_worse_than_flash(heads, kv_heads):
    from torch.nn.attention import SDPBackend

    torch.manual_seed(0)
    q, k, v = _layout(2, 1024, heads, kv_heads, 128, "cuda")
    dout = torch.randn(2, heads, 1024, 128, device="cuda")
    q16, k16, v16, d16 = (t.to(torch.bfloat16) for t in (q, k, v, dout))
    assert attn.prefers_cudnn(q16, None)
    # cuDNN takes these shapes (GQA, the transposed layout) itself: with only cuDNN enabled it must run
    only_cudnn = _run(q16, k16, v16, d16, [SDPBackend.CUDNN_ATTENTION])
    got = _run(q16, k16, v16, d16)
    flash = _run(q16, k16, v16, d16, [SDPBackend.FLASH_ATTENTION])
    truth = _run(*(t.double() for t in (q, k, v, dout)), [SDPBackend.MATH])
    torch.testing.assert_close(got[0], only_cudnn[0], rtol=0, atol=0)  # the preference ran cuDNN's forward
    for name, g, c, f, t in zip(("out", "dq", "dk", "dv"), got, only_cudnn, flash, truth):
        assert_no_worse(name, g, f, t, torch.bfloat16)
        assert_no_worse(name + " (cuDNN alone)", c, f, t, torch.bfloat16)
