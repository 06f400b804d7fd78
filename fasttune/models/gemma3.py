"""Gemma 3 (text): Gemma 2's layer plus (1 + w) RMSNorms over each head's q and k, and two rotary
tables: a local base for sliding-window layers and the global base, with any rope scaling, for full
layers (`config.rope_parameters` keyed by layer type)."""

from .llama import FamilySpec

GEMMA3 = FamilySpec("gemma3", norm_offset=1.0, scale_embeddings=True, sandwich_norms=True, qk_norm=True)
