"""The owned forward runs eligible LoRA projections through the fused functions, and the result equals
PEFT's own layers (the same model with fusion off)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from test_training import TARGETS, grads_of, randomize_lora_b, uneven_batch  # noqa: E402

from fasttune import FastLanguageModel  # noqa: E402
from fasttune.models import llama  # noqa: E402


def _counting(monkeypatch):
    counts = {"qkv": 0, "o": 0, "mlp": 0}
    for name, key in (("lora_qkv", "qkv"), ("lora_o", "o"), ("lora_mlp", "mlp")):
        original = getattr(llama, name)

        def wrapper(*args, _original=original, _key=key, **kwargs):
            counts[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(llama, name, wrapper)
    return counts


def _peft(model_dir, dropout=0.0, load_in_4bit=False):
    model, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=load_in_4bit, max_seq_length=64)
    peft = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS,
                                            lora_dropout=dropout, use_gradient_checkpointing=False, random_state=7)
    randomize_lora_b(peft)
    return peft.train()


@pytest.mark.parametrize("family, load_in_4bit", [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)])
def test_eligible_layers_run_fused_and_match_peft(tiny_model_dir, monkeypatch, family, load_in_4bit):
    """Qwen2's q/k/v carry frozen biases, which the fused path adds after the projections."""
    model_dir = tiny_model_dir(family)
    batch = uneven_batch(1000, rows=3, length=14)
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(llama, "_FUSED_LORA", fused)
        counts = _counting(monkeypatch)
        peft = _peft(model_dir, load_in_4bit=load_in_4bit)
        if family == "qwen2":
            assert peft.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().bias is not None
        loss = peft(**batch).loss
        loss.backward()
        layers = peft.config.num_hidden_layers
        expected = {"qkv": layers, "o": layers, "mlp": layers} if fused else {"qkv": 0, "o": 0, "mlp": 0}
        assert counts == expected
        results[fused] = (loss.detach(), grads_of(peft))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=0)
    for name, want in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_dropout_falls_back_to_peft_with_one_notice(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(llama, "_FUSED_LORA", True)
    monkeypatch.setattr(llama, "_unfused_noted", set())
    counts = _counting(monkeypatch)
    peft = _peft(tiny_model_dir("llama"), dropout=0.1)
    batch = uneven_batch(1000, rows=2, length=10)
    peft(**batch).loss.backward()
    peft(**batch).loss.backward()
    assert counts == {"qkv": 0, "o": 0, "mlp": 0}
    notices = [line for line in capsys.readouterr().out.splitlines() if "PEFT's own forward" in line]
    assert len(notices) == 1 and "dropout" in notices[0], notices


def test_a_frozen_base_bias_is_left_to_the_caller_only_when_asked():
    from torch import nn

    from fasttune.lora import base_bias, lora_projection, why_not_fused

    layer = nn.Linear(8, 4).requires_grad_(False)
    assert lora_projection(layer) is None and "bias" in why_not_fused(layer)
    proj = lora_projection(layer, allow_bias=True)
    assert proj is not None and proj.weight is layer.weight and base_bias(layer) is layer.bias
    layer.bias.requires_grad_(True)  # a bias that trains needs the module's own forward
    assert lora_projection(layer, allow_bias=True) is None and "trainable bias" in why_not_fused(layer, True)
