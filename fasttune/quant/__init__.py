"""Weight formats: quantize, dequantize, pack/unpack, and bitsandbytes-compatible (de)serialization.

- nf4.py: blockwise 4-bit NF4 (and FP4 for loading) with optional double quantization of the absmax
  values, byte for byte in bitsandbytes' layout; a Triton dequantization kernel on CUDA.
- int8.py: per-row symmetric int8 (LLM.int8() weight layout: int8 codes + fp32 row absmax "SCB").
- fp8.py: e4m3 codes with fp32 scales per row or per 128 x 128 block, transformers' "fp8" checkpoint
  layout (weight + weight_scale_inv), and the forward through torch._scaled_mm on Ada / Hopper GPUs.

None needs bitsandbytes installed.
"""

from .fp8 import (
    FP8Tensor,
    dequantize_fp8,
    fp8_from_checkpoint,
    fp8_to_checkpoint,
    is_fp8_checkpoint,
    quantize_fp8,
)
from .int8 import (
    Int8Tensor,
    dequantize_int8,
    int8_from_bnb_state_dict,
    int8_to_bnb_state_dict,
    is_bnb_int8,
    quantize_int8,
)
from .nf4 import (
    NF4_CODE_VALUES,
    NF4Tensor,
    code_table,
    dequantize_nf4,
    dequantize_nf4_reference,
    dynamic_code,
    is_bnb_4bit,
    nf4_from_bnb_state_dict,
    nf4_to_bnb_state_dict,
    quantize_nf4,
)

__all__ = [
    "NF4_CODE_VALUES",
    "FP8Tensor",
    "Int8Tensor",
    "NF4Tensor",
    "code_table",
    "dequantize_fp8",
    "dequantize_int8",
    "dequantize_nf4",
    "dequantize_nf4_reference",
    "dynamic_code",
    "fp8_from_checkpoint",
    "fp8_to_checkpoint",
    "int8_from_bnb_state_dict",
    "int8_to_bnb_state_dict",
    "is_bnb_4bit",
    "is_bnb_int8",
    "is_fp8_checkpoint",
    "nf4_from_bnb_state_dict",
    "nf4_to_bnb_state_dict",
    "quantize_fp8",
    "quantize_int8",
    "quantize_nf4",
]
