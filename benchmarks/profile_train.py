#!/usr/bin/env python3
"""Where a training step's time goes: torch.profiler over a few steps of train.py's loop, per stack.

    python3 benchmarks/profile_train.py --stack fasttune --stack hf [--model llama-1b] [--quant 4bit] [--seq 2048] [--batch 2]
        [--shapes] [--host] [--python] [--phases] [--memory FILE]

Prints, per stack, the mean step time and the top kernels by device time and top operators by host
time, so that a gap between two stacks can be pinned to the operators that cause it. A diagnostic,
not a benchmark: nothing is written to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402
import stacks  # noqa: E402


def profile(stack: str, args) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    spec = common.model_spec(args.model, args.size)
    ckpt = common.ensure_checkpoint(spec, size=args.size)
    model = stacks.load_for_training(stack, str(ckpt), spec, quant=args.quant, method="lora", seq=args.seq,
                                     gc=not args.no_gc)
    data = common.random_batches(spec.config["vocab_size"], args.batch * (args.warmup + args.steps), args.seq)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)

    phases = []

    def step(i, hold=None, timed=False, marks=None):
        ids = data[i * args.batch:(i + 1) * args.batch].cuda()
        mark = marks or (lambda name: None)
        mark(None)
        if hold:
            torch.cuda._sleep(hold)
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if timed else None
        if timed:
            marks[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        if timed:
            marks[1].record()
            side = _offload_stream()  # fasttune's copies to the host: the event waits behind the forward's
            marks[2].record(side) if side is not None else marks[2].record()
        mark("forward and loss")
        loss.backward()
        mark("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer step")
        if timed:
            marks[3].record()
            phases.append(marks)

    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    if args.phases:
        pcie_bandwidth(args.batch * args.seq * spec.config["intermediate_size"] * 2)
        for i in range(args.steps):
            step(args.warmup + i, timed=True)
        torch.cuda.synchronize()
        for name, a, b in (("forward + loss", 0, 1), ("forward's copies to the host done", 0, 2),
                           ("backward + optimizer", 1, 3), ("step", 0, 3)):
            times = [m[a].elapsed_time(m[b]) for m in phases]
            print(f"{name}: {', '.join(f'{t:.1f}' for t in times)} ms")
    if args.memory:
        memory_peaks(step, args)
    if args.host:
        host_time(step, args, stack)
    if args.python:
        python_profile(step, args)
    if (args.host or args.python or args.phases or args.memory) and not args.trace:
        return
    n = args.trace_steps if args.trace else args.steps
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.warmup, args.warmup + n):
            step(i)
        torch.cuda.synchronize()
    if args.trace:  # the timeline (chrome://tracing, perfetto): which stream waits on what
        prof.export_chrome_trace(args.trace)
        print(f"trace written to {args.trace}")
        if args.host or args.python or args.phases or args.memory:
            return
    wall = (time.perf_counter() - t0) / n
    print(f"\n===== {stack}: {wall * 1000:.1f} ms/step under the profiler ({n} steps) =====")
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows // 2, max_name_column_width=60))
    if args.shapes:  # which matmuls (by operand shapes) take the GPU time
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(by_shape.table(sort_by="device_time_total", row_limit=args.rows * 2, max_name_column_width=40,
                             max_shapes_column_width=90))


def memory_peaks(step, args) -> None:
    """The allocator's peak in each phase of one step (forward with the loss, backward, optimizer step), then
    one more step with the allocation history recorded, written to --memory for memory_peak.py (what is alive
    at the peak, and who allocated it)."""
    import pickle

    import torch

    import memory_peak

    if args.steps < 2:
        raise SystemExit("--memory runs two steps after the warm-up: give --steps 2 or more")
    model_step = args.warmup
    torch.cuda.synchronize()
    for name, peak in phase_peaks(step, model_step):
        print(f"peak allocated in the {name}: {peak / 2**30:.3f} GB")
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step(model_step + 1)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    snapshot["fasttune_baseline_bytes"] = baseline
    with open(args.memory, "wb") as f:
        pickle.dump(snapshot, f)
    trace, _ = memory_peak.load(args.memory)
    r = memory_peak.peak_live(trace, baseline)
    print(f"allocation history of one step written to {args.memory}: baseline {baseline / 2**30:.3f} GB, "
          f"peak {r['peak'] / 2**30:.3f} GB; alive at the peak:")
    for site, nbytes, count in r["live_at_peak"][:15]:
        print(f"{nbytes / 2**20:10.1f} MB  {count:5d} blocks  {site}")


def phase_peaks(step, i) -> list:
    """[(phase, peak allocated bytes)] of step i, the peak statistics reset at each phase's start."""
    import torch

    peaks = []

    def mark(name):
        torch.cuda.synchronize()
        if name is not None:
            peaks.append((name, torch.cuda.max_memory_allocated()))
        torch.cuda.reset_peak_memory_stats()

    step(i, marks=mark)
    return peaks


