"""Gemma: Llama's layer with (1 + w) RMSNorms computed in fp32, a tanh-GELU gated MLP (GeGLU) and
embeddings scaled by sqrt(hidden_size); head_dim is its own number, not hidden_size / heads."""

from .llama import FamilySpec

GEMMA = FamilySpec("gemma", norm_offset=1.0, scale_embeddings=True)
