"""Unsloth's `unsloth.chat_templates` names, so `from fasttune.chat_templates import ...` works as there."""

from .data.chat_templates import CHAT_TEMPLATES, get_chat_template, template_names
from .data.fixes import ensure_generation_prompt, fix_untrained_tokens
from .data.packing import PackingCollator, packing_collator
from .data.responses_only import train_on_responses_only
from .data.sharegpt import standardize_data_formats, standardize_sharegpt, to_sharegpt

__all__ = [
    "CHAT_TEMPLATES",
    "PackingCollator",
    "ensure_generation_prompt",
    "fix_untrained_tokens",
    "get_chat_template",
    "packing_collator",
    "standardize_data_formats",
    "standardize_sharegpt",
    "template_names",
    "to_sharegpt",
    "train_on_responses_only",
]
