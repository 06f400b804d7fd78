"""Saving: adapters round-trip through FastLanguageModel, merged checkpoints load in plain transformers and
compute what the adapter model computes, the live model is left alone, and no failure half-writes anything.

Oracles: the adapter model's own logits and greedy tokens (fasttune forward + PEFT adapters) against plain
transformers on the saved directory; PEFT's merge_and_unload on a deep copy for the merged tensors."""

import copy
import hashlib
import json
import os

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from fasttune import FastLanguageModel

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEXT = "The quick brown fox jumps over"


def _load(directory, **kwargs):
    return FastLanguageModel.from_pretrained(directory, load_in_4bit=False, max_seq_length=256, **kwargs)


def _lora(model, targets=ALL_LINEAR, scale=0.05, **kwargs):
    """LoRA whose B matrices (zero at init) and full-trained copies are perturbed, so the adapter matters."""
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=list(targets), **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return FastLanguageModel.for_inference(model)


def _ids(tokenizer):
    return tokenizer(TEXT, return_tensors="pt").input_ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _greedy(model, ids, n=10):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return out[0, ids.shape[1]:].tolist()


def _plain(directory):
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def _saved_tensors(directory):
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(safetensors.torch.load_file(os.path.join(directory, name)))
    return tensors


def _tree(directory):
    """Every file under `directory` with a hash of its bytes: equal trees mean nothing changed."""
    tree = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            tree[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return tree


@pytest.fixture(scope="module")
def llama_lora(tiny_model_dir):
    """A tiny Llama with perturbed LoRA on every projection, shared by the tests that only read it."""
    model, tokenizer = _load(tiny_model_dir("llama"))
    return _lora(model), tokenizer


def test_adapter_round_trip(tmp_path, llama_lora):
    model, tokenizer = llama_lora
    ids = _ids(tokenizer)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary directory left beside it

    loaded, _ = _load(str(tmp_path / "adapter"))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert callable(loaded.save_pretrained_merged)

    # save_method="lora" writes the same adapter, plus the tokenizer.
    model.save_pretrained_merged(tmp_path / "lora", tokenizer, save_method="lora")
    files = set(os.listdir(tmp_path / "lora"))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert _saved_tensors(tmp_path / "lora").keys() == _saved_tensors(tmp_path / "adapter").keys()


def test_save_pretrained_of_a_copy_saves_the_copy(tmp_path, llama_lora):
    model, _ = llama_lora
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_A" in name:
                p.mul_(2)
    twin.save_pretrained(tmp_path / "twin")
    saved = _saved_tensors(tmp_path / "twin")
    name = next(k for k in saved if "lora_A" in k)
    live = dict(twin.named_parameters())[name.replace(".weight", ".default.weight")]
    assert torch.equal(saved[name], live.detach())


@pytest.mark.parametrize("family, rslora", [("llama", False), ("qwen2", True)])
def test_merged_matches_adapter(tmp_path, tiny_model_dir, family, rslora):
    model, tokenizer = _load(tiny_model_dir(family))
    model = _lora(model, use_rslora=rslora)
    ids = _ids(tokenizer)
    before_logits = _logits(model, ids)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with model.disable_adapter():
        assert (_logits(model, ids) - before_logits).abs().max() > 1e-2  # the adapter matters

    model.save_pretrained_merged(tmp_path / "merged", tokenizer, save_method="merged_16bit")

    # The live model is untouched: same tensors, same outputs, adapters still separate.
    after_state = model.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
    assert torch.equal(_logits(model, ids), before_logits)

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (tmp_path / "merged" / "generation_config.json").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    saved = _saved_tensors(tmp_path / "merged")
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert saved.keys() == reference.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-6, msg=name)
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in saved

    plain = _plain(tmp_path / "merged")
    torch.testing.assert_close(_logits(plain, ids), before_logits, rtol=0, atol=1e-4)
    assert _greedy(plain, ids) == _greedy(model, ids)


@pytest.mark.parametrize("max_shard_size", ["300KB", 13_000_000])
def test_sharded_merged_loads(tmp_path, llama_lora, max_shard_size):
    model, tokenizer = llama_lora
    ids = _ids(tokenizer)
    out = tmp_path / "sharded"
    model.save_pretrained_merged(out, tokenizer, max_shard_size=max_shard_size)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert shards == sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    limit = 300_000 if isinstance(max_shard_size, str) else max_shard_size
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            names = list(f.keys())
        assert len(names) == 1 or os.path.getsize(out / shard) <= limit + 10_000  # + header
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _saved_tensors(out).values())

    plain = _plain(out)
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids), rtol=0, atol=1e-4)


