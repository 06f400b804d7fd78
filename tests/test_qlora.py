"""4- and 8-bit base weights through FastLanguageModel: loading, forward, QLoRA training, saving.

Oracles: the same model in 16/32 bits with its projection weights replaced by the dequantized values
(so the quantized forward must equal a plain dense forward), 16-bit LoRA training from the same start
(QLoRA must train about as well), and plain transformers loading what fasttune saved."""

import copy
import json
import math

import pytest
import torch
from test_training import MAX_LEN, TARGETS, randomize_lora_b, train_steps, uneven_batch

from fasttune import FastLanguageModel
from fasttune.quant.linear import QuantLinear
from fasttune.quant.nf4 import NF4Tensor

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _dense_twin(quantized, dense):
    """`dense` with every projection weight set to what `quantized` dequantizes to."""
    twin = copy.deepcopy(dense)
    q_modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in twin.named_modules():
            if name.split(".")[-1] in PROJECTIONS:
                module.weight.copy_(q_modules[name].dequantize(torch.float32))
    return twin


# from_pretrained arguments -> (format, fp8 granularity, bound on max |W_q - W| / max |W|)
LOADS = {
    "nf4": ({"load_in_4bit": True}, "nf4", None, 0.2),
    "int8": ({"load_in_4bit": False, "load_in_8bit": True}, "int8", None, 0.02),
    "fp8-row": ({"load_in_fp8": True}, "fp8", "row", 0.04),
    "fp8-block": ({"load_in_fp8": "block"}, "fp8", "block", 0.04),
}


