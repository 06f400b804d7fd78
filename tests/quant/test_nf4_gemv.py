"""The NF4 GEMV (fasttune.quant.nf4_gemv) against its reference x @ dequantize(fp32)^T, and its dispatch.

fp32: kernel_rules' assert_no_worse against an fp64 truth (the dequantized weight and x in float64),
with the fp32 reference as the baseline. bf16 x: no worse than plain bf16 PyTorch (x.bf16 @ W.bf16^T).
One-hot rows of x pick single weights, which must come back bit for bit as the dequantized ones (nibble
order, block indexing, the double-quantization rounding order). On a CPU the kernel runs in Triton's
interpreter at small sizes; the real sizes are GPU tests.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
from kernel_rules import (  # tests/kernel_rules.py (tests/ is on sys.path)
    assert_no_worse,
    needs_kernel,
)

from fasttune.lora import lora_linear
from fasttune.quant.linear import QuantLinear
from fasttune.quant.nf4 import quantize_nf4
from fasttune.quant.nf4_gemv import (
    MAX_ROWS,
    GemvConfig,
    gemv_config,
    gemv_supported,
    nf4_gemv,
    nf4_gemv_reference,
    use_nf4_gemv,
)

gemv_module = importlib.import_module("fasttune.quant.nf4_gemv")

needs_kernels = needs_kernel(gemv_module, "_nf4_gemv_kernel")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = 40  # not a multiple of any block_n: the last program is partly masked
# 3 programs in the interpreter; block_kb=64 bytes makes K=192 take a partly masked second step
SMALL = GemvConfig(block_n=16, block_kb=64)


def _truth(x: torch.Tensor, q) -> torch.Tensor:
    return x.double() @ q.dequantize(torch.float32).double().t()


def _check(y: torch.Tensor, x: torch.Tensor, q, name: str) -> None:
    """fp32 x: no worse than the fp32 reference; 16-bit x: no worse than x @ W^T in x's dtype."""
    truth = _truth(x, q)
    if x.dtype == torch.float32:
        ref = nf4_gemv_reference(x, q)
    else:
        ref = x @ q.dequantize(x.dtype).t()
    assert_no_worse(name, y, ref, truth, x.dtype)


# --------------------------------------------------------------------------------------------
# The kernel (interpreter on a CPU)
# --------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("K,blocksize", [(128, 64), (192, 64), (128, 32), (192, 32)])
@pytest.mark.parametrize("M", [1, 3])
def test_matches_reference(M, K, blocksize, double_quant, dtype):
    q = quantize_nf4(torch.randn(N, K, device=DEVICE), blocksize, double_quant)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    y = nf4_gemv(x, q, config=SMALL)
    assert y.shape == (M, N) and y.dtype == dtype
    _check(y, x, q, f"gemv M={M} K={K} bs={blocksize} dq={double_quant} {dtype}")


@needs_kernels
@pytest.mark.parametrize(
    "config",
    [
        None,  # gemv_config's choice: one row per program here
        GemvConfig(block_n=8, block_kb=16),  # steps shorter than a block: several steps share one absmax
        GemvConfig(block_n=64, block_kb=256),  # one program, one step, mostly masked
    ],
    ids=["default", "short-steps", "one-program"],
)
def test_configs(config):
    q = quantize_nf4(torch.randn(N, 192, device=DEVICE), 64, True)
    x = torch.randn(2, 192, device=DEVICE)
    _check(nf4_gemv(x, q, config=config), x, q, f"gemv config={config}")


@needs_kernels
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_one_hot_rows_pick_exact_weights(quant_type):
    """x = unit vectors: y[m, n] = W[n, k_m] exactly as dequantized (code * absmax, rounded once)."""
    K = 128
    w = torch.randn(N, K, device=DEVICE)
    w[:, :64] *= 10  # blocks of different scales
    q = quantize_nf4(w, 32, double_quant=True, quant_type=quant_type)
    cols = torch.tensor([0, 1, 31, 32, 63, 64, 126, 127], device=DEVICE)  # both nibbles, block edges
    x = torch.zeros(len(cols), K, device=DEVICE)
    x[torch.arange(len(cols)), cols] = 1.0
    y = nf4_gemv(x, q, config=SMALL)
    assert torch.equal(y, q.dequantize(torch.float32)[:, cols].t())


