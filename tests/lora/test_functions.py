"""Fused LoRA functions against PEFT over the same weights: outputs, dx, dA, dB.

fp32: within 1e-5 of PEFT, relative to the values' scale. bf16: error against an fp64 truth (the
same weights and inputs, PEFT in float64) no worse than PEFT's own bf16 error (kernel_rules'
assert_no_worse). The bf16 reference is PEFT under bf16 autocast with the adapters in fp32 (how a
bf16 training run calls it); the fused functions are run both under autocast and on bf16 inputs
without it, where they compute in x's dtype just the same.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util

import pytest
import torch
from kernel_rules import (  # tests/kernel_rules.py (tests/ is on sys.path)
    assert_no_worse,
    needs_kernel,
)
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from fasttune.kernels.activations import glu_activation_reference
from fasttune.lora import (
    MLP_ACTIVATIONS,
    lora_linear,
    lora_mlp,
    lora_o,
    lora_projection,
    lora_projections,
    lora_qkv,
    why_not_fused,
)

act = importlib.import_module("fasttune.kernels.activations")
lora_functions = importlib.import_module("fasttune.lora.functions")

# Odd sizes: 3 x 7 tokens, hidden 96, intermediate 80, r 8; k/v narrower as with GQA.
BATCH, SEQ, HIDDEN, INTER, KV = 3, 7, 96, 80, 32
SHAPES = {
    "proj": (HIDDEN, INTER),
    "gate_proj": (HIDDEN, INTER),
    "up_proj": (HIDDEN, INTER),
    "down_proj": (INTER, HIDDEN),
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, KV),
    "v_proj": (HIDDEN, KV),
    "o_proj": (HIDDEN, HIDDEN),
}
MODES = ["fp32", "bf16", "bf16_autocast", "fp32_in_autocast"]


class Net(nn.Module):
    def __init__(self, names, bias=False):
        super().__init__()
        for n in names:
            setattr(self, n, nn.Linear(*SHAPES[n], bias=bias))


def peft_net(names, targets=None, bias=False, **cfg):
    """A PEFT-wrapped Net with non-zero lora_B (so every gradient is meaningful)."""
    kw = {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": list(targets or names),
        "lora_dropout": 0.0,
    }
    kw.update(cfg)
    model = get_peft_model(Net(names, bias=bias), LoraConfig(**kw))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    return model


def layers(model, names):
    return [getattr(model.base_model.model, n) for n in names]


def adapter_params(modules):
    return [
        p
        for m in modules
        if hasattr(m, "lora_A")
        for p in m.parameters()
        if p.requires_grad
    ]


def run(fn, x, params, dys):
    """Outputs of fn(x) (a tensor or tuple) and the gradients of x and params, given dys."""
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(
        outs, [x, *params], [d.to(o.dtype) for o, d in zip(outs, dys)]
    )
    return [*outs, *grads]


def compare(mode, names, peft_fn, fused_fn, device="cpu"):
    """Run peft_fn(modules)(x) and fused_fn(projections)(x) over one model under `mode`."""
    model = peft_net(names).to(device)
    low = mode != "fp32"
    if low:  # base weights in bf16, adapters stay fp32, as PEFT keeps them
        for m in layers(model, names):
            (m.get_base_layer() if hasattr(m, "base_layer") else m).to(torch.bfloat16)
    mods = layers(model, names)
    params = adapter_params(mods)
    x_dtype = torch.bfloat16 if mode in ("bf16", "bf16_autocast") else torch.float32
    x = torch.randn(BATCH, SEQ, SHAPES[names[0]][0], device=device)
    x = x.to(x_dtype).requires_grad_()
    with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=low):
        probe = peft_fn(mods)(x.detach())
    probe = probe if isinstance(probe, tuple) else (probe,)
    dys = [torch.randn(o.shape, device=device) for o in probe]

    projs = lora_projections(*mods)
    assert projs is not None, [why_not_fused(m) for m in mods]
    on = mode in ("bf16_autocast", "fp32_in_autocast")
    autocast = torch.autocast(device, torch.bfloat16, enabled=on)
    with autocast:
        got = run(fused_fn(projs), x, params, dys)
    if not low:
        want = run(peft_fn(mods), x, params, dys)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == w.dtype and g.shape == w.shape, i
            err = (g - w).abs().max().item()
            assert err <= 1e-5 * w.abs().max().item() + 1e-7, (i, err)
        return
    with torch.autocast(device, torch.bfloat16):
        want = run(peft_fn(mods), x, params, dys)
    model64 = copy.deepcopy(model).double()
    mods64 = layers(model64, names)
    x64 = x.detach().double().requires_grad_()
    truth = run(peft_fn(mods64), x64, adapter_params(mods64), [d.double() for d in dys])
    assert len(got) == len(want) == len(truth)
    for i, (g, w, t) in enumerate(zip(got, want, truth)):
        assert_no_worse(f"{mode} #{i}", g, w, t, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# numerics against PEFT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_lora_linear_matches_peft(mode):
    compare(mode, ["proj"], lambda m: m[0], lambda p: lambda x: lora_linear(x, *p[0]))


def test_lora_linear_noncontiguous_input():
    model = peft_net(["proj"])
    (layer,) = layers(model, ["proj"])
    p = lora_projection(layer)
    x = torch.randn(SEQ, BATCH, HIDDEN).transpose(0, 1).requires_grad_()
    dy = torch.randn(BATCH, SEQ, INTER)
    got = run(lambda t: lora_linear(t, *p), x, [p.A, p.B], [dy])
    want = run(layer, x, [p.A, p.B], [dy])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_lora_qkv_and_o_match_peft(mode):
    names = ["q_proj", "k_proj", "v_proj"]
    compare(
        mode,
        names,
        lambda m: lambda x: tuple(f(x) for f in m),
        lambda p: lambda x: lora_qkv(x, *p),
    )
    compare(mode, ["o_proj"], lambda m: m[0], lambda p: lambda x: lora_o(x, p[0]))


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("mode", MODES)
def test_lora_mlp_matches_peft(mode, activation):
    kind = MLP_ACTIVATIONS[activation]
    names = ["gate_proj", "up_proj", "down_proj"]

    def peft_fn(m):
        return lambda x: m[2](glu_activation_reference(m[0](x), m[1](x), kind))

    compare(mode, names, peft_fn, lambda p: lambda x: lora_mlp(x, *p, activation))


MLP_NAMES = ["gate_proj", "up_proj", "down_proj"]


def _mlp_ref(kind):
    def peft_fn(m):
        return lambda x: m[2](glu_activation_reference(m[0](x), m[1](x), kind))

    return peft_fn


@needs_kernel(act, "_glu_fwd_kernel")
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_lora_mlp_through_the_triton_activation(mode, activation, monkeypatch):
    """The MLP's activation through the Triton launchers (the interpreter on a CPU)."""
    monkeypatch.setattr(lora_functions, "_use_glu_kernel", lambda g: True)
    kind = MLP_ACTIVATIONS[activation]
    fused = lambda p: lambda x: lora_mlp(x, *p, activation)
    compare(mode, MLP_NAMES, _mlp_ref(kind), fused)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_on_cuda(mode):
    """Dispatch as in training: Triton activation, cuBLAS, mm(out_dtype=fp32) for dA/dB."""
    dev = "cuda"
    fused = lambda p: lambda x: lora_mlp(x, *p, "silu")
    compare(mode, MLP_NAMES, _mlp_ref("silu"), fused, device=dev)
    qkv = ["q_proj", "k_proj", "v_proj"]
    ref = lambda m: lambda x: tuple(f(x) for f in m)
    compare(mode, qkv, ref, lambda p: lambda x: lora_qkv(x, *p), device=dev)


