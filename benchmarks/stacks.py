"""The four training stacks, loaded the way each one's users load them, with identical LoRA settings.

    fasttune : fasttune.FastLanguageModel.from_pretrained + get_peft_model(use_gradient_checkpointing="fasttune")
    hf       : transformers AutoModelForCausalLM (sdpa; bitsandbytes nf4 + double quant for 4-bit) + PEFT LoRA,
               transformers' gradient checkpointing (use_reentrant=False)
    liger    : liger_kernel's apply_liger_kernel_to_<family>() (rope, RMSNorm, SwiGLU, fused linear cross
               entropy), then exactly the hf path
    unsloth  : unsloth.FastLanguageModel.from_pretrained + get_peft_model(use_gradient_checkpointing="unsloth")

Every stack: LoRA r, alpha as given (16, 16), dropout 0, no bias, on q,k,v,o,gate,up,down; bf16 weights.
A configuration a stack cannot run raises `Unsupported`, which the benchmarks record as "not yet supported".

Nothing here imports transformers at module level: Unsloth must be imported before it (`preimport`).
"""

from __future__ import annotations

import argparse
import os

import common
from common import Unsupported  # raised by the loaders below, recorded by the scripts

STACKS = ("fasttune", "hf", "liger", "unsloth")
DECODE_STACKS = ("fasttune", "hf", "unsloth")  # Liger has training kernels only

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    # Unsloth offline and quiet: no statistics ping, no hub look-ups, no installs at import time.
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "UNSLOTH_OFFLINE": "1",
    "UNSLOTH_AUTO_INSTALL": "0",
    "UNSLOTH_PREWARM_HUB_CACHE": "0",
    "UNSLOTH_STUDIO_DISABLED": "1",
}


def set_offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def preimport(stack: str) -> None:
    """Import what must come first in the process (Unsloth patches transformers as it is imported)."""
    if stack not in STACKS:
        raise ValueError(f"unknown stack {stack!r}; choose from {STACKS}")
    set_offline_env()
    if stack == "unsloth":
        import unsloth  # noqa: F401


