"""Training with fasttune: loss, LoRA gradients, accumulation, checkpointing, packing and the trainers.

Every check has an oracle that does not go through fasttune's code path: one big batch for gradient
accumulation, the run without checkpointing for the run with it, F.cross_entropy written out here and
the unpatched transformers model for the loss, documents run one by one for a packed row.
All on CPU in fp32 with tiny random models.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import FAMILY_CONFIGS, tiny_pair

from fasttune import FastLanguageModel
from fasttune.models import install_fast_forward

FAMILIES_UNDER_TEST = sorted(FAMILY_CONFIGS)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_LEN = 64


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def lora_params(model) -> dict:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def base_params(model) -> dict:
    return {n: p for n, p in model.named_parameters() if "lora_" not in n}


def randomize_lora_b(model, seed: int = 1) -> None:
    """PEFT starts lora_B at zero, which leaves lora_A without gradient; give every B the same small
    random values (by name, so that two models with the same adapters end up identical)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(lora_params(model).items()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def lora_model(model_dir: str, gc=False, randomize: bool = True):
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False, max_seq_length=MAX_LEN)
    peft_model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, target_modules=TARGETS, use_gradient_checkpointing=gc, random_state=3407
    )
    if randomize:
        randomize_lora_b(peft_model)
    peft_model.train()
    return peft_model, tokenizer


def grads_of(model) -> dict:
    out = {}
    for name, p in lora_params(model).items():
        assert p.grad is not None, f"{name} got no gradient"
        out[name] = p.grad.detach().clone()
    return out


