"""Small helpers shared by the benchmark scripts: what ran where (versions, GPU, commit, command),
a synthetic tokenizer for random-init checkpoints, the measured matmul peak, and result files.

Results live in benchmarks/results/<gpu-slug>/<benchmark>.json, one object per file with one entry
per stack under "runs", so that stacks measured in one session sit side by side.
"""

from __future__ import annotations

import datetime
import importlib.metadata as md
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

PACKAGES = ("torch", "transformers", "peft", "accelerate", "triton", "trl", "datasets", "fasttune",
            # the peer stacks, where the process can see them (absent ones are left out)
            "bitsandbytes", "liger-kernel", "unsloth", "unsloth_zoo", "torchao")


def versions(names=PACKAGES) -> dict:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            if name == "fasttune":  # run from a checkout on PYTHONPATH, not installed
                try:
                    import fasttune

                    out[name] = fasttune.__version__
                except ImportError:
                    pass
    return out


def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"name": "cpu", "cuda": None}
    p = torch.cuda.get_device_properties(0)
    return {
        "name": p.name,
        "memory_gb": round(p.total_memory / 2**30, 2),
        "capability": f"{p.major}.{p.minor}",
        "sm_count": p.multi_processor_count,
        "cuda": torch.version.cuda,
        "device_count": torch.cuda.device_count(),
    }


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def git_commit() -> str:
    """HEAD of the checkout, '+dirty' when the tree has changes; the GPU machine's copy of the tree has no
    .git or a stale one (the session's starting commit), so there the caller passes it in FASTTUNE_GIT_COMMIT."""
    given = os.environ.get("FASTTUNE_GIT_COMMIT")
    if given:
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def provenance() -> dict:
    """Everything a result needs to say where and how it was measured."""
    return {
        "date": now(),
        "gpu": gpu_info(),
        "versions": versions(),
        "git_commit": git_commit(),
        "command": command_line(),
        "host": platform.node(),
        # switches that change what fasttune runs (FASTTUNE_DISABLE_TRITON=1, FASTTUNE_FUSED_LORA=0: the
        # "before" of a before/after pair); the harness's own variables are not switches
        "fasttune_env": {k: v for k, v in sorted(os.environ.items())
                         if k.startswith("FASTTUNE_") and not k.startswith(("FASTTUNE_BENCH", "FASTTUNE_GIT", "FASTTUNE_TEST"))},
    }


def result_path(benchmark: str, gpu_name: str, root: str | os.PathLike | None = None) -> Path:
    return Path(root or RESULTS) / slug(gpu_name) / f"{benchmark}.json"


def write_run(path: Path, benchmark: str, key: str, record: dict) -> Path:
    """Put `record` under runs[key] of the JSON file at `path`, keeping the other stacks' entries."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": benchmark, "runs": {}}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            data.setdefault("runs", {})
        except json.JSONDecodeError:
            pass
    data["benchmark"] = benchmark
    data["runs"][key] = record
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


class Unsupported(Exception):
    """The stack has no path for this configuration (recorded, not an error)."""


@contextmanager
def recorded(record: dict):
    """Run a measurement body; an unsupported configuration or a failure becomes part of the record
    (status, reason or error) instead of an exception: a failure is a result too."""
    try:
        yield
    except Unsupported as err:
        record["status"] = "unsupported"
        record["reason"] = str(err)[:500]
    except Exception as err:
        traceback.print_exc()
        record["error"] = f"{type(err).__name__}: {err}"[:2000]
        record["traceback_tail"] = traceback.format_exc()[-3000:]
        if type(err).__name__ == "OutOfMemoryError":
            record["status"] = "oom"


def finish_run(benchmark: str, key: str, record: dict, t_start: float, results_root, summary: str) -> int:
    """Stamp wall time and provenance, write the record under its key, print it; the process exit code."""
    record["wall_s"] = round(time.perf_counter() - t_start, 1)
    record.update(provenance())
    if os.environ.get("FASTTUNE_BENCH_COMMAND"):
        record["driver_command"] = os.environ["FASTTUNE_BENCH_COMMAND"]
    path = write_run(result_path(benchmark, record["gpu"]["name"], results_root), benchmark, key, record)
    print(summary, flush=True)
    print(f"[bench] written to {path}", flush=True)
    return 0 if record["status"] in ("ok", "unsupported") else 1


def synthetic_tokenizer(vocab_size: int, specials: dict[int, str], pad: str, bos: str, eos: str,
                        max_length: int = 131072):
    """A word-level fast tokenizer with exactly `vocab_size` ids ('w<id>' for ordinary ids), for
    random-init checkpoints that must load through AutoTokenizer without any downloaded vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size) if i not in specials}
    vocab.update({token: i for i, token in specials.items() if i < vocab_size})
    unk = next(iter(w for w in vocab if w.startswith("w")))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins word-level tokens with spaces
    core.add_special_tokens([t for i, t in specials.items() if i < vocab_size])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
        model_max_length=max_length, padding_side="right",
    )


