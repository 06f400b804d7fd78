"""Fused linear cross-entropy against the full-logits reference, and lm_head adapter handling."""

import pytest
import torch
import torch.nn.functional as F
from kernel_rules import DEVICE

from fasttune.kernels.cross_entropy import (
    causal_lm_loss,
    causal_lm_loss_reference,
    shift_labels_left,
)
from fasttune.kernels.fused_linear_ce import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    fused_lm_head_loss,
    lm_head_trains,
)

BLOCK = None if DEVICE == "cuda" else 32
# Triton's interpreter casts fp32 -> bf16 by truncation where the GPU rounds to nearest even, which can
# double the rounding error of a gradient the kernel stores; the rule keeps its 1.5 on the GPU.
INTERP_FACTOR = 1.5 if DEVICE == "cuda" else 3.0


def _labels(B, T, V, frac=0.3, device=DEVICE):
    lab = torch.randint(0, V, (B, T), device=device)
    lab[torch.rand(B, T, device=device) < frac] = -100
    return lab


def _run(fn, tensors, upstream=1.7):
    xs = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    loss = fn(*xs)
    (loss * upstream).backward()
    return loss.detach().float(), [x.grad.float() if x.grad is not None else None for x in xs]


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("train_weight", [False, True])
def test_fp32_matches_reference(use_triton, softcap, train_weight):
    B, T, H, V = 3, 9, 16, 123
    h = torch.randn(B, T, H, device=DEVICE, requires_grad=True)
    W = (torch.randn(V, H, device=DEVICE) * 0.5).requires_grad_(train_weight)
    bias = (torch.randn(V, device=DEVICE) * 0.1).requires_grad_(train_weight)
    labels = _labels(B, T, V)
    kw = {"softcap": softcap}
    lk, gk = _run(lambda h, W, b: fused_linear_cross_entropy(h, W, labels, bias=b, chunk_tokens=5,
                                                             use_triton=use_triton, block_v=BLOCK, **kw), (h, W, bias))
    lr, gr = _run(lambda h, W, b: fused_linear_cross_entropy_reference(h, W, labels, bias=b, **kw), (h, W, bias))
    torch.testing.assert_close(lk, lr, rtol=1e-5, atol=1e-5)
    for a, r in zip(gk, gr):
        assert (a is None) == (r is None)
        if a is not None:
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16] + ([torch.float16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_low_precision_no_worse_than_plain_pytorch(dtype, softcap):
    B, T, H, V = (5, 123, 64, 1000) if DEVICE == "cuda" else (2, 13, 32, 123)
    h = torch.randn(B, T, H, device=DEVICE, requires_grad=True)
    W = (torch.randn(V, H, device=DEVICE) * H**-0.5 * 3).requires_grad_()
    labels = _labels(B, T, V)
    ref = lambda h, W: fused_linear_cross_entropy_reference(h, W, labels, softcap=softcap)

    def plain(h, W):  # low precision everywhere
        z = F.linear(h, W)
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        t = shift_labels_left(labels).reshape(-1)
        return F.cross_entropy(z.reshape(-1, V), t, reduction="sum") / (t != -100).sum()

    lt, gt = _run(ref, (h, W))
    lp, gp = _run(plain, (h.to(dtype), W.to(dtype)))
    for use_triton in {DEVICE == "cuda", True}:
        lk, gk = _run(lambda h, W, use_triton=use_triton: fused_linear_cross_entropy(h, W, labels, softcap=softcap,
                                                              chunk_tokens=7,
                                                              use_triton=use_triton, block_v=BLOCK),
                      (h.to(dtype), W.to(dtype)))
        assert _err(lk, lt) <= 1.5 * _err(lp, lt) + 1e-5
        factor = INTERP_FACTOR if use_triton else 1.5
        for a, p, t in zip(gk, gp, gt):
            assert _err(a, t) <= factor * _err(p, t) + 1e-7


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("n_items", [None, 11, "tensor"])
def test_all_ignored(use_triton, n_items):
    h = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    W = torch.randn(123, 16, device=DEVICE, requires_grad=True)
    labels = torch.full((2, 5), -100, device=DEVICE)
    n = torch.tensor(11, device=DEVICE) if n_items == "tensor" else n_items
    loss = fused_linear_cross_entropy(h, W, labels, num_items_in_batch=n, use_triton=use_triton, block_v=BLOCK)
    loss.backward()
    assert loss.item() == 0
    for g in (h.grad, W.grad):
        assert torch.isfinite(g).all() and g.abs().max() == 0


@pytest.mark.parametrize("use_triton", [False, True])
def test_num_items_shift_labels_and_non_contiguous_hidden(use_triton):
    B, T, H, V = 2, 8, 16, 123
    base = torch.randn(T, B, H + 3, device=DEVICE)
    h = base[..., :H].transpose(0, 1)  # non-contiguous (B, T, H)
    assert not h.is_contiguous()
    W = torch.randn(V, H, device=DEVICE)
    shift = _labels(B, T, V)
    n = torch.tensor(20)
    hk = h.clone().requires_grad_()
    lk = fused_linear_cross_entropy(hk, W, shift_labels=shift, num_items_in_batch=n, chunk_tokens=3,
                                    use_triton=use_triton, block_v=BLOCK)
    (lk * 0.3).backward()
    hr = h.clone().requires_grad_()
    lr = causal_lm_loss_reference(F.linear(hr, W), shift_labels=shift, num_items_in_batch=n)
    (lr * 0.3).backward()
    torch.testing.assert_close(lk, lr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hk.grad, hr.grad, rtol=1e-4, atol=1e-7)


def test_no_grad_and_default_chunk():
    h = torch.randn(2, 9, 16, device=DEVICE)
    W = torch.randn(123, 16, device=DEVICE)
    labels = _labels(2, 9, 123)
    with torch.no_grad():
        lk = fused_linear_cross_entropy(h, W, labels)
    torch.testing.assert_close(lk, fused_linear_cross_entropy_reference(h, W, labels), rtol=1e-5, atol=1e-6)


def test_second_backward_refused():
    h = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    W = torch.randn(123, 16, device=DEVICE)
    loss = fused_linear_cross_entropy(h, W, _labels(2, 5, 123))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


# ----------------------------------------------------------------------------------------------
# lm_head modules


class _Tiny(torch.nn.Module):
    def __init__(self, H=16, V=123, bias=False):
        super().__init__()
        self.body = torch.nn.Linear(H, H)
        self.lm_head = torch.nn.Linear(H, V, bias=bias)


def _module_vs_reference(model, h, labels, softcap=None):
    params = [p for p in model.lm_head.parameters() if p.requires_grad]
    hk = h.clone().requires_grad_()
    loss = fused_lm_head_loss(model.lm_head, hk, labels, softcap=softcap, chunk_tokens=4)
    gk = torch.autograd.grad(loss * 1.3, [hk] + params)
    hr = h.clone().requires_grad_()
    ref = causal_lm_loss_reference(model.lm_head(hr), labels, softcap=softcap)
    gr = torch.autograd.grad(ref * 1.3, [hr] + params)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(gk, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    return gk


def test_plain_lm_head_frozen_and_trained():
    model = _Tiny(bias=True).to(DEVICE)
    h = torch.randn(2, 6, 16, device=DEVICE)
    labels = _labels(2, 6, 123)
    assert lm_head_trains(model.lm_head) == "weight"
    _module_vs_reference(model, h, labels, softcap=5.0)
    model.lm_head.requires_grad_(False)
    assert lm_head_trains(model.lm_head) is None
    _module_vs_reference(model, h, labels)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.parametrize("n_adapters", [1, 2])
def test_lora_on_lm_head_is_trained(n_adapters):
    peft = pytest.importorskip("peft")
    model = _Tiny().to(DEVICE)
    model.requires_grad_(False)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["lm_head"])
    peft.inject_adapter_in_model(cfg, model, adapter_name="a")
    if n_adapters == 2:
        peft.inject_adapter_in_model(cfg, model, adapter_name="b")
        model.lm_head.set_adapter(["a", "b"])
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would hide a dropped term
            with torch.no_grad():
                p.normal_()
    assert lm_head_trains(model.lm_head) == "lora"
    grads = _module_vs_reference(model, torch.randn(2, 6, 16, device=DEVICE), _labels(2, 6, 123))
    assert all(g.abs().max() > 0 for g in grads[1:])
    # a disabled adapter is skipped by PEFT itself, and so by the fused loss
    model.lm_head.enable_adapters(False)
    assert lm_head_trains(model.lm_head) is None


def test_modules_to_save_lm_head_trains_weight():
    peft = pytest.importorskip("peft")
    model = _Tiny().to(DEVICE)
    cfg = peft.LoraConfig(r=4, target_modules=["body"], modules_to_save=["lm_head"])
    pm = peft.get_peft_model(model, cfg)
    lm_head = pm.base_model.model.lm_head
    assert lm_head_trains(lm_head) == "weight"
    _module_vs_reference(pm.base_model.model, torch.randn(2, 6, 16, device=DEVICE), _labels(2, 6, 123))


def test_unsupported_lm_heads_are_refused():
    peft = pytest.importorskip("peft")
    model = _Tiny().to(DEVICE)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, use_dora=True, target_modules=["lm_head"]), model)
    h, labels = torch.randn(1, 4, 16, device=DEVICE), _labels(1, 4, 123)
    with pytest.raises(NotImplementedError, match="DoRA"):
        fused_lm_head_loss(model.lm_head, h, labels)

    class Quantized(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x)

    with pytest.raises(NotImplementedError, match="Quantized"):
        lm_head_trains(Quantized(16, 123))

    class UnknownAdapter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base_layer = torch.nn.Linear(16, 123)

    with pytest.raises(NotImplementedError, match="refuses"):
        fused_lm_head_loss(UnknownAdapter(), h, labels)
    hooked = torch.nn.Linear(16, 123)
    hooked.register_forward_hook(lambda *a: None)
    with pytest.raises(NotImplementedError, match="hooks"):
        lm_head_trains(hooked)


