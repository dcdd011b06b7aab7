"""Generation through the Python API: greedy, sampling, batching, stop strings, streaming, limits."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import SamplingConfig
from lmforge.errors import ConfigError, RequestError
from lmforge.inference.generate import TokenGenerator


def test_greedy_is_deterministic_and_learned_something(lm):
    first = lm.generate("The ", max_new_tokens=40, temperature=0)
    assert first == lm.generate("The ", max_new_tokens=40, temperature=0)
    assert len(first) > 0
    # a trained model prefers lower-case letters and spaces over symbols after "The "
    assert sum(ch.isalpha() or ch.isspace() for ch in first) / len(first) > 0.7


def test_greedy_is_the_same_alone_and_in_a_batch(lm):
    prompts = ["The ", "A statement such as while x", "if", "Note that the expression list is evaluated once"]
    alone = [lm.generate(p, max_new_tokens=25, temperature=0) for p in prompts]
    assert lm.generate(prompts, max_new_tokens=25, temperature=0) == alone
    assert lm.generate(list(reversed(prompts)), max_new_tokens=25, temperature=0) == list(reversed(alone))


def test_greedy_generation_matches_argmax_of_full_forward(lm):
    """The KV-cache path picks exactly what a cache-free forward over the whole text would."""
    ids = lm.tokenizer.encode("The value of")
    completion = lm.complete("The value of", max_new_tokens=12, temperature=0)[0]
    tokens = list(ids)
    with torch.no_grad():
        for expected in completion.token_ids:
            logits = lm.model(torch.tensor([tokens]))[0, -1]
            assert int(logits.argmax()) == expected
            tokens.append(expected)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(lm):
    options = dict(max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.9, min_p=0.01)
    assert lm.generate("The", seed=7, **options) == lm.generate("The", seed=7, **options)
    samples = lm.generate("The", seed=3, num_samples=4, **options)
    assert isinstance(samples, list) and len(samples) == 4
    assert len(set(samples)) > 1


def test_num_samples_with_several_prompts_groups_by_prompt(lm):
    out = lm.generate(["a", "bb"], max_new_tokens=5, temperature=0, num_samples=2)
    assert len(out) == 2 and all(len(group) == 2 for group in out)
    assert out[0][0] == out[0][1]  # greedy samples are identical


def test_top_k_1_equals_greedy(lm):
    greedy = lm.generate("The", max_new_tokens=20, temperature=0)
    assert lm.generate("The", max_new_tokens=20, temperature=0.7, top_k=1, seed=1) == greedy


def test_stop_string_ends_generation_and_is_not_included(lm):
    text = lm.generate("The ", max_new_tokens=60, temperature=0)
    stop = text[10:13]  # a string the greedy continuation is known to contain
    completion = lm.complete("The ", max_new_tokens=60, temperature=0, stop=[stop])[0]
    assert completion.text == text[: text.index(stop)]
    assert completion.finish_reason == "stop"
    assert stop not in completion.text


def test_stream_joins_to_the_generated_text(lm):
    options = dict(max_new_tokens=40, temperature=0)
    pieces = list(lm.stream("The ", **options))
    assert len(pieces) > 1
    assert "".join(pieces) == lm.generate("The ", **options)
    stop = lm.generate("The ", **options)[15:18]
    assert "".join(lm.stream("The ", stop=stop, **options)) == lm.generate("The ", stop=[stop], **options)


def test_generation_continues_past_the_context_by_sliding(lm):
    block = lm.context_length
    completion = lm.complete("The ", max_new_tokens=3 * block, temperature=0)[0]
    assert len(completion.token_ids) == 3 * block
    assert completion.finish_reason == "length"


def test_prompt_longer_than_context_is_an_error_unless_truncated(lm):
    long_prompt = "word " * lm.context_length
    with pytest.raises(RequestError, match="context"):
        lm.generate(long_prompt, max_new_tokens=5)
    completion = lm.complete(long_prompt, truncate=True, max_new_tokens=5, temperature=0)[0]
    assert completion.prompt_truncated > 0
    assert completion.prompt_tokens + 5 <= lm.context_length


def test_bad_sampling_options_are_rejected(lm):
    with pytest.raises(ConfigError, match="top_p"):
        lm.generate("x", top_p=1.5)
    with pytest.raises(ConfigError, match="unknown option 'temprature'"):
        lm.generate("x", temprature=0.5)
    with pytest.raises(RequestError):
        lm.generate([])


def test_end_of_sequence_finishes_a_row_early(lm):
    bias = torch.zeros(lm.model.config.vocab_size)
    bias[lm.tokenizer.eos_id] = 100.0  # make the end-of-sequence token overwhelmingly likely
    hook = lm.model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    try:
        completion = lm.complete("The", max_new_tokens=10, temperature=0)[0]
    finally:
        hook.remove()
    assert completion.finish_reason == "stop" and completion.token_ids == [] and completion.text == ""


def test_repetition_penalty_reduces_repeats(lm):
    plain = lm.complete("the the the", max_new_tokens=60, temperature=0)[0].token_ids
    penalised = lm.complete("the the the", max_new_tokens=60, temperature=0, repetition_penalty=1.8)[0].token_ids
    assert len(set(penalised)) > len(set(plain))


def test_token_generator_rejects_prompts_beyond_context(lm):
    with pytest.raises(ValueError):
        list(TokenGenerator(lm.model, [[1] * (lm.context_length + 1)], SamplingConfig(), eos_id=None))


def test_perplexity_and_score_agree_and_stride_matters_little(lm):
    text = "The for statement is used to iterate over the elements of a sequence. " * 3
    logprobs = lm.token_logprobs(text)
    assert logprobs.shape[0] == len(lm.tokenizer.encode(text))
    assert lm.score(text) == pytest.approx(float(logprobs.double().sum()), rel=1e-6)
    ppl = lm.perplexity(text)
    assert ppl == pytest.approx(float(torch.exp(-logprobs.double().mean())), rel=1e-6)
    assert 1.0 < ppl < 60.0  # trained: far better than uniform over ~70 characters
    strided = lm.perplexity(text, stride=8)
    assert strided == pytest.approx(ppl, rel=0.25)
    with pytest.raises(RequestError):
        lm.perplexity("")


def test_scoring_matches_a_manual_full_forward_when_text_fits(lm):
    text = "x = 1"
    ids = [lm.tokenizer.eos_id] + lm.tokenizer.encode(text)
    with torch.no_grad():
        logprobs = lm.model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
    expected = sum(float(logprobs[i, t]) for i, t in enumerate(ids[1:]))
    assert lm.score(text) == pytest.approx(expected, rel=1e-5)
