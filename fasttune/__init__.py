"""fasttune: fast, memory-lean fine-tuning and inference for Hugging Face causal language models."""

from .hub import DEFAULT_MODEL
from .loader import FastLanguageModel

__version__ = "0.1.0"

__all__ = ["DEFAULT_MODEL", "FastLanguageModel", "__version__"]
