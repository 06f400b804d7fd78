"""Train on the assistant's turns only.

`train_on_responses_only(trainer)` rewrites the `labels` of a trainer's tokenized datasets so that only
what follows each response marker (e.g. `<|im_start|>assistant\\n`) up to and including the end-of-turn
token counts in the loss. Markers are matched on the text: each document is decoded and re-encoded with
character offsets, which is exact whenever the re-encoding gives back the same ids (the usual case, as
the ids came from encoding that text). A marker's tokens depend on the text after it (`\\n\\n` followed
by a word tokenizes differently from `\\n\\n` at the end of a string), so matching the marker's own
token ids, which is the fallback, can miss turns.

Packed rows (TRL's `seq_lengths` column) are split into their documents first, so that no document's
prompt is trained because the previous document ended inside a response.
"""

from __future__ import annotations

from .chat_templates import TemplateParts, detect_parts


def _find_all(text: str, part: str) -> list[int]:
    found, start = [], text.find(part)
    while start >= 0:
        found.append(start)
        start = text.find(part, start + max(len(part), 1))
    return found


def response_regions(text: str, parts: TemplateParts, last_response_only: bool = False) -> list[tuple[int, int]]:
    """Character spans [start, end) of the text to train on: after each response marker, up to the end of
    the first end-of-turn token, or the next marker, or the end of the text."""
    openers = sorted(_find_all(text, parts.instruction_part) + _find_all(text, parts.response_part))
    regions = []
    for marker in _find_all(text, parts.response_part):
        start = marker + len(parts.response_part)
        later = [o for o in openers if o >= start]
        end = later[0] if later else len(text)
        if parts.end_of_turn:
            stop = text.find(parts.end_of_turn, start, end)
            if stop >= 0:
                end = stop + len(parts.end_of_turn)
        if end > start:
            regions.append((start, end))
    return regions[-1:] if last_response_only else regions


