"""Weight formats: quantize, dequantize, pack/unpack, and bitsandbytes-compatible (de)serialization.

- nf4.py: blockwise 4-bit NF4 (and FP4 for loading) with optional double quantization of the absmax
  values, byte for byte in bitsandbytes' layout; a Triton dequantization kernel on CUDA.
- int8.py: per-row symmetric int8 (LLM.int8() weight layout: int8 codes + fp32 row absmax "SCB").

Neither needs bitsandbytes installed.
"""

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
    "Int8Tensor",
    "NF4Tensor",
    "code_table",
    "dequantize_int8",
    "dequantize_nf4",
    "dequantize_nf4_reference",
    "dynamic_code",
    "int8_from_bnb_state_dict",
    "int8_to_bnb_state_dict",
    "is_bnb_4bit",
    "is_bnb_int8",
    "nf4_from_bnb_state_dict",
    "nf4_to_bnb_state_dict",
    "quantize_int8",
    "quantize_nf4",
]
