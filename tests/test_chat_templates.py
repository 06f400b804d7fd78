"""Chat templates: each family's rendering against its official template, the end-of-turn token as EOS.

Oracles: official jinja templates vendored in tests/fixtures/templates/ (sources in SOURCES.md) and
SmolLM2's own template read from its tokenizer, all rendered by transformers' jinja renderer; FastChat's
Vicuna/Zephyr strings (fastchat_expected.json); and, where no official template exists, the expected
string written out below from the format's documentation.
"""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from fasttune.chat_templates import CHAT_TEMPLATES, get_chat_template
from fasttune.data.chat_templates import build_template, detect_parts, lookup, render

FIXTURES = Path(__file__).parent / "fixtures" / "templates"

SYSTEM = "You are a terse assistant."
TURNS = [("Hello", "Hi there"), ("Who are you", "   I am an assistant   "), ("Line one\nLine two", "Done.")]


def conversation(system: bool = True, generation: bool = False) -> list:
    """Three turns; for a generation prompt the last answer is left out. Whitespace around an answer and a
    newline inside a question catch templates that trim or escape differently."""
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for user, answer in TURNS:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages[:-1] if generation else messages


LLAMA = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
GEMMA = dict(bos_token="<bos>", eos_token="<eos>")
# (fasttune name, official template file, special tokens as the family's tokenizer has them, system supported)
OFFICIAL = [
    ("chatml", "chatml_openhermes", dict(eos_token="<|im_end|>"), True),
    ("llama-3", "llama3", LLAMA, True),
    ("llama-3.1", "llama3_1", LLAMA, True),
    ("llama-3.2", "llama3_2", {**LLAMA, "date_string": "02 Jan 2025"}, True),
    ("mistral", "mistral_v0.2", dict(bos_token="<s>", eos_token="</s>"), False),
    ("gemma", "gemma", GEMMA, False),
    ("gemma2", "gemma", GEMMA, False),
    ("gemma3", "gemma3", GEMMA, True),
    ("qwen2.5", "qwen2_5", dict(eos_token="<|im_end|>"), True),
    ("qwen3", "qwen3", dict(eos_token="<|im_end|>"), True),
    ("phi-3", "phi3", dict(bos_token="<s>", eos_token="<|endoftext|>"), True),
    ("phi-3.5", "phi3_5", dict(bos_token="<s>", eos_token="<|endoftext|>"), True),
    ("phi-4", "phi4", dict(eos_token="<|im_end|>"), True),
    ("zephyr", "zephyr", dict(eos_token="</s>"), True),
]


def official(file: str) -> str:
    return (FIXTURES / f"{file}.jinja").read_text()


@pytest.mark.parametrize("generation", [False, True], ids=["training", "generation"])
@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
@pytest.mark.parametrize("name,file,tokens,has_system", OFFICIAL, ids=[o[0] for o in OFFICIAL])
def test_renders_exactly_as_the_official_template(name, file, tokens, has_system, system, generation):
    messages = conversation(system, generation)
    ours = render(build_template(lookup(name)), messages, add_generation_prompt=generation, **tokens)
    if system and not has_system:
        with pytest.raises(Exception):  # the official template refuses a system message; ours accepts one
            render(official(file), messages, add_generation_prompt=generation, **tokens)
        return
    assert ours == render(official(file), messages, add_generation_prompt=generation, **tokens)


@pytest.mark.parametrize("generation", [False, True])
@pytest.mark.parametrize("name", ["gemma", "gemma2"])
def test_gemma_system_message_goes_where_gemma3_puts_it(name, generation):
    messages = conversation(True, generation)
    ours = render(build_template(lookup(name)), messages, add_generation_prompt=generation, **GEMMA)
    assert ours == render(official("gemma3"), messages, add_generation_prompt=generation, **GEMMA)


def test_mistral_system_message_opens_the_first_instruction():
    ours = render(build_template(lookup("mistral")), conversation(True), bos_token="<s>", eos_token="</s>")
    expected = (
        "<s>[INST] You are a terse assistant.\n\nHello [/INST]Hi there</s>"
        "[INST] Who are you [/INST]   I am an assistant   </s>"
        "[INST] Line one\nLine two [/INST]Done.</s>"
    )
    assert ours == expected