@pytest.mark.parametrize("load", sorted(LOADS))
def test_quantized_model_computes_what_its_dequantized_weights_give(tiny_model_dir, load):
    kw, fmt, granularity, bound = LOADS[load]
    model_dir = tiny_model_dir("llama")
    dense, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False, max_seq_length=MAX_LEN)
    quant, _ = FastLanguageModel.from_pretrained(model_dir, max_seq_length=MAX_LEN, **kw)
    kinds = {name.split(".")[-1]: type(m) for name, m in quant.named_modules()}
    for proj in PROJECTIONS:
        assert kinds[proj] is QuantLinear
    assert type(quant.lm_head) is torch.nn.Linear and type(quant.model.embed_tokens) is torch.nn.Embedding
    layers = [m for m in quant.modules() if isinstance(m, QuantLinear)]
    assert all(m.fmt == fmt and m.granularity == granularity for m in layers)
    # the quantization is close to the weights it came from (the format tests check it bit by bit)
    w = dense.model.layers[0].mlp.down_proj.weight
    err = (quant.model.layers[0].mlp.down_proj.dequantize(torch.float32) - w).abs().max().item()
    assert 0 < err < bound * w.abs().max().item()

    batch = uneven_batch(1000, rows=3, length=14)
    twin = _dense_twin(quant, dense)
    with torch.no_grad():
        got, want = quant(**batch), twin(**batch)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0)

    # LoRA gradients over the quantized base equal those over the dense twin
    grads = []
    for model in (quant, twin):
        peft = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS, random_state=5)
        randomize_lora_b(peft)
        peft(**batch).loss.backward()
        grads.append({n: p.grad for n, p in peft.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[1]:
        scale = grads[1][name].abs().max().item()
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-4 * scale)


def test_qlora_trains_like_16bit_lora_on_real_weights(smollm2_dir):
    texts = ["Q: What is the capital of France? A: Paris.", "Q: What is two plus two? A: Four.",
             "Q: Which planet is the largest? A: Jupiter.", "Q: What colour is the sky? A: Blue."]
    losses = {}
    for bits in (16, 4):
        model, tok = FastLanguageModel.from_pretrained(smollm2_dir, load_in_4bit=bits == 4, max_seq_length=MAX_LEN)
        peft = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3407)
        enc = tok(texts, padding=True, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        losses[bits] = train_steps(peft, {**enc, "labels": labels}, steps=8, lr=2e-3)
    assert all(math.isfinite(x) for run in losses.values() for x in run)
    for bits, run in losses.items():
        assert run[-1] < 0.5 * run[0], (bits, run)
    # 4-bit starts a little worse (quantization error) and must end within a small gap of 16-bit
    assert abs(losses[4][-1] - losses[16][-1]) < 0.15 * losses[16][0], losses


def test_merged_saves_of_a_qlora_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=True, max_seq_length=MAX_LEN)
    peft = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS, random_state=1)
    randomize_lora_b(peft)
    peft.eval()
    batch = uneven_batch(1000, rows=3, length=14)
    with torch.no_grad():
        want = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    # merged_16bit: plain transformers loads it and computes what the adapter model computes
    peft.save_pretrained_merged(str(tmp_path / "m16"), tok, save_method="merged_16bit")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m16"), dtype=torch.float32).eval()
    with torch.no_grad():
        got = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()  # padded positions' logits are arbitrary
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)

    # merged_4bit: bitsandbytes' layout and config; fasttune reads it back as the NF4 of the merged weights
    peft.save_pretrained_merged(str(tmp_path / "m4"), tok, save_method="merged_4bit")
    saved = json.loads((tmp_path / "m4" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes" and saved["load_in_4bit"] and saved["bnb_4bit_quant_type"] == "nf4"
    again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m4"), load_in_4bit=True, max_seq_length=MAX_LEN)
    with pytest.raises(ValueError, match="stored quantized by bitsandbytes"):
        FastLanguageModel.from_pretrained(str(tmp_path / "m4"), load_in_4bit=False)
    merged16 = dict(plain.named_modules())
    for name, module in again.named_modules():
        if isinstance(module, QuantLinear):
            q = module.quant_weight
            assert isinstance(q, NF4Tensor) and q.double_quant
            dense = merged16[name].weight.detach()
            err = (q.dequantize(torch.float32) - dense).abs().max().item()
            assert err < 0.2 * dense.abs().max().item(), name
    with torch.no_grad():
        got4 = again(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.nn.functional.cosine_similarity(got4[real].flatten(), want[real].flatten(), dim=0) > 0.95


def _count(monkeypatch, owner, name) -> list:
    calls = []
    original = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def test_decoding_reaches_the_formats_own_product(tiny_model_dir, monkeypatch):
    """The owned forward hands NF4 weights to the fused functions, which use the format's `linear` (where the
    GEMV lives), in generation as in training."""
    model, tok = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=True, max_seq_length=MAX_LEN)
    FastLanguageModel.for_inference(model)
    calls = _count(monkeypatch, NF4Tensor, "linear")
    enc = tok(["Hello there"], return_tensors="pt")
    model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert len(calls) >= 3 * len(PROJECTIONS) * model.config.num_hidden_layers


@pytest.mark.gpu
def test_gpu_decode_step_uses_the_nf4_gemv(tiny_model_dir, monkeypatch):
    import fasttune.quant.nf4_gemv as gemv

    model, tok = FastLanguageModel.from_pretrained(tiny_model_dir("llama", hidden_size=128, intermediate_size=256),
                                                   load_in_4bit=True, max_seq_length=MAX_LEN)
    FastLanguageModel.for_inference(model)
    enc = tok(["Hello there"], return_tensors="pt").to("cuda")
    want = model.generate(**enc, max_new_tokens=4, do_sample=False)
    calls = _count(monkeypatch, gemv, "nf4_gemv")
    got = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    # every projection of every layer, in each of the 3 single-token steps (the prompt is a matmul's job)
    assert len(calls) >= 3 * len(PROJECTIONS) * model.config.num_hidden_layers


# --------------------------------------------------------------------------------------------
# Checkpoints exchanged with transformers + bitsandbytes (a test-only dependency), both directions
# --------------------------------------------------------------------------------------------


def _bnb_dequantized(model) -> dict:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # flat: bitsandbytes' CPU dequantize misplaces values when a row is not a whole number of blocks
            state = copy.copy(m.weight.quant_state)
            shape, state.shape = state.shape, torch.Size([state.shape.numel()])
            out[name] = bf.dequantize_4bit(m.weight.data, state).float().view(shape)
    return out


def _ours_dequantized(model) -> dict:
    return {name: m.dequantize(torch.float32) for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_bitsandbytes_checkpoint_loads_bit_exactly(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    source = tiny_model_dir("llama")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, dtype=torch.float32,
                                                  device_map="cpu")
    theirs.save_pretrained(tmp_path / "bnb-4bit")
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "bnb-4bit")
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path / "bnb-4bit"), load_in_4bit=True, max_seq_length=MAX_LEN)
    want, got = _bnb_dequantized(theirs), _ours_dequantized(ours)
    assert want.keys() == got.keys() and len(want) == len(PROJECTIONS) * ours.config.num_hidden_layers
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_merged_4bit_loads_in_transformers_and_bitsandbytes(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    model, tok = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=False, max_seq_length=MAX_LEN)
    peft = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS, random_state=2)
    randomize_lora_b(peft)
    peft.save_pretrained_merged(str(tmp_path / "m4"), tok, save_method="merged_4bit")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m4"), device_map="cpu")
    ours, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m4"), load_in_4bit=True, max_seq_length=MAX_LEN)
    want, got = _bnb_dequantized(theirs), _ours_dequantized(ours)
    assert want.keys() == got.keys() and want
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("bits", [4, 8])
def test_save_pretrained_of_a_quantized_model_reloads_the_same_codes(tiny_model_dir, tmp_path, bits):
    kw = {"load_in_4bit": True} if bits == 4 else {"load_in_4bit": False, "load_in_8bit": True}
    model, tok = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), max_seq_length=MAX_LEN, **kw)
    model.save_pretrained(str(tmp_path / "q"))
    tok.save_pretrained(str(tmp_path / "q"))
    again, _ = FastLanguageModel.from_pretrained(str(tmp_path / "q"), max_seq_length=MAX_LEN, **kw)
    before, after = dict(model.named_modules()), dict(again.named_modules())
    quantized = [n for n, m in before.items() if isinstance(m, QuantLinear)]
    assert quantized
    for name in quantized:
        a, b = before[name].quant_weight, after[name].quant_weight
        assert torch.equal(a.data, b.data) and a.dtype == b.dtype == torch.float32, name
        assert torch.equal(before[name].dequantize(), after[name].dequantize()), name


