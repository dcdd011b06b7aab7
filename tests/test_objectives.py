"""Label smoothing in the training objectives: the smoothed cross-entropy equals its formula,
(1 - s) * NLL(target) + s * mean over classes of -log p, and is refused where it does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import FinetuneConfig, FinetuneDataConfig, FinetuneTrainConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.training.objectives import IGNORE_INDEX, causal_lm_loss, classification_loss, seq2seq_loss


class FixedLogits(nn.Module):
    """A stand-in model that returns the same logits whatever it is given."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.logits


def smoothed(logits: torch.Tensor, targets: torch.Tensor, s: float) -> torch.Tensor:
    """The formula, written out: logits (N, V), targets (N,) with IGNORE_INDEX to skip."""
    keep = targets != IGNORE_INDEX
    logp = logits[keep].log_softmax(-1)
    nll = -logp.gather(1, targets[keep, None]).squeeze(1)
    return ((1 - s) * nll + s * -logp.mean(-1)).mean()


@pytest.mark.parametrize("s", [0.0, 0.1, 0.3])
def test_token_objectives_smooth_as_the_formula(s):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(11, (2, 5))
    labels[0, 3:] = IGNORE_INDEX
    model = FixedLogits(logits)
    batch = {"input_ids": labels.clamp_min(0), "labels": labels, "attention_mask": torch.ones(2, 4, dtype=torch.bool),
             "decoder_input_ids": labels.clamp_min(0)}
    expected = smoothed(logits.flatten(0, 1), labels.flatten(), s)
    torch.testing.assert_close(causal_lm_loss(model, batch, label_smoothing=s), expected)
    torch.testing.assert_close(seq2seq_loss(model, batch, label_smoothing=s), expected)
    if s:
        assert causal_lm_loss(model, batch, label_smoothing=s) != causal_lm_loss(model, batch)


def test_classification_smoothing_single_and_multi_label():
    torch.manual_seed(1)
    logits = torch.randn(6, 4)
    batch = {"input_ids": torch.zeros(6, 3, dtype=torch.long), "attention_mask": torch.ones(6, 3, dtype=torch.bool),
             "labels": torch.randint(4, (6,))}
    model = FixedLogits(logits)
    torch.testing.assert_close(classification_loss(model, batch, label_smoothing=0.2),
                               smoothed(logits, batch["labels"], 0.2))
    multi = torch.randint(2, (6, 4))
    expected = F.binary_cross_entropy_with_logits(logits, multi * 0.8 + 0.1)
    torch.testing.assert_close(classification_loss(model, {**batch, "labels": multi}, label_smoothing=0.2), expected)


def test_label_smoothing_is_checked_and_refused_for_spans(tmp_path):
    with pytest.raises(ConfigError, match=r"train.label_smoothing must be in \[0, 1\)"):
        TrainConfig(label_smoothing=1.0).validate()
    with pytest.raises(ConfigError, match="label_smoothing"):
        TrainConfig(label_smoothing=-0.1).validate()
    from lmforge.recipes.task_runs import finetune_task
    from lmforge.tokenizer import Tokenizer

    data = tmp_path / "qa.jsonl"
    data.write_text('{"context": "The sky is blue.", "question": "What is blue?", '
                    '"answers": {"text": ["The sky"], "answer_start": [0]}}\n' * 4, encoding="utf-8")
    Tokenizer.train(["The sky is blue. What is blue?"], "char").save(tmp_path / "tok")
    config = FinetuneConfig(tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "run"),
                            data=FinetuneDataConfig(path=str(data)),
                            train=FinetuneTrainConfig(label_smoothing=0.1, device="cpu", progress=False))
    config.model.family = "encoder"
    with pytest.raises(ConfigError, match="extractive QA"):
        finetune_task(config, "qa")


# ------------------------------------------------------------------------------------------
# Text infilling (denoising pretraining of encoder-decoders)
# ------------------------------------------------------------------------------------------
MASK, PAD = 1000, 0


