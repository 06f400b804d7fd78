"""What the quantized weight formats (NF4, int8, FP8) share, written once."""

from __future__ import annotations

from dataclasses import replace

import torch

# the dtypes a quantized weight dequantizes to (and is quantized from)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class QuantizedWeight:
    """Mixin for the format dataclasses: `TENSORS` names their tensor fields (None where absent);
    `data` holds the codes and `dtype` is the dtype `dequantize()` returns by default."""

    TENSORS: tuple[str, ...] = ()

    def _check_dtype(self) -> None:
        if self.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"{type(self).__name__}: dtype {self.dtype} is not one of {WEIGHT_DTYPES}")

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors held (codes, scales, code tables)."""
        tensors = (getattr(self, name) for name in self.TENSORS)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str):
        moved = {name: getattr(self, name) for name in self.TENSORS}
        return replace(self, **{name: t.to(device) if t is not None else None for name, t in moved.items()})
