"""fasttune's owned forward against transformers' own model (the oracle), in fp32."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import FAMILY_CONFIGS, tiny_pair

from fasttune.models import FAMILIES, install_fast_forward
from fasttune.models.llama import causal_lm_forward

FAMILIES_UNDER_TEST = sorted(FAMILY_CONFIGS)
ATOL = 1e-4


def patched_pair(name, **overrides):
    ref, fast = tiny_pair(name, **overrides)
    assert install_fast_forward(fast)
    return ref, fast


def test_every_family_has_a_tiny_config():
    assert {FAMILY_CONFIGS[n].get("model_type") for n in FAMILY_CONFIGS} == set(FAMILIES)


@pytest.mark.parametrize("name", FAMILIES_UNDER_TEST)
def test_patch_replaces_the_forward_chain(name):
    _, fast = patched_pair(name)
    assert fast.forward.__func__ is causal_lm_forward
    assert fast.model.forward.__func__ is not type(fast.model).forward
    assert type(fast).__name__.endswith("ForCausalLM")  # still the real transformers class


@pytest.mark.parametrize("name", FAMILIES_UNDER_TEST)
def test_logits_and_loss_match_transformers(name):
    ref, fast = patched_pair(name)
    ids = torch.randint(3, 128, (3, 17))
    labels = ids.clone()
    labels[0, :6] = -100
    labels[2, 9:] = -100
    with torch.no_grad():
        a = ref(input_ids=ids, labels=labels)
        b = fast(input_ids=ids, labels=labels)
    assert (a.logits - b.logits).abs().max() <= ATOL
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", FAMILIES_UNDER_TEST)
def test_right_and_left_padding_match_transformers(name):
    ref, fast = patched_pair(name)
    ids = torch.randint(3, 128, (3, 12))
    for mask in (
        torch.tensor([[1] * 12, [1] * 8 + [0] * 4, [1] * 3 + [0] * 9]),  # right padding (training)
        torch.tensor([[1] * 12, [0] * 4 + [1] * 8, [0] * 9 + [1] * 3]),  # left padding (generation)
    ):
        # transformers takes positions from the caller; give both the positions a padded row really has
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            a = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            b = fast(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        assert (a - b)[real].abs().max() <= ATOL
        assert torch.isfinite(b).all()


@pytest.mark.parametrize("name", FAMILIES_UNDER_TEST)
def test_incremental_decoding_with_cache_matches_full_forward(name):
    _, fast = patched_pair(name)
    ids = torch.randint(3, 128, (2, 15))
    with torch.no_grad():
        full = fast(input_ids=ids, use_cache=False).logits
        out = fast(input_ids=ids[:, :9], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(9, 15):
            out = fast(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= ATOL


def test_mistral_sliding_window_is_applied():
    """Past the window, the owned forward must differ from full attention and match transformers."""
    ref, fast = patched_pair("mistral", sliding_window=4)
    _, no_window = patched_pair("mistral", sliding_window=None)
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        a, b, c = ref(input_ids=ids).logits, fast(input_ids=ids).logits, no_window(input_ids=ids).logits
    assert (a - b).abs().max() <= ATOL
    assert (b[:, :4] - c[:, :4]).abs().max() <= ATOL  # inside the window nothing changes
    assert (b[:, 4:] - c[:, 4:]).abs().max() > 1e-3


def test_qwen2_sliding_layers_follow_layer_types():
    ref, fast = patched_pair("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1)
    assert fast.model._fasttune_state.windows == [None, 3]
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        assert (ref(input_ids=ids).logits - fast(input_ids=ids).logits).abs().max() <= ATOL


def test_packed_rows_attend_within_each_document():
    _, fast = patched_pair("llama")
    doc_a, doc_b = torch.randint(3, 128, (1, 7)), torch.randint(3, 128, (1, 5))
    packed = torch.cat((doc_a, doc_b), dim=1)
    pos = torch.cat((torch.arange(7), torch.arange(5)))[None]
    with torch.no_grad():
        together = fast(input_ids=packed, position_ids=pos).logits
        apart = torch.cat((fast(input_ids=doc_a).logits, fast(input_ids=doc_b).logits), dim=1)
    assert (together - apart).abs().max() <= ATOL


def test_llama3_rope_scaling_changes_the_result():
    """The llama3 frequencies are really used (the equivalence above would also pass if both ignored them)."""
    _, scaled = patched_pair("llama3-rope")
    _, plain = patched_pair("llama", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    plain.load_state_dict(scaled.state_dict())
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        assert (scaled(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max() > 1e-3


def test_hidden_states_and_logits_to_keep():
    ref, fast = patched_pair("qwen3")
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        a = ref(input_ids=ids, output_hidden_states=True)
        b = fast(input_ids=ids, output_hidden_states=True)
        last = fast(input_ids=ids, logits_to_keep=1).logits
    assert len(a.hidden_states) == len(b.hidden_states)
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert (x - y).abs().max() <= ATOL
    assert last.shape[1] == 1 and (last[:, 0] - b.logits[:, -1]).abs().max() <= ATOL


def test_bad_inputs_fail_clearly():
    _, fast = patched_pair("llama")
    ids = torch.randint(3, 128, (1, 5))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        fast()
    with pytest.raises(ValueError, match="attention_mask covers 3 positions"):
        fast(input_ids=ids, attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="output_attentions"):
        fast(input_ids=ids, output_attentions=True)


def test_inputs_embeds_path_matches_input_ids():
    _, fast = patched_pair("llama")
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        a = fast(input_ids=ids).logits
        b = fast(inputs_embeds=fast.model.embed_tokens(ids)).logits
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M-Instruct
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager").eval()
    fast = copy.deepcopy(ref)
    assert install_fast_forward(fast)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.pad_token = tok.pad_token or "<|endoftext|>"  # older transformers read no pad token from this dir
    return ref, fast, tok


def test_real_smollm2_logits_loss_and_lora_gradients(smollm2_pair):
    from peft import LoraConfig, get_peft_model

    ref, fast, tok = smollm2_pair
    text = ["The capital of France is Paris, and the capital of Italy is Rome.", "def add(a, b):\n    return a + b"]
    batch = tok(text, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        a = ref(**batch, labels=labels)
        b = fast(**batch, labels=labels)
    real = batch.attention_mask.bool()
    assert (a.logits - b.logits)[real].abs().max() <= ATOL
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-4, atol=0)

    grads = []
    for model in (copy.deepcopy(ref), copy.deepcopy(fast)):
        torch.manual_seed(1)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        peft_model(**batch, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 3 * 30 * 2
    for n in grads[0]:  # "relative" as a norm: element-wise ratios of near-cancelling sums are noise
        assert (grads[1][n] - grads[0][n]).norm() <= 1e-4 * grads[0][n].norm(), n


def test_real_smollm2_knows_paris(smollm2_pair):
    """A sanity check on the converted weights themselves, independent of transformers."""
    _, fast, tok = smollm2_pair
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        tokenize=False, add_generation_prompt=True,
    )
    ids = tok(prompt, return_tensors="pt").input_ids
    out = fast.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_loss_matches_plain_pytorch_cross_entropy():
    _, fast = patched_pair("llama")
    ids = torch.randint(3, 128, (2, 11))
    labels = ids.clone()
    labels[1, :4] = -100
    with torch.no_grad():
        out = fast(input_ids=ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)


def test_training_loss_forms_no_logits_and_matches_the_logits_path():
    """With labels in training, the loss comes from the chunked fused path (no logits returned); it
    equals the loss over the logits the eval path returns, gradients included."""
    _, fast = patched_pair("gemma2")  # final-logit softcap: the fused path must apply it too
    ids = torch.randint(3, 128, (2, 13))
    labels = ids.clone()
    labels[0, :5] = -100
    fast.train()
    out = fast(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    fused_grad = fast.lm_head.weight.grad.clone()
    fast.zero_grad()
    logits = fast(input_ids=ids).logits  # no labels: the logits path
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 128).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=0)
    assert (fused_grad - fast.lm_head.weight.grad).norm() <= 1e-4 * fast.lm_head.weight.grad.norm()
