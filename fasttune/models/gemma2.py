"""Gemma 2: Gemma plus "sandwich" norms (after attention, before and after the MLP), tanh softcapping
of attention logits and of the final logits, alternating sliding-window / global layers
(`config.layer_types`) and an attention scale of query_pre_attn_scalar^-1/2 — all read from the
config by the shared forward."""

from .llama import FamilySpec

GEMMA2 = FamilySpec("gemma2", norm_offset=1.0, scale_embeddings=True, sandwich_norms=True)
