"""The command line declares each option group once: from the config dataclasses (sampling, training,
serving) and from the evaluation options table, with the same flags as before."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing

import pytest

from lmforge import cli
from lmforge.config import FinetuneConfig, PretrainConfig, SamplingConfig, ServeConfig
from lmforge.errors import ConfigError
from lmforge.evaluation.options import CLI_OPTIONS, OPTION_TYPES, TASK_OPTIONS, check_option_type
from lmforge.options import field_names


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its words: 'serve', 'export hf', ..."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        found[" ".join(words)] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, (*words, name))

    walk(cli.build_parser(), ())
    return found


PARSERS = _parsers()


@pytest.fixture(autouse=True)
def _keep_logging():
    """cli.main() sets up the 'lmforge' logger for a terminal; put it back for the tests that follow."""
    logger = logging.getLogger("lmforge")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.option_strings[-1]: action for action in parser._actions if action.option_strings}


def test_every_option_and_argument_has_help():
    assert {"pretrain", "finetune", "eval", "serve", "export hf", "export gguf", "import hf"} <= set(PARSERS)
    for words, parser in PARSERS.items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help.strip(), (words, action.option_strings or action.dest)
        parser.format_help()  # every help string formats (no stray %)


def test_eval_flags_are_the_options_table():
    flags = _options(PARSERS["eval"])
    for option in CLI_OPTIONS:
        action = flags[option.flag]
        assert (action.dest, action.type, action.default, action.help) == (option.name, option.arg_type, None,
                                                                             option.help)
        assert (action.nargs, action.metavar) == (option.nargs, option.metavar)
    sampling = {"--" + name.replace("_", "-") for name in field_names(SamplingConfig)} - {"--num-samples"}
    others = {"-h", "--help", "--task", "--data", "--suite", "--limit", "--out", "--quiet", "--ensemble", "--device",
              "--dtype"}
    table = {option.flag for option in CLI_OPTIONS}
    assert set(flags) | {"-h"} == others | sampling | table
    assert table == {"--format", "--prompt-template", "--reference-field", "--text-field", "--label-field",
                     "--template", "--stride", "--batch-size", "--num-samples", "--beam-size", "--mbr", "--labels"}


def test_options_table_types():
    import lmforge.evaluation.harness as harness

    assert OPTION_TYPES == {o.name: o.types for o in TASK_OPTIONS}
    if hasattr(harness, "_OPTION_TYPES"):  # until the harness reads the table itself
        assert harness._OPTION_TYPES == OPTION_TYPES
    check_option_type("qa", "batch_size", 4)
    check_option_type("qa", "temperature", "anything")  # sampling options are SamplingConfig's to check
    with pytest.raises(ConfigError, match="option batch_size of the qa task must be a whole number, not 'x'"):
        check_option_type("qa", "batch_size", "x")
    with pytest.raises(ConfigError, match="must be a whole number, not True"):
        check_option_type("diversity", "num_samples", True)
    with pytest.raises(ConfigError, match="option text_field of the perplexity task must be text, not 0"):
        check_option_type("perplexity", "text_field", 0)
    check_option_type("classification", "text_field", 0)


def test_suite_checks_option_types_before_any_model_loads(tmp_path):
    from lmforge.evaluation.suite import load_suite

    (tmp_path / "val.txt").write_text("some text\n", encoding="utf-8")
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - task: qa\n    data: val.txt\n    batch_size: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="task 1: option batch_size of the qa task must be a whole number"):
        load_suite(suite)


def _field_default(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def test_serve_flags_are_serve_config_fields():
    flags = {flag: action for flag, action in _options(PARSERS["serve"]).items()
             if flag not in ("--help", "--device", "--dtype")}
    fields = dataclasses.fields(ServeConfig)
    assert list(flags) == ["--" + f.name.replace("_", "-") for f in fields]
    hints = typing.get_type_hints(ServeConfig)
    for f, action in zip(fields, flags.values()):
        assert action.dest == f.name and action.default == _field_default(f), f.name
        inner = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        if inner is bool:
            assert isinstance(action, argparse._StoreTrueAction), f.name
        else:
            assert action.type is (inner if inner in (int, float) else None), f.name
    values = vars(PARSERS["serve"].parse_args(["ckpt"]))
    assert ServeConfig(**{name: values[name] for name in field_names(ServeConfig)}) == ServeConfig()


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port must be between 0 and 65535, not 70000"),
    (["--port", "-1"], "--port must be between 0 and 65535, not -1"),
    (["--max-batch-size", "0"], "--max-batch-size and --max-queue must be >= 1"),
    (["--max-queue", "0"], "--max-batch-size and --max-queue must be >= 1"),
    (["--prefix-cache-tokens", "-1"], "--prefix-cache-tokens must be >= 0 (0 turns prefix caching off), not -1"),
    (["--request-timeout", "0"], "--request-timeout must be > 0 seconds, not 0.0"),
    (["--max-body-size", "10"], "--max-body-size must be at least 1024 bytes, not 10"),
])
def test_serve_rejects_bad_values_in_one_line(tmp_path, capsys, flags, message):
    values = vars(PARSERS["serve"].parse_args(["ckpt", *flags]))
    with pytest.raises(ConfigError) as caught:
        ServeConfig(**{name: values[name] for name in field_names(ServeConfig)}).validate()
    assert str(caught.value) == message
    # the command checks its options before it looks at the checkpoint (missing here) or loads a model
    assert cli.main(["serve", str(tmp_path / "missing"), *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {message}"]


def test_sampling_options_are_checked_before_the_model_loads(tmp_path, capsys):
    args = PARSERS["generate"].parse_args(["ckpt", "--temperature", "0.5", "--stop", "."])
    assert cli._sampling_options(args) == {"temperature": "0.5", "stop": ["."]}
    for command in ("generate", "chat", "eval"):
        assert cli.main([command, str(tmp_path / "missing"), "--top-p", "2"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == ["error: top_p must be in (0, 1], not 2.0"]


@pytest.fixture
def recipes(monkeypatch):
    """A stand-in recipe catalog (lmforge.recipes.catalog) with one recipe per command."""
    shipped = {("small", "pretrain"): {"model": "gpt2-tiny", "data": "recipe-data",
                                       "train": {"lr": 0.01, "max_steps": 7, "warmup_steps": 3}},
               ("tuned", "finetune"): {"data": "recipe.jsonl", "model": {"preset": "gpt2-tiny"},
                                       "train": {"lr": 0.002, "max_steps": 9}, "lora": {"r": 4}}}

    def recipe_values(name: str, command: str) -> dict:
        if (name, command) not in shipped:
            raise ConfigError(f"unknown recipe {name!r} (recipes: small, tuned)")
        return dict(shipped[name, command])

    catalog = types.ModuleType("lmforge.recipes.catalog")
    catalog.recipe_values = recipe_values
    catalog.recipe_names = lambda command=None: sorted(n for n, c in shipped if command in (None, c))
    monkeypatch.setitem(sys.modules, "lmforge.recipes.catalog", catalog)
    return shipped


def test_recipe_flag_on_the_training_commands():
    for command in ("pretrain", "finetune"):
        action = _options(PARSERS[command])["--recipe"]
        assert (action.dest, action.default, action.metavar) == ("recipe", None, "NAME")
    assert "--recipe" not in _options(PARSERS["generate"])


def test_recipe_then_config_file_then_flags(recipes, tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("train: {max_steps: 5}\nout: from-file\n", encoding="utf-8")
    args = PARSERS["pretrain"].parse_args(["--recipe", "small", "--config", str(config_file), "--train.lr", "0.5"])
    config, values = cli._run_config(args, PretrainConfig, "pretrain", ("model",))
    assert (config.model.preset, config.data, config.out) == ("gpt2-tiny", "recipe-data", "from-file")
    assert (config.train.lr, config.train.max_steps, config.train.warmup_steps) == (0.5, 5, 3)
    assert values["model"] == {"preset": "gpt2-tiny"}

    args = PARSERS["finetune"].parse_args(["base", "--recipe", "tuned", "--data", "mine.jsonl", "--lora.r", "8"])
    config, _ = cli._run_config(args, FinetuneConfig, "finetune", ("data", "model"))
    assert (config.checkpoint, config.data.path, config.lora.r, config.train.lr) == ("base", "mine.jsonl", 8, 0.002)
    assert config.train.max_steps == 9

    args = PARSERS["finetune"].parse_args(["base", "--data", "mine.jsonl"])  # no recipe: as before
    config, _ = cli._run_config(args, FinetuneConfig, "finetune", ("data", "model"))
    assert (config.lora.r, config.train.lr) == (0, FinetuneConfig().train.lr)


def test_unknown_recipe_is_a_one_line_error(recipes, capsys):
    assert cli.main(["pretrain", "--recipe", "nope", "--data", "x"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: unknown recipe 'nope' (recipes: small, tuned)"]
