"""Per-row int8 weights: against an independent fp64 oracle, against bitsandbytes' own output (the
committed fixture tests/fixtures/bnb/int8_small.safetensors from scripts/make_bnb_fixtures.py, and live
when bitsandbytes imports), and the bitsandbytes state-dict format."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_nf4 import _bnb  # the same bitsandbytes probe

from fasttune.quant import (
    Int8Tensor,
    dequantize_int8,
    int8_from_bnb_state_dict,
    int8_to_bnb_state_dict,
    is_bnb_int8,
    quantize_int8,
)

FIXTURE = os.path.join(
    os.path.dirname(__file__), "..", "fixtures", "bnb", "int8_small.safetensors"
)
HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def oracle(w: torch.Tensor):
    """(codes, absmax) in fp64: round(w / (absmax / 127)), half to even; a zero row stays zero."""
    x = w.double()
    absmax = x.abs().amax(dim=1)
    step = absmax / 127
    codes = torch.where(
        step[:, None] > 0, x / step.clamp_min(1e-300)[:, None], torch.zeros_like(x)
    ).round()
    return codes.to(torch.int8), absmax.float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123), (64, 96), (1, 1), (3, 4097)])
def test_matches_oracle(dtype, shape):
    w = (torch.randn(shape) * torch.logspace(-4, 1, shape[0])[:, None]).to(dtype)
    q = quantize_int8(w)
    codes, absmax = oracle(w)
    assert (
        q.data.dtype == torch.int8
        and q.data.shape == w.shape
        and q.absmax.dtype == torch.float32
    )
    assert torch.equal(q.absmax, absmax)
    # fp32 vs fp64 rounding may only flip a value that sits (almost) exactly half-way between two codes
    diff = (q.data.int() - codes.int()).abs()
    assert diff.max() <= 1
    exact = w.double() / (absmax.double() / 127).clamp_min(1e-300)[:, None]
    assert torch.all((exact[diff > 0].abs().frac() - 0.5).abs() < 1e-4)
    assert q.data.abs().max() <= 127
    out = q.dequantize()
    assert out.dtype == dtype and out.shape == w.shape
    # round-trip error: half a step per row, plus the output dtype's rounding
    bound = (absmax / 127 / 2)[:, None] * 1.001 + w.float().abs() * torch.finfo(
        dtype
    ).eps
    assert torch.all((out.float() - w.float()).abs() <= bound)


def test_zero_and_constant_rows():
    w = torch.randn(4, 64, dtype=torch.bfloat16)
    w[0] = 0
    w[1] = -0.75
    q = quantize_int8(w)
    assert torch.all(q.data[0] == 0) and q.absmax[0] == 0
    assert torch.all(q.data[1] == -127) and q.absmax[1] == 0.75
    out = q.dequantize(torch.float32)
    assert torch.all(out[0] == 0)
    torch.testing.assert_close(out[1], torch.full((64,), -0.75), rtol=1e-6, atol=0)


def test_dequantize_order_and_scale():
    q = quantize_int8(torch.randn(6, 50))
    expected = (q.data.float() * q.absmax[:, None]) * torch.tensor(
        1 / 127, dtype=torch.float32
    )
    assert torch.equal(dequantize_int8(q, torch.float32), expected)
    torch.testing.assert_close(q.scale, q.absmax / 127)


def test_chunked_equals_whole(monkeypatch):
    import importlib

    int8 = importlib.import_module("fasttune.quant.int8")
    w = torch.randn(37, 50, dtype=torch.bfloat16)
    whole = quantize_int8(w)
    monkeypatch.setattr(int8, "_CHUNK", 120)  # 2 rows per step, the last one short
    chunked = quantize_int8(w)
    assert torch.equal(whole.data, chunked.data) and torch.equal(
        whole.absmax, chunked.absmax
    )


def test_rejects():
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="dtype"):
        quantize_int8(torch.randn(2, 3).double())
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_int8(torch.tensor([[1.0, float("inf")]]))


def test_state_dict_round_trip(tmp_path):
    q = quantize_int8(torch.randn(5, 123, dtype=torch.float16))
    sd = int8_to_bnb_state_dict(q, "model.layers.0.self_attn.q_proj.")
    p = "model.layers.0.self_attn.q_proj."
    assert sorted(sd) == [f"{p}SCB", f"{p}weight", f"{p}weight_format"]
    assert (
        sd[f"{p}weight_format"].dtype == torch.uint8
        and sd[f"{p}weight_format"].shape == ()
        and sd[f"{p}weight_format"] == 0
    )
    assert is_bnb_int8(sd, p)
    save_file(sd, tmp_path / "w.safetensors")
    back = int8_from_bnb_state_dict(
        load_file(tmp_path / "w.safetensors"), p, dtype=torch.float16
    )
    assert torch.equal(back.data, q.data) and torch.equal(back.absmax, q.absmax)
    assert torch.equal(back.dequantize(), q.dequantize())
    # older checkpoints have no weight_format: "row" is implied
    del sd[f"{p}weight_format"]
    assert torch.equal(int8_from_bnb_state_dict(sd, p).data, q.data)


def test_loader_errors():
    sd = int8_to_bnb_state_dict(quantize_int8(torch.randn(4, 8)), "m.")
    with pytest.raises(ValueError, match="missing keys"):
        int8_from_bnb_state_dict({k: v for k, v in sd.items() if k != "m.SCB"}, "m.")
    with pytest.raises(NotImplementedError, match="col_ampere"):
        int8_from_bnb_state_dict(
            {**sd, "m.weight_format": torch.tensor(3, dtype=torch.uint8)}, "m."
        )
    with pytest.raises(ValueError, match="unknown weight format"):
        int8_from_bnb_state_dict(
            {**sd, "m.weight_format": torch.tensor(9, dtype=torch.uint8)}, "m."
        )
    with pytest.raises(ValueError, match="int8"):
        int8_from_bnb_state_dict({**sd, "m.weight": sd["m.weight"].float()}, "m.")
    with pytest.raises(ValueError, match="one value per row"):
        Int8Tensor(sd["m.weight"], torch.ones(3))


def test_to_and_nbytes():
    q = quantize_int8(torch.randn(5, 123))
    assert q.nbytes == 5 * 123 + 5 * 4
    assert torch.equal(q.to("cpu").dequantize(), q.dequantize())


# --------------------------------------------------------------------------------------------
# Against bitsandbytes
# --------------------------------------------------------------------------------------------


def _fixture_names():
    with safe_open(FIXTURE, "pt") as f:
        return json.loads(f.metadata()["sources"])


def test_fixture_metadata():
    with safe_open(FIXTURE, "pt") as f:
        meta = f.metadata()
    assert meta["bitsandbytes"] and meta["device"]
    assert os.path.getsize(FIXTURE) < 100 * 1024


@pytest.mark.parametrize("name", _fixture_names())
def test_matches_bnb_fixture(name):
    tensors = load_file(FIXTURE)
    with safe_open(FIXTURE, "pt") as f:
        made_on_cuda = f.metadata()["device"].startswith("cuda")
    source = tensors[f"{name}.source"]
    prefix = f"{name}.int8."
    # bitsandbytes' Linear8bitLt casts its weight to fp16 before it quantizes
    ours = int8_to_bnb_state_dict(quantize_int8(source.half()), prefix)
    theirs = {
        k: v
        for k, v in tensors.items()
        if k.startswith(prefix) and not k.endswith(".dequant")
    }
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        if key.endswith("weight") and made_on_cuda:
            # the CUDA kernel's approximate division may round a near-half-way value the other way
            diff = (ours[key].int() - value.int()).abs()
            assert diff.max() <= 1 and diff.float().mean() < 1e-3
            continue
        assert torch.equal(ours[key], value), key
    # rows inside fp16's normal range quantize to the same codes from the source's own values
    direct = quantize_int8(source)
    normal = source.float().abs().amax(dim=1) >= torch.finfo(torch.float16).tiny
    assert normal.sum() >= source.shape[0] - 2
    assert torch.equal(direct.data[normal], ours[f"{prefix}weight"][normal])
    loaded = int8_from_bnb_state_dict(tensors, prefix)
    assert torch.equal(loaded.dequantize(torch.float32), tensors[f"{prefix}dequant"])


@pytest.mark.skipif(
    _bnb() is None,
    reason="bitsandbytes is not importable (the fixture test covers its layout)",
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_live_bnb(dtype):
    functional = _bnb().functional
    device = "cuda" if HAS_CUDA else "cpu"
    w = torch.randn(70, 300, device=device).to(dtype)
    w[3] = 0
    codes, absmax, _ = functional.int8_vectorwise_quant(w.clone())
    q = quantize_int8(w)
    assert torch.equal(q.absmax, absmax)
    if device == "cpu":
        assert torch.equal(q.data, codes)
    else:
        # bitsandbytes' CUDA kernel divides approximately: a near-half-way value may round the other way
        diff = (q.data.int() - codes.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 1e-3
    theirs = Int8Tensor(codes, absmax, torch.float32)
    assert torch.equal(
        theirs.dequantize(), functional.int8_vectorwise_dequant(codes, absmax)
    )
