"""Full fine-tuning: every weight trains through fasttune's forward and losses.

Oracle: the unpatched transformers model with the same weights, whose autograd gives every
parameter's gradient (norms, embeddings, a tied or separate lm_head through the fused loss)."""

import math

import pytest
import torch
from test_training import MAX_LEN, train_steps, uneven_batch
from tiny import FAMILY_CONFIGS, tiny_pair

from fasttune import FastLanguageModel
from fasttune.models import install_fast_forward


def _all_grads(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        out[name] = p.grad.detach().clone()
    return out


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_every_gradient_matches_unpatched_transformers(name):
    ref, fast = tiny_pair(name)
    assert install_fast_forward(fast)
    batch = uneven_batch(128, rows=3, length=14)
    for model in (ref, fast):
        model.train()
        model.requires_grad_(True)
        model(**batch).loss.backward()
    want, got = _all_grads(ref), _all_grads(fast)
    assert got.keys() == want.keys()
    for key in want:
        scale = want[key].abs().max().item()
        if scale == 0:  # e.g. a padding row of the embedding: must stay exactly zero
            assert got[key].abs().max().item() == 0, key
            continue
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4 * scale, msg=lambda m, k=key: f"{k}: {m}")


def test_from_pretrained_full_finetuning(tiny_model_dir):
    model_dir = tiny_model_dir("llama", initializer_range=0.3)
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, full_finetuning=True, max_seq_length=MAX_LEN)
    # the 4-bit default is overridden, every weight trains, and get_peft_model leaves the model as it is
    assert all(p.requires_grad for p in model.parameters())
    assert FastLanguageModel.get_peft_model(model, r=8) is model
    assert model.dtype == torch.float32

    texts = ["The capital of France is Paris, and its river is the Seine.", "Two plus two makes four."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    losses = train_steps(model, {**enc, "labels": labels}, steps=8, lr=3e-3)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert set(changed) == set(before), f"weights that did not train: {set(before) - set(changed)}"


def test_full_finetuning_checkpointing_gives_the_same_gradients(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    batch = uneven_batch(1000, rows=3, length=14)
    grads = []
    for gc in (False, True):
        model, _ = FastLanguageModel.from_pretrained(
            model_dir, full_finetuning=True, max_seq_length=MAX_LEN, use_gradient_checkpointing=gc
        )
        model.train()
        model(**batch).loss.backward()
        grads.append(_all_grads(model))
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")


def test_full_finetuning_precision_choices(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    master, _ = FastLanguageModel.from_pretrained(model_dir, full_finetuning=True, dtype=torch.bfloat16)
    assert master.dtype == torch.float32  # fp32 master weights, hence fp32 optimizer states
    pure, _ = FastLanguageModel.from_pretrained(
        model_dir, full_finetuning=True, dtype=torch.bfloat16, float32_mixed_precision=False
    )
    assert pure.dtype == torch.bfloat16 and all(p.requires_grad for p in pure.parameters())
    with pytest.raises(ValueError, match="full_finetuning=True trains the weights"):
        FastLanguageModel.from_pretrained(model_dir, full_finetuning=True, load_in_8bit=True, load_in_4bit=False)
