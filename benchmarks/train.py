#!/usr/bin/env python3
"""Training throughput, memory and MFU of one (stack, model, quant, method, seq, batch): one process, one result.

    python3 benchmarks/train.py --stack {fasttune,hf,liger,unsloth} --model llama-1b --quant {16bit,4bit} \
        [--method {lora,full}] [--seq 2048] [--batch 2] [--steps 25] [--warmup 5] [--size {full,tiny}]

The model is a random-init copy of a registry config (benchmarks/common.py: MODELS), written once as a bf16
checkpoint with a synthetic tokenizer, loaded through each stack's own from_pretrained (benchmarks/stacks.py).
Every stack gets the same data (uniform random tokens from a fixed seed, labels = inputs, no padding, so every
token is a real token), the same LoRA settings and this loop:

    with autocast(bf16): loss = model(input_ids=x, labels=x).loss
    loss.backward(); grad_norm = total norm of the trainable grads; AdamW(lr).step(); zero_grad()

Each step is timed between two device synchronizations; the first --warmup steps (Unsloth compiles there)
are left out of tokens/s. Peak memory is torch.cuda.max_memory_allocated / max_memory_reserved over the
training steps, the weights included. MFU = model FLOPs per token (DESIGN.md: LoRA 4N + 6N_lora + attention,
full 6N + attention) x tokens/s over the bf16 matmul rate measured in this same process.
The run counts as ok only if the loss moved, every gradient norm is finite and > 0, and the trainable weights
changed. A configuration the stack has no path for is recorded as status "unsupported".

The record goes to <results-root>/<gpu-slug>/train.json under runs["<model>/<quant>/<method>/s<seq>b<batch>/<stack>"].
"""

from __future__ import annotations

import gc
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402
import stacks  # noqa: E402

BENCHMARK = "train"


def parse_args(argv=None):
    p = stacks.benchmark_parser(__doc__)
    stacks.add_training_args(p)
    p.add_argument("--no-gc", action="store_true", help="turn gradient checkpointing off (default: each stack's own)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps counts the warm-up steps too, so it must exceed --warmup")
    return args


def run_key(args) -> str:
    model = args.model + ("-tiny" if args.size == "tiny" else "")
    return f"{model}/{args.quant}/{args.method}/s{args.seq}b{args.batch}/{args.stack}"


def train(model, data, args, device):
    """The shared loop. Returns (step_times, losses, grad_norms, update_norm, GC pauses per step, peaks): peaks
    are the allocator's peak over all steps and over the steps after the warm-up (CUDA; else None)."""
    import torch

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    # A few small trainable tensors, copied to the CPU, to show the update reached the weights.
    probe = sorted(trainable, key=lambda p: p.numel())[:8]
    before = [p.detach().float().cpu().clone() for p in probe]
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses, norms = [], [], []
    warmup_peak = 0
    pauses = GCPauses()
    for step in range(args.steps):
        ids = data[step * args.batch:(step + 1) * args.batch].to(device, non_blocking=True)
        sync()
        if cuda and step == args.warmup:  # the steady state's peak, apart from the first steps' (train_record)
            warmup_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        pauses.step = step
        t0 = time.perf_counter()
        loss, norm = common.optimizer_step(model, ids, trainable, optimizer, device)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach().float()))
        norms.append(float(norm))
        del loss
    pauses.close()
    peaks = None
    if cuda:
        steady = torch.cuda.max_memory_allocated()
        peaks = {"all": max(steady, warmup_peak), "steady": steady}
    update = sum(float((p.detach().float().cpu() - b).norm()) for p, b in zip(probe, before))
    return times, losses, norms, update, pauses.per_step, peaks


def host_param_bytes(model) -> int:
    """Bytes of the model's parameters held in host memory rather than on the GPU: on the CPU (a stack's own
    offload), or fasttune's tables in pinned host memory that the GPU reads in place (offload_embedding)."""
    module = sys.modules.get("fasttune.memory.host_embedding")  # other stacks' runs never import fasttune
    is_host_resident = module.is_host_resident if module is not None else (lambda p: False)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and (p.device.type == "cpu" or is_host_resident(p)):
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def layer_graph_memory(stack: str, steady_peak: int) -> dict:
    """fasttune's captured layer backwards (fasttune/memory/layer_graphs.py): how many, and the memory their
    pool holds, which the allocator's peak does not see while a graph replays; the steady peak plus the pool
    is the figure to compare with other stacks' peaks."""
    if stack != "fasttune":
        return {}
    from fasttune.memory import layer_graphs

    pool = layer_graphs.pool_bytes()
    return {"layer_graphs": dict(layer_graphs.stats), "graph_pool_gb": round(pool / 2**30, 3),
            "peak_alloc_steady_plus_pool_gb": round((steady_peak + pool) / 2**30, 3)}