def test_lora_mlp_partial_adapters():
    """up_proj not targeted: a plain frozen nn.Linear inside the fused MLP (A = B = None)."""
    names = ["gate_proj", "up_proj", "down_proj"]
    model = peft_net(names, targets=["gate_proj", "down_proj"])
    mods = layers(model, names)
    assert type(mods[1]) is nn.Linear and not mods[1].weight.requires_grad
    projs = lora_projections(*mods)
    assert projs[1].A is None and projs[1].B is None
    params = adapter_params(mods)
    assert len(params) == 4
    x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    dy = torch.randn(BATCH, SEQ, HIDDEN)
    got = run(lambda t: lora_mlp(t, *projs, "silu"), x, params, [dy])
    want = run(
        lambda t: mods[2](glu_activation_reference(mods[0](t), mods[1](t), "silu")),
        x,
        params,
        [dy],
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_lora_qkv_partial_adapters_of_different_ranks():
    """k_proj not targeted and q/v of different ranks (PEFT's rank_pattern): the adapters stacked for one
    x A^T product and one dx term are split back per projection."""
    names = ["q_proj", "k_proj", "v_proj"]
    model = peft_net(names, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 4})
    mods = layers(model, names)
    projs = lora_projections(*mods)
    assert projs[1].A is None and projs[0].A.shape[0] == 8 and projs[2].A.shape[0] == 4
    params = adapter_params(mods)
    x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    dys = [torch.randn(BATCH, SEQ, m.weight.shape[0] if isinstance(m, nn.Linear) else m.base_layer.weight.shape[0])
           for m in mods]
    got = run(lambda t: lora_qkv(t, *projs), x, params, dys)
    want = run(lambda t: tuple(m(t) for m in mods), x, params, dys)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_plain_frozen_linear_without_adapter():
    lin = nn.Linear(HIDDEN, INTER, bias=False).requires_grad_(False)
    p = lora_projection(lin)
    assert p.weight is lin.weight and p.A is None and p.B is None
    x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    dy = torch.randn(BATCH, SEQ, INTER)
    for g, w in zip(
        run(lambda t: lora_linear(t, *p), x, [], [dy]), run(lin, x, [], [dy])
    ):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_under_non_reentrant_checkpoint():
    names = ["gate_proj", "up_proj", "down_proj"]
    model = peft_net(names)
    mods = layers(model, names)
    projs = lora_projections(*mods)
    params = adapter_params(mods)
    x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    dy = torch.randn(BATCH, SEQ, HIDDEN)

    def f(t):
        return lora_mlp(t, *projs, "silu")

    plain = run(f, x, params, [dy])
    ckpt = run(lambda t: checkpoint(f, t, use_reentrant=False), x, params, [dy])
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# quantized base weights: re-dequantized in backward, nothing dense saved
# --------------------------------------------------------------------------------------------