def _token_ends(tokenizer, ids: list[int]) -> tuple[str, list[int]] | None:
    """(text, end offset of each token) when decoding then encoding `ids` gives back `ids`."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # tokenizers without offsets
        return None
    if list(encoded["input_ids"]) != list(ids):
        return None
    return text, [end for _, end in encoded["offset_mapping"]]


def _find_ids(ids: list[int], pattern: list[int]) -> list[int]:
    n = len(pattern)
    if n == 0:
        return []
    first = pattern[0]
    return [i for i in range(len(ids) - n + 1) if ids[i] == first and ids[i : i + n] == pattern]


def _marker_ids(tokenizer, marker: str, ids: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each occurrence of `marker` in `ids`, trying the marker as written and without
    its surrounding whitespace (whose tokens merge with the neighbouring text: "\\n\\n" alone is one
    token, "\\n\\nParis" may start with two). A match without the trailing whitespace is extended over
    the tokens that spell it."""
    cores = dict.fromkeys((marker, marker.rstrip(), marker.strip()))
    # A space before the marker merges into its first token in most BPE vocabularies (" [/INST]").
    for core, text in [(c, c) for c in cores] + [(c, " " + c) for c in cores if not c.startswith(" ")]:
        pattern = tokenizer(text, add_special_tokens=False)["input_ids"] if core else []
        hits = _find_ids(ids, pattern)
        if not hits:
            continue
        rest_of_marker = marker[marker.index(core) + len(core):]
        found = []
        for hit in hits:
            end, rest = hit + len(pattern), rest_of_marker
            while rest and end < len(ids):
                piece = tokenizer.decode([ids[end]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                if not piece or not rest.startswith(piece):
                    break
                rest, end = rest[len(piece):], end + 1
            found.append((hit, end - hit))
        return found
    return []


def _mask_by_tokens(tokenizer, ids: list[int], parts: TemplateParts, last_response_only: bool) -> list[bool]:
    responses = _marker_ids(tokenizer, parts.response_part, ids)
    openers = sorted(h for h, _ in responses + _marker_ids(tokenizer, parts.instruction_part, ids))
    stop_ids = tokenizer(parts.end_of_turn, add_special_tokens=False)["input_ids"] if parts.end_of_turn else []
    regions = []
    for hit, length in responses:
        start = hit + length
        later = [o for o in openers if o >= start]
        end = later[0] if later else len(ids)
        if stop_ids:
            stops = [s for s in _find_ids(ids[start:end], stop_ids)]
            if stops:
                end = start + stops[0] + len(stop_ids)
        if end > start:
            regions.append((start, end))
    if last_response_only:
        regions = regions[-1:]
    trained = [False] * len(ids)
    for start, end in regions:
        for i in range(start, end):
            trained[i] = True
    return trained


def response_mask(tokenizer, ids: list[int], parts: TemplateParts, last_response_only: bool = False) -> list[bool]:
    """For each token of one document: does it belong to an assistant response?"""
    ids = [int(i) for i in ids]
    if not ids:
        return []
    decoded = _token_ends(tokenizer, ids)
    if decoded is None:
        return _mask_by_tokens(tokenizer, ids, parts, last_response_only)
    text, ends = decoded
    regions = response_regions(text, parts, last_response_only)
    trained, r = [], 0
    for end in ends:
        while r < len(regions) and end > regions[r][1]:
            r += 1
        trained.append(r < len(regions) and regions[r][0] < end <= regions[r][1])
    return trained


def resolve_parts(tokenizer, instruction_part: str | None, response_part: str | None) -> TemplateParts:
    """The markers to use: detected from the chat template where not given, and the template's
    end-of-turn token where it can be found."""
    detected = None
    if instruction_part is None or response_part is None:
        detected = detect_parts(tokenizer)
    else:
        try:
            detected = detect_parts(tokenizer)
        except ValueError:
            detected = None
    instruction = instruction_part if instruction_part is not None else detected.instruction_part
    response = response_part if response_part is not None else detected.response_part
    if not instruction or not response:
        raise ValueError("instruction_part and response_part must be non-empty strings")
    end_of_turn = detected.end_of_turn if detected is not None else None
    return TemplateParts(instruction, response, end_of_turn)


def _documents(row_length: int, seq_lengths) -> list[tuple[int, int]]:
    if not seq_lengths:
        return [(0, row_length)]
    spans, start = [], 0
    for length in seq_lengths:
        spans.append((start, start + int(length)))
        start += int(length)
    if start != row_length:
        raise ValueError(f"seq_lengths add up to {start} but the row holds {row_length} tokens")
    return spans


def response_only_labels(tokenizer, input_ids, labels=None, seq_lengths=None, parts: TemplateParts | None = None,
                         last_response_only: bool = False) -> list[int]:
    """Labels of one (possibly packed) row with everything but assistant responses set to -100. Labels
    that were -100 already stay so."""
    parts = parts if parts is not None else resolve_parts(tokenizer, None, None)
    ids = [int(i) for i in input_ids]
    old = ids if labels is None else [int(x) for x in labels]
    out = [-100] * len(ids)
    for start, end in _documents(len(ids), seq_lengths):
        mask = response_mask(tokenizer, ids[start:end], parts, last_response_only)
        for offset, keep in enumerate(mask):
            if keep:
                out[start + offset] = old[start + offset]
    return out


def labeller(tokenizer, parts: TemplateParts, last_response_only: bool = False):
    """`labels_of(batch) -> {"labels": ...}` for a batch (dict of lists) of tokenized rows, as datasets.map
    passes them."""
    def labels_of(batch: dict) -> dict:
        n = len(batch["input_ids"])
        labels = batch.get("labels") or [None] * n
        lengths = batch.get("seq_lengths") or [None] * n
        return {"labels": [
            response_only_labels(tokenizer, batch["input_ids"][i], labels[i], lengths[i], parts, last_response_only)
            for i in range(n)
        ]}
    return labels_of


def _tokenizer_of(trainer, tokenizer):
    if tokenizer is None and trainer is not None:
        tokenizer = (getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
                     or getattr(getattr(trainer, "data_collator", None), "tokenizer", None))
    if tokenizer is None:
        raise ValueError("the trainer has no tokenizer (processing_class); pass tokenizer=")
    return getattr(tokenizer, "tokenizer", tokenizer)  # a processor's text tokenizer


def _with_response_labels(dataset, tokenizer, parts, last_response_only, num_proc, name):
    from datasets import Dataset, IterableDataset

    columns = dataset.column_names if isinstance(dataset, (Dataset, IterableDataset)) else None
    if columns is not None and "input_ids" not in columns:
        raise ValueError(
            f"the {name} dataset is not tokenized (columns {columns}); train_on_responses_only works on the "
            "trainer's tokenized dataset, so call it after building the trainer (SFTTrainer tokenizes then)"
        )

    kwargs = {"batched": True}
    if isinstance(dataset, Dataset):
        kwargs.update(num_proc=num_proc, desc=f"Masking all but responses ({name})")
    relabelled = dataset.map(labeller(tokenizer, parts, last_response_only), **kwargs)
    if isinstance(relabelled, Dataset) and len(relabelled):
        empty = sum(1 for row in relabelled["labels"] if all(x == -100 for x in row))
        if empty == len(relabelled):
            raise ValueError(
                f"no {name} example has a token left to train on: the response marker {parts.response_part!r} was "
                "not found. Check that the dataset was formatted with the tokenizer's chat template, or pass "
                "instruction_part and response_part"
            )
        if empty:
            print(f"fasttune: {empty} of {len(relabelled)} {name} examples have no response left to train on "
                  "(truncated before the first answer?); they add nothing to the loss", flush=True)
    return relabelled


def train_on_responses_only(trainer, instruction_part: str | None = None, response_part: str | None = None,
                            last_response_only: bool = False, num_proc: int | None = None, tokenizer=None,
                            force_match: bool = True, return_function: bool = False):
    """Mask the trainer's labels so that only assistant responses are trained (in place; returns the trainer).

    instruction_part / response_part: the text that opens a user / assistant turn; detected from the
        tokenizer's chat template when not given.
    last_response_only: train on the last response of each conversation only.
    return_function: return `labels_of(batch) -> {"labels": ...}` for a batch of tokenized rows instead
        of changing the trainer (trainer may then be None if tokenizer is given).
    """
    if not force_match:
        raise NotImplementedError(
            "force_match=False is not available: fasttune matches the markers on the decoded text, where "
            "whitespace merging into neighbouring tokens does not hide them; remove the argument"
        )
    tokenizer = _tokenizer_of(trainer, tokenizer)
    parts = resolve_parts(tokenizer, instruction_part, response_part)
    if return_function:
        return labeller(tokenizer, parts, last_response_only)
    trainer.train_dataset = _with_response_labels(trainer.train_dataset, tokenizer, parts, last_response_only,
                                                  num_proc, "train")
    evaluation = getattr(trainer, "eval_dataset", None)
    if isinstance(evaluation, dict):
        trainer.eval_dataset = {
            key: _with_response_labels(d, tokenizer, parts, last_response_only, num_proc, f"eval[{key}]")
            for key, d in evaluation.items()
        }
    elif evaluation is not None:
        trainer.eval_dataset = _with_response_labels(evaluation, tokenizer, parts, last_response_only, num_proc, "eval")

    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

    if isinstance(getattr(trainer, "data_collator", None), DataCollatorForLanguageModeling):
        # This collator rebuilds labels from input_ids and would undo the masking.
        trainer.data_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return trainer


__all__ = ["labeller", "resolve_parts", "response_mask", "response_only_labels", "response_regions",
           "train_on_responses_only"]
