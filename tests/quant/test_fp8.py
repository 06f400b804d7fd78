"""FP8 (e4m3) weights: the format against an oracle written here, transformers' checkpoint layout, the
scaled-matmul forward, QuantLinear and FastLanguageModel.from_pretrained(load_in_fp8=...).

Oracles: `oracle()` groups by padding to whole blocks and rounds to e4m3 by searching the table of all
e4m3 values (ties to the even code), not through torch's cast; transformers' own fp8 dequantization for the
meaning of `weight_scale_inv`; plain dequantize + matmul for the forward; a dense twin of the model with
the dequantized weights for from_pretrained."""

from __future__ import annotations

import json
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_qlora import PROJECTIONS
from test_training import MAX_LEN

from fasttune import FastLanguageModel
from fasttune.lora import lora_linear
from fasttune.quant import fp8
from fasttune.quant.fp8 import (
    FP8Tensor,
    fp8_from_checkpoint,
    fp8_to_checkpoint,
    is_fp8_checkpoint,
    quantize_fp8,
    quantize_rows,
    scaled_mm_applies,
    scaled_mm_rowwise,
)
from fasttune.quant.linear import QuantLinear
from fasttune.quant.loading import prequantized_format, skipped_modules

HAS_CUDA = torch.cuda.is_available()
E4M3 = torch.float8_e4m3fn
SHAPES = [(5, 123), (200, 300), (1, 1), (128, 256), (257, 129)]


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------

# every finite non-negative e4m3fn value, by code: codes 0x00..0x7e increase with the value (0x7f is nan)
_E4M3_VALUES = torch.arange(127, dtype=torch.uint8).view(E4M3).float()


def round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """fp32 values (|v| <= 448) rounded to the nearest e4m3 value, ties to the even code, by table search."""
    mag = v.abs().flatten()
    hi = torch.searchsorted(_E4M3_VALUES, mag).clamp(max=126)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = mag - _E4M3_VALUES[lo], _E4M3_VALUES[hi] - mag
    pick = torch.where(
        d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi))
    )
    return (_E4M3_VALUES[pick] * torch.sign(v.flatten())).view(v.shape)


