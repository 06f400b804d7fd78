"""Offloaded gradient checkpointing (fasttune/memory/offload.py) against the same model without any
checkpointing: loss and every trained gradient equal, each layer recomputed once, dropout masks repeated.
On a CPU the layer inputs have nowhere cheaper to go, so the tests switch the offloading path on for CPU
tensors (the "host copy" is then a clone); the GPU test measures the memory it saves."""

from __future__ import annotations

import pytest
import torch
from test_training import MAX_LEN, TARGETS, grads_of, randomize_lora_b, uneven_batch

from fasttune import FastLanguageModel
from fasttune.memory import offload
from fasttune.memory.checkpointing import checkpoint_mode
from fasttune.models import fast_state


def _model(model_dir, gc, dropout=0.0, full=False, dtype=None):
    model, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False, max_seq_length=MAX_LEN, dtype=dtype,
                                                 full_finetuning=full, use_gradient_checkpointing=gc)
    if full:
        return model.train()
    peft = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=dropout,
                                            use_gradient_checkpointing=gc, random_state=3)
    randomize_lora_b(peft)
    return peft.train()


def _all_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(got: dict, want: dict) -> None:
    """Every gradient equal to fp32 rounding, relative to its tensor's scale."""
    for name in want:
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6 * max(scale, 1e-30),
                                   msg=lambda m, n=name: f"{n}: {m}")


def _run(model, batch, seed=11):
    torch.manual_seed(seed)  # the dropout masks
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), _all_grads(model)


@pytest.fixture
def offload_on_cpu(monkeypatch):
    monkeypatch.setattr(offload, "OFFLOAD_CPU_TENSORS", True)
    copies = []
    original = offload._to_host

    def counting(hidden, slot, owner):
        copies.append(slot)
        return original(hidden, slot, owner)

    monkeypatch.setattr(offload, "_to_host", counting)
    return copies


@pytest.mark.parametrize("dropout, full", [(0.0, False), (0.1, False), (0.0, True)])
def test_offloaded_checkpointing_gives_the_gradients_of_no_checkpointing(tiny_model_dir, offload_on_cpu, dropout, full):
    model_dir = tiny_model_dir("llama")
    batch = uneven_batch(1000, rows=3, length=14)
    want_loss, want = _run(_model(model_dir, False, dropout, full), batch)
    model = _model(model_dir, "unsloth", dropout, full)
    assert fast_state(model).gradient_checkpointing == "offload"
    got_loss, got = _run(model, batch)
    layers = model.config.num_hidden_layers
    # every layer's input and its residual stream between attention and MLP went to the host, once, but the
    # top layer's: its backward comes first, and its input stays on the GPU
    assert offload_on_cpu == [slot for i in range(layers - 1) for slot in (i, (i, 1))]
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    assert got.keys() == want.keys() and got
    assert_same_grads(got, want)
    if not full:
        assert grads_of(model)  # the adapters trained


@pytest.mark.parametrize("gc", [True, "unsloth"])
def test_recompute_skips_the_matmuls_that_only_feed_the_residual_stream(tiny_model_dir, offload_on_cpu, monkeypatch, gc):
    """The recompute never computes down_proj's base matmul (the layer's output is not needed) and, when
    the forward parked the mid-layer residual (offloaded mode), not o_proj's either; the gradients are
    still those of no checkpointing."""
    from fasttune.lora import functions

    model_dir = tiny_model_dir("llama")
    batch = uneven_batch(1000, rows=3, length=14)
    want_loss, want = _run(_model(model_dir, False), batch)
    model = _model(model_dir, gc)
    phantoms = []
    original = functions._phantom
    monkeypatch.setattr(functions, "_phantom", lambda *a: phantoms.append(a[1]) or original(*a))
    got_loss, got = _run(model, batch)
    layers = model.config.num_hidden_layers
    # offloaded: down_proj and o_proj in every layer but the top one (not offloaded: nothing parked there)
    assert len(phantoms) == (layers if gc is True else 2 * layers - 1)
    assert set(phantoms) == {model.config.hidden_size}  # o_proj's and down_proj's outputs
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    assert_same_grads(got, want)


