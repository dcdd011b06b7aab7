"""Text to prompt ids: the one place where lmforge decides what a model reads.

* :func:`prompt_head` is the start-of-document rule: tokenizers whose own rules start texts with bos
  (Llama's) get it in front of every prompt; an empty prompt is the start-of-document token
  (:attr:`Tokenizer.start_ids`), so that there is something to continue.
* :func:`fit_prompt` fits ids into the context: kept whole, cut from the start (``truncate``), or refused
  with :func:`context_error`, the one context-length error (a :class:`ContextLengthError` with the
  numbers; the server answers it with a 400 ``context_length_exceeded``).
* The prompted tasks of a causal language model (summarize, translate, answer, analyze) fill a template
  (:data:`TASK_TEMPLATES`), sent as a user message when the tokenizer has a chat template
  (:func:`task_prompt`). A task input too long for the context is refused, or with ``truncate`` its
  document (the text to summarize or translate, the context of a question) loses its start.
  :class:`lmforge.api.LanguageModel` and the server's task endpoints build their prompts here, so they
  read the same ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.data.formats import chat_prompt_ids, to_messages
from lmforge.errors import ConfigError, ContextLengthError, DataError, RequestError
from lmforge.tokenizer import Tokenizer

SUMMARIZE_TEMPLATE = "{text}\n\nTL;DR:"
TRANSLATE_TEMPLATE = "Translate this text from {source} to {target}.\n{source}: {text}\n{target}:"
ANALYZE_TEMPLATE = "{context}\n\n{text}"
#: How a QA example is put to the model; the answer is generated after it, up to a newline.
QA_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"
#: How a text and a candidate label are joined for zero-shot classification. ``{label}`` comes last;
#: the spaces before it belong to the label (so BPE sees " positive" as in running text).
CLASSIFICATION_TEMPLATE = "Text: {text}\nLabel: {label}"

#: what the context-length error of a task input suggests (the API's argument and the HTTP field are both named so)
TRUNCATE_HINT = "; shorten it, or set truncate to cut its start"

#: task -> (template, the field that truncation shortens)
TASK_TEMPLATES = {
    "summarize": (SUMMARIZE_TEMPLATE, "text"),
    "translate": (TRANSLATE_TEMPLATE, "text"),
    "answer": (QA_TEMPLATE, "context"),
    "analyze": (ANALYZE_TEMPLATE, "context"),
}


@dataclass(frozen=True)
class Prompt:
    """Prompt ids as the model reads them, and how many tokens truncation dropped."""

    ids: list[int]
    dropped: int = 0


def prompt_head(tokenizer: Tokenizer, empty: bool = False) -> list[int]:
    """The start-of-document rule: bos for tokenizers that start texts with it, the start-of-document
    token for an ``empty`` prompt, else nothing."""
    return list(tokenizer.start_ids) if tokenizer.adds_bos or empty else []


def document_head(tokenizer: Tokenizer) -> list[int]:
    """What a scored text is read after: the start-of-document token, so its first token is scored too."""
    return list(tokenizer.start_ids)


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a prompt text, with :func:`prompt_head` in front."""
    return prompt_head(tokenizer, not text) + (tokenizer.encode(text) if text else [])


def context_error(what: str, tokens: int, context: int, param: str | None = None, room: int = 0,
                  hint: str = "") -> ContextLengthError:
    """The context-length error: ``the {what} is N tokens long but the model's context is M tokens``."""
    need = f", with room needed for {'at least one new token' if room == 1 else f'{room} new tokens'}" if room else ""
    return ContextLengthError(f"the {what} is {tokens} tokens long but the model's context is {context} tokens"
                              f"{need}{hint}", param)