def zero_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def assert_grads_close(actual: dict, expected: dict, rtol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = expected[name].abs().max().item()
        assert scale > 0, f"{name}: the oracle gradient is all zero, the comparison would prove nothing"
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def train_steps(model, batch: dict, steps: int, lr: float) -> list:
    """`steps` AdamW steps (no weight decay) on the parameters that require grad; the losses before each step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def reference_loss(logits, labels, num_items_in_batch=None):
    """The causal-LM loss written out: position t predicts label t+1, -100 is ignored."""
    vocab = logits.shape[-1]
    flat_logits = logits[:, :-1].reshape(-1, vocab).float()
    flat_targets = labels[:, 1:].reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
    return F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="sum") / num_items_in_batch


# A short trainer run on the CPU that writes, reports and prints nothing, the same every time.
QUIET_CPU_RUN = dict(report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
# Six logged steps at a constant, large learning rate: enough for the adapters to visibly train.
SHORT_RUN = dict(max_steps=6, learning_rate=2e-2, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                 **QUIET_CPU_RUN)


def without_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def count_targets(labels) -> torch.Tensor:
    return (labels[:, 1:] != -100).sum()


# Six rows whose numbers of real targets differ a lot between consecutive pairs (the micro-batches of
# size 2): masked prompt prefixes of different lengths, and right padding on one row.
_PROMPT_LENS = [1, 12, 3, 14, 0, 7]
_PAD = 2  # right padding on row 2 (row 1 of a two-row batch); row 3 has no real target at all


def uneven_batch(vocab: int, rows: int = 6, length: int = 16, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=gen)
    attention_mask = torch.ones_like(ids)
    labels = ids.clone()
    for row, n in enumerate(_PROMPT_LENS[:rows]):
        labels[row, :n] = -100
    padded = min(2, rows - 1)
    attention_mask[padded, -_PAD:] = 0
    labels[padded, -_PAD:] = -100
    return {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}


def rows_of(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


@pytest.fixture
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama")


# --------------------------------------------------------------------------------------------
# Loss and LoRA gradients against the unpatched transformers model, every family
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES_UNDER_TEST)
def test_loss_and_lora_gradients_match_unpatched_transformers(name):
    from peft import LoraConfig, get_peft_model

    ref, fast = tiny_pair(name)
    assert install_fast_forward(fast)
    batch = uneven_batch(128, rows=3, length=14)  # 14 > mistral's window of 6
    labels = batch["labels"]
    n_real = count_targets(labels)
    n_items = n_real + 9  # as if other micro-batches held 9 more targets

    with torch.no_grad():
        fast_out = fast(**batch)
        ref_out = ref(**batch)
        fast_sum = fast(**batch, num_items_in_batch=n_items)
        ref_sum = ref(**batch, num_items_in_batch=n_items)
    # Against the loss written out here, on fasttune's own logits ...
    torch.testing.assert_close(fast_out.loss, reference_loss(fast_out.logits, labels), rtol=1e-6, atol=0)
    torch.testing.assert_close(fast_sum.loss, reference_loss(fast_sum.logits, labels, n_items), rtol=1e-6, atol=0)
    # ... and against transformers' own model and loss.
    torch.testing.assert_close(fast_out.loss, ref_out.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(fast_sum.loss, ref_sum.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(fast_sum.loss, fast_out.loss * n_real / n_items, rtol=1e-5, atol=0)

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    torch.manual_seed(1)
    ref_peft = get_peft_model(ref, config)
    torch.manual_seed(1)
    fast_peft = get_peft_model(fast, config)
    for model in (ref_peft, fast_peft):
        randomize_lora_b(model)
        model.train()
    assert lora_params(ref_peft).keys() == lora_params(fast_peft).keys()
    for name_, p in lora_params(ref_peft).items():
        assert torch.equal(p, lora_params(fast_peft)[name_])

    ref_loss = ref_peft(**batch, num_items_in_batch=n_items).loss
    fast_loss = fast_peft(**batch, num_items_in_batch=n_items).loss
    ref_loss.backward()
    fast_loss.backward()
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-4, atol=0)
    assert_grads_close(grads_of(fast_peft), grads_of(ref_peft), rtol=1e-4)
    assert all(p.grad is None for p in base_params(fast_peft).values())


def test_loss_with_no_real_target_is_zero_under_num_items(llama_dir):
    """A micro-batch that is all prompt contributes nothing (and no NaN) when num_items_in_batch is given."""
    model, _ = lora_model(llama_dir)
    batch = uneven_batch(model.config.vocab_size, rows=2)
    batch["labels"][:] = -100
    loss = model(**batch, num_items_in_batch=torch.tensor(17)).loss
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(g).all() and not g.any() for g in grads_of(model).values())


# --------------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------------


def test_gradient_accumulation_equals_one_big_batch(llama_dir):
    model, _ = lora_model(llama_dir)
    batch = uneven_batch(model.config.vocab_size)
    micro = [rows_of(batch, i, i + 2) for i in (0, 2, 4)]
    counts = [count_targets(m["labels"]).item() for m in micro]
    assert len(set(counts)) == 3, counts  # uneven, or the test could not tell the two normalizations apart

    big = model(**batch).loss
    big.backward()
    big_grads = grads_of(model)
    # In training with labels fasttune forms no logits; ask for them without labels for the oracle.
    torch.testing.assert_close(big, reference_loss(model(**without_labels(batch)).logits, batch["labels"]), rtol=1e-6, atol=0)

    zero_grads(model)
    n_items = count_targets(batch["labels"])
    total = 0.0
    for m in micro:
        loss = model(**m, num_items_in_batch=n_items).loss
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, big.detach(), rtol=1e-5, atol=0)
    assert_grads_close(grads_of(model), big_grads, rtol=1e-5)

    # The same with a plain int, as some loops pass it.
    zero_grads(model)
    for m in micro:
        model(**m, num_items_in_batch=int(n_items)).loss.backward()
    assert_grads_close(grads_of(model), big_grads, rtol=1e-5)

    # Sanity of the oracle: averaging per-micro-batch means (the classic accumulation bug) is measurably wrong here.
    zero_grads(model)
    for m in micro:
        (model(**m).loss / len(micro)).backward()
    naive = grads_of(model)
    worst = max(((naive[k] - big_grads[k]).abs().max() / big_grads[k].abs().max()).item() for k in big_grads)
    assert worst > 1e-2


def _trainer_step(model_dir, tmp_path, batch_size, accumulation):
    """One SGD step of transformers.Trainer over the six rows of uneven_batch; returns the gradients it
    applied, the LoRA weights after the step, its reported loss and the trainer."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, _ = lora_model(model_dir)
    batch = uneven_batch(model.config.vocab_size)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]

    seen = {}

    class GrabGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen.update(grads_of(model))

    args = TrainingArguments(
        output_dir=str(tmp_path / f"bs{batch_size}-ga{accumulation}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: the step is exactly -lr * gradient
        logging_strategy="no",
        **QUIET_CPU_RUN,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=lambda items: {k: torch.stack([it[k] for it in items]) for k in items[0]},
        callbacks=[GrabGradients()],
    )
    result = trainer.train()
    after = {k: v.detach().clone() for k, v in lora_params(model).items()}
    return seen, after, result.training_loss, trainer


def test_trainer_gradient_accumulation_equals_one_big_batch(llama_dir, tmp_path):
    big_grads, big_after, big_loss, big_trainer = _trainer_step(llama_dir, tmp_path, batch_size=6, accumulation=1)
    acc_grads, acc_after, acc_loss, acc_trainer = _trainer_step(llama_dir, tmp_path, batch_size=2, accumulation=3)
    # The Trainer passes num_items_in_batch only to a model whose forward accepts loss kwargs.
    assert big_trainer.model_accepts_loss_kwargs and acc_trainer.model_accepts_loss_kwargs

    # Oracle: the mean loss of all six rows, computed by hand on a fresh copy of the same model.
    model, _ = lora_model(llama_dir)
    batch = uneven_batch(model.config.vocab_size)
    expected = reference_loss(model(**without_labels(batch)).logits, batch["labels"])
    expected.backward()
    oracle = grads_of(model)

    assert math.isclose(big_loss, expected.item(), rel_tol=1e-5)
    assert math.isclose(acc_loss, expected.item(), rel_tol=1e-5)
    assert_grads_close(big_grads, oracle, rtol=1e-5)
    assert_grads_close(acc_grads, oracle, rtol=1e-5)
    assert_grads_close(acc_after, big_after, rtol=1e-5)
    before = lora_params(model)
    assert any(not torch.equal(big_after[k], before[k]) for k in before)


# --------------------------------------------------------------------------------------------
# Gradient checkpointing
# --------------------------------------------------------------------------------------------


def _layers(peft_model):
    return peft_model.get_base_model().model.layers


def _forward_backward_counting_mlp_calls(model, batch):
    """Loss, LoRA gradients, and how many times each decoder layer's MLP ran during forward + backward."""
    calls = [0] * len(_layers(model))
    hooks = []
    for i, layer in enumerate(_layers(model)):
        def hook(module, args, i=i):
            calls[i] += 1
        # A pre-hook: torch's non-reentrant recompute stops early, once the last tensor backward needs is
        # back, which is inside down_proj (lora_B's input), before a forward hook on it would fire.
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    try:
        zero_grads(model)
        loss = model(**batch).loss
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return loss.detach(), grads_of(model), calls


@pytest.mark.parametrize("mode", [True, "unsloth", "fasttune"])
def test_gradient_checkpointing_recomputes_each_layer_with_the_same_gradients(llama_dir, mode):
    plain, _ = lora_model(llama_dir, gc=False)
    ckpt, _ = lora_model(llama_dir, gc=mode)
    batch = uneven_batch(plain.config.vocab_size, rows=3)

    loss0, grads0, calls0 = _forward_backward_counting_mlp_calls(plain, batch)
    loss1, grads1, calls1 = _forward_backward_counting_mlp_calls(ckpt, batch)
    assert calls0 == [1] * len(calls0)  # off: one forward per layer, nothing recomputed
    assert calls1 == [2] * len(calls1)  # on: the backward recomputes every layer once
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    assert_grads_close(grads1, grads0, rtol=1e-5)

    # No recompute where there is no backward (evaluation), and for_training(..., False) turns it off.
    with torch.no_grad():
        calls = [0]
        h = _layers(ckpt)[0].mlp.down_proj.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        ckpt(**batch)
        h.remove()
    assert calls == [1]
    FastLanguageModel.for_training(ckpt, use_gradient_checkpointing=False)
    assert _forward_backward_counting_mlp_calls(ckpt, batch)[2] == [1] * len(calls1)
    FastLanguageModel.for_training(ckpt, use_gradient_checkpointing=mode)
    assert _forward_backward_counting_mlp_calls(ckpt, batch)[2] == [2] * len(calls1)


def test_get_peft_model_returns_a_model_in_one_consistent_mode(llama_dir):
    """The PeftModel's own `training` flag and its modules' must agree: a model that says it trains while its
    decoder runs in eval mode silently skips checkpointing (and LoRA dropout) in a plain training loop."""
    model, _ = FastLanguageModel.from_pretrained(llama_dir, load_in_4bit=False, max_seq_length=MAX_LEN)
    peft_model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing="unsloth")
    in_eval = sorted(n for n, m in peft_model.named_modules() if m.training != peft_model.training)
    assert not in_eval, f"PeftModel.training={peft_model.training} but {len(in_eval)} modules differ, e.g. {in_eval[:3]}"


