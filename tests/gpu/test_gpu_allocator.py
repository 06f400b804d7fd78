"""The CUDA allocator after FastLanguageModel.from_pretrained (fasttune/memory/allocator.py), read back from
PyTorch's memory snapshot in a fresh process: segments are expandable by default, and a user's own
allocator configuration or FASTTUNE_EXPANDABLE_SEGMENTS=0 leaves them ordinary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

_PROBE = """
import json, sys, torch
from fasttune import FastLanguageModel
model, _ = FastLanguageModel.from_pretrained(sys.argv[1], load_in_4bit=True, max_seq_length=64)
ids = torch.randint(3, 1000, (2, 32), device="cuda")
with torch.no_grad():
    model(input_ids=ids)
segments = [s for s in torch.cuda.memory_snapshot() if s.get("segment_pool_id", (0, 0)) == (0, 0)]
print(json.dumps([s["is_expandable"] for s in segments]))
"""


def _segments(model_dir, **env):
    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    run_env.update(env)
    done = subprocess.run([sys.executable, "-c", _PROBE, model_dir], env=run_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kinds = json.loads(done.stdout.strip().splitlines()[-1])
    assert kinds, "the probe reserved no GPU memory"
    return kinds


def test_gpu_segments_are_expandable_by_default(tiny_model_dir):
    assert all(_segments(tiny_model_dir("llama")))


@pytest.mark.parametrize("env", [{"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"},
                                 {"FASTTUNE_EXPANDABLE_SEGMENTS": "0"}])
def test_gpu_a_users_choice_keeps_ordinary_segments(tiny_model_dir, env):
    assert not any(_segments(tiny_model_dir("llama"), **env))
