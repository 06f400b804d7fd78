"""Generation through the owned forward: greedy tokens identical to transformers' own model (fp32),
sampling identical under the same seed, streaming, and left-padded batches equal to single prompts."""

import pytest
import torch
from tiny import FAMILY_CONFIGS, tiny_pair
from transformers import TextStreamer

from fasttune import FastLanguageModel
from fasttune.models import install_fast_forward


def patched_pair(name, **overrides):
    ref, fast = tiny_pair(name, **overrides)
    assert install_fast_forward(fast)
    return ref, fast


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_greedy_tokens_identical_to_transformers(name):
    # mistral's window is 6 tokens: 30 new tokens run well past it
    ref, fast = patched_pair(name)
    prompt = torch.randint(3, 128, (1, 7))
    a = ref.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=0)
    b = fast.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8, temperature=1.3), dict(min_p=0.1)],
    ids=["temperature", "top_k", "top_p", "min_p"],
)
def test_sampling_identical_to_transformers_under_one_seed(settings):
    ref, fast = patched_pair("llama")
    prompt = torch.randint(3, 128, (2, 5))
    outs = []
    for model in (ref, fast):
        torch.manual_seed(1234)
        outs.append(model.generate(prompt, max_new_tokens=20, do_sample=True, pad_token_id=0, **settings))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(99)
    other = fast.generate(prompt, max_new_tokens=20, do_sample=True, pad_token_id=0, **settings)
    assert not torch.equal(other, outs[1])  # really sampling, not greedy


def test_left_padded_batch_equals_each_prompt_alone(smollm2_dir):
    model, tok = FastLanguageModel.from_pretrained(smollm2_dir, load_in_4bit=False, max_seq_length=256)
    FastLanguageModel.for_inference(model)
    assert tok.padding_side == "left"
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("Name a colour.", "What is two plus two? Explain your answer in detail, step by step please.")
    ]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()
    together = model.generate(**batch, max_new_tokens=12, do_sample=False)
    for i, prompt in enumerate(prompts):
        single = tok(prompt, return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=12, do_sample=False)[0, single.input_ids.shape[1]:]
        got = together[i, batch.input_ids.shape[1]:]
        n = min(len(alone), len(got))
        assert n > 0 and torch.equal(got[:n], alone[:n]), i


def test_text_streamer_prints_the_generated_text(smollm2_dir, capsys):
    model, tok = FastLanguageModel.from_pretrained(smollm2_dir, load_in_4bit=False, max_seq_length=256)
    FastLanguageModel.for_inference(model)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    capsys.readouterr()
    out = model.generate(**ids, streamer=TextStreamer(tok, skip_prompt=True), max_new_tokens=10, do_sample=False)
    printed = capsys.readouterr().out
    expected = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert printed.strip() and printed.strip() == expected.strip()


def test_greedy_on_real_weights_matches_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    model, tok = FastLanguageModel.from_pretrained(smollm2_dir, load_in_4bit=False, max_seq_length=256)
    FastLanguageModel.for_inference(model)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Write a haiku about the sea."}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    a = ref.generate(**ids, max_new_tokens=24, do_sample=False)
    b = model.generate(**ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(a, b)


def test_generate_on_a_peft_model_uses_the_adapter(tiny_model_dir):
    model, tok = FastLanguageModel.from_pretrained(tiny_model_dir("qwen3"), load_in_4bit=False, max_seq_length=128)
    prompt = tok("hello world", return_tensors="pt")
    before = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    model = FastLanguageModel.get_peft_model(model, r=4)
    FastLanguageModel.for_inference(model)
    same = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(before, same)  # LoRA B starts at zero
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    after = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert not torch.equal(before, after)


def test_the_cache_is_taken_under_either_name():
    """transformers 5.25 renamed the forward's `past_key_values` to `cache` (generate passes `cache=`):
    a prefill then one step through the cache, under either name, gives the logits of the whole sequence."""
    from transformers import DynamicCache

    _, fast = patched_pair("llama")
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        want = fast(input_ids=ids).logits[:, -1]
        for name in ("cache", "past_key_values"):
            cache = DynamicCache(config=fast.config)
            fast(input_ids=ids[:, :-1], use_cache=True, **{name: cache})
            got = fast(input_ids=ids[:, -1:], use_cache=True, **{name: cache}).logits[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="not both"):
            fast(input_ids=ids, cache=DynamicCache(config=fast.config), past_key_values=DynamicCache(config=fast.config))
