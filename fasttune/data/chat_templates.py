"""Chat templates by family name, with the end-of-turn token wired into training and generation.

`get_chat_template(tokenizer, "llama-3.1")` installs a template that renders text conversations to the
same string as the family's official template (the tests compare them), and with `map_eos_token=True`
makes the template's end-of-turn token the tokenizer's EOS and a stop token of every linked model's
`generate`. A fine-tune whose EOS is not the token that ends each assistant turn never learns to stop,
which is the quietest way to spoil one.

The templates are written for text conversations (system / user / assistant, and Qwen3 reasoning).
Tool calls raise: keep the model's own template for tool-use data.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field

# --------------------------------------------------------------------------------------------
# The templates. `@SYSTEM@` becomes the default system message (a jinja literal or `none`) and
# `@END_OF_TEXT@` the family's end-of-sequence string, both fixed when the template is installed:
# transformers gives a template only the messages and the special tokens.
# --------------------------------------------------------------------------------------------

_NO_TOOLS = r"""
{%- if tools -%}
{{- raise_exception("this chat template renders text conversations only; keep the model's own template for tool calls") -}}
{%- endif -%}
"""


def _alternation(first_index: str = "0") -> str:
    return (
        r"{%- if (message['role'] == 'user') != (loop.index0 % 2 == " + first_index + r") -%}"
        r"{{- raise_exception('after an optional system message, roles must alternate user/assistant/user/assistant/...') -}}"
        r"{%- endif -%}"
    )


_UNKNOWN_ROLE = r"{{- raise_exception('this chat template knows the roles system, user and assistant, not ' + message['role']) -}}"

# What every template starts with: the default system message (fixed at install time) and no tools.
_HEAD = "\n{%- set default_system = @SYSTEM@ -%}\n" + _NO_TOOLS

# The first message as the system message if it is one, else the default; the rest as the turns.
_SPLIT_SYSTEM = r"""{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system_message = messages[0]['content'] -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_message = default_system -%}
{%- set loop_messages = messages -%}
{%- endif -%}"""


# Qwen 2.5 and 3: the conversation's system message, else the default one, as a ChatML system turn.
_QWEN_SYSTEM = r"""{%- if messages and messages[0]['role'] == 'system' -%}
{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' -}}
{%- elif default_system is not none -%}
{{- '<|im_start|>system\n' + default_system + '<|im_end|>\n' -}}
{%- endif -%}"""


def _default_system_turn(turn: str) -> str:
    """`turn` (a jinja expression of default_system) when the conversation brings no system message."""
    return (
        "{%- if default_system is not none and (not messages or messages[0]['role'] != 'system') -%}\n"
        "{{- " + turn + " -}}\n"
        "{%- endif -%}"
    )


def _generation_prompt(opening: str) -> str:
    return "{%- if add_generation_prompt -%}\n{{- " + opening + " -}}\n{%- endif -%}\n"


def _prefixed_turns(system_sep: str, user: tuple, assistant: tuple, generation: str) -> str:
    """Plain-text formats: an optional system paragraph, then each turn as prefix + content + suffix."""
    return _HEAD + "\n{{- bos_token -}}\n" + _SPLIT_SYSTEM + (
        "\n{%- if system_message -%}\n"
        "{{- system_message + " + system_sep + " -}}\n"
        "{%- endif -%}\n"
        "{%- for message in loop_messages -%}\n"
        "{%- if message['role'] == 'user' -%}\n"
        "{{- " + user[0] + " + message['content'] + " + user[1] + " -}}\n"
        "{%- elif message['role'] == 'assistant' -%}\n"
        "{{- " + assistant[0] + " + message['content'] + " + assistant[1] + " -}}\n"
        "{%- else -%}\n"
    ) + _UNKNOWN_ROLE + "\n{%- endif -%}\n{%- endfor -%}\n" + _generation_prompt(generation)

CHATML = _HEAD + r"""
""" + _default_system_turn(r"'<|im_start|>system\n' + default_system + '<|im_end|>\n'") + r"""
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
""" + _generation_prompt(r"'<|im_start|>assistant\n'")

QWEN25 = _HEAD + r"""
""" + _QWEN_SYSTEM + r"""
{%- for message in messages -%}
{%- if message['role'] == 'system' and loop.first -%}
{%- elif message['role'] in ('user', 'system', 'assistant') -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- else -%}
""" + _UNKNOWN_ROLE + r"""
{%- endif -%}
{%- endfor -%}
""" + _generation_prompt(r"'<|im_start|>assistant\n'")

# Qwen3 keeps the reasoning of assistant turns after the last user query (and an empty think block on
# the final one) and drops it from earlier turns, as its official template does.
QWEN3 = _HEAD + r"""
""" + _QWEN_SYSTEM + r"""
{%- set ns = namespace(last_query=messages|length - 1) -%}
{%- for message in messages -%}
{%- if message['role'] == 'user' and message['content'] is string and not (message['content'].startswith('<tool_response>') and message['content'].endswith('</tool_response>')) -%}
{%- set ns.last_query = loop.index0 -%}
{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
{%- set content = message['content'] if message['content'] is string else '' -%}
{%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) -%}
{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' -}}
{%- elif message['role'] == 'assistant' -%}
{%- set reasoning = '' -%}
{%- if message['reasoning_content'] is string -%}
{%- set reasoning = message['reasoning_content'] -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') -}}
{%- else -%}
{{- '<|im_start|>assistant\n' + content -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- elif message['role'] == 'system' -%}
{%- else -%}
""" + _UNKNOWN_ROLE + r"""
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}
{{- '<think>\n\n</think>\n\n' -}}
{%- endif -%}
{%- endif -%}
"""

LLAMA3 = _HEAD + r"""
{{- bos_token -}}
""" + _default_system_turn(r"'<|start_header_id|>system<|end_header_id|>\n\n' + default_system | trim + '<|eot_id|>'") + r"""
{%- for message in messages -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
""" + _generation_prompt(r"'<|start_header_id|>assistant<|end_header_id|>\n\n'")

# Llama 3.1 and later always open with a system header that carries the knowledge cut-off and a date.
_LLAMA31_BODY = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system_message = messages[0]['content'] | trim -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_message = (default_system | trim) if default_system is not none else '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' -}}
{{- 'Cutting Knowledge Date: December 2023\n' + 'Today Date: ' + date_string + '\n\n' -}}
{{- system_message + '<|eot_id|>' -}}
{%- for message in loop_messages -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
""" + _generation_prompt(r"'<|start_header_id|>assistant<|end_header_id|>\n\n'")

LLAMA31 = _HEAD + r"""
{{- bos_token -}}
{%- if date_string is not defined -%}
{%- set date_string = '26 Jul 2024' -%}
{%- endif -%}
""" + _LLAMA31_BODY

LLAMA32 = _HEAD + r"""
{{- bos_token -}}
{%- if date_string is not defined -%}
{%- if strftime_now is defined -%}
{%- set date_string = strftime_now('%d %b %Y') -%}
{%- else -%}
{%- set date_string = '26 Jul 2024' -%}
{%- endif -%}
{%- endif -%}
""" + _LLAMA31_BODY

# Mistral's instruct format before the v3 tokenizers. Its official template refuses a system message;
# here one is put before the first user message, separated by a blank line, as Mistral's later templates do.
MISTRAL = _HEAD + r"""
""" + _SPLIT_SYSTEM + r"""
{{- bos_token -}}
{%- for message in loop_messages -%}
""" + _alternation() + r"""
{%- if message['role'] == 'user' -%}
{%- if loop.first and system_message is not none -%}
{{- '[INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' -}}
{%- else -%}
{{- '[INST] ' + message['content'] + ' [/INST]' -}}
{%- endif -%}
{%- else -%}
{{- message['content'] + eos_token -}}
{%- endif -%}
{%- endfor -%}
"""

# Gemma 1 and 2 refuse a system message; Gemma 3 puts it at the top of the first user turn. All three
# use the Gemma 3 rule here, which renders the others' conversations unchanged.
GEMMA = _HEAD + r"""
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- if messages[0]['content'] is string -%}
{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
{%- else -%}
{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
{%- endif -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = (default_system + '\n\n') if default_system is not none else '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
""" + _alternation() + r"""
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') -}}
{%- if message['content'] is string -%}
{{- message['content'] | trim -}}
{%- else -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'image' -%}
{{- '<start_of_image>' -}}
{%- elif item['type'] == 'text' -%}
{{- item['text'] | trim -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<end_of_turn>\n' -}}
{%- endfor -%}
""" + _generation_prompt(r"'<start_of_turn>model\n'")


def _phi3(skip_empty_system: bool) -> str:
    system_test = "message['role'] == 'system'" + (" and message['content']" if skip_empty_system else "")
    return _HEAD + r"""
""" + _default_system_turn(r"'<|system|>\n' + default_system + '<|end|>\n'") + r"""
{%- for message in messages -%}
{%- if """ + system_test + r""" -%}
{{- '<|system|>\n' + message['content'] + '<|end|>\n' -}}
{%- elif message['role'] in ('user', 'assistant') -%}
{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' -}}
{%- elif message['role'] != 'system' -%}
""" + _UNKNOWN_ROLE + r"""
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|assistant|>\n' -}}
{%- else -%}
{{- @END_OF_TEXT@ -}}
{%- endif -%}
"""


PHI3 = _phi3(skip_empty_system=False)
PHI35 = _phi3(skip_empty_system=True)

# Phi-4 opens the assistant turn right after every user turn, so add_generation_prompt adds nothing.
PHI4 = _HEAD + r"""
""" + _default_system_turn(r"'<|im_start|>system<|im_sep|>' + default_system + '<|im_end|>'") + r"""
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{{- '<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>' -}}
{%- elif message['role'] == 'user' -%}
{{- '<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|><|im_start|>assistant<|im_sep|>' -}}
{%- elif message['role'] == 'assistant' -%}
{{- message['content'] + '<|im_end|>' -}}
{%- else -%}
""" + _UNKNOWN_ROLE + r"""
{%- endif -%}
{%- endfor -%}
"""

ZEPHYR = _HEAD + r"""
""" + _default_system_turn(r"'<|system|>\n' + default_system + eos_token + '\n'") + r"""
{%- for message in messages -%}
{%- if message['role'] in ('system', 'user', 'assistant') -%}
{{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' -}}
{%- else -%}
""" + _UNKNOWN_ROLE + r"""
{%- endif -%}
{%- endfor -%}
""" + _generation_prompt(r"'<|assistant|>\n'")

# Stanford Alpaca's prompt, repeated for every turn of a multi-turn conversation.
ALPACA = _prefixed_turns(r"'\n\n'", (r"'### Instruction:\n'", r"'\n\n'"),
                         (r"'### Response:\n'", r"eos_token + '\n\n'"), r"'### Response:\n'")

# Vicuna v1.1 as LMSYS's FastChat writes it: "SYSTEM USER: ... ASSISTANT: ...</s>USER: ...".
VICUNA = _prefixed_turns(r"' '", (r"'USER: '", r"' '"), (r"'ASSISTANT: '", "eos_token"), r"'ASSISTANT:'")


@dataclass(frozen=True)
class ChatTemplate:
    """One family's format. `stop` is the literal token that ends each turn; None means the turn ends
    with the tokenizer's own EOS (`eos_token` in the template)."""

    name: str
    source: str
    stop: str | None
    instruction_part: str
    response_part: str
    default_system: str | None = None
    official: str = ""
    aliases: tuple = field(default=())


_CHATML_PARTS = ("<|im_start|>user\n", "<|im_start|>assistant\n")
_LLAMA3_PARTS = ("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n")
_GEMMA_PARTS = ("<start_of_turn>user\n", "<start_of_turn>model\n")
_PHI3_PARTS = ("<|user|>\n", "<|assistant|>\n")

_TEMPLATE_LIST = (
    ChatTemplate("chatml", CHATML, "<|im_end|>", *_CHATML_PARTS,
                 official="ChatML (OpenAI), as SmolLM2 and OpenHermes ship it"),
    ChatTemplate("qwen2.5", QWEN25, "<|im_end|>", *_CHATML_PARTS,
                 default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                 official="Qwen/Qwen2.5-*-Instruct", aliases=("qwen-2.5", "qwen25", "qwen2")),
    ChatTemplate("qwen3", QWEN3, "<|im_end|>", *_CHATML_PARTS, official="Qwen/Qwen3-*", aliases=("qwen-3",)),
    ChatTemplate("llama-3", LLAMA3, "<|eot_id|>", *_LLAMA3_PARTS, official="meta-llama/Meta-Llama-3-*-Instruct",
                 aliases=("llama3",)),
    ChatTemplate("llama-3.1", LLAMA31, "<|eot_id|>", *_LLAMA3_PARTS, official="meta-llama/Llama-3.1-*-Instruct",
                 aliases=("llama3.1", "llama-31", "llama-3.3", "llama3.3")),
    ChatTemplate("llama-3.2", LLAMA32, "<|eot_id|>", *_LLAMA3_PARTS, official="meta-llama/Llama-3.2-*-Instruct",
                 aliases=("llama3.2", "llama-32")),
    ChatTemplate("mistral", MISTRAL, None, "[INST]", "[/INST]", official="mistralai/Mistral-7B-Instruct-v0.2"),
    ChatTemplate("gemma", GEMMA, "<end_of_turn>", *_GEMMA_PARTS, official="google/gemma-7b-it", aliases=("gemma-1",)),
    ChatTemplate("gemma2", GEMMA, "<end_of_turn>", *_GEMMA_PARTS, official="google/gemma-2-*-it", aliases=("gemma-2",)),
    ChatTemplate("gemma3", GEMMA, "<end_of_turn>", *_GEMMA_PARTS, official="google/gemma-3-*-it", aliases=("gemma-3",)),
    ChatTemplate("phi-3", PHI3, "<|end|>", *_PHI3_PARTS, official="microsoft/Phi-3-mini-4k-instruct",
                 aliases=("phi3",)),
    ChatTemplate("phi-3.5", PHI35, "<|end|>", *_PHI3_PARTS, official="microsoft/Phi-3.5-mini-instruct",
                 aliases=("phi3.5", "phi-35")),
    ChatTemplate("phi-4", PHI4, "<|im_end|>", "<|im_start|>user<|im_sep|>", "<|im_start|>assistant<|im_sep|>",
                 official="microsoft/phi-4", aliases=("phi4",)),
    ChatTemplate("zephyr", ZEPHYR, None, "<|user|>\n", "<|assistant|>\n", official="HuggingFaceH4/zephyr-7b-beta"),
    ChatTemplate("alpaca", ALPACA, None, "### Instruction:\n", "### Response:\n",
                 default_system="Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.",
                 official="tatsu-lab/stanford_alpaca prompt, one block per turn"),
    ChatTemplate("vicuna", VICUNA, None, "USER:", "ASSISTANT:",
                 default_system="A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.",
                 official="lmsys/vicuna-*-v1.1+ (FastChat vicuna_v1.1)", aliases=("vicuna_v1.1", "vicuna-v1.1")),
)

CHAT_TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in _TEMPLATE_LIST}
_ALIASES = {alias: t.name for t in _TEMPLATE_LIST for alias in t.aliases}


def template_names() -> list[str]:
    return sorted(CHAT_TEMPLATES)


def lookup(name: str) -> ChatTemplate:
    key = name.strip().lower()
    for candidate in (key, key.replace("_", "-")):
        candidate = _ALIASES.get(candidate, candidate)
        if candidate in CHAT_TEMPLATES:
            return CHAT_TEMPLATES[candidate]
    raise ValueError(
        f"chat_template={name!r} is not a template fasttune knows; use one of {', '.join(template_names())}, "
        "or pass (jinja_template, end_of_turn_token)"
    )


# --------------------------------------------------------------------------------------------
# Building a template string
# --------------------------------------------------------------------------------------------


def jinja_literal(value: str | None) -> str:
    """`value` as a jinja string literal (jinja unescapes backslash sequences like Python)."""
    if value is None:
        return "none"
    for raw, escaped in (("\\", "\\\\"), ("'", "\\'"), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        value = value.replace(raw, escaped)
    return f"'{value}'"


def build_template(template: ChatTemplate, system_message: str | None = None, end_of_text: str | None = None) -> str:
    """The jinja string of `template` with its default system message and end-of-text fixed.

    Whitespace between tags in the sources is layout only; every tag strips it, so the one-line form
    stored in tokenizer_config.json renders the same."""
    system = template.default_system if system_message is None else system_message
    body = template.source.replace("@SYSTEM@", jinja_literal(system))
    eot = jinja_literal(end_of_text) if end_of_text is not None else "eos_token"
    body = body.replace("@END_OF_TEXT@", eot)
    return "".join(line.strip() for line in body.strip().splitlines())


_DEFAULT_MAPPING = {"role": "role", "content": "content", "user": "user", "assistant": "assistant"}


def _mapping_preamble(mapping: dict) -> str:
    """Jinja that rewrites ShareGPT-style messages ({"from": "human", "value": ...}) to role/content
    before the template proper reads them."""
    role_key = mapping.get("role", "role")
    content_key = mapping.get("content", "content")
    roles = {}
    for canonical in ("system", "user", "assistant"):
        given = mapping.get(canonical)
        if given is not None and given != canonical:
            roles[given] = canonical
    roles_literal = "{" + ", ".join(f"{jinja_literal(k)}: {jinja_literal(v)}" for k, v in roles.items()) + "}"
    return (
        "{%- set _fasttune_roles = " + roles_literal + " -%}"
        "{%- set _fasttune_ns = namespace(messages=[]) -%}"
        "{%- for m in messages -%}"
        "{%- set _fasttune_ns.messages = _fasttune_ns.messages + [{'role': _fasttune_roles.get(m["
        + jinja_literal(role_key) + "], m[" + jinja_literal(role_key) + "]), 'content': m["
        + jinja_literal(content_key) + "]}] -%}"
        "{%- endfor -%}"
        "{%- set messages = _fasttune_ns.messages -%}"
    )


# --------------------------------------------------------------------------------------------
# Rendering without a tokenizer call (used by the probes below and by the tests)
# --------------------------------------------------------------------------------------------


def render(chat_template: str, messages: list, add_generation_prompt: bool = False, **variables) -> str:
    """Render `chat_template` the way transformers' apply_chat_template(tokenize=False) does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=chat_template, add_generation_prompt=add_generation_prompt, **variables
    )
    return rendered[0]


def _special_variables(tokenizer) -> dict:
    return {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str) or hasattr(v, "content")}


# --------------------------------------------------------------------------------------------
# Instruction / response parts, found by rendering a probe conversation
# --------------------------------------------------------------------------------------------

_PROBE = ("fasttuneprobeuserone", "fasttuneprobeanswerone", "fasttuneprobeusertwo", "fasttuneprobeanswertwo")


@dataclass(frozen=True)
class TemplateParts:
    instruction_part: str  # opens a user turn
    response_part: str  # opens an assistant turn; what follows it is trained
    end_of_turn: str | None  # closes an assistant turn (trained too), when the template shows one


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def detect_parts(tokenizer=None, chat_template: str | None = None, **variables) -> TemplateParts:
    """Instruction and response markers of a chat template, read off a rendered probe conversation.

    The assistant turn opens with the text between the first user message and the first answer; where
    the template has a generation prompt that ends that text, the generation prompt alone is used (it is
    exactly what generation starts from). The user turn opens with the text between the first answer and
    the second user message, less the end-of-turn that both that text and the conversation's tail share."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "the tokenizer has no chat template; call get_chat_template(tokenizer, 'chatml') (or the template of "
            "your model's family) first, or pass instruction_part and response_part"
        )
    variables = {**(_special_variables(tokenizer) if tokenizer is not None else {}), **variables}
    u1, a1, u2, a2 = _PROBE
    messages = [
        {"role": "user", "content": u1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": u2},
        {"role": "assistant", "content": a2},
    ]
    full = render(template, messages, **variables)
    positions = [full.find(s) for s in _PROBE]
    if min(positions) < 0 or positions != sorted(positions):
        raise ValueError("could not find the messages of a probe conversation in the rendered chat template; "
                         "pass instruction_part and response_part")
    between_user_answer = full[positions[0] + len(u1): positions[1]]
    between_answer_user = full[positions[1] + len(a1): positions[2]]
    tail = full[positions[3] + len(a2):]

    end_of_turn_text = _common_prefix(between_answer_user, tail)
    if len(end_of_turn_text) < min(len(between_answer_user), len(tail)):
        # Both go on past the end of the turn and merely start alike ("<|end|>\n<|user|>" and
        # "<|end|>\n<|endoftext|>"): keep the prefix up to its last token-like boundary.
        cut = max(end_of_turn_text.rfind(c) for c in "\n >]")
        end_of_turn_text = end_of_turn_text[: cut + 1] if cut >= 0 else ""
    instruction = between_answer_user[len(end_of_turn_text):].lstrip().rstrip(" ")
    end_of_turn = end_of_turn_text.strip() or None

    with_prompt = render(template, messages[:1], add_generation_prompt=True, **variables)
    without_prompt = render(template, messages[:1], add_generation_prompt=False, **variables)
    generation_prompt = with_prompt[len(without_prompt):] if with_prompt.startswith(without_prompt) else ""
    at = between_user_answer.rfind(generation_prompt) if generation_prompt.strip() else -1
    if at >= 0 and not between_user_answer[at + len(generation_prompt):].strip():
        # Generation starts right after the generation prompt, so training does too (Vicuna's "ASSISTANT:"
        # is followed by a space that belongs to the answer's first token).
        response = generation_prompt
    else:
        response = between_user_answer
        if end_of_turn and response.lstrip().startswith(end_of_turn):
            response = response.lstrip()[len(end_of_turn):]
        eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
        if eos and response.lstrip().startswith(eos):
            response = response.lstrip()[len(eos):]
        response = response.lstrip()
    if not instruction.strip() or not response.strip():
        raise ValueError(
            f"could not tell the user and assistant markers of this chat template apart (found {instruction!r} and "
            f"{response!r}); pass instruction_part and response_part"
        )
    return TemplateParts(instruction, response, end_of_turn)


# --------------------------------------------------------------------------------------------
# End-of-turn token as EOS, and the models that generate with it
# --------------------------------------------------------------------------------------------

_LINKED_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def link_model(model, tokenizer) -> None:
    """Remember that `model` generates with `tokenizer`, so that a later get_chat_template updates the
    model's stop tokens too."""
    try:
        _LINKED_MODELS.setdefault(tokenizer, weakref.WeakSet()).add(model)
    except TypeError:  # an unhashable tokenizer class: for_inference still syncs
        pass


def _base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sync_generation_eos(model, tokenizer) -> None:
    """Make the tokenizer's EOS (after get_chat_template: the template's end-of-turn token) a stop token
    of `model.generate`, keeping the stop tokens the model already had."""
    config = getattr(_base_of(model), "generation_config", None)
    eos_id = tokenizer.eos_token_id
    if config is None or eos_id is None:
        return
    current = config.eos_token_id
    ids = [] if current is None else ([current] if isinstance(current, int) else list(current))
    extra = getattr(tokenizer, "_fasttune_stop_ids", ())
    wanted = [eos_id] + [i for i in extra if i != eos_id]
    merged = wanted + [i for i in ids if i not in wanted]
    config.eos_token_id = merged[0] if len(merged) == 1 else merged


def _single_token_id(tokenizer, text: str) -> int | None:
    vocab = tokenizer.get_vocab()
    return vocab.get(text)


def _rename_token(tokenizer, old: str, new: str) -> None:
    """Give the vocabulary entry `old` the text `new`: text `new` then encodes to `old`'s id and that id
    decodes to `new`. This is how a template's end-of-turn token becomes a model's existing EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NotImplementedError(
            f"this {type(tokenizer).__name__} has no fast (tokenizers) backend, so {old!r} cannot be renamed to "
            f"{new!r}; pass map_eos_token=False, or load the fast tokenizer"
        )
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    for added in data.get("added_tokens", []):
        if added["content"] == old:
            added["content"] = new
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, dict) and old in vocab:  # BPE, WordPiece
        vocab[new] = vocab.pop(old)
    elif isinstance(vocab, list):  # Unigram: [piece, score] pairs
        for entry in vocab:
            if entry[0] == old:
                entry[0] = new
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    for attribute in tokenizer.SPECIAL_TOKENS_ATTRIBUTES:
        value = tokenizer._special_tokens_map.get(attribute)
        if value is not None and str(value) == old:
            setattr(tokenizer, attribute, new)


def _notice(message: str) -> None:
    print(f"fasttune: {message}", flush=True)


def _map_eos(tokenizer, stop: str) -> None:
    """Make `stop` the tokenizer's EOS: in the vocabulary already, it becomes eos_token; otherwise the
    current EOS token is renamed to it, so the model's trained EOS row ends every turn."""
    from .tokenizer import choose_pad_token

    old_eos = tokenizer.eos_token
    if stop == old_eos:
        return
    if _single_token_id(tokenizer, stop) is not None:
        tokenizer.eos_token = stop
    elif old_eos is None:
        raise ValueError(
            f"the template ends turns with {stop!r}, which this tokenizer does not have, and the tokenizer has no "
            "EOS token to map it to; pass map_eos_token=False or use the template of your model's family"
        )
    else:
        pad_was_eos = tokenizer.pad_token == old_eos
        _rename_token(tokenizer, old_eos, stop)
        _notice(f"the template ends turns with {stop!r}, which this tokenizer lacks; the EOS token {old_eos!r} "
                f"(id {tokenizer.eos_token_id}) now reads {stop!r}")
        if pad_was_eos:
            tokenizer.pad_token = stop
    if tokenizer.pad_token is not None and tokenizer.pad_token == tokenizer.eos_token:
        # Padding with the EOS would mask the end-of-turn labels; the EOS from before is free now.
        pad = choose_pad_token(tokenizer)
        if pad is None and old_eos is not None and _single_token_id(tokenizer, old_eos) is not None:
            pad = old_eos
        if pad is not None:
            tokenizer.pad_token = pad


def get_chat_template(
    tokenizer,
    chat_template="chatml",
    mapping: dict | None = None,
    map_eos_token: bool = True,
    system_message: str | None = None,
):
    """Install a chat template on `tokenizer` (in place, and returned, as Unsloth's is).

    chat_template: a name (`template_names()`), or `(jinja_template, end_of_turn)` where end_of_turn is a
        token string or "eos_token".
    mapping: for ShareGPT messages, e.g. {"role": "from", "content": "value", "user": "human",
        "assistant": "gpt"}; the template then reads them as they are.
    map_eos_token: make the template's end-of-turn token the EOS used in training and generation.
    system_message: the default system message, used when a conversation has none (replaces the
        family's own default where it has one: Qwen2.5, Alpaca, Vicuna).
    """
    if isinstance(chat_template, (tuple, list)):
        if len(chat_template) != 2 or not all(isinstance(x, str) for x in chat_template):
            raise ValueError("chat_template as a tuple must be (jinja_template, end_of_turn_token)")
        source, stop = chat_template
        if system_message is not None:
            raise ValueError("system_message works with the named templates; write it into your own template instead")
        jinja = source
        stop = None if stop == "eos_token" else stop
        name = "custom"
    elif isinstance(chat_template, str):
        template = lookup(chat_template)
        stop = template.stop
        # Phi-3 closes a training sequence with the family's end-of-text after the end-of-turn token. When
        # the end-of-turn token becomes the EOS, that end-of-text is the EOS from before; when the EOS was
        # renamed to the end-of-turn token (it was not in the vocabulary), the sequence ends at the turn.
        end_of_text = None
        if map_eos_token and stop is not None and tokenizer.eos_token != stop:
            end_of_text = tokenizer.eos_token if _single_token_id(tokenizer, stop) is not None else ""
        jinja = build_template(template, system_message=system_message, end_of_text=end_of_text)
        name = template.name
    else:
        raise TypeError(
            f"chat_template must be a template name or (jinja_template, end_of_turn), got {chat_template!r}")

    if mapping is not None and dict(mapping) != _DEFAULT_MAPPING:
        jinja = _mapping_preamble(dict(mapping)) + jinja

    stop_ids = ()
    if stop is not None:
        if map_eos_token:
            _map_eos(tokenizer, stop)
        stop_id = _single_token_id(tokenizer, stop)
        if stop_id is None:
            _notice(f"the {name} template ends turns with {stop!r}, which this tokenizer splits into several tokens, "
                    "so generation cannot stop on it; pass map_eos_token=True or use your model's family template")
        else:
            stop_ids = (stop_id,)
    tokenizer._fasttune_stop_ids = stop_ids

    tokenizer.chat_template = jinja
    for model in list(_LINKED_MODELS.get(tokenizer, ())):
        sync_generation_eos(model, tokenizer)
    return tokenizer


__all__ = [
    "CHAT_TEMPLATES",
    "ChatTemplate",
    "TemplateParts",
    "build_template",
    "detect_parts",
    "get_chat_template",
    "jinja_literal",
    "link_model",
    "lookup",
    "render",
    "sync_generation_eos",
    "template_names",
]
