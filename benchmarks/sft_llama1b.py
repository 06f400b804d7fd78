#!/usr/bin/env python3
"""LoRA training throughput and memory of a Llama-3.2-1B-shaped model under trl.SFTTrainer.

    python3 benchmarks/sft_llama1b.py --stack fasttune     # FastLanguageModel + get_peft_model
    python3 benchmarks/sft_llama1b.py --stack hf           # transformers + PEFT, HF gradient checkpointing

The model is random-init (the shape of meta-llama/Llama-3.2-1B: 1.24B parameters, tied embeddings,
llama3 rope), written once in bf16 with a synthetic 128256-token tokenizer to --ckpt-dir, so that both
stacks load it through their normal from_pretrained path. The data are random token sequences of
exactly --seq tokens, given pre-tokenized (an `input_ids` column, no packing), labels = inputs.
Both stacks: LoRA r=16, alpha=16, dropout 0 on q,k,v,o,gate,up,down; AdamW (torch) lr 2e-4, constant;
bf16; batch 2; gradient checkpointing on.

Tokens/s counts the steps after --warmup, each timed from on_step_begin to on_step_end with
torch.cuda.synchronize() at both ends (forward, backward, clipping and the optimizer step; not the
data loading or logging between steps, which `tokens_per_s_wall` includes). Peak memory is
torch.cuda.max_memory_allocated / max_memory_reserved over training, the weights included.
The run fails (exit 1, "ok": false in the JSON) unless the loss moved and every gradient norm is
finite and non-zero.

--loop plain runs the hand-written loop of the peers' anchor benchmark instead of SFTTrainer
(model(input_ids, labels=input_ids) -> backward -> AdamW step under bf16 autocast), whose numbers
compare directly with theirs. --size tiny is a small config for smoke tests.

The result goes to <results-root>/<gpu-slug>/sft_llama1b.json (or sft_tiny.json) under
runs["<stack>"] (or runs["<stack>/plain-loop"]), beside the other stacks' entries.

On the GPU machine, after `bash scripts/fetch_device_wheels.sh` here and with `.whl` carried:

    source scripts/device_setup.sh || exit 1
    for s in fasttune hf; do python3 benchmarks/sft_llama1b.py --stack $s --results-root $OUT/res; done

then copy $OUT/res/<gpu-slug>/sft_llama1b.json into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import traceback

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
}.items():
    os.environ.setdefault(_key, _value)

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402
import stacks  # noqa: E402

TARGET_MODULES = list(common.LORA_TARGETS)

# The numbers of meta-llama/Llama-3.2-1B's config.json.
LLAMA_3_2_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, hidden_act="silu",
    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    attention_bias=False, mlp_bias=False, attention_dropout=0.0, initializer_range=0.02,
    bos_token_id=128000, eos_token_id=128001, pad_token_id=128004,
)
LLAMA3_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
                   128004: "<|finetune_right_pad_id|>", 128009: "<|eot_id|>"}

# Same family and rope, small enough for a CPU or a smoke call.
TINY = dict(LLAMA_3_2_1B, vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            bos_token_id=1000, eos_token_id=1001, pad_token_id=1004)
TINY_SPECIALS = {1000: "<|begin_of_text|>", 1001: "<|end_of_text|>", 1004: "<|finetune_right_pad_id|>",
                 1009: "<|eot_id|>"}

SIZES = {"1b": (LLAMA_3_2_1B, LLAMA3_SPECIALS, "sft_llama1b"), "tiny": (TINY, TINY_SPECIALS, "sft_tiny")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", choices=["fasttune", "hf"], default="fasttune")
    p.add_argument("--loop", choices=["sft", "plain"], default="sft",
                   help="sft: trl.SFTTrainer (default); plain: the peers' hand-written loop")
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    stacks.add_training_args(p, steps=50)
    p.add_argument("--ckpt-dir", default=None,
                   help="where the random-init checkpoint is written once (default: <tmp>/fasttune-bench/<size>)")
    p.add_argument("--results-root", default=None,
                   help="results go to <root>/<gpu-slug>/<benchmark>.json (default: benchmarks/results)")
    p.add_argument("--no-peak", action="store_true", help="skip measuring the bf16 matmul peak used for MFU")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps counts the warm-up steps too, so it must exceed --warmup")
    return args


# ------------------------------------------------------------------------------------------------
# Checkpoint and data
# ------------------------------------------------------------------------------------------------


def build_checkpoint(path: str, size: str) -> str:
    """Write the random-init bf16 checkpoint and its tokenizer to `path` unless already there."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    done = os.path.join(path, ".complete")
    if os.path.exists(done):
        return path
    numbers, specials, _ = SIZES[size]
    numbers = dict(numbers)
    t0 = time.perf_counter()
    config = AutoConfig.for_model("llama", **numbers)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(1234)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    staging = path + ".partial"
    os.makedirs(staging, exist_ok=True)
    model.save_pretrained(staging)
    common.synthetic_tokenizer(
        config.vocab_size, specials, pad=specials[config.pad_token_id], bos=specials[config.bos_token_id],
        eos=specials[config.eos_token_id],
    ).save_pretrained(staging)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    if os.path.exists(path):
        import shutil

        shutil.rmtree(path)
    os.replace(staging, path)
    with open(done, "w") as f:
        f.write(f"{params}\n")
    print(f"[bench] {size}: {params / 1e9:.3f}B parameters written to {path} in {time.perf_counter() - t0:.1f}s",
          flush=True)
    return path


