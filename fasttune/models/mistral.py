"""Mistral: Llama's math with a sliding attention window on every layer (`config.sliding_window`)."""

from .llama import FamilySpec

MISTRAL = FamilySpec("mistral")