# ----------------------------------------------------------------------------------------------
# real sizes, on the GPU


def _peak_extra(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _time_ms(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_accuracy_at_size(dtype, softcap):
    B, T, H, V = 2, 1024, 4096, 128256
    h = torch.randn(B, T, H, device="cuda", requires_grad=True)
    W = (torch.randn(V, H, device="cuda") * H**-0.5 * 2).requires_grad_()
    labels = _labels(B, T, V, device="cuda")
    lt, gt = _run(lambda h, W: fused_linear_cross_entropy_reference(h, W, labels, softcap=softcap), (h, W))

    def plain(h, W):
        z = F.linear(h, W)
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        return F.cross_entropy(z.reshape(-1, V), shift_labels_left(labels).reshape(-1))

    lp, gp = _run(plain, (h.to(dtype), W.to(dtype)))
    lk, gk = _run(lambda h, W: fused_linear_cross_entropy(h, W, labels, softcap=softcap), (h.to(dtype), W.to(dtype)))
    assert _err(lk, lt) <= 1.5 * _err(lp, lt) + 1e-5
    for a, p, t in zip(gk, gp, gt):
        assert _err(a, t) <= 1.5 * _err(p, t) + 1e-7


@pytest.mark.gpu
@pytest.mark.parametrize("train_weight", [False, True])
def test_gpu_memory_and_time_vs_logits_path(train_weight):
    """Done-when target: peak memory <= 1/8 of the logits path at <= 1.1x its time (lm_head frozen, the
    LoRA case). With a trained lm_head both paths also hold dW (and the fused one an fp32 accumulator)."""
    B, T, H, V = 4, 2048, 4096, 128256  # 8192 tokens, Llama-3-8B's head
    h = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) * H**-0.5).requires_grad_(train_weight)
    labels = torch.randint(0, V, (B, T), device="cuda")

    def logits_path():
        loss = causal_lm_loss(F.linear(h, W), labels)
        loss.backward()
        h.grad = W.grad = None

    def fused_path():
        loss = fused_linear_cross_entropy(h, W, labels)
        loss.backward()
        h.grad = W.grad = None

    mem_logits, mem_fused = _peak_extra(logits_path), _peak_extra(fused_path)
    t_logits, t_fused = _time_ms(logits_path), _time_ms(fused_path)
    print(f"train_weight={train_weight}: peak extra {mem_fused / 2**20:.0f} MiB vs {mem_logits / 2**20:.0f} MiB, "
          f"time {t_fused:.2f} ms vs {t_logits:.2f} ms")
    if train_weight:  # dW (fp32 while it accumulates, then its bf16 result) dominates both paths here
        assert mem_fused <= 0.9 * mem_logits  # H100: 0.80 (3.19 GB against 4.01 GB)
        # H100s measured 1.10, 1.23-1.29 and 1.26 on different machines (the chunks' GEMMs write the fp32
        # dW accumulator; how much that costs varies with the card): the bound allows that spread
        assert t_fused <= 1.35 * t_logits
    else:
        assert mem_fused <= mem_logits / 8
        assert t_fused <= 1.1 * t_logits
