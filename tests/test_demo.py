"""The embedded demo: its shipped data, and a few-step run end to end on the real SmolLM2-135M."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from fasttune import demo

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "fasttune" / "demo_data"


def _generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    _generator().main(["--out-dir", str(tmp_path)])
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), (
            f"fasttune/demo_data/{name} differs from a fresh run of scripts/make_demo_data.py; rerun it"
        )


def test_package_reads_the_same_rows_as_the_files():
    for name in ("train", "test"):
        lines = (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert demo.load_split(name) == [json.loads(line) for line in lines]


# Parsed with datetime's own strptime, independently of the generator's formatting code.
_LAYOUTS = ("%B %d, %Y", "%d %B %Y", "%b %d, %Y", "%d %b %Y", "%Y/%m/%d", "%d.%m.%Y")


def _parse(text: str) -> dt.date:
    if text.endswith(" (US)"):
        return dt.datetime.strptime(text[:-5], "%m/%d/%Y").date()
    if text.endswith(" (EU)"):
        return dt.datetime.strptime(text[:-5], "%d/%m/%Y").date()
    m = re.fullmatch(r"(\d{1,2})(st|nd|rd|th) of ([A-Za-z]+), (\d{4})", text)
    if m:
        day = int(m.group(1))
        suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
        assert m.group(2) == suffix, text
        return dt.datetime.strptime(f"{day} {m.group(3)} {m.group(4)}", "%d %B %Y").date()
    m = re.fullmatch(r"([A-Za-z]+), (.+)", text)
    if m:
        date = dt.datetime.strptime(m.group(2), "%B %d, %Y").date()
        assert m.group(1) == ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday",
                              "Sunday")[date.weekday()], text
        return date
    for layout in _LAYOUTS:
        try:
            return dt.datetime.strptime(text, layout).date()
        except ValueError:
            pass
    raise AssertionError(f"no known layout parses {text!r}")


def test_answers_are_correct_and_test_dates_are_unseen():
    prefix = "Convert to ISO 8601 (YYYY-MM-DD): "
    dates = {}
    for name in ("train", "test"):
        rows = demo.load_split(name)
        assert rows
        dates[name] = set()
        for row in rows:
            user, assistant = row["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert user["content"].startswith(prefix)
            date = _parse(user["content"][len(prefix):])
            assert assistant["content"] == date.isoformat(), row
            dates[name].add(date)
    assert not dates["train"] & dates["test"], "a held-out date also appears in the training split"
    # commit-sized
    assert sum((DATA / f).stat().st_size for f in ("train.jsonl", "test.jsonl")) < 400_000


def test_training_labels_cover_only_the_answer_and_end_of_turn(smollm2_dir):
    from transformers import AutoTokenizer

    from fasttune.data.chat_templates import get_chat_template
    from fasttune.data.responses_only import resolve_parts

    tokenizer = get_chat_template(AutoTokenizer.from_pretrained(smollm2_dir), "chatml", system_message=demo.SYSTEM)
    row = demo.load_split("test")[0]
    ids, labels = demo.encode_example(tokenizer, row, resolve_parts(tokenizer, None, None))
    kept = [i for i, t in enumerate(labels) if t != -100]
    assert kept == list(range(kept[0], kept[-1] + 1)), "the labelled tokens are one contiguous answer"
    assert tokenizer.decode([ids[i] for i in kept]) == row["messages"][1]["content"] + "<|im_end|>"
    assert tokenizer.eos_token == "<|im_end|>"  # what generation stops at is what training taught
    # everything before the answer is exactly the prompt generation sees
    assert tokenizer.decode(ids[: kept[0]]) == demo.prompt_text(tokenizer, row["messages"][0]["content"])


def test_short_run_end_to_end(tmp_path, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = demo.run(steps=3, batch_size=4, eval_size=4, output_dir=tmp_path, quiet=True)
    losses = result["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert 0.0 <= result["accuracy_before"] <= 1.0 and 0.0 <= result["accuracy_after"] <= 1.0
    assert result["eval_size"] == 4 and len(result["samples"]) == 3
    assert result["tokens_per_second"] > 0 and result["wall_seconds"] > result["train_seconds"] > 0

    lora = tmp_path / "lora"
    assert (lora / "adapter_config.json").is_file() and (lora / "tokenizer_config.json").is_file()
    # The merged checkpoint, run by plain transformers (its own forward, no PEFT), answers as the
    # trained adapter did: greedy decoding in fp32 is token-identical when the merge is right.
    merged = tmp_path / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    tokenizer.padding_side = "left"
    assert not hasattr(model.model, "_fasttune_state") and model.config.model_type == "llama"
    answers = demo.generate_answers(model, tokenizer, [s["prompt"] for s in result["samples"]])
    if result["dtype"] == "float32":
        assert answers == [s["after"] for s in result["samples"]]


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        demo.main(["--dtype", "int3"])
    with pytest.raises(ValueError, match="positive"):
        demo.run(steps=0, quiet=True)
