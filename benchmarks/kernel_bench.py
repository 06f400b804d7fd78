#!/usr/bin/env python3
"""Kernel micro-benchmarks: fasttune's hot-path ops against torch eager, torch.compile and Liger-Kernel.

    python3 benchmarks/kernel_bench.py                                   # both shapes, every op, H100: ~3 min
    python3 benchmarks/kernel_bench.py --quick --shapes llama-8b --ops rms_norm,rope
    python3 benchmarks/kernel_bench.py --size tiny --device cpu          # the harness on a CPU, in seconds

One process measures, per shape (Llama-3.1-8B: 2 x 4096 tokens, hidden 4096, intermediate 14336, 32/8 heads
x 128, vocab 128256; Gemma-2-2B: hidden 2304, intermediate 9216, 8/4 heads x 256, vocab 256000, logit softcap
30; numbers from common.MODELS), the ops that model runs:

    rms_norm (Llama: w * x_hat; Gemma: (1 + w) * x_hat), swiglu or geglu_tanh, rope (q/k as the attention
    projections' (b, s, h, d) -> (b, h, s, d) views), cross_entropy (the causal-LM loss over bf16 logits),
    fused_linear_ce (hidden -> lm_head -> loss without materialised logits; the lm_head frozen, as under
    LoRA) and fused_linear_ce_dw (the same with the lm_head's gradient, as in full fine-tuning),

each by every implementation: fasttune (the public function: Triton on CUDA), eager (its `*_reference`),
compile (torch.compile(reference), static shapes), liger (Liger-Kernel's autograd Function, where it has the
op), and for the fused loss also logits (lm_head matmul, then fasttune's causal_lm_loss: the path the fused
loss replaces). All inputs are bf16; inputs that train require grad, so "forward" is a training forward
(saving what its backward needs) and "fwd+bwd" is forward + torch.autograd.grad with a fixed random
upstream gradient.

Before anything is timed, each implementation's output and every gradient is compared with the reference
run in fp32 on the same (upcast) inputs: error = max|out - oracle| / max|oracle| per tensor, allowed
max(4 x eager bf16's error, 1e-2 for 16-bit tensors / 1e-4 for fp32 ones) (eager itself: 4 x those floors,
so that only a broken reference fails it; its errors are the yardstick). An implementation that fails
is recorded as "wrong" with its errors and is not timed; one that raises is recorded as "error"; Liger
without the op as "unsupported".

Time: median over CUDA events around single calls, L2 flushed before each (triton.testing.do_bench's
method, with at least 5 timed calls; --quick: shorter), the GPU held by a sleep while the host queues
the call, so that the time is the GPU's (host launch overhead is the train benchmark's business); peak memory: max allocated
during one call minus allocated before it (held_mb: what the call leaves allocated, its outputs and saved
tensors; transient_mb = peak - held). Memory-bound ops report achieved GB/s over the minimal traffic
(each input read once, each output written once; fwd+bwd adds the upstream gradient read and the input
gradients written; "backward" = fwd+bwd - forward, over the backward's own minimal traffic) as a fraction
of common.copy_bandwidth_gbs() measured in this process. The fused loss reports TFLOP/s against
common.matmul_peak_tflops(), and its time and peak memory relative to the logits path.

Targets (issue 6): memory-bound kernels >= 80% of the copy bandwidth (forward and backward; the loss in
fwd+bwd, where one pass reads the logits and writes their gradient); fused linear CE (frozen lm_head)
fwd+bwd peak memory <= 1/8 of the logits path at <= 1.1x its time.

Results: <results-root>/<gpu-slug>/kernels.json, runs["<shape>"] (written after every op, so a crash keeps
what was measured), and kernels.png beside it.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
sys.path.insert(0, _HERE)
sys.path.insert(1, _REPO)

import common  # noqa: E402

BENCHMARK = "kernels"
SHAPES = ("llama-8b", "gemma2-2b")
OPS = ("rms_norm", "swiglu", "geglu_tanh", "rope", "cross_entropy", "fused_linear_ce", "fused_linear_ce_dw",
       "nf4_dequantize", "nf4_gemv")
IMPLS = ("eager", "fasttune", "compile", "liger", "logits")  # eager first: its error sets the tolerance
BATCH = {"full": (2, 4096), "tiny": (2, 16)}
TIMING = {"full": {"warmup_ms": 25, "rep_ms": 100, "min_calls": 5, "max_calls": 200},
          "quick": {"warmup_ms": 10, "rep_ms": 40, "min_calls": 3, "max_calls": 100}}
STICKY = ("illegal memory access", "illegal instruction", "misaligned address", "unspecified launch failure",
          "device-side assert")  # CUDA errors after which the context is unusable
BW_TARGET = 0.80
FLCE_TARGET = {"peak_ratio": 1 / 8, "time_ratio": 1.1}
TOL_FACTOR, TOL_FLOOR_16, TOL_FLOOR_32 = 4.0, 1e-2, 1e-4


class Skip(Exception):
    """This implementation does not apply here (recorded with its reason and a status, not as an error)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status


