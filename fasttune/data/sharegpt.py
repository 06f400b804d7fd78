"""Datasets into the role/content conversations that chat templates read.

`standardize_sharegpt` turns ShareGPT records ({"from": "human", "value": ...}) into
{"role": "user", "content": ...}; `to_sharegpt` turns instruction/output columns into ShareGPT
conversations, optionally merging several columns into the prompt and several rows into one
multi-turn conversation.
"""

from __future__ import annotations

import random
import re

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "input": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "output": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
}
_ROLE_KEYS = ("role", "from")
_CONTENT_KEYS = ("content", "value", "text")


def _conversation_column(columns, first_row: dict) -> str:
    for preferred in ("conversations", "messages", "conversation"):
        if preferred in columns:
            return preferred
    for column in columns:
        value = first_row.get(column)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return column
    raise ValueError(
        f"found no conversation column among {list(columns)}: expected a column of message lists such as "
        "'conversations' ([{'from': 'human', 'value': ...}, ...]); for instruction/output columns use to_sharegpt"
    )


def _keys(message: dict) -> tuple[str, str]:
    role = next((k for k in _ROLE_KEYS if k in message), None)
    content = next((k for k in _CONTENT_KEYS if k in message), None)
    if role is None or content is None:
        raise ValueError(f"a message has keys {sorted(message)}; expected a role ('role' or 'from') and a content "
                         "('content', 'value' or 'text')")
    return role, content


def standardize_message(message: dict, aliases: dict) -> dict:
    role_key, content_key = _keys(message)
    role = str(message[role_key]).strip().lower()
    if role not in aliases:
        raise ValueError(f"unknown role {message[role_key]!r}; known: {sorted(aliases)} (pass aliases= to add one)")
    return {"role": aliases[role], "content": message[content_key]}


def standardize_conversation(conversation: list, aliases: dict | None = None) -> list[dict]:
    aliases = ROLE_ALIASES if aliases is None else {**ROLE_ALIASES, **{k.lower(): v for k, v in aliases.items()}}
    return [standardize_message(m, aliases) for m in conversation]


def standardize_sharegpt(dataset, aliases: dict | None = None, num_proc: int | None = None, **unused):
    """Rewrite the conversation column (e.g. 'conversations') to role/content messages with the roles
    system / user / assistant. Accepts a datasets.Dataset, an IterableDataset, or a list of conversations.

    aliases: extra role names, e.g. {"customer": "user"}.
    """
    for name in unused:
        if name not in ("tokenizer", "batch_size", "aliases_for_system", "aliases_for_user", "aliases_for_assistant"):
            raise TypeError(f"standardize_sharegpt got an unexpected argument {name!r}")
    merged = dict(aliases or {})
    named = (("aliases_for_system", "system"), ("aliases_for_user", "user"), ("aliases_for_assistant", "assistant"))
    for name, role in named:
        for alias in unused.get(name) or ():
            merged[alias] = role

    if isinstance(dataset, list):
        return [standardize_conversation(c, merged) for c in dataset]

    from datasets import Dataset

    first = next(iter(dataset))
    column = _conversation_column(dataset.column_names or list(first), first)

    def convert(batch):
        return {column: [standardize_conversation(c, merged) for c in batch[column]]}

    kwargs = {"batched": True}
    if isinstance(dataset, Dataset):
        kwargs.update(num_proc=num_proc, desc="Standardizing conversations")
    return dataset.map(convert, **kwargs)


standardize_data_formats = standardize_sharegpt

_OPTIONAL = re.compile(r"\[\[(.*?)\]\]", re.S)
_FIELD = re.compile(r"\{([^{}]+)\}")


def _empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def merge_prompt(template: str, row: dict) -> str:
    """Fill `{column}` fields from `row`; a `[[...]]` section is dropped when a column it names is empty."""
    def optional(match):
        section = match.group(1)
        if any(_empty(row.get(name)) for name in _FIELD.findall(section)):
            return ""
        return section

    text = _OPTIONAL.sub(optional, template)
    missing = [name for name in _FIELD.findall(text) if name not in row]
    if missing:
        raise KeyError(f"merged_prompt names {missing}, which are not columns of the dataset ({sorted(row)})")
    return _FIELD.sub(lambda m: "" if row[m.group(1)] is None else str(row[m.group(1)]), text)


def to_sharegpt(
    dataset,
    merged_prompt: str = "",
    merged_column_name: str = "instruction",
    output_column_name: str = "output",
    remove_unused_columns: bool = True,
    conversation_extension: int = 1,
    random_state: int = 3407,
):
    """Build a ShareGPT 'conversations' column from instruction/output columns.

    merged_prompt: e.g. "{instruction}[[\\nInput:\\n{input}]]" merges columns into the prompt (the
        bracketed part only where 'input' is not empty); empty uses `merged_column_name` as the prompt.
    conversation_extension: chain this many random rows into one multi-turn conversation.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise TypeError("to_sharegpt needs a datasets.Dataset")
    if conversation_extension < 1:
        raise ValueError(f"conversation_extension must be at least 1, got {conversation_extension}")
    if output_column_name not in dataset.column_names:
        raise KeyError(f"output_column_name={output_column_name!r} is not a column ({dataset.column_names})")
    if not merged_prompt and merged_column_name not in dataset.column_names:
        raise KeyError(f"merged_column_name={merged_column_name!r} is not a column ({dataset.column_names}); "
                       "pass merged_prompt to build the prompt from columns")

    def one_turn(row):
        prompt = merge_prompt(merged_prompt, row) if merged_prompt else str(row[merged_column_name])
        return [{"from": "human", "value": prompt}, {"from": "gpt", "value": str(row[output_column_name])}]

    rows = dataset.to_list()
    turns = [one_turn(r) for r in rows]
    conversations = []
    rng = random.Random(random_state)
    for i in range(len(rows)):
        conversation = list(turns[i])
        for _ in range(conversation_extension - 1):
            conversation += turns[rng.randrange(len(rows))]
        conversations.append(conversation)
    if remove_unused_columns:
        return Dataset.from_dict({"conversations": conversations})
    return dataset.add_column("conversations", conversations)


__all__ = ["ROLE_ALIASES", "merge_prompt", "standardize_conversation", "standardize_data_formats",
           "standardize_sharegpt", "to_sharegpt"]
