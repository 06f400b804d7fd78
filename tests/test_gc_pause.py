"""Automatic garbage collection is paused from a checkpointed training forward to the end of its backward
(fasttune/memory/gc_pause.py), and is on again in every way a step can end."""

from __future__ import annotations

import gc

import pytest
import torch
from test_offload import _all_grads, _model, offload_on_cpu  # noqa: F401  (the fixture)
from test_training import uneven_batch

from fasttune.memory import gc_pause


@pytest.fixture(autouse=True)
def _collector_on():
    gc.enable()
    yield
    gc_pause.resume()
    gc.enable()


@pytest.mark.parametrize("mode", [True, "unsloth"])
def test_paused_from_the_forward_to_the_end_of_the_backward(tiny_model_dir, offload_on_cpu, mode):
    model = _model(tiny_model_dir("llama"), mode)
    batch = uneven_batch(1000, rows=2, length=10)
    seen = []
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    layer.register_hook(lambda g: seen.append(gc.isenabled()))  # the bottom layer: late in the backward
    loss = model(**batch).loss
    assert not gc.isenabled()
    loss.backward()
    assert seen == [False] and gc.isenabled()
    with torch.no_grad():  # not a training step: left alone
        model(**batch)
    model.eval()
    model(**batch)
    assert gc.isenabled()


def test_gradients_with_and_without_the_pause(tiny_model_dir, offload_on_cpu, monkeypatch):
    batch = uneven_batch(1000, rows=2, length=10)
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(gc_pause, "_ENABLED", enabled)
        model = _model(tiny_model_dir("llama"), "unsloth")
        model(**batch).loss.backward()
        grads.append(_all_grads(model))
        assert gc.isenabled()
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name


def test_a_step_that_ends_early_leaves_the_collector_on(tiny_model_dir, offload_on_cpu, monkeypatch):
    model = _model(tiny_model_dir("llama"), "unsloth")
    batch = uneven_batch(1000, rows=2, length=10)
    model(**batch)  # a loss never backpropagated: the next training forward ends that pause
    assert not gc.isenabled()
    model(**batch).loss.backward()
    assert gc.isenabled()

    mlp = model.base_model.model.model.layers[1].mlp

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(type(mlp), "forward", broken)
    monkeypatch.setattr("fasttune.models.llama.mlp_forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        model(**batch)
    assert gc.isenabled()


def test_a_collector_disabled_by_the_user_stays_disabled(tiny_model_dir, offload_on_cpu):
    model = _model(tiny_model_dir("llama"), "unsloth")
    gc.disable()
    model(**uneven_batch(1000, rows=2, length=10)).loss.backward()
    assert not gc.isenabled()
