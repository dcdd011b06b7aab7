"""The shipped recipes (lmforge/recipes/yaml/*.yaml, lmforge.recipes.catalog): each loads, says which
command it is for and what it needs, builds a valid config of real fields only, and the multi30k-en-de
recipe (shrunk) trains a translator end to end."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest
import yaml

from lmforge.api import LanguageModel
from lmforge.config import FinetuneConfig, PretrainConfig
from lmforge.errors import ConfigError
from lmforge.options import build_dataclass, deep_merge
from lmforge.recipes.catalog import recipe_info, recipe_names, recipe_path, recipe_values
from lmforge.recipes.finetune import finetune, resolve_task
from lmforge.tokenizer import Tokenizer

CONFIGS = {"finetune": FinetuneConfig, "pretrain": PretrainConfig}
REQUIRED = {"multi30k-en-de", "text-classifier", "squad-qa", "aeslc-summarization", "alpaca-sft", "encoder-mlm",
            "shakespeare-char"}
PLACEHOLDERS = {"tokenizer": "tok/", "checkpoint": "runs/base", "init": "runs/base", "data": "prepared/",
                "data.path": "train.txt", "data.target_path": "train.de", "out": "runs/out"}


def with_needs(values: dict, needs: list[str]) -> dict:
    """``values`` plus a placeholder for every dotted option in ``needs``."""
    added: dict = {}
    for key in needs:
        node = added
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = PLACEHOLDERS[key]
    return deep_merge(values, added)


def test_the_catalog_lists_the_shipped_recipes():
    names = recipe_names()
    assert REQUIRED <= set(names)
    assert names == sorted(names)
    assert set(recipe_names("finetune")) | set(recipe_names("pretrain")) == set(names)
    assert not set(recipe_names("finetune")) & set(recipe_names("pretrain"))
    assert "multi30k-en-de" in recipe_names("finetune") and "shakespeare-char" in recipe_names("pretrain")
    with pytest.raises(ConfigError, match="recipes are for pretrain or finetune"):
        recipe_names("generate")


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_loads_and_builds_a_valid_config(name):
    info = recipe_info(name)
    command = info["command"]
    assert command in CONFIGS
    assert info["description"].strip() and info["measured"].strip()
    assert "docs/benchmarks.md" in info["measured"]
    assert info["needs"] and "out" in info["needs"]
    values = recipe_values(name, command)
    assert "recipe" not in values
    assert "out" not in values and "checkpoint" not in values and "tokenizer" not in values and "init" not in values
    assert not isinstance(values.get("data"), str) and "path" not in values.get("data", {})  # no data paths
    # the file is the values plus the header, read as --config would read it
    raw = yaml.safe_load(recipe_path(name).read_text(encoding="utf-8"))
    assert {k: v for k, v in raw.items() if k != "recipe"} == values
    config = build_dataclass(CONFIGS[command], with_needs(values, info["needs"]))  # unknown keys would raise
    if command == "pretrain":
        # lmforge pretrain: --init brings its own architecture, anything else needs a model section
        assert ("init" in info["needs"]) == ("model" not in values)
        if "model" in values:
            config.model.validate()
        config.train.validate()
        assert config.data and config.out
    else:
        config.validate()
        assert bool(config.tokenizer) == ("tokenizer" in info["needs"])
        assert bool(config.checkpoint) == ("checkpoint" in info["needs"])


@pytest.mark.parametrize("name", recipe_names("finetune"))
def test_a_finetune_recipe_names_its_task(name):
    """Not left to detection from the data: Alpaca records (instruction, input, output) look like seq2seq
    pairs (input/output) to it."""
    task = recipe_values(name, "finetune")["task"]
    assert task in ("sft", "classification", "qa", "seq2seq")
    assert (task == "sft") == name.startswith("alpaca-sft")


@pytest.mark.parametrize("name", recipe_names("finetune"))
def test_a_finetune_recipe_without_its_needs_is_refused(name):
    with pytest.raises(ConfigError):
        build_dataclass(FinetuneConfig, recipe_values(name, "finetune")).validate()


def test_the_winning_translation_settings():
    values = recipe_values("multi30k-en-de", "finetune")
    assert values["model"] == {"preset": "seq2seq-small", "block_size": 128, "position": "rope"}
    assert values["task"] == "seq2seq" and values["purpose"] == "translation"
    assert values["data"]["group_by_length"] is False
    train = values["train"]
    assert (train["lr"], train["batch_size"], train["warmup_steps"], train["label_smoothing"]) == (1e-3, 32, 200, 0.1)
    assert train["max_time"] == 3600 and train["max_steps"] is None and train["schedule"] == "cosine"
    assert "--bidirectional 0.33" in recipe_info("multi30k-en-de")["description"]
    classifier = recipe_values("text-classifier", "finetune")
    assert (classifier["dropout"], classifier["ngram_buckets"], classifier["ngram_lr"]) == (0.1, 262144, 0.03)
    assert classifier["train"]["lr"] == 1e-4 and classifier["data"]["group_by_length"] is True


def test_unknown_names_and_the_wrong_command_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"unknown recipe 'multi30k-en-dee'; did you mean multi30k-en-de\?") as err:
        recipe_values("multi30k-en-dee", "finetune")
    assert "\n" not in str(err.value) and "shakespeare-char" in str(err.value)  # the known ones are listed
    with pytest.raises(ConfigError, match="unknown recipe 'nothing-like-it' \\(recipes: aeslc"):
        recipe_values("nothing-like-it", "pretrain")
    with pytest.raises(ConfigError, match="unknown recipe"):
        recipe_path("nothing-like-it")
    with pytest.raises(ConfigError, match="multi30k-en-de is a finetune recipe; use lmforge finetune --recipe "
                                          "multi30k-en-de"):
        recipe_values("multi30k-en-de", "pretrain")
    with pytest.raises(ConfigError, match="shakespeare-char is a pretrain recipe; use lmforge pretrain --recipe"):
        recipe_values("shakespeare-char", "finetune")


def test_the_catalog_imports_only_errors_config_and_the_standard_library():
    import lmforge.recipes.catalog as catalog

    tree = ast.parse(Path(catalog.__file__).read_text(encoding="utf-8"))
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    lmforge = {m for m in modules if m.startswith("lmforge")}
    assert lmforge <= {"lmforge.errors", "lmforge.config"}


def test_the_recipes_ship_with_the_package():
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert '"recipes/yaml/*.yaml"' in pyproject.read_text(encoding="utf-8")


def test_the_multi30k_recipe_trains_a_translator(tmp_path):
    """The recipe with a tiny model and budget (everything else as shipped: rotary positions, label
    smoothing, the schedule, checkpoints every N steps) on digits -> digits reversed."""
    rng = random.Random(5)
    numbers = [[rng.randrange(10) for _ in range(rng.randint(2, 5))] for _ in range(600)]
    source, target = tmp_path / "train.src", tmp_path / "train.tgt"
    source.write_text("".join("".join(map(str, n)) + "\n" for n in numbers), encoding="utf-8")
    target.write_text("".join("".join(map(str, n[::-1])) + "\n" for n in numbers), encoding="utf-8")
    Tokenizer.train([source.read_text(encoding="utf-8")], "char").save(tmp_path / "tok")
    values = deep_merge(recipe_values("multi30k-en-de", "finetune"), {
        "tokenizer": str(tmp_path / "tok"), "out": str(tmp_path / "run"),
        "model": {"preset": "seq2seq-tiny"},
        "data": {"path": str(source), "target_path": str(target)},
        "train": {"max_time": None, "max_steps": 12, "batch_size": 8, "warmup_steps": 2, "save_interval": 4,
                  "eval_interval": 0, "device": "cpu", "dtype": "fp32", "progress": False}})
    config = build_dataclass(FinetuneConfig, values)
    assert resolve_task(config) == "seq2seq"
    assert config.model.position == "rope" and config.model.n_embd == 32 and config.train.label_smoothing == 0.1
    result = finetune(config)
    assert result.step == 12
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step-"))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["label_smoothing"] == 0.1 and saved["data"]["val_fraction"] == 0.02
    lm = LanguageModel.load(result.best_checkpoint, device="cpu")
    assert "translate" in lm.capabilities
    outputs = lm.translate(["123", "4567"], beam_size=2, max_new_tokens=8)
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)


def test_lmforge_recipes_lists_each_recipe_with_its_command(capsys):
    from lmforge.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in recipe_names():
        assert f"{name}: lmforge {recipe_info(name)['command']} --recipe {name}" in out
    assert str(recipe_path(recipe_names()[0]).parent) in out


def test_a_copied_recipe_file_is_a_config_file(tmp_path, monkeypatch):
    """``--config`` reads a recipe's YAML as it is: its ``recipe:`` header describes it and is no option."""
    from lmforge import cli

    copy = tmp_path / "mine.yaml"
    copy.write_text(recipe_path("shakespeare-char").read_text(encoding="utf-8"), encoding="utf-8")
    args = cli.build_parser().parse_args(["pretrain", "--config", str(copy), "--data", "prepared/", "--out", "x"])
    config = cli._pretrain_config(args)
    expected = build_dataclass(PretrainConfig, deep_merge(recipe_values("shakespeare-char", "pretrain"),
                                                          {"data": "prepared/", "out": "x"}))
    assert config == expected
