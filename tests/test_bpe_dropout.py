"""BPE-dropout: sampled segmentations decode to the same text, change with the epoch, survive a resume
exactly, and are refused where they do not apply."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import FinetuneConfig, FinetuneDataConfig, FinetuneTrainConfig, ModelConfig
from lmforge.data.bpe_dropout import SampledSegmentations, merge_dropout, sampled_segmentations
from lmforge.data.supervised import ShuffledBatches, length_grouped_order
from lmforge.data.task_rows import encode_pairs
from lmforge.errors import ConfigError
from lmforge.recipes.finetune import finetune
from lmforge.tokenizer import Tokenizer

WORDS = ["house", "garden", "walking", "children", "playing", "street", "window", "yellow", "morning", "dancer"]


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) for _ in range(count)]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train(sentences(400) * 3, "bpe", vocab_size=300)


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    sources = sentences(40, seed=1)
    return [(s, " ".join(reversed(s.split()))) for s in sources]


def test_merge_dropout_changes_the_split_not_the_text(bpe):
    text = "children playing in the yellow garden"
    usual = bpe.encode(text)
    with merge_dropout(bpe, 0.5):
        splits = [bpe.encode(text) for _ in range(20)]
    assert all(bpe.decode(ids) == text for ids in splits)
    assert any(ids != usual for ids in splits)
    assert all(len(ids) >= len(usual) for ids in splits)  # skipped merges leave more, shorter pieces
    assert bpe.encode(text) == usual  # the usual segmentation is back after the block


def test_merge_dropout_needs_a_bpe_tokenizer():
    with pytest.raises(ConfigError, match="needs a BPE tokenizer; this one is char"):
        with merge_dropout(Tokenizer.train(["abc"], "char"), 0.1):
            pass


def test_samples_cycle_over_epochs_and_round_trip_through_a_file(bpe, pairs, tmp_path):
    base = encode_pairs(pairs, bpe, 64)
    sampled = SampledSegmentations.sample(base, lambda: encode_pairs(pairs, bpe, 64), bpe, 0.3, count=3)
    assert len(sampled) == len(base) and list(sampled) == base  # indexing gives the usual split
    epochs = [sampled.for_epoch(e) for e in range(4)]
    for rows in epochs:
        assert [(bpe.decode(s[:-1]), bpe.decode(t)) for s, t in rows] == pairs  # (sources end with eos)
    assert epochs[0] != base and epochs[0] != epochs[1]
    assert epochs[3] == epochs[0]  # epoch e trains on sample e mod 3
    path = tmp_path / "bpe-dropout.npz"
    sampled.save(path, 0.3)
    loaded = SampledSegmentations.load(path, base, 0.3, 3)
    assert [loaded.for_epoch(e) for e in range(3)] == epochs[:3]
    assert SampledSegmentations.load(path, base, 0.2, 3) is None  # another rate, count or data set: not these
    assert SampledSegmentations.load(path, base, 0.3, 4) is None
    assert SampledSegmentations.load(path, base[:-1], 0.3, 3) is None
    resumed = sampled_segmentations(base, lambda: encode_pairs(pairs, bpe, 64), bpe, 0.3, 3, path, resume=True)
    assert resumed.for_epoch(1) == epochs[1]


def test_shuffled_batches_take_each_epochs_rows(bpe, pairs):
    base = encode_pairs(pairs, bpe, 64)
    sampled = SampledSegmentations.sample(base, lambda: encode_pairs(pairs, bpe, 64), bpe, 0.3, count=2)
    batches = ShuffledBatches(sampled, 10, 1, seed=5, collate=list)  # 4 steps per epoch
    plain = ShuffledBatches(base, 10, 1, seed=5, collate=list)
    for step in range(8):
        rows = batches.batch(step, 0)
        expected = sampled.for_epoch(step // 4)
        order = [base.index(row) for row in plain.batch(step, 0)]  # the same order as without sampling
        assert rows == [expected[i] for i in order]


def test_length_grouping_uses_each_epochs_own_lengths(bpe, pairs):
    base = encode_pairs(pairs, bpe, 64)
    sampled = SampledSegmentations.sample(base, lambda: encode_pairs(pairs, bpe, 64), bpe, 0.3, count=2)
    for epoch in range(2):
        rows = sampled.for_epoch(epoch)
        assert sampled.epoch_lengths(epoch).tolist() == [len(s) + len(t) for s, t in rows]
    batches = ShuffledBatches(sampled, 4, 1, seed=5, collate=list, lengths=[len(s) + len(t) for s, t in base])
    for epoch in range(2):
        rng = np.random.default_rng([5, epoch])
        order = length_grouped_order(rng.permutation(len(base)), sampled.epoch_lengths(epoch), 4, rng)
        rows = sampled.for_epoch(epoch)
        assert [row for step in range(10) for row in batches.batch(10 * epoch + step, 0)] == [rows[i] for i in order]


def seq2seq_config(folder: Path, pairs: list[tuple[str, str]], tokenizer: Path, **data) -> FinetuneConfig:
    source, target = folder / "train.src", folder / "train.tgt"
    source.write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    target.write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    model = ModelConfig(family="seq2seq", n_layer=1, n_decoder_layer=1, n_head=2, n_embd=32, block_size=64,
                        dropout=0.1)
    train = FinetuneTrainConfig(max_steps=12, lr=3e-3, warmup_steps=2, batch_size=8, eval_interval=0,
                                save_interval=4, keep_checkpoints=5, log_interval=4, progress=False, dtype="fp32",
                                device="cpu", seed=3)
    return FinetuneConfig(tokenizer=str(tokenizer), model=model, out=str(folder / "run"), train=train,
                          data=FinetuneDataConfig(path=str(source), target_path=str(target), val_fraction=0.1,
                                                  **data))


def test_seq2seq_with_bpe_dropout_resumes_exactly(bpe, pairs, tmp_path):
    bpe.save(tmp_path / "tok")
    config = seq2seq_config(tmp_path, pairs, tmp_path / "tok", bpe_dropout=0.2, bpe_dropout_samples=3)
    result = finetune(config)  # 36 rows, 8 per step: the 12 steps span 3 epochs, so all 3 samples
    run = Path(result.run_dir)
    assert (run / "bpe-dropout.npz").is_file()
    # Resume a copy from step 4: it must read the same samples back and end bit-identical.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy / "run")
    for name in ("step-8", "step-12", "final"):
        shutil.rmtree(copy / "run" / "checkpoints" / name, ignore_errors=True)
    resumed = finetune(_resuming(copy, pairs, tmp_path / "tok"))
    assert Path(resumed.resumed_from).name == "step-4"
    a, b = load_file(str(result.final_checkpoint / "model.safetensors")), \
        load_file(str(resumed.final_checkpoint / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _resuming(folder: Path, pairs: list[tuple[str, str]], tokenizer: Path) -> FinetuneConfig:
    config = seq2seq_config(folder, pairs, tokenizer, bpe_dropout=0.2, bpe_dropout_samples=3)
    config.resume = True
    return config


def test_bpe_dropout_errors(bpe, pairs, tmp_path):
    with pytest.raises(ConfigError, match=r"data.bpe_dropout must be in \[0, 1\)"):
        FinetuneDataConfig(path="x", bpe_dropout=1.0).validate()
    with pytest.raises(ConfigError, match="data.bpe_dropout_samples must be > 0"):
        FinetuneDataConfig(path="x", bpe_dropout=0.1, bpe_dropout_samples=0).validate()
    char = tmp_path / "char"
    Tokenizer.train([s + t for s, t in pairs], "char").save(char)
    with pytest.raises(ConfigError, match="needs a BPE tokenizer; this one is char"):
        finetune(seq2seq_config(tmp_path, pairs, char, bpe_dropout=0.1))
    config = seq2seq_config(tmp_path, pairs, char, bpe_dropout=0.1)
    config.task = "classification"
    with pytest.raises(ConfigError, match="data.bpe_dropout is for seq2seq fine-tuning; this is a classification"):
        finetune(config)