def _kernel(module: str, name: str):
    """The function as the module defines it now (looked up at every call, so a test can replace it);
    `module` is a name in fasttune.kernels or a full module path."""
    return getattr(importlib.import_module(module if "." in module else f"fasttune.kernels.{module}"), name)


def _liger(module: str, name: str):
    site = os.path.join(_REPO, ".peerpkgs", "site")
    if os.path.isdir(site) and site not in sys.path:
        sys.path.append(site)  # last, so that the peers' folder never shadows this environment's torch
    try:
        return getattr(importlib.import_module(f"liger_kernel.ops.{module}"), name)
    except ImportError as err:
        raise Skip("unsupported", f"liger-kernel is not importable here: {err}") from err


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ------------------------------------------------------------------------------------------------
# Shapes and ops
# ------------------------------------------------------------------------------------------------


def shape_dims(name: str, size: str) -> dict:
    spec = common.model_spec(name, size)
    c = spec.config
    batch, seq = BATCH[size]
    act = c.get("hidden_activation") or c.get("hidden_act")
    return {"name": spec.name, "shape_of": spec.hf_id, "batch": batch, "seq": seq, "tokens": batch * seq,
            "hidden": c["hidden_size"], "intermediate": c["intermediate_size"], "heads": c["num_attention_heads"],
            "kv_heads": c["num_key_value_heads"], "head_dim": spec.head_dim(), "vocab": c["vocab_size"],
            "eps": c["rms_norm_eps"], "activation": act, "softcap": c.get("final_logit_softcapping"),
            "norm_offset": 1.0 if spec.model_type.startswith("gemma") else 0.0,
            "rope_theta": c["rope_parameters"]["rope_theta"]}


class Op:
    """One op at one shape: its inputs, how each implementation is called, its minimal traffic or FLOPs."""

    name = ""
    diff: tuple = ()  # the inputs that require grad
    memory_bound = True
    target_modes: tuple = ("forward", "backward")

    def __init__(self, dims: dict):
        self.d = dims

    def variant(self) -> str:
        return ""

    def make(self, gen, device, dtype) -> dict:
        raise NotImplementedError

    # (module, reference function, public function): what the eager/compile and fasttune rows call
    functions: tuple[str, str, str] = ("", "", "")

    def reference(self):
        module, name, _ = self.functions
        return _kernel(module, name)

    def public(self):
        module, _, name = self.functions
        return _kernel(module, name)

    def call(self, fn, t: dict):
        raise NotImplementedError

    def liger(self):
        raise Skip("unsupported", f"Liger-Kernel has no {self.name}")

    def oracle(self, t32: dict):
        return self.call(self.reference(), t32)

    def extra(self) -> dict:
        return {}

    def traffic(self, t: dict) -> dict:
        return {}

    def flops(self) -> dict:
        return {}


def _nbytes(*tensors) -> int:
    return sum(x.numel() * x.element_size() for x in tensors)


def _randn(gen, shape, device, dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale + shift).to(dtype)


class RMSNorm(Op):
    name = "rms_norm"
    diff = ("x", "weight")

    def variant(self):
        return "gemma (1 + w)" if self.d["norm_offset"] else "llama (w)"

    def make(self, gen, device, dtype):
        d = self.d
        return {"x": _randn(gen, (d["batch"], d["seq"], d["hidden"]), device, dtype),
                "weight": _randn(gen, (d["hidden"],), device, dtype, 0.1, 0.0 if d["norm_offset"] else 1.0)}

    functions = ("rms_norm", "rms_norm_reference", "rms_norm")

    def call(self, fn, t):
        return fn(t["x"], t["weight"], self.d["eps"], self.d["norm_offset"])

    def liger(self):
        f = _liger("rms_norm", "LigerRMSNormFunction")
        gemma = bool(self.d["norm_offset"])
        # Liger's own patches: casting "llama" with dY reused in place; Gemma's casting, not in place (Gemma 2).
        return lambda t: f.apply(t["x"], t["weight"], self.d["eps"], self.d["norm_offset"],
                                 "gemma" if gemma else "llama", not gemma)

    def traffic(self, t):
        x, w = _nbytes(t["x"]), _nbytes(t["weight"])
        return {"forward": 2 * x + w, "backward": 3 * x + 2 * w, "fwd+bwd": 4 * x + 2 * w}


class GLU(Op):
    diff = ("gate", "up")

    def __init__(self, dims, kind: str, name: str):
        super().__init__(dims)
        self.kind, self.name = kind, name

    def variant(self):
        return f"{self.kind}(gate) * up"

    def make(self, gen, device, dtype):
        shape = (self.d["batch"], self.d["seq"], self.d["intermediate"])
        return {"gate": _randn(gen, shape, device, dtype), "up": _randn(gen, shape, device, dtype)}

    functions = ("activations", "glu_activation_reference", "glu_activation")

    def call(self, fn, t):
        return fn(t["gate"], t["up"], self.kind)

    def liger(self):
        if self.name == "swiglu":
            f = _liger("swiglu", "LigerSiLUMulFunction")
        else:  # Liger's GeGLU is the tanh approximation
            f = _liger("geglu", "LigerGELUMulFunction")
        return lambda t: f.apply(t["gate"], t["up"])

    def traffic(self, t):
        n = _nbytes(t["gate"])
        return {"forward": 3 * n, "backward": 5 * n, "fwd+bwd": 6 * n}


