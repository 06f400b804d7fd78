"""Padding-free batches: documents laid end to end, each with its own positions.

A row holds several documents; `position_ids` restart at 0 where each begins, and fasttune's forward
(and transformers' own, when no attention_mask is given) lets a token attend only within its document.
The first label of every document is -100, so the last token of one document is never asked to
predict the first token of the next. Each document's loss terms are then exactly those it has alone.

TRL's SFTTrainer does the same with `SFTConfig(packing=True)` (its "bfd" strategy) or
`padding_free=True`; this collator is the equivalent for `transformers.Trainer` and plain loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _as_list(values) -> list[int]:
    if isinstance(values, torch.Tensor):
        return values.tolist()
    return [int(v) for v in values]


def split_documents(example: dict) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each document in one example; `seq_lengths` (TRL's packed datasets) splits
    a packed example into its documents."""
    ids = _as_list(example["input_ids"])
    labels = example.get("labels")
    labels = ids if labels is None else _as_list(labels)
    if len(labels) != len(ids):
        raise ValueError(f"an example has {len(ids)} input_ids but {len(labels)} labels")
    lengths = example.get("seq_lengths") or [len(ids)]
    docs, start = [], 0
    for length in lengths:
        docs.append((ids[start : start + int(length)], labels[start : start + int(length)]))
        start += int(length)
    if start != len(ids):
        raise ValueError(f"seq_lengths add up to {start} but the example holds {len(ids)} tokens")
    return [d for d in docs if d[0]]


@dataclass
class PackingCollator:
    """Collate examples into padding-free rows: `input_ids`, `labels`, `position_ids` (and use_cache=False),
    no attention_mask.

    max_length: the longest row; documents go into rows in order, a new row starting when the next
        document does not fit. A document longer than max_length is cut to max_length. None puts the
        whole batch into one row.
    pad_to_multiple_of: rows are padded (pad_token_id, label -100, each padding token a document of its
        own) to a multiple of this.
    """

    pad_token_id: int = 0
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        docs = [doc for example in examples for doc in split_documents(example)]
        if not docs:
            raise ValueError("the batch holds no tokens")
        rows: list[list[tuple[list[int], list[int]]]] = [[]]
        used = 0
        for ids, labels in docs:
            if self.max_length is not None:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
                if used + len(ids) > self.max_length and rows[-1]:
                    rows.append([])
                    used = 0
            rows[-1].append((ids, labels))
            used += len(ids)

        width = max(sum(len(ids) for ids, _ in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for ids, doc_labels in row:
                n = len(ids)
                input_ids[r, at : at + n] = torch.tensor(ids)
                labels[r, at : at + n] = torch.tensor(doc_labels)
                labels[r, at] = -100
                position_ids[r, at : at + n] = torch.arange(n)
                at += n
        # transformers' own forward (model types fasttune does not patch) keeps packed documents apart
        # only when it builds no KV cache, and it builds one whenever use_cache is left to the config.
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}


def packing_collator(tokenizer=None, max_length: int | None = None, pad_to_multiple_of: int | None = None):
    """A PackingCollator padding with the tokenizer's pad token."""
    pad = 0
    if tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return PackingCollator(pad_token_id=pad, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of)


__all__ = ["PackingCollator", "packing_collator", "split_documents"]
