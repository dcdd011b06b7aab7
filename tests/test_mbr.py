"""Minimum Bayes risk decoding: the consensus choice among candidates, and a beam's hypotheses as the
candidates of ``LanguageModel.translate(..., mbr=...)``."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.api import LanguageModel
from lmforge.config import ModelConfig
from lmforge.data.task_rows import encode_source
from lmforge.errors import ConfigError
from lmforge.evaluation import evaluate
from lmforge.inference.mbr import mbr_choose
from lmforge.inference.task_models import translate_ids
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import save_checkpoint

TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.mark.parametrize("utility", ["bleu", "chrf"])
def test_the_candidate_that_agrees_most_with_the_others_wins(utility):
    candidates = ["a dog runs in the park today", "the cat sat on the mat", "the cat sat on a mat",
                  "a cat sat on the mat", "the cat is on the mat"]
    assert mbr_choose(candidates, utility) == 1  # shares the most with every other cat sentence
    assert mbr_choose(["the cat sat", "a dog ran", "the cat sat"], utility) == 0  # found twice
    assert mbr_choose(["x y z", "x y z", "x y z"], utility) == 0  # a tie: the first (the model's best)
    assert mbr_choose(["one", "two"], utility) == 0  # two candidates have nothing to vote on
    with pytest.raises(ConfigError, match="mbr must be one of bleu, chrf, not 'rouge'"):
        mbr_choose(candidates, "rouge")


def test_translate_with_mbr_chooses_among_the_beams_hypotheses(tmp_path):
    tokenizer = Tokenizer.train([TEXT], "char")
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="seq2seq", n_layer=1, n_head=2, n_embd=32, block_size=64,
                                    vocab_size=tokenizer.vocab_size))
    path = save_checkpoint(tmp_path / "m", model, tokenizer,
                           info={"task": {"kind": "seq2seq", "purpose": "translation"}})
    lm = LanguageModel.load(path, device="cpu")
    texts = ["the fox", "a lazy dog", "quick brown"]
    sources = [encode_source(tokenizer, t, 64) for t in texts]
    hypotheses = translate_ids(lm.model, tokenizer, sources, beam_size=4, max_new_tokens=6, num_return_sequences=4)
    assert len(hypotheses) == 12
    best_first = translate_ids(lm.model, tokenizer, sources, beam_size=4, max_new_tokens=6)
    assert best_first == hypotheses[::4]  # the first of each source's four is the plain beam's output
    candidates = [[tokenizer.decode(ids).strip() for ids in hypotheses[k:k + 4]] for k in range(0, 12, 4)]
    chosen = lm.translate(texts, beam_size=4, max_new_tokens=6, mbr="chrf")
    assert chosen == [group[mbr_choose(group, "chrf")] for group in candidates]
    assert lm.translate(texts[1], beam_size=4, max_new_tokens=6, mbr="chrf") == chosen[1]
    with pytest.raises(ConfigError, match="mbr chooses among the hypotheses of a beam; it needs beam_size >= 2"):
        lm.translate("the fox", mbr="bleu")
    with pytest.raises(ConfigError, match="mbr must be one of bleu, chrf, not 'x'"):
        lm.translate("the fox", beam_size=4, mbr="x")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"source": t, "target": t}) + "\n" for t in texts), encoding="utf-8")
    report = evaluate(lm, "generation", str(pairs), progress=False, beam_size=4, max_new_tokens=6, mbr="chrf")
    assert [sample["prediction"] for sample in report["samples"]] == chosen
    with pytest.raises(ConfigError, match="5 outputs per source need beam_size >= 5, not 4"):
        translate_ids(lm.model, tokenizer, sources, beam_size=4, num_return_sequences=5)
