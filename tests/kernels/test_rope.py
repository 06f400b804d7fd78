"""RoPE kernel against its reference: forward, both gradients, fp32/bf16 (fp16 on the GPU).

Tolerance rule (DESIGN.md): the kernel's error against a float64 ground truth is no worse than the
plain PyTorch reference's error in the same dtype (x1.5, plus a small epsilon). The ground truth is
the reference evaluated in float64 on the very same (already rounded) inputs and cos/sin.

On a CPU the Triton path runs in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), with
small shapes; the `gpu` tests run the dispatching `apply_rope` at real sizes.
"""

from __future__ import annotations

import types

import pytest
import torch
from kernel_rules import DEVICE

from fasttune.kernels import apply_rope, apply_rope_reference, rope_cos_sin
from fasttune.kernels import rope as rope_mod
from fasttune.models.rope import rope_inv_freq

triton = pytest.importorskip("triton")



# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _inv_freq(d: int, scaling: str) -> tuple[torch.Tensor, float]:
    if scaling == "llama3":
        cfg = types.SimpleNamespace(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        )
    else:
        cfg = types.SimpleNamespace(rope_theta=10000.0, rope_scaling=None)
    return rope_inv_freq(cfg, d)


def _positions(b: int, s: int, kind: str, device) -> torch.Tensor:
    if kind == "arange":
        return torch.arange(s, device=device)[None].expand(b, -1)
    if kind == "offset":  # far positions, as in a long context or a decode step
        return torch.arange(s, device=device)[None] + torch.randint(1000, 9000, (b, 1), device=device)
    # packed: several documents per row, positions restart inside the row
    pos = torch.empty(b, s, dtype=torch.long)
    for i in range(b):
        cuts = sorted(torch.randperm(s - 1)[: max(1, s // 4)].add(1).tolist())
        start = 0
        for c in cuts + [s]:
            pos[i, start:c] = torch.arange(c - start)
            start = c
    return pos.to(device)


def _cos_sin(b, s, d, dtype, positions="packed", scaling="default", device=DEVICE):
    inv_freq, attn_scaling = _inv_freq(d, scaling)
    return rope_cos_sin(_positions(b, s, positions, device), inv_freq, attn_scaling, dtype)


def _bases(layout, b, s, hq, hk, d, dtype, device=DEVICE):
    """The leaf tensors a layout's q and k are views of."""
    if layout == "model":  # separate projections, (b, s, h*d)
        return [torch.randn(b, s, hq * d, device=device), torch.randn(b, s, hk * d, device=device)]
    if layout == "contiguous":
        return [torch.randn(b, hq, s, d, device=device), torch.randn(b, hk, s, d, device=device)]
    if layout == "fused":  # q and k are head slices of one fused qkv projection
        return [torch.randn(b, s, (hq + 2 * hk) * d, device=device)]
    if layout == "strided":  # every other token of q; every other column of k (head_dim stride 2)
        return [torch.randn(b, 2 * s, hq, d, device=device), torch.randn(b, s, hk, 2 * d, device=device)]
    raise ValueError(layout)


def _views(layout, bases, hq, hk, d):
    """q (b, hq, s, d) and k (b, hk, s, d) exactly as the layout makes them."""
    if layout == "model":
        b, s, _ = bases[0].shape
        return bases[0].view(b, s, hq, d).transpose(1, 2), bases[1].view(b, s, hk, d).transpose(1, 2)
    if layout == "contiguous":
        return bases[0], bases[1]
    if layout == "fused":
        b, s, _ = bases[0].shape
        x = bases[0].view(b, s, -1, d)
        return x[:, :, :hq].transpose(1, 2), x[:, :, hq : hq + hk].transpose(1, 2)
    if layout == "strided":
        return bases[0][:, ::2].transpose(1, 2), bases[1][..., ::2].transpose(1, 2)
    raise ValueError(layout)


def _uneven_grad(b, h, s, d, dtype, device=DEVICE):
    """An upstream gradient spanning orders of magnitude by token and head, with zero rows, laid
    out non-contiguously (a transposed view), as attention's backward would hand it over."""
    g = torch.randn(b, s, h, d, device=device)
    g = g * torch.pow(10.0, torch.empty(b, s, h, 1, device=device).uniform_(-2, 2))
    g[:, ::3, 0] = 0.0
    return g.to(dtype).transpose(1, 2)


def _run(fn, layout, bases, hq, hk, d, cos, sin, gq=None, gk=None):
    leaves = [x.detach().clone().requires_grad_(gq is not None) for x in bases]
    q, k = _views(layout, leaves, hq, hk, d)
    oq, ok = fn(q, k, cos, sin)
    if gq is None:
        return oq.detach(), ok.detach(), None
    torch.autograd.backward([oq, ok], [gq, gk])
    return oq.detach(), ok.detach(), [x.grad for x in leaves]


def _assert_no_worse(kernel, ref, truth, what):
    assert kernel.dtype == ref.dtype, what
    k_err = (kernel.double() - truth).abs().max().item()
    r_err = (ref.double() - truth).abs().max().item()
    eps = torch.finfo(ref.dtype).eps * 0.1 * max(truth.abs().max().item(), 1e-30)
    assert k_err <= 1.5 * r_err + eps, f"{what}: kernel err {k_err:.3g} vs reference err {r_err:.3g}"


def _check_against_reference(
    fn, layout, b, s, hq, hk, d, dtype, positions="packed", scaling="default", grads=True, device=DEVICE
):
    bases = [x.to(dtype) for x in _bases(layout, b, s, hq, hk, d, torch.float32, device)]
    cos, sin = _cos_sin(b, s, d, dtype, positions, scaling, device)
    gq = _uneven_grad(b, hq, s, d, dtype, device) if grads else None
    gk = _uneven_grad(b, hk, s, d, dtype, device) if grads else None

    got = _run(fn, layout, bases, hq, hk, d, cos, sin, gq, gk)
    ref = _run(apply_rope_reference, layout, bases, hq, hk, d, cos, sin, gq, gk)
    truth = _run(
        apply_rope_reference, layout, [x.double() for x in bases], hq, hk, d, cos.double(), sin.double(),
        None if gq is None else gq.double(), None if gk is None else gk.double(),
    )
    _assert_no_worse(got[0], ref[0], truth[0], "q")
    _assert_no_worse(got[1], ref[1], truth[1], "k")
    if dtype == torch.float32:
        _assert_close_fp32(got[0], ref[0])
        _assert_close_fp32(got[1], ref[1])
    if grads:
        for i, (g, r, t) in enumerate(zip(got[2], ref[2], truth[2])):
            _assert_no_worse(g, r, t, f"grad of base {i}")
            if dtype == torch.float32:
                _assert_close_fp32(g, r)


def _assert_close_fp32(got, ref):
    # A fused multiply-add on the GPU moves a result by up to an ulp of the largest product, and
    # rotation preserves magnitude, so the scale of the whole tensor bounds the difference.
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


# --------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: small shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "b,s,hq,hk,d",
    [(2, 7, 8, 2, 64), (1, 5, 8, 8, 80), (2, 3, 4, 1, 128), (1, 3, 3, 3, 256)],
    ids=["gqa-d64", "mha-d80", "mqa-d128", "d256"],
)
def test_forward_backward_model_layout(b, s, hq, hk, d, dtype):
    _check_against_reference(rope_mod.apply_rope_triton, "model", b, s, hq, hk, d, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "fused", "strided"])
def test_non_contiguous_layouts(layout, dtype):
    _check_against_reference(rope_mod.apply_rope_triton, layout, 2, 5, 8, 2, 32, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("positions,scaling", [("offset", "llama3"), ("packed", "llama3"), ("arange", "default")])
def test_positions_and_scaling(positions, scaling, dtype):
    _check_against_reference(rope_mod.apply_rope_triton, "model", 2, 9, 4, 2, 64, dtype, positions, scaling)


@pytest.mark.parametrize("hq,hk", [(8, 3), (3, 8), (7, 7)])
def test_several_head_blocks(monkeypatch, hq, hk):
    # A small tile cap splits the heads over several programs per row; k (or q) ends partway.
    monkeypatch.setattr(rope_mod, "_MAX_TILE", 16)
    _check_against_reference(rope_mod.apply_rope_triton, "model", 1, 3, hq, hk, 16, torch.float32)


def test_many_heads_real_tile():
    # 40 q heads of 256 split into 3 blocks of 16 at the real tile cap; 20 k heads end in block 2.
    _check_against_reference(rope_mod.apply_rope_triton, "model", 1, 2, 40, 20, 256, torch.float32, grads=False)


def test_packed_positions_are_per_token():
    # Two documents packed in one row rotate exactly like the same documents in separate rows.
    d, hq, hk = 32, 4, 2
    inv_freq, _ = _inv_freq(d, "default")
    q = torch.randn(1, hq, 7, d, device=DEVICE)
    k = torch.randn(1, hk, 7, d, device=DEVICE)
    cos, sin = rope_cos_sin(torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=DEVICE), inv_freq, 1.0, torch.float32)
    pq, pk = rope_mod.apply_rope_triton(q.clone(), k.clone(), cos, sin)
    for lo, hi in ((0, 3), (3, 7)):
        c, s_ = rope_cos_sin(torch.arange(hi - lo, device=DEVICE)[None], inv_freq, 1.0, torch.float32)
        sq, sk = rope_mod.apply_rope_triton(q[:, :, lo:hi].clone(), k[:, :, lo:hi].clone(), c, s_)
        torch.testing.assert_close(pq[:, :, lo:hi], sq, rtol=0, atol=0)
        torch.testing.assert_close(pk[:, :, lo:hi], sk, rtol=0, atol=0)


def test_gradcheck_float64():
    # The backward is the exact transpose of the forward, also for cos/sin whose halves differ.
    b, s, hq, hk, d = 1, 3, 2, 1, 6
    q = torch.randn(b, hq, s, d, dtype=torch.float64, device=DEVICE, requires_grad=True)
    k = torch.randn(b, hk, s, d, dtype=torch.float64, device=DEVICE, requires_grad=True)
    cos = torch.randn(b, s, d, dtype=torch.float64, device=DEVICE)
    sin = torch.randn(b, s, d, dtype=torch.float64, device=DEVICE)
    assert torch.autograd.gradcheck(lambda q, k: rope_mod.apply_rope_triton(q, k, cos, sin), (q, k), fast_mode=True)
    got = rope_mod.apply_rope_triton(q, k, cos, sin)
    ref = apply_rope_reference(q, k, cos, sin)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_only_q_requires_grad_and_unused_output():
    b, s, hq, hk, d = 1, 4, 4, 2, 16
    cos, sin = _cos_sin(b, s, d, torch.float32)
    q = torch.randn(b, hq, s, d, device=DEVICE, requires_grad=True)
    k = torch.randn(b, hk, s, d, device=DEVICE, requires_grad=True)
    g = torch.randn(b, hq, s, d, device=DEVICE)
    oq, ok = rope_mod.apply_rope_triton(q, k, cos, sin)
    oq.backward(g)  # k's output unused: k gets no gradient, as with the reference
    assert k.grad is None
    q2 = q.detach().clone().requires_grad_()
    apply_rope_reference(q2, k.detach(), cos, sin)[0].backward(g)
    torch.testing.assert_close(q.grad, q2.grad)

    k3 = k.detach().clone()
    oq, ok = rope_mod.apply_rope_triton(q.detach().clone().requires_grad_(), k3, cos, sin)
    oq.sum().backward()
    assert ok is not k3 and k3.grad is None
    torch.testing.assert_close(ok, apply_rope_reference(q, k3, cos, sin)[1])


def test_one_launch_forward_one_launch_backward(monkeypatch):
    launches = []
    real = rope_mod._rope_qk_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(rope_mod, "_rope_qk_kernel", Counting())
    b, s, hq, hk, d = 1, 3, 8, 2, 16
    cos, sin = _cos_sin(b, s, d, torch.float32)
    q = torch.randn(b, s, hq * d, device=DEVICE, requires_grad=True)
    k = torch.randn(b, s, hk * d, device=DEVICE, requires_grad=True)
    qv, kv = q.view(b, s, hq, d).transpose(1, 2), k.view(b, s, hk, d).transpose(1, 2)
    oq, ok = rope_mod.apply_rope_triton(qv, kv, cos, sin)
    assert len(launches) == 1
    (oq.sum() + ok.square().sum()).backward()
    assert len(launches) == 2


def test_in_place_without_grad():
    b, s, hq, hk, d = 2, 5, 4, 2, 32
    cos, sin = _cos_sin(b, s, d, torch.float32)
    bases = _bases("model", b, s, hq, hk, d, torch.float32)
    q, k = _views("model", bases, hq, hk, d)
    want = apply_rope_reference(q, k, cos, sin)
    v0 = q._version
    with torch.no_grad():
        oq, ok = rope_mod.apply_rope_triton(q, k, cos, sin)
    assert oq is q and ok is k and q._version > v0
    torch.testing.assert_close(oq, want[0])
    torch.testing.assert_close(ok, want[1])
    with torch.inference_mode():
        qi, ki = [t.clone() for t in _views("model", bases, hq, hk, d)]
        oq, ok = rope_mod.apply_rope_triton(qi, ki, cos, sin)
        assert oq is qi
    # Grad-free inputs with grad mode on also take the in-place path.
    q2, k2 = q.clone(), k.clone()
    oq, ok = rope_mod.apply_rope_triton(q2, k2, cos, sin)
    assert oq is q2


def test_out_of_place_when_in_place_is_unsafe():
    b, s, h, d = 1, 3, 2, 8
    cos, sin = _cos_sin(b, s, d, torch.float32)
    q = torch.randn(b, h, s, d, device=DEVICE)
    want = apply_rope_reference(q, q, cos, sin)
    with torch.no_grad():
        oq, ok = rope_mod.apply_rope_triton(q, q, cos, sin)  # q and k alias
        assert oq is not q and ok is not q
        torch.testing.assert_close(oq, want[0])
        torch.testing.assert_close(ok, want[1])
        # An expanded (self-overlapping) k cannot be written in place.
        k = torch.randn(b, 1, s, d, device=DEVICE).expand(b, 3, s, d)
        oq, ok = rope_mod.apply_rope_triton(q.clone(), k, cos, sin)
        assert ok is not k
        torch.testing.assert_close(ok, apply_rope_reference(q, k, cos, sin)[1])
        # bf16 q with fp32 cos promotes to fp32, as the reference does.
        qb = q.bfloat16()
        oq, _ = rope_mod.apply_rope_triton(qb, qb.clone(), cos, sin)
        assert oq.dtype == torch.float32 and qb.dtype == torch.bfloat16
        torch.testing.assert_close(oq, apply_rope_reference(qb, qb, cos, sin)[0])


def test_cos_sin_broadcast_over_batch():
    b, s, hq, hk, d = 3, 4, 2, 1, 16
    cos, sin = _cos_sin(1, s, d, torch.float32, positions="arange")
    q = torch.randn(b, hq, s, d, device=DEVICE)
    k = torch.randn(b, hk, s, d, device=DEVICE)
    got = rope_mod.apply_rope_triton(q.clone(), k.clone(), cos, sin)
    want = apply_rope_reference(q, k, cos, sin)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_learned_cos_sin_take_the_reference_path():
    b, s, h, d = 1, 3, 2, 8
    cos, sin = _cos_sin(b, s, d, torch.float32)
    cos.requires_grad_()
    q = torch.randn(b, h, s, d, device=DEVICE, requires_grad=True)
    oq, ok = rope_mod.apply_rope_triton(q, q.detach(), cos, sin)
    (oq.sum() + ok.sum()).backward()
    assert cos.grad is not None and q.grad is not None


def test_clear_errors():
    q = torch.randn(1, 2, 3, 8, device=DEVICE)
    cos, sin = _cos_sin(1, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="partial rotary"):
        rope_mod.apply_rope_triton(q, q.clone(), cos[..., :4], sin[..., :4])
    with pytest.raises(ValueError, match="even"):
        rope_mod.apply_rope_triton(q[..., :7], q[..., :7].clone(), cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="differ"):
        rope_mod.apply_rope_triton(q, q[:, :, :2].clone(), cos, sin)
    with pytest.raises(ValueError, match=r"\(batch, seq, head_dim\)"):
        rope_mod.apply_rope_triton(q, q.clone(), cos[:, :2], sin[:, :2])


def test_apply_rope_dispatches_to_reference_off_cuda():
    q = torch.randn(1, 2, 3, 8)
    cos, sin = _cos_sin(1, 3, 8, torch.float32, device="cpu")
    got = apply_rope(q, q.clone(), cos, sin)
    want = apply_rope_reference(q, q, cos, sin)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# GPU: real sizes, through the dispatching apply_rope
# --------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GPU_IDS = ["fp32", "bf16", "fp16"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_IDS)
@pytest.mark.parametrize("positions,scaling", [("packed", "llama3"), ("arange", "default")])
def test_gpu_llama8b(dtype, positions, scaling):
    # Llama-3.1-8B attention: 32 q heads, 8 kv heads, head_dim 128, seq 4096.
    _check_against_reference(apply_rope, "model", 1, 4096, 32, 8, 128, dtype, positions, scaling, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_IDS)
@pytest.mark.parametrize(
    "b,s,hq,hk,d",
    [(2, 1021, 16, 4, 64), (3, 517, 20, 20, 80), (2, 999, 8, 1, 256), (1, 333, 64, 8, 128)],
    ids=["gqa-d64", "mha-d80", "mqa-d256", "h64-d128"],
)
def test_gpu_odd_shapes(b, s, hq, hk, d, dtype):
    _check_against_reference(apply_rope, "model", b, s, hq, hk, d, dtype, "offset", "llama3", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=GPU_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "fused", "strided"])
def test_gpu_layouts(layout, dtype):
    _check_against_reference(apply_rope, layout, 2, 1024, 32, 8, 128, dtype, device="cuda")


@pytest.mark.gpu
def test_gpu_dispatch_and_in_place_inference():
    b, s, hq, hk, d = 1, 4096, 32, 8, 128
    cos, sin = _cos_sin(b, s, d, torch.bfloat16, "packed", "llama3", device="cuda")
    bases = [x.bfloat16() for x in _bases("model", b, s, hq, hk, d, torch.float32, device="cuda")]
    q, k = _views("model", bases, hq, hk, d)
    want = apply_rope_reference(q, k, cos, sin)
    truth = apply_rope_reference(q.double(), k.double(), cos.double(), sin.double())
    with torch.no_grad():
        oq, ok = apply_rope(q, k, cos, sin)
    assert oq is q and ok is k  # inference rotates in place
    _assert_no_worse(oq, want[0], truth[0], "q")
    _assert_no_worse(ok, want[1], truth[1], "k")
