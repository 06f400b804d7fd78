"""The data path: ShareGPT standardization, response-only labels, padding-free packing, load-time fixes.

Oracles: assistant spans found by rendering each conversation prefix with and without its answer (not by
the markers that train_on_responses_only searches for); per-token cross-entropy of each document run
alone, written out with F.cross_entropy; the untrained rows' mean computed here in plain torch.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from fasttune import FastLanguageModel
from fasttune.chat_templates import (
    PackingCollator,
    ensure_generation_prompt,
    fix_untrained_tokens,
    get_chat_template,
    standardize_sharegpt,
    to_sharegpt,
    train_on_responses_only,
)
from fasttune.data.chat_templates import link_model
from fasttune.data.responses_only import _mask_by_tokens, resolve_parts, response_mask, response_only_labels

CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, on the Tiber."},
        {"role": "user", "content": "Spell it backwards."},
        {"role": "assistant", "content": "emoR"},
    ],
    [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "one two three"},
    ],
    [
        {"role": "user", "content": "Say hello twice."},
        {"role": "assistant", "content": "hello\nhello"},
        {"role": "user", "content": "Now once."},
        {"role": "assistant", "content": "hello"},
    ],
]


# --------------------------------------------------------------------------------------------
# ShareGPT
# --------------------------------------------------------------------------------------------


def test_standardize_sharegpt_maps_aliases_to_role_content():
    from datasets import Dataset

    rows = {"conversations": [
        [{"from": "system", "value": "s"}, {"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}],
        [{"from": "user", "value": "u2"}, {"from": "assistant", "value": "a2"}],
    ], "id": [1, 2]}
    out = standardize_sharegpt(Dataset.from_dict(rows))
    assert out["conversations"][0] == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert out["conversations"][1] == [{"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
    assert out["id"] == [1, 2]
    already = standardize_sharegpt(out)
    assert already["conversations"] == out["conversations"]


def test_standardize_sharegpt_lists_and_unknown_roles():
    convs = [[{"from": "customer", "value": "hi"}, {"from": "bot", "value": "hello"}]]
    assert standardize_sharegpt(convs, aliases={"customer": "user"}) == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    with pytest.raises(ValueError, match="customer"):
        standardize_sharegpt(convs)


def test_to_sharegpt_merges_columns_and_extends_conversations():
    from datasets import Dataset

    data = Dataset.from_dict({
        "instruction": ["Add", "Negate", "Double"],
        "input": ["1 and 2", "", "4"],
        "output": ["3", "0", "8"],
    })
    out = to_sharegpt(data, merged_prompt="{instruction}[[\nInput: {input}]]", output_column_name="output")
    assert out.column_names == ["conversations"]
    assert out["conversations"][0] == [{"from": "human", "value": "Add\nInput: 1 and 2"}, {"from": "gpt", "value": "3"}]
    assert out["conversations"][1][0] == {"from": "human", "value": "Negate"}  # empty input: section dropped
    longer = to_sharegpt(data, merged_column_name="instruction", conversation_extension=3, remove_unused_columns=False)
    assert all(len(c) == 6 for c in longer["conversations"]) and "input" in longer.column_names
    firsts = [c[:2] for c in longer["conversations"]]
    assert firsts[2] == [{"from": "human", "value": "Double"}, {"from": "gpt", "value": "8"}]
    standardized = standardize_sharegpt(longer)
    assert {m["role"] for c in standardized["conversations"] for m in c} == {"user", "assistant"}


# --------------------------------------------------------------------------------------------
# Response-only labels
# --------------------------------------------------------------------------------------------


@pytest.fixture
def smol(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.eos_token = "<|im_end|>"  # SmolLM2's own; transformers 5.17 reads the GGUF's as <|im_start|>
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


FAMILY_SPECIALS = {
    "llama-3.1": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
    "gemma3": ["<start_of_turn>", "<end_of_turn>"],
    "phi-4": ["<|im_sep|>"],
}


def expected_trained(tokenizer, messages, last_only=False) -> list[bool]:
    """Tokens inside an answer or its end-of-turn token. The answer of turn i starts where the rendering
    of messages[:i] with a generation prompt ends, and runs to the first end-of-turn token in the
    rendering of messages[:i+1]."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        assert full.startswith(prompt) and turn.startswith(prompt)
        end = turn.index(tokenizer.eos_token, len(prompt)) + len(tokenizer.eos_token)
        spans.append((len(prompt), end))
    if last_only:
        spans = spans[-1:]
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return [any(s <= a and b <= e for s, e in spans) for a, b in enc["offset_mapping"]]


def tokenized(tokenizer, messages) -> list[int]:
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


