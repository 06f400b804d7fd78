# ruff: noqa: B023  (each lambda is timed before its loop variables change)
"""Launch-configuration sweep for the memory-bound kernels and the fused linear CE chunk size (GPU only).

A tuning aid, not a benchmark: it times the launchers directly (no autograd) at Llama-3-8B and
Gemma-2-2B sizes under each candidate configuration and prints one JSON line per measurement, so
that the defaults in fasttune/kernels/ can be chosen from numbers. The committed benchmark is
benchmarks/kernel_bench.py.

    python3 scripts/kernel_sweep.py [--only rms_norm,rope,ce,flce,nf4] > sweep.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

# the modules themselves (fasttune.kernels re-exports functions under the same names as its submodules)
CE = importlib.import_module("fasttune.kernels.cross_entropy")
FL = importlib.import_module("fasttune.kernels.fused_linear_ce")
RN = importlib.import_module("fasttune.kernels.rms_norm")
RP = importlib.import_module("fasttune.kernels.rope")

DEV = "cuda"
BF16 = torch.bfloat16
SHAPES = {"llama-8b": {"hidden": 4096, "heads": 32, "kv": 8, "hd": 128, "vocab": 128256, "softcap": None, "offset": 0.0},
          "gemma2-2b": {"hidden": 2304, "heads": 8, "kv": 4, "hd": 256, "vocab": 256000, "softcap": 30.0, "offset": 1.0}}
B, S = 2, 4096


def emit(**rec):
    print(json.dumps(rec), flush=True)


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def copy_gbs() -> float:
    x = torch.empty(1 << 29, dtype=torch.int8, device=DEV)
    y = torch.empty_like(x)
    return 2 * x.numel() / bench(lambda: y.copy_(x)) / 1e6


def sweep_rms_norm(copy):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    base_config, base_programs = RN._config, RN._num_programs
    for name, d in SHAPES.items():
        n, off = d["hidden"], d["offset"]
        x = torch.randn(B * S, n, device=DEV, dtype=BF16)
        w = torch.randn(n, device=DEV, dtype=BF16) * 0.1 + (0 if off else 1)
        dy = torch.randn_like(x)
        _, _, x2, rstd = RN.rms_norm_forward(x, w, 1e-6, off)
        xb = x.numel() * 2
        emit(kernel="rms_norm", shape=name, mode="default-fwd", ms=(t := bench(lambda: RN.rms_norm_forward(x, w, 1e-6, off))),
             bw=2 * xb / t / 1e6 / copy)
        for bm in (1, 2, 4, 8):
            for nw in (4, 8, 16):
                RN._config = lambda m, nn, bm=bm, nw=nw: (bm, triton.next_power_of_2(nn), nw)
                t = bench(lambda: RN.rms_norm_forward(x, w, 1e-6, off))
                emit(kernel="rms_norm", shape=name, mode="fwd", block_m=bm, warps=nw, ms=t, bw=2 * xb / t / 1e6 / copy)
                t = bench(lambda: RN.rms_norm_backward(dy, x2, w, rstd, off, need_dw=False))
                emit(kernel="rms_norm", shape=name, mode="bwd", block_m=bm, warps=nw, ms=t, bw=3 * xb / t / 1e6 / copy)
                for mult in (1, 2, 4, 8, 16):
                    RN._num_programs = lambda tiles, dev, mult=mult: max(1, min(tiles, mult * sms))
                    t = bench(lambda: RN.rms_norm_backward(dy, x2, w, rstd, off, need_dw=True))
                    emit(kernel="rms_norm", shape=name, mode="bwd+dw", block_m=bm, warps=nw, per_sm=mult, ms=t,
                         bw=3 * xb / t / 1e6 / copy)
                RN._num_programs = base_programs
        RN._config = base_config


def sweep_rope(copy):
    base = RP._rope_config
    for name, d in SHAPES.items():
        hq, hk, hd = d["heads"], d["kv"], d["hd"]
        q = torch.randn(B, S, hq, hd, device=DEV, dtype=BF16).transpose(1, 2)
        k = torch.randn(B, S, hk, hd, device=DEV, dtype=BF16).transpose(1, 2)
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=DEV, dtype=torch.float32) / hd))
        cos, sin = RP.rope_cos_sin(torch.arange(S, device=DEV).expand(B, S), inv, 1.0, BF16)
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        # upstream gradients: as SDPA returns them (the layout of its rotated q/k input) and contiguous
        ups = {"bshd": (torch.randn_like(qo), torch.randn_like(ko)),
               "bhsd": (torch.randn(qo.shape, device=DEV, dtype=BF16), torch.randn(ko.shape, device=DEV, dtype=BF16))}
        qkb = (q.numel() + k.numel()) * 2
        for tile in (256, 512, 1024, 2048, 4096, 8192):
            for nw in (1, 2, 4, 8):
                def cfg(heads, half, tile=tile, nw=nw):
                    bd = triton.next_power_of_2(half)
                    return min(triton.next_power_of_2(heads), max(1, tile // bd)), bd, nw
                RP._rope_config = cfg
                t = bench(lambda: RP._launch(q, k, qo, ko, cos, sin, backward=False))
                emit(kernel="rope", shape=name, mode="fwd", tile=tile, warps=nw, ms=t, bw=2 * qkb / t / 1e6 / copy)
                for lay, (dq_up, dk_up) in ups.items():
                    t = bench(lambda: RP._launch(dq_up, dk_up, qo, ko, cos, sin, backward=True))
                    emit(kernel="rope", shape=name, mode=f"bwd-{lay}", tile=tile, warps=nw, ms=t,
                         bw=2 * qkb / t / 1e6 / copy)
        RP._rope_config = base


def sweep_ce(copy):
    base = CE._launch_config
    for name, d in SHAPES.items():
        V, cap = d["vocab"], d["softcap"]
        z = torch.randn(B * S // 2, V, device=DEV, dtype=BF16) * 3
        t_ = torch.randint(0, V, (B * S // 2,), device=DEV)
        g = torch.empty_like(z)
        zb = z.numel() * 2
        one = torch.ones(1, device=DEV)
        for bv in (1024, 2048, 4096, 8192, 16384):
            for nw in (4, 8, 16, 32):
                CE._launch_config = lambda V_, block_v, bv=bv, nw=nw: (bv, nw)
                t = bench(lambda: CE.cross_entropy_rows(z, t_, softcap=cap))
                emit(kernel="ce", shape=name, mode="lse", block_v=bv, warps=nw, ms=t, bw=zb / t / 1e6 / copy)
                t = bench(lambda: CE.cross_entropy_rows(z, t_, softcap=cap, grad_out=g, grad_scale=one))
                emit(kernel="ce", shape=name, mode="lse+grad", block_v=bv, warps=nw, ms=t, bw=3 * zb / t / 1e6 / copy)
        CE._launch_config = base


def _peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _time(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def sweep_flce(copy):
    for name, d in SHAPES.items():
        H, V, cap = d["hidden"], d["vocab"], d["softcap"]
        h = torch.randn(B, S, H, device=DEV, dtype=BF16, requires_grad=True)
        for train_w in (False, True):
            W = (torch.randn(V, H, device=DEV, dtype=BF16) * H ** -0.5).requires_grad_(train_w)
            labels = torch.randint(0, V, (B, S), device=DEV)

            def logits_path():
                CE.causal_lm_loss(F.linear(h, W), labels, softcap=cap).backward()
                h.grad = W.grad = None

            emit(kernel="flce", shape=name, train_w=train_w, mode="logits", ms=_time(logits_path), peak_mb=_peak(logits_path))
            for chunk in (None, 256, 512, 1024, 2048, 4096):
                def fused(chunk=chunk):
                    FL.fused_linear_cross_entropy(h, W, labels, softcap=cap, chunk_tokens=chunk).backward()
                    h.grad = W.grad = None
                emit(kernel="flce", shape=name, train_w=train_w, mode="fused", chunk=chunk, ms=_time(fused),
                     peak_mb=_peak(fused))
            del W
    # accuracy diagnosis at the GPU test's size: max and rms error of dh against fp32 truth
    Bt, T, H, V = 2, 1024, 4096, 128256
    h = torch.randn(Bt, T, H, device=DEV, requires_grad=True)
    W = (torch.randn(V, H, device=DEV) * H ** -0.5 * 2).requires_grad_()
    labels = torch.randint(0, V, (Bt, T), device=DEV)

    def grads(fn, h_, W_):
        h_ = h_.detach().requires_grad_()
        W_ = W_.detach().requires_grad_()
        fn(h_, W_).backward()
        return h_.grad.double(), W_.grad.double()

    truth = grads(lambda a, b: FL.fused_linear_cross_entropy_reference(a, b, labels), h, W)
    plain = grads(lambda a, b: F.cross_entropy(F.linear(a, b).reshape(-1, V),
                                               CE.shift_labels_left(labels).reshape(-1)), h.to(BF16), W.to(BF16))
    for chunk in (None, 1024, 2048):
        ours = grads(lambda a, b: FL.fused_linear_cross_entropy(a, b, labels, chunk_tokens=chunk), h.to(BF16), W.to(BF16))
        for i, nm in enumerate(("dh", "dW")):
            e_o, e_p = (ours[i] - truth[i]), (plain[i] - truth[i])
            emit(kernel="flce-acc", chunk=chunk, grad=nm, max_ours=e_o.abs().max().item(), max_plain=e_p.abs().max().item(),
                 rms_ours=e_o.pow(2).mean().sqrt().item(), rms_plain=e_p.pow(2).mean().sqrt().item(),
                 scale=truth[i].abs().max().item())


SWEPT_GEMV_SHAPES = ("1b-qkvo", "1b-up", "8b-down")


def sweep_nf4(copy):
    """NF4 dequantize (default launch) and the decode GEMV over its GemvConfig space, batch 1 and 8, at the
    projection shapes of Llama-3.2-1B and Llama-3.1-8B; bandwidth over the packed bytes actually read."""
    from fasttune.quant.nf4 import quantize_nf4
    from fasttune.quant.nf4_gemv import GemvConfig, gemv_config, nf4_gemv

    shapes = {"1b-qkvo": (2048, 2048), "1b-kv": (512, 2048), "1b-up": (8192, 2048), "1b-down": (2048, 8192),
              "8b-q": (4096, 4096), "8b-up": (14336, 4096), "8b-down": (4096, 14336)}
    for name, (n, k) in shapes.items():
        q = quantize_nf4(torch.randn(n, k, device=DEV, dtype=BF16) * 0.02)
        packed = q.data.numel() + q.absmax.numel() + 4 * q.nested_absmax.numel()
        out = torch.empty(n, k, device=DEV, dtype=BF16)
        t = bench(lambda: q.dequantize(BF16, out=out))
        emit(kernel="nf4_dequantize", shape=name, ms=t, bw=(packed + 2 * n * k) / t / 1e6 / copy)
        for m in (1, 8):
            x = torch.randn(m, k, device=DEV, dtype=BF16)
            default = gemv_config(m, n, k, q.blocksize, x.device)
            t = bench(lambda: nf4_gemv(x, q))
            emit(kernel="nf4_gemv", shape=name, M=m, config="default", block_n=default.block_n,
                 block_kb=default.block_kb, warps=default.num_warps, ms=t, bw=packed / t / 1e6 / copy)
            if m != 1 or name not in SWEPT_GEMV_SHAPES:
                continue  # each config compiles (~1 s): the full space only where decode spends its time
            for bn in (1, 2, 4):
                for kb in (512, 1024, 2048):
                    if kb > k // 2:
                        continue
                    for nw in (2, 4, 8):
                        for stages in (1, 2):
                            cfg = GemvConfig(bn, kb, nw, stages)
                            try:
                                t = bench(lambda: nf4_gemv(x, q, config=cfg))
                            except Exception as err:  # noqa: BLE001 - a config the compiler refuses is a data point
                                emit(kernel="nf4_gemv", shape=name, M=m, block_n=bn, block_kb=kb, warps=nw,
                                     stages=stages, error=str(err)[:200])
                                continue
                            emit(kernel="nf4_gemv", shape=name, M=m, block_n=bn, block_kb=kb, warps=nw, stages=stages,
                                 ms=t, bw=packed / t / 1e6 / copy)
        # the matmul it replaces in decode: dequantize into a buffer, then multiply
        x = torch.randn(1, k, device=DEV, dtype=BF16)
        t = bench(lambda: x @ q.dequantize(BF16, out=out).t())
        emit(kernel="nf4_dequant_matmul", shape=name, M=1, ms=t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="rms_norm,rope,ce,flce,nf4")
    args = ap.parse_args()
    copy = copy_gbs()
    emit(kernel="copy", gbs=copy)
    for part in args.only.split(","):
        {"rms_norm": sweep_rms_norm, "rope": sweep_rope, "ce": sweep_ce, "flce": sweep_flce, "nf4": sweep_nf4}[part](copy)


if __name__ == "__main__":
    main()
