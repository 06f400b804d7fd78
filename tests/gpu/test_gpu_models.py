"""fasttune's owned forward on the GPU against transformers' own model (sdpa attention).

bf16 rule (DESIGN.md): fasttune in bf16 may be no worse than plain bf16 PyTorch. Both bf16 models, the
patched and the unpatched, are compared with the fp32 transformers model on the same GPU (TF32 off);
fasttune's error must stay within 1.5x transformers' error plus a small epsilon. In fp32 the patched
model must match transformers closely, and greedy generation must be token-identical.

Every test is marked `gpu` (skipped without CUDA). FASTTUNE_TEST_DEVICE=cpu runs the same checks on the
CPU, to debug the tests themselves without a GPU (pass `--confcutdir tests/gpu`, which keeps the
top-level conftest from skipping them).
"""

import copy
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny import FAMILY_CONFIGS, tiny_config  # noqa: E402

from fasttune.models import install_fast_forward  # noqa: E402

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("FASTTUNE_TEST_DEVICE", "cuda")
FAMILIES = sorted(FAMILY_CONFIGS)  # every family of tests/tiny.py

# "larger": GQA 8 query heads over 2 key/value heads, head_dim 64, four layers, seq 512.
LARGER = dict(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
SIZES = {"tiny": ({}, 64), "larger": (LARGER, 512)}
CASES = [(family, size) for size in SIZES for family in FAMILIES]

RATIO = 1.5  # fasttune's bf16 error may be this multiple of transformers' bf16 error ...
EPS = 1e-3  # ... plus this (relative error of a tensor)
FP32_TOL = 1e-4  # fasttune fp32 vs transformers fp32, relative


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 ground truths need real fp32 matmuls, not TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def config_for(family: str, size: str):
    overrides = dict(SIZES[size][0])
    if size == "larger" and family == "mistral":
        overrides["sliding_window"] = 128  # a window that cuts at seq 512
    config = tiny_config(family, **overrides)
    # SDPA cannot softcap attention logits: transformers' own model is only right on eager there
    config._attn_implementation = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
    return config


def reference_model(family: str, size: str, seed: int = 0):
    """The fp32 transformers model on DEVICE, with every weight perturbed (norms start at exactly 1)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(family, size), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.to(DEVICE).eval()


def patched(model):
    fast = copy.deepcopy(model)
    assert install_fast_forward(fast)
    return fast


def bf16(model):
    return copy.deepcopy(model).to(torch.bfloat16)


def rel(x, ref) -> float:
    x, ref = x.detach().float(), ref.detach().float()
    assert torch.isfinite(x).all(), "non-finite values"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_no_worse(fast_err: float, hf_err: float, what: str, ratio: float = RATIO, eps: float = EPS):
    assert fast_err <= ratio * hf_err + eps, (
        f"{what}: fasttune bf16 error {fast_err:.3e} > {ratio} x transformers bf16 error {hf_err:.3e} + {eps:g}"
    )


def random_batch(config, batch: int, seq: int):
    ids = torch.randint(3, config.vocab_size, (batch, seq), device=DEVICE)
    labels = ids.clone()
    labels[0, : seq // 4] = -100  # ignored targets, as a prompt mask makes them
    labels[-1, -seq // 8:] = -100
    return ids, labels


# ------------------------------------------------------------------------------------------------
# Logits and loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,size", CASES)
def test_logits_and_loss_bf16_no_worse_than_transformers(family, size):
    ref = reference_model(family, size)
    fast32 = patched(ref)
    hf16, fast16 = bf16(ref), patched(bf16(ref))
    ids, labels = random_batch(ref.config, 2, SIZES[size][1])
    with torch.no_grad():
        truth = ref(input_ids=ids, labels=labels, use_cache=False)
        f32 = fast32(input_ids=ids, labels=labels, use_cache=False)
        h16 = hf16(input_ids=ids, labels=labels, use_cache=False)
        f16 = fast16(input_ids=ids, labels=labels, use_cache=False)

    assert rel(f32.logits, truth.logits) <= FP32_TOL
    assert abs(f32.loss.item() - truth.loss.item()) <= FP32_TOL * abs(truth.loss.item())

    assert f16.logits.dtype == torch.bfloat16
    assert_no_worse(rel(f16.logits, truth.logits), rel(h16.logits, truth.logits), f"{family}/{size} logits")
    loss_ref = truth.loss.item()
    assert_no_worse(abs(f16.loss.item() - loss_ref), abs(h16.loss.item() - loss_ref), f"{family}/{size} loss",
                    eps=1e-3 * abs(loss_ref))


# ------------------------------------------------------------------------------------------------
# LoRA gradients
# ------------------------------------------------------------------------------------------------


def with_lora(model, seed: int = 1):
    """LoRA r=8 on all seven projections; B drawn small and non-zero so that A gets a gradient too."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return peft_model


def lora_grads(model, ids, labels) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert grads and all(g is not None for g in grads.values())
    return loss.item(), grads


@pytest.mark.parametrize("family,size", CASES)
def test_lora_gradients_bf16_no_worse_than_transformers(family, size):
    base = reference_model(family, size)
    hf_base, fast_base = copy.deepcopy(base), patched(base)
    truth_model = with_lora(base)
    fast32 = with_lora(copy.deepcopy(fast_base))
    hf16 = with_lora(hf_base).to(torch.bfloat16)
    fast16 = with_lora(fast_base).to(torch.bfloat16)
    for m in (fast32, hf16, fast16):  # identical adapters everywhere
        m.load_state_dict(truth_model.state_dict())
    ids, labels = random_batch(base.config, 2, SIZES[size][1])

    _, truth = lora_grads(truth_model, ids, labels)
    _, g32 = lora_grads(fast32, ids, labels)
    _, h16 = lora_grads(hf16, ids, labels)
    _, f16 = lora_grads(fast16, ids, labels)

    assert g32.keys() == truth.keys() == h16.keys() == f16.keys()
    worst32 = max(rel(g32[n], truth[n]) for n in truth)
    assert worst32 <= 10 * FP32_TOL, f"fp32 LoRA gradients differ from transformers by {worst32:.2e}"
    hf_errs = {n: rel(h16[n], truth[n]) for n in truth}
    fast_errs = {n: rel(f16[n], truth[n]) for n in truth}
    mean = lambda errs: sum(errs.values()) / len(errs)  # noqa: E731
    assert_no_worse(mean(fast_errs), mean(hf_errs), f"{family}/{size} mean LoRA-gradient error")
    # one adapter off by much more than rounding (a wrong layer) must not hide in the mean
    assert_no_worse(max(fast_errs.values()), max(hf_errs.values()), f"{family}/{size} worst LoRA-gradient error",
                    ratio=2.0, eps=5 * EPS)


# ------------------------------------------------------------------------------------------------
# Padded batches
# ------------------------------------------------------------------------------------------------


def padded_masks(batch: int, seq: int):
    real = [seq, seq - seq // 4, seq // 3][:batch]
    right = torch.zeros(batch, seq, dtype=torch.long)
    left = torch.zeros(batch, seq, dtype=torch.long)
    for row, n in enumerate(real):
        right[row, :n] = 1
        left[row, seq - n:] = 1
    return {"right": right.to(DEVICE), "left": left.to(DEVICE)}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family,size", CASES)
def test_padded_batch_forward(family, size, side):
    ref = reference_model(family, size)
    fast32 = patched(ref)
    hf16, fast16 = bf16(ref), patched(bf16(ref))
    seq = SIZES[size][1]
    ids = torch.randint(3, ref.config.vocab_size, (3, seq), device=DEVICE)
    mask = padded_masks(3, seq)[side]
    # transformers takes positions from the caller; both models get the positions a padded row really has
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    with torch.no_grad():
        truth = ref(**kw).logits[real]
        f32 = fast32(**kw).logits
        h16 = hf16(**kw).logits[real]
        f16 = fast16(**kw).logits[real]
        # a padded row's real tokens give what the same tokens give alone, without padding
        last = ids[2][real[2]][None]
        alone = fast32(input_ids=last, use_cache=False).logits[0]

    assert rel(f32[real], truth) <= FP32_TOL
    assert rel(f32[2][real[2]], alone) <= FP32_TOL
    assert_no_worse(rel(f16, truth), rel(h16, truth), f"{family}/{size} {side}-padded logits")


# ------------------------------------------------------------------------------------------------
# Greedy generation, fp32
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,size", [(f, "tiny") for f in FAMILIES] + [("llama3-rope", "larger"),
                                                                          ("mistral", "larger")])
