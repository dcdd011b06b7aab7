"""Prefix caching: the keys and values of recent prompts' beginnings, so that a new prompt starting the
same way (a chat's system prompt and history, a few-shot template, a repeated request) is not
computed again (the idea of vLLM's automatic prefix caching).

Prompts are cut into blocks of ``block`` tokens. After a prompt is prefilled, the keys and values of its
longest whole-block prefix that leaves at least one prompt token out (``((len - 1) // block) * block``
tokens) are copied out of the engine's cache into an entry; every whole-block prefix of that entry is
indexed. A later prompt looks up its own longest whole-block prefix (again leaving one token, whose
logits start the completion) among them; on a hit, only the rest of the prompt is computed.

Keys and values at a position depend only on the tokens up to it (causal attention), so a cached
prefix is exactly what a new prefill would compute, up to float rounding between differently shaped
batches (the same as for the engine's batched prefill: greedy outputs are unchanged in practice, and
tested). Entries are evicted least recently used first once their tokens exceed ``max_tokens``.

Use (in :class:`~lmforge.inference.engine.Engine`)::

    hit = prefix_cache.lookup(prompt)                 # None, or a PrefixHit of hit.length tokens
    hit.copy_into(row_keys, row_values)               # per layer (1, Hkv, >= hit.length, D) views
    ...compute prompt[hit.length:] after them...
    prefix_cache.insert(prompt, row_keys, row_values)  # after the prefill: keep the prompt's prefix
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor

__all__ = ["PrefixCache", "PrefixHit"]


@dataclass(eq=False)
class _Entry:
    tokens: tuple[int, ...]
    keys: list[Tensor]    # per layer (Hkv, len(tokens), D)
    values: list[Tensor]


@dataclass(frozen=True)
class PrefixHit:
    """The first ``length`` positions of a cached entry: a new prompt's prefix."""

    entry: _Entry
    length: int

    def copy_into(self, keys: list[Tensor], values: list[Tensor]) -> None:
        """Write the prefix's keys and values into positions ``[0, length)`` of one cache row: per layer
        (1, Hkv, S, D) tensors with S >= ``length``."""
        for layer, (k, v) in enumerate(zip(keys, values)):
            k[0, :, :self.length] = self.entry.keys[layer][:, :self.length]
            v[0, :, :self.length] = self.entry.values[layer][:, :self.length]


class PrefixCache:
    """Least-recently-used store of prompt prefixes' keys and values, indexed by whole blocks of tokens.

    Args:
        max_tokens: most positions kept in all entries together (each costs ``2 * n_layer * Hkv * D``
            numbers of the cache's dtype); 0 keeps nothing.
        block: the granularity of prefixes (vLLM's default block size is 16).
    """

    def __init__(self, max_tokens: int, block: int = 16):
        if max_tokens < 0 or block < 1:
            raise ValueError(f"max_tokens must be >= 0 and block >= 1, not {max_tokens}, {block}")
        self.max_tokens, self.block = max_tokens, block
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # least recently used first
        self._index: dict[tuple[int, ...], list[_Entry]] = {}  # whole-block prefix -> entries starting with it
        self.tokens = 0  # positions held

    def __len__(self) -> int:
        return len(self._entries)

    def _cacheable(self, prompt: list[int]) -> int:
        """The longest whole-block prefix that leaves at least one token of ``prompt`` to compute."""
        return (len(prompt) - 1) // self.block * self.block

    def lookup(self, prompt: list[int]) -> PrefixHit | None:
        """The longest cached whole-block prefix of ``prompt`` (leaving at least its last token), or None."""
        for length in range(self._cacheable(prompt), 0, -self.block):
            entries = self._index.get(tuple(prompt[:length]))
            if entries:
                entry = entries[-1]
                self._entries.move_to_end(entry.tokens)
                return PrefixHit(entry, length)
        return None

    def insert(self, prompt: list[int], keys: list[Tensor], values: list[Tensor]) -> None:
        """Keep the keys and values of ``prompt``'s longest whole-block prefix (leaving its last token), read
        from one cache row after its prefill: per layer (1, Hkv, S, D) tensors holding at least that many
        positions. Copies them; a prefix already held, or longer than ``max_tokens``, is not stored again."""
        length = self._cacheable(prompt)
        if length == 0 or length > self.max_tokens:
            return
        tokens = tuple(prompt[:length])
        if tokens in self._index:  # held, alone or as the beginning of a longer entry
            self._entries.move_to_end(self._index[tokens][-1].tokens)
            return
        for end in range(self.block, length, self.block):  # shorter entries this one contains
            if (shorter := self._entries.get(tokens[:end])) is not None:
                self._drop(shorter)
        entry = _Entry(tokens, [k[0, :, :length].clone() for k in keys], [v[0, :, :length].clone() for v in values])
        while self._entries and self.tokens + length > self.max_tokens:
            self._drop(next(iter(self._entries.values())))  # the least recently used
        self._entries[tokens] = entry
        self.tokens += length
        for end in range(self.block, length + 1, self.block):
            self._index.setdefault(tokens[:end], []).append(entry)

    def _drop(self, entry: _Entry) -> None:
        """Forget ``entry`` and its index keys."""
        del self._entries[entry.tokens]
        self.tokens -= len(entry.tokens)
        for end in range(self.block, len(entry.tokens) + 1, self.block):
            entries = self._index[entry.tokens[:end]]
            entries.remove(entry)
            if not entries:
                del self._index[entry.tokens[:end]]
