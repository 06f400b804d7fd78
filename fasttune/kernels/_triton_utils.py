"""Pieces the Triton kernels share."""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # the references still work without Triton
    triton = tl = None


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), as the CPU tests do."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

    @triton.jit
    def round_to_bf16(v):
        """fp32 `v` rounded to nearest-even bf16 precision, still in fp32.

        Triton's interpreter truncates an fp32 -> bf16 cast where the GPU rounds to nearest; kernels
        call this under the interpreter only, so that both give the same numbers."""
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def rounded(v, DTYPE: tl.constexpr, EMULATE_RTNE: tl.constexpr):
        """fp32 `v` rounded to DTYPE, returned as fp32 (the interpreter's bf16 cast emulated)."""
        if EMULATE_RTNE and DTYPE == tl.bfloat16:
            return round_to_bf16(v)
        else:
            return v.to(DTYPE).to(tl.float32)
