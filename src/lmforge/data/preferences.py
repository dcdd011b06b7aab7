"""Preference pairs: a prompt with a chosen and a rejected reply, encoded for DPO and reward models.

A row is one of:

* ``{"prompt": str, "chosen": str, "rejected": str}``: plain text; the reply follows the prompt as
  written (e.g. Anthropic's ``"\\n\\nHuman: ... \\n\\nAssistant:"`` prompts and ``" reply"`` replies);
* ``{"prompt": [messages], "chosen": ..., "rejected": ...}`` where each reply is a string, an
  assistant message or a list of messages: rendered with the tokenizer's chat template;
* ``{"chosen": str | [messages], "rejected": ...}`` without a prompt: the two whole conversations,
  whose shared start is the prompt (TRL's implicit prompt; for text, cut after the last
  ``"Assistant:"`` of the shared start when there is one).

:func:`encode_reply` is the one way a (prompt, reply) pair becomes tokens, for training and for
scoring alike: ``prompt ids + reply ids + eos``, the prompt losing its start when the pair is longer
than ``max_length``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmforge.data.formats import DEFAULT_CHAT_TEMPLATE, chat_prompt_ids, encode_example, to_messages
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer

Messages = list[dict[str, str]]


@dataclass
class PreferencePair:
    """One encoded pair: both sequences are prompt + reply (+ eos); ``*_start`` is where the reply begins."""

    chosen: list[int]
    chosen_start: int
    rejected: list[int]
    rejected_start: int
    reference: tuple[float, float] | None = None  # the reference policy's (chosen, rejected) log-probabilities


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _reply_messages(value: Any, where: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [value]
    if _is_messages(value) and value:
        return list(value)
    raise DataError(f"{where}: a reply must be a text, a message or a list of messages")


def _shared_prefix(first: Any, second: Any) -> int:
    count = 0
    for a, b in zip(first, second):
        if a != b:
            break
        count += 1
    return count


def split_pair(row: dict[str, Any], where: str = "a preference row") -> tuple[str | Messages, Any, Any]:
    """(prompt, chosen, rejected) of a row in any of the module's forms, or a one-line DataError."""
    if not isinstance(row, dict):
        raise DataError(f"{where} must be a JSON object with chosen and rejected")
    missing = [key for key in ("chosen", "rejected") if row.get(key) is None]
    if missing:
        raise DataError(f"{where} has no {' or '.join(repr(k) for k in missing)} (fields: {', '.join(sorted(row))})")
    empty = [key for key in ("chosen", "rejected") if row[key] in ("", [])]
    if empty:
        raise DataError(f"{where} has an empty {' and an empty '.join(repr(k) for k in empty)} reply")
    chosen, rejected = row["chosen"], row["rejected"]
    if row.get("prompt") not in (None, "", []):
        return row["prompt"], chosen, rejected
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = chosen[:_shared_prefix(chosen, rejected)]
        cut = shared.rfind("Assistant:")
        cut = cut + len("Assistant:") if cut >= 0 else len(shared)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    if _is_messages(chosen) and _is_messages(rejected):
        shared = _shared_prefix(chosen, rejected)
        if shared == 0 or shared >= min(len(chosen), len(rejected)):
            raise DataError(f"{where}: the chosen and rejected conversations share no prompt or no reply")
        return chosen[:shared], chosen[shared:], rejected[shared:]
    raise DataError(f"{where} has no prompt, and chosen and rejected are not both texts or conversations")


def encode_reply(tokenizer: Tokenizer, prompt: str | Messages, reply: Any, max_length: int,
                 head: list[int]) -> tuple[list[int], int]:
    """(ids, start): ``head + prompt + reply + eos`` token ids and the index of the reply's first token;
    ``head`` is what a text prompt starts with (:func:`lmforge.inference.prompts.prompt_head`). Chat
    prompts go through the tokenizer's chat template (lmforge's default one if it has none). A pair
    longer than ``max_length`` drops the start of its prompt (the head, or the bos a chat template starts
    with, stays), then the end of its reply; a DataError when not even one reply token fits."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    if _is_messages(prompt):
        if not tokenizer.chat_template:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        messages = to_messages({"messages": list(prompt)}, "chat")
        head = chat_prompt_ids(tokenizer, messages)
        full, _ = encode_example({"messages": messages + _reply_messages(reply, "reply")}, "chat", tokenizer)
        if full[:len(head)] != head:
            raise DataError("the chat template does not render the prompt as the start of the conversation")
        prompt_ids, reply_ids = head, full[len(head):]
        head = head[:1] if head[:1] == [tokenizer.bos_id] else []  # a template's leading bos stays, as a text's head
    else:
        if not isinstance(prompt, str) or not isinstance(reply, str):
            raise DataError("a text prompt needs text replies")
        prompt_ids, reply_ids = list(head) + tokenizer.encode(prompt), tokenizer.encode(reply) + eos
    if not reply_ids:
        raise DataError("an empty reply has nothing to compare")
    over = len(prompt_ids) + len(reply_ids) - max_length
    if over > 0:
        keep = max(1 if not head else 0, len(prompt_ids) - len(head) - over)
        prompt_ids = head + prompt_ids[len(prompt_ids) - keep:] if keep else head
        if max_length - len(prompt_ids) < 1:
            raise DataError(f"max_length {max_length} leaves no room for a reply after the {len(prompt_ids)} "
                            "prompt token(s) that must stay; raise max_length")
        reply_ids = reply_ids[:max_length - len(prompt_ids)]
    return prompt_ids + reply_ids, len(prompt_ids)


def encode_pairs(rows: list[dict[str, Any]], tokenizer: Tokenizer, max_length: int, head: list[int],
                 name: str = "data") -> list[PreferencePair]:
    """Every row as a :class:`PreferencePair`; a bad row is a DataError naming it (``name`` line N)."""
    if not rows:
        raise DataError(f"the preference {name} is empty")
    pairs = []
    for number, row in enumerate(rows, 1):
        where = f"{name} row {number}"
        try:
            prompt, chosen, rejected = split_pair(row, where)
            chosen_ids, chosen_start = encode_reply(tokenizer, prompt, chosen, max_length, head)
            rejected_ids, rejected_start = encode_reply(tokenizer, prompt, rejected, max_length, head)
        except DataError as exc:
            message = str(exc)
            raise DataError(message if message.startswith(where) else f"{where}: {message}") from None
        pairs.append(PreferencePair(chosen_ids, chosen_start, rejected_ids, rejected_start))
    return pairs


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict[str, Tensor]:
    """One batch of B pairs as 2B right-padded rows, the chosen replies first:

    input_ids (2B, T), attention_mask (2B, T) bool, reply_mask (2B, T-1) float (1 where token t+1 is
    part of the reply), last (2B,) the index of each row's last real token, and, when the pairs carry
    them, ref_logps (2B,) the reference policy's summed reply log-probabilities.
    """
    rows = [(p.chosen, p.chosen_start) for p in pairs] + [(p.rejected, p.rejected_start) for p in pairs]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), T), dtype=torch.bool)
    reply = torch.zeros((len(rows), T), dtype=torch.float32)
    for i, (ids, start) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, :len(ids)] = True
        reply[i, start:len(ids)] = 1.0
    last = torch.tensor([len(ids) - 1 for ids, _ in rows], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention, "reply_mask": reply[:, 1:], "last": last}
    if all(p.reference is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.reference[0] for p in pairs] + [p.reference[1] for p in pairs])
    return batch
