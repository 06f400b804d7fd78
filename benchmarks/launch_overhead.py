"""Host time per Triton kernel launch: fasttune.kernels.launch against `kernel[grid](...)`.

The kernels run on small inputs while a sleep kernel holds the GPU, so the wall time of a loop of
launches is the host's time to issue them (the GPU never makes the host wait). Each case launches
through fasttune's public functions (their Python included), once with the fast launch and once with
the fast path switched off in-process, alternating rounds; the median round is reported.

    python3 benchmarks/launch_overhead.py [--launches 500] [--rounds 5] [--results-root DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _cases(torch):
    from fasttune.kernels.activations import glu_forward
    from fasttune.kernels.rms_norm import rms_norm_forward
    from fasttune.quant.nf4 import dequantize_nf4_triton, quantize_nf4

    q = quantize_nf4(torch.randn(256, 256, device="cuda"))
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    return {
        "nf4_dequantize": lambda: dequantize_nf4_triton(q, torch.bfloat16),
        "rms_norm_forward": lambda: rms_norm_forward(x, w, 1e-6),
        "swiglu_forward": lambda: glu_forward(g, g, "silu"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launches", type=int, default=500)  # under the launch queue's depth (~1,000): a full queue would wait for the GPU
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--results-root", default=None)
    args = p.parse_args(argv)
    import torch

    from fasttune.kernels import launch as launch_mod

    if not torch.cuda.is_available():
        print("launch_overhead: needs a CUDA GPU", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    record = {"benchmark": "launch_overhead", "status": "ok", "launches_per_round": args.launches,
              "rounds": args.rounds, "method": "host wall time of a loop of launches while a sleep kernel "
              "holds the GPU; median round; the same public function with the fast launch on and off"}
    results = {}
    with common.recorded(record):
        cases = _cases(torch)
        hold = int(5e8)  # ~0.3 s: longer than a round of launches
        for name, call in cases.items():
            for _ in range(3):
                call()  # compiles, then fills the fast path's cache
            times = {"triton": [], "fasttune": []}
            for _ in range(args.rounds):
                for mode in ("triton", "fasttune"):
                    launch_mod._state["ok"] = mode == "fasttune"
                    torch.cuda.synchronize()
                    torch.cuda._sleep(hold)
                    t0 = time.perf_counter()
                    for _ in range(args.launches):
                        call()
                    times[mode].append((time.perf_counter() - t0) / args.launches * 1e6)
                    torch.cuda.synchronize()
            launch_mod._state.pop("ok", None)
            med = {k: round(statistics.median(v), 2) for k, v in times.items()}
            results[name] = {"us_per_call_triton_launch": med["triton"], "us_per_call_fast_launch": med["fasttune"],
                             "saved_us": round(med["triton"] - med["fasttune"], 2)}
            print(f"{name}: {med['triton']:.1f} us per call with kernel[grid](...), "
                  f"{med['fasttune']:.1f} us with fasttune's launch", flush=True)
        record["results"] = results
    summary = "launch_overhead: " + ", ".join(f"{k} {v['saved_us']} us saved" for k, v in results.items())
    return common.finish_run("launch_overhead", "fasttune", record, t_start, args.results_root, summary)


if __name__ == "__main__":
    sys.exit(main())