# ------------------------------------------------------------------------------------------------
# Model registry: copies of the real config.json numbers, built as random-init checkpoints
# ------------------------------------------------------------------------------------------------

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_LLAMA3_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
                    128004: "<|finetune_right_pad_id|>", 128009: "<|eot_id|>"}


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


_LLAMA3 = dict(vocab_size=128256, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
               attention_bias=False, mlp_bias=False, attention_dropout=0.0, initializer_range=0.02,
               bos_token_id=128000, eos_token_id=128001, pad_token_id=128004)


class ModelSpec:
    """One registry entry: the architecture's config numbers, its special tokens, and where they come from.

    `config` holds the numbers of the real checkpoint's config.json (transformers-5 spelling: rope settings
    under `rope_parameters`); `specials` maps token ids to the special tokens the synthetic tokenizer keeps.
    """

    def __init__(self, name: str, hf_id: str, model_type: str, architecture: str, config: dict,
                 specials: dict[int, str], liger: str | None):
        self.name, self.hf_id, self.model_type, self.architecture = name, hf_id, model_type, architecture
        self.config, self.specials, self.liger = dict(config), dict(specials), liger

    def head_dim(self) -> int:
        c = self.config
        return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]

    def layer_windows(self) -> list[int | None]:
        """Per layer, the attention window (None: the whole causal prefix)."""
        c, layers = self.config, self.config["num_hidden_layers"]
        if self.model_type == "gemma2":  # transformers' Gemma2: even layers slide, odd layers are global
            return [c.get("sliding_window") if i % 2 == 0 else None for i in range(layers)]
        if self.model_type in ("mistral", "qwen2") and c.get("sliding_window") and c.get("use_sliding_window", True):
            return [c["sliding_window"]] * layers
        return [None] * layers

    def tiny(self) -> "ModelSpec":
        """The same family and settings at a size a CPU trains in seconds (smoke tests of the harness)."""
        c = dict(self.config, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024)
        if "query_pre_attn_scalar" in c:
            c["query_pre_attn_scalar"] = 64
        if "max_window_layers" in c:
            c["max_window_layers"] = 2
        remap = {old: 1000 + k for k, old in enumerate(sorted(self.specials))}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if c.get(key) is not None:
                c[key] = remap[c[key]]
        specials = {remap[i]: tok for i, tok in self.specials.items()}
        return ModelSpec(self.name + "-tiny", self.hf_id + " (tiny)", self.model_type, self.architecture, c,
                         specials, self.liger)

    def describe(self) -> dict:
        return {"name": self.name, "shape_of": self.hf_id, "model_type": self.model_type,
                "params_b": round(param_count(self) / 1e9, 3), "config": self.config}


MODELS: dict[str, ModelSpec] = {m.name: m for m in [
    ModelSpec("llama-1b", "meta-llama/Llama-3.2-1B", "llama", "LlamaForCausalLM",
              dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_parameters=_llama3_rope(32.0)),
              _LLAMA3_SPECIALS, "llama"),
    ModelSpec("llama-8b", "meta-llama/Llama-3.1-8B", "llama", "LlamaForCausalLM",
              dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, rope_parameters=_llama3_rope(8.0)),
              _LLAMA3_SPECIALS, "llama"),
    ModelSpec("qwen2.5-7b", "Qwen/Qwen2.5-7B", "qwen2", "Qwen2ForCausalLM",
              dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=131072,
                   rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, sliding_window=131072,
                   max_window_layers=28, attention_dropout=0.0, initializer_range=0.02,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                   bos_token_id=151643, eos_token_id=151643, pad_token_id=151643),
              {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}, "qwen2"),
    ModelSpec("mistral-7b", "mistralai/Mistral-7B-v0.3", "mistral", "MistralForCausalLM",
              dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                   max_position_embeddings=32768, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
                   attention_dropout=0.0, initializer_range=0.02,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                   bos_token_id=1, eos_token_id=2, pad_token_id=2),
              {0: "<unk>", 1: "<s>", 2: "</s>"}, "mistral"),
    ModelSpec("gemma2-2b", "google/gemma-2-2b", "gemma2", "Gemma2ForCausalLM",
              dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=4096,
                   query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   attention_bias=False, attention_dropout=0.0, initializer_range=0.02,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                   bos_token_id=2, eos_token_id=1, pad_token_id=0),
              {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>"}, "gemma2"),
]}