def test_infill_replaces_each_masked_run_with_one_mask_token():
    from lmforge.training.objectives import infill_spans

    ids = torch.arange(1, 65).repeat(40, 1)  # (40, 64): unique values, so a kept token names its position
    source, mask = infill_spans(ids, MASK, PAD, probability=0.3, mean_span=3.0,
                                generator=torch.Generator().manual_seed(0))
    assert source.shape[0] == 40 and source.shape[1] <= 64 and mask.dtype == torch.bool
    inside = 0
    for row, keep in zip(source.tolist(), mask.tolist()):
        n = sum(keep)
        assert all(keep[:n]) and not any(keep[n:]) and all(t == PAD for t in row[n:])  # right padding only
        real = row[:n]
        assert all(not (a == MASK and b == MASK) for a, b in zip(real, real[1:]))  # runs are merged
        position = 0  # the next position of ids to account for
        for i, token in enumerate(real):
            if token == MASK:
                following = next((t for t in real[i + 1:] if t != MASK), 65)
                assert following - 1 > position  # a mask stands for at least one token
                inside += following - 1 - position
                position = following - 1
            else:
                assert token - 1 == position  # kept tokens appear in order, with nothing else skipped
                position += 1
        assert position == 64
    assert 0.2 < inside / ids.numel() < 0.4  # about `probability` of the tokens are inside spans
    again, _ = infill_spans(ids, MASK, PAD, 0.3, 3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, source)


def test_denoising_objective_trains_an_encoder_decoder_to_read_its_source(tmp_path):
    """Random digits cannot be predicted from the previous ones (ln 10 = 2.30 nats each): a loss far
    below that means the decoder reads the corrupted source and copies what survived."""
    import math
    import random

    from lmforge.api import LanguageModel
    from lmforge.config import ModelConfig, PretrainConfig
    from lmforge.data.shards import prepare
    from lmforge.recipes.finetune import finetune
    from lmforge.recipes.pretrain import pretrain
    from lmforge.tokenizer import Tokenizer
    from lmforge.training.checkpoint import read_config

    rng = random.Random(0)
    text = "".join(rng.choice("0123456789") for _ in range(40_000))
    (tmp_path / "digits.txt").write_text(text, encoding="utf-8")
    Tokenizer.train([text], "char").save(tmp_path / "tok")
    prepare([tmp_path / "digits.txt"], tmp_path / "tok", tmp_path / "data", val_fraction=0.1, progress=False)
    config = PretrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), denoise_probability=0.15,
                            model=ModelConfig(family="seq2seq", n_layer=2, n_head=2, n_embd=32, block_size=8),
                            train=TrainConfig(max_steps=600, lr=3e-3, warmup_steps=10, batch_size=32,
                                              eval_interval=0, eval_windows=16, final_eval_windows=64,
                                              save_interval=0, progress=False, dtype="fp32", device="cpu"))
    assert config.resolved_objective == "denoise"
    result = pretrain(config)
    assert result.metrics["val_loss"] < 1.0 < math.log(10)
    saved = read_config(result.final_checkpoint)
    assert saved["objective"] == "denoise"
    lm = LanguageModel.load(result.final_checkpoint)
    assert lm.tokenizer.mask_id is not None
    sources = ["3141592", "2718281", "1414213", "1732050", "5772156"]
    copies = lm.generate(sources, temperature=0, max_new_tokens=7)
    right = sum(a == b for source, copy in zip(sources, copies) for a, b in zip(source, copy))
    assert right >= 0.6 * 35, copies  # an intact source is mostly copied (chance: 1 digit in 10)
    # the pretrained checkpoint is the start of seq2seq fine-tuning
    (tmp_path / "src.txt").write_text("12\n34\n56\n78\n" * 20, encoding="utf-8")
    (tmp_path / "tgt.txt").write_text("21\n43\n65\n87\n" * 20, encoding="utf-8")
    tuned = finetune(FinetuneConfig(checkpoint=str(result.final_checkpoint), out=str(tmp_path / "ft"),
                                    data=FinetuneDataConfig(path=str(tmp_path / "src.txt"),
                                                            target_path=str(tmp_path / "tgt.txt")),
                                    train=FinetuneTrainConfig(max_steps=5, device="cpu", progress=False,
                                                              dtype="fp32", eval_interval=0, save_interval=0)))
    assert read_config(tuned.final_checkpoint)["task"]["kind"] == "seq2seq"


