"""Training through FastLanguageModel on the GPU: from_pretrained -> get_peft_model with fasttune's
gradient checkpointing, in bf16, as a fine-tuning script runs it.

- a few AdamW steps on one repeated batch bring the loss well down;
- checkpointing changes no gradient, and does lower the peak memory;
- a short trl.SFTTrainer run trains (trl wraps the model's forward with its own chunked LM head).

Marked `gpu`; FASTTUNE_TEST_DEVICE=cpu runs them on the CPU to debug the tests (see test_gpu_models.py),
except the ones that need CUDA itself.
"""

import math
import os
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny import tiny_config  # noqa: E402

from fasttune import FastLanguageModel  # noqa: E402
from fasttune.models import fast_state  # noqa: E402

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("FASTTUNE_TEST_DEVICE", "cuda")
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="measures CUDA memory")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPECIALS = {0: "<pad>", 1: "<s>", 2: "</s>"}  # the ids tests/tiny.py gives pad, bos and eos


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly vocab_size ids, so that a random model saved with it loads
    through AutoTokenizer with nothing downloaded (the GPU machine has no SmolLM2 files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {SPECIALS.get(i, f"w{i}"): i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(list(SPECIALS.values()))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="w3", padding_side="right")


def save_model(directory, family: str = "llama", **overrides) -> str:
    torch.manual_seed(0)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(directory)
    word_tokenizer(config.vocab_size).save_pretrained(directory)
    return str(directory)


@pytest.fixture(autouse=True)
def _exact_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    made = {}

    def make(family: str = "llama", **overrides) -> str:
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = save_model(tmp_path_factory.mktemp(f"gpu-{family}"), family, **overrides)
        return made[key]

    return make


def fast_lora(model_dir: str, dtype=torch.bfloat16, checkpointing="fasttune", max_seq_length: int = 512):
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, load_in_4bit=False, dtype=dtype,
                                                         max_seq_length=max_seq_length)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS,
                                             use_gradient_checkpointing=checkpointing, random_state=0)
    FastLanguageModel.for_training(model, use_gradient_checkpointing=checkpointing)
    return model.to(DEVICE), tokenizer


@pytest.mark.parametrize("family", ["llama3-rope", "qwen3"])
def test_training_steps_reduce_the_loss(model_dirs, family):
    model, _ = fast_lora(model_dirs(family))
    assert fast_state(model).gradient_checkpointing
    assert {p.device.type for p in model.parameters()} == {torch.device(DEVICE).type}
    assert next(p for n, p in model.named_parameters() if "q_proj.base_layer" in n).dtype == torch.bfloat16
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (4, 64), device=DEVICE)
    losses = []
    for _ in range(30):
        with torch.autocast(device_type=torch.device(DEVICE).type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in trainable])
        assert torch.isfinite(norm) and norm > 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], f"the loss on a repeated batch did not fall: {losses}"


def test_checkpointing_changes_no_gradient(model_dirs):
    """One fp32 step without checkpointing, with recompute and with offloaded checkpointing: the same LoRA
    gradients (for_training(True) keeps an earlier offloaded kind, so False comes first)."""
    model, _ = fast_lora(model_dirs("llama"), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero B would leave A without gradient
                p.copy_(torch.randn_like(p) * 0.05)
    ids = torch.randint(3, model.config.vocab_size, (2, 48), device=DEVICE)
    grads = {}
    for mode, state in ((False, False), (True, "recompute"), ("unsloth", "offload")):
        FastLanguageModel.for_training(model, use_gradient_checkpointing=mode)
        assert fast_state(model).gradient_checkpointing == state
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, g in grads[False].items():
        assert g.abs().max() > 0, name
        for mode in (True, "unsloth"):
            torch.testing.assert_close(grads[mode][name], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(),
                                       msg=lambda m, mode=mode, name=name: f"{mode} {name}: {m}")


@needs_cuda
def test_gc_paused_for_the_step_and_on_again_after_a_cuda_backward(model_dirs):
    """The backward runs on the autograd engine's device thread: the pause still ends with it."""
    import gc

    model, _ = fast_lora(model_dirs("llama"), checkpointing="unsloth")
    ids = torch.randint(3, model.config.vocab_size, (2, 48), device=DEVICE)
    gc.enable()
    for _ in range(2):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        assert not gc.isenabled()
        loss.backward()
        assert gc.isenabled()


@needs_cuda
def test_checkpointing_lowers_peak_memory(model_dirs):
    """At hidden 512, 4 layers, batch 4 x 1024 the saved activations dominate: checkpointing must cut the
    training step's peak well below the run without it."""
    directory = model_dirs("llama", vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
    peaks = {}
    for mode in ("fasttune", False):
        model, _ = fast_lora(directory, checkpointing=mode, max_seq_length=1024)
        ids = torch.randint(3, model.config.vocab_size, (4, 1024), device=DEVICE)
        for _ in range(2):  # the second step runs with the allocator warm
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            peaks[mode] = torch.cuda.max_memory_allocated() - base
        del model, loss
        torch.cuda.empty_cache()
    assert peaks["fasttune"] < 0.6 * peaks[False], f"peak above the weights, GC on vs off: {peaks}"


@needs_cuda
@pytest.mark.parametrize("masked", [False, True])
def test_a_training_step_never_waits_for_its_own_gpu_work(model_dirs, masked, monkeypatch):
    """Once the step's first GPU work is queued (the targets' count, PreparedTargets), the host queues the
    rest of the step (forward, fused loss, offloaded backward, optimizer) without waiting for the GPU: a
    long sleep kernel is queued right behind the count, and any host sync after it (a .item(), a nonzero)
    would make the queueing last as long as that hold. With prompt-masked labels the fused loss compacts
    the kept tokens by the count, which was on its way to the host before the sleep."""
    import fasttune.models.llama as llama

    model, _ = fast_lora(model_dirs("llama"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(3, model.config.vocab_size, (2, 64), device=DEVICE)
    labels = ids.clone()
    if masked:
        labels[:, :20] = -100

    def step():
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(2_000_000_000)
    torch.cuda.synchronize()
    hold = time.perf_counter() - t0

    class HeldTargets(llama.PreparedTargets):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            torch.cuda._sleep(2_000_000_000)  # behind the count's copy, ahead of the decoder

    monkeypatch.setattr(llama, "PreparedTargets", HeldTargets)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = step()
    queued = time.perf_counter() - t0
    torch.cuda.synchronize()
    assert torch.isfinite(loss)
    assert queued < 0.5 * hold, f"queueing one step took {queued:.3f} s with the GPU held for {hold:.3f} s: a sync"


@needs_cuda
def test_sft_trainer_trains(model_dirs, tmp_path):
    """A few trl.SFTTrainer steps over pre-tokenized rows, as benchmarks/sft_llama1b.py runs it."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import TrainerCallback

    model, tokenizer = fast_lora(model_dirs("llama"), max_seq_length=64)
    torch.manual_seed(0)
    rows = torch.randint(3, model.config.vocab_size, (4, 64)).tolist()
    dataset = datasets.Dataset.from_dict({"input_ids": rows * 8})
    logged = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged.append((logs["loss"], logs.get("grad_norm")))

    config = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", optim="adamw_torch", bf16=True, max_length=64, packing=False,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[Keep()])
    trainer.train()
    losses = [loss for loss, _ in logged]
    assert len(losses) == 12
    assert all(norm is not None and norm > 0 for _, norm in logged)
    assert losses[-1] < 0.9 * losses[0], f"SFTTrainer did not train: {losses}"
    assert fast_state(model).gradient_checkpointing  # still fasttune's, not transformers'