def fit_prompt(ids: Sequence[int], tokenizer: Tokenizer, context: int, *, room: int = 0, truncate: bool = False,
               reserve: int = 0, what: str = "prompt", param: str | None = "prompt", hint: str = "") -> Prompt:
    """``ids`` fitted to a ``context``: whole when they leave ``room`` positions free; else, with
    ``truncate``, without their start (a leading bos stays) so that ``max(room, reserve)`` positions are
    free (``reserve`` at most half the context); else :func:`context_error`. Empty ids become the
    start-of-document token."""
    ids = list(ids) or list(tokenizer.start_ids)
    if len(ids) <= context - room:
        return Prompt(ids, 0)
    if not truncate:
        raise context_error(what, len(ids), context, param, room, hint)
    head = ids[:1] if tokenizer.adds_bos and ids[0] == tokenizer.bos_id else []
    keep = max(1, context - max(room, min(reserve, context // 2)) - len(head))
    return Prompt(head + ids[-keep:], len(ids) - len(head) - keep)


def chat_prompt(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation (``[{"role", "content"}]``) through the tokenizer's chat template
    (lmforge's default one if it has none), ending with the cue for the assistant's answer."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    try:
        return chat_prompt_ids(tokenizer, to_messages({"messages": messages}, "chat"))
    except DataError as exc:
        raise RequestError(str(exc), param="messages") from None


def task_prompt(tokenizer: Tokenizer, task: str, fields: dict[str, str], context: int, *, reserve: int = 0,
                truncate: bool = False) -> Prompt:
    """Prompt ids of a prompted task (:data:`TASK_TEMPLATES`) for a causal language model: the filled
    template, as a user message when the tokenizer has a chat template. It must leave room for one new
    token; with ``truncate`` the task's document field loses its start instead (leaving room for
    ``reserve`` new tokens, at most half the context), else it is a :func:`context_error` naming that
    field."""
    template, document = TASK_TEMPLATES[task]
    room = max(1, min(reserve, context // 2)) if truncate else 1
    chat = tokenizer.chat_template is not None
    if not chat:
        return templated_prompt(tokenizer, template, fields, document, context - room, truncate, param=document)
    ids = chat_prompt(tokenizer, [{"role": "user", "content": _fill(template, fields)}])
    if len(ids) <= context - room:
        return Prompt(ids, 0)
    if not truncate:
        raise context_error(f"prompt made from the {document}", len(ids), context, document, 1, TRUNCATE_HINT)
    body = tokenizer.encode(fields[document])
    keep, dropped = len(body) - (len(ids) - (context - room)), 0
    while keep > 0:  # the chat template may tokenize the cut text a little differently: shorten until it fits
        cut = {**fields, document: tokenizer.decode(body[len(body) - keep:])}
        ids = chat_prompt(tokenizer, [{"role": "user", "content": _fill(template, cut)}])
        dropped = len(body) - keep
        if len(ids) <= context - room:
            return Prompt(ids, dropped)
        keep -= max(1, len(ids) - (context - room))
    raise context_error(f"prompt made from the {document}", len(ids), context, document, room,
                        f"; not even without its {document}")


def templated_prompt(tokenizer: Tokenizer, template: str, fields: dict[str, str], document: str, budget: int,
                     truncate: bool = True, param: str | None = None) -> Prompt:
    """Ids of ``template`` filled with ``fields`` (``{name}`` replaced literally, so braces in the
    values are safe), with :func:`prompt_head`, in at most ``budget`` tokens. When the whole does not
    fit, the ``document`` field loses its start (``truncate``; if not even the rest fits, the end of the
    rest is kept) or it is a :func:`context_error`."""
    if template.count("{" + document + "}") != 1:
        raise ConfigError(f"the template needs one {{{document}}}, got {template!r}")
    head = prompt_head(tokenizer)
    ids = head + tokenizer.encode(_fill(template, fields))
    if len(ids) <= budget:
        return Prompt(ids, 0)
    if not truncate:
        raise context_error(f"prompt made from the {document}", len(ids), budget + 1, param, 1, TRUNCATE_HINT)
    before, after = (_fill(part, fields) for part in template.split("{" + document + "}"))
    parts = [tokenizer.encode(before), tokenizer.encode(fields[document]), tokenizer.encode(after)]
    keep = budget - len(head) - len(parts[0]) - len(parts[2])
    if keep <= 0:  # not even the rest fits: keep its end
        rest = parts[0] + parts[2]
        return Prompt(head + rest[len(rest) - (budget - len(head)):], len(parts[1]))
    return Prompt(head + parts[0] + parts[1][len(parts[1]) - keep:] + parts[2], len(parts[1]) - keep)


def qa_prompt(tokenizer: Tokenizer, context: str, question: str, budget: int,
              template: str = QA_TEMPLATE) -> tuple[list[int], int]:
    """Prompt ids of a QA example in at most ``budget`` tokens (no chat template); a context that does
    not fit loses its start. Returns the ids and how many context tokens were dropped."""
    if template.count("{context}") != 1 or template.count("{question}") != 1:
        raise ConfigError("a QA template needs one {context} and one {question}")
    prompt = templated_prompt(tokenizer, template, {"context": context, "question": question}, "context", budget)
    return prompt.ids, prompt.dropped


def _fill(template: str, fields: dict[str, str]) -> str:
    """``template`` with each ``{name}`` of ``fields`` replaced in one pass (values are never re-read)."""
    return _FIELD.sub(lambda match: fields.get(match.group(1), match.group(0)), template)


_FIELD = re.compile(r"\{(\w+)\}")
