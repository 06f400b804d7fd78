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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

PACKAGES = ("torch", "transformers", "peft", "accelerate", "triton", "trl", "datasets", "fasttune")


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
    """HEAD of the checkout, '+dirty' when the tree has changes; the GPU machine gets a copy of the tree
    without .git, so there the caller passes it in FASTTUNE_GIT_COMMIT."""
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


def bf16_matmul_tflops(n: int = 8192, repeats: int = 10) -> float | None:
    """The GPU's bf16 matmul rate on random data (median of `repeats` timed products after warm-up),
    the denominator of MFU. None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    times.sort()
    return round(2 * n**3 / times[len(times) // 2] / 1e12, 1)
