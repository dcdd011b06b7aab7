"""Task heads on tiny encoder and decoder backbones: classification (single- and multi-label), pooling
under padding, span extraction, multi-label thresholds, checkpoints; and DecoderLM.hidden_states."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import EncoderLM
from lmforge.models.heads import (
    GOLDEN_32,
    MASKED_LOGIT,
    SequenceClassifier,
    SpanExtractor,
    choose_thresholds,
    pool,
    predict_label_sets,
)
from lmforge.training.objectives import classification_loss, span_loss

PAD, BOS, EOS, KEYS, FILLER = 0, 1, 2, (3, 4, 5), range(6, 20)
VOCAB = 20
POOLING = {"encoder": "first", "decoder": "last"}


def backbone(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = ModelConfig(family=family, vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32)
    return EncoderLM(config) if family == "encoder" else DecoderLM(config)


def right_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), PAD)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), True
    return ids, mask


def filler(g: torch.Generator, low: int = 4, high: int = 11) -> list[int]:
    n = int(torch.randint(low, high, (1,), generator=g))
    return [FILLER[int(i)] for i in torch.randint(len(FILLER), (n,), generator=g)]


def insert(g: torch.Generator, row: list[int], token: int) -> list[int]:
    at = int(torch.randint(len(row) + 1, (1,), generator=g))
    return row[:at] + [token] + row[at:]


def single_label_batch(g: torch.Generator, size: int = 32) -> dict[str, torch.Tensor]:
    """Label = which of three key tokens the text holds (exactly one, anywhere)."""
    labels = torch.randint(len(KEYS), (size,), generator=g)
    rows = [[BOS, *insert(g, filler(g), KEYS[int(y)]), EOS] for y in labels]
    ids, mask = right_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def multi_label_batch(g: torch.Generator, size: int = 32) -> dict[str, torch.Tensor]:
    """Labels = which of three key tokens the text holds (each independently, anywhere)."""
    labels = (torch.rand(size, len(KEYS), generator=g) < 0.5).float()
    rows = []
    for present in labels:
        row = filler(g)
        for key, here in zip(KEYS, present):
            if here:
                row = insert(g, row, key)
        rows.append([BOS, *row, EOS])
    ids, mask = right_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model: torch.nn.Module, objective, make_batch, steps: int, lr: float = 3e-3) -> list[float]:
    g = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = objective(model, make_batch(g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_single_label_classification_learns(family):
    model = SequenceClassifier(backbone(family), len(KEYS), pooling=POOLING[family])
    losses = train(model, classification_loss, single_label_batch, steps=150)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 / 4
    model.eval()
    batch = single_label_batch(torch.Generator().manual_seed(99), 200)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert logits.shape == (200, len(KEYS))
    assert (logits.argmax(-1) == batch["labels"]).float().mean() > 0.95


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_multi_label_classification_learns(family):
    model = SequenceClassifier(backbone(family), len(KEYS), pooling=POOLING[family])
    losses = train(model, classification_loss, multi_label_batch, steps=150)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 / 4
    model.eval()
    batch = multi_label_batch(torch.Generator().manual_seed(99), 200)
    with torch.no_grad():
        probs = model(batch["input_ids"], attention_mask=batch["attention_mask"]).sigmoid()
    predicted = predict_label_sets(probs, [0.5] * len(KEYS))
    gold = [row.nonzero().flatten().tolist() for row in batch["labels"]]
    assert sum(p == t for p, t in zip(predicted, gold)) / len(gold) > 0.9  # whole label sets right


@pytest.mark.parametrize("family", ["encoder", "decoder"])
@pytest.mark.parametrize("pooling", ["first", "last", "mean"])
def test_pooling_ignores_padding(family, pooling):
    model = SequenceClassifier(backbone(family), 4, pooling=pooling).eval()
    g = torch.Generator().manual_seed(5)
    rows = [[BOS, *filler(g, 2, 12), EOS] for _ in range(4)]
    ids, mask = right_pad(rows)
    left_ids, left_mask = ids.flip(-1).clone(), mask.flip(-1).clone()
    for i, row in enumerate(rows):  # the same rows, left-padded
        left_ids[i, -len(row):] = torch.tensor(row)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        left = model(left_ids, attention_mask=left_mask)
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row]))[0]
            assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)
            assert_close(left[i], alone, atol=1e-5, rtol=1e-5)
    # What is pooled: the first token's state, the last real one's, or the mean of the real ones.
    with torch.no_grad():
        states = model.backbone.hidden_states(ids, attention_mask=mask)
        length = len(rows[1])
        pooled = {"first": states[1, 0], "last": states[1, length - 1],
                  "mean": states[1, :length].mean(dim=0)}[pooling]
        assert_close(batched[1], model.head(pooled), atol=1e-5, rtol=1e-5)


def span_batch(g: torch.Generator, size: int = 32) -> dict[str, torch.Tensor]:
    """The answer is the two tokens right after the marker token KEYS[0]."""
    rows, starts = [], []
    for _ in range(size):
        row = filler(g, 6, 14)
        at = int(torch.randint(len(row) - 2, (1,), generator=g))
        rows.append([BOS, *row[:at], KEYS[0], *row[at:], EOS])
        starts.append(1 + at + 1)
    ids, mask = right_pad(rows)
    starts = torch.tensor(starts)
    return {"input_ids": ids, "attention_mask": mask, "start_positions": starts, "end_positions": starts + 1}


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_span_extractor_learns(family):
    model = SpanExtractor(backbone(family))
    losses = train(model, span_loss, span_batch, steps=250)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 / 4
    model.eval()
    batch = span_batch(torch.Generator().manual_seed(99), 200)
    with torch.no_grad():
        start_logits, end_logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert start_logits.shape == end_logits.shape == batch["input_ids"].shape
    assert (start_logits[~batch["attention_mask"]] == MASKED_LOGIT).all()
    assert (end_logits[~batch["attention_mask"]] == MASKED_LOGIT).all()
    exact = (start_logits.argmax(-1) == batch["start_positions"]) & (end_logits.argmax(-1) == batch["end_positions"])
    assert exact.float().mean() > 0.9


def test_question_matches_marks_context_tokens_found_in_the_question():
    a, b, c, d = FILLER[:4]
    model = SpanExtractor(backbone("encoder"), separator_id=EOS)
    row = [BOS, a, b, EOS, b, c, a, d, EOS]
    expected = [False, False, False, False, True, False, True, False, False]
    ids, mask = right_pad([row, [BOS, c, EOS, a, c, EOS]])
    matches = model.question_matches(ids, mask)
    assert matches[0].tolist() == expected
    assert matches[1].tolist() == [False, False, False, False, True, False, False, False, False]
    left = torch.tensor([[PAD, PAD, *row]])
    assert model.question_matches(left, left != PAD)[0].tolist() == [False, False, *expected]
    # Match ids make different tokens count as the same word (d as b here).
    model.match_ids[d] = b
    assert model.question_matches(torch.tensor([row]))[0].tolist() == expected[:7] + [True, False]
    # A tokenizer whose bos and separator are one token: the first one is the bos.
    same = SpanExtractor(backbone("encoder"), separator_id=BOS)
    assert same.question_matches(torch.tensor([[BOS, a, BOS, c, a, BOS]]))[0].tolist() == [
        False, False, False, False, True, False]


def question_batch(g: torch.Generator, size: int = 32) -> dict[str, torch.Tensor]:
    """``bos q eos context eos``: the answer is where the question's one token q occurs in the context."""
    rows, starts = [], []
    for _ in range(size):
        context = filler(g, 6, 14)
        at = int(torch.randint(len(context), (1,), generator=g))
        question = context[at]
        context = [t if t != question or i == at else FILLER[(FILLER.index(t) + 1) % len(FILLER)]
                   for i, t in enumerate(context)]  # q occurs once
        rows.append([BOS, question, EOS, *context, EOS])
        starts.append(3 + at)
    ids, mask = right_pad(rows)
    starts = torch.tensor(starts)
    return {"input_ids": ids, "attention_mask": mask, "start_positions": starts, "end_positions": starts}