def test_unknown_checkpointing_mode_is_refused(llama_dir):
    model, _ = FastLanguageModel.from_pretrained(llama_dir, load_in_4bit=False, max_seq_length=MAX_LEN)
    with pytest.raises(ValueError, match="use_gradient_checkpointing"):
        FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing="offload-to-moon")


# --------------------------------------------------------------------------------------------
# Packed sequences
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES_UNDER_TEST)
def test_packed_row_logits_match_documents_run_separately(name):
    _, fast = tiny_pair(name)
    assert install_fast_forward(fast)
    fast.train()  # the training path: no cache
    doc_a, doc_b = torch.randint(3, 128, (1, 5)), torch.randint(3, 128, (1, 9))  # 9 > mistral's window
    packed = torch.cat((doc_a, doc_b), dim=1)
    positions = torch.cat((torch.arange(5), torch.arange(9)))[None]
    with torch.no_grad():
        apart_a = fast(input_ids=doc_a).logits
        apart_b = fast(input_ids=doc_b).logits
        for mask in (None, torch.ones_like(packed)):  # padding-free collators may or may not send a mask
            together = fast(input_ids=packed, attention_mask=mask, position_ids=positions).logits
            torch.testing.assert_close(together[:, :5], apart_a, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(together[:, 5:], apart_b, rtol=1e-5, atol=1e-5)


def test_packed_row_trains_like_its_documents(llama_dir):
    """Loss and LoRA gradients of one packed row (position_ids restarting, the boundary label ignored, as
    DataCollatorWithFlattening makes it) equal those of the documents as separate examples, with checkpointing on."""
    model, _ = lora_model(llama_dir, gc="fasttune")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(5)
    docs = [torch.randint(3, vocab, (1, n), generator=gen) for n in (7, 11, 4)]
    n_items = sum(d.shape[1] - 1 for d in docs)

    total = 0.0
    for d in docs:
        loss = model(input_ids=d, labels=d, num_items_in_batch=n_items).loss
        loss.backward()
        total = total + loss.detach()
    apart = grads_of(model)

    zero_grads(model)
    packed = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    labels = torch.cat([torch.cat((torch.tensor([[-100]]), d[:, 1:]), dim=1) for d in docs], dim=1)
    assert count_targets(labels).item() == n_items
    together = model(input_ids=packed, position_ids=positions, labels=labels).loss
    together.backward()
    torch.testing.assert_close(together.detach(), total, rtol=1e-5, atol=0)
    assert_grads_close(grads_of(model), apart, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# A plain training loop
# --------------------------------------------------------------------------------------------


def test_plain_loop_lowers_loss_and_trains_only_the_adapters(tiny_model_dir):
    # Larger random weights than the other tests use: with initializer_range=0.02 the frozen lm_head's logits
    # span only a couple of nats, so no adapter could lower the loss much.
    model_dir = tiny_model_dir("llama", initializer_range=0.3)
    model, tokenizer = lora_model(model_dir, gc="fasttune", randomize=False)  # PEFT's own init: B = 0
    texts = ["The capital of France is Paris, and its river is the Seine.", "Two plus two makes four."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)

    base_before = {n: p.detach().clone() for n, p in base_params(model).items()}
    lora_before = {n: p.detach().clone() for n, p in lora_params(model).items()}
    assert not any(p.requires_grad for p in base_params(model).values())
    assert all(p.requires_grad for p in lora_params(model).values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_params(model).values()}

    losses = train_steps(model, {**enc, "labels": labels}, steps=20, lr=1e-2)

    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.25 * losses[0], losses
    for n, p in base_params(model).items():
        assert not p.requires_grad and p.grad is None, n
        assert torch.equal(p, base_before[n]), f"base weight {n} changed"
    for n, p in lora_params(model).items():
        assert not torch.equal(p, lora_before[n]), f"LoRA weight {n} did not train"


# --------------------------------------------------------------------------------------------
# trl.SFTTrainer and transformers.Trainer
# --------------------------------------------------------------------------------------------


def _logged_losses(trainer) -> list:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _assert_trained(trainer, model, base_before) -> None:
    losses = _logged_losses(trainer)
    assert len(losses) >= 4, trainer.state.log_history
    assert all(math.isfinite(x) for x in losses), losses
    assert min(losses[-2:]) < losses[0], losses
    for n, p in base_params(model).items():
        assert torch.equal(p, base_before[n]), f"base weight {n} changed"


_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Blue is one."}],
    [{"role": "user", "content": "How many legs has a spider?"}, {"role": "assistant", "content": "Eight legs."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}],
]
_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The Seine flows through the middle of Paris.",
]


@pytest.mark.parametrize("kind", ["messages", "text", "packed-text"])
def test_sft_trainer_trains_a_fasttune_peft_model(llama_dir, tmp_path, kind):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = lora_model(llama_dir, gc="unsloth", randomize=False)
    if kind == "messages":
        dataset = Dataset.from_dict({"messages": _CHATS * 2})
    else:
        dataset = Dataset.from_dict({"text": _TEXTS * 2})
    base_before = {n: p.detach().clone() for n, p in base_params(model).items()}
    config = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        per_device_train_batch_size=2,
        max_length=MAX_LEN,
        packing=kind.startswith("packed"),
        bf16=False,
        fp16=False,
        **SHORT_RUN,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    _assert_trained(trainer, model, base_before)


def test_hf_trainer_with_language_modeling_collator(llama_dir, tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model, tokenizer = lora_model(llama_dir, gc=True, randomize=False)
    dataset = Dataset.from_dict({"text": _TEXTS * 3}).map(
        lambda ex: tokenizer(ex["text"], truncation=True, max_length=MAX_LEN), batched=True, remove_columns=["text"]
    )
    base_before = {n: p.detach().clone() for n, p in base_params(model).items()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        **SHORT_RUN,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    _assert_trained(trainer, model, base_before)