TEMPLATE_CASES = [("chatml", False), ("llama-3.1", False), ("llama-3.1", True), ("gemma3", True), ("mistral", False),
                  ("phi-4", True), ("zephyr", False), ("alpaca", False), ("vicuna", False)]


@pytest.mark.parametrize("last_only", [False, True], ids=["all", "last"])
@pytest.mark.parametrize("name,specials", TEMPLATE_CASES, ids=[f"{n}{'+specials' if s else ''}" for n, s in TEMPLATE_CASES])
def test_response_mask_covers_exactly_the_answers(smol, name, specials, last_only):
    if specials:  # the family's markers as single tokens, as in its own tokenizer
        smol.add_special_tokens({"additional_special_tokens": FAMILY_SPECIALS[name]})
    get_chat_template(smol, name)
    parts = resolve_parts(smol, None, None)
    for messages in CONVERSATIONS:
        if name == "mistral" and messages[0]["role"] == "system":
            messages = messages[1:]  # keep the turns alternating from the first
        ids = tokenized(smol, messages)
        expected = expected_trained(smol, messages, last_only)
        assert sum(expected) > 0
        assert response_mask(smol, ids, parts, last_only) == expected
        assert _mask_by_tokens(smol, ids, parts, last_only) == expected  # the fallback agrees here


def test_truncated_and_packed_rows(smol):
    get_chat_template(smol, "chatml")
    parts = resolve_parts(smol, None, None)
    docs = [tokenized(smol, m) for m in CONVERSATIONS]
    masks = [expected_trained(smol, m) for m in CONVERSATIONS]
    for cut in range(1, len(docs[0]) + 1, 3):  # a row cut anywhere keeps exactly its part of the answers
        got = response_only_labels(smol, docs[0][:cut], parts=parts)
        assert got == [t if m else -100 for t, m in zip(docs[0][:cut], masks[0][:cut])]
    row = sum(docs, [])
    got = response_only_labels(smol, row, seq_lengths=[len(d) for d in docs], parts=parts)
    assert got == [t if m else -100 for d, mk in zip(docs, masks) for t, m in zip(d, mk)]
    # The packed row's own labels stay -100 where they were.
    old = list(row)
    old[5] = -100
    assert response_only_labels(smol, row, old, [len(d) for d in docs], parts)[5] == -100


def test_missing_markers_fail_loudly(smol):
    from datasets import Dataset

    get_chat_template(smol, "chatml")

    class Holder:
        processing_class = smol
        train_dataset = Dataset.from_dict({"input_ids": [smol("plain text, no turns")["input_ids"]]})
        eval_dataset = None
        data_collator = None

    with pytest.raises(ValueError, match="response marker"):
        train_on_responses_only(Holder())
    with pytest.raises(NotImplementedError, match="force_match"):
        train_on_responses_only(Holder(), force_match=False)


def test_hf_trainer_collator_keeps_the_masked_labels(smol, tiny_model_dir, tmp_path):
    """transformers' language-modeling collator rebuilds labels from input_ids; it is swapped for one that
    pads the masked labels."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    get_chat_template(smol, "chatml")
    rows = [tokenized(smol, m) for m in CONVERSATIONS]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=3, report_to=[],
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows}),
                      data_collator=DataCollatorForLanguageModeling(smol, mlm=False))
    train_on_responses_only(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    got = sorted(tuple(x for x in row.tolist() if x != -100) for row in batch["labels"])
    expected = sorted(tuple(t for t, m in zip(r, expected_trained(smol, c)) if m) for r, c in zip(rows, CONVERSATIONS))
    assert got == expected
    labels_of = train_on_responses_only(None, tokenizer=smol, return_function=True)
    assert labels_of({"input_ids": rows[:1]})["labels"][0] == [
        t if m else -100 for t, m in zip(rows[0], expected_trained(smol, CONVERSATIONS[0]))]


def sft_config(tmp_path, **overrides):
    from trl import SFTConfig

    settings = dict(
        output_dir=str(tmp_path / "sft"), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
        max_length=128, bf16=False, fp16=False, report_to=[], save_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0, logging_steps=1,
    )
    settings.update(overrides)
    return SFTConfig(**settings)


@pytest.mark.parametrize("packing", [False, True], ids=["rows", "packed"])
def test_sft_trainer_labels_after_train_on_responses_only(smol, tiny_model_dir, tmp_path, packing):
    from datasets import Dataset
    from trl import SFTTrainer

    get_chat_template(smol, "llama-3.1")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    sharegpt = [[{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                 for m in conv] for conv in CONVERSATIONS]
    dataset = standardize_sharegpt(Dataset.from_dict({"conversations": sharegpt * 2}))
    dataset = dataset.rename_column("conversations", "messages")
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path, packing=packing, max_length=512), train_dataset=dataset,
                         processing_class=smol)
    assert train_on_responses_only(trainer) is trainer

    by_ids = {tuple(tokenized(smol, m)): expected_trained(smol, m) for m in CONVERSATIONS}
    seen = 0
    for row in trainer.train_dataset:
        lengths = row.get("seq_lengths") or [len(row["input_ids"])]
        start = 0
        for n in lengths:
            ids, labels = row["input_ids"][start : start + n], row["labels"][start : start + n]
            mask = by_ids[tuple(ids)]
            assert labels == [t if m else -100 for t, m in zip(ids, mask)]
            start += n
            seen += 1
    assert seen == 2 * len(CONVERSATIONS)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] != -100).sum() > 0


# --------------------------------------------------------------------------------------------
# Packing: each document's loss terms are exactly those it has alone
# --------------------------------------------------------------------------------------------


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position that has a target (labels shifted by one), in order."""
    logits, labels = logits[0, :-1].float(), labels[0, 1:]
    keep = labels != -100
    return F.cross_entropy(logits[keep], labels[keep], reduction="none")


