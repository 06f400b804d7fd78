"""NF4 / FP4 blockwise 4-bit weights: against an independent pure-PyTorch oracle, against bitsandbytes'
own output (the committed fixture, and live when bitsandbytes imports), Triton kernel against the torch
path (Triton's interpreter on a CPU), and at real size on a GPU.

The fixture tests/fixtures/bnb/nf4_small.safetensors is written by scripts/make_bnb_fixtures.py.
"""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
from kernel_rules import (  # tests/kernel_rules.py (tests/ is on sys.path)
    kernel_runs,
    needs_kernel,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fasttune.quant import (
    NF4Tensor,
    code_table,
    dequantize_nf4,
    dequantize_nf4_reference,
    dynamic_code,
    is_bnb_4bit,
    nf4_from_bnb_state_dict,
    nf4_to_bnb_state_dict,
    quantize_nf4,
)

nf4 = importlib.import_module("fasttune.quant.nf4")
FIXTURE = os.path.join(
    os.path.dirname(__file__), "..", "fixtures", "bnb", "nf4_small.safetensors"
)
HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


needs_triton = needs_kernel(nf4, "_dequantize_4bit_kernel")


# --------------------------------------------------------------------------------------------
# An independent oracle: argmin over the code, per block, no bucketize, no chunks, no packing tricks
# --------------------------------------------------------------------------------------------


def oracle_indices(w: torch.Tensor, code: torch.Tensor, blocksize: int):
    """(indices int64 (numel,), absmax (blocks,)) by brute force: the code entry nearest to w / absmax."""
    x = w.reshape(-1).double()
    idx, absmax = [], []
    for start in range(0, x.numel(), blocksize):
        block = x[start : start + blocksize]
        am = block.abs().max()
        scaled = block / am if am > 0 else torch.zeros_like(block)
        idx.append((scaled[:, None] - code.double()[None, :]).abs().argmin(dim=1))
        absmax.append(am)
    return torch.cat(idx), torch.stack(absmax).float()


def oracle_unpack(data: torch.Tensor, numel: int) -> torch.Tensor:
    """Element 2j in the high nibble of byte j, element 2j + 1 in the low one."""
    out = []
    for byte in data.reshape(-1).tolist():
        out += [byte // 16, byte % 16]
    return torch.tensor(out[:numel])


def scaled_values(w, absmax, blocksize):
    x = w.reshape(-1).double()
    scale = absmax.double().repeat_interleave(blocksize)[: x.numel()]
    return torch.where(scale > 0, x / scale, torch.zeros_like(x))


def assert_nearest(w, q: NF4Tensor, absmax):
    """Every index is a nearest code entry to w / absmax (exact ties may go either way)."""
    x = scaled_values(w, absmax, q.blocksize)
    idx = oracle_unpack(q.data, q.numel)
    code = q.code.double()
    dist = (x - code[idx]).abs()
    best = (x[:, None] - code[None, :]).abs().min(dim=1).values
    assert torch.all(dist <= best + 1e-6), (dist - best).max()


# --------------------------------------------------------------------------------------------
# Code tables
# --------------------------------------------------------------------------------------------


def test_nf4_code_is_normal_quantiles():
    # QLoRA's construction: 8 quantiles below 0 and 9 above (offset 0.9677083), normalized to [-1, 1]
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    values = values / values.max()
    torch.testing.assert_close(code_table("nf4").double(), values, rtol=0, atol=2e-7)


def test_dynamic_code_shape():
    code = dynamic_code()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])  # ascending, no duplicates
    assert code[-1] == 1.0 and (code == 0).sum() == 1 and code.min() > -1.0


def test_fp4_code():
    code = code_table("fp4")
    assert torch.equal(code[8:], -code[:8]) and code.abs().max() == 1.0
    expected = torch.tensor([0, 0.0625, 2, 3, 4, 6, 8, 12], dtype=torch.float32) / 12
    assert torch.equal(code[:8].sort().values, expected)