def test_greedy_generation_fp32_token_identical(family, size):
    ref = reference_model(family, size)
    fast = patched(ref)
    vocab = ref.config.vocab_size
    prompt_len, new = (12, 40) if size == "tiny" else (160, 48)  # mistral/larger crosses its 128-token window
    one = torch.randint(3, vocab, (1, prompt_len), device=DEVICE)
    batch = torch.randint(3, vocab, (2, prompt_len), device=DEVICE)
    batch_mask = torch.ones_like(batch)
    batch_mask[1, : prompt_len // 3] = 0  # left padding, as batched generation pads
    batch = batch.masked_fill(batch_mask == 0, ref.config.pad_token_id)
    settings = dict(max_new_tokens=new, do_sample=False, pad_token_id=ref.config.pad_token_id,
                    eos_token_id=None)  # a random model may say EOS early; generate the full length
    with torch.no_grad():
        for ids, mask in ((one, torch.ones_like(one)), (batch, batch_mask)):
            expected = ref.generate(input_ids=ids, attention_mask=mask, **settings)
            got = fast.generate(input_ids=ids, attention_mask=mask, **settings)
            assert got.shape == expected.shape == (ids.shape[0], prompt_len + new)
            differ = (got != expected).nonzero()
            assert differ.numel() == 0, f"{family}/{size}: first differing (row, position) {differ[0].tolist()}"