def documents(n_docs=3, vocab=49152, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = [7, 12, 4, 9][:n_docs]
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def assert_packed_equals_unpacked(model, batch, docs):
    with torch.no_grad():
        # transformers' own forward looks for packed rows only without a KV cache; TRL's trainer passes
        # use_cache=False itself, fasttune's collator puts it in the batch
        packed = model(**{"use_cache": False, **batch})
        apart = [model(input_ids=torch.tensor([d])).logits for d in docs]
    expected = [per_token_losses(logits, torch.tensor([d])) for logits, d in zip(apart, docs)]
    row_losses = []
    for r in range(batch["input_ids"].shape[0]):
        row_losses.append(per_token_losses(packed.logits[r : r + 1], batch["labels"][r : r + 1]))
    torch.testing.assert_close(torch.cat(row_losses), torch.cat(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.loss, torch.cat(expected).mean(), rtol=1e-5, atol=1e-5)


def fasttune_model(model_dir):
    model, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False, dtype=torch.float32)
    return model.eval()


def test_packing_collator_layout():
    collator = PackingCollator(pad_token_id=0, max_length=16, pad_to_multiple_of=8)
    batch = collator([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9, 10, 11], "labels": [-100, 9, 10, 11]},
                      {"input_ids": list(range(20, 32))}])
    # No attention_mask: documents are told apart by their positions.
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"} and batch["use_cache"] is False
    assert batch["input_ids"].shape == (2, 16)
    assert batch["position_ids"][0, :7].tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert batch["labels"][0, :7].tolist() == [-100, 6, 7, -100, 9, 10, 11]
    assert batch["labels"][0, 7:].eq(-100).all() and batch["input_ids"][0, 7:].eq(0).all()
    assert batch["position_ids"][1, :12].tolist() == list(range(12))
    split = PackingCollator()([{"input_ids": [1, 2, 3, 4, 5], "seq_lengths": [2, 3]}])
    assert split["position_ids"].tolist() == [[0, 1, 0, 1, 2]] and split["labels"].tolist() == [[-100, 2, -100, 4, 5]]


def test_packed_loss_equals_unpacked_fasttune_forward(tiny_model_dir):
    model = fasttune_model(tiny_model_dir("llama"))
    docs = documents(4)
    assert_packed_equals_unpacked(model, PackingCollator()([{"input_ids": d} for d in docs]), docs)
    # Several rows with padding: pad tokens are documents of their own and carry no label.
    batch = PackingCollator(max_length=20, pad_to_multiple_of=8)([{"input_ids": d} for d in docs])
    assert batch["input_ids"].shape[0] > 1
    assert_packed_equals_unpacked(model, batch, docs)


