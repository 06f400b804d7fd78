#!/usr/bin/env python3
"""The longest sequence one stack trains at batch 1, found by doubling then bisection under a time cap.

    python3 benchmarks/max_context.py --stack {fasttune,hf,liger,unsloth} --model llama-1b [--quant 16bit] \
        [--start 8192] [--granularity 2048] [--max-seq N] [--cap-s 150]

The model is loaded once (same stacks, LoRA settings and loop as train.py); each probe runs --probe-steps
training steps on one random sequence of the probe's length. A probe passes when those steps finish with a
finite loss and a non-zero gradient norm; an out-of-memory error fails it (the allocator is emptied and the
search goes on). Lengths double from --start until a failure or --max-seq (default: the model's
max_position_embeddings), then the gap is bisected down to --granularity. No probe starts after --cap-s seconds
of probing; the record then says which bracket is known.

The record goes to <results-root>/<gpu-slug>/max_context.json under runs["<model>/<quant>/<method>/<stack>"].
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402
import stacks  # noqa: E402

BENCHMARK = "max_context"


def parse_args(argv=None):
    p = stacks.benchmark_parser(__doc__)
    p.add_argument("--start", type=int, default=8192)
    p.add_argument("--granularity", type=int, default=2048)
    p.add_argument("--max-seq", type=int, default=None)
    p.add_argument("--cap-s", type=float, default=150.0, help="no new probe after this many seconds of probing")
    p.add_argument("--probe-steps", type=int, default=2)
    stacks.add_training_args(p, loop=False)
    return p.parse_args(argv)


def probe(model, optimizer, trainable, seq, args, device, vocab) -> dict:
    import torch

    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    result = {"seq": seq}
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        g = torch.Generator().manual_seed(args.seed + seq)
        for _ in range(args.probe_steps):
            ids = torch.randint(0, vocab, (1, seq), generator=g).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach().float())
            del loss
            if not (math.isfinite(value) and math.isfinite(norm) and norm > 0):
                raise RuntimeError(f"bad step at seq {seq}: loss {value}, grad norm {norm}")
        if cuda:
            torch.cuda.synchronize()
            result["peak_alloc_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["ok"] = True
    except torch.OutOfMemoryError:
        result["ok"] = False
        result["error"] = "out of memory"
    except RuntimeError as err:
        # Some stacks wrap allocation failures (CUDA/Triton) in a plain RuntimeError.
        if "out of memory" not in str(err).lower():
            raise
        result["ok"] = False
        result["error"] = "out of memory (" + str(err)[:200] + ")"
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    result["s"] = round(time.perf_counter() - t0, 2)
    return result


def search(model, args, device, vocab, max_seq) -> dict:
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    model.train()
    probes, ok_at, fail_at = [], 0, None
    began = time.perf_counter()

    def attempt(seq):
        r = probe(model, optimizer, trainable, seq, args, device, vocab)
        probes.append(r)
        print(f"[bench] max_context {args.stack} seq {seq}: {'ok' if r['ok'] else r['error']} ({r['s']} s)",
              flush=True)
        return r["ok"]

    def time_left():
        return time.perf_counter() - began < args.cap_s

    seq = min(args.start, max_seq)
    while time_left():  # grow
        if attempt(seq):
            ok_at = seq
            if seq >= max_seq:
                break
            seq = min(seq * 2, max_seq)
        else:
            fail_at = seq
            break
    while fail_at is not None and fail_at - ok_at > args.granularity and time_left():  # bisect
        mid = (ok_at + fail_at) // 2 // args.granularity * args.granularity
        if mid <= ok_at:
            break
        if attempt(mid):
            ok_at = mid
        else:
            fail_at = mid
    if ok_at >= max_seq:
        bound = "reached --max-seq"
    elif fail_at is not None and fail_at - ok_at <= args.granularity:
        bound = f"bisected to {args.granularity}"
    else:
        bound = "time cap"
    return {"max_seq_trained": ok_at or None, "first_failed_seq": fail_at, "search_limit": max_seq,
            "bound": bound, "probes": probes, "search_s": round(time.perf_counter() - began, 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    _, device, spec = stacks.start(args)
    max_seq = args.max_seq or spec.config["max_position_embeddings"]
    record = {"benchmark": BENCHMARK, "status": "error", "stack": args.stack, "model": spec.name,
              "shape_of": spec.hf_id, "quant": args.quant, "method": args.method, "batch": 1,
              "probe_steps": args.probe_steps, "cap_s": args.cap_s, "granularity": args.granularity,
              "gradient_checkpointing": stacks.gc_label(args.stack, True)}
    t_start = time.perf_counter()
    with common.recorded(record):
        ckpt = common.ensure_checkpoint(spec, args.ckpt_root, args.size)
        t0 = time.perf_counter()
        model = stacks.load_for_training(args.stack, ckpt, spec, quant=args.quant, method=args.method,
                                         seq=max_seq, rank=args.rank, alpha=args.alpha, seed=args.seed)
        record["load_s"] = round(time.perf_counter() - t0, 2)
        record.update(search(model, args, device, spec.config["vocab_size"], max_seq))
        record["status"] = "ok"
    key = f"{spec.name}/{args.quant}/{args.method}/{args.stack}"
    summary = (f"[bench] max_context {key}: {record['status']} longest trained {record.get('max_seq_trained')} "
               f"({record.get('bound', record.get('reason', record.get('error', '')))[:200]})")
    return common.finish_run(BENCHMARK, key, record, t_start, args.results_root, summary)


if __name__ == "__main__":
    sys.exit(main())
