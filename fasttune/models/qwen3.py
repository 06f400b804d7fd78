"""Qwen3: Llama's math plus an RMSNorm over each head of q and k before rope."""

from .llama import FamilySpec

QWEN3 = FamilySpec("qwen3", qk_norm=True)