class CountingQuant:
    """A quantized-weight stand-in: keeps the weight transposed in fp32 (so a dequantized copy
    is always a fresh tensor) and counts dequantize calls."""

    def __init__(self, w: torch.Tensor):
        self._t = w.detach().float().t().contiguous()
        self.shape = tuple(w.shape)
        self.calls = 0

    def dequantize(self, dtype=None):
        self.calls += 1
        return self._t.t().to(dtype or torch.float32)


class QuantLinear(nn.Module):
    """A base layer exposing its weight through the quant_weight hook."""

    def __init__(self, q: CountingQuant):
        super().__init__()
        self.quant_weight = q

    def forward(self, x):
        return x @ self.quant_weight.dequantize(x.dtype).t()


def record_saved():
    seen = []

    def pack(t):
        seen.append(tuple(t.shape))
        return t

    return seen, saved_tensors_hooks(pack, lambda t: t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_weight_is_dequantized_again_and_never_saved(dtype):
    model = peft_net(["proj"])
    (layer,) = layers(model, ["proj"])
    q = CountingQuant(layer.base_layer.weight)
    layer.base_layer = QuantLinear(
        q
    )  # the PEFT layer now runs over the quantized stand-in
    p = lora_projection(layer)
    assert p.weight is q
    x = torch.randn(BATCH, SEQ, HIDDEN, dtype=dtype, requires_grad=True)
    dy = torch.randn(BATCH, SEQ, INTER, dtype=dtype)

    seen, hooks = record_saved()
    with hooks:
        y = lora_linear(x, *p)
    assert q.calls == 1
    assert (
        BATCH * SEQ,
        HIDDEN,
    ) in seen  # the hook saw the saves: the check below is not vacuous
    assert all(torch.Size(s).numel() != INTER * HIDDEN for s in seen), seen
    assert max(torch.Size(s).numel() for s in seen) == BATCH * SEQ * HIDDEN
    got = [y, *torch.autograd.grad(y, [x, p.A, p.B], dy)]
    assert q.calls == 2  # backward dequantized again for dx

    q.calls = 0
    want = run(layer, x, [p.A, p.B], [dy])
    for g, w in zip(got, want):
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(
            g.float(), w.float(), rtol=tol, atol=tol * w.abs().max().item()
        )

    # No dx wanted: backward never needs the base weight.
    q.calls = 0
    xd = x.detach()
    torch.autograd.grad(lora_linear(xd, *p), [p.A, p.B], dy)
    assert q.calls == 1


def test_dense_weight_not_saved_and_mlp_saves_no_activation_output():
    names = ["gate_proj", "up_proj", "down_proj"]
    model = peft_net(names)
    projs = lora_projections(*layers(model, names))
    x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    seen, hooks = record_saved()
    with hooks:
        lora_mlp(x, *projs, "silu").sum().backward()
    numels = [torch.Size(s).numel() for s in seen]
    assert INTER * HIDDEN not in numels, seen
    # gate and up pre-activations only: act(gate) * up is recomputed, not stored.
    assert numels.count(BATCH * SEQ * INTER) == 2, seen
    assert numels.count(BATCH * SEQ * HIDDEN) == 1, seen  # x, once


def test_quantized_mlp_and_qkv():
    names = ["gate_proj", "up_proj", "down_proj"]
    model = peft_net(names)
    mods = layers(model, names)
    projs = lora_projections(*mods)
    quants = [CountingQuant(p.weight) for p in projs]
    qprojs = [p._replace(weight=q) for p, q in zip(projs, quants)]
    params = adapter_params(mods)
    x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
    dy = torch.randn(BATCH, SEQ, HIDDEN)
    want = run(lambda t: lora_mlp(t, *projs, "gelu"), x, params, [dy])
    got = run(lambda t: lora_mlp(t, *qprojs, "gelu"), x, params, [dy])
    assert [q.calls for q in quants] == [2, 2, 2]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)

    names = ["q_proj", "k_proj", "v_proj"]
    model = peft_net(names)
    mods = layers(model, names)
    projs = lora_projections(*mods)
    quants = [CountingQuant(p.weight) for p in projs]
    params = adapter_params(mods)
    dys = [torch.randn(BATCH, SEQ, SHAPES[n][1]) for n in names]
    seen, hooks = record_saved()
    with hooks:
        got = run(
            lambda t: lora_qkv(
                t, *[p._replace(weight=q) for p, q in zip(projs, quants)]
            ),
            x,
            params,
            dys,
        )
    assert [q.calls for q in quants] == [2, 2, 2]
    assert [torch.Size(s).numel() for s in seen].count(
        BATCH * SEQ * HIDDEN
    ) == 1  # x saved once
    want = run(lambda t: tuple(m(t) for m in mods), x, params, dys)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_output_false_skips_the_last_base_matmul_and_keeps_the_gradients():
    """output=False (a checkpoint recompute whose result only feeds the residual stream): zeros come back,
    down_proj's / o_proj's base weight is never dequantized, and dx, dA, dB are those of output=True."""
    for names, fn in ((MLP_NAMES, lambda t, p, out: lora_mlp(t, *p, "silu", output=out)),
                      (["o_proj"], lambda t, p, out: lora_o(t, p[0], output=out))):
        model = peft_net(names)
        mods = layers(model, names)
        projs = lora_projections(*mods)
        params = adapter_params(mods)
        x = torch.randn(BATCH, SEQ, SHAPES[names[0]][0], requires_grad=True)
        dy = torch.randn(BATCH, SEQ, SHAPES[names[-1]][1])
        want = run(lambda t: fn(t, projs, True), x, params, [dy])
        quants = [CountingQuant(p.weight) for p in projs]
        qprojs = [p._replace(weight=q) for p, q in zip(projs, quants)]
        got = run(lambda t: fn(t, qprojs, False), x, params, [dy])
        assert [q.calls for q in quants] == [2] * (len(names) - 1) + [1], names  # the last: backward's dx only
        assert not got[0].any() and got[0].shape == want[0].shape
        for g, w in zip(got[1:], want[1:]):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# eligibility