def test_packed_loss_equals_unpacked_transformers_forward(tiny_model_dir):
    """The collator also serves models that run on transformers' own forward."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), attn_implementation="sdpa").train()
    docs = documents(3)
    batch = PackingCollator()([{"input_ids": d} for d in docs])
    with torch.no_grad():
        packed = model(**batch).logits  # the batch as a Trainer passes it, nothing added
        for start, doc in zip((0, 7, 19), docs):
            alone = model(input_ids=torch.tensor([doc]), use_cache=False).logits
            torch.testing.assert_close(packed[:, start : start + len(doc)], alone, rtol=1e-5, atol=1e-5)
    assert_packed_equals_unpacked(model.eval(), batch, docs)


def test_trl_padding_free_batches_through_fasttune_forward(tiny_model_dir):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = fasttune_model(tiny_model_dir("llama"))
    docs = documents(3)
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    packed_example = {"input_ids": sum(docs, []), "seq_lengths": [len(d) for d in docs]}
    for examples in ([{"input_ids": d} for d in docs], [packed_example]):
        batch = collator(examples)
        assert "attention_mask" not in batch
        assert_packed_equals_unpacked(model, batch, docs)


def test_sft_trainer_packing_batch_loss_equals_unpacked(smol, tiny_model_dir, tmp_path):
    from datasets import Dataset
    from trl import SFTTrainer

    get_chat_template(smol, "chatml")
    model = fasttune_model(tiny_model_dir("llama"))
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path, packing=True, per_device_train_batch_size=1),
                         train_dataset=Dataset.from_dict({"messages": CONVERSATIONS}), processing_class=smol)
    batch = next(iter(trainer.get_train_dataloader()))
    positions = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    assert len(starts) - 1 == len(CONVERSATIONS)  # every conversation in one row
    ids = batch["input_ids"][0].tolist()
    docs = [ids[a:b] for a, b in zip(starts, starts[1:])]
    assert_packed_equals_unpacked(model.eval(), {k: v for k, v in batch.items()}, docs)


# --------------------------------------------------------------------------------------------
# After training with the template, generation stops at its end-of-turn token
# --------------------------------------------------------------------------------------------


def test_generation_after_training_stops_at_the_end_of_turn(smol, tiny_model_dir, tmp_path):
    """The notebook path: template, SFTTrainer's tokenized data, response-only labels, training, generate."""
    from datasets import Dataset
    from trl import SFTTrainer

    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama", initializer_range=0.3), load_in_4bit=False,
                                                 dtype=torch.float32)
    link_model(model, smol)  # what from_pretrained does for its own tokenizer
    get_chat_template(smol, "gemma3")  # <end_of_turn> is not in SmolLM2's vocabulary: the EOS is renamed
    stop = smol.eos_token_id
    chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there, friend"}]
    trainer = SFTTrainer(model=model, train_dataset=Dataset.from_dict({"messages": [chat] * 2}), processing_class=smol,
                         args=sft_config(tmp_path))
    train_on_responses_only(trainer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["labels"][0].ne(-100).sum() == len(smol("Hi there, friend")["input_ids"]) + 1  # answer + stop

    # The trainer's batch, trained with a few plain steps (the trainer's own loop is tested elsewhere; on
    # two busy cores its per-step overhead dominates). Frozen embeddings keep it to the tiny layers.
    model.get_input_embeddings().weight.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(15):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    FastLanguageModel.for_inference(model)
    prompt = smol.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    inputs = smol(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=30, do_sample=False)[0, inputs["input_ids"].shape[1] :].tolist()
    answer = smol("Hi there, friend", add_special_tokens=False)["input_ids"]
    assert out == answer + [stop]  # the answer, the end-of-turn token, and nothing after it


# --------------------------------------------------------------------------------------------
# Load-time fixes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_untrained_rows_become_the_mean_of_trained_rows(smol, tiny_model_dir, tied):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama", tie_word_embeddings=tied))
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        emb[[5, 7]] = 0
        head[[7, 9]] = 0
    before_emb, before_head = emb.detach().clone(), head.detach().clone()
    fixed = fix_untrained_tokens(model, smol)
    assert fixed == [5, 7, 9]
    for before, weight, bad in ((before_emb, emb, [5, 7, 9] if tied else [5, 7]),
                                (before_head, head, [5, 7, 9] if tied else [7, 9])):
        keep = torch.ones(before.shape[0], dtype=torch.bool)
        keep[bad] = False
        mean = before[keep].double().mean(0).float()
        for row in bad:
            torch.testing.assert_close(weight[row], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weight[keep], before[keep], rtol=0, atol=0)
    assert fix_untrained_tokens(model, smol) == []


def test_generation_prompt_added_where_missing(smol):
    get_chat_template(smol, "chatml")
    complete = smol.chat_template
    smol.chat_template = complete.replace("{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}", "")
    assert smol.chat_template != complete
    user = [{"role": "user", "content": "Hi"}]
    assert ensure_generation_prompt(smol) is True
    assert smol.apply_chat_template(user, tokenize=False, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert ensure_generation_prompt(smol) is False  # already there


@pytest.mark.parametrize("name", ["phi-4", "mistral"])
def test_generation_prompt_left_alone_where_the_template_opens_the_answer(smol, name):
    get_chat_template(smol, name)
    before = smol.chat_template
    assert ensure_generation_prompt(smol) is False and smol.chat_template == before