def test_parking_up_proj_output_skips_its_recompute(tiny_model_dir, offload_on_cpu, monkeypatch):
    """FASTTUNE_PARK_MLP_UP: the forward parks up_proj's output beside the layer input and the mid-layer
    residual; the recompute takes it back and computes only up's adapter input term; gradients unchanged."""
    from fasttune.lora import functions
    from fasttune.models import llama

    model_dir = tiny_model_dir("llama")
    batch = uneven_batch(1000, rows=3, length=14)
    want_loss, want = _run(_model(model_dir, False), batch)
    monkeypatch.setenv("FASTTUNE_PARK_MLP_UP", "1")
    model = _model(model_dir, "unsloth")
    assert fast_state(model).park_mlp_up
    phantoms, weights_read = [], []
    original, original_dense = functions._phantom, functions.dense_weight
    monkeypatch.setattr(functions, "_phantom", lambda *a: phantoms.append(a[1]) or original(*a))
    monkeypatch.setattr(functions, "dense_weight", lambda w, d: weights_read.append(w) or original_dense(w, d))
    got_loss, got = _run(model, batch)
    cfg = model.config
    top = cfg.num_hidden_layers - 1  # not offloaded: nothing parked, o_proj and up_proj recomputed
    assert offload_on_cpu == [slot for i in range(top) for slot in (i, (i, 1), (i, 2))]
    # per offloaded layer: o_proj and down_proj skip their base matmul in the recompute...
    assert phantoms == [cfg.hidden_size] * (2 * top + 1)
    # ...and up_proj (parked) runs no matmul of its own there: its weight is read by the forward and the
    # backward only, gate_proj's by the recompute as well
    for i, layer in enumerate(model.base_model.model.model.layers):
        mlp = layer.mlp
        reads = [sum(w is m.base_layer.weight for w in weights_read) for m in (mlp.gate_proj, mlp.up_proj)]
        assert reads == ([3, 2] if i < top else [3, 3])
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    assert got.keys() == want.keys() and got
    assert_same_grads(got, want)


def test_parking_up_proj_by_default_where_the_matmuls_hide_the_copy(monkeypatch):
    """The default: the real Llama-3.1-8B shape parks up_proj's output (measured faster on the H100), the
    Llama-3.2-1B shape does not (its forward is too short to hide the copy); the variable overrides both."""
    from transformers import LlamaConfig

    from fasttune.models.llama import parks_mlp_up

    monkeypatch.delenv("FASTTUNE_PARK_MLP_UP", raising=False)
    llama_8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    llama_1b = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8)
    assert parks_mlp_up(llama_8b, 128) and not parks_mlp_up(llama_1b, 64)
    monkeypatch.setenv("FASTTUNE_PARK_MLP_UP", "0")
    assert not parks_mlp_up(llama_8b, 128)
    monkeypatch.setenv("FASTTUNE_PARK_MLP_UP", "1")
    assert parks_mlp_up(llama_1b, 64) == 1.0
    monkeypatch.setenv("FASTTUNE_PARK_MLP_UP", "0.75")
    assert parks_mlp_up(llama_1b, 64) == 0.75
    monkeypatch.setenv("FASTTUNE_PARK_MLP_UP", "1.5")
    with pytest.raises(ValueError, match="FASTTUNE_PARK_MLP_UP='1.5'"):
        parks_mlp_up(llama_1b, 64)


@pytest.mark.parametrize("share, layers", [(0.0, []), (1.0, list(range(8))), (0.75, [1, 2, 3, 5, 6, 7]),
                                           (0.5, [1, 3, 5, 7])])
def test_a_share_of_layers_parks_up_proj_spread_evenly(share, layers):
    from fasttune.models.llama import parks_up_in_layer

    assert [i for i in range(8) if parks_up_in_layer(share, i)] == layers


def test_offloaded_checkpointing_refuses_autograd_grad(tiny_model_dir, offload_on_cpu):
    model = _model(tiny_model_dir("llama"), "unsloth")
    loss = model(**uneven_batch(1000, rows=2, length=10)).loss
    params = [p for p in model.parameters() if p.requires_grad]
    # the layers' parameters are not in the outer graph (their gradients accumulate inside the backward), so
    # torch refuses rather than return wrong gradients
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(loss, params)


