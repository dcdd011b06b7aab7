"""Fine-tuning examples: read records, render them through a chat template, mask the prompt.

Record formats, recognised by their fields (or forced with ``format``):

    chat               {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
    alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
    prompt_completion  {"prompt": ..., "completion": ...}
    text               {"text": ...}, or a plain-text file (continued pretraining)

Alpaca records become a two-message conversation (user: instruction + input, assistant: output) and
go through the chat template stored with the tokenizer, like chat records. Prompt/completion
records are used as they are: prompt, then completion, then end-of-sequence. Templates are Jinja,
in the Hugging Face convention (``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``), rendered in a sandbox. Special-token text written by the template (``<|eos|>``,
``<|im_end|>``) becomes the special token; the same text inside a message stays literal (message
contents are rendered as placeholders and encoded on their own, so a template that transforms
contents, e.g. with ``| trim``, sees the placeholder, not the text).

:func:`encode_example` returns token ids and labels in which prompt tokens are ``IGNORE`` (-100),
so the loss covers only what the model should learn to write: each assistant turn and the tokens
that end it (end-of-sequence for the default template), or the completion.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer

IGNORE = -100
FORMATS = ("auto", "chat", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")

# For tokenizers without a template of their own (lmforge's): plain-text turns, and the
# end-of-sequence token after every assistant turn, so that generation learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] }}"
    "{% else %}{{ '### Assistant:\\n' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ('\\n\\n' if messages else '') + '### Assistant:\\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file, a JSON file holding a list, or a plain-text file (one ``text`` record)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(records, list):
            raise DataError(f"{path} should hold a JSON list of records")
    elif suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {number}: not valid JSON ({exc})") from None
    else:
        records = [{"text": text}] if text.strip() else []
    if not records:
        raise DataError(f"{path} holds no examples")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataError(f"{path}, record {number}: expected a JSON object, not {type(record).__name__}")
    return records


def detect_format(record: dict[str, Any]) -> str:
    """The format of one record, from its fields."""
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    raise DataError(f"cannot tell the format of a record with fields {sorted(record)}: expected messages, "
                    f"instruction/output, prompt/completion or text")


def record_format(records: list[dict[str, Any]], forced: str = "auto") -> str:
    """The one format of a data set (``forced`` unless ``auto``); mixed formats are an error."""
    if forced not in FORMATS:
        raise DataError(f"data format must be one of {', '.join(FORMATS)}, not {forced!r}")
    if forced != "auto":
        return forced
    found = {detect_format(r) for r in records}
    if len(found) > 1:
        raise DataError(f"the data mixes formats ({', '.join(sorted(found))}); use one per file")
    return found.pop()


def to_messages(record: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """A chat or alpaca record as a checked list of messages."""
    if fmt == "alpaca":
        prompt = _field(record, "instruction")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError("an alpaca 'input' must be text")
        user = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _field(record, "output")}]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list")
    out = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES or \
                not isinstance(message.get("content"), str):
            raise DataError(f"each message needs a role ({', '.join(ROLES)}) and text content, got {message!r}"[:200])
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _field(record: dict[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise DataError(f"field {name!r} must be text, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------------
# Chat templates
# ------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    except TemplateError as exc:
        raise DataError(f"the chat template is not valid Jinja: {exc}") from None


def chat_template(tokenizer: Tokenizer) -> str:
    """The tokenizer's chat template, or lmforge's default one."""
    return tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as text, through the tokenizer's chat template (special tokens as text)."""
    from jinja2 import TemplateError

    special = tokenizer.special
    try:
        return _compile(chat_template(tokenizer)).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=special.get("bos", ""), eos_token=special.get("eos", ""))
    except TemplateError as exc:
        raise DataError(f"the chat template failed: {exc}") from None


# Messages are rendered with placeholders for their contents, so that special-token text in the
# template becomes special tokens while the same text inside a message stays literal.
_MARK = re.compile("\U000F0000(\\d+)\U000F0001")


def _marked(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{**m, "content": f"\U000F0000{i}\U000F0001"} for i, m in enumerate(messages)]


def _encode_rendered(tokenizer: Tokenizer, text: str, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of text rendered from :func:`_marked` messages: template text with special tokens,
    message contents literally."""
    ids: list[int] = []
    for i, part in enumerate(_MARK.split(text)):
        if i % 2:
            ids += tokenizer.encode(messages[int(part)]["content"])
        elif part:
            ids += tokenizer.encode_with_special(part)
    return ids


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation followed by the cue for the assistant's next turn."""
    return _encode_rendered(tokenizer, render_chat(tokenizer, _marked(messages), add_generation_prompt=True),
                            messages)


# ------------------------------------------------------------------------------------------
# Examples -> ids and labels
# ------------------------------------------------------------------------------------------
def encode_example(record: dict[str, Any], fmt: str, tokenizer: Tokenizer,
                   train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of one record; labels are ``IGNORE`` where the loss should not look
    (prompt tokens, unless ``train_on_prompt``)."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    if fmt == "text":
        ids = tokenizer.encode(_field(record, "text")) + eos
        return ids, list(ids)
    if fmt == "prompt_completion":
        prompt = tokenizer.encode(_field(record, "prompt"))
        completion = tokenizer.encode(_field(record, "completion")) + eos
        return prompt + completion, (prompt if train_on_prompt else [IGNORE] * len(prompt)) + completion
    messages = to_messages(record, fmt)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("a conversation without an assistant message has nothing to learn")
    ids: list[int] = []
    labels: list[int] = []
    marked = _marked(messages)
    done = ""  # text rendered so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # What precedes this answer (ending with the assistant cue), then the answer with its end.
        before = render_chat(tokenizer, marked[:i], add_generation_prompt=True)
        after = render_chat(tokenizer, marked[:i + 1])
        if not before.startswith(done) or not after.startswith(before):
            raise DataError("the chat template does not render conversations as growing prefixes, so prompt "
                            "tokens cannot be told apart from answers")
        prompt = _encode_rendered(tokenizer, before[len(done):], messages)
        answer = _encode_rendered(tokenizer, after[len(before):], messages)
        ids += prompt + answer
        labels += (prompt if train_on_prompt else [IGNORE] * len(prompt)) + answer
        done = after
    return ids, labels


def prompt_and_reference(record: dict[str, Any], fmt: str, tokenizer: Tokenizer) -> tuple[list[int], str]:
    """Prompt token ids and the reference answer of a record (its last assistant turn or completion),
    for evaluating generation."""
    if fmt == "prompt_completion":
        return tokenizer.encode(_field(record, "prompt")), _field(record, "completion")
    if fmt == "text":
        raise DataError("plain text records have no reference answer to compare generations with")
    messages = to_messages(record, fmt)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError("a conversation without an assistant message has no reference answer")
    return chat_prompt_ids(tokenizer, messages[:last]), messages[last]["content"]


def iter_encoded(records: list[dict[str, Any]], fmt: str, tokenizer: Tokenizer,
                 train_on_prompt: bool = False) -> Iterator[tuple[list[int], list[int]]]:
    for number, record in enumerate(records, 1):
        try:
            yield encode_example(record, fmt, tokenizer, train_on_prompt)
        except DataError as exc:
            raise DataError(f"example {number}: {exc}") from None
