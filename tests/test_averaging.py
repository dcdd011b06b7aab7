"""Checkpoint averaging: the mean of several checkpoints' weights, which checkpoints of a run it takes,
and what it refuses."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import LoraConfig, ModelConfig
from lmforge.errors import CheckpointError
from lmforge.models import build_model
from lmforge.models.lora import apply_lora
from lmforge.tokenizer import Tokenizer
from lmforge.training.averaging import average_checkpoints, last_checkpoints
from lmforge.training.checkpoint import load_model, read_config, save_checkpoint

TEXT = ["a small text for a tiny tokenizer", "another line, with other letters: xyz"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXT, "char")


def tiny_config(tokenizer: Tokenizer, **knobs) -> ModelConfig:
    return ModelConfig(**{"family": "decoder", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16,
                          "vocab_size": tokenizer.vocab_size, **knobs})


def saved(path, tokenizer, seed: int, info: dict | None = None, **knobs):
    torch.manual_seed(seed)
    model = build_model(tiny_config(tokenizer, **knobs))
    save_checkpoint(path, model, tokenizer, info={"step": seed, **(info or {})})
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_the_average_is_the_mean_of_the_weights(tmp_path, tokenizer, tied):
    models = [saved(tmp_path / f"c{i}", tokenizer, seed=i, tie_embeddings=tied,
                    info={"task": None, "recipe": "pretrain"}) for i in range(3)]
    out = average_checkpoints([tmp_path / f"c{i}" for i in range(3)], tmp_path / "mean")
    averaged, _, config = load_model(out)
    for name, tensor in averaged.state_dict().items():
        expected = sum(m.state_dict()[name].double() for m in models) / 3
        torch.testing.assert_close(tensor, expected.float(), rtol=0, atol=1e-7)
    assert not torch.equal(averaged.state_dict()["tok_emb.weight"], models[-1].state_dict()["tok_emb.weight"])
    assert config["step"] == 2 and config["recipe"] == "pretrain"  # the last checkpoint's record
    assert config["averaged_from"] == [str((tmp_path / f"c{i}").resolve()) for i in range(3)]
    # one checkpoint averages to itself
    single = average_checkpoints([tmp_path / "c1"], tmp_path / "single")
    for name, tensor in load_model(single)[0].state_dict().items():
        assert torch.equal(tensor, models[1].state_dict()[name])


def test_last_checkpoints_of_a_run_are_the_newest_steps_and_final(tmp_path, tokenizer):
    run = tmp_path / "run"
    for step in (2, 4, 6, 8):
        saved(run / "checkpoints" / f"step-{step}", tokenizer, seed=step)
    saved(run / "checkpoints" / "final", tokenizer, seed=10)  # config step 10
    saved(run / "checkpoints" / "best", tokenizer, seed=4)  # never counted: a copy of another step
    names = [p.name for p in last_checkpoints(run, 3)]
    assert names == ["step-6", "step-8", "final"]
    assert [p.name for p in last_checkpoints(run, 5)] == ["step-2", "step-4", "step-6", "step-8", "final"]
    with pytest.raises(CheckpointError, match="holds 5 checkpoints, fewer than the 6"):
        last_checkpoints(run, 6)
    with pytest.raises(CheckpointError, match="no checkpoints to average"):
        last_checkpoints(tmp_path / "empty", 1)


def test_a_final_checkpoint_at_a_saved_step_counts_once(tmp_path, tokenizer):
    run = tmp_path / "run"
    for step in (2, 4):
        saved(run / "checkpoints" / f"step-{step}", tokenizer, seed=step)
    saved(run / "checkpoints" / "final", tokenizer, seed=4)
    assert [p.name for p in last_checkpoints(run, 2)] == ["step-2", "final"]


def test_checkpoints_of_different_models_are_refused(tmp_path, tokenizer):
    saved(tmp_path / "a", tokenizer, seed=0)
    saved(tmp_path / "wide", tokenizer, seed=1, n_embd=32)
    with pytest.raises(CheckpointError, match="another architecture or task"):
        average_checkpoints([tmp_path / "a", tmp_path / "wide"], tmp_path / "out")
    saved(tmp_path / "classifier", tokenizer, seed=1, info={"task": {"kind": "seq2seq"}})
    with pytest.raises(CheckpointError, match="another architecture or task"):
        average_checkpoints([tmp_path / "a", tmp_path / "classifier"], tmp_path / "out")
    other = Tokenizer.train(["completely different characters 0123456789"], "char")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "other-tok", build_model(tiny_config(tokenizer)), other)
    with pytest.raises(CheckpointError, match="another tokenizer"):
        average_checkpoints([tmp_path / "a", tmp_path / "other-tok"], tmp_path / "out")
    (tmp_path / "other-tok" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="has no readable tokenizer.json"):
        average_checkpoints([tmp_path / "a", tmp_path / "other-tok"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lora_checkpoints_and_unsafe_outputs_are_refused(tmp_path, tokenizer):
    base = saved(tmp_path / "base", tokenizer, seed=0)
    saved(tmp_path / "b", tokenizer, seed=1)
    apply_lora(base, LoraConfig(r=2, targets=["q", "v"]))
    save_checkpoint(tmp_path / "adapters", base, tokenizer,
                    info={"lora": {"r": 2, "targets": ["q", "v"]}, "base": {"path": str(tmp_path / "base")}})
    with pytest.raises(CheckpointError, match="LoRA checkpoint: merge its adapters first"):
        average_checkpoints([tmp_path / "adapters", tmp_path / "b"], tmp_path / "out")
    with pytest.raises(CheckpointError, match="is one of the checkpoints being averaged"):
        average_checkpoints([tmp_path / "base", tmp_path / "b"], tmp_path / "b")
    user = tmp_path / "notes"
    user.mkdir()
    (user / "todo.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(CheckpointError, match="holds other files"):
        average_checkpoints([tmp_path / "base", tmp_path / "b"], user)
    assert (user / "todo.txt").read_text(encoding="utf-8") == "keep me" and len(list(user.iterdir())) == 1
    # an earlier average is replaced
    first = average_checkpoints([tmp_path / "base", tmp_path / "b"], tmp_path / "mean")
    again = average_checkpoints([tmp_path / "b", tmp_path / "base"], first)
    assert json.loads((again / "config.json").read_text())["step"] == 0
    assert read_config(again)["averaged_from"][0].endswith("b")
