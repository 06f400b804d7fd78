"""config.model_type -> the family whose owned forward fasttune installs."""

from __future__ import annotations

from .gemma import GEMMA
from .gemma2 import GEMMA2
from .gemma3 import GEMMA3
from .llama import LLAMA, FamilySpec, patch_model
from .mistral import MISTRAL
from .qwen2 import QWEN2
from .qwen3 import QWEN3

FAMILIES: dict[str, FamilySpec] = {
    "llama": LLAMA,
    "mistral": MISTRAL,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "gemma": GEMMA,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA3,  # Gemma3ForCausalLM; the multimodal "gemma3" takes the generic path
}


def family_of(model) -> FamilySpec | None:
    return FAMILIES.get(getattr(model.config, "model_type", None))


def install_fast_forward(model) -> bool:
    """Patch `model` in place if fasttune knows its family; return whether it did."""
    spec = family_of(model)
    if spec is None:
        return False
    patch_model(model, spec)
    return True


def fast_state(model):
    """The FastState of a patched model (PeftModel or plain), or None."""
    while hasattr(model, "get_base_model") and model is not model.get_base_model():
        model = model.get_base_model()
    inner = getattr(model, "model", None)
    return getattr(inner, "_fasttune_state", None)