def random_tokens(vocab_size: int, rows: int, seq: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (rows, seq), generator=g)


# ------------------------------------------------------------------------------------------------
# The two stacks
# ------------------------------------------------------------------------------------------------


def load_fasttune(path: str, args):
    import torch
    from fasttune import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        path, max_seq_length=args.seq, dtype=torch.bfloat16, load_in_4bit=False, random_state=args.seed,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none", target_modules=TARGET_MODULES,
        use_gradient_checkpointing="fasttune", random_state=args.seed, max_seq_length=args.seq,
    )
    FastLanguageModel.for_training(model)
    return model, tokenizer


def load_hf(path: str, args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_map = {"": 0} if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 device_map=device_map)
    model.config.use_cache = False
    if args.loop == "plain":  # under SFTTrainer, SFTConfig(gradient_checkpointing=True) does this
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                      target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


class StepClock:
    """Per-step times (device-synchronized) and the wall clock at each step's end."""

    def __init__(self):
        import torch

        self._sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        self.step_times: list[float] = []
        self.step_ends: list[float] = []
        self._start = None

    def begin(self):
        self._sync()
        self._start = time.perf_counter()

    def end(self):
        self._sync()
        t = time.perf_counter()
        self.step_times.append(t - self._start)
        self.step_ends.append(t)


def sft_callback(clock: StepClock, losses: list, grad_norms: list):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:  # logging_steps=1: one entry per optimizer step
                losses.append(float(logs["loss"]))
                if logs.get("grad_norm") is not None:
                    grad_norms.append(float(logs["grad_norm"]))

    return Timing()


def train_sft(model, tokenizer, data, args, clock, losses, grad_norms, workdir):
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    dataset = Dataset.from_dict({"input_ids": data.tolist()})
    hf_checkpointing = args.stack == "hf"  # fasttune checkpoints inside its own forward
    config = SFTConfig(
        output_dir=workdir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        bf16=True,
        max_length=args.seq,
        packing=False,
        gradient_checkpointing=hf_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if hf_checkpointing else None,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
        use_cpu=not cuda,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[sft_callback(clock, losses, grad_norms)],
    )
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()


