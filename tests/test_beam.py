"""Beam search: Hugging Face semantics on constructed distributions (length penalty, early stopping,
n-gram blocking) through the step interface, and on real encoder-decoders (greedy agreement, scores,
batching)."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import ModelConfig, SamplingConfig
from lmforge.inference.beam import Hypotheses, beam_search, repeated_ngram_tokens, search
from lmforge.inference.seq2seq_decoding import generate_seq2seq
from lmforge.models.seq2seq import Seq2SeqLM

EOS, A, B, C = 0, 1, 2, 3
V = 5


class TableDecoding:
    """A toy "model" per source whose next-token probabilities are a function of the tokens so far."""

    def __init__(self, *tables):
        self.tables = tables  # per source: tuple of tokens -> {token: probability}
        self.rows: list[tuple[int, tuple[int, ...]]] = [(source, ()) for source in range(len(tables))]

    def logits(self) -> torch.Tensor:
        logits = torch.full((len(self.rows), V), float("-inf"))
        for i, (source, prefix) in enumerate(self.rows):
            for token, p in self.tables[source](prefix).items():
                logits[i, token] = math.log(p)
        return logits

    def start(self) -> torch.Tensor:
        return self.logits()

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        self.rows = [(source, prefix + (token,)) for (source, prefix), token in zip(self.rows, next_ids.tolist())]
        return self.logits()

    def select(self, rows: torch.Tensor) -> None:
        self.rows = [self.rows[r] for r in rows.tolist()]


def longer_is_likelier(prefix):
    """eos now (p .45) or "a a" then eos: sums -0.80 (length 1) and -1.06 (length 3); "a" alone -1.80."""
    return {(): {EOS: 0.45, A: 0.55}, (A,): {EOS: 0.3, A: 0.7}, (A, A): {EOS: 0.9, A: 0.1}}.get(prefix, {EOS: 1.0})


def run(*tables, **options):
    options = {"beam_size": 2, "max_new_tokens": 8, "eos_id": EOS, **options}
    return search(TableDecoding(*tables), len(tables), **options)


def test_length_penalty_prefers_longer_outputs_as_it_grows():
    short_sum, long_sum = math.log(0.45), math.log(0.55) + math.log(0.7) + math.log(0.9)
    [(ids, score)] = run(longer_is_likelier, length_penalty=0.0, early_stopping=False)
    assert ids == [] and score == pytest.approx(short_sum)
    [(ids, score)] = run(longer_is_likelier, length_penalty=1.0, early_stopping=False)
    assert ids == [A, A] and score == pytest.approx(long_sum / 3)
    [(ids, _)] = run(longer_is_likelier, length_penalty=-1.0, early_stopping=False)
    assert ids == []
    lengths = [len(run(longer_is_likelier, length_penalty=lp, early_stopping=False)[0][0])
               for lp in (-2.0, 0.0, 0.2, 0.5, 1.0, 2.0)]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


def test_early_stopping_ends_a_source_at_beam_size_hypotheses():
    # With 2 beams: step 1 finishes "" (-0.80), step 2 finishes "a" (-1.80 / 2 = -0.90). Early stopping
    # ends there, with "" the best; without it, the live beam "a a" (-0.96 / 2 = -0.48 so far) may still
    # beat -0.90, so the search goes on and finds "a a" (-1.06 / 3 = -0.35).
    calls = []

    def counted(prefix):
        calls.append(prefix)
        return longer_is_likelier(prefix)

    [(ids, score)] = run(counted, early_stopping=True)
    assert ids == [] and score == pytest.approx(math.log(0.45))
    assert max(map(len, calls)) == 1  # the model never saw a third token
    [(ids, _)] = run(longer_is_likelier, early_stopping=False)
    assert ids == [A, A]
    # A source is not done before it has beam_size hypotheses, with or without early stopping.
    hypotheses = Hypotheses(beam_size=2, length_penalty=1.0)
    hypotheses.add([A], -1.0, 2)
    assert not hypotheses.is_done(-100.0, 3, early_stopping=True)
    hypotheses.add([], -1.0, 1)
    assert hypotheses.is_done(-0.1, 3, early_stopping=True)
    assert not hypotheses.is_done(-0.1, 3, early_stopping=False)  # -0.1 / 3 could still beat -0.5
    assert hypotheses.is_done(-3.0, 3, early_stopping=False)


def test_an_eos_outside_the_top_beam_size_candidates_is_not_a_hypothesis():
    # One beam: eos is the second candidate, so it never ends a hypothesis; the search runs out of tokens.
    [(ids, score)] = run(lambda prefix: {A: 0.6, EOS: 0.4}, beam_size=1, max_new_tokens=4)
    assert ids == [A] * 4 and score == pytest.approx(4 * math.log(0.6) / 4)


def alternating(prefix):
    """a b a b ... is likely; c is a poor alternative; eos very unlikely."""
    last = prefix[-1] if prefix else B
    return {A if last == B else B: 0.8, C: 0.15, EOS: 0.05}


def repeats(ids, n):
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_blocking(n):
    [(free, _)] = run(alternating, beam_size=3, max_new_tokens=10)
    assert repeats(free, n)
    [(blocked, _)] = run(alternating, beam_size=3, max_new_tokens=10, no_repeat_ngram_size=n)
    assert not repeats(blocked, n) and len(blocked) > n
    assert repeated_ngram_tokens([A, B, A], 2) == [B]
    assert repeated_ngram_tokens([A, B, A, C, A], 2) == [B, C]
    assert repeated_ngram_tokens([A, B, C], 1) == [A, B, C]
    assert repeated_ngram_tokens([A, B, A, B], 3) == [A]
    assert repeated_ngram_tokens([A], 3) == []


def test_several_sources_search_independently():
    tables = (longer_is_likelier, alternating, lambda prefix: {EOS: 0.9, A: 0.1})
    for options in (dict(early_stopping=False), dict(early_stopping=True, length_penalty=0.5),
                    dict(no_repeat_ngram_size=2, beam_size=3)):
        together = run(*tables, **options)
        assert together == [run(table, **options)[0] for table in tables]
    assert run(*tables, early_stopping=False)[2] == ([], pytest.approx(math.log(0.9)))


# ------------------------------------------------------------------------------------------
# Real encoder-decoders
# ------------------------------------------------------------------------------------------
PAD, BOS, END = 0, 1, 2


def peaky_model(seed: int, flavour: str = "bart") -> Seq2SeqLM:
    """A random tiny model with confident predictions (so that eos comes up and beams disagree)."""
    torch.manual_seed(seed)
    knobs = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1) if flavour == "llama" else {}
    model = Seq2SeqLM(ModelConfig(family="seq2seq", vocab_size=12, block_size=16, n_layer=2, n_head=2, n_embd=32,
                                  **knobs)).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(25)
    return model


SOURCES = [[3, 4, 5, 2], [6, 7, 2], [8, 9, 10, 11, 3, 2], [5, 5, 2], [9, 2]]


def sequence_score(model, source, ids, max_new_tokens, length_penalty=1.0):
    """The beam score of target ``ids``: sum of log-probs (with eos unless cut at max_new_tokens) / length**lp."""
    target = ids if len(ids) == max_new_tokens else ids + [END]
    with torch.no_grad():
        logits = model(torch.tensor([source]), decoder_input_ids=torch.tensor([[BOS] + target[:-1]]))
    logprobs = logits[0].float().log_softmax(-1)[torch.arange(len(target)), torch.tensor(target)]
    return logprobs.sum().item() / len(target) ** length_penalty


def beams(model, sources, **options):
    options = {"beam_size": 4, "max_new_tokens": 10, "bos_id": BOS, "eos_id": END, "pad_id": PAD, **options}
    return beam_search(model, sources, **options)


@pytest.mark.parametrize("flavour", ["bart", "llama"])
def test_beam_size_1_is_greedy_and_wider_beams_score_at_least_as_well(flavour):
    for seed in range(3):
        model = peaky_model(seed, flavour)
        greedy = generate_seq2seq(model, SOURCES, SamplingConfig(temperature=0.0, max_new_tokens=10), BOS, END, PAD)
        one = beams(model, SOURCES, beam_size=1)
        assert [ids for ids, _ in one] == greedy
        # Without early stopping: with it, a source ends at beam_size finished hypotheses even when a
        # better beam (e.g. greedy's, if it never ends) is still running, as in Hugging Face.
        wide = beams(model, SOURCES, beam_size=4, early_stopping=False)
        for source, g, (ids, score) in zip(SOURCES, greedy, wide):
            assert score == pytest.approx(sequence_score(model, source, ids, 10), abs=1e-4)  # scores are honest
            assert score >= sequence_score(model, source, g, 10) - 1e-5


def test_a_source_alone_or_in_a_batch_gives_the_same_hypothesis():
    model = peaky_model(1)
    together = beams(model, SOURCES, length_penalty=0.6, no_repeat_ngram_size=2)
    for source, (ids, score) in zip(SOURCES, together):
        [(alone_ids, alone_score)] = beams(model, [source], length_penalty=0.6, no_repeat_ngram_size=2)
        assert alone_ids == ids and alone_score == pytest.approx(score, abs=1e-5)


def test_real_model_respects_blocking_and_limits():
    model = peaky_model(2)
    for ids, _ in beams(model, SOURCES, no_repeat_ngram_size=2, max_new_tokens=12):
        assert not repeats(ids, 2) and len(ids) <= 12 and END not in ids
    assert beams(model, SOURCES[:2], max_new_tokens=0) == [([], 0.0), ([], 0.0)]
    assert all(len(ids) <= 16 for ids, _ in beams(model, SOURCES, max_new_tokens=50, early_stopping=False))
    with pytest.raises(ValueError, match="beam_size"):
        beams(model, SOURCES, beam_size=0)
    with pytest.raises(ValueError, match=r"num_return_sequences must be between 1 and beam_size \(3\), not 4"):
        beams(model, SOURCES, beam_size=3, num_return_sequences=4)


# ------------------------------------------------------------------------------------------
# Parity with Hugging Face generate(num_beams=...)
# ------------------------------------------------------------------------------------------
class HFBartDecoding:
    """The step interface over a transformers BART model (no cache: the whole target is rerun each step)."""

    def __init__(self, model, ids: torch.Tensor, mask: torch.Tensor):
        self.model, self.mask = model, mask
        self.memory = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        self.targets = torch.full((ids.shape[0], 1), BOS)

    def logits(self) -> torch.Tensor:
        return self.model(encoder_outputs=(self.memory,), attention_mask=self.mask,
                          decoder_input_ids=self.targets).logits[:, -1]

    def start(self) -> torch.Tensor:
        return self.logits()

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        self.targets = torch.cat([self.targets, next_ids[:, None]], dim=1)
        return self.logits()

    def select(self, rows: torch.Tensor) -> None:
        self.memory, self.mask, self.targets = self.memory[rows], self.mask[rows], self.targets[rows]


@pytest.mark.parametrize("options", [
    dict(num_beams=3, length_penalty=1.0, early_stopping=True),
    dict(num_beams=4, length_penalty=0.0, early_stopping=False),
    dict(num_beams=3, length_penalty=2.0, early_stopping=False, no_repeat_ngram_size=2),
    dict(num_beams=2, length_penalty=-0.5, early_stopping=True, no_repeat_ngram_size=1),
    dict(num_beams=4, length_penalty=1.0, early_stopping=False, num_return_sequences=4),  # n-best lists
    dict(num_beams=3, length_penalty=0.6, early_stopping=True, num_return_sequences=2),
])
def test_same_hypotheses_and_scores_as_hugging_face(options):
    transformers = pytest.importorskip("transformers")
    sources = SOURCES + [[12, 13, 14, 15, 2]]
    width = max(map(len, sources))
    ids = torch.zeros(len(sources), width, dtype=torch.long)
    mask = torch.zeros(len(sources), width, dtype=torch.long)
    for i, source in enumerate(sources):
        ids[i, :len(source)], mask[i, :len(source)] = torch.tensor(source), 1
    ended = 0
    for seed in range(3):
        torch.manual_seed(seed)
        config = transformers.BartConfig(
            vocab_size=16, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=END, decoder_start_token_id=BOS,
            forced_bos_token_id=None, forced_eos_token_id=None, init_std=0.3)  # confident, so eos comes up
        model = transformers.BartForConditionalGeneration(config).eval()
        with torch.no_grad():
            theirs = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                    output_scores=True, return_dict_in_generate=True, **options)
            ours = search(HFBartDecoding(model, ids, mask), len(sources), beam_size=options["num_beams"],
                          max_new_tokens=8, eos_id=END, length_penalty=options["length_penalty"],
                          early_stopping=options["early_stopping"],
                          no_repeat_ngram_size=options.get("no_repeat_ngram_size", 0), context=[BOS],
                          num_return_sequences=options.get("num_return_sequences", 1))
        assert len(ours) == len(theirs.sequences) == len(sources) * options.get("num_return_sequences", 1)
        for i, (our_ids, our_score) in enumerate(ours):
            their_ids = theirs.sequences[i, 1:].tolist()
            their_ids = their_ids[:their_ids.index(END)] if END in their_ids else their_ids
            assert our_ids == their_ids
            assert our_score == pytest.approx(theirs.sequences_scores[i].item(), rel=1e-6, abs=1e-5)
            ended += len(our_ids) < 8
    assert ended  # the comparison covers hypotheses that ended with eos