def oracle(w: torch.Tensor, granularity: str):
    """(code values (out, in) fp32, scales, scales expanded to (out, in)) with whole padded blocks."""
    x = w.float()
    rows, cols = x.shape
    if granularity == "row":
        absmax = x.abs().amax(dim=1) if cols else torch.zeros(rows)
        scale = torch.where(absmax > 0, absmax / 448, torch.ones_like(absmax))
        full = scale[:, None].expand(rows, cols)
    else:
        nr, nc = -(-rows // 128), -(-cols // 128)
        padded = torch.zeros(nr * 128, nc * 128)
        padded[:rows, :cols] = x.abs()
        absmax = (
            padded.view(nr, 128, nc, 128)
            .permute(0, 2, 1, 3)
            .reshape(nr, nc, -1)
            .amax(dim=-1)
        )
        scale = torch.where(absmax > 0, absmax / 448, torch.ones_like(absmax))
        full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    return round_e4m3((x / full).clamp(-448, 448)), scale, full


def make_weight(shape, dtype=torch.float32, seed=0):
    """Rows over five decades, one zero row and, where there is one, a zero 128 x 128 block."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[0])[:, None]
    if shape[0] > 2:
        w[1] = 0
    if shape[0] >= 256 and shape[1] >= 128:
        w[128:256, :128] = 0
    return w.to(dtype)


# --------------------------------------------------------------------------------------------
# The format
# --------------------------------------------------------------------------------------------


def test_round_e4m3_oracle_agrees_with_known_values():
    got = round_e4m3(
        torch.tensor(
            [0.0, 1.0, 1.0625, 1.1875, 17.0, 448.0, -3.3, 2.0**-10, 2.0**-9 * 1.5]
        )
    )
    # 1.0625 is halfway between 1 (code 0x38, even) and 1.125; 1.1875 between 1.125 and 1.25 (0x3a, even);
    # 17 between 16 (0x50) and 18; 2^-10 between 0 and the smallest subnormal 2^-9 (code 1, odd)
    want = torch.tensor([0.0, 1.0, 1.0, 1.25, 16.0, 448.0, -3.25, 0.0, 2.0**-8])
    assert torch.equal(got, want)


@pytest.mark.parametrize("chunk", [None, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", ["row", "block"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_oracle(shape, granularity, dtype, chunk, monkeypatch):
    if chunk is not None:  # many small steps: the chunk borders must not show
        monkeypatch.setattr(fp8, "_CHUNK", chunk)
    w = make_weight(shape, dtype)
    q = quantize_fp8(w, granularity)
    codes, scale, full = oracle(w, granularity)
    assert (
        q.data.dtype == E4M3
        and q.shape == w.shape
        and q.granularity == granularity
        and q.dtype == dtype
    )
    assert torch.equal(q.scale, scale)
    assert torch.equal(q.data.float(), codes)
    want = codes * full  # fp32 products, then one rounding
    assert torch.equal(q.dequantize(torch.float32), want)
    assert torch.equal(q.dequantize(), want.to(dtype))
    assert q.nbytes == w.numel() + 4 * scale.numel()
    # within half an e4m3 step of the weight: at most 16 scales (the step is 32 in [256, 448]), plus the fp32
    # roundings of the quotient and the product (each <= 448 * 2^-24 scales)
    assert (
        (q.dequantize(torch.float32) - w.float()).abs() <= full * 16 * (1 + 1e-5)
    ).all()


def test_zero_weight_and_refusals():
    for granularity in ("row", "block"):
        q = quantize_fp8(torch.zeros(130, 140), granularity)
        assert (
            (q.scale == 1).all()
            and (q.data.float() == 0).all()
            and (q.dequantize() == 0).all()
        )
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_fp8(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="granularity"):
        quantize_fp8(torch.ones(2, 2), "column")
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="dtype"):
        quantize_fp8(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="scales"):
        FP8Tensor(torch.zeros(4, 4, dtype=E4M3), torch.ones(4), "block")


# --------------------------------------------------------------------------------------------
# Checkpoint layout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["row", "block"])
def test_checkpoint_round_trip(granularity, tmp_path):
    w = make_weight((200, 300), torch.bfloat16)
    q = quantize_fp8(w, granularity)
    prefix = "model.layers.0.mlp.down_proj."
    sd = fp8_to_checkpoint(q, prefix)
    assert set(sd) == {
        prefix + "weight",
        prefix + "weight_scale_inv",
    } and is_fp8_checkpoint(sd, prefix)
    assert (
        sd[prefix + "weight"].dtype == E4M3
        and sd[prefix + "weight_scale_inv"].dtype == torch.float32
    )
    assert tuple(sd[prefix + "weight_scale_inv"].shape) == (
        (200, 1) if granularity == "row" else (2, 3)
    )
    save_file(sd, tmp_path / "m.safetensors")
    back = fp8_from_checkpoint(
        load_file(tmp_path / "m.safetensors"), prefix, dtype=torch.bfloat16
    )
    assert back.granularity == granularity and back.dtype == torch.bfloat16
    assert torch.equal(
        back.data.view(torch.uint8), q.data.view(torch.uint8)
    ) and torch.equal(back.scale, q.scale)


@pytest.mark.parametrize("granularity", ["row", "block"])
def test_checkpoint_means_what_transformers_reads(granularity):
    """transformers' own fp8 dequantization (which multiplies by weight_scale_inv, expanding block scales over
    partial blocks) of what fp8_to_checkpoint writes gives our dequantized weight."""
    finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")
    dequantize = getattr(finegrained, "_dequantize_fp8_weight", None)
    if dequantize is None:
        pytest.skip("this transformers has no _dequantize_fp8_weight")
    q = quantize_fp8(make_weight((200, 300)), granularity)
    sd = fp8_to_checkpoint(q)
    # a row scale is a block of one row
    block = [1, 300] if granularity == "row" else [128, 128]
    theirs = dequantize(sd["weight"], sd["weight_scale_inv"], block, torch.float32)
    assert torch.equal(theirs, q.dequantize(torch.float32))


def test_checkpoint_variants_and_refusals():
    q = quantize_fp8(make_weight((5, 123)), "row")
    # (out,) row scales
    flat = fp8_from_checkpoint({"weight": q.data, "weight_scale_inv": q.scale})
    assert flat.granularity == "row" and torch.equal(flat.scale, q.scale)
    per_tensor = fp8_from_checkpoint(
        {"weight": q.data, "weight_scale_inv": torch.tensor(0.5)}
    )
    assert per_tensor.granularity == "row" and torch.equal(
        per_tensor.dequantize(torch.float32), q.data.float() * 0.5
    )
    with pytest.raises(NotImplementedError, match="shape"):
        fp8_from_checkpoint({"weight": q.data, "weight_scale_inv": torch.ones(5, 2)})
    with pytest.raises(ValueError, match="must be"):
        fp8_from_checkpoint({"weight": q.data.float(), "weight_scale_inv": q.scale})
    with pytest.raises(ValueError, match="missing"):
        fp8_from_checkpoint({"weight": q.data})


def test_prequantized_format_reads_fp8_configs():
    def config(**qc):
        return SimpleNamespace(quantization_config=qc)

    qwen3 = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    assert prequantized_format(config(**qwen3)) == "fp8"
    kept = config(**qwen3, modules_to_not_convert=["mlp.gate"])
    assert skipped_modules(kept) == ("lm_head", "mlp.gate")
    assert (
        prequantized_format(config(quant_method="fp8", weight_block_size=None)) == "fp8"
    )
    with pytest.raises(NotImplementedError, match="weight_block_size"):
        prequantized_format(config(quant_method="fp8", weight_block_size=[64, 64]))
    with pytest.raises(NotImplementedError, match="e5m2"):
        prequantized_format(config(quant_method="fp8", fmt="e5m2"))
    with pytest.raises(NotImplementedError, match="'awq' are not supported"):
        prequantized_format(config(quant_method="awq"))


# --------------------------------------------------------------------------------------------
# The forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["row", "block"])
def test_linear_is_dequantize_and_matmul_on_cpu(granularity, dtype):
    q = quantize_fp8(make_weight((200, 300)), granularity)
    x = torch.randn(7, 300).to(dtype)
    assert not scaled_mm_applies(x, q, dtype)
    assert torch.equal(q.linear(x, dtype), x @ q.dequantize(dtype).t())


def test_quantize_rows_matches_oracle():
    x = torch.randn(6, 50) * torch.logspace(-2, 2, 6)[:, None]
    x[2] = 0
    codes, a = quantize_rows(x.to(torch.bfloat16))
    absmax = x.to(torch.bfloat16).float().abs().amax(dim=1, keepdim=True)
    want_a = torch.where(absmax > 0, absmax / 448, torch.ones_like(absmax))
    assert torch.equal(a, want_a)
    assert torch.equal(
        codes.float(),
        round_e4m3((x.to(torch.bfloat16).float() / want_a).clamp(-448, 448)),
    )


def test_scaled_mm_rowwise_computes_the_scaled_product():
    """The arguments of torch._scaled_mm (which side each scale multiplies) on CPU, where torch runs it too:
    fp32 output equals the product of the dequantized fp8 operands."""
    q = quantize_fp8(make_weight((48, 64)), "row")
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    try:
        got = scaled_mm_rowwise(x, q, torch.float32)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"this torch has no CPU _scaled_mm: {err}")
    x8, a = quantize_rows(x)
    want = (x8.float() * a) @ q.dequantize(torch.float32).t()
    torch.testing.assert_close(
        got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item()
    )


@pytest.mark.parametrize("own_kernel", [True, False])
def test_lora_forward_uses_linear_and_backward_dequantize(own_kernel):
    class Marked:
        """A weight whose own kernel adds 1 (the forward must show it, dx must not); without one
        (`linear(..., fallback=False)` gives None) the forward goes through `dequantize`."""

        def __init__(self, w):
            self.w, self.shape = w, w.shape

        def dequantize(self, dtype=None):
            return self.w.to(dtype or self.w.dtype)

        def linear(self, x2, dtype, fallback=True):
            return x2.to(dtype) @ self.w.to(dtype).t() + 1 if own_kernel else None

    w = torch.randn(6, 8)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    x = torch.randn(3, 8, requires_grad=True)
    y = lora_linear(x, Marked(w), A, B, 0.5)
    torch.testing.assert_close(y, x.detach() @ w.t() + 0.5 * (x.detach() @ A.t()) @ B.t() + float(own_kernel))
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy @ w + 0.5 * (dy @ B) @ A)


# --------------------------------------------------------------------------------------------
# QuantLinear
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["row", "block"])
def test_quant_linear_state_dict_and_casts(granularity):
    w = make_weight((200, 300), torch.bfloat16)
    layer = QuantLinear(300, 200, fmt="fp8", granularity=granularity)
    layer.quantize_from(w)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight_scale_inv"} and sd["weight"].dtype == E4M3
    # row by default: the stored scales win
    again = QuantLinear(300, 200, fmt="fp8")
    again.load_state_dict(sd)
    assert again.granularity == granularity and torch.equal(
        again.dequantize(), layer.dequantize()
    )
    from_dense = QuantLinear(300, 200, fmt="fp8", granularity=granularity)
    from_dense.load_state_dict({"weight": w})
    assert torch.equal(from_dense.dequantize(), layer.dequantize())
    # a model-wide dtype cast leaves the codes' bytes alone
    codes = layer.weight.detach().view(torch.uint8).clone()
    for cast in (
        lambda m: m.to(torch.float32),
        lambda m: m.half(),
        lambda m: m.float(),
    ):
        cast(layer)
        assert layer.weight.dtype == E4M3 and torch.equal(
            layer.weight.view(torch.uint8), codes
        )
    assert layer.compute_dtype == torch.bfloat16
    x = torch.randn(4, 300, dtype=torch.bfloat16)
    assert torch.equal(layer(x), x @ layer.dequantize(torch.bfloat16).t())
    assert f"granularity={granularity}" in repr(layer)
    with pytest.raises(ValueError, match="granularity"):
        QuantLinear(3, 2, fmt="fp8", granularity="tensor")
    with pytest.raises(ValueError, match="granularity"):
        QuantLinear(3, 2, fmt="nf4", granularity="row")


# --------------------------------------------------------------------------------------------
# FastLanguageModel
# --------------------------------------------------------------------------------------------


def _fp8_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _fp8_checkpoint(model_dir: str, out_dir) -> tuple[str, dict]:
    """A copy of `model_dir` stored the way Qwen3-*-FP8 repositories are: projections as e4m3 + 128 x 128
    block weight_scale_inv, the rest as it was, quant_method "fp8" in the config."""
    shutil.copytree(model_dir, out_dir)
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    stored = {}
    for key, value in tensors.items():
        module = key.removesuffix(".weight")
        if module.split(".")[-1] in PROJECTIONS:
            stored.update(fp8_to_checkpoint(quantize_fp8(value, "block"), module + "."))
        else:
            stored[key] = value
    save_file(
        stored, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"}
    )
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    with open(config_path, "w") as f:
        json.dump(config, f)
    return str(out_dir), stored


def test_reads_an_fp8_checkpoint_as_stored(tiny_model_dir, tmp_path, capsys):
    model_dir, stored = _fp8_checkpoint(tiny_model_dir("llama"), tmp_path / "fp8")
    model, _ = FastLanguageModel.from_pretrained(
        model_dir, load_in_fp8="block", max_seq_length=MAX_LEN
    )
    layers = _fp8_layers(model)
    assert len(layers) == sum(k.endswith("weight_scale_inv") for k in stored)
    for name, layer in layers.items():
        q = layer.quant_weight
        assert q.granularity == "block" and q.dtype == torch.float32
        assert torch.equal(
            q.data.view(torch.uint8), stored[name + ".weight"].view(torch.uint8)
        )
        assert torch.equal(q.scale, stored[name + ".weight_scale_inv"])
    sd = model.state_dict()  # saved back in the layout it came in
    name = next(iter(layers))
    assert torch.equal(
        sd[name + ".weight_scale_inv"], stored[name + ".weight_scale_inv"]
    )

    capsys.readouterr()
    row_asked, _ = FastLanguageModel.from_pretrained(
        model_dir, load_in_fp8=True, max_seq_length=MAX_LEN
    )
    assert "128 x 128 block scales; loading them as they are" in capsys.readouterr().out
    assert all(m.granularity == "block" for m in _fp8_layers(row_asked).values())
    with pytest.raises(
        ValueError, match="stored in fp8; load it with load_in_fp8=True"
    ):
        FastLanguageModel.from_pretrained(model_dir)  # the 4-bit default
    with pytest.raises(ValueError, match="stored quantized in fp8"):
        FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False)


def test_load_in_fp8_arguments(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    with pytest.raises(
        ValueError, match="load_in_fp8='rows' is not supported; pass True"
    ):
        FastLanguageModel.from_pretrained(model_dir, load_in_fp8="rows")
    with pytest.raises(ValueError, match="load_in_8bit=True exclude each other"):
        FastLanguageModel.from_pretrained(
            model_dir, load_in_fp8=True, load_in_8bit=True, load_in_4bit=False
        )
    with pytest.raises(ValueError, match="load_in_16bit=True exclude each other"):
        FastLanguageModel.from_pretrained(
            model_dir, load_in_fp8="block", load_in_16bit=True
        )
    with pytest.raises(ValueError, match="full_finetuning=True"):
        FastLanguageModel.from_pretrained(
            model_dir, load_in_fp8=True, full_finetuning=True
        )


# --------------------------------------------------------------------------------------------
# GPU: the scaled matmul
# --------------------------------------------------------------------------------------------


def _rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return (
        (got.float() - want.float()).pow(2).mean().sqrt()
        / want.float().pow(2).mean().sqrt()
    ).item()


@pytest.mark.gpu
def test_scaled_mm_matches_dequantize_path_at_real_size():
    """4096 x 4096 in bf16. Both paths use the same e4m3 weights; the scaled path also rounds x per row to e4m3
    (3 mantissa bits: a rounding error uniform within half a step, about 2^-4 / sqrt(7) ~ 2.4% of x's RMS), and
    those errors are independent across the 4096 terms of each dot product, so y is off by the same ~2.5% of
    its RMS (2.6% measured by emulation on a CPU for Gaussian and log-normal x); bf16 output rounding adds
    ~0.1%. 5% leaves a 2x margin and still catches a wrong scale (a factor on y) or a transposed operand."""
    if not fp8.has_fp8_matmul():
        pytest.skip("needs a GPU of compute capability >= 8.9")
    torch.manual_seed(0)
    w = (torch.randn(4096, 4096, device="cuda") / 64).to(torch.bfloat16)
    q = quantize_fp8(w, "row")
    for rows in (512, 5):  # 5: _scaled_mm puts no multiple-of-16 constraint on M
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        assert scaled_mm_applies(x, q, torch.bfloat16)
        fast = q.linear(x, torch.bfloat16)
        slow = x @ q.dequantize(torch.bfloat16).t()
        assert fast.dtype == torch.bfloat16 and fast.shape == (rows, 4096)
        assert 0 < _rel_rms(fast, slow) < 5e-2
    assert not fp8._scaled_mm_refused


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape, granularity, dtype",
    [
        ((100, 256), "row", torch.bfloat16),
        ((256, 120), "row", torch.bfloat16),
        ((256, 256), "block", torch.bfloat16),
        ((256, 256), "row", torch.float32),
    ],
)
def test_dequantize_path_where_scaled_mm_does_not_apply(shape, granularity, dtype):
    """out or in not a multiple of 16, block scales, fp32 compute: exactly the dequantize + matmul path."""
    q = quantize_fp8(torch.randn(shape, device="cuda"), granularity)
    x = torch.randn(33, shape[1], device="cuda", dtype=dtype)
    assert not scaled_mm_applies(x, q, dtype)
    assert torch.equal(q.linear(x, dtype), x @ q.dequantize(dtype).t())
