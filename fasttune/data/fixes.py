"""Load-time repairs of a model and its tokenizer (from_pretrained(fix_tokenizer=True)).

- Untrained token rows: base checkpoints often carry embedding / lm_head rows that were never trained
  (all zeros, or nearly) for special tokens that only the instruct model uses, such as Llama 3's
  `<|eot_id|>`. Fine-tuning with a chat template feeds those tokens in and asks the model to predict
  them; a zero input row carries no signal and a zero output row makes the token's logit pinned to 0.
  Setting them to the mean of the trained rows gives them an ordinary starting point.
- A chat template without an `add_generation_prompt` block cannot prompt for an answer; the missing
  block is derived from how the template opens an assistant turn.
"""

from __future__ import annotations

import torch

from .chat_templates import _special_variables, jinja_literal, link_model, render, sync_generation_eos

# A row counts as untrained when its largest entry is this small relative to a typical row's largest
# entry (the median over the vocabulary); exact zeros always count.
_UNTRAINED_RATIO = 1e-3
_CHUNK_ROWS = 8192


def _row_absmax(weight: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.empty(rows, dtype=torch.float32, device=weight.device)
    for start in range(0, rows, _CHUNK_ROWS):
        out[start : start + _CHUNK_ROWS] = weight[start : min(start + _CHUNK_ROWS, rows)].abs().amax(dim=1).float()
    return out


def untrained_rows(weight: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Indices of rows (among the first `rows`) whose entries are all (near) zero."""
    rows = weight.shape[0] if rows is None else min(rows, weight.shape[0])
    absmax = _row_absmax(weight.detach(), rows)
    threshold = max(float(absmax.median()) * _UNTRAINED_RATIO, 0.0)
    return torch.nonzero((absmax <= threshold) | (absmax == 0), as_tuple=False).flatten()


@torch.no_grad()
def _set_to_mean(weight: torch.Tensor, rows: int, bad: torch.Tensor) -> None:
    good = torch.ones(rows, dtype=torch.bool, device=weight.device)
    good[bad] = False
    total = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    for start in range(0, rows, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, rows)
        total += weight[start:stop][good[start:stop]].float().sum(dim=0)
    mean = total / good.sum().clamp(min=1)
    weight[bad] = mean.to(weight.dtype)


@torch.no_grad()
def fix_untrained_tokens(model, tokenizer=None) -> list[int]:
    """Set untrained rows of the input embedding and of lm_head, among the tokenizer's ids, to the mean
    of the trained rows of the same matrix. Returns the ids changed (sorted). Call before adding LoRA."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    matrices = []
    for module in (base.get_input_embeddings(), base.get_output_embeddings()):
        weight = getattr(module, "weight", None)
        if weight is None or not weight.is_floating_point() or weight.device.type == "meta" or weight.dim() != 2:
            continue
        if any(weight is seen for seen in matrices):  # tied embeddings
            continue
        matrices.append(weight)
    fixed: set[int] = set()
    for weight in matrices:
        rows = min(len(tokenizer), weight.shape[0]) if tokenizer is not None else weight.shape[0]
        bad = untrained_rows(weight, rows)
        if 0 < bad.numel() < rows:
            _set_to_mean(weight.data, rows, bad)
            fixed.update(bad.tolist())
    return sorted(fixed)


_PROBE_USER = "fasttuneprobeuser"
_PROBE_ANSWER = "fasttuneprobeanswer"


def ensure_generation_prompt(tokenizer) -> bool:
    """Give a chat template that ignores `add_generation_prompt` the block that opens an assistant turn.
    Returns True when the template was changed."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return False
    variables = _special_variables(tokenizer)
    user = [{"role": "user", "content": _PROBE_USER}]
    try:
        with_prompt = render(template, user, add_generation_prompt=True, **variables)
        without_prompt = render(template, user, add_generation_prompt=False, **variables)
        answered = render(template, user + [{"role": "assistant", "content": _PROBE_ANSWER}], **variables)
    except Exception:  # a template that cannot render a one-turn probe is left as it is
        return False
    if with_prompt != without_prompt or not answered.startswith(without_prompt) or _PROBE_ANSWER not in answered:
        return False
    opening = answered[len(without_prompt) : answered.index(_PROBE_ANSWER)]
    if not opening:  # the template opens the answer itself (Mistral, Phi-4): nothing to add
        return False
    block = "{%- if add_generation_prompt -%}{{- " + jinja_literal(opening) + " -}}{%- endif -%}"
    tokenizer.chat_template = template + block
    return True


__all__ = ["ensure_generation_prompt", "fix_untrained_tokens", "link_model", "sync_generation_eos", "untrained_rows"]
