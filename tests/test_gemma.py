"""Gemma, Gemma 2, Gemma 3: what the family-parametrized tests elsewhere do not cover — bounded
caches on sliding layers, and the real Gemma 3 270M weights (logits against transformers, a short
LoRA run, merged against adapter)."""

import copy

import pytest
import torch
from tiny import tiny_pair

from fasttune import FastLanguageModel
from fasttune.demo import load_split
from fasttune.models import install_fast_forward


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_sliding_layers_keep_a_bounded_cache_past_the_window(name):
    ref, fast = tiny_pair(name)
    assert install_fast_forward(fast)
    window = fast.config.sliding_window
    prompt = torch.randint(3, 128, (1, 4))
    out = fast.generate(prompt, max_new_tokens=4 * window, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(out.sequences, ref.generate(prompt, max_new_tokens=4 * window, do_sample=False, pad_token_id=0))
    cache = out.past_key_values
    total = out.sequences.shape[1] - 1
    kinds = fast.config.layer_types
    for idx, kind in enumerate(kinds):
        length = cache.layers[idx].keys.shape[-2]
        if kind == "sliding_attention":
            assert length < window, (idx, length)  # a sliding layer never holds more than its window
        else:
            assert length == total  # a global layer keeps everything


def test_gemma_softcaps_are_applied():
    """Gemma 2's caps change the result (so the equivalence tests exercise them) and bound the logits."""
    _, capped = tiny_pair("gemma2")
    _, plain = tiny_pair("gemma2", attn_logit_softcapping=None, final_logit_softcapping=None)
    for model in (capped, plain):
        assert install_fast_forward(model)
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        a, b = capped(input_ids=ids).logits, plain(input_ids=ids).logits
    assert a.abs().max() < capped.config.final_logit_softcapping
    assert (a - b).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# Real weights: Gemma 3 270M (base model)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_pair(gemma3_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32, attn_implementation="eager").eval()
    fast = copy.deepcopy(ref)
    assert install_fast_forward(fast)
    return ref, fast, AutoTokenizer.from_pretrained(gemma3_dir)


def test_real_gemma3_logits_match_transformers(gemma3_pair):
    ref, fast, tok = gemma3_pair
    assert type(fast).__name__ == "Gemma3ForCausalLM"
    # longer than the 512-token sliding window, so local and global layers really differ
    text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 45)
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.shape[1] > fast.config.sliding_window
    with torch.no_grad():
        a = ref(input_ids=ids, labels=ids)
        b = fast(input_ids=ids, labels=ids)
    assert (a.logits - b.logits).abs().max() <= 1e-4 * max(1.0, a.logits.abs().max().item())
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-4, atol=0)


def _date_examples(tok, split: str, n: int):
    rows = load_split(split)[:n]
    texts = [f"{r['messages'][0]['content']}\nAnswer: {r['messages'][1]['content']}{tok.eos_token}" for r in rows]
    prompts = [f"{r['messages'][0]['content']}\nAnswer:" for r in rows]
    return texts, prompts


def _loss(model, tok, texts, prompts):
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    for i, prompt in enumerate(prompts):  # loss on the answer only
        labels[i, : len(tok(prompt).input_ids)] = -100
    return model(**batch, labels=labels).loss


def test_real_gemma3_lora_learns_and_merges(gemma3_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = FastLanguageModel.from_pretrained(gemma3_dir, load_in_4bit=False, max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    train_texts, train_prompts = _date_examples(tok, "train", 64)
    test_texts, test_prompts = _date_examples(tok, "test", 16)
    with torch.no_grad():
        before = _loss(model, tok, test_texts, test_prompts).item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(8):
        sl = slice(8 * step, 8 * step + 8)
        _loss(model, tok, train_texts[sl], train_prompts[sl]).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = _loss(model, tok, test_texts, test_prompts).item()
    assert after < 0.7 * before, (before, after)

    FastLanguageModel.for_inference(model)
    prompt = tok(test_prompts[0], return_tensors="pt")
    adapter_tokens = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    model.save_pretrained_merged(tmp_path / "merged", tok, save_method="merged_16bit")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert torch.equal(merged.generate(**prompt, max_new_tokens=8, do_sample=False), adapter_tokens)


@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3"])
def test_from_pretrained_loads_each_gemma_family(tiny_model_dir, name):
    """Through the user's path (transformers has no SDPA attention for Gemma 2: the loader must not ask
    for one), with LoRA training and the merged export."""
    model, tok = FastLanguageModel.from_pretrained(tiny_model_dir(name), load_in_4bit=False, max_seq_length=64)
    assert model.forward.__func__.__name__ == "causal_lm_forward"
    model = FastLanguageModel.get_peft_model(model, r=4)
    ids = tok(["a short example", "and another one here"], return_tensors="pt", padding=True)
    out = model(**ids, labels=ids.input_ids.masked_fill(ids.attention_mask == 0, -100))
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
