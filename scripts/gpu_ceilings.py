#!/usr/bin/env python3
"""The GPU machine's ceilings that decide the training step's design, in one short run (GPU only):

    python3 scripts/gpu_ceilings.py [--json out.json]

- PCIe: pinned host <-> device copy GB/s, each direction alone and both at once (offloaded
  checkpointing parks activations over it: how many bytes a layer's forward can hide);
- matmul TFLOP/s at Llama-8B's LoRA-step shapes (4096 tokens x the projections), bf16 and, where
  torch has it (sm_89+), fp8 e4m3 with row-wise scales (torch._scaled_mm), the forward and the dX shapes.

A diagnostic for planning, not a benchmark result.
"""

from __future__ import annotations

import argparse
import json

import torch


def _time_ms(fn, repeats: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def pcie(nbytes: int = 256 << 20) -> dict:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dev2 = torch.empty_like(dev)
    side = torch.cuda.Stream()
    d2h = _time_ms(lambda: host.copy_(dev, non_blocking=True))
    h2d = _time_ms(lambda: dev2.copy_(host2, non_blocking=True))

    def both():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dev2.copy_(host2, non_blocking=True)
        host.copy_(dev, non_blocking=True)
        torch.cuda.current_stream().wait_stream(side)

    duplex = _time_ms(both)
    gb = nbytes / 1e9
    return {"d2h_gbs": round(gb / d2h * 1e3, 1), "h2d_gbs": round(gb / h2d * 1e3, 1),
            "both_each_gbs": round(gb / duplex * 1e3, 1), "bytes": nbytes}


def matmuls(tokens: int = 4096) -> list:
    shapes = {"q_proj": (4096, 4096), "kv_proj": (1024, 4096), "gate_proj": (14336, 4096),
              "down_proj": (4096, 14336)}
    fp8 = hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability() >= (8, 9)
    rows = []
    for name, (out_f, in_f) in shapes.items():
        for kind, (m, k, n) in (("forward", (tokens, in_f, out_f)), ("dX", (tokens, out_f, in_f))):
            flops = 2 * m * k * n
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            row = {"proj": name, "pass": kind, "m": m, "k": k, "n": n,
                   "bf16_tflops": round(flops / _time_ms(lambda: a @ w.t()) / 1e9, 1)}
            if fp8:
                a8 = a.to(torch.float8_e4m3fn)
                w8 = w.to(torch.float8_e4m3fn)
                sa = torch.ones(m, 1, device="cuda", dtype=torch.float32)
                sw = torch.ones(1, n, device="cuda", dtype=torch.float32)
                row["fp8_rowwise_tflops"] = round(flops / _time_ms(
                    lambda: torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16)) / 1e9, 1)
            rows.append(row)
            del a, w
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_ceilings.py needs a CUDA GPU")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "pcie": pcie(), "matmul": matmuls()}
    print(json.dumps(result["pcie"]))
    for row in result["matmul"]:
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
