"""Options from YAML and the command line (lmforge.options) and the config dataclasses (lmforge.config)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from lmforge.config import (
    ModelConfig,
    PretrainConfig,
    SamplingConfig,
    TrainConfig,
    load_preset,
    preset_names,
    read_config_file,
    to_dict,
)
from lmforge.errors import ConfigError
from lmforge.options import add_arguments, build_dataclass, convert_value, deep_merge, namespace_to_dict


# ------------------------------------------------------------------ value conversion
@pytest.mark.parametrize("value, tp, expected", [
    ("12", int, 12),
    (12, int, 12),
    (12.0, int, 12),
    ("1_000", int, 1000),
    ("1e3", int, 1000),
    ("-3", int, -3),
    ("3e-4", float, 3e-4),
    ("0.5", float, 0.5),
    (2, float, 2.0),
    ("1e-6", float, 1e-6),
    ("true", bool, True),
    ("True", bool, True),
    ("false", bool, False),
    ("FALSE", bool, False),
    ("yes", bool, True),
    ("no", bool, False),
    ("1", bool, True),
    ("0", bool, False),
    (True, bool, True),
    (False, bool, False),
    ("none", int | None, None),
    ("None", float | None, None),
    ("null", str | None, None),
    (None, int | None, None),
    ("7", int | None, 7),
    ("gpt2-tiny", str | None, "gpt2-tiny"),
    ("abc", str, "abc"),
    (5, str, "5"),
    (["a", "b"], list[str], ["a", "b"]),
    ("a", list[str], ["a"]),
    (["1", 2], list[int], [1, 2]),
    ([], list[str], []),
])
def test_convert_value(value, tp, expected):
    result = convert_value("x", value, tp)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize("value, tp", [
    ("abc", int),
    ("3.5", int),
    (3.5, int),
    (True, int),
    ("x", float),
    (False, float),
    ("maybe", bool),
    (2, bool),
    ([1], str),
    (True, str),
    (None, int),
    ("none", int),
    (["a", "b"], int),
    (["1", "x"], list[int]),
])
def test_convert_value_errors_name_the_key(value, tp):
    with pytest.raises(ConfigError, match=r"train\.thing"):
        convert_value("train.thing", value, tp)


def test_yaml_and_command_line_values_build_the_same_config(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "data: prepared\n"
        "model:\n  preset: gpt2-tiny\n  n_layer: 3\n  dropout: 0.1\n  vocab_size: null\n"
        "train:\n  lr: 3e-4\n  min_lr: none\n  max_steps: 100\n  max_time: 1.5\n  compile: true\n"
        "  batch_size: 8\n  num_threads: 2\n"
        "resume: false\n",
        encoding="utf-8")
    from_yaml = build_dataclass(PretrainConfig, read_config_file(tmp_path / "run.yaml"))
    from_strings = build_dataclass(PretrainConfig, {
        "data": "prepared",
        "model": {"preset": "gpt2-tiny", "n_layer": "3", "dropout": "0.1", "vocab_size": "none"},
        "train": {"lr": "3e-4", "min_lr": "none", "max_steps": "100", "max_time": "1.5", "compile": "true",
                  "batch_size": "8", "num_threads": "2"},
        "resume": "false",
    })
    assert from_yaml == from_strings
    assert from_yaml.train.lr == 3e-4 and isinstance(from_yaml.train.lr, float)  # PyYAML reads 3e-4 as a string
    assert from_yaml.train.compile is True and from_yaml.resume is False
    assert from_yaml.train.min_lr is None
    assert from_yaml.model.n_layer == 3 and from_yaml.model.n_embd == 32  # preset value kept
    assert from_yaml.train.warmup_steps == TrainConfig().warmup_steps  # defaults for the rest


def test_lists_from_yaml_and_command_line():
    yaml_values = yaml.safe_load('stop: ["\\n\\n", END]\ntemperature: 0\ntop_k: 5\n')
    a = build_dataclass(SamplingConfig, yaml_values)
    b = build_dataclass(SamplingConfig, {"stop": ["\n\n", "END"], "temperature": "0", "top_k": "5"})
    assert a == b
    assert a.stop == ["\n\n", "END"] and a.temperature == 0.0 and a.top_k == 5


def test_empty_values_give_defaults():
    assert build_dataclass(TrainConfig, None) == TrainConfig()
    assert build_dataclass(TrainConfig, {}) == TrainConfig()
    assert build_dataclass(PretrainConfig, {"train": None}).train == TrainConfig()


def test_mutable_defaults_are_not_shared():
    a, b = SamplingConfig(), SamplingConfig()
    a.stop.append("x")
    assert b.stop == []


# ------------------------------------------------------------------ unknown keys and wrong types
@pytest.mark.parametrize("values, name, hint", [
    ({"train": {"lrr": 1}}, "train.lrr", "train.lr"),
    ({"train": {"max_step": 1}}, "train.max_step", "train.max_steps"),
    ({"modle": {}}, "modle", "model"),
    ({"model": {"n_layers": 2}}, "model.n_layers", "model.n_layer"),
    ({"model": {"preset": "gpt2-tiny", "n_heads": 2}}, "model.n_heads", "model.n_head"),
])
def test_unknown_key_with_did_you_mean(values, name, hint):
    with pytest.raises(ConfigError) as info:
        build_dataclass(PretrainConfig, values)
    message = str(info.value)
    assert f"'{name}'" in message
    assert f"did you mean '{hint}'" in message


def test_unknown_key_without_close_match():
    with pytest.raises(ConfigError, match="unknown option 'train.zzzzzz'") as info:
        build_dataclass(PretrainConfig, {"train": {"zzzzzz": 1}})
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("values, key", [
    ({"train": {"batch_size": "abc"}}, "train.batch_size"),
    ({"train": {"batch_size": 2.5}}, "train.batch_size"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"train": {"lr": None}}, "train.lr"),
    ({"train": {"compile": "maybe"}}, "train.compile"),
    ({"train": {"max_steps": [1, 2]}}, "train.max_steps"),
    ({"model": {"n_layer": "two"}}, "model.n_layer"),
    ({"model": {"bias": "sometimes"}}, "model.bias"),
    ({"nproc": "x"}, "nproc"),
    ({"train": 5}, "train"),
    ({"train": "fast"}, "train"),
])
def test_wrong_types_name_the_key(values, key):
    with pytest.raises(ConfigError) as info:
        build_dataclass(PretrainConfig, values)
    assert key in str(info.value)


def test_model_section_must_be_mapping_or_name():
    with pytest.raises(ConfigError, match="model"):
        build_dataclass(PretrainConfig, {"model": 5})
    assert build_dataclass(PretrainConfig, {"model": "llama-tiny"}).model.position == "rope"


# ------------------------------------------------------------------ presets
def test_model_from_preset_name():
    model = ModelConfig.from_dict("gpt2-tiny")
    assert model.preset == "gpt2-tiny"
    assert (model.n_layer, model.n_embd, model.n_head, model.block_size) == (2, 32, 2, 64)
    assert ModelConfig.from_dict({"preset": "gpt2-tiny"}) == model


def test_model_preset_with_overrides():
    model = ModelConfig.from_dict({"preset": "llama-tiny", "n_layer": "3", "block_size": 128})
    assert model.n_layer == 3 and model.block_size == 128
    preset = load_preset("llama-tiny")
    assert model.n_kv_head == preset["n_kv_head"] and model.norm == preset["norm"] == "rmsnorm"
    assert model.bias is False and model.tie_embeddings is False
    # derived defaults follow the final values
    wider = ModelConfig.from_dict({"preset": "gpt2-tiny", "n_embd": 64})
    assert wider.intermediate_size == 4 * 64


def test_model_without_preset():
    model = ModelConfig.from_dict({"n_layer": 1, "n_embd": 16, "n_head": 2})
    assert model.preset is None and model.n_layer == 1 and model.n_kv_head == 2
    assert ModelConfig.from_dict(None) == ModelConfig()


def test_preset_from_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("n_layer: 1\nn_embd: 48\nn_head: 3\nnorm: rmsnorm\n", encoding="utf-8")
    model = ModelConfig.from_dict({"preset": str(path), "n_head": 6})
    assert (model.n_layer, model.n_embd, model.n_head, model.norm) == (1, 48, 6, "rmsnorm")
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_dict({"preset": str(tmp_path / "missing.yaml")})
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_layer: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="YAML"):
        ModelConfig.from_dict({"preset": str(bad)})
    typo = tmp_path / "typo.yaml"
    typo.write_text("n_layers: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="model.n_layers"):
        ModelConfig.from_dict({"preset": str(typo)})


def test_preset_names_bundled():
    names = preset_names()
    assert names == sorted(names)
    assert {"gpt2-tiny", "llama-tiny"} <= set(names)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_validates(name):
    model = ModelConfig.from_dict(name)
    model.validate()
    assert model.preset == name
    raw = load_preset(name)
    assert raw and isinstance(raw, dict)
    for key, value in raw.items():
        assert getattr(model, key) == value
    family = {"gpt2": "decoder", "llama": "decoder", "encoder": "encoder", "seq2seq": "seq2seq", "lstm": "lstm"}
    assert model.family == family[name.split("-")[0]]
    if name.startswith("gpt2-"):
        assert (model.position, model.norm) == ("learned", "layernorm")
        assert model.mlp in ("gelu", "gelu_tanh")
    elif name.startswith("llama-"):
        assert (model.position, model.norm, model.mlp) == ("rope", "rmsnorm", "swiglu")


def decoder_presets() -> list[str]:
    return [name for name in preset_names() if name.startswith(("gpt2-", "llama-"))]


def test_every_preset_size_has_both_flavours():
    names = set(decoder_presets())
    sizes = {name.split("-", 1)[1] for name in names}
    assert sizes
    for size in sizes:
        assert f"gpt2-{size}" in names and f"llama-{size}" in names, size
    assert names == {f"{flavour}-{size}" for size in sizes for flavour in ("gpt2", "llama")}


def test_flavours_of_a_size_match_in_shape():
    for size in {name.split("-", 1)[1] for name in decoder_presets()}:
        gpt2, llama = load_preset(f"gpt2-{size}"), load_preset(f"llama-{size}")
        for key in ("block_size", "n_layer", "n_head", "n_embd"):
            assert gpt2[key] == llama[key], (size, key)


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict("gpt2-tiyn")
    assert "gpt2-tiyn" in str(info.value) and "gpt2-tiny" in str(info.value)
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({"preset": "lama-tiny"})
    assert "llama-tiny" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_preset("qqqqqqqq")
    for name in preset_names():  # nothing close: all names are listed
        assert name in str(info.value)


# ------------------------------------------------------------------ validation
def test_default_configs_validate():
    ModelConfig().validate()
    TrainConfig().validate()
    SamplingConfig().validate()


@pytest.mark.parametrize("overrides, match", [
    ({"n_embd": 30, "n_head": 4}, "divisible by model.n_head"),
    ({"n_head": 4, "n_kv_head": 3}, "divisible by model.n_kv_head"),
    ({"norm": "batchnorm"}, "model.norm"),
    ({"mlp": "relu"}, "model.mlp"),
    ({"position": "alibi"}, "model.position"),
    ({"family": "transformer"}, "model.family"),
    ({"position": "rope", "n_embd": 6, "n_head": 2}, "even head size"),
    ({"n_layer": 0}, "model.n_layer"),
    ({"block_size": -1}, "model.block_size"),
    ({"vocab_size": 0}, "model.vocab_size"),
    ({"dropout": 1.0}, "model.dropout"),
    ({"dropout": -0.1}, "model.dropout"),
])
def test_model_validate_errors(overrides, match):
    model = ModelConfig.from_dict(overrides)
    with pytest.raises(ConfigError, match=match):
        model.validate()


def test_model_validate_accepts_gqa_and_rope():
    ModelConfig.from_dict({"n_embd": 64, "n_head": 8, "n_kv_head": 2, "position": "rope",
                           "norm": "rmsnorm", "mlp": "swiglu"}).validate()


def test_train_validate_requires_a_budget():
    with pytest.raises(ConfigError, match="budget"):
        TrainConfig(max_steps=None, max_time=None).validate()
    TrainConfig(max_steps=None, max_time=60.0).validate()
    TrainConfig(max_steps=10, max_time=None).validate()
    TrainConfig(max_steps=10, max_time=60.0).validate()


@pytest.mark.parametrize("overrides, match", [
    ({"optimizer": "lion"}, "train.optimizer"),
    ({"schedule": "step"}, "train.schedule"),
    ({"dtype": "fp8"}, "train.dtype"),
    ({"lr": 0.0}, "train.lr"),
    ({"batch_size": 0}, "train.batch_size"),
    ({"grad_accum": 0}, "train.grad_accum"),
    ({"max_steps": 0}, "train.max_steps"),
    ({"warmup_steps": -1}, "train.warmup_steps"),
    ({"device": "tpu"}, "train.device"),
    ({"eval_windows": 0}, "train.eval_windows"),
])
def test_train_validate_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(TrainConfig(), **overrides).validate()


def test_pretrain_validate_requires_data():
    with pytest.raises(ConfigError, match="data"):
        PretrainConfig().validate()
    PretrainConfig(data="somewhere").validate()


# ------------------------------------------------------------------ argparse
def pretrain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser, PretrainConfig)
    return parser


def test_add_arguments_round_trip():
    args = pretrain_parser().parse_args([
        "--data", "prepared", "--model.preset", "gpt2-tiny", "--model.n_layer", "3",
        "--train.lr", "3e-4", "--train.compile", "--train.min_lr", "none", "--resume", "false",
    ])
    nested = namespace_to_dict(args)
    assert nested == {
        "data": "prepared",
        "model": {"preset": "gpt2-tiny", "n_layer": "3"},
        "train": {"lr": "3e-4", "compile": "true", "min_lr": "none"},
        "resume": "false",
    }
    config = build_dataclass(PretrainConfig, nested)
    expected = build_dataclass(PretrainConfig, {
        "data": "prepared", "model": {"preset": "gpt2-tiny", "n_layer": 3},
        "train": {"lr": 3e-4, "compile": True, "min_lr": None}, "resume": False})
    assert config == expected


def test_flags_not_given_are_absent():
    assert namespace_to_dict(pretrain_parser().parse_args([])) == {}


def test_every_field_has_a_flag():
    parser = pretrain_parser()
    dests = {action.dest for action in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f"train.{f.name}" in dests
    for f in dataclasses.fields(ModelConfig):
        assert f"model.{f.name}" in dests
    assert {"data", "out", "resume", "nproc"} <= dests


def test_full_round_trip_of_a_config_through_flags():
    config = build_dataclass(PretrainConfig, {
        "data": "d", "model": {"preset": "llama-tiny", "n_layer": 3}, "train": {"lr": 2e-4, "max_time": 9.5}})
    argv = []
    for section in ("model", "train"):
        for key, value in to_dict(getattr(config, section)).items():
            argv += [f"--{section}.{key}", "none" if value is None else str(value)]
    argv += ["--data", "d"]
    again = build_dataclass(PretrainConfig, namespace_to_dict(pretrain_parser().parse_args(argv)))
    assert again == config


@pytest.mark.parametrize("cls, flat, flag, words", [
    (PretrainConfig, False, "--train.lr", "peak learning rate"),
    (SamplingConfig, True, "--max-new-tokens", "most tokens to generate"),
])
def test_help_text_renders(cls, flat, flag, words):
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls, flat=flat)
    text = parser.format_help()  # argparse chokes on a stray '%' in help strings
    assert flag in text and words in text


def test_flat_flags_and_lists():
    parser = argparse.ArgumentParser()
    add_arguments(parser, SamplingConfig, flat=True, skip=("num_samples",))
    args = parser.parse_args(["--max-new-tokens", "5", "--stop", "a", "--stop", "\n", "--top-p", "0.9"])
    values = namespace_to_dict(args)
    assert values == {"max_new_tokens": "5", "stop": ["a", "\n"], "top_p": "0.9"}
    config = build_dataclass(SamplingConfig, values)
    assert config.max_new_tokens == 5 and config.stop == ["a", "\n"] and config.top_p == 0.9
    with pytest.raises(SystemExit):
        parser.parse_args(["--num-samples", "2"])


def test_namespace_to_dict_keep():
    ns = argparse.Namespace(**{"train.lr": "1", "model.n_layer": "2", "command": "pretrain"})
    assert namespace_to_dict(ns, keep=("train", "model")) == {"train": {"lr": "1"}, "model": {"n_layer": "2"}}


def test_command_line_overrides_yaml():
    yaml_values = {"train": {"lr": 1e-3, "max_steps": 50}, "model": {"preset": "gpt2-tiny", "n_layer": 4}}
    cli = namespace_to_dict(pretrain_parser().parse_args(["--train.lr", "5e-4", "--model.n_embd", "64"]))
    merged = deep_merge(yaml_values, cli)
    assert merged == {"train": {"lr": "5e-4", "max_steps": 50},
                      "model": {"preset": "gpt2-tiny", "n_layer": 4, "n_embd": "64"}}
    assert yaml_values["train"]["lr"] == 1e-3  # inputs untouched
    config = build_dataclass(PretrainConfig, merged)
    assert (config.train.lr, config.train.max_steps) == (5e-4, 50)
    assert (config.model.n_layer, config.model.n_embd, config.model.n_head) == (4, 64, 2)


def test_read_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        read_config_file(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("", encoding="utf-8")
    assert read_config_file(tmp_path / "empty.yaml") == {}