@needs_kernels
def test_shapes_strides_and_dtypes():
    K = 128
    q = quantize_nf4(torch.randn(N, K, device=DEVICE), 64, True)
    # (..., K) input: rows from every leading dim
    x = torch.randn(1, 3, K, device=DEVICE)
    y = nf4_gemv(x, q, config=SMALL)
    assert y.shape == (1, 3, N)
    _check(y.view(3, N), x.view(3, K), q, "gemv 3-D x")
    # rows spaced apart in memory: read through the row stride, no copy needed
    wide = torch.randn(2, 2 * K, device=DEVICE, dtype=torch.bfloat16)
    xs = wide[:, K:]
    _check(nf4_gemv(xs, q, config=SMALL), xs, q, "gemv strided rows")
    # bf16 x, fp32 output: the fp32 sums are not rounded to bf16
    y32 = nf4_gemv(xs, q, torch.float32, config=SMALL)
    assert y32.dtype == torch.float32
    assert_no_worse("gemv bf16 -> fp32", y32, nf4_gemv_reference(xs, q, torch.float32), _truth(xs, q), torch.float32)
    # no rows: nothing to launch
    assert nf4_gemv(torch.randn(0, K, device=DEVICE), q).shape == (0, N)


def test_rejects_what_it_cannot_do():
    q = quantize_nf4(torch.randn(N, 96), 64, True)  # 96 % 64 != 0: blocks straddle rows
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        nf4_gemv(torch.randn(1, 96), q)
    q = quantize_nf4(torch.randn(N, 128), 64, True)
    with pytest.raises(ValueError, match="dequantize \\+ matmul"):
        nf4_gemv(torch.randn(MAX_ROWS + 1, 128), q)
    with pytest.raises(ValueError, match="does not end in K"):
        nf4_gemv(torch.randn(1, 64), q)
    with pytest.raises(ValueError, match="power of two"):
        nf4_gemv(torch.randn(1, 128), q, config=GemvConfig(block_n=3, block_kb=64))


def test_reference_any_rows():
    q = quantize_nf4(torch.randn(N, 96), 64, False)
    x = torch.randn(2, 5, 96, dtype=torch.bfloat16)
    y = nf4_gemv_reference(x, q)
    assert y.shape == (2, 5, N) and y.dtype == torch.bfloat16
    # fp32 sums rounded once: at most one bf16 rounding step from the fp64 truth
    torch.testing.assert_close(y.double(), _truth(x, q), rtol=2**-8, atol=1e-6)