def test_checkpoint_modes(monkeypatch, tiny_model_dir):
    assert checkpoint_mode(True) == "recompute" and checkpoint_mode(False) is False
    assert checkpoint_mode("unsloth") == checkpoint_mode("fasttune") == "offload"
    monkeypatch.setenv("FASTTUNE_OFFLOAD_CHECKPOINTS", "0")
    assert checkpoint_mode("unsloth") == "recompute"
    monkeypatch.delenv("FASTTUNE_OFFLOAD_CHECKPOINTS")
    model = _model(tiny_model_dir("llama"), "unsloth")
    FastLanguageModel.for_training(model)  # True there means "on": the offloaded kind chosen earlier stays
    assert fast_state(model).gradient_checkpointing == "offload"
    FastLanguageModel.for_training(model, use_gradient_checkpointing=False)
    assert fast_state(model).gradient_checkpointing is False


@pytest.mark.gpu
def test_gpu_offloading_saves_the_layer_inputs(tiny_model_dir):
    model_dir = tiny_model_dir("llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=8)
    batch = {k: v.cuda() for k, v in uneven_batch(1000, rows=4, length=512).items()}
    peaks, grads = {}, {}
    for gc in (True, "unsloth"):  # fp32 (the GPU default is bf16): run-to-run noise far below the tolerance
        model = _model(model_dir, gc, dtype=torch.float32).cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, grads[gc] = _run(model, batch)
        torch.cuda.synchronize()
        peaks[gc] = torch.cuda.max_memory_allocated() - base
        del model
    for name, want in grads[True].items():  # the attention backward on CUDA sums in a varying order
        torch.testing.assert_close(grads["unsloth"][name], want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    layer_input = 4 * 512 * 512 * 4  # rows x length x hidden, fp32 on this test's model
    # the layer inputs of all but the top layer and the layer being recomputed left the GPU
    assert peaks[True] - peaks["unsloth"] >= 0.5 * 7 * layer_input, peaks


@pytest.mark.gpu
def test_gpu_parked_up_proj_output_gives_the_recompute_gradients(tiny_model_dir, monkeypatch):
    """up_proj's output parked in pinned memory and copied back (the path Llama-8B-sized layers take by
    default): the gradients of plain recompute checkpointing."""
    model_dir = tiny_model_dir("llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=4)
    batch = {k: v.cuda() for k, v in uneven_batch(1000, rows=4, length=256).items()}
    want_loss, want = _run(_model(model_dir, True, dtype=torch.float32).cuda(), batch)
    monkeypatch.setenv("FASTTUNE_PARK_MLP_UP", "1")
    model = _model(model_dir, "unsloth", dtype=torch.float32).cuda()
    assert fast_state(model).park_mlp_up and fast_state(model).gradient_checkpointing == "offload"
    got_loss, got = _run(model, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    for name, w in want.items():  # the attention backward on CUDA sums in a varying order
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


@pytest.mark.gpu
def test_gpu_two_forwards_before_one_backward(tiny_model_dir):
    """Two losses summed before one backward: the second forward must not overwrite the first one's
    parked layer inputs (pooled host buffers), and the prefetched copies must be the right ones."""
    model_dir = tiny_model_dir("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    first = {k: v.cuda() for k, v in uneven_batch(1000, rows=2, length=64).items()}
    second = {k: v.cuda() for k, v in uneven_batch(2000, rows=2, length=64).items()}
    grads = {}
    for gc in (False, "unsloth"):
        model = _model(model_dir, gc).cuda()
        for _ in range(2):  # the second step reuses the pooled buffers
            model.zero_grad(set_to_none=True)
            (model(**first).loss + model(**second).loss).backward()
        grads[gc] = _all_grads(model)
        del model
    for name, want in grads[False].items():
        torch.testing.assert_close(grads["unsloth"][name], want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_recompute_reuses_the_forwards_fusion_decision(tiny_model_dir, monkeypatch):
    """The checkpoint recompute takes the forward's fused-or-not decision (ForwardContext.fused) instead
    of inspecting the modules again: one inspection per projection group (q/k/v, o, MLP) and layer."""
    import fasttune.models.llama as llama

    model = _model(tiny_model_dir("llama"), True)
    calls = []
    original = llama.lora_projections

    def counting(*modules, **kw):
        calls.append(len(modules))
        return original(*modules, **kw)

    monkeypatch.setattr(llama, "lora_projections", counting)
    loss, grads = _run(model, uneven_batch(1000, rows=2, length=12))
    assert all(g.abs().max() > 0 for g in grads.values())
    assert sorted(calls) == sorted([3, 1, 3] * model.config.num_hidden_layers)
