"""Shared fixtures: a small real corpus (Python's own docs), tokenizers, prepared data, a trained tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig, PretrainConfig, TrainConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def corpus_text(chars: int = 120_000) -> str:
    """Deterministic English text from the Python language reference (ships with Python)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    return text[:chars]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, corpus_file) -> Path:
    """A prepared data directory (char tokenizer) of the corpus."""
    from lmforge.data.shards import prepare
    from lmforge.data.sources import iter_texts
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("chardata")
    Tokenizer.train(iter_texts([corpus_file]), kind="char").save(root / "tokenizer")
    prepare([corpus_file], root / "tokenizer", root / "data", val_fraction=0.1, progress=False)
    return root / "data"


def tiny_pretrain_config(data: Path, out: Path, **train: object) -> PretrainConfig:
    model = ModelConfig.from_dict({"preset": "gpt2-tiny"})
    options = dict(max_steps=60, lr=3e-3, warmup_steps=5, batch_size=8, eval_interval=20, eval_windows=8,
                   final_eval_windows=16, save_interval=20, log_interval=5, progress=False, dtype="fp32",
                   device="cpu")
    options.update(train)
    return PretrainConfig(data=str(data), out=str(out), model=model, train=TrainConfig(**options))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, char_data) -> Path:
    """A tiny GPT-2 flavoured model trained for a few hundred steps: its run directory."""
    from lmforge.recipes.pretrain import pretrain

    out = tmp_path_factory.mktemp("run")
    pretrain(tiny_pretrain_config(char_data, out, max_steps=300, save_interval=0, eval_interval=100))
    return out


@pytest.fixture(scope="session")
def lm(trained_run):
    from lmforge.api import LanguageModel

    torch.manual_seed(0)
    return LanguageModel.load(trained_run, device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot when another process keeps the
    cores busy: one torch thread for the module's tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