# ------------------------------------------------------------------------------------------
# R-Drop (train.rdrop): two dropout passes of each batch and the symmetric KL between them
# ------------------------------------------------------------------------------------------
class TwoPasses(nn.Module):
    """A stand-in for a model with dropout: row i of what it is given gets ``logits`` (of the batch
    once) plus ``noise[i]``, so a batch given twice gets two different "passes"."""

    def __init__(self, logits: torch.Tensor, noise: torch.Tensor):
        super().__init__()
        self.logits, self.noise = logits, noise

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        n = input_ids.shape[0]
        return self.logits.repeat(n // self.logits.shape[0], *[1] * (self.logits.dim() - 1)) + self.noise[:n]


def test_symmetric_kl_is_the_mean_of_the_two_kl_divergences():
    from lmforge.training.objectives import symmetric_kl

    torch.manual_seed(2)
    a, b = torch.randn(7, 5), torch.randn(7, 5)
    log_a, log_b = a.log_softmax(-1), b.log_softmax(-1)
    expected = (F.kl_div(log_b, log_a, log_target=True, reduction="batchmean")
                + F.kl_div(log_a, log_b, log_target=True, reduction="batchmean")) / 2
    torch.testing.assert_close(symmetric_kl(a, b), expected)
    assert symmetric_kl(a, a + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # the same distributions


@pytest.mark.parametrize("alpha", [0.0, 0.5, 4.0])
def test_seq2seq_rdrop_is_the_mean_loss_of_two_passes_plus_their_kl_on_target_tokens(alpha):
    from lmforge.training.objectives import symmetric_kl

    torch.manual_seed(3)
    logits, noise = torch.randn(2, 5, 11), torch.randn(4, 5, 11)
    labels = torch.randint(11, (2, 5))
    labels[1, 2:] = IGNORE_INDEX
    batch = {"input_ids": labels.clamp_min(0), "labels": labels, "attention_mask": torch.ones(2, 5, dtype=torch.bool),
             "decoder_input_ids": labels.clamp_min(0)}
    model = TwoPasses(logits, noise)
    if not alpha:  # off: one pass
        torch.testing.assert_close(seq2seq_loss(model, batch), smoothed((logits + noise[:2]).flatten(0, 1),
                                                                        labels.flatten(), 0.0))
        return
    first, second = logits + noise[:2], logits + noise[2:]
    both = smoothed(torch.cat([first, second]).flatten(0, 1), labels.repeat(2, 1).flatten(), 0.1)
    keep = labels != IGNORE_INDEX
    expected = both + alpha * symmetric_kl(first[keep], second[keep])
    torch.testing.assert_close(seq2seq_loss(model, batch, label_smoothing=0.1, rdrop=alpha), expected)


def test_classification_rdrop_single_and_multi_label():
    torch.manual_seed(4)
    logits, noise = torch.randn(6, 4), torch.randn(12, 4)
    first, second = logits + noise[:6], logits + noise[6:]
    batch = {"input_ids": torch.zeros(6, 3, dtype=torch.long), "attention_mask": torch.ones(6, 3, dtype=torch.bool),
             "labels": torch.randint(4, (6,))}
    model = TwoPasses(logits, noise)
    kl = (F.kl_div(second.log_softmax(-1), first.log_softmax(-1), log_target=True, reduction="batchmean")
          + F.kl_div(first.log_softmax(-1), second.log_softmax(-1), log_target=True, reduction="batchmean")) / 2
    expected = F.cross_entropy(torch.cat([first, second]), batch["labels"].repeat(2)) + 0.7 * kl
    torch.testing.assert_close(classification_loss(model, batch, rdrop=0.7), expected)
    # multi-label: one Bernoulli per label; KL(a||b) + KL(b||a) = (p_a - p_b)(z_a - z_b) for logits z
    multi = torch.randint(2, (6, 4))
    bernoulli = ((first.sigmoid() - second.sigmoid()) * (first - second)).mean() / 2
    expected = F.binary_cross_entropy_with_logits(torch.cat([first, second]), multi.repeat(2, 1).float()) \
        + 0.7 * bernoulli
    torch.testing.assert_close(classification_loss(model, {**batch, "labels": multi}, rdrop=0.7), expected)


def test_rdrop_adds_nothing_to_a_model_without_dropout():
    from lmforge.config import ModelConfig
    from lmforge.models.seq2seq import Seq2SeqLM

    torch.manual_seed(5)
    model = Seq2SeqLM(ModelConfig(family="seq2seq", vocab_size=30, block_size=12, n_layer=1, n_head=2, n_embd=16,
                                  dropout=0.0)).train()
    labels = torch.randint(30, (3, 6))
    batch = {"input_ids": torch.randint(30, (3, 8)), "attention_mask": torch.ones(3, 8, dtype=torch.bool),
             "decoder_input_ids": labels, "labels": labels}
    torch.testing.assert_close(seq2seq_loss(model, batch, rdrop=5.0), seq2seq_loss(model, batch))
    with_dropout = Seq2SeqLM(ModelConfig(family="seq2seq", vocab_size=30, block_size=12, n_layer=1, n_head=2,
                                         n_embd=16, dropout=0.3)).train()
    kl_free = torch.stack([seq2seq_loss(with_dropout, batch) for _ in range(200)]).mean()
    assert seq2seq_loss(with_dropout, batch, rdrop=5.0) > kl_free + 0.01  # two dropout passes disagree


def test_rdrop_trains_seq2seq_and_is_checked_and_refused_elsewhere(tmp_path):
    from lmforge.config import ModelConfig, PretrainConfig
    from lmforge.recipes.finetune import finetune
    from lmforge.tokenizer import Tokenizer

    with pytest.raises(ConfigError, match=r"train.rdrop must be >= 0"):
        TrainConfig(rdrop=-0.5).validate()
    with pytest.raises(ConfigError, match="train.rdrop is for seq2seq and classification fine-tuning, not pretraining"):
        PretrainConfig(data=str(tmp_path), train=TrainConfig(rdrop=1.0)).validate()
    Tokenizer.train(["0123456789 The sky is blue. What is blue?"], "char").save(tmp_path / "tok")
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"context": "The sky is blue.", "question": "What is blue?", '
                  '"answers": {"text": ["The sky"], "answer_start": [0]}}\n' * 4, encoding="utf-8")
    config = FinetuneConfig(tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "qa-run"),
                            data=FinetuneDataConfig(path=str(qa)),
                            train=FinetuneTrainConfig(rdrop=1.0, device="cpu", progress=False))
    config.model.family = "encoder"
    with pytest.raises(ConfigError, match="train.rdrop is for seq2seq and classification fine-tuning; this is a qa"):
        finetune(config)
    assert not (tmp_path / "qa-run").exists()
    # shifting digits (d -> d + 1 mod 10) from scratch with R-Drop: the loss falls below chance (ln 10 = 2.3)
    import random

    rng = random.Random(0)
    sources = ["".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6))) for _ in range(400)]
    (tmp_path / "src.txt").write_text("\n".join(sources) + "\n", encoding="utf-8")
    shifted = ["".join(str((int(d) + 1) % 10) for d in s) for s in sources]
    (tmp_path / "tgt.txt").write_text("\n".join(shifted) + "\n", encoding="utf-8")
    config = FinetuneConfig(tokenizer=str(tmp_path / "tok"), out=str(tmp_path / "mt"),
                            model=ModelConfig(family="seq2seq", n_layer=2, n_head=2, n_embd=32, block_size=12,
                                              dropout=0.1),
                            data=FinetuneDataConfig(path=str(tmp_path / "src.txt"),
                                                    target_path=str(tmp_path / "tgt.txt")),
                            train=FinetuneTrainConfig(rdrop=1.0, max_steps=250, lr=3e-3, warmup_steps=10,
                                                      batch_size=32, eval_interval=0, save_interval=0,
                                                      device="cpu", dtype="fp32", progress=False))
    result = finetune(config)
    assert result.metrics["val_loss"] < 2.0  # 1.67 measured (1.21 without R-Drop: it learns slower)
