"""The one place that decides which implementation of a hot-path op runs.

Triton kernels run on CUDA tensors when Triton imports; everything else (the CPU, a missing Triton,
FASTTUNE_DISABLE_TRITON=1) runs the pure-PyTorch reference, which is also the tests' oracle. Tests
on a CPU call the Triton launchers directly under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    if os.environ.get("FASTTUNE_DISABLE_TRITON", "0") not in ("", "0", "false", "False"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_available()
