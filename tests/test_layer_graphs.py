"""CUDA graphs for the offloaded layers' backward (fasttune/memory/layer_graphs.py) against the eager
backward of the same model: the same losses and gradients step after step, with gradient accumulation,
a changing input shape, two forwards before one backward, adapters frozen midway; and no graphs where a
replay could differ (padding masks). The gradient bookkeeping and the fingerprint are checked on the CPU."""

from __future__ import annotations

import pytest
import torch
from test_training import MAX_LEN, TARGETS, randomize_lora_b, uneven_batch

from fasttune import FastLanguageModel
from fasttune.memory import layer_graphs


def _model(model_dir, load_in_4bit=False, gc="unsloth", seed=3):
    model, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=load_in_4bit, max_seq_length=MAX_LEN * 4,
                                                 dtype=torch.float32, use_gradient_checkpointing=gc)
    peft = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                            use_gradient_checkpointing=gc, random_state=seed)
    randomize_lora_b(peft)
    return peft.cuda().train()


def _batch(length, rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (rows, length), generator=g).cuda()
    return {"input_ids": ids, "labels": ids}


def _train(model, plan, graphs: bool, monkeypatch, between=None):
    """Runs `plan` (per step: a list of batches whose losses are backpropagated one by one before the
    optimizer step, or a tuple of batches whose losses are summed first); returns the losses and the
    gradients of every step."""
    monkeypatch.setattr(layer_graphs, "_ENABLED", graphs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    losses, grads = [], []
    for step, batches in enumerate(plan):
        if between is not None:
            between(model, step)
        if isinstance(batches, tuple):
            loss = sum(model(**b).loss for b in batches)
            loss.backward()
            losses.append(loss.item())
        else:
            for b in batches:
                loss = model(**b).loss
                loss.backward()
                losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return losses, grads


def _assert_same(got, want):
    got_losses, got_grads = got
    want_losses, want_grads = want
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses), rtol=1e-5, atol=0)
    for step, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g.keys() == w.keys(), f"step {step}: gradients of {sorted(set(g) ^ set(w))}"
        for name, want in w.items():  # the attention backward on CUDA sums in a varying order
            torch.testing.assert_close(g[name], want, rtol=1e-4, atol=1e-4 * want.abs().max().item(),
                                       msg=lambda m, n=name, s=step: f"step {s}, {n}: {m}")


@pytest.fixture
def graph_stats(monkeypatch):
    monkeypatch.setattr(layer_graphs, "stats", dict.fromkeys(layer_graphs.stats, 0))
    return lambda: layer_graphs.stats