def test_modules_to_save_merge(tmp_path, tiny_model_dir):
    model, tokenizer = _load(tiny_model_dir("llama"))
    model = _lora(model, targets=("q_proj", "v_proj", "embed_tokens", "lm_head"))
    ids = _ids(tokenizer)
    model.save_pretrained_merged(tmp_path / "merged", tokenizer)

    saved = _saved_tensors(tmp_path / "merged")
    base = model.get_base_model()
    trained_embed = base.model.embed_tokens.modules_to_save["default"].weight.detach()
    assert torch.equal(saved["model.embed_tokens.weight"], trained_embed)
    assert not torch.equal(saved["model.embed_tokens.weight"], base.model.embed_tokens.original_module.weight)
    assert torch.equal(saved["lm_head.weight"], base.lm_head.modules_to_save["default"].weight.detach())
    assert not any("original_module" in k or "modules_to_save" in k or "lora" in k for k in saved)

    plain = _plain(tmp_path / "merged")
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids), rtol=0, atol=1e-4)
    assert _greedy(plain, ids) == _greedy(model, ids)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # PEFT's; the case under test
@pytest.mark.parametrize("trained", [None, "embed_tokens", "lm_head"])
def test_tied_embeddings(tmp_path, tiny_model_dir, trained):
    model, tokenizer = _load(tiny_model_dir("llama", tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model = _lora(model, targets=("q_proj", "o_proj") + ((trained,) if trained else ()))
    ids = _ids(tokenizer)
    model.save_pretrained_merged(tmp_path / "merged", tokenizer)

    saved = _saved_tensors(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    # Unchanged tied weights are written once; once one side is trained in full they differ and are both kept.
    assert ("lm_head.weight" in saved) == (trained is not None)
    assert config["tie_word_embeddings"] == (trained is None)

    plain = _plain(tmp_path / "merged")
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids), rtol=0, atol=1e-4)


def test_plain_model_and_dtypes(tmp_path, tiny_model_dir):
    model, tokenizer = _load(tiny_model_dir("qwen2"))
    model.save_pretrained_merged(tmp_path / "fp32", tokenizer)
    saved = _saved_tensors(tmp_path / "fp32")
    live = model.state_dict()
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[k], live[k]) for k in saved)

    model.save_pretrained_merged(tmp_path / "bf16", tokenizer, dtype=torch.bfloat16)
    saved16 = _saved_tensors(tmp_path / "bf16")
    assert all(saved16[k].dtype == torch.bfloat16 and torch.equal(saved16[k], live[k].bfloat16()) for k in saved16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"

    half, _ = _load(tiny_model_dir("qwen2"), dtype=torch.float16)  # the model's own dtype by default
    half.save_pretrained_merged(tmp_path / "fp16")
    assert {t.dtype for t in _saved_tensors(tmp_path / "fp16").values()} == {torch.float16}


def test_failures_leave_nothing_behind(tmp_path, llama_lora, monkeypatch):
    model, tokenizer = llama_lora

    # A new target: a failure between shards leaves no target, no temporary directory, no created parents.
    real_save_file = safetensors.torch.save_file
    calls = []

    def save_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(OSError, match="injected"):
        model.save_pretrained_merged(tmp_path / "new" / "deeper" / "merged", tokenizer, max_shard_size="300KB")
    assert len(calls) == 2
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    # An existing target stays byte for byte what it was.
    target = tmp_path / "out"
    model.save_pretrained_merged(target, tokenizer)
    (target / "notes.txt").write_text("mine")
    before = _tree(target)

    def broken_tokenizer_save(*args, **kwargs):
        raise RuntimeError("tokenizer failed (injected)")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken_tokenizer_save)
    with pytest.raises(RuntimeError, match="injected"):
        model.save_pretrained_merged(target, tokenizer, max_shard_size="300KB")
    with pytest.raises(RuntimeError, match="injected"):
        model.save_pretrained_merged(target, tokenizer, save_method="lora")
    monkeypatch.undo()

    # The wrapped save_pretrained: PEFT writes the weights, then fails writing adapter_config.json.
    from peft import LoraConfig

    def broken_config_save(*args, **kwargs):
        raise RuntimeError("config failed (injected)")

    monkeypatch.setattr(LoraConfig, "save_pretrained", broken_config_save)
    with pytest.raises(RuntimeError, match="injected"):
        model.save_pretrained(target)
    with pytest.raises(RuntimeError, match="injected"):
        model.save_pretrained(tmp_path / "adapter")
    monkeypatch.undo()

    assert _tree(target) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_saving_over_existing_directories(tmp_path, llama_lora):
    model, tokenizer = llama_lora
    ids = _ids(tokenizer)
    expected = _logits(model, ids)
    target = tmp_path / "out"

    model.save_pretrained_merged(target, tokenizer, max_shard_size="300KB")
    model.save_pretrained_merged(target, tokenizer)  # a single file now: the old shards must not linger
    assert not any(p.startswith("model-") or p.endswith(".index.json") for p in os.listdir(target))
    torch.testing.assert_close(_logits(_plain(target), ids), expected, rtol=0, atol=1e-4)

    # Other files and directories in the target are the user's: kept, while the save's own files are replaced.
    (target / "notes.txt").write_text("mine")
    (target / "checkpoint-10").mkdir()
    (target / "checkpoint-10" / "state.json").write_text("{}")
    model.save_pretrained_merged(target, tokenizer, max_shard_size="300KB")
    files = set(os.listdir(target))
    assert {"notes.txt", "checkpoint-10", "model.safetensors.index.json"} <= files
    assert "model.safetensors" not in files
    torch.testing.assert_close(_logits(_plain(target), ids), expected, rtol=0, atol=1e-4)
    assert sorted(os.listdir(tmp_path)) == ["out"]

    # A re-save into a directory holding only an earlier save replaces it whole.
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "README.md").unlink()
    first = os.stat(tmp_path / "adapter").st_ino
    model.save_pretrained(tmp_path / "adapter")
    assert os.stat(tmp_path / "adapter").st_ino != first
    assert "README.md" in os.listdir(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path)) == ["adapter", "out"]


