"""The tokenizer -> prepare -> pretrain pipeline as library calls (what ``lmforge train-tokenizer``,
``lmforge prepare`` and ``lmforge pretrain`` do one after the other).

Layout of ``out_dir``: ``tokenizer/`` (``tokenizer.json``), ``data/`` (``train.bin``, ``val.bin``,
``meta.json``) and, for :func:`pretrain_from_text`, ``run/`` (the run directory).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmforge.errors import DataError


def train_tokenizer(inputs: list[str | Path] | None, folder: str | Path, kind: str = "bpe",
                    vocab_size: int | None = None, *, texts: Iterable[str] | None = None,
                    text_field: str = "text", reuse: bool = False) -> Path:
    """Train a ``char`` or byte-level ``bpe`` tokenizer on the texts of ``inputs`` (files, folders or
    globs, as ``lmforge train-tokenizer --input``), or on ``texts`` when given, and save it in ``folder``;
    returns ``folder``. ``reuse=True`` keeps a tokenizer already saved there (whatever it was trained on)."""
    from lmforge.data.sources import expand_inputs, iter_texts
    from lmforge.tokenizer import Tokenizer

    folder = Path(folder)
    if reuse and (folder / "tokenizer.json").is_file():
        return folder
    if texts is None:
        if not inputs:
            raise DataError("no text to train a tokenizer on: give inputs or texts")
        texts = iter_texts(expand_inputs(inputs), text_field)
    Tokenizer.train(texts, kind, vocab_size).save(folder)
    return folder


def tokenize_and_prepare(inputs: list[str | Path], out_dir: str | Path, kind: str = "bpe",
                         vocab_size: int | None = None, val_fraction: float = 0.1, *, text_field: str = "text",
                         tokenizer_texts: Iterable[str] | None = None, reuse_tokenizer: bool = False,
                         progress: bool = False) -> tuple[Path, Path]:
    """Train a tokenizer on ``inputs`` (or on ``tokenizer_texts``) into ``out_dir/tokenizer`` and tokenize
    ``inputs`` into train/val shards in ``out_dir/data`` (``lmforge.data.shards.prepare``, which keeps an
    identical earlier preparation); returns ``(tokenizer_dir, data_dir)``. ``data_dir/meta.json`` holds the
    token counts."""
    from lmforge.data.shards import prepare

    out_dir = Path(out_dir)
    tokenizer_dir = train_tokenizer(inputs, out_dir / "tokenizer", kind, vocab_size, texts=tokenizer_texts,
                                    text_field=text_field, reuse=reuse_tokenizer)
    prepare(inputs, tokenizer_dir, out_dir / "data", val_fraction, text_field, progress=progress)
    return tokenizer_dir, out_dir / "data"


def pretrain_from_text(inputs: list[str | Path], out_dir: str | Path, values: dict[str, Any], kind: str = "bpe",
                       vocab_size: int | None = None, val_fraction: float = 0.1, **prepare_options: Any) -> Any:
    """The whole pipeline: :func:`tokenize_and_prepare` into ``out_dir``, then ``pretrain`` with the
    config mapping ``values`` (a recipe's, ``lmforge.recipes.catalog.recipe_values(name, "pretrain")``,
    with overrides) on ``out_dir/data`` into ``out_dir/run`` unless ``values`` names ``out``; returns the
    :class:`~lmforge.training.loop.TrainResult`."""
    from lmforge.config import PretrainConfig
    from lmforge.options import build_dataclass
    from lmforge.recipes.pretrain import pretrain

    _, data_dir = tokenize_and_prepare(inputs, out_dir, kind, vocab_size, val_fraction, **prepare_options)
    config = build_dataclass(PretrainConfig, {"out": str(Path(out_dir) / "run"), **values, "data": str(data_dir)})
    return pretrain(config)