def benchmark_parser(doc: str, *, stacks=STACKS, method: bool = True) -> argparse.ArgumentParser:
    """The arguments every per-stack benchmark script shares: which stack, model, size and weights."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stack", choices=stacks, required=True)
    p.add_argument("--model", choices=sorted(common.MODELS), default="llama-1b")
    p.add_argument("--size", choices=["full", "tiny"], default="full", help="tiny: a small copy for smoke tests")
    p.add_argument("--quant", choices=["16bit", "4bit"], default="16bit")
    if method:
        p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--ckpt-root", default=None, help="where random-init checkpoints live (default <tmp>/fasttune-bench)")
    p.add_argument("--results-root", default=None, help="default: benchmarks/results")
    return p


def add_training_args(p: argparse.ArgumentParser, *, loop: bool = True, steps: int = 25) -> None:
    """The training settings every stack gets alike (the peers' loop): LoRA, AdamW, data seed; with
    `loop`, the sequence shape and step counts too."""
    if loop:
        p.add_argument("--seq", type=int, default=2048)
        p.add_argument("--batch", type=int, default=2)
        p.add_argument("--steps", type=int, default=steps, help="optimizer steps, warm-up included")
        p.add_argument("--warmup", type=int, default=5, help="first steps left out of tokens/s")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)


def start(args):
    """The stack's own imports first (Unsloth before transformers), then (torch, device, model spec)."""
    preimport(args.stack)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch, device, common.model_spec(args.model, args.size)


def gc_label(stack: str, gc: bool) -> str:
    if not gc:
        return "off"
    return {"fasttune": "fasttune (recompute per layer)", "unsloth": "unsloth (offloaded)"}.get(
        stack, "transformers (use_reentrant=False)")


def offload_embedding_override():
    """BENCH_OFFLOAD_EMBEDDING=1 / 0: `offload_embedding=True` / `False` for the stacks that take it (fasttune,
    Unsloth), so that both can be measured with the input embedding in host memory or both without; unset,
    each stack's default ("auto" for both)."""
    value = os.environ.get("BENCH_OFFLOAD_EMBEDDING", "")
    return None if value == "" else value not in ("0", "false", "False")


def load_for_training(stack: str, ckpt: str, spec, *, quant: str, method: str, seq: int, rank: int = 16,
                      alpha: int = 16, seed: int = 0, gc: bool = True):
    """The model in training mode, its trainable parameters set as `method` asks."""
    import torch

    if quant not in ("16bit", "4bit"):
        raise ValueError(f"quant must be 16bit or 4bit, got {quant!r}")
    if method not in ("lora", "full"):
        raise ValueError(f"method must be lora or full, got {method!r}")
    four_bit = quant == "4bit"
    embedding = offload_embedding_override()
    extra = {} if embedding is None else {"offload_embedding": embedding}
    if four_bit and method == "full":
        raise Unsupported("full fine-tuning of 4-bit weights is not a configuration any stack offers")
    targets = list(_targets())

    if stack == "fasttune":
        from fasttune import FastLanguageModel

        try:
            model, _ = FastLanguageModel.from_pretrained(
                str(ckpt), max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=four_bit,
                full_finetuning=method == "full", random_state=seed, **extra)
        except NotImplementedError as err:
            raise Unsupported(str(err)) from err
        if method == "lora":
            model = FastLanguageModel.get_peft_model(
                model, r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets,
                use_gradient_checkpointing="fasttune" if gc else False, random_state=seed, max_seq_length=seq)
        FastLanguageModel.for_training(model, use_gradient_checkpointing="fasttune" if gc else False)
        return model

    if stack == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(ckpt), max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=four_bit,
            full_finetuning=method == "full", use_gradient_checkpointing="unsloth" if gc else False, **extra)
        if method == "lora":
            model = FastLanguageModel.get_peft_model(
                model, r=rank, lora_alpha=alpha, lora_dropout=0, bias="none", target_modules=targets,
                use_gradient_checkpointing="unsloth" if gc else False, random_state=seed, max_seq_length=seq)
        FastLanguageModel.for_training(model)
        return model

    if stack == "liger":
        import liger_kernel.transformers as liger

        if spec.liger is None:
            raise Unsupported(f"liger-kernel has no patch for model_type {spec.model_type!r}")
        getattr(liger, f"apply_liger_kernel_to_{spec.liger}")()
    elif stack != "hf":
        raise ValueError(f"unknown stack {stack!r}; choose from {STACKS}")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), **_hf_kwargs(four_bit))
    model.config.use_cache = False
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "lora":
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    return model


def load_for_inference(stack: str, ckpt: str, *, quant: str, max_len: int):
    """The model ready for `generate` (no adapters), in each stack's own inference mode."""
    import torch

    four_bit = quant == "4bit"
    if stack == "fasttune":
        from fasttune import FastLanguageModel

        try:
            model, _ = FastLanguageModel.from_pretrained(str(ckpt), max_seq_length=max_len, dtype=torch.bfloat16,
                                                         load_in_4bit=four_bit)
        except NotImplementedError as err:
            raise Unsupported(str(err)) from err
        return FastLanguageModel.for_inference(model)
    if stack == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_name=str(ckpt), max_seq_length=max_len,
                                                     dtype=torch.bfloat16, load_in_4bit=four_bit)
        FastLanguageModel.for_inference(model)
        return model
    if stack == "hf":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(ckpt), **_hf_kwargs(four_bit))
        model.config.use_cache = True
        return model.eval()
    if stack == "liger":
        raise Unsupported("liger-kernel speeds up training only; it has no generation path")
    raise ValueError(f"unknown stack {stack!r}; choose from {STACKS}")


def _targets():
    from common import LORA_TARGETS

    return LORA_TARGETS


def _hf_kwargs(four_bit: bool) -> dict:
    import torch

    # transformers' default attention: SDPA where the model supports it (Gemma 2 does not: eager)
    kwargs = dict(dtype=torch.bfloat16, device_map={"": 0} if torch.cuda.is_available() else None)
    if four_bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    return kwargs
