"""Ensembles of encoder-decoders: the log of the mean of the members' probabilities, the same through
the teacher-forced forward, greedy and beam decoding, and the Python API (``LanguageModel.load_ensemble``)."""

from __future__ import annotations

import pytest
import torch

from lmforge.api import LanguageModel
from lmforge.config import ModelConfig, SamplingConfig
from lmforge.errors import ConfigError
from lmforge.inference.beam import beam_search
from lmforge.inference.seq2seq_decoding import generate_seq2seq
from lmforge.models import build_model
from lmforge.models.ensemble import Seq2SeqEnsemble
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import save_checkpoint
from seq2seq_helpers import padded

PAD, BOS, END = 0, 1, 2
SOURCES = [[3, 4, 5, 2], [6, 7, 2], [8, 9, 10, 11, 3, 2], [5, 5, 2]]
LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1)


def member(seed: int, vocab_size: int = 12, **knobs) -> Seq2SeqLM:
    """A random tiny encoder-decoder with confident predictions (so that eos comes up and beams differ)."""
    torch.manual_seed(seed)
    model = Seq2SeqLM(ModelConfig(family="seq2seq", vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2,
                                  n_embd=32, tie_embeddings=False, **knobs)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def teacher_forced(model, source: list[int], target: list[int]) -> torch.Tensor:
    """(len(target) + 1, V) log-probabilities after bos and every target token."""
    with torch.no_grad():
        out = model(torch.tensor([source]), decoder_input_ids=torch.tensor([[BOS] + target]))
    return out[0].float().log_softmax(-1)


def test_the_ensemble_is_the_log_of_the_mean_of_its_members_probabilities():
    a, b = member(0), member(1, **LLAMA)  # members may differ in everything but the vocabulary
    ensemble = Seq2SeqEnsemble([a, b])
    ids, mask = padded(SOURCES)
    targets = torch.tensor([[BOS, 4, 6, 8], [BOS, 5, 5, 0], [BOS, 9, 0, 0], [BOS, 3, 7, 9]])
    with torch.no_grad():
        mixed = ensemble(ids, attention_mask=mask, decoder_input_ids=targets)
        expected = sum(m(ids, attention_mask=mask, decoder_input_ids=targets).softmax(-1) for m in (a, b)) / 2
    torch.testing.assert_close(mixed, expected.log())
    torch.testing.assert_close(mixed.logsumexp(-1), torch.zeros(4, 4), atol=1e-5, rtol=0)  # normalised
    assert not torch.allclose(mixed, a(ids, attention_mask=mask, decoder_input_ids=targets).log_softmax(-1),
                              atol=1e-2)
    assert ensemble.num_parameters() == a.num_parameters() + b.num_parameters()


def test_greedy_decoding_with_the_cache_follows_the_teacher_forced_argmax():
    ensemble = Seq2SeqEnsemble([member(0), member(1), member(2, **LLAMA)])
    greedy = generate_seq2seq(ensemble, SOURCES, SamplingConfig(temperature=0.0, max_new_tokens=8), BOS, END, PAD)
    singles = [generate_seq2seq(m, SOURCES, SamplingConfig(temperature=0.0, max_new_tokens=8), BOS, END, PAD)
               for m in ensemble.members]
    assert any(greedy != single for single in singles)
    for source, ids in zip(SOURCES, greedy):
        choices = teacher_forced(ensemble, source, ids).argmax(-1).tolist()  # (len(ids) + 1,)
        assert choices[:len(ids)] == ids
        assert len(ids) == 8 or choices[len(ids)] == END


def test_beam_1_is_greedy_and_twice_the_same_model_is_that_model():
    a, b = member(3), member(4)
    ensemble = Seq2SeqEnsemble([a, b])
    options = {"max_new_tokens": 10, "bos_id": BOS, "eos_id": END, "pad_id": PAD}
    greedy = generate_seq2seq(ensemble, SOURCES, SamplingConfig(temperature=0.0, max_new_tokens=10), BOS, END, PAD)
    assert [ids for ids, _ in beam_search(ensemble, SOURCES, beam_size=1, **options)] == greedy
    alone = beam_search(a, SOURCES, beam_size=4, early_stopping=False, **options)
    twice = beam_search(Seq2SeqEnsemble([a, a]), SOURCES, beam_size=4, early_stopping=False, **options)
    assert [ids for ids, _ in twice] == [ids for ids, _ in alone]
    assert [s for _, s in twice] == pytest.approx([s for _, s in alone], abs=1e-4)


def test_the_ensemble_refuses_what_it_cannot_mix():
    with pytest.raises(ValueError, match="at least two"):
        Seq2SeqEnsemble([member(0)])
    with pytest.raises(ValueError, match="vocabularies differ"):
        Seq2SeqEnsemble([member(0), member(1, vocab_size=13)])
    decoder = build_model(ModelConfig(family="decoder", vocab_size=12, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="only encoder-decoders"):
        Seq2SeqEnsemble([member(0), decoder])
    assert Seq2SeqEnsemble([member(0), Seq2SeqLM(ModelConfig(family="seq2seq", vocab_size=12, block_size=8,
                                                             n_layer=1, n_head=2, n_embd=16))]).config.block_size == 8


# ------------------------------------------------------------------------------------------
# The Python API
# ------------------------------------------------------------------------------------------
TEXT = "the quick brown fox jumps over the lazy dog"
TASK = {"kind": "seq2seq", "purpose": "translation"}


def saved(path, tokenizer: Tokenizer, seed: int, family: str = "seq2seq", task: dict | None = TASK):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(family=family, n_layer=1, n_head=2, n_embd=32, block_size=64,
                                    vocab_size=tokenizer.vocab_size))
    save_checkpoint(path, model, tokenizer, info={"task": task} if task else None)
    return path


def test_load_ensemble_translates_like_one_checkpoint_and_refuses_bad_members(tmp_path):
    tokenizer = Tokenizer.train([TEXT], "char")
    first, second = saved(tmp_path / "a", tokenizer, 0), saved(tmp_path / "b", tokenizer, 1)
    lm = LanguageModel.load_ensemble([first, second], device="cpu")
    single = LanguageModel.load(first, device="cpu")
    assert lm.capabilities == single.capabilities and "translate" in lm.capabilities
    assert lm.info["ensemble"] == [str(first), str(second)]
    outputs = lm.translate(["the fox", "a lazy dog"], beam_size=3, max_new_tokens=6)
    assert isinstance(outputs, list) and len(outputs) == 2
    assert lm.translate("a lazy dog", beam_size=3, max_new_tokens=6) == outputs[1]
    twins = LanguageModel.load_ensemble([first, first], device="cpu")
    for options in ({"beam_size": 3}, {}):
        assert twins.translate(["the fox", "a lazy dog"], max_new_tokens=6, **options) == \
            single.translate(["the fox", "a lazy dog"], max_new_tokens=6, **options)
    with pytest.raises(Exception, match="cannot summarize"):
        lm.summarize("the fox")

    with pytest.raises(ConfigError, match="at least two checkpoints"):
        LanguageModel.load_ensemble([first])
    decoder = saved(tmp_path / "decoder", tokenizer, 2, family="decoder", task=None)
    with pytest.raises(ConfigError, match="not an encoder-decoder"):
        LanguageModel.load_ensemble([first, decoder])
    other = saved(tmp_path / "other", Tokenizer.train([TEXT + " 0123456789"], "char"), 3)
    with pytest.raises(ConfigError, match="another tokenizer"):
        LanguageModel.load_ensemble([first, other])