# --------------------------------------------------------------------------------------------


def one_layer(**cfg):
    model = peft_net(["proj"], **cfg)
    return model, layers(model, ["proj"])[0]


def test_eligible_layer_gives_its_parameters():
    _, layer = one_layer()
    p = lora_projection(layer)
    assert p.weight is layer.base_layer.weight
    assert (
        p.A is layer.lora_A["default"].weight and p.B is layer.lora_B["default"].weight
    )
    assert p.scaling == 2.0
    assert why_not_fused(layer) is None


@pytest.mark.parametrize(
    "cfg",
    [
        {"lora_dropout": 0.1},
        {"use_dora": True},
        {"lora_bias": True},
        {"bias": True},  # the base layer's own bias
    ],
    ids=["dropout", "dora", "lora_bias", "base_bias"],
)
def test_ineligible_configs(cfg):
    if cfg.get("lora_bias"):
        with pytest.warns(UserWarning):  # PEFT warns: the base layer has no bias
            _, layer = one_layer(**cfg)
    else:
        _, layer = one_layer(**cfg)
    assert lora_projection(layer) is None
    assert isinstance(why_not_fused(layer), str)


def test_multiple_active_adapters_and_switching():
    model, layer = one_layer()
    model.add_adapter(
        "second",
        LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0),
    )
    model.base_model.set_adapter(["default", "second"])
    assert lora_projection(layer) is None
    model.base_model.set_adapter("second")
    p = lora_projection(layer)
    assert p.A is layer.lora_A["second"].weight and p.A.shape[0] == 4