def test_chatml_equals_smollm2_own_template(smollm2_dir):
    """SmolLM2's tokenizer ships a ChatML template that adds its own default system message."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    own = tokenizer.chat_template
    smol_default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for system in (True, False):
        for generation in (False, True):
            messages = conversation(system, generation)
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            assert expected == render(own, messages, add_generation_prompt=generation)
            ours = build_template(lookup("chatml"), system_message=smol_default)
            assert render(ours, messages, add_generation_prompt=generation) == expected


QWEN3_REASONING = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6", "reasoning_content": "add again"},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "<think>\nearlier\n</think>\nYou are welcome"},
]


@pytest.mark.parametrize("cut", [2, 4, 6])
@pytest.mark.parametrize("enable_thinking", [None, False])
def test_qwen3_reasoning_matches_official(cut, enable_thinking):
    messages = QWEN3_REASONING[:cut]
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    for generation in (False, True):
        ours = render(build_template(lookup("qwen3")), messages, add_generation_prompt=generation, **extra)
        assert ours == render(official("qwen3"), messages, add_generation_prompt=generation, **extra)


def test_llama31_default_date_and_system_message():
    messages = conversation(False)
    assert render(build_template(lookup("llama-3.1")), messages, **LLAMA) == render(official("llama3_1"), messages, **LLAMA)
    with_default = render(build_template(lookup("llama-3.1"), system_message=SYSTEM), messages, **LLAMA)
    assert with_default == render(official("llama3_1"), conversation(True), **LLAMA)


def test_default_system_message_is_replaced_by_system_message():
    no_system = conversation(False)
    qwen = render(build_template(lookup("qwen2.5"), system_message=SYSTEM), no_system)
    assert qwen == render(official("qwen2_5"), conversation(True))
    assert "You are Qwen" in render(build_template(lookup("qwen2.5")), no_system)


def fastchat():
    return json.loads((FIXTURES / "fastchat_expected.json").read_text())


@pytest.mark.parametrize("system", [True, False])
@pytest.mark.parametrize("generation", [False, True])
def test_vicuna_matches_fastchat(system, generation):
    key = f"vicuna_v1.1|{'system' if system else 'no-system'}|{'generation' if generation else 'training'}"
    ours = render(build_template(lookup("vicuna")), conversation(system, generation), add_generation_prompt=generation,
                  bos_token="<s>", eos_token="</s>")
    assert ours == "<s>" + fastchat()[key]  # FastChat's string is tokenized with the BOS added


@pytest.mark.parametrize("generation", [False, True])
def test_zephyr_matches_fastchat(generation):
    key = f"zephyr|system|{'generation' if generation else 'training'}"
    ours = render(build_template(lookup("zephyr")), conversation(True, generation), add_generation_prompt=generation,
                  eos_token="</s>")
    assert ours == fastchat()[key]


def test_alpaca_multi_turn_format():
    ours = render(build_template(lookup("alpaca")), conversation(False, True), add_generation_prompt=True,
                  bos_token="<s>", eos_token="</s>")
    stanford = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    expected = (
        f"<s>{stanford}\n\n"
        "### Instruction:\nHello\n\n### Response:\nHi there</s>\n\n"
        "### Instruction:\nWho are you\n\n### Response:\n   I am an assistant   </s>\n\n"
        "### Instruction:\nLine one\nLine two\n\n### Response:\n"
    )
    assert ours == expected


def test_every_template_has_known_markers_and_the_probe_finds_them():
    for name, template in CHAT_TEMPLATES.items():
        parts = detect_parts(chat_template=build_template(template), bos_token="<s>", eos_token="</s>")
        assert (parts.instruction_part, parts.response_part) == (template.instruction_part, template.response_part), name
        assert parts.end_of_turn == (template.stop or "</s>"), name


@pytest.mark.parametrize("file", sorted(p.stem for p in FIXTURES.glob("*.jinja")))
def test_probe_reads_official_templates_like_ours(file):
    ours = {o[1]: o[0] for o in OFFICIAL}
    name = ours[file]
    tokens = next(o[2] for o in OFFICIAL if o[1] == file)
    parts = detect_parts(chat_template=official(file), **tokens)
    template = lookup(name)
    assert (parts.instruction_part, parts.response_part) == (template.instruction_part, template.response_part)
    assert parts.end_of_turn == (template.stop or tokens["eos_token"])


def test_names_are_case_and_alias_tolerant():
    assert lookup("Llama3").name == "llama-3"
    assert lookup("qwen-2.5").name == "qwen2.5"
    assert lookup("gemma_3").name == "gemma3"
    assert lookup("PHI-4").name == "phi-4"
    with pytest.raises(ValueError, match="chatml"):
        lookup("no-such-template")


# --------------------------------------------------------------------------------------------
# On a real tokenizer: the end-of-turn token becomes the EOS
# --------------------------------------------------------------------------------------------


@pytest.fixture
def smol(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    # SmolLM2's own EOS; transformers 5.17 reads the GGUF's EOS as <|im_start|>.
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"  # as fasttune's loader picks it
    return tokenizer


def test_tokenizer_renders_what_the_template_renders(smol):
    get_chat_template(smol, "llama-3.1")
    messages = conversation(True)
    text = smol.apply_chat_template(messages, tokenize=False, date_string="26 Jul 2024")
    assert text == render(official("llama3_1"), messages, bos_token=smol.bos_token, eos_token=smol.eos_token)


def test_end_of_turn_in_vocabulary_becomes_eos(smol):
    smol.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]})
    eot = smol.convert_tokens_to_ids("<|eot_id|>")
    assert get_chat_template(smol, "llama-3") is smol
    assert smol.eos_token == "<|eot_id|>" and smol.eos_token_id == eot
    ids = smol.apply_chat_template(conversation(True), tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(eot) == 7  # every turn ends with it
    assert smol.pad_token != smol.eos_token


def test_missing_end_of_turn_renames_the_eos_token(smol, tmp_path):
    old_eos_id = smol.eos_token_id
    get_chat_template(smol, "gemma3")
    assert smol.eos_token == "<end_of_turn>" and smol.eos_token_id == old_eos_id
    assert smol.encode("<end_of_turn>", add_special_tokens=False) == [old_eos_id]
    assert smol.decode([old_eos_id]) == "<end_of_turn>"
    assert smol.pad_token != smol.eos_token
    smol.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.eos_token == "<end_of_turn>" and again.eos_token_id == old_eos_id
    assert again.apply_chat_template(conversation(True), tokenize=False) == smol.apply_chat_template(
        conversation(True), tokenize=False)


def test_map_eos_token_false_keeps_the_eos(smol, capsys):
    get_chat_template(smol, "gemma3", map_eos_token=False)
    assert smol.eos_token == "<|im_end|>"
    assert "generation cannot stop" in capsys.readouterr().out


def test_phi3_keeps_its_end_of_text_after_the_eos_moves(smol):
    """Phi-3 ends a training sequence with <|end|> then the tokenizer's end-of-text; after <|end|> becomes
    the EOS the rendering must still equal the official one under Phi-3's own tokens."""
    smol.add_special_tokens({"additional_special_tokens": ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]})
    smol.eos_token = "<|endoftext|>"
    smol.pad_token = "<|im_end|>"
    expected = render(official("phi3"), conversation(True), eos_token="<|endoftext|>")
    get_chat_template(smol, "phi-3")
    assert smol.eos_token == "<|end|>"
    assert smol.apply_chat_template(conversation(True), tokenize=False) == expected


def test_sharegpt_mapping_reads_from_value_messages(smol):
    sharegpt = [{"from": "system", "value": SYSTEM}]
    for user, answer in TURNS:
        sharegpt += [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    get_chat_template(smol, "chatml", mapping=mapping)
    assert smol.apply_chat_template(sharegpt, tokenize=False) == render(official("chatml_openhermes"), conversation(True))


def test_custom_template_tuple(smol):
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|endoftext|>' }}{% endfor %}"
    get_chat_template(smol, (template, "<|endoftext|>"))
    assert smol.chat_template == template
    assert smol.eos_token == "<|endoftext|>"
    assert smol.pad_token is not None and smol.pad_token != smol.eos_token


def test_tool_calls_are_refused_not_dropped():
    with pytest.raises(Exception, match="tool"):
        render(build_template(lookup("qwen2.5")), conversation(True), tools=[{"type": "function", "function": {"name": "f"}}])


def test_system_message_with_quotes_newlines_and_emoji_survives():
    system = "Don't \\ guess.\nSay \"I'm unsure\" instead 😀"
    rendered = render(build_template(lookup("chatml"), system_message=system), conversation(False))
    assert rendered.startswith("<|im_start|>system\n" + system + "<|im_end|>\n")