# --------------------------------------------------------------------------------------------
# Against the oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123), (64, 96), (3,), (1, 1), (2, 3, 40)])
@pytest.mark.parametrize("blocksize", [64, 32, 128])
def test_matches_oracle(dtype, shape, blocksize):
    w = torch.randn(shape).to(dtype)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=False)
    idx, absmax = oracle_indices(w, q.code, blocksize)
    assert q.data.shape == ((w.numel() + 1) // 2, 1) and q.data.dtype == torch.uint8
    assert torch.equal(q.absmax, absmax)
    assert torch.equal(oracle_unpack(q.data, w.numel()), idx)
    if w.numel() % 2:  # the padding nibble is the code of 0.0
        assert q.data.reshape(-1)[-1].item() & 15 == 7
    expected = (
        (q.code[idx] * absmax.repeat_interleave(blocksize)[: w.numel()])
        .to(dtype)
        .reshape(shape)
    )
    out = dequantize_nf4(q)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, expected)
    # round-trip error: at most half the widest gap of the code times the block's absmax
    half_gap = (q.code[1:] - q.code[:-1]).max() / 2
    bound = absmax.repeat_interleave(blocksize)[: w.numel()].reshape(shape) * half_gap
    assert torch.all((out.float() - w.float()).abs() <= bound * 1.01 + 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_matches_oracle(dtype):
    # 625 blocks: 3 nested groups
    w = (torch.randn(40, 1000) * torch.logspace(-3, 0, 40)[:, None]).to(dtype)
    q = quantize_nf4(w, blocksize=64, double_quant=True)
    _, absmax = oracle_indices(w, q.code, 64)
    assert q.absmax.dtype == torch.uint8 and q.nested_absmax.shape == (3,)
    offset = absmax.mean()
    assert q.offset == offset.item()
    qa, nested = oracle_indices(absmax - offset, dynamic_code(), 256)
    assert torch.equal(q.absmax.long(), qa) and torch.equal(q.nested_absmax, nested)
    # the 4-bit indices are taken against the exact absmax; the stored absmax is its 8-bit estimate
    assert_nearest(w, q, absmax)
    estimate = (
        dynamic_code()[qa] * nested.repeat_interleave(256)[: absmax.numel()] + offset
    )
    assert torch.equal(q.absmax_fp32(), estimate)
    out = q.dequantize(torch.float32)
    idx = oracle_unpack(q.data, w.numel())
    assert torch.equal(
        out.reshape(-1), q.code[idx] * estimate.repeat_interleave(64)[: w.numel()]
    )


def test_zero_and_constant_blocks():
    w = torch.randn(6, 64)
    w[0] = 0.0
    w[1] = 0.5
    w[2] = -0.25
    w = w.to(torch.bfloat16)
    for double_quant in (False, True):
        q = quantize_nf4(w, double_quant=double_quant)
        idx = oracle_unpack(q.data, w.numel()).reshape(6, 64)
        assert (
            torch.all(idx[0] == 7)
            and torch.all(idx[1] == 15)
            and torch.all(idx[2] == 0)
        )
        out = q.dequantize(torch.float32)
        assert torch.all(out[0] == 0)  # exact zeros even with an estimated absmax
        if not double_quant:
            assert torch.all(out[1] == 0.5) and torch.all(out[2] == -0.25)
        else:
            # only the absmax estimate errs: by at most half the widest gap of the 8-bit code (near
            # +-1: 0.0141) times the nested absmax
            bound = 0.0071 * q.nested_absmax.max()
            assert torch.all((out[1:3] - w[1:3].float()).abs() <= bound)
    # every block zero: the nested absmax is 0 too
    q = quantize_nf4(torch.zeros(3, 64), double_quant=True)
    assert torch.all(q.dequantize() == 0)


def test_fp4_matches_oracle():
    w = torch.randn(5, 123)
    q = quantize_nf4(w, quant_type="fp4", double_quant=False)
    _, absmax = oracle_indices(w, q.code, 64)
    assert_nearest(w, q, absmax)
    idx = oracle_unpack(q.data, w.numel())
    # the sign bit is set exactly where the value is negative
    assert torch.equal(idx >= 8, w.reshape(-1) < 0)


def test_chunked_equals_whole(monkeypatch):
    w = torch.randn(33, 100, dtype=torch.bfloat16)
    whole = nf4_to_bnb_state_dict(quantize_nf4(w))
    monkeypatch.setattr(nf4, "_CHUNK", 128)  # many chunks, the last one short
    q = quantize_nf4(w)
    chunked = nf4_to_bnb_state_dict(q)
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)
    out = dequantize_nf4_reference(q)
    monkeypatch.undo()
    assert torch.equal(out, dequantize_nf4_reference(q))


def test_non_contiguous_input():
    w = torch.randn(96, 64).t()
    assert torch.equal(quantize_nf4(w).data, quantize_nf4(w.contiguous()).data)


def test_rejects():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="dtype"):
        quantize_nf4(torch.randn(4, 64).double())
    with pytest.raises(ValueError, match="quant_type"):
        quantize_nf4(torch.randn(4, 64), quant_type="af4")
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))


