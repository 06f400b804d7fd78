"""fasttune/memory/allocator.py: when from_pretrained turns the CUDA allocator's segments expandable and when it
leaves the allocator alone. The GPU test (tests/gpu/test_gpu_allocator.py) reads the segments back from PyTorch's
own memory snapshot."""

from __future__ import annotations

import sys

import pytest
import torch

from fasttune import FastLanguageModel
from fasttune.memory import allocator


@pytest.mark.parametrize("name", allocator.USER_SETTINGS)
def test_a_users_allocator_configuration_is_kept(name):
    reason = allocator.why_not_expandable({name: "max_split_size_mb:512"})
    assert name in reason and "max_split_size_mb:512" in reason
    assert allocator.use_expandable_segments({name: "max_split_size_mb:512"}) is False


@pytest.mark.parametrize("value", ["0", "false", "Off"])
def test_the_opt_out_is_kept(value):
    assert allocator.OPT_OUT in allocator.why_not_expandable({allocator.OPT_OUT: value})


def test_an_empty_setting_is_no_configuration(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(allocator.platform, "release", lambda: "6.8.0-generic")
    assert allocator.why_not_expandable({"PYTORCH_ALLOC_CONF": "", allocator.OPT_OUT: "1"}) is None
    monkeypatch.setattr(allocator.platform, "release", lambda: "5.15.167.4-microsoft-standard-WSL2")
    assert "Linux driver" in allocator.why_not_expandable({})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU machine's answer")
def test_without_cuda_the_allocator_is_left_alone(tiny_model_dir):
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    before = getter() if getter else None
    assert allocator.why_not_expandable({}) == "no CUDA device"
    FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=False, max_seq_length=64)
    if getter:
        assert getter() == before