def train_plain(model, data, args, clock, losses, grad_norms):
    """The peers' anchor loop: forward with labels, backward, AdamW, zero_grad, under bf16 autocast."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        ids = data[step * args.batch:(step + 1) * args.batch].to(device)
        clock.begin()
        loss, norm = common.optimizer_step(model, ids, trainable, optimizer, device)
        clock.end()
        losses.append(float(loss.detach().float()))
        grad_norms.append(float(norm))


# ------------------------------------------------------------------------------------------------
# Accounting
# ------------------------------------------------------------------------------------------------


def flops_per_token(numbers: dict, lora_params: int, seq: int) -> float:
    """DESIGN.md's LoRA model FLOPs per token: 4*N + 6*N_lora + 6*L*s*h_attn, N = projection weights and
    lm_head (not the input embedding), attention counted causally over a document of length s."""
    h, inter, layers = numbers["hidden_size"], numbers["intermediate_size"], numbers["num_hidden_layers"]
    hd = numbers["head_dim"]
    q_dim, kv_dim = numbers["num_attention_heads"] * hd, numbers["num_key_value_heads"] * hd
    per_layer = h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * inter
    n = layers * per_layer + numbers["vocab_size"] * h
    return 4 * n + 6 * lora_params + 6 * layers * seq * q_dim


def summarize(args, clock: StepClock, losses, grad_norms, numbers, lora_params, peak_tflops) -> dict:
    tokens_per_step = args.batch * args.seq
    timed = clock.step_times[args.warmup:]
    ordered = sorted(timed)
    out = {
        "timed_steps": len(timed),
        "tokens_per_s": round(tokens_per_step * len(timed) / sum(timed), 1),
        "s_per_step_mean": round(sum(timed) / len(timed), 4),
        "s_per_step_median": round(ordered[len(ordered) // 2], 4),
        "s_per_step_min": round(ordered[0], 4),
        "warmup_s": round(sum(clock.step_times[:args.warmup]), 3),
    }
    ends = clock.step_ends
    if len(ends) > args.warmup:
        span = ends[-1] - ends[args.warmup - 1] if args.warmup > 0 else None
        if span:
            out["tokens_per_s_wall"] = round(tokens_per_step * (len(ends) - args.warmup) / span, 1)
    fpt = flops_per_token(numbers, lora_params, args.seq)
    out["model_flops_per_token"] = fpt
    out["model_tflops_per_s"] = round(fpt * out["tokens_per_s"] / 1e12, 2)
    if peak_tflops:
        out["bf16_matmul_peak_tflops"] = peak_tflops
        out["mfu"] = round(out["model_tflops_per_s"] / peak_tflops, 4)
    out["loss_first"] = round(losses[0], 4) if losses else None
    out["loss_last"] = round(losses[-1], 4) if losses else None
    out["losses"] = [round(x, 4) for x in losses]
    out["grad_norms"] = [round(x, 5) for x in grad_norms]
    out["step_times"] = [round(x, 4) for x in clock.step_times]
    return out


def check_training(losses, grad_norms, steps) -> list[str]:
    problems = []
    if len(losses) != steps:
        problems.append(f"expected {steps} logged losses, got {len(losses)}")
    if not losses or not all(math.isfinite(x) for x in losses):
        problems.append(f"non-finite loss in {losses}")
    elif max(losses) - min(losses) <= 1e-4:
        problems.append(f"the loss did not move: {losses}")
    if not grad_norms or not all(math.isfinite(g) and g > 0 for g in grad_norms):
        problems.append(f"a gradient norm is zero or not finite: {grad_norms}")
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    numbers, _, benchmark = SIZES[args.size]
    key = args.stack if args.loop == "sft" else f"{args.stack}/plain-loop"
    record = {
        "stack": args.stack, "loop": "trl.SFTTrainer" if args.loop == "sft" else "plain", "model": args.size,
        "model_shape": "meta-llama/Llama-3.2-1B (random init)" if args.size == "1b" else "tiny llama (random init)",
        "seq": args.seq, "batch": args.batch, "steps": args.steps, "warmup_steps": args.warmup, "lr": args.lr,
        "lora_r": args.rank, "lora_alpha": args.alpha, "lora_targets": TARGET_MODULES, "dtype": "bfloat16",
        "gradient_checkpointing": "fasttune (owned forward, per layer)" if args.stack == "fasttune"
        else "transformers (use_reentrant=False)",
        **common.provenance(),
    }
    peak = None if (args.no_peak or not cuda) else common.matmul_peak_tflops()
    ckpt = args.ckpt_dir or os.path.join(tempfile.gettempdir(), "fasttune-bench", args.size)
    ok = False
    try:
        build_checkpoint(ckpt, args.size)
        t0 = time.perf_counter()
        model, tokenizer = (load_fasttune if args.stack == "fasttune" else load_hf)(ckpt, args)
        if cuda:
            torch.cuda.synchronize()
        record["load_s"] = round(time.perf_counter() - t0, 2)
        trainable = [p for p in model.parameters() if p.requires_grad]
        lora_params = sum(p.numel() for p in trainable)
        record["trainable_params"] = lora_params
        record["trainable_dtype"] = str(trainable[0].dtype).removeprefix("torch.")
        if cuda:
            record["weights_alloc_gb"] = round(torch.cuda.memory_allocated() / 2**30, 3)
        data = random_tokens(numbers["vocab_size"], args.steps * args.batch, args.seq, args.seed)
        clock, losses, grad_norms = StepClock(), [], []
        with tempfile.TemporaryDirectory() as workdir:
            if args.loop == "sft":
                train_sft(model, tokenizer, data, args, clock, losses, grad_norms, workdir)
            else:
                train_plain(model, data, args, clock, losses, grad_norms)
        if cuda:
            torch.cuda.synchronize()
            record["peak_alloc_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            record["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        record.update(summarize(args, clock, losses, grad_norms, numbers, lora_params, peak))
        problems = check_training(losses, grad_norms, args.steps)
        record["problems"] = problems
        ok = not problems
    except Exception as err:  # the failure is a result too: written, then the exit code says so
        traceback.print_exc()
        record["error"] = f"{type(err).__name__}: {err}"[:2000]
        record["traceback_tail"] = traceback.format_exc()[-3000:]
    record["ok"] = ok
    path = common.write_run(common.result_path(benchmark, record["gpu"]["name"], args.results_root),
                            benchmark, key, record)
    line = f"[bench] {benchmark} {key}: ok={ok}"
    if "tokens_per_s" in record:
        line += (f" tokens/s={record['tokens_per_s']:,.0f} (wall {record.get('tokens_per_s_wall', 0):,.0f})"
                 f" loss {record['loss_first']} -> {record['loss_last']}")
    if "peak_alloc_gb" in record:
        line += f" peak alloc {record['peak_alloc_gb']} GB, reserved {record['peak_reserved_gb']} GB"
    if "mfu" in record:
        line += f" MFU {record['mfu']:.1%}"
    print(line, flush=True)
    print(f"[bench] written to {path}", flush=True)
    for problem in record.get("problems", []):
        print(f"[bench] PROBLEM: {problem}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
