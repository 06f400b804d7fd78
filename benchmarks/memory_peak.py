"""What is alive at a training step's memory peak, and who allocated it.

    python3 benchmarks/profile_train.py --stack fasttune --model llama-8b --quant 4bit --memory step.pickle
    python3 benchmarks/memory_peak.py step.pickle [--baseline-gb 6.2] [--where fasttune/] [--top 25]

Reads a CUDA allocator snapshot taken with the allocation history on (torch.cuda.memory._record_memory_history
with Python stacks, then torch.cuda.memory._dump_snapshot; profile_train.py's --memory does both around one
step), replays its allocation events to find the moment the allocated bytes peak, and prints the allocations
alive then that the recorded step made, grouped by the first stack frame under --where (the code that asked
for the memory). The bytes allocated before the recording started (weights, optimizer states) are the
baseline; profile_train.py records them in the file, --baseline-gb overrides.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import sys

ALLOC, FREE = "alloc", ("free_requested", "free_completed")


def _site(frames, where) -> str:
    for frame in frames or ():
        name = frame.get("filename", "")
        for w in where:
            if w in name:
                return f"{name[name.rfind(w):]}:{frame.get('line')} {frame.get('name')}"
    if frames:
        return f"{frames[0].get('filename')}:{frames[0].get('line')} {frames[0].get('name')}"
    return "(no stack)"


def peak_live(trace: list[dict], baseline: int = 0, where=("fasttune/",)) -> dict:
    """The peak of `baseline` + the trace's live bytes, the event at which it is reached, and the live
    allocations then, grouped by allocation site (largest first). A block counts as freed at its first
    free event (free_requested: the allocator's statistics drop it there too)."""
    live: dict = {}
    current = peak = baseline
    peak_at, peak_live_blocks = -1, {}
    for i, event in enumerate(trace):
        action = event.get("action")
        if action == ALLOC:
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, peak_at, peak_live_blocks = current, i, dict(live)
        elif action in FREE and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    sites = collections.defaultdict(lambda: [0, 0])
    for block in peak_live_blocks.values():
        site = sites[_site(block.get("frames"), where)]
        site[0] += block["size"]
        site[1] += 1
    ranked = sorted(((s, b, n) for s, (b, n) in sites.items()), key=lambda r: -r[1])
    return {"baseline": baseline, "peak": peak, "peak_event": peak_at, "end": current, "live_at_peak": ranked}


def load(path: str) -> tuple[list[dict], int]:
    """(the first device's allocation events, the baseline profile_train.py stored, or 0)."""
    with open(path, "rb") as f:
        snapshot = pickle.load(f)
    traces = snapshot.get("device_traces") or [[]]
    trace = next((t for t in traces if t), [])
    return trace, int(snapshot.get("fasttune_baseline_bytes", 0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot")
    p.add_argument("--baseline-gb", type=float)
    p.add_argument("--where", action="append", help="path fragments that name the code to charge (default fasttune/)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    trace, baseline = load(args.snapshot)
    if not trace:
        print("the snapshot holds no allocation events (was the history recorded?)", file=sys.stderr)
        return 1
    if args.baseline_gb is not None:
        baseline = int(args.baseline_gb * 2**30)
    r = peak_live(trace, baseline, tuple(args.where or ["fasttune/"]))
    gb = 2**30
    print(f"baseline {r['baseline'] / gb:.3f} GB, peak {r['peak'] / gb:.3f} GB at event {r['peak_event']} of "
          f"{len(trace)}, {r['end'] / gb:.3f} GB at the end")
    for site, nbytes, count in r["live_at_peak"][:args.top]:
        print(f"{nbytes / 2**20:10.1f} MB  {count:5d} blocks  {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
