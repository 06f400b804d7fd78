"""The input embedding in host memory: `offload_embedding`.

A decoder's input embedding is a (vocab, hidden) table of which a step reads one row per token: Llama-8B's
is 1 GB in bf16 (128,256 x 4,096), of which a 2 x 2048-token step reads 32 MB. Where the table is not
shared with lm_head (whose matmul reads all of it) and does not train, it can live in pinned host memory
instead of on the GPU: the GPU reads it in place, over PCIe (pinned memory is mapped into the GPU's address
space), 0.7 ms for those 32 MB on an H100, and one row in a few microseconds when decoding (kernels/
embedding.py). The GPU memory it held is free for the step's activations.

The table stays a CUDA tensor (a view of the pinned memory: `model.device`, `.to("cuda")`, saving and
`state_dict` behave as before), but its bytes do not count in `torch.cuda.memory_allocated()`. A copy of it
(`.clone()`, `copy.deepcopy`, PEFT's `modules_to_save`) is an ordinary GPU tensor.

`offload_embedding` in `FastLanguageModel.from_pretrained`: "auto" (the default) moves the table where that
is safe, True asks for it (a notice says why not where it cannot), False keeps it on the GPU. Not moved:
- a table that lm_head shares (tied embeddings: Llama-3.2-1B/3B, Gemma, small Qwens);
- full fine-tuning (the table trains: every optimizer step would write 1 GB over PCIe);
- a model not on a CUDA device, or under torch.distributed (DDP/FSDP broadcast and shard parameters
  through NCCL, which expects device memory).
Training the table later (`requires_grad_(True)`) stays correct, reading and writing it over PCIe.
"""

from __future__ import annotations

import torch

_MARK = "_fasttune_host_resident"


class _MappedHostMemory:
    """A pinned host tensor presented through `__cuda_array_interface__`: torch.as_tensor makes a CUDA tensor
    of it without copying, which keeps this object (and the pinned tensor) alive."""

    def __init__(self, pinned: torch.Tensor):
        self.pinned = pinned
        self.__cuda_array_interface__ = {
            "shape": (pinned.numel() * pinned.element_size(),),
            "typestr": "|u1",
            "data": (pinned.data_ptr(), False),
            "version": 3,
            "strides": None,
        }


def is_host_resident(tensor) -> bool:
    """Whether `tensor` is a table offload_input_embedding put in host memory (and still reads it there:
    `module.to(dtype)` would have given the parameter new GPU memory)."""
    mark = getattr(tensor, _MARK, None)
    return mark is not None and mark == tensor.data_ptr()


def host_resident_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor equal to `tensor` (on a CUDA device) whose memory is pinned host memory."""
    if not tensor.is_cuda:
        raise ValueError("host_resident_copy: the tensor must be on a CUDA device")
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor)
    with torch.cuda.device(tensor.device):
        raw = torch.as_tensor(_MappedHostMemory(pinned), device=tensor.device)
    view = raw.view(tensor.dtype).view(tensor.shape)
    if view.data_ptr() != pinned.data_ptr():  # the mapping is not the identity: no unified addressing
        raise RuntimeError("this GPU does not address pinned host memory directly (unified addressing)")
    return view


def _tied(model, weight) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_weight = getattr(out, "weight", None)
    if out_weight is None:
        return False
    return out_weight is weight or (out_weight.device == weight.device and out_weight.data_ptr() == weight.data_ptr())


def why_not(model, full_finetuning: bool) -> str | None:
    """Why the model's input embedding cannot move to host memory, or None when it can."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(embed) is not torch.nn.Embedding:
        return "its input embedding is not a plain torch.nn.Embedding"
    weight = embed.weight
    if is_host_resident(weight):
        return "it is in host memory already"
    if _tied(model, weight):
        return "lm_head shares the embedding table (tied embeddings), and its matmul reads all of it"
    if full_finetuning:
        return "full fine-tuning trains the table"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "under torch.distributed parameters must be in GPU memory"
    if embed.sparse or embed.max_norm is not None:
        return "the embedding is sparse or renormalizes its rows"
    if not weight.is_cuda:
        return "the model is not on a CUDA device"
    return None


def offload_input_embedding(model, full_finetuning: bool = False) -> int:
    """Move the model's input embedding table to pinned host memory where `why_not` allows. Returns the
    bytes of GPU memory freed (0 when it stays)."""
    if why_not(model, full_finetuning) is not None:
        return 0
    embed = model.get_input_embeddings()
    old = embed.weight
    moved = torch.nn.Parameter(host_resident_copy(old.detach()), requires_grad=old.requires_grad)
    setattr(moved, _MARK, moved.data_ptr())
    embed.weight = moved
    nbytes = old.numel() * old.element_size()
    del old
    return nbytes
