"""Prefix caching: the store's lookups and evictions, and the engine computing only what is not cached
while generating exactly what it generates without the cache."""

from __future__ import annotations

import pytest
import torch

from lmforge.api import LanguageModel
from lmforge.config import SamplingConfig
from lmforge.errors import ConfigError
from lmforge.inference.engine import Engine
from lmforge.inference.prefix_cache import PrefixCache
from lmforge.tokenizer import Tokenizer
from test_engine import LINES, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, HEADS, DIM = 2, 3, 4


def row(length: int, fill: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One cache row's keys and values, per layer (1, Hkv, length, D): position p of layer l holds
    fill + 100 l + p (values: its negative)."""
    base = fill + torch.arange(length, dtype=torch.float32).view(1, 1, length, 1).expand(1, HEADS, length, DIM)
    keys = [base + 100 * layer for layer in range(LAYERS)]
    return keys, [-k for k in keys]


def empty_row(length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return ([torch.zeros(1, HEADS, length, DIM) for _ in range(LAYERS)],
            [torch.zeros(1, HEADS, length, DIM) for _ in range(LAYERS)])


# ------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------
def test_a_prompt_finds_its_longest_cached_whole_block_prefix_and_leaves_one_token():
    cache = PrefixCache(max_tokens=1000, block=4)
    prompt = list(range(11))
    cache.insert(prompt, *row(11, 0.0))
    assert cache.tokens == 8  # (11 - 1) // 4 * 4: whole blocks, at least one token left to compute
    assert cache.lookup(prompt).length == 8
    assert cache.lookup(prompt[:9]).length == 8
    assert cache.lookup(prompt[:8]).length == 4  # the whole 8 would leave nothing to compute
    assert cache.lookup(prompt[:6] + [99, 98, 97]).length == 4  # diverges inside the second block
    assert cache.lookup([5] + prompt) is None and cache.lookup(prompt[:4]) is None

    keys, values = empty_row(12)
    cache.lookup(prompt[:9] + [50, 51]).copy_into(keys, values)
    expected_keys, expected_values = row(8, 0.0)
    for layer in range(LAYERS):
        assert torch.equal(keys[layer][:, :, :8], expected_keys[layer])
        assert torch.equal(values[layer][:, :, :8], expected_values[layer])
        assert not keys[layer][:, :, 8:].any()  # nothing past the prefix is written


def test_short_prompts_and_a_zero_budget_store_nothing():
    cache = PrefixCache(max_tokens=1000, block=4)
    cache.insert([1, 2, 3, 4], *row(4, 0.0))  # one block, but it would leave nothing to compute
    assert len(cache) == 0 and cache.lookup([1, 2, 3, 4, 5]) is None
    nothing = PrefixCache(max_tokens=0, block=4)
    nothing.insert(list(range(20)), *row(20, 0.0))
    assert len(nothing) == 0 and nothing.lookup(list(range(20))) is None
    with pytest.raises(ValueError, match="max_tokens"):
        PrefixCache(max_tokens=-1)


def test_entries_are_evicted_least_recently_used_first_within_the_budget():
    cache = PrefixCache(max_tokens=16, block=4)
    a, b, c = [1] * 9, [2] * 9, [3] * 9  # 8 cached positions each
    cache.insert(a, *row(9, 1.0))
    cache.insert(b, *row(9, 2.0))
    assert cache.lookup(a + [0]) is not None  # a is now the most recently used
    cache.insert(c, *row(9, 3.0))             # over budget: b goes
    assert cache.tokens == 16 and len(cache) == 2
    assert cache.lookup(b + [0]) is None
    assert cache.lookup(a + [0]).length == 8 and cache.lookup(c + [0]).length == 8
    cache.insert(list(range(30)), *row(30, 0.0))  # longer than the whole budget: not kept
    assert cache.lookup(list(range(30))) is None and len(cache) == 2


def test_a_longer_entry_replaces_the_shorter_ones_it_contains():
    cache = PrefixCache(max_tokens=100, block=4)
    prompt = list(range(20))
    cache.insert(prompt[:9], *row(9, 0.0))     # 8 positions
    cache.insert(prompt, *row(20, 0.0))        # 16 positions, starting with the same 8
    assert len(cache) == 1 and cache.tokens == 16
    assert cache.lookup(prompt[:9]).length == 8  # still found, inside the longer entry
    cache.insert(prompt[:13], *row(13, 0.0))   # already held as the longer entry's beginning
    assert len(cache) == 1 and cache.tokens == 16


# ------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(LINES, kind="char")


SHARED = "The quick brown fox jumps over the lazy dog. "  # 45 characters: two whole blocks and more
TAILS = ["Pack my", "How", "Sphinx", "q"]  # short: prompt + 12 new tokens fit the 64-token context


def count_forward_tokens(model) -> list[int]:
    """Record the number of token positions of every forward pass of ``model`` (undo with ``del model.forward``)."""
    forward, tokens = model.forward, []

    def counting(ids, **kwargs):
        tokens.append(ids.numel())
        return forward(ids, **kwargs)

    model.forward = counting
    return tokens


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompts_with_a_cached_beginning_compute_only_the_rest_and_generate_the_same(tok, flavour, dtype):
    model = make_model(flavour, tok.vocab_size).to(dtype)
    lm = LanguageModel(model, tok)
    prompts = [SHARED + tail for tail in TAILS]
    alone = [lm.complete(p, temperature=0, max_new_tokens=12)[0].token_ids for p in prompts]
    engine = Engine(model, tok, max_batch_size=2)
    tokens = count_forward_tokens(model)
    try:
        first = engine.submit(tok.encode(prompts[0]), SamplingConfig(max_new_tokens=12, temperature=0))
        engine.step()  # its prefill stores the first 32 positions (two whole blocks of 16)
        assert tokens[0] == len(prompts[0])
        handles = [first] + [engine.submit(tok.encode(p), SamplingConfig(max_new_tokens=12, temperature=0))
                             for p in prompts[1:]]
        engine.run_until_idle()
    finally:
        del model.forward
    cached = [h.result().cached_tokens for h in handles]
    assert cached == [0, 32, 32, 32]
    assert sum(tokens) == sum(len(p) for p in prompts) - 96 + sum(h.result().completion_tokens - 1 for h in handles)
    assert [h.result().token_ids for h in handles] == alone


def test_prompts_with_as_many_cached_tokens_are_prefilled_together(tok):
    model = make_model("llama", tok.vocab_size)
    lm = LanguageModel(model, tok)
    prompts = [SHARED + tail for tail in TAILS]
    alone = [lm.complete(p, temperature=0, max_new_tokens=8)[0].token_ids for p in prompts[1:]]
    engine = Engine(model, tok, max_batch_size=4)
    engine.submit(tok.encode(prompts[0]), SamplingConfig(max_new_tokens=2, temperature=0))
    engine.run_until_idle()
    forward, shapes = model.forward, []
    model.forward = lambda ids, **kwargs: shapes.append(tuple(ids.shape)) or forward(ids, **kwargs)
    try:
        handles = [engine.submit(tok.encode(p), SamplingConfig(max_new_tokens=8, temperature=0))
                   for p in prompts[1:]]
        engine.step()
    finally:
        del model.forward
    # one prefill of the three prompts after their 32 cached tokens (right-padded to the longest), one decode
    assert shapes == [(3, max(len(p) for p in prompts[1:]) - 32), (3, 1)]
    engine.run_until_idle()
    assert [h.result().cached_tokens for h in handles] == [32, 32, 32]
    assert [h.result().token_ids for h in handles] == alone


def test_seeded_sampling_with_a_cached_prefix_equals_without(tok):
    model = make_model("gpt2", tok.vocab_size)
    prompt = tok.encode(SHARED + TAILS[0])
    sampling = SamplingConfig(max_new_tokens=15, temperature=1.0, top_k=10, seed=7)
    plain = Engine(model, tok, prefix_cache_tokens=0)
    expected = plain.submit(prompt, sampling)
    plain.run_until_idle()
    assert plain.prefix_cache is None and expected.result().cached_tokens == 0
    engine = Engine(model, tok)
    engine.submit(prompt, sampling)
    engine.run_until_idle()
    again = engine.submit(prompt, sampling)
    engine.run_until_idle()
    assert again.result().cached_tokens == 48  # (52 - 1) // 16 * 16
    assert again.result().token_ids == expected.result().token_ids


def test_a_negative_prefix_cache_budget_is_refused(tok):
    with pytest.raises(ConfigError, match="prefix_cache_tokens"):
        Engine(make_model("gpt2", tok.vocab_size), tok, prefix_cache_tokens=-1)