class GCPauses:
    """Python's cyclic garbage collections during the steps (gc.callbacks): per step, the seconds the host
    spent in them and which generations ran. A full (generation 2) collection walks every tracked object
    of the process and can stall the host, and with it a host-bound step, for a few hundred ms."""

    def __init__(self):
        self.step, self.per_step, self._t0 = 0, {}, None
        gc.callbacks.append(self._callback)

    def _callback(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            entry = self.per_step.setdefault(self.step, {"s": 0.0, "generations": []})
            entry["s"] += time.perf_counter() - self._t0
            entry["generations"].append(info["generation"])
            self._t0 = None

    def close(self):
        gc.callbacks.remove(self._callback)


def summarize(args, spec, times, losses, norms, update, lora_params, peak_tflops) -> dict:
    tokens = args.batch * args.seq
    timed = times[args.warmup:]
    out = {
        "timed_steps": len(timed),
        "tokens_per_s": round(tokens * len(timed) / sum(timed), 1),
        "tokens_per_s_median_step": round(tokens / common._median(timed), 1),
        "s_per_step_mean": round(sum(timed) / len(timed), 4),
        "s_per_step_median": round(common._median(timed), 4),
        "s_per_step_min": round(min(timed), 4),
        "warmup_s": round(sum(times[:args.warmup]), 3),
    }
    fpt = common.flops_per_token(spec, args.seq, args.method, lora_params)
    out["model_flops_per_token"] = fpt
    out["model_tflops_per_s"] = round(fpt * out["tokens_per_s"] / 1e12, 2)
    if peak_tflops:
        out["mfu"] = round(out["model_tflops_per_s"] / peak_tflops, 4)
    out.update(loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4),
               losses=[round(x, 4) for x in losses], grad_norms=[round(x, 6) for x in norms],
               update_norm=update, step_times=[round(x, 4) for x in times])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch, device, spec = stacks.start(args)
    cuda = device.type == "cuda"
    lora_params = common.lora_param_count(spec, args.rank) if args.method == "lora" else 0
    record = {
        "benchmark": BENCHMARK, "status": "error", "stack": args.stack, "model": spec.name, "shape_of": spec.hf_id,
        "quant": args.quant, "method": args.method, "seq": args.seq, "batch": args.batch, "steps": args.steps,
        "warmup_steps": args.warmup, "lr": args.lr, "optimizer": "torch.optim.AdamW",
        "lora": {"r": args.rank, "alpha": args.alpha, "dropout": 0.0, "targets": list(common.LORA_TARGETS)}
        if args.method == "lora" else None,
        "gradient_checkpointing": stacks.gc_label(args.stack, not args.no_gc),
        "offload_embedding": {None: "stack default", True: True, False: False}[stacks.offload_embedding_override()],
        "data": f"uniform random tokens, seed {args.seed}, labels = inputs, no padding",
        "model_params_n": common.param_count(spec), "lora_params": lora_params,
    }
    t_start = time.perf_counter()
    with common.recorded(record):
        ckpt, ceilings = common.checkpoint_and_ceilings(record, spec, args)
        t0 = time.perf_counter()
        model = stacks.load_for_training(args.stack, ckpt, spec, quant=args.quant, method=args.method,
                                         seq=args.seq, rank=args.rank, alpha=args.alpha, seed=args.seed,
                                         gc=not args.no_gc)
        if cuda:
            torch.cuda.synchronize()
            record["weights_alloc_gb"] = round(torch.cuda.memory_allocated() / 2**30, 3)
        record["load_s"] = round(time.perf_counter() - t0, 2)
        trainable = [p for p in model.parameters() if p.requires_grad]
        record["trainable_params"] = sum(p.numel() for p in trainable)
        record["trainable_dtype"] = str(trainable[0].dtype).removeprefix("torch.") if trainable else None
        data = common.random_batches(spec.config["vocab_size"], args.steps * args.batch, args.seq, args.seed)
        times, losses, norms, update, gc_pauses, peaks = train(model, data, args, device)
        if cuda:
            record["peak_alloc_gb"] = round(peaks["all"] / 2**30, 3)
            record["peak_alloc_steady_gb"] = round(peaks["steady"] / 2**30, 3)
            record["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
            record.update(layer_graph_memory(args.stack, peaks["steady"]))
            record["params_in_host_memory_gb"] = round(host_param_bytes(model) / 2**30, 3)
        record.update(summarize(args, spec, times, losses, norms, update, lora_params,
                                ceilings["bf16_matmul_tflops"]))
        timed_gc = {k: v for k, v in gc_pauses.items() if k >= args.warmup}
        record["gc_in_timed_steps"] = {
            "s": round(sum(v["s"] for v in timed_gc.values()), 4),
            "full_collections": sum(v["generations"].count(2) for v in timed_gc.values()),
            "collections": sum(len(v["generations"]) for v in timed_gc.values()),
            "by_step": {str(k): {"s": round(v["s"], 4), "generations": v["generations"]} for k, v in timed_gc.items()},
        }
        record["problems"] = common.training_problems(losses, norms, args.steps, update)
        record["status"] = "ok" if not record["problems"] else "failed-checks"
    key = run_key(args)
    return common.finish_run(BENCHMARK, key, record, t_start, args.results_root, one_line(key, record))


def one_line(key: str, r: dict) -> str:
    line = f"[bench] train {key}: {r['status']}"
    if "tokens_per_s" in r:
        line += f" tokens/s={r['tokens_per_s']:,.0f} loss {r['loss_first']} -> {r['loss_last']}"
    if "peak_alloc_gb" in r:
        line += f" peak alloc {r['peak_alloc_gb']} GB reserved {r['peak_reserved_gb']} GB"
    if "mfu" in r:
        line += f" MFU {r['mfu']:.1%}"
    for field in ("reason", "error"):
        if field in r:
            line += f" ({r[field][:200]})"
    for problem in r.get("problems", []):
        line += f"\n[bench] PROBLEM: {problem}"
    return line


if __name__ == "__main__":
    sys.exit(main())