def test_question_match_feature_finds_question_words_in_the_context():
    plain = SpanExtractor(backbone("encoder"))
    matching = SpanExtractor(backbone("encoder"), separator_id=EOS)
    assert (matching.match_emb.weight == 0).all()  # starts as the plain model
    plain_losses = train(plain, span_loss, question_batch, steps=100)
    matching_losses = train(matching, span_loss, question_batch, steps=100)
    assert sum(matching_losses[-10:]) < sum(plain_losses[-10:]) / 10
    matching.eval()
    batch = question_batch(torch.Generator().manual_seed(99), 200)
    with torch.no_grad():
        start_logits, _ = matching(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert (start_logits.argmax(-1) == batch["start_positions"]).float().mean() > 0.9


def reference_ngram_logits(table: torch.Tensor, folded: list[int], row: list[int]) -> torch.Tensor:
    """The bag's logits of one unpadded row, with Python integers: unigram keys are folded ids, bigram
    keys V + a * V + b, each hashed to (key * GOLDEN_32 mod 2**32) * N // 2**32."""
    V, N = len(folded), table.shape[0]
    ids = [folded[t] for t in row]
    keys = ids + [V + a * V + b for a, b in zip(ids, ids[1:])]
    buckets = [(key * GOLDEN_32 % 2**32) * N // 2**32 for key in keys]
    return table[buckets].sum(0) / len(keys) ** 0.5


def test_ngram_bag_hashes_folded_unigrams_and_bigrams_and_ignores_padding():
    folded = torch.arange(VOCAB)
    folded[8] = 7  # token 8 counts as token 7 (as " Paris" and "paris" do under folded_ids)
    model = SequenceClassifier(backbone("encoder"), 3, ngram_buckets=64, ngram_ids=folded).eval()
    torch.nn.init.normal_(model.ngram_table.weight)
    rows = [[BOS, 6, 7, 9, EOS], [BOS, 7, EOS], [BOS, 6, 8, 9, EOS]]
    ids, mask = right_pad(rows)
    buckets, present = model.ngram_buckets_of(ids, mask)
    assert buckets.shape == present.shape == (3, 2 * 5 - 1) and 0 <= buckets.min() and buckets.max() < 64
    assert present.sum(-1).tolist() == [9, 5, 9]  # T unigrams + T - 1 bigrams of the real tokens
    with torch.no_grad():
        bag = model.ngram_logits(ids, mask)
        for i, row in enumerate(rows):
            assert_close(bag[i], reference_ngram_logits(model.ngram_table.weight, folded.tolist(), row))
            alone = torch.tensor([row])
            assert_close(model.ngram_logits(alone)[0], bag[i])  # padding adds nothing
            assert_close(model(alone)[0], model(ids, attention_mask=mask)[i], atol=1e-5, rtol=1e-5)
        assert_close(bag[0], bag[2])  # 7 and 8 fold to one id
        assert_close(model(ids, attention_mask=mask), model.head(pool(
            model.backbone.hidden_states(ids, attention_mask=mask), mask, "first")) + bag)
    # 5,000 consecutive keys into 4,096 buckets fill about as many as a uniform hash would (2,887).
    spread = SequenceClassifier(backbone("encoder"), 3, ngram_buckets=4096, ngram_ids=torch.arange(5000))
    used = spread.ngram_buckets_of(torch.arange(5000)[None])[0][0, :5000].unique().numel()
    assert used > 0.95 * 4096 * (1 - (1 - 1 / 4096) ** 5000)
    with pytest.raises(ConfigError, match="ngram_buckets must be 0"):
        SequenceClassifier(backbone("encoder"), 3, ngram_buckets=-1)


def test_ngram_bag_alone_learns_key_tokens():
    model = SequenceClassifier(backbone("encoder"), len(KEYS), ngram_buckets=256)
    for name, p in model.named_parameters():
        p.requires_grad_(name == "ngram_table.weight")
    losses = train(model, classification_loss, single_label_batch, steps=100, lr=0.1)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 / 4
    batch = single_label_batch(torch.Generator().manual_seed(99), 200)
    with torch.no_grad():
        logits = model.eval()(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert (logits.argmax(-1) == batch["labels"]).float().mean() > 0.95


def test_head_conventions_and_checkpoints(tmp_path):
    from lmforge.tokenizer import Tokenizer
    from lmforge.training.checkpoint import load_model, save_checkpoint

    encoder = backbone("encoder")
    classifier = SequenceClassifier(encoder, 3)
    assert classifier.config is encoder.config and classifier.pooling == "first"
    keys = classifier.state_dict().keys()
    assert {"head.weight", "head.bias", "backbone.tok_emb.weight"} <= keys
    assert all(k.startswith(("backbone.", "head.")) for k in keys)
    span_keys = SpanExtractor(encoder).state_dict().keys()
    assert {"head.weight", "head.bias"} <= span_keys and all(k.startswith(("backbone.", "head.")) for k in span_keys)
    with pytest.raises(ConfigError, match="pooling must be one of first, last, mean, not 'max'"):
        SequenceClassifier(encoder, 3, pooling="max")

    # A task checkpoint rebuilds the head around the backbone (see training.checkpoint.with_task_head).
    tokenizer = Tokenizer.train(["abcdefghijklm"], "char")
    assert tokenizer.vocab_size <= VOCAB
    ids = torch.randint(0, tokenizer.vocab_size, (2, 9))
    cases = [(SequenceClassifier(backbone("decoder"), 3, pooling="last"),
              {"kind": "classification", "labels": ["a", "b", "c"], "pooling": "last"}),
             (SequenceClassifier(backbone("encoder"), 3, ngram_buckets=32, ngram_ids=torch.arange(VOCAB).flip(0)),
              {"kind": "classification", "labels": ["a", "b", "c"], "ngram_buckets": 32}),
             (SpanExtractor(backbone("encoder")), {"kind": "qa"}),
             (SpanExtractor(backbone("encoder"), EOS, torch.arange(VOCAB).flip(0)),
              {"kind": "qa", "separator_id": EOS})]
    for i, (model, task) in enumerate(cases):
        if hasattr(model, "ngram_table"):
            torch.nn.init.normal_(model.ngram_table.weight)
        path = save_checkpoint(tmp_path / str(i), model.eval(), tokenizer, info={"task": task})
        loaded, _, _ = load_model(path)
        assert type(loaded) is type(model) and loaded.state_dict().keys() == model.state_dict().keys()
        if "separator_id" in task:  # the match ids travel with the weights
            assert loaded.separator_id == EOS and loaded.match_ids.tolist() == model.match_ids.tolist()
        if "ngram_buckets" in task:  # so do the bag's table and folded ids
            assert loaded.ngram_ids.tolist() == model.ngram_ids.tolist()
            assert_close(loaded.ngram_table.weight, model.ngram_table.weight)
        with torch.no_grad():
            assert_close(loaded(ids), model(ids))


def test_decoder_hidden_states():
    model = backbone("decoder").eval()
    ids = torch.randint(0, VOCAB, (3, 10))
    with torch.no_grad():
        states = model.hidden_states(ids)
        assert states.shape == (3, 10, 32)
        assert_close(model.lm_head(states), model(ids))
        mask = torch.ones(3, 10, dtype=torch.bool)
        mask[1, 6:] = False
        padded = model.hidden_states(ids, attention_mask=mask)
        assert_close(padded[1, :6], model.hidden_states(ids[1:2, :6])[0], atol=1e-5, rtol=1e-5)
        assert_close(padded[0], states[0], atol=1e-5, rtol=1e-5)


def test_predict_label_sets():
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.5, 0.4], [0.3, 0.3, 0.3]])
    assert predict_label_sets(probs) == [[0, 2], [1], []]
    assert predict_label_sets(probs, [0.95, 0.1, 0.35]) == [[1, 2], [1, 2], [1]]
    assert predict_label_sets(probs, torch.tensor([0.0, 1.0, 1.0])) == [[0], [0], [0]]
    with pytest.raises(ConfigError, match="2 thresholds for 3 labels"):
        predict_label_sets(probs, [0.5, 0.5])