def pcie_bandwidth(nbytes: int, repeats: int = 12) -> None:
    """This machine's copy bandwidth between the GPU and pinned host memory, each way, for `nbytes` at a
    time (the size of one parked up_proj output): the forward's copies to the host are bound by it."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for name, dst, src in (("GPU -> host", host, gpu), ("host -> GPU", gpu, host)):
        rates = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            rates.append(nbytes / start.elapsed_time(end) / 1e6)
        rates.sort()
        print(f"PCIe {name}, {nbytes / 1e6:.0f} MB: min {rates[0]:.1f}, median {rates[len(rates) // 2]:.1f}, "
              f"max {rates[-1]:.1f} GB/s")


def _offload_stream():
    """The side stream of fasttune's offloaded checkpointing, once it exists (None for other stacks)."""
    offload = sys.modules.get("fasttune.memory.offload")
    return next(iter(offload._streams.values()), None) if offload is not None else None


def host_time(step, args, stack: str) -> None:
    """How long the host takes to queue one step, with the GPU held busy meanwhile by a sleep kernel long
    enough to cover it: when that is close to the step's wall time, the step is bound by the host, not
    the GPU. The hold is queued as the step's first GPU work (for fasttune right behind the targets'
    count, which the fused loss reads on the host), so a queueing time as long as the hold means the step
    waits for its own GPU work somewhere (a sync)."""
    import torch

    hold_cycles = 4_000_000_000
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(hold_cycles)
    torch.cuda.synchronize()
    hold = time.perf_counter() - t0
    restore = None
    if stack == "fasttune":
        import fasttune.models.llama as llama

        original = llama.PreparedTargets

        class HeldTargets(original):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                torch.cuda._sleep(hold_cycles)

        llama.PreparedTargets, restore = HeldTargets, (lambda: setattr(llama, "PreparedTargets", original))
    queued, walls = [], []
    try:
        for i in range(args.steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(args.warmup + i, hold=None if restore else hold_cycles)
            queued.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0 - hold)
    finally:
        if restore:
            restore()
    print(f"host queueing time per step: {', '.join(f'{q * 1000:.1f}' for q in queued)} ms "
          f"(GPU held {hold * 1000:.0f} ms; step after the hold: {', '.join(f'{w * 1000:.1f}' for w in walls)} ms)")


def python_profile(step, args) -> None:
    """cProfile over --steps steps: where the host's Python time goes (the GPU runs meanwhile)."""
    import cProfile
    import pstats

    import torch

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for i in range(args.steps):
        step(args.warmup + i)
    torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(args.rows)
    stats.sort_stats("cumulative").print_stats(args.rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", action="append", choices=stacks.STACKS, required=True)
    p.add_argument("--model", choices=sorted(common.MODELS), default="llama-1b")
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--quant", choices=["16bit", "4bit"], default="16bit")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--no-gc", action="store_true")
    p.add_argument("--shapes", action="store_true", help="also the operators grouped by input shapes")
    p.add_argument("--host", action="store_true", help="only the host's queueing time per step (GPU held)")
    p.add_argument("--python", action="store_true", help="only cProfile's view of the host's Python time")
    p.add_argument("--phases", action="store_true",
                   help="only the forward's and the backward's GPU time per step, and when the forward's copies "
                        "to the host are done (fasttune's offloaded checkpointing)")
    p.add_argument("--memory", metavar="FILE",
                   help="only the peak allocated memory of each phase of a step, and one step's allocation history "
                        "written to FILE (benchmarks/memory_peak.py reads it)")
    p.add_argument("--trace", help="also write the profiler's timeline of the --steps steps here (chrome trace)")
    p.add_argument("--trace-steps", type=int, default=2, help="how many steps --trace records")
    args = p.parse_args(argv)
    stacks.set_offline_env()
    for stack in args.stack:
        profile(stack, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