@pytest.mark.gpu
@pytest.mark.parametrize("load_in_4bit,park_up,gc", [(False, "0", "unsloth"), (True, "1", "unsloth"), (True, "0", True)])
def test_gpu_replayed_backward_gives_the_eager_gradients(tiny_model_dir, monkeypatch, graph_stats, load_in_4bit,
                                                         park_up, gc):
    """Steps with one batch, then two accumulated micro-batches (the replay adds into .grad), then an
    input shape the graphs have not seen (a new set, captured again), then the first shape again; with
    offloaded checkpointing (up_proj's output parked or not) and with plain recompute checkpointing."""
    monkeypatch.setenv("FASTTUNE_PARK_MLP_UP", park_up)
    model_dir = tiny_model_dir("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    a, b, c = _batch(64, seed=1), _batch(64, seed=2), _batch(32, seed=3)
    plan = [[a], [b], [a, b], [c], [c], [c], [a], [a]]
    want = _train(_model(model_dir, load_in_4bit, gc), plan, False, monkeypatch)
    assert graph_stats()["captures"] == 0
    got = _train(_model(model_dir, load_in_4bit, gc), plan, True, monkeypatch)
    _assert_same(got, want)
    stats = graph_stats()
    layers = 4
    # shape 64: eager (warm-up), captured in step 1, replayed after; shape 32, and 64 again, likewise
    assert stats["failed"] == 0, stats
    assert stats["captures"] == 3 * layers, stats
    assert stats["replays"] >= 5 * layers, stats
    assert layer_graphs.pool_bytes() > 0


@pytest.mark.gpu
def test_gpu_two_forwards_before_one_backward_and_frozen_adapters(tiny_model_dir, monkeypatch, graph_stats):
    """Two losses summed before one backward: the second forward must not use (or overwrite) what the
    first one's replays read, so it runs eagerly. Freezing adapters midway captures the layers again."""
    model_dir = tiny_model_dir("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    a, b = _batch(64, seed=1), _batch(64, seed=2)
    plan = [[a], [b], [a], (a, b), [b], [a], [b], [a]]

    def freeze_q(model, step):
        if step == 5:
            for name, p in model.named_parameters():
                if "q_proj.lora_A" in name:
                    p.requires_grad_(False)

    want = _train(_model(model_dir), plan, False, monkeypatch, between=freeze_q)
    got = _train(_model(model_dir), plan, True, monkeypatch, between=freeze_q)
    _assert_same(got, want)
    stats = graph_stats()
    assert stats["failed"] == 0 and stats["captures"] == 2 * 4, stats


@pytest.mark.gpu
def test_gpu_no_graphs_where_the_batch_is_padded(tiny_model_dir, monkeypatch, graph_stats):
    model_dir = tiny_model_dir("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    batch = {k: v.cuda() for k, v in uneven_batch(1000, rows=4, length=64).items()}
    _train(_model(model_dir), [[batch]] * 3, True, monkeypatch)
    assert graph_stats()["captures"] == graph_stats()["replays"] == graph_stats()["eager"] == 0


def test_replayed_gradients_go_to_grad_as_autograd_would():
    """Fresh gradients are copies (not the graph's buffers), existing ones are added to."""
    flat = torch.randn(10)
    views = [flat[:6].view(2, 3), flat[6:].view(4)]
    fresh, held = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))
    held.grad = torch.ones(4)
    layer_graphs._accumulate([fresh, held], views)
    want_fresh, want_held = views[0].clone(), views[1] + 1
    flat.zero_()  # the next replay overwrites the buffers: the gradients must not change
    torch.testing.assert_close(fresh.grad, want_fresh, rtol=0, atol=0)
    torch.testing.assert_close(held.grad, want_held, rtol=0, atol=0)


def test_fingerprint_follows_what_a_capture_bakes_in(tiny_model_dir):
    """Trainability, adapter scaling, adapters switched off and replaced weights each change it."""
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=False, max_seq_length=MAX_LEN)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=TARGETS, random_state=3)
    layer = model.base_model.model.model.layers[0]
    q = layer.self_attn.q_proj
    before = layer_graphs.fingerprint(layer)
    assert layer_graphs.fingerprint(layer) == before
    changes = [
        lambda: q.lora_A["default"].weight.requires_grad_(False),
        lambda: q.scaling.update(default=0.5),
        lambda: setattr(q, "_disable_adapters", True),  # the flag under PEFT's disable_adapter() context
        lambda: setattr(q.lora_B["default"], "weight", torch.nn.Parameter(q.lora_B["default"].weight.clone())),
    ]
    for change in changes:
        change()
        now = layer_graphs.fingerprint(layer)
        assert now != before
        before = now


def test_no_graphs_off_the_gpu(tiny_model_dir, graph_stats):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=False, max_seq_length=MAX_LEN,
                                                 use_gradient_checkpointing="unsloth")
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=TARGETS, use_gradient_checkpointing="unsloth")
    ids = torch.randint(3, 1000, (2, 16))
    for _ in range(3):
        model.train()(input_ids=ids, labels=ids).loss.backward()
    assert graph_stats() == dict.fromkeys(graph_stats(), 0)