def test_default_config_shapes():
    """The heuristic on the Llama decode shapes (132 SMs): whole rows per step where they fit in 4 KB,
    steps that divide K, and >= 512 programs."""
    for n, k in [(2048, 2048), (512, 2048), (8192, 2048), (4096, 4096), (1024, 4096), (14336, 4096),
                 (2048, 8192), (4096, 14336)]:
        cfg = gemv_config(1, n, k, 64)
        assert (k // 2) % cfg.block_kb == 0, (n, k, cfg)
        assert cfg.block_n * cfg.block_kb <= 4096 and cfg.num_warps in (1, 2, 4), (n, k, cfg)
        assert -(-n // cfg.block_n) >= 512, (n, k, cfg)
        assert gemv_config(MAX_ROWS, n, k, 64).num_warps == min(2 * cfg.num_warps, 8)


# --------------------------------------------------------------------------------------------
# Dispatch (device-independent part on a CPU; no fake CUDA)
# --------------------------------------------------------------------------------------------


def test_gemv_supported_conditions():
    q = quantize_nf4(torch.randn(N, 128), 64, True)
    x = torch.randn(1, 1, 128)
    assert gemv_supported(x, q)
    assert gemv_supported(torch.randn(MAX_ROWS, 128), q)
    assert not gemv_supported(torch.randn(MAX_ROWS + 1, 128), q)  # a matmul's job
    assert not gemv_supported(torch.randn(1, 64), q)  # wrong K
    assert not gemv_supported(x.double(), q)
    q96 = quantize_nf4(torch.randn(N, 96), 64, True)
    assert not gemv_supported(torch.randn(1, 96), q96)  # K % blocksize != 0
    # an autograd graph to record: only where grad is on and something needs it
    xg = torch.randn(1, 128, requires_grad=True)
    assert not gemv_supported(xg, q)
    with torch.no_grad():
        assert gemv_supported(xg, q)
    with torch.inference_mode():
        assert gemv_supported(torch.randn(1, 128), q)
    bias = torch.zeros(N, requires_grad=True)
    assert not gemv_supported(x, q, bias)
    assert gemv_supported(x, q, bias.detach())
    # on a CPU the decision is always the old path: Triton dispatches on CUDA tensors only
    assert not use_nf4_gemv(x, q)


def _layer(n: int, k: int, bias: bool, device) -> QuantLinear:
    layer = QuantLinear(k, n, bias=bias)
    layer.quantize_from(torch.randn(n, k, device=device))
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(n, device=device), requires_grad=False)
    return layer


def _count_gemv(monkeypatch) -> list:
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return nf4_gemv(*args, **kwargs)

    # NF4Tensor.linear reads the function from its module at each call
    monkeypatch.setattr(gemv_module, "nf4_gemv", counting)
    return calls


def test_quant_linear_cpu_keeps_old_path(monkeypatch):
    calls = _count_gemv(monkeypatch)
    layer = _layer(N, 128, True, "cpu")
    x = torch.randn(1, 128)
    with torch.no_grad():
        y = layer(x)
    assert calls == []
    torch.testing.assert_close(y, lora_linear(x, layer.quant_weight) + layer.bias, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# GPU: real sizes, and QuantLinear taking the GEMV in decode
# --------------------------------------------------------------------------------------------

GPU_SHAPES = [  # (M, N, K): Llama-3.2-1B and Llama-3.1-8B decode projections
    (1, 2048, 2048),
    (1, 512, 2048),
    (1, 8192, 2048),
    (1, 2048, 8192),
    (1, 1024, 4096),
    (1, 14336, 4096),
    (1, 4096, 14336),
    (3, 8192, 2048),
    (8, 4096, 4096),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("M,N,K", GPU_SHAPES)
def test_gpu_real_sizes(M, N, K, double_quant, dtype):
    q = quantize_nf4(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, 64, double_quant)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    y = nf4_gemv(x, q)
    torch.cuda.synchronize()
    _check(y, x, q, f"gemv {M}x{K} @ {N}x{K} dq={double_quant} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("blocksize", [64, 128])
def test_gpu_one_hot_exact(blocksize):
    """Bit-exact weights on the GPU: the double-quantization product is rounded before the offset is
    added (no fused multiply-add), as in the dequantize kernel."""
    K, n = 4096, 1024
    q = quantize_nf4(torch.randn(n, K, device="cuda") * 0.02, blocksize, True)
    cols = torch.tensor([0, 1, 63, 64, 2047, 2048, 4094, 4095], device="cuda")
    x = torch.zeros(len(cols), K, device="cuda")
    x[torch.arange(len(cols)), cols] = 1.0
    assert torch.equal(nf4_gemv(x, q), q.dequantize(torch.float32)[:, cols].t())


@pytest.mark.gpu
def test_gpu_quant_linear_uses_gemv(monkeypatch):
    calls = _count_gemv(monkeypatch)
    layer = _layer(8192, 2048, True, "cuda")
    x = torch.randn(1, 1, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert len(calls) == 1 and y.shape == (1, 1, 8192) and y.dtype == torch.bfloat16
    ref = x @ layer.dequantize(torch.bfloat16).t()
    truth = _truth(x.view(1, -1), layer.quant_weight).view(1, 1, -1) + layer.bias.double()
    assert_no_worse("QuantLinear gemv", y, ref + layer.bias.to(ref.dtype), truth, torch.bfloat16)
    # a training forward of few rows takes it too (its backward dequantizes); too many rows do not
    layer(x.clone().requires_grad_()).sum().backward()
    assert len(calls) == 2
    with torch.no_grad():
        layer(torch.randn(MAX_ROWS + 1, 2048, device="cuda", dtype=torch.bfloat16))
    assert len(calls) == 2