def test_active_adapter_not_in_this_layer():
    model = peft_net(["proj", "o_proj"], targets=["proj", "o_proj"])
    model.add_adapter(
        "other",
        LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], lora_dropout=0.0),
    )
    model.base_model.set_adapter("other")
    proj = layers(model, ["proj"])[0]
    p = lora_projection(
        proj
    )  # PEFT runs the base layer alone here; so does the fused path
    assert p is not None and p.A is None and p.weight is proj.base_layer.weight


def test_disabled_merged_hooked():
    model, layer = one_layer()
    with model.disable_adapter():
        assert lora_projection(layer) is None
    assert lora_projection(layer) is not None
    handle = layer.register_forward_hook(lambda *a: None)
    assert lora_projection(layer) is None
    handle.remove()
    layer.merge()
    assert lora_projection(layer) is None


def test_plain_linear_eligibility():
    lin = nn.Linear(HIDDEN, INTER, bias=False)
    assert lora_projection(lin) is None  # trainable weight: the fused path has no dW
    lin.requires_grad_(False)
    assert lora_projection(lin) is not None
    assert (
        lora_projection(nn.Linear(HIDDEN, INTER).requires_grad_(False)) is None
    )  # bias
    q = QuantLinear(CountingQuant(torch.randn(INTER, HIDDEN)))
    assert lora_projection(q).weight is q.quant_weight
    assert lora_projections(lin, q, nn.Linear(2, 2)) is None


def test_argument_errors():
    w = torch.randn(INTER, HIDDEN)
    x = torch.randn(2, HIDDEN)
    with pytest.raises(ValueError, match="requires grad"):
        lora_linear(x, w.clone().requires_grad_())
    with pytest.raises(ValueError, match="features"):
        lora_linear(torch.randn(2, 5), w)
    with pytest.raises(ValueError, match="both A and B"):
        lora_linear(x, w, torch.randn(8, HIDDEN), None)
    with pytest.raises(ValueError, match="do not fit"):
        lora_linear(x, w, torch.randn(8, HIDDEN), torch.randn(INTER, 4))
    with pytest.raises(ValueError, match="not supported"):
        lora_mlp(
            x,
            (w, None, None, 1.0),
            (w, None, None, 1.0),
            (w.t(), None, None, 1.0),
            "relu",
        )


@needs_kernel(act, "_glu_bwd_kernel")
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_mlp_recompute_backward_in_place_through_the_triton_activation(mode, monkeypatch):
    """output=False (a checkpoint recompute) lets the backward overwrite the saved gate/up with their
    gradients and dh with h, in the Triton kernel: the gradients are those of an ordinary output=True node."""
    dtype = torch.float32 if mode == "fp32" else torch.bfloat16
    model = peft_net(MLP_NAMES)
    mods = layers(model, MLP_NAMES)
    projs = lora_projections(*mods)
    params = adapter_params(mods)
    x = torch.randn(BATCH, SEQ, SHAPES["gate_proj"][0]).to(dtype).requires_grad_()
    dy = torch.randn(BATCH, SEQ, SHAPES["down_proj"][1]).to(dtype)
    want = run(lambda t: lora_mlp(t, *projs, "silu", output=True), x, params, [dy])
    monkeypatch.setattr(lora_functions, "_use_glu_kernel", lambda g: True)
    got = run(lambda t: lora_mlp(t, *projs, "silu", output=False), x, params, [dy])
    tol = {"rtol": 1e-5, "atol": 1e-5} if mode == "fp32" else {"rtol": 2e-2, "atol": 2e-2}
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.float(), w.float(), **tol)