def test_choose_thresholds_maximises_f1():
    # Label 0: positives at 0.9, 0.6, 0.35; negatives at 0.4, 0.3, 0.2, 0.1, 0.05. Cutting below 0.35
    # (4 predicted, 3 right: F1 6/7) beats cutting below 0.6 (F1 4/5) and the default 0.5.
    # Label 1: perfectly separable. Label 2: no positives, keeps the default. Label 3: all tied.
    probs = torch.tensor([
        [0.90, 0.30, 0.8, 0.7],
        [0.60, 0.25, 0.1, 0.7],
        [0.35, 0.20, 0.2, 0.7],
        [0.40, 0.10, 0.3, 0.7],
        [0.30, 0.05, 0.4, 0.7],
        [0.20, 0.04, 0.5, 0.7],
        [0.10, 0.03, 0.6, 0.7],
        [0.05, 0.02, 0.7, 0.7],
    ])
    targets = torch.zeros(8, 4)
    targets[[0, 1, 2], 0] = 1
    targets[[0, 1], 1] = 1
    targets[[0, 3], 3] = 1
    thresholds = choose_thresholds(probs, targets, default=0.5)
    assert_close(thresholds, torch.tensor([0.325, 0.225, 0.5, 0.7]))

    def f1(column: int, threshold: float) -> float:
        predicted, gold = probs[:, column] >= threshold, targets[:, column].bool()
        tp = (predicted & gold).sum().item()
        return 2 * tp / (predicted.sum().item() + gold.sum().item())

    assert f1(0, thresholds[0].item()) == pytest.approx(6 / 7)
    assert f1(0, 0.5) == pytest.approx(4 / 5)
    assert f1(1, thresholds[1].item()) == 1.0
    assert predict_label_sets(probs, thresholds)[2] == [0, 3]
    # Brute force agrees on random data: no threshold gives a better F1.
    g = torch.Generator().manual_seed(0)
    probs, targets = torch.rand(50, 5, generator=g), (torch.rand(50, 5, generator=g) < 0.3).float()
    thresholds = choose_thresholds(probs, targets)
    for column in range(5):
        best = max(f1(column, t) for t in probs[:, column].tolist())
        assert f1(column, thresholds[column].item()) == pytest.approx(best)