def model_spec(name: str, size: str = "full") -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; the registry has {sorted(MODELS)}")
    return MODELS[name].tiny() if size == "tiny" else MODELS[name]


def checkpoint_dir(spec: ModelSpec, root: str | os.PathLike | None = None) -> Path:
    import tempfile

    root = root or os.environ.get("FASTTUNE_BENCH_CKPT_ROOT") or os.path.join(tempfile.gettempdir(), "fasttune-bench")
    return Path(root) / f"{spec.name}-randinit-bf16"


def build_checkpoint(spec: ModelSpec, path: str | os.PathLike) -> Path:
    """Write a random-init bf16 checkpoint of `spec` and its synthetic tokenizer to `path` (once), so that
    every stack loads it through its own from_pretrained."""
    import shutil
    import time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if (path / ".complete").exists():
        return path
    t0 = time.perf_counter()
    config = AutoConfig.for_model(spec.model_type, **spec.config)
    config.architectures = [spec.architecture]
    torch.manual_seed(1234)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    staging = path.with_name(path.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    c = spec.config
    synthetic_tokenizer(c["vocab_size"], spec.specials, pad=spec.specials[c["pad_token_id"]],
                        bos=spec.specials[c["bos_token_id"]], eos=spec.specials[c["eos_token_id"]]).save_pretrained(staging)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    if path.exists():
        shutil.rmtree(path)
    staging.replace(path)
    (path / ".complete").write_text(json.dumps({"params": params, "spec": spec.name}) + "\n")
    print(f"[bench] {spec.name}: {params / 1e9:.3f}B parameters written to {path} in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    return path


def ensure_checkpoint(spec: ModelSpec, root=None, size: str = "full") -> Path:
    """The checkpoint's directory, built first in a child process when missing: the caller may need to import
    a stack (Unsloth) before transformers, which building here would import."""
    path = checkpoint_dir(spec, root)
    if not (path / ".complete").exists():
        name = spec.name.removesuffix("-tiny")
        cmd = [sys.executable, str(Path(__file__).resolve()), "build", name, "--size", size]
        if root:
            cmd += ["--ckpt-root", str(root)]
        subprocess.run(cmd, check=True)
    return path


def random_batches(vocab_size: int, rows: int, seq: int, seed: int = 0):
    """The training data of every stack: uniform random token ids, rows x seq, from a fixed CPU generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (rows, seq), generator=g)


# ------------------------------------------------------------------------------------------------
# Accounting (DESIGN.md, "Performance model")
# ------------------------------------------------------------------------------------------------


def _dims(spec: ModelSpec):
    c = spec.config
    hd = spec.head_dim()
    return c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"] * hd, \
        c["num_key_value_heads"] * hd, c["vocab_size"]


def param_count(spec: ModelSpec) -> int:
    """N of the performance model: every projection weight plus lm_head, without the input embedding
    (an lm_head tied to the embedding still costs its matmul, so it counts)."""
    h, inter, layers, q, kv, vocab = _dims(spec)
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter
    return layers * per_layer + vocab * h


def lora_param_count(spec: ModelSpec, rank: int, targets=LORA_TARGETS) -> int:
    h, inter, layers, q, kv, _ = _dims(spec)
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def attention_flops_per_token(spec: ModelSpec, seq: int) -> float:
    """Forward + backward attention FLOPs per token for documents of `seq` tokens, counted causally: a
    query attends on average to s/2 keys (6*s*h per layer over fwd+bwd), or to fewer under a sliding window."""
    _, _, _, q, _, _ = _dims(spec)
    total = 0.0
    for window in spec.layer_windows():
        keys = seq / 2 if (window is None or window >= seq) else window - window * window / (2 * seq)
        total += 12 * q * keys  # QK^T and PV, 2 FLOPs per MAC, x3 for forward + backward
    return total


def flops_per_token(spec: ModelSpec, seq: int, method: str = "lora", lora_params: int | None = None) -> float:
    """Model FLOPs per real token: LoRA 4N + 6N_lora + attention; full fine-tuning 6N + attention."""
    n = param_count(spec)
    attention = attention_flops_per_token(spec, seq)
    if method == "full":
        return 6 * n + attention
    return 4 * n + 6 * (lora_params or 0) + attention


def loss_moved(losses, tol: float = 1e-4) -> bool:
    return len(losses) > 1 and max(losses) - min(losses) > tol


def training_problems(losses, grad_norms, steps: int, update_norm: float | None = None) -> list[str]:
    """What makes a throughput number untrustworthy: a loss that is not finite or never moved, a gradient
    norm that is zero or not finite, trainable weights that did not change."""
    import math

    problems = []
    if len(losses) != steps:
        problems.append(f"expected {steps} losses, got {len(losses)}")
    if not losses or not all(math.isfinite(x) for x in losses):
        problems.append(f"non-finite loss in {losses}")
    elif not loss_moved(losses):
        problems.append(f"the loss did not move: {losses}")
    if not grad_norms or not all(math.isfinite(g) and g > 0 for g in grad_norms):
        problems.append(f"a gradient norm is zero or not finite: {grad_norms}")
    if update_norm is not None and not update_norm > 0:
        problems.append("the trainable weights did not change")
    return problems


# ------------------------------------------------------------------------------------------------
# The machine's two ceilings, measured in the same process as the measurement that uses them
# ------------------------------------------------------------------------------------------------


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def matmul_peak_tflops(n: int = 8192, chain: int = 8, repeats: int = 15, warmup: int = 150) -> float | None:
    """bf16 matmul rate on random data: the median over `repeats` of `chain` back-to-back n^3 products
    (rotating among three operand sets), timed with CUDA events after `warmup` untimed products (about 0.2 s on
    an H100). Readings still differ between processes (696 to 787 TFLOP/s in one H100 session), so report.py
    divides by the best reading of a results folder. None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    ops = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
            torch.randn(n, n, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for i in range(warmup):
        torch.matmul(*ops[i % 3], out=out)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(chain):
            torch.matmul(*ops[i % 3], out=out)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / chain)
    del ops, out
    torch.cuda.empty_cache()
    return round(2 * n**3 / _median(times) / 1e12, 1)


def copy_bandwidth_gbs(nbytes: int = 2**30, repeats: int = 9) -> float | None:
    """Device-to-device copy rate in GB/s (1e9 bytes), counting bytes read plus bytes written. None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return round(2 * nbytes / _median(times) / 1e9, 1)


def machine_ceilings() -> dict:
    return {"bf16_matmul_tflops": matmul_peak_tflops(), "copy_gbs": copy_bandwidth_gbs()}


def optimizer_step(model, ids, trainable: list, optimizer, device):
    """One training step as every stack is measured: forward with labels = inputs under bf16 autocast,
    backward, the gradient norm, AdamW step, zero_grad. Returns (loss, grad norm) as tensors (no sync)."""
    import torch

    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm


def checkpoint_and_ceilings(record: dict, spec, args) -> tuple[Path, dict]:
    """The run's random-init checkpoint and the machine's ceilings, measured now and kept in the record."""
    ckpt = ensure_checkpoint(spec, args.ckpt_root, args.size)
    record["machine"] = machine_ceilings()
    return ckpt, record["machine"]


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="benchmark helpers: build a registry checkpoint, measure the machine")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the random-init checkpoint of a registry model")
    b.add_argument("model", choices=sorted(MODELS))
    b.add_argument("--size", choices=["full", "tiny"], default="full")
    b.add_argument("--ckpt-root", default=None)
    sub.add_parser("machine", help="print the measured bf16 matmul peak and copy bandwidth")
    sub.add_parser("models", help="list the registry")
    args = p.parse_args(argv)
    if args.command == "build":
        spec = model_spec(args.model, args.size)
        print(build_checkpoint(spec, checkpoint_dir(spec, args.ckpt_root)))
    elif args.command == "machine":
        print(json.dumps({**machine_ceilings(), "gpu": gpu_info()}))
    else:
        for spec in MODELS.values():
            print(json.dumps(spec.describe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
