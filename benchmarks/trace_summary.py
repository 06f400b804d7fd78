"""What a torch.profiler timeline says about a training step: is the GPU waiting on the host?

    python3 benchmarks/profile_train.py --stack fasttune --model llama-8b --quant 4bit --trace t.json
    python3 benchmarks/trace_summary.py t.json [--steps 2] [--window-ms 20]

Reads the chrome trace (`.json` or `.json.gz`) and prints, per recorded step: the GPU work by kind
(kernels, memsets, copies), the launch calls the host made, and for the busiest stream (the compute
stream) its busy time against its span and where it sat idle (per window of --window-ms, and the longest
gaps with the kernels on either side). A compute stream idle a fifth of every window, not at one place,
is a host-bound step: the host queues kernels about as fast as the GPU runs them.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys

GPU_CATEGORIES = ("kernel", "gpu_memset", "gpu_memcpy")
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cuLaunchKernel", "cudaMemsetAsync",
                "cudaMemcpyAsync")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def summarize(events: list[dict], steps: int = 1, window_ms: float = 20.0, longest: int = 10) -> dict:
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES and "dur" in e]
    if not gpu:
        raise ValueError("the trace holds no GPU activity (was it recorded with ProfilerActivity.CUDA?)")
    per_stream = collections.Counter(e["tid"] for e in gpu)
    compute = per_stream.most_common(1)[0][0]
    work = sorted((e for e in gpu if e["tid"] == compute), key=lambda e: e["ts"])
    start, end = work[0]["ts"], max(e["ts"] + e["dur"] for e in work)
    busy = sum(e["dur"] for e in work)
    gaps, windows = [], collections.Counter()
    for a, b in zip(work, work[1:]):
        gap = b["ts"] - (a["ts"] + a["dur"])
        if gap > 0:
            gaps.append((gap, a["ts"] + a["dur"] - start, a["name"], b["name"]))
            windows[int((a["ts"] + a["dur"] - start) / (window_ms * 1000))] += gap
    launches = collections.Counter(e["name"] for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
                                   and e["name"] in LAUNCH_CALLS)
    kinds = collections.Counter(e["cat"] for e in gpu)
    return {
        "steps": steps,
        "per_step": {
            "kernels": kinds["kernel"] / steps, "memsets": kinds["gpu_memset"] / steps,
            "copies": kinds["gpu_memcpy"] / steps,
            "launch_calls": {k: v / steps for k, v in sorted(launches.items())},
        },
        "streams": {str(k): v for k, v in per_stream.items()},
        "compute_stream": {
            "id": compute, "busy_ms": busy / 1000, "span_ms": (end - start) / 1000,
            "idle_ms": (end - start - busy) / 1000, "idle_share": 1 - busy / (end - start),
        },
        "idle_ms_per_window": {round(k * window_ms, 3): round(v / 1000, 3) for k, v in sorted(windows.items())},
        "longest_gaps": [
            {"ms": round(g / 1000, 3), "at_ms": round(t / 1000, 3), "after": a[:80], "before": b[:80]}
            for g, t, a, b in sorted(gaps, reverse=True)[:longest]
        ],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=2, help="how many steps the trace recorded (profile_train's --trace-steps)")
    p.add_argument("--window-ms", type=float, default=20.0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    s = summarize(load(args.trace), args.steps, args.window_ms)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    c, ps = s["compute_stream"], s["per_step"]
    print(f"per step: {ps['kernels']:.0f} kernels, {ps['memsets']:.0f} memsets, {ps['copies']:.0f} copies; launch calls "
          + ", ".join(f"{k} {v:.0f}" for k, v in ps["launch_calls"].items()))
    print(f"compute stream: busy {c['busy_ms']:.1f} ms of {c['span_ms']:.1f} ms ({c['idle_share']:.0%} idle)")
    print("idle per window (ms): " + ", ".join(f"{k:g}: {v:.1f}" for k, v in s["idle_ms_per_window"].items()))
    for g in s["longest_gaps"]:
        print(f"  {g['ms']:.2f} ms idle at {g['at_ms']:.1f} ms, after {g['after']} before {g['before']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