def test_bad_input_is_refused_before_writing(tmp_path, llama_lora, tiny_model_dir):
    model, tokenizer = llama_lora
    with pytest.raises(NotImplementedError, match="save_method='gguf'"):
        model.save_pretrained_merged(tmp_path / "x", tokenizer, save_method="gguf")
    with pytest.raises(ValueError, match="'merged_16bit', 'merged_4bit', 'merged_4bit_forced', 'lora'"):
        model.save_pretrained_merged(tmp_path / "x", tokenizer, save_method="merged_8bit")
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained_merged(tmp_path / "x", tokenizer, max_shard_size="lots")
    with pytest.raises(TypeError, match="save_embeddings"):
        model.save_pretrained_merged(tmp_path / "x", tokenizer, save_embeddings=True)
    with pytest.raises(NotImplementedError, match="push_to_hub_merged"):
        model.push_to_hub_merged("me/model", tokenizer)
    with pytest.raises(NotImplementedError, match="Hub"):
        model.save_pretrained_merged(tmp_path / "x", tokenizer, push_to_hub=True)

    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    with pytest.raises(FileExistsError, match="is a file"):
        model.save_pretrained_merged(a_file, tokenizer)
    with pytest.raises(FileExistsError, match="is a file"):
        model.save_pretrained(a_file)
    assert a_file.read_text() == "keep"

    plain, _ = _load(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match="get_peft_model"):
        plain.save_pretrained_merged(tmp_path / "x", tokenizer, save_method="lora")
    dora = _lora(plain, targets=("q_proj",), use_dora=True)
    with pytest.raises(NotImplementedError, match="use_dora"):
        dora.save_pretrained_merged(tmp_path / "x", tokenizer)
    assert os.listdir(tmp_path) == ["a_file"]


def test_smollm2_merged_greedy_matches_adapter(tmp_path, smollm2_dir):
    model, tokenizer = _load(smollm2_dir)
    model = _lora(model, scale=0.5)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    adapter_tokens = _greedy(model, ids, n=8)
    with model.disable_adapter():
        assert _logits(model, ids)[0, -1].argmax() != adapter_tokens[0]  # the adapter matters

    model.save_pretrained_merged(tmp_path / "merged", tokenizer)
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # SmolLM2 ties lm_head to the embedding
    assert _greedy(_plain(tmp_path / "merged"), ids, n=8) == adapter_tokens