def test_quantized_load_keeps_the_checkpoints_generation_config(tiny_model_dir, tmp_path):
    import shutil

    from transformers import GenerationConfig

    model_dir = str(tmp_path / "m")
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, eos_token_id=[2, 7]).save_pretrained(model_dir)
    dense, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False, max_seq_length=MAX_LEN)
    quant, _ = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=True, max_seq_length=MAX_LEN)
    for key in ("do_sample", "temperature", "top_p"):
        assert getattr(quant.generation_config, key) == getattr(dense.generation_config, key), key
    assert quant.generation_config.temperature == 0.6


def test_in_memory_merge_into_quantized_weights_is_refused_with_the_way_that_works(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=True, max_seq_length=MAX_LEN)
    peft = FastLanguageModel.get_peft_model(model, r=8, target_modules=TARGETS)
    for name in ("merge_and_unload", "merge_adapter"):
        with pytest.raises(NotImplementedError, match="save_pretrained_merged"):
            getattr(peft, name)()
    dense, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=False, max_seq_length=MAX_LEN)
    merged = FastLanguageModel.get_peft_model(dense, r=8, target_modules=TARGETS).merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())  # 16-bit bases merge as PEFT does


def test_a_deepcopy_merges_itself(tiny_model_dir):
    import copy as copy_module

    dense, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_4bit=False, max_seq_length=MAX_LEN)
    peft = FastLanguageModel.get_peft_model(dense, r=8, target_modules=TARGETS)
    twin = copy_module.deepcopy(peft)
    twin.merge_and_unload()
    assert any("lora_" in n for n, _ in peft.named_parameters())  # the original keeps its adapters