class Rope(Op):
    name = "rope"
    diff = ("q", "k")

    def variant(self):
        return f"{self.d['heads']}/{self.d['kv_heads']} heads x {self.d['head_dim']}"

    def make(self, gen, device, dtype):
        d = self.d
        b, s, hd = d["batch"], d["seq"], d["head_dim"]
        rope_cos_sin = _kernel("rope", "rope_cos_sin")
        inv_freq = 1.0 / (d["rope_theta"] ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
        pos = torch.arange(s, device=device).expand(b, s)
        cos, sin = rope_cos_sin(pos, inv_freq, 1.0, dtype)
        # q/k are stored as the projections write them, (b, s, h, d); the op sees (b, h, s, d) views
        return {"q": _randn(gen, (b, s, d["heads"], hd), device, dtype),
                "k": _randn(gen, (b, s, d["kv_heads"], hd), device, dtype), "cos": cos, "sin": sin}

    functions = ("rope", "apply_rope_reference", "apply_rope")

    def call(self, fn, t):
        return tuple(fn(t["q"].transpose(1, 2), t["k"].transpose(1, 2), t["cos"], t["sin"]))

    def liger(self):
        f = _liger("rope", "LigerRopeFunction")
        return lambda t: tuple(f.apply(t["q"].transpose(1, 2), t["k"].transpose(1, 2), t["cos"], t["sin"]))

    def traffic(self, t):
        qk, cs = _nbytes(t["q"], t["k"]), _nbytes(t["cos"], t["sin"])
        return {"forward": 2 * qk + cs, "backward": 2 * qk + cs, "fwd+bwd": 4 * qk + cs}


def _labels(gen, d, device):
    b, s = d["batch"], d["seq"]
    labels = torch.randint(0, d["vocab"], (b, s), generator=gen, device=device)
    drop = torch.rand((b, s), generator=gen, device=device) < 0.05  # some ignored targets, as in real batches
    labels[drop] = -100
    labels[:, -1] = -100  # shifted labels: the last position has no next token
    return labels


def _softcap_kw(softcap):
    # passed only when the model has one, so that a loss without the argument still serves the other shapes
    return {"softcap": softcap} if softcap else {}


class CrossEntropy(Op):
    name = "cross_entropy"
    diff = ("logits",)
    target_modes = ("fwd+bwd",)

    def variant(self):
        return f"vocab {self.d['vocab']:,}" + (f", softcap {self.d['softcap']:g}" if self.d["softcap"] else "")

    def make(self, gen, device, dtype):
        d = self.d
        # scale 3: large enough that a softcap (30) visibly changes the loss and its gradient
        return {"logits": _randn(gen, (d["batch"], d["seq"], d["vocab"]), device, dtype, 3.0),
                "labels": _labels(gen, d, device)}

    functions = ("cross_entropy", "causal_lm_loss_reference", "causal_lm_loss")

    def call(self, fn, t):
        return fn(t["logits"], shift_labels=t["labels"], **_softcap_kw(self.d["softcap"]))

    def liger(self):
        f = _liger("cross_entropy", "LigerCrossEntropyFunction")
        v, cap = self.d["vocab"], self.d["softcap"]
        # (input, target, weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap)
        return lambda t: _first(f.apply(t["logits"].view(-1, v), t["labels"].view(-1), None, -100, 0.0, 0.0,
                                        "mean", cap))

    def traffic(self, t):
        logits, labels = _nbytes(t["logits"]), _nbytes(t["labels"])
        # the gradient needs the whole softmax, so the minimal fwd+bwd is one read of the logits and one write
        # of their gradient; a split forward/backward reads them twice
        return {"forward": logits + labels, "fwd+bwd": 2 * logits + labels}


class FusedLinearCE(Op):
    memory_bound = False
    target_modes = ("fwd+bwd",)

    def __init__(self, dims, weight_grad: bool):
        super().__init__(dims)
        self.weight_grad = weight_grad
        self.name = "fused_linear_ce_dw" if weight_grad else "fused_linear_ce"
        self.diff = ("hidden", "weight") if weight_grad else ("hidden",)

    def variant(self):
        d = self.d
        return (f"{d['hidden']} -> {d['vocab']:,}" + (f", softcap {d['softcap']:g}" if d["softcap"] else "")
                + (", lm_head trained" if self.weight_grad else ", lm_head frozen"))

    def make(self, gen, device, dtype):
        d = self.d
        return {"hidden": _randn(gen, (d["batch"], d["seq"], d["hidden"]), device, dtype),
                "weight": _randn(gen, (d["vocab"], d["hidden"]), device, dtype, 3.0 / math.sqrt(d["hidden"])),
                "labels": _labels(gen, d, device)}

    functions = ("fused_linear_ce", "fused_linear_cross_entropy_reference", "fused_linear_cross_entropy")

    def call(self, fn, t):
        return fn(t["hidden"], t["weight"], shift_labels=t["labels"], softcap=self.d["softcap"])

    def oracle(self, t32):
        # the logits path in fp32, through the loss's reference: independent of the fused code under test
        logits = t32["hidden"] @ t32["weight"].T
        return _kernel("cross_entropy", "causal_lm_loss_reference")(
            logits, shift_labels=t32["labels"], **_softcap_kw(self.d["softcap"]))

    def extra(self):
        cap = _softcap_kw(self.d["softcap"])

        def logits_path(t):
            loss = _kernel("cross_entropy", "causal_lm_loss")
            return loss(t["hidden"] @ t["weight"].T, shift_labels=t["labels"], **cap)

        return {"logits": logits_path}

    def liger(self):
        f = _liger("fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction")
        h, cap = self.d["hidden"], self.d["softcap"]
        # (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction,
        #  softcap)
        return lambda t: _first(f.apply(t["hidden"].view(-1, h), t["weight"], t["labels"].view(-1), None, None,
                                        -100, 0.0, 0.0, "mean", cap))

    def flops(self):
        mm = 2 * self.d["tokens"] * self.d["vocab"] * self.d["hidden"]
        return {"forward": mm, "fwd+bwd": (3 if self.weight_grad else 2) * mm}


class _NF4(Op):
    """Forward-only ops on the MLP's (intermediate x hidden) up-projection weight, stored as NF4 with double
    quantization (fasttune.quant.nf4); the inputs are the format's tensors, the references its torch paths."""

    target_modes = ("forward",)

    def make(self, gen, device, dtype):
        from fasttune.quant.nf4 import quantize_nf4

        # a CPU run (the harness's smoke test, kernels in Triton's interpreter) takes the first rows only
        rows = self.d["intermediate"] if device.type == "cuda" else min(self.d["intermediate"], 64)
        w = _randn(gen, (rows, self.d["hidden"]), device, dtype, 0.02)
        q = quantize_nf4(w)
        out = {"data": q.data, "absmax": q.absmax, "code": q.code, "nested_absmax": q.nested_absmax,
               "nested_code": q.nested_code}
        self.meta = {"shape": q.shape, "dtype": q.dtype, "offset": q.offset}
        return out

    def weight(self, t):
        from fasttune.quant.nf4 import NF4Tensor

        return NF4Tensor(t["data"], self.meta["shape"], self.meta["dtype"], t["absmax"], t["code"],
                         offset=self.meta["offset"], nested_absmax=t["nested_absmax"], nested_code=t["nested_code"])

    def packed_bytes(self, t) -> int:
        return _nbytes(t["data"], t["absmax"], t["nested_absmax"])

    def weights(self, t) -> int:
        return 2 * t["data"].numel()


class NF4Dequantize(_NF4):
    name = "nf4_dequantize"

    def variant(self):
        return f"{self.d['intermediate']} x {self.d['hidden']} -> bf16"

    functions = ("fasttune.quant.nf4", "dequantize_nf4_reference", "dequantize_nf4")

    def call(self, fn, t):
        return fn(self.weight(t), self.meta["dtype"])

    def oracle(self, t32):
        return _kernel("fasttune.quant.nf4", "dequantize_nf4_reference")(self.weight(t32), torch.float32)

    def traffic(self, t):
        return {"forward": self.packed_bytes(t) + 2 * self.weights(t)}


class NF4Gemv(_NF4):
    """Batch-1 decode through the up-projection: x (1, hidden) @ W^T, reading the packed codes."""

    name = "nf4_gemv"

    def variant(self):
        return f"1 x {self.d['hidden']} @ ({self.d['intermediate']} x {self.d['hidden']})^T"

    def make(self, gen, device, dtype):
        out = super().make(gen, device, dtype)
        out["x"] = _randn(gen, (1, self.d["hidden"]), device, dtype)
        return out

    def reference(self):
        return lambda x, q: x @ q.dequantize(x.dtype).t()

    def public(self):
        return _kernel("fasttune.quant.nf4_gemv", "nf4_gemv")

    def call(self, fn, t):
        return fn(t["x"], self.weight(t))

    def oracle(self, t32):
        return _kernel("fasttune.quant.nf4_gemv", "nf4_gemv_reference")(t32["x"], self.weight(t32))

    def traffic(self, t):
        return {"forward": self.packed_bytes(t) + _nbytes(t["x"]) + 2 * self.weights(t) // self.d["hidden"]}


def ops_for(dims: dict, wanted) -> list[Op]:
    act = dims["activation"]
    glu = GLU(dims, act, "swiglu") if act in ("silu", "swish") else GLU(dims, act, "geglu_tanh")
    ops = [RMSNorm(dims), glu, Rope(dims), CrossEntropy(dims), FusedLinearCE(dims, False), FusedLinearCE(dims, True),
           NF4Dequantize(dims), NF4Gemv(dims)]
    return [op for op in ops if op.name in wanted]


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------

torch = None  # imported in main(), so that report.py and the tests can import this file cheaply


def _fresh(base: dict, diff) -> dict:
    return {k: v.detach().clone().requires_grad_(k in diff) for k, v in base.items()}


def _tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _in_layout(like: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(like.shape, like.stride(), dtype=values.dtype, device=values.device).copy_(values)


def _ups(dys, outs, clone=True) -> list:
    """The upstream gradients in each output's dtype (a loss may come back in fp32 or bf16); cloned for the
    check, since some backward kernels write their result into the upstream gradient."""
    if len(dys) != len(outs):
        raise ValueError(f"{len(outs)} outputs where the reference has {len(dys)}")
    return [d.to(o.dtype) if d.dtype != o.dtype else (d.clone() if clone else d) for d, o in zip(dys, outs)]


def _rel_err(got, want, chunk: int = 1 << 26) -> float:
    """max|got - want| / max|want|, in slices (a 256000-wide vocabulary's fp32 gradients are 8 GB apiece)."""
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} where the reference has {tuple(want.shape)}")
    got, want = got.detach().reshape(-1), want.detach().reshape(-1)
    err = scale = 0.0
    for i in range(0, got.numel(), chunk):
        g, w = got[i:i + chunk].float(), want[i:i + chunk].float()
        if not torch.isfinite(g).all():
            return math.inf
        err = max(err, (g - w).abs().max().item())
        scale = max(scale, w.abs().max().item())
    return err / (scale if scale > 0 else 1.0)


def _floor(x) -> float:
    return TOL_FLOOR_16 if x.dtype in (torch.bfloat16, torch.float16) else TOL_FLOOR_32


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


_FLUSH = None
_SLEEP_CYCLES_PER_MS = None


def _gpu_hold(ms: float) -> None:
    """Keep the GPU busy for about `ms` (torch.cuda._sleep, calibrated once), so that the host can queue
    a whole timed call before the GPU reaches its start event."""
    global _SLEEP_CYCLES_PER_MS
    if _SLEEP_CYCLES_PER_MS is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # warm
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        _SLEEP_CYCLES_PER_MS = 10_000_000 / max(start.elapsed_time(end), 1e-3)
    torch.cuda._sleep(int(ms * _SLEEP_CYCLES_PER_MS))


def time_ms(fn, device, timing: dict) -> float:
    """Median milliseconds of one call's GPU work. CUDA: triton.testing.do_bench's method (CUDA events
    around each call, L2 flushed before it, call counts from a first estimate), with at least `min_calls`
    timed calls, so that a 50 ms loss is not timed once or twice; and, before each start event, a GPU
    sleep longer than the call takes the host to queue, so that host time (Python, the autograd
    engine's start-up: ~0.1-0.3 ms, comparable to a memory-bound kernel) is not counted as the
    kernel's. In training the host runs ahead of the GPU; the train benchmark counts everything."""
    if device.type == "cuda":
        global _FLUSH
        if _FLUSH is None:
            _FLUSH = torch.empty(256 * 2**20, dtype=torch.int8, device=device)  # larger than the H100's 50 MB L2
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        end.synchronize()
        estimate = max(start.elapsed_time(end) / 3, 1e-3)
        for _ in range(min(max(1, int(timing["warmup_ms"] / estimate)), 100)):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()  # host time to queue one call (a call that synchronizes inside counts its GPU time too)
        host_ms = (time.perf_counter() - t0) * 1e3
        hold_ms = min(2.0 * host_ms + 0.05, 20.0)
        calls = min(max(timing["min_calls"], int(timing["rep_ms"] / estimate)), timing["max_calls"])
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
        for start, end in events:
            _FLUSH.zero_()
            _gpu_hold(hold_ms)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)
    fn()
    times = []
    for _ in range(timing.get("calls", 3)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def memory_mb(fn, device) -> dict:
    if device.type != "cuda":
        return {}
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    kept = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    held = torch.cuda.memory_allocated() - before
    del kept
    mb = 2**20
    return {"peak_mb": round(peak / mb, 1), "held_mb": round(held / mb, 1), "transient_mb": round((peak - held) / mb, 1)}


class Runner:
    def __init__(self, args, device, machine):
        self.args, self.device, self.machine = args, device, machine
        self.timing = dict(TIMING["quick" if args.quick else "full"])
        if device.type != "cuda":
            # a CPU run is a smoke test of the harness (Triton kernels run in the interpreter there): one timed call
            self.timing = {"calls": 1}
        self.t0 = time.perf_counter()
        self.cuda_broken = None

    def builders(self, op: Op) -> dict:
        cuda = self.device.type == "cuda"

        def eager():
            ref = op.reference()
            return lambda t: op.call(ref, t)

        def fasttune():
            fn = op.public()
            return lambda t: op.call(fn, t)

        def compiled():
            if not cuda:
                raise Skip("skipped", "torch.compile is measured on CUDA only")
            if self.args.quick and not op.memory_bound:
                raise Skip("skipped", "--quick compiles the memory-bound ops only")
            if op.name == "fused_linear_ce_dw":
                raise Skip("skipped", "compiled once, at fused_linear_ce (frozen lm_head)")
            fn = torch.compile(op.reference(), dynamic=False)
            return lambda t: op.call(fn, t)

        def liger():
            if not cuda:
                raise Skip("skipped", "Liger-Kernel is Triton on CUDA only")
            return op.liger()

        out = {"eager": eager, "fasttune": fasttune, "compile": compiled, "liger": liger}
        out.update({name: (lambda f=f: f) for name, f in op.extra().items()})
        return {name: out[name] for name in IMPLS if name in out and name in self.args.impls}

    def run_op(self, op: Op) -> dict:
        dev, dtype = self.device, torch.bfloat16
        case = {"op": op.name, "variant": op.variant(), "memory_bound": op.memory_bound,
                "target_modes": list(op.target_modes), "impls": {}}
        gen = torch.Generator(device=dev).manual_seed(1234)
        base = op.make(gen, dev, dtype)
        case["inputs"] = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in base.items()}
        case["bytes"], case["flops"] = op.traffic(base), op.flops()
        # the fp32 oracle and the upstream gradients (one set for every implementation)
        t32 = {k: (v.detach().float() if v.is_floating_point() else v.detach()).requires_grad_(k in op.diff)
               for k, v in base.items()}
        want = _tuple(op.oracle(t32))
        # each upstream gradient in its output's memory layout, as autograd hands them over inside a model
        # (SDPA returns dq/dk in the layout of the rotated q/k it was given; a contiguous (b, h, s, d) gradient
        # for a (b, s, h, d)-laid-out output would time a transposing read the model never does)
        dys = [torch.ones_like(o, dtype=dtype) if o.dim() == 0 else _in_layout(o, _randn(gen, o.shape, dev, dtype))
               for o in want]
        want_grads = torch.autograd.grad(want, [t32[n] for n in op.diff], [d.float() for d in dys]) if op.diff else ()
        want = [w.detach() for w in want]
        del t32
        eager_errs: dict = {}
        for name, build in self.builders(op).items():
            rec = case["impls"][name] = {}
            if self.cuda_broken:
                rec.update(status="skipped", reason=f"CUDA context broken earlier: {self.cuda_broken}"[:300])
                continue
            if self.args.budget_s and time.perf_counter() - self.t0 > self.args.budget_s:
                rec.update(status="skipped", reason=f"past --budget-s {self.args.budget_s:g}")
                continue
            try:
                errors = self.measure(op, build, base, dys, want, want_grads, rec,
                                      eager_errs if name != "eager" else None)
                if name == "eager":
                    eager_errs.update(errors)
            except Skip as s:
                rec.update(status=s.status, reason=str(s))
            except Exception as err:  # a failing kernel is a result: record it and go on
                rec.update(status="error", error=f"{type(err).__name__}: {err}"[:1500])
                if type(err).__name__ == "OutOfMemoryError":
                    rec["status"] = "oom"
                if any(p in str(err) for p in STICKY):
                    self.cuda_broken = str(err)[:200]
                print(f"[kernels] {op.name} {name}: {rec['error'][:300]}", file=sys.stderr, flush=True)
            finally:
                if dev.type == "cuda" and not self.cuda_broken:
                    gc.collect()  # frees the implementation's tensors before the next one's peak is read
                    torch.cuda.empty_cache()
        if "compile" in case["impls"] and dev.type == "cuda":
            torch._dynamo.reset()  # drop this shape's compiled graphs before the next op
        derive(case, self.machine)
        return case

    def measure(self, op, build, base, dys, want, want_grads, rec, eager_errs):
        dev = self.device
        t_build = time.perf_counter()
        fn = build()
        # correctness first, on fresh inputs (some kernels write into their inputs or upstream gradients)
        t = _fresh(base, op.diff)
        got = _tuple(fn(t))
        if len(got) != len(want):
            raise ValueError(f"{len(got)} outputs where the reference has {len(want)}")
        grads = torch.autograd.grad(got, [t[n] for n in op.diff], _ups(dys, got), allow_unused=True) if op.diff \
            else ()
        _sync(dev)
        rec["first_call_s"] = round(time.perf_counter() - t_build, 2)  # includes compiling / Triton's JIT
        errors, tols = {}, {}
        pairs = [(f"out{i}", g, w) for i, (g, w) in enumerate(zip(got, want))]
        pairs += [(f"d_{n}", g, w) for n, g, w in zip(op.diff, grads, want_grads)]
        for key, g, w in pairs:
            if g is None:
                raise ValueError(f"no gradient for {key.removeprefix('d_')}")
            errors[key] = _rel_err(g, w)
            if eager_errs is None:  # the eager path itself: only a gross error (a broken reference) fails it
                tols[key] = TOL_FACTOR * _floor(g)
            else:
                base_err = eager_errs.get(key)
                tols[key] = max(TOL_FACTOR * base_err, _floor(g)) if base_err is not None and math.isfinite(base_err) \
                    else _floor(g)
        bad = {k: e for k, e in errors.items() if not e <= tols[k]}
        rec["check"] = {"errors": {k: _round(e) for k, e in errors.items()},
                        "tolerances": {k: _round(x) for k, x in tols.items()}, "ok": not bad}
        del t, got, grads
        if bad:
            rec["status"] = "wrong"
            rec["error"] = "wrong result: " + ", ".join(f"{k} error {e:.3g} > {tols[k]:.3g}" for k, e in bad.items())
            print(f"[kernels] {op.name}: {rec['error']}", file=sys.stderr, flush=True)
            return errors
        for mode in ("forward", "fwd+bwd") if op.diff else ("forward",):  # forward-only ops have no backward
            call = _closure(fn, _fresh(base, op.diff), op.diff, [d.clone() for d in dys], mode)
            ms = time_ms(call, dev, self.timing)
            rec[mode] = {"ms": round(ms, 4), **memory_mb(call, dev)}
            del call
        rec["status"] = "ok"
        return errors


def _closure(fn, t: dict, diff, ups: list, mode: str):
    """One timed call: a training forward (inputs that train require grad), or forward + autograd.grad."""
    if mode == "forward":
        return lambda: fn(t)
    inputs = [t[n] for n in diff]

    def call():
        outs = _tuple(fn(t))
        return torch.autograd.grad(outs, inputs, _ups(ups, outs, clone=False))

    return call


def _round(x: float, digits: int = 3):
    if x is None or not math.isfinite(x):
        return None if x is None else str(x)
    return float(f"{x:.{digits}g}")


def derive(case: dict, machine: dict) -> None:
    """Throughput, speed-ups and the case's target verdict from the raw times (in place)."""
    copy, peak = machine.get("copy_gbs"), machine.get("bf16_matmul_tflops")
    impls = case["impls"]
    for rec in impls.values():
        if rec.get("status") != "ok":
            continue
        if "forward" in rec and "fwd+bwd" in rec:
            rec["backward"] = {"ms": round(max(rec["fwd+bwd"]["ms"] - rec["forward"]["ms"], 0.0), 4)}
        for mode in ("forward", "backward", "fwd+bwd"):
            m = rec.get(mode)
            if not m or not m["ms"]:
                continue
            s = m["ms"] / 1e3
            if case["bytes"].get(mode):
                m["gbs"] = _round(case["bytes"][mode] / s / 1e9, 4)
                m["bw_fraction"] = round(m["gbs"] / copy, 4) if copy else None
            if case["flops"].get(mode):
                m["tflops"] = _round(case["flops"][mode] / s / 1e12, 4)
                m["peak_fraction"] = round(m["tflops"] / peak, 4) if peak else None
        eager = impls.get("eager", {})
        if eager.get("status") == "ok":
            rec["speedup_vs_eager"] = {mode: round(eager[mode]["ms"] / rec[mode]["ms"], 3)
                                       for mode in ("forward", "fwd+bwd") if rec.get(mode, {}).get("ms")}
        logits = impls.get("logits", {})
        if logits.get("status") == "ok" and logits.get("fwd+bwd", {}).get("ms"):
            lp, fb = logits["fwd+bwd"], rec["fwd+bwd"]
            rec["vs_logits"] = {"time_ratio": round(fb["ms"] / lp["ms"], 3),
                                "peak_ratio": round(fb["peak_mb"] / lp["peak_mb"], 4) if lp.get("peak_mb") else None}
    case["target"] = target(case)


def target(case: dict) -> dict:
    ft = case["impls"].get("fasttune", {})
    if case["op"] == "fused_linear_ce_dw":
        return {}  # informational: the target is stated for the frozen lm_head (LoRA) case
    if case["memory_bound"]:
        label = f"≥ {BW_TARGET:.0%} of copy bandwidth ({', '.join(case['target_modes'])})"
        if ft.get("status") != "ok":
            return {"label": label, "measured": f"fasttune {ft.get('status', 'not run')}", "met": False}
        fracs = {m: ft.get(m, {}).get("bw_fraction") for m in case["target_modes"]}
        if any(f is None for f in fracs.values()):
            return {"label": label, "measured": "no copy bandwidth (not CUDA)", "met": None}
        text = ", ".join(f"{m} {f:.0%}" for m, f in fracs.items())
        return {"label": label, "measured": text, "met": all(f >= BW_TARGET for f in fracs.values())}
    label = "fwd+bwd peak ≤ 1/8 of the logits path at ≤ 1.1× its time"
    if ft.get("status") != "ok":
        return {"label": label, "measured": f"fasttune {ft.get('status', 'not run')}", "met": False}
    vs = ft.get("vs_logits")
    if not vs or vs.get("peak_ratio") is None:
        return {"label": label, "measured": "logits path not measured", "met": None}
    return {"label": label, "measured": f"peak {vs['peak_ratio']:.3f}×, time {vs['time_ratio']:.2f}× of the logits path",
            "met": vs["peak_ratio"] <= FLCE_TARGET["peak_ratio"] and vs["time_ratio"] <= FLCE_TARGET["time_ratio"]}


def problems_of(cases: list) -> list[str]:
    """What makes a shape's record fail: fasttune (or its reference, or the logits path) wrong or raising."""
    out = []
    for case in cases:
        for name in ("fasttune", "eager", "logits"):
            r = case["impls"].get(name)
            if r and r.get("status") in ("wrong", "error", "oom"):
                out.append(f"{case['op']} {name}: {r.get('error', r['status'])}"[:300])
        if case.get("error"):
            out.append(f"{case['op']}: {case['error']}"[:300])
    return out


def summary_line(shape: str, cases: list) -> str:
    parts = []
    for c in cases:
        ft = c["impls"].get("fasttune", {})
        if ft.get("status") == "ok":
            mode = "fwd+bwd" if "fwd+bwd" in ft else "forward"  # forward-only ops (nf4) have no backward
            x = ft.get("speedup_vs_eager", {}).get(mode)
            parts.append(f"{c['op']} {ft[mode]['ms']:.3f} ms" + (f" ({x:.2f}x eager)" if x else ""))
        else:
            parts.append(f"{c['op']} {ft.get('status', c.get('error', '?'))}")
    return f"[kernels] {shape}: " + "; ".join(parts)


# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    def csv(choices):
        def parse(text):
            items = [x for x in text.split(",") if x]
            unknown = sorted(set(items) - set(choices))
            if unknown:
                raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(choices)}")
            return items
        return parse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=csv(SHAPES), default=list(SHAPES))
    p.add_argument("--ops", type=csv(OPS), default=list(OPS))
    p.add_argument("--impls", type=csv(IMPLS), default=list(IMPLS))
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--quick", action="store_true",
                   help="shorter timing (10 + 40 ms per measurement) and torch.compile for memory-bound ops only")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no measurement after this many seconds (the rest is recorded as skipped)")
    p.add_argument("--results-root", default=None)
    p.add_argument("--no-chart", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    global torch
    args = parse_args(argv)
    t_start = time.perf_counter()
    import torch as _torch

    torch = _torch
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 oracle is fp32
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    machine = {"copy_gbs": None, "bf16_matmul_tflops": None}
    if device.type == "cuda":
        machine = {"copy_gbs": common.copy_bandwidth_gbs(), "bf16_matmul_tflops": common.matmul_peak_tflops()}
        print(f"[kernels] copy {machine['copy_gbs']} GB/s, bf16 matmul {machine['bf16_matmul_tflops']} TFLOP/s",
              flush=True)
    runner = Runner(args, device, machine)
    codes, path = [], None
    for shape in args.shapes:
        dims = shape_dims(shape, args.size)
        t_shape = time.perf_counter()
        record = {"benchmark": BENCHMARK, "status": "partial", "shape": dims["name"], "size": args.size,
                  "device": device.type, "dtype": "bfloat16", "quick": args.quick, "dims": dims, "machine": machine,
                  "timing": {"method": "CUDA events, median, L2 flushed, host queueing hidden behind a GPU sleep" if device.type == "cuda" else "perf_counter",
                             **runner.timing},
                  "tolerance": {"factor_over_eager": TOL_FACTOR, "floor_16bit": TOL_FLOOR_16, "floor_32bit": TOL_FLOOR_32},
                  "cases": []}
        gpu = common.gpu_info()["name"]  # the folder finish_run writes to
        path = common.result_path(BENCHMARK, gpu, args.results_root)
        for op in ops_for(dims, args.ops):
            if runner.cuda_broken:
                record["cases"].append({"op": op.name, "variant": op.variant(), "memory_bound": op.memory_bound,
                                        "impls": {}, "target": {},
                                        "error": f"not run: CUDA context broken earlier: {runner.cuda_broken}"[:500]})
                continue
            print(f"[kernels] {dims['name']} {op.name} ({op.variant()}) at {time.perf_counter() - t_start:.0f} s",
                  flush=True)
            try:
                case = runner.run_op(op)
            except Exception as err:  # the inputs or the oracle failed: nothing of this op can be checked
                case = {"op": op.name, "variant": op.variant(), "memory_bound": op.memory_bound, "impls": {},
                        "error": f"{type(err).__name__}: {err}"[:1500], "target": {}}
                print(f"[kernels] {op.name}: {case['error'][:300]}", file=sys.stderr, flush=True)
                if any(p in str(err) for p in STICKY):
                    runner.cuda_broken = str(err)[:200]
                elif device.type == "cuda":
                    gc.collect()
                    torch.cuda.empty_cache()
            record["cases"].append(case)
            common.write_run(path, BENCHMARK, dims["name"], {**record, **common.provenance()})
        record["problems"] = problems_of(record["cases"])
        record["status"] = "failed-checks" if record["problems"] else "ok"
        codes.append(common.finish_run(BENCHMARK, dims["name"], record, t_shape, args.results_root,
                                       summary_line(dims["name"], record["cases"])))
    if path is not None and not args.no_chart:
        try:
            import report

            runs = report.load(path.parent).get(BENCHMARK, {})
            made = report.kernels_chart(runs, path.parent / "kernels.png", report.provenance_line({BENCHMARK: runs}))
            if made:
                print(f"[kernels] chart {made}", flush=True)
        except Exception as err:  # the measurements are written; a chart can be redrawn by report.py
            print(f"[kernels] no chart: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
    print(f"[kernels] done in {time.perf_counter() - t_start:.0f} s", flush=True)
    return max(codes) if codes else 0


if __name__ == "__main__":
    sys.exit(main())
