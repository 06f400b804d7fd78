"""Tokenizer fixes applied at load time."""

from __future__ import annotations

# Tokens that model families reserve for padding, most specific first.
_PAD_CANDIDATES = (
    "<|finetune_right_pad_id|>",  # Llama 3.1+
    "<|finetune_right_pad|>",
    "<pad>",
    "<|pad|>",
    "[PAD]",
    "<|PAD_TOKEN|>",
    "<|endoftext|>",  # Qwen, SmolLM: a document separator, never an end-of-turn
    "<unk>",
)


def choose_pad_token(tokenizer) -> str | None:
    """A pad token that is not the EOS token, if the vocabulary has one."""
    eos = tokenizer.eos_token
    vocab = tokenizer.get_vocab()
    for token in _PAD_CANDIDATES:
        if token != eos and token in vocab:
            return token
    unk = tokenizer.unk_token
    if unk is not None and unk != eos:
        return unk
    return None


def fix_tokenizer(tokenizer, model=None) -> None:
    """Give the tokenizer a pad token distinct from EOS where possible.

    Padding with EOS makes a collator that masks pad labels also mask the real end-of-sequence
    tokens, and the fine-tuned model then never learns to stop.
    """
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        pad = choose_pad_token(tokenizer)
        if pad is not None:
            tokenizer.pad_token = pad
        elif tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    if model is not None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