def test_to_and_nbytes():
    q = quantize_nf4(torch.randn(64, 96, dtype=torch.bfloat16))
    assert q.nbytes == 3072 + 96 + 64 + 4 + 1024
    q2 = q.to("cpu")
    assert q2 is not q and torch.equal(q2.dequantize(), q.dequantize())
    plain = quantize_nf4(torch.randn(64, 96), double_quant=False)
    assert plain.nbytes == 3072 + 96 * 4 + 64


# --------------------------------------------------------------------------------------------
# Serialization
# --------------------------------------------------------------------------------------------

KEYS = [
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
]


def test_state_dict_keys_and_json(tmp_path):
    q = quantize_nf4(torch.randn(5, 123, dtype=torch.bfloat16))
    sd = nf4_to_bnb_state_dict(q, "model.layers.0.mlp.down_proj.")
    state_key = "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"
    assert sorted(sd) == sorted(
        [f"model.layers.0.mlp.down_proj.{k}" for k in KEYS] + [state_key]
    )
    meta = json.loads(bytes(sd[state_key].tolist()))
    assert list(meta) == [
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    ]
    assert (
        meta["dtype"] == "bfloat16"
        and meta["shape"] == [5, 123]
        and meta["nested_offset"] == q.offset
    )
    assert is_bnb_4bit(sd, "model.layers.0.mlp.down_proj.")
    # through a safetensors file and back
    save_file(sd, tmp_path / "w.safetensors")
    back = nf4_from_bnb_state_dict(
        load_file(tmp_path / "w.safetensors"), "model.layers.0.mlp.down_proj."
    )
    assert torch.equal(back.dequantize(), q.dequantize())
    plain = nf4_to_bnb_state_dict(quantize_nf4(torch.randn(8, 64), double_quant=False))
    assert sorted(plain) == [
        "weight",
        "weight.absmax",
        "weight.quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    ]
    assert list(json.loads(bytes(plain["weight.quant_state.bitsandbytes__nf4"].tolist()))) == [
        "quant_type", "blocksize", "dtype", "shape"
    ]  # fmt: skip


def test_loader_errors():
    sd = nf4_to_bnb_state_dict(quantize_nf4(torch.randn(8, 64)), "m.")
    with pytest.raises(ValueError, match="unknown keys"):
        nf4_from_bnb_state_dict({**sd, "m.weight.extra": torch.zeros(1)}, "m.")
    for key in (
        "m.weight",
        "m.weight.absmax",
        "m.weight.nested_absmax",
        "m.weight.nested_quant_map",
    ):
        with pytest.raises(ValueError, match="missing keys"):
            nf4_from_bnb_state_dict({k: v for k, v in sd.items() if k != key}, "m.")
    with pytest.raises(ValueError, match="exactly one"):
        nf4_from_bnb_state_dict(
            {k: v for k, v in sd.items() if "quant_state" not in k}, "m."
        )
    renamed = {
        k.replace("bitsandbytes__nf4", "bitsandbytes__af4"): v for k, v in sd.items()
    }
    with pytest.raises(NotImplementedError, match="af4"):
        nf4_from_bnb_state_dict(renamed, "m.")
    broken = {
        **sd,
        "m.weight.quant_state.bitsandbytes__nf4": torch.tensor(
            [255, 0], dtype=torch.uint8
        ),
    }
    with pytest.raises(ValueError, match="JSON"):
        nf4_from_bnb_state_dict(broken, "m.")
    with pytest.raises(ValueError, match="quant_map"):
        nf4_from_bnb_state_dict({**sd, "m.weight.quant_map": code_table("fp4")}, "m.")
    # other modules' keys and a bias are not this weight's business
    nf4_from_bnb_state_dict(
        {**sd, "m.bias": torch.zeros(8), "other.weight": torch.zeros(2)}, "m."
    )


def test_loader_accepts_other_quant_storage():
    # bitsandbytes' quant_storage option saves the packed bytes viewed as another dtype (e.g. for FSDP)
    q = quantize_nf4(torch.randn(8, 64, dtype=torch.bfloat16))
    sd = nf4_to_bnb_state_dict(q)
    sd["weight"] = sd["weight"].reshape(-1).view(torch.bfloat16).reshape(-1, 1)
    assert torch.equal(nf4_from_bnb_state_dict(sd).dequantize(), q.dequantize())


# --------------------------------------------------------------------------------------------
# Against bitsandbytes' own output (the committed fixture)
# --------------------------------------------------------------------------------------------


def assert_same_as_bnb(ours: dict, theirs: dict, w, q: NF4Tensor, bnb_on_cpu: bool):
    """Our state dict for `w` equals bitsandbytes' bit for bit, up to the known differences that
    fasttune/quant/nf4.py's docstring lists: on bitsandbytes' CPU build (0.50.2), its approximate
    8-bit absmax search and its FP4 tie-breaking; on its CUDA kernels, all-zero blocks."""
    assert sorted(ours) == sorted(theirs)
    w = w.cpu()
    for key, value in theirs.items():
        a, b = ours[key].cpu(), value.cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, key
        if torch.equal(a, b):
            continue
        if key.endswith("weight.absmax") and q.double_quant and bnb_on_cpu:
            # the CPU build at times takes the neighbour of the nearest entry; fasttune the nearest
            _, absmax = oracle_indices(w, q.code.cpu(), q.blocksize)
            nested = (
                q.nested_absmax.cpu().double().repeat_interleave(q.nested_blocksize)
            )
            target = (absmax.double() - q.offset) / nested[: q.num_blocks]
            code = q.nested_code.cpu().double()
            differ = a != b
            assert ((a.int() - b.int()).abs()[differ] == 1).all(), key
            ours_err = (target - code[a.long()]).abs()[differ]
            assert torch.all(ours_err <= (target - code[b.long()]).abs()[differ]), key
            assert differ.float().mean() < 0.02, key
        elif key.endswith("weight") and a.dtype == torch.uint8 and a.dim() == 2:
            na, nb = oracle_unpack(a, q.numel), oracle_unpack(b, q.numel)
            differ = na != nb
            blocks = w.reshape(-1).float()
            pad = -blocks.numel() % q.blocksize
            zero_block = torch.nn.functional.pad(blocks, (0, pad)).view(-1, q.blocksize)
            zero_block = (zero_block == 0).all(dim=1).repeat_interleave(q.blocksize)
            zero_block = zero_block[: q.numel]
            if not bnb_on_cpu:
                # CUDA: 0 * (1 / 0) is NaN there, and NaN decides index 0
                assert torch.all(zero_block[differ] & (nb[differ] == 0)), key
                continue
            assert q.quant_type == "fp4", key
            # the CPU build's FP4 breaks exact ties between two magnitudes (frequent with bf16
            # weights) and the sign of zero its own way: both choices must be nearest codes
            _, absmax = oracle_indices(w, q.code.cpu(), q.blocksize)
            x = scaled_values(w, absmax, q.blocksize)
            code = q.code.cpu().double()
            best = (x[:, None] - code[None, :]).abs().min(dim=1).values
            for n in (na, nb):
                err = (x - code[n]).abs()[differ]
                assert torch.all(err <= best[differ] + 1e-6), key
        else:
            raise AssertionError(f"{key} differs from bitsandbytes")


def _fixture():
    with safe_open(FIXTURE, "pt") as f:
        meta = f.metadata()
    return load_file(FIXTURE), meta


def _fixture_cases():
    with safe_open(FIXTURE, "pt") as f:
        variants = json.loads(f.metadata()["variants"])
    return [
        (name, variant, spec)
        for variant, spec in variants.items()
        for name in spec["sources"]
    ]


def test_fixture_metadata():
    _, meta = _fixture()
    assert meta["bitsandbytes"] and meta["device"]
    assert os.path.getsize(FIXTURE) < 200 * 1024


@pytest.mark.parametrize(
    "name,variant,spec", _fixture_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_matches_bnb_fixture(name, variant, spec):
    tensors, meta = _fixture()
    prefix = f"{name}.{variant}."
    theirs = {
        k: v
        for k, v in tensors.items()
        if k.startswith(prefix) and not k.endswith(".dequant")
    }
    source = tensors[f"{name}.source"]
    q = quantize_nf4(
        source, spec["blocksize"], spec["double_quant"], spec["quant_type"]
    )
    assert_same_as_bnb(
        nf4_to_bnb_state_dict(q, prefix),
        theirs,
        source,
        q,
        meta["device"].startswith("cpu"),
    )
    # bitsandbytes' tensors, read back without it, dequantize to its values bit for bit
    loaded = nf4_from_bnb_state_dict(tensors, prefix)
    expected = tensors[f"{prefix}dequant"]
    assert torch.equal(dequantize_nf4_reference(loaded), expected)
    if kernel_runs(nf4, "_dequantize_4bit_kernel"):
        assert torch.equal(
            nf4.dequantize_nf4_triton(loaded.to("cuda" if HAS_CUDA else "cpu")).cpu(),
            expected,
        )


def test_fixture_code_tables():
    tensors, _ = _fixture()
    assert torch.equal(tensors["w64x96.nf4.weight.quant_map"], code_table("nf4"))
    assert torch.equal(tensors["w64x96.fp4.weight.quant_map"], code_table("fp4"))
    assert torch.equal(tensors["w64x96.nf4.weight.nested_quant_map"], dynamic_code())


# --------------------------------------------------------------------------------------------
# Live against bitsandbytes, where it imports (it is not a dependency; the fixture test always runs)
# --------------------------------------------------------------------------------------------


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return bitsandbytes


@pytest.mark.skipif(
    _bnb() is None,
    reason="bitsandbytes is not importable (the fixture test covers its layout)",
)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_live_bnb(quant_type, double_quant):
    functional = _bnb().functional
    device = "cuda" if HAS_CUDA else "cpu"
    for shape, dtype in [
        ((64, 128), torch.bfloat16),
        ((5, 123), torch.float16),
        ((300, 257), torch.float32),
    ]:
        w = torch.randn(shape, device=device).to(dtype)
        packed, state = functional.quantize_4bit(
            w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type
        )
        theirs = {
            "weight": packed,
            **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()},
        }
        q = quantize_nf4(w, 64, double_quant, quant_type)
        ours = nf4_to_bnb_state_dict(q)
        assert_same_as_bnb(ours, theirs, w, q, bnb_on_cpu=device == "cpu")
        # and what we write, bitsandbytes reads and dequantizes to our values
        state2 = functional.QuantState.from_dict(
            {k[7:]: v for k, v in ours.items() if k != "weight"}, device
        )
        theirs_out = functional.dequantize_4bit(
            ours["weight"], state2, quant_type=quant_type
        )
        assert torch.equal(theirs_out, dequantize_nf4_reference(q))


# --------------------------------------------------------------------------------------------
# Triton kernel against the torch path
# --------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    "shape,blocksize,double_quant,quant_type",
    [
        ((64, 96), 64, True, "nf4"),
        ((5, 123), 64, False, "nf4"),
        ((7, 33), 32, True, "fp4"),
        ((3, 700), 128, True, "nf4"),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_torch(shape, blocksize, double_quant, quant_type, dtype):
    device = "cuda" if HAS_CUDA else "cpu"
    w = torch.randn(shape, device=device)
    q = quantize_nf4(w, blocksize, double_quant, quant_type)
    expected = dequantize_nf4_reference(q, dtype)
    out = nf4.dequantize_nf4_triton(q, dtype)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, expected)


@needs_triton
def test_out_buffer():
    device = "cuda" if HAS_CUDA else "cpu"
    q = quantize_nf4(torch.randn(5, 123, device=device, dtype=torch.bfloat16))
    buf = torch.full((615,), float("nan"), dtype=torch.bfloat16, device=device)
    for fn in (nf4.dequantize_nf4_triton, dequantize_nf4_reference, dequantize_nf4):
        buf.fill_(float("nan"))
        res = fn(q, out=buf)
        assert res is buf and torch.equal(buf.view(5, 123), dequantize_nf4_reference(q))
    as_fp32 = torch.empty(5, 123, device=device)
    assert torch.equal(
        nf4.dequantize_nf4_triton(q, out=as_fp32),
        dequantize_nf4_reference(q, torch.float32),
    )
    for bad in (
        torch.empty(614, dtype=torch.bfloat16),
        torch.empty(615, dtype=torch.float16),
    ):
        with pytest.raises(ValueError, match="out must be"):
            dequantize_nf4(q, torch.bfloat16, out=bad.to(device))
    with pytest.raises(ValueError, match="out must be"):
        dequantize_nf4(
            q, out=torch.empty(123, 10, device=device, dtype=torch.bfloat16)[:, :5]
        )


@pytest.mark.gpu
def test_gpu_real_size():
    """A Llama-3-8B down_proj-sized weight: Triton and torch dequantization agree bit for bit."""
    w = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16) * 0.02
    q = quantize_nf4(w)
    triton_out = nf4.dequantize_nf4_triton(q)
    torch_out = dequantize_nf4_reference(q)
    assert torch.equal(triton_out, torch_out)
    # the dispatch picks the kernel on CUDA
    assert torch.equal(dequantize_nf4(q), torch_out)
    del triton_out
    # the CPU and CUDA quantizers agree on the packed codes
    q_cpu = quantize_nf4(w.cpu())
    assert torch.equal(q_cpu.data, q.data.cpu())
    assert (torch_out.float() - w.float()).abs().max() < 0.02 * 6
