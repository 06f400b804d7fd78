"""The CUDA caching allocator's expandable segments, on by default.

PyTorch's caching allocator reserves GPU memory in fixed segments and keeps them: a training step that
allocates and frees activations of many sizes leaves free blocks that a larger request cannot use, so the
memory reserved (what nvidia-smi shows, and what runs out) grows well past the memory allocated. With
`expandable_segments:True` a pool is one range of virtual addresses that grows and shrinks by mapping
pages, so freed blocks next to each other merge and the reserve stays closer to the peak allocation.
Unsloth turns it on when it is imported; `FastLanguageModel.from_pretrained` does here, so a script moved
over keeps that memory. (The training benchmarks set it for every stack: benchmarks/stacks.py.)

Left alone:
- any allocator configuration the user gave (PYTORCH_ALLOC_CONF or PYTORCH_CUDA_ALLOC_CONF set at all);
- FASTTUNE_EXPANDABLE_SEGMENTS=0;
- machines without CUDA, and platforms where the driver lacks the virtual-memory calls it needs (Windows,
  and Linux under WSL).
Private pools (CUDA graphs: fasttune/memory/layer_graphs.py) keep ordinary segments; PyTorch decides that.
"""

from __future__ import annotations

import os
import platform
import sys

import torch

USER_SETTINGS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
OPT_OUT = "FASTTUNE_EXPANDABLE_SEGMENTS"


def why_not_expandable(environ=os.environ) -> str | None:
    """Why fasttune leaves the allocator's configuration as it is, or None where it turns segments expandable."""
    for name in USER_SETTINGS:
        if environ.get(name):
            return f"{name} is set ({environ[name]!r}); the allocator keeps that configuration"
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{OPT_OUT}={environ[OPT_OUT]}"
    if sys.platform != "linux" or "microsoft" in platform.release().lower():
        return "expandable segments need the CUDA virtual-memory calls of a native Linux driver"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _set_allocator_settings(settings: str) -> None:
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9
    if setter is None:
        setter = torch.cuda.memory._set_allocator_settings
    setter(settings)


def use_expandable_segments(environ=os.environ) -> bool:
    """Make the CUDA allocator's new segments expandable unless `why_not_expandable` names a reason; whether
    it did. Segments reserved before the call keep their kind."""
    if why_not_expandable(environ) is not None:
        return False
    _set_allocator_settings("expandable_segments:True")
    return True
