#!/usr/bin/env python3
"""Generation speed of one (stack, model, quant): prefill and decode separately, at several batch sizes.

    python3 benchmarks/decode.py --stack {fasttune,hf,unsloth} --model llama-1b [--quant 16bit] \
        [--cases 1:256,64:128] [--prompt 128] [--size {full,tiny}]

Each case BATCH:NEW generates NEW tokens greedily (min_new_tokens = max_new_tokens, no EOS stop) after a
random prompt of --prompt tokens per sequence, through `model.generate` in each stack's inference mode
(fasttune: for_inference + HF generate on fasttune's forward; hf: plain transformers; unsloth: for_inference).
One untimed warm-up, then --reps timed generations, each followed by a timed 1-token generation (the prefill);
decode time = median total - median prefill, over the NEW - 1 tokens made after the first.

Decode is bandwidth-bound, so each case also reports the bytes one decode step must read (the weights as
stored, lm_head included and the input embedding left out unless tied, plus the KV cache at the mean context
length), the achieved GB/s (bytes per step x steps per second), and that as a fraction of the device-to-device
copy bandwidth measured in this process; roofline tokens/s = copy bandwidth / bytes per step x batch.

The record goes to <results-root>/<gpu-slug>/decode.json under runs["<model>/<quant>/<stack>"].
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

BENCHMARK = "decode"


def parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for part in text.split(","):
        batch, _, new = part.partition(":")
        cases.append((int(batch), int(new or 128)))
        if cases[-1][1] < 2:
            raise argparse.ArgumentTypeError("each case needs at least 2 new tokens (one comes from the prefill)")
    return cases


def parse_args(argv=None):
    p = stacks.benchmark_parser(__doc__, stacks=stacks.DECODE_STACKS, method=False)
    p.add_argument("--cases", type=parse_cases, default=parse_cases("1:256,64:128"), help="BATCH:NEW,...")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def weight_bytes_per_step(model, spec) -> int:
    """Bytes of parameters one decode step reads: every stored parameter once (4-bit packing included), the
    input embedding excepted (a lookup reads one row per sequence) unless lm_head shares it."""
    seen, total = set(), 0
    embed = model.get_input_embeddings().weight
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    if not spec.config.get("tie_word_embeddings"):
        total -= embed.numel() * embed.element_size()
    return total


def kv_bytes_per_step(spec, batch: int, context: float, dtype_bytes: int = 2) -> float:
    c = spec.config
    return batch * c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * spec.head_dim() * dtype_bytes * context


def generate_s(model, ids, new: int, sync) -> float:
    import torch

    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    sync()
    seconds = time.perf_counter() - t0
    if out.shape != (ids.shape[0], ids.shape[1] + new):
        raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected {(ids.shape[0], ids.shape[1] + new)}")
    return seconds


def measure_case(model, spec, batch, new, args, device, copy_gbs, weight_bytes) -> dict:
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(args.seed)
    vocab = spec.config["vocab_size"]
    low = min(1000, vocab // 4)  # keep clear of the special ids at either end of the vocabulary
    ids = torch.randint(low, vocab - low, (batch, args.prompt), generator=g).to(device)
    generate_s(model, ids, new, sync)  # warm-up: allocator, kernels, any compilation
    generate_s(model, ids, 1, sync)
    totals, prefills = [], []
    for _ in range(args.reps):  # interleaved, so that a slow spell of the machine hits both
        totals.append(generate_s(model, ids, new, sync))
        prefills.append(generate_s(model, ids, 1, sync))
    total, prefill = common._median(totals), common._median(prefills)
    decode = total - prefill
    if decode <= 0.05 * total:
        raise RuntimeError(f"timing noise: total {totals} s vs prefill {prefills} s leaves no decode time")
    steps = new - 1
    step_bytes = weight_bytes + kv_bytes_per_step(spec, batch, args.prompt + new / 2)
    out = {
        "batch": batch, "prompt": args.prompt, "new_tokens": new,
        "total_s": round(total, 4), "prefill_s": round(prefill, 4), "decode_s": round(decode, 4),
        "prefill_tokens_per_s": round(batch * args.prompt / prefill, 1),
        "decode_tokens_per_s": round(batch * steps / decode, 1),
        "decode_tokens_per_s_per_seq": round(steps / decode, 1),
        "ms_per_decode_step": round(1e3 * decode / steps, 3),
        "bytes_per_decode_step": int(step_bytes),
        "achieved_gbs": round(step_bytes * steps / decode / 1e9, 1),
    }
    if copy_gbs:
        out["copy_gbs"] = copy_gbs
        out["bandwidth_fraction"] = round(out["achieved_gbs"] / copy_gbs, 4)
        out["roofline_tokens_per_s"] = round(copy_gbs * 1e9 / step_bytes * batch, 1)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch, device, spec = stacks.start(args)
    cuda = device.type == "cuda"
    record = {"benchmark": BENCHMARK, "status": "error", "stack": args.stack, "model": spec.name,
              "shape_of": spec.hf_id, "quant": args.quant, "prompt": args.prompt, "reps": args.reps,
              "sampling": "greedy, min_new_tokens = max_new_tokens, no EOS", "cases": []}
    t_start = time.perf_counter()
    with common.recorded(record):
        ckpt, ceilings = common.checkpoint_and_ceilings(record, spec, args)
        t0 = time.perf_counter()
        max_len = args.prompt + max(new for _, new in args.cases) + 8
        model = stacks.load_for_inference(args.stack, ckpt, quant=args.quant, max_len=max_len)
        if cuda:
            torch.cuda.synchronize()
        record["load_s"] = round(time.perf_counter() - t0, 2)
        weight_bytes = weight_bytes_per_step(model, spec)
        record["weight_bytes_per_step"] = weight_bytes
        for batch, new in args.cases:
            try:
                case = measure_case(model, spec, batch, new, args, device, ceilings["copy_gbs"], weight_bytes)
            except (torch.OutOfMemoryError, RuntimeError) as err:
                case = {"batch": batch, "new_tokens": new, "error": f"{type(err).__name__}: {err}"[:500]}
                if cuda:
                    torch.cuda.empty_cache()
            record["cases"].append(case)
            print(f"[bench] decode {spec.name} {args.stack} batch {batch}: " + (
                f"prefill {case['prefill_tokens_per_s']:,.0f} tok/s, decode {case['decode_tokens_per_s']:,.1f} tok/s"
                f" ({case['achieved_gbs']} GB/s)" if "error" not in case else case["error"]), flush=True)
        if cuda:
            record["peak_alloc_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        record["status"] = "ok" if all("error" not in c for c in record["cases"]) else "partial"
    key = f"{spec.name}/{args.quant}/{args.stack}"
    summary = f"[bench] decode {key}: {record['status']} " + record.get("reason", record.get("error", ""))[:300]
    return common.finish_run(BENCHMARK, key, record, t_start, args.results_root, summary)


if __name__ == "__main__":
    sys.exit(main())
