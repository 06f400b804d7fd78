"""Qwen2: Llama's math with biases on q/k/v (handled by the modules) and optional sliding layers."""

from .llama import FamilySpec

QWEN2 = FamilySpec("qwen2")
