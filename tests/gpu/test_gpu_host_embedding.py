"""offload_embedding (fasttune/memory/host_embedding.py) on the GPU: the input embedding of an untied model
moves to pinned host memory and every path that reads it gives what the table in GPU memory gives: the
forward's logits, greedy generation, LoRA and QLoRA training, saving; a table that trains is an ordinary
GPU copy; tied tables and full fine-tuning keep theirs. The CPU tests check the reasons and the arguments
(tests/test_loader.py)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_training import TARGETS, randomize_lora_b  # noqa: E402

from fasttune import FastLanguageModel  # noqa: E402
from fasttune.memory import host_embedding  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _load(model_dir, offload, **kw):
    kw.setdefault("load_in_4bit", False)
    kw.setdefault("dtype", torch.bfloat16)
    return FastLanguageModel.from_pretrained(model_dir, max_seq_length=256, offload_embedding=offload, **kw)


def _table(model):
    return model.get_input_embeddings().weight


def test_gpu_the_table_leaves_gpu_memory_and_reads_the_same(tiny_model_dir):
    model_dir = tiny_model_dir("llama", hidden_size=256, intermediate_size=512)
    kept, _ = _load(model_dir, False)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    moved, _ = _load(model_dir, "auto")
    grew = torch.cuda.memory_allocated() - before
    table = _table(moved)
    assert host_embedding.is_host_resident(table) and table.is_cuda and moved.device.type == "cuda"
    assert not host_embedding.is_host_resident(_table(kept))
    footprint = sum(p.numel() * p.element_size() for p in kept.parameters())
    table_bytes = table.numel() * table.element_size()
    assert table_bytes > footprint / 4  # SmolLM2's 49,152-token vocabulary dominates this tiny model
    assert grew <= footprint - table_bytes + 2**20  # the table's bytes are not in GPU memory
    assert torch.equal(table, _table(kept))
    ids = torch.randint(3, 1000, (2, 40), device="cuda")
    with torch.no_grad():
        assert torch.equal(moved(input_ids=ids).logits, kept(input_ids=ids).logits)
    FastLanguageModel.for_inference(moved)
    FastLanguageModel.for_inference(kept)
    prompt = ids[:1, :8]
    assert torch.equal(moved.generate(input_ids=prompt, max_new_tokens=12, do_sample=False),
                       kept.generate(input_ids=prompt, max_new_tokens=12, do_sample=False))


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_gpu_lora_training_is_unchanged(tiny_model_dir, load_in_4bit):
    model_dir = tiny_model_dir("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=3)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 1000, (2, 64), generator=g).cuda() for _ in range(4)]
    runs = {}
    for offload in (False, "auto"):
        model, _ = _load(model_dir, offload, load_in_4bit=load_in_4bit, dtype=torch.float32)
        peft = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS, random_state=3)
        randomize_lora_b(peft)
        assert host_embedding.is_host_resident(_table(peft)) == (offload == "auto")
        peft.train()
        opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
        losses = [held_out_loss(peft, batches[0])]
        for ids in batches:
            loss = peft(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        losses.append(held_out_loss(peft, batches[0]))
        runs[offload] = losses
    torch.testing.assert_close(torch.tensor(runs["auto"]), torch.tensor(runs[False]), rtol=1e-5, atol=0)
    # the steps trained: the first batch's loss fell (10.88 -> 10.55 on the CPU; random batches' own losses
    # need not fall in 4 steps, so the first and last training losses are no such check)
    assert runs[False][-1] < runs[False][0] - 0.1


def held_out_loss(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_gpu_a_table_that_trains_is_a_gpu_copy(tiny_model_dir):
    model, _ = _load(tiny_model_dir("llama", hidden_size=256, intermediate_size=512), "auto", dtype=torch.float32)
    original = _table(model)
    peft = FastLanguageModel.get_peft_model(model, r=8, target_modules=TARGETS + ["embed_tokens"], random_state=3)
    trained = [p for n, p in peft.named_parameters() if "embed_tokens" in n and p.requires_grad]
    assert len(trained) == 1 and not host_embedding.is_host_resident(trained[0])
    assert torch.equal(trained[0], original)
    start = original.detach().clone()
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 1000, (2, 32), device="cuda")
    peft.train()
    peft(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(trained[0], start)
    assert torch.equal(original, start) and host_embedding.is_host_resident(original)


def test_gpu_tied_tables_and_full_finetuning_stay(tiny_model_dir, capsys):
    model, _ = _load(tiny_model_dir("llama", tie_word_embeddings=True), True)
    assert not host_embedding.is_host_resident(_table(model))
    assert "stays in GPU memory: lm_head shares the embedding table" in capsys.readouterr().out
    model, _ = _load(tiny_model_dir("llama"), "auto", full_finetuning=True)
    assert not host_embedding.is_host_resident(_table(model))


def test_gpu_saving_reads_the_table(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = _load(tiny_model_dir("llama"), "auto", dtype=torch.float32)
    want = _table(model).detach().cpu().clone()
    peft = FastLanguageModel.get_peft_model(model, r=8, target_modules=TARGETS, random_state=3)
    peft.save_pretrained_merged(str(tmp_path), tokenizer, save_method="merged_16bit")
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert torch.equal(saved.get_input_embeddings().weight, want)


def test_gpu_gather_from_host_memory_matches(tiny_model_dir):
    """The kernel on a table in host memory at a real width, a training batch's rows and one decode row."""
    from fasttune.kernels.embedding import embedding

    weight = torch.randn(5000, 4096, device="cuda", dtype=torch.bfloat16)
    host = host_embedding.host_resident_copy(weight)
    for shape in ((2, 2048), (1, 1)):
        ids = torch.randint(0, 5000, shape, device="cuda")
        assert torch.equal(embedding(ids, host), torch.nn.functional.embedding(ids, weight))
