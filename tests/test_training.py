"""The training loop: learning, schedules, accumulation, checkpoints, exact resume after SIGKILL, DDP."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import read_jsonl, tiny_pretrain_config
from lmforge.config import TrainConfig, to_dict
from lmforge.errors import CheckpointError, ConfigError
from lmforge.recipes.pretrain import pretrain
from lmforge.training.checkpoint import latest_checkpoint, load_model, prune_checkpoints, resolve_checkpoint
from lmforge.training.optim import build_optimizer, layer_depths, learning_rate, parameter_groups
from process_control import kill_when


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def test_loss_falls_and_run_directory_is_complete(trained_run):
    records = read_jsonl(trained_run / "metrics.jsonl")
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert train_losses[0] > 3.5  # about log(vocabulary) at the start
    assert train_losses[-1] < train_losses[0] - 1.0
    assert val[-1] < 3.0
    for name in ("config.yaml", "metrics.jsonl", "loss.png"):
        assert (trained_run / name).is_file()
    assert any((trained_run / "tensorboard").iterdir())
    for name in ("best", "final"):
        assert (trained_run / "checkpoints" / name / "model.safetensors").is_file()
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["model"]["n_layer"] == 2 and config["train"]["max_steps"] == 300


def test_learning_rate_schedules():
    config = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert learning_rate(0, config) == pytest.approx(1 / 11)
    assert learning_rate(9, config) == pytest.approx(10 / 11)
    assert learning_rate(10, config) == pytest.approx(1.0)
    assert learning_rate(60, config) == pytest.approx(0.55)  # half way down the cosine
    assert learning_rate(110, config) == pytest.approx(0.1)
    assert learning_rate(500, config) == pytest.approx(0.1)
    linear = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=100, schedule="linear")
    assert learning_rate(25, linear) == pytest.approx(0.75)
    constant = TrainConfig(lr=0.3, warmup_steps=0, schedule="constant")
    assert learning_rate(10_000, constant) == 0.3
    timed = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=None, max_time=100.0)
    assert learning_rate(5, timed, elapsed=50.0) == pytest.approx(0.5)
    assert TrainConfig(lr=1.0).min_lr is None and learning_rate(10**6, TrainConfig(lr=1.0)) == pytest.approx(0.1)


def test_decay_groups_and_optimizers(lm):
    decay, no_decay = parameter_groups(lm.model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(lm.model.parameters()))
    for name, kind in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("adagrad", torch.optim.Adagrad)):
        optimizer = build_optimizer(lm.model, TrainConfig(optimizer=name), torch.device("cpu"))
        assert isinstance(optimizer, kind)


def test_layer_depths_for_layer_wise_learning_rate_decay():
    from lmforge.config import ModelConfig
    from lmforge.models.encoder import EncoderLM
    from lmforge.models.heads import SequenceClassifier
    from lmforge.models.lstm import LSTMLM
    from lmforge.models.seq2seq import Seq2SeqLM

    small = dict(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=50)
    classifier = SequenceClassifier(EncoderLM(ModelConfig(family="encoder", **small)), 3)
    depths = layer_depths(classifier)
    assert depths["backbone.tok_emb.weight"] == depths["backbone.pos_emb.weight"] == 0
    assert depths["backbone.blocks.0.attn.qkv_proj.weight"] == 1 and depths["backbone.blocks.1.norm2.bias"] == 2
    assert depths["backbone.norm.weight"] == depths["head.weight"] == depths["head.bias"] == 3
    groups = parameter_groups(classifier, 0.01, layer_lr_decay=0.5)
    scale = {id(p): g.get("lr_scale", 1.0) for g in groups for p in g["params"]}
    named = dict(classifier.named_parameters())
    assert scale[id(named["head.weight"])] == 1.0 and scale[id(named["backbone.blocks.1.mlp.up_proj.weight"])] == 0.5
    assert scale[id(named["backbone.tok_emb.weight"])] == 0.125
    assert sum(len(g["params"]) for g in groups) == len(named)
    assert all(g["weight_decay"] == (0.01 if p.dim() >= 2 else 0.0) for g in groups for p in g["params"])
    # A parameter's own lr_scale (a classifier's n-gram table has one) multiplies its layer's.
    classifier.head.weight.lr_scale = 10.0
    scale = {id(p): g.get("lr_scale", 1.0) for g in parameter_groups(classifier, 0.01, 0.5) for p in g["params"]}
    assert scale[id(classifier.head.weight)] == 10.0 and scale[id(named["backbone.blocks.0.norm1.weight"])] == 0.25
    plain = parameter_groups(classifier, 0.01)
    assert [g.get("lr_scale", 1.0) for g in plain] == [1.0, 1.0, 10.0]
    assert plain[2]["params"] == [classifier.head.weight]

    seq2seq = layer_depths(Seq2SeqLM(ModelConfig(family="seq2seq", n_decoder_layer=2, **small)))
    assert seq2seq["encoder_blocks.1.mlp.up_proj.weight"] == 2 and seq2seq["encoder_norm.weight"] == 2
    assert seq2seq["decoder_blocks.0.cross_attn.q_proj.weight"] == 3 and seq2seq["norm.weight"] == 5
    with pytest.raises(ConfigError, match="numbered blocks"):
        layer_depths(LSTMLM(ModelConfig(family="lstm", **small)))
    with pytest.raises(ConfigError, match=r"layer_lr_decay must be in \(0, 1\]"):
        TrainConfig(layer_lr_decay=1.5).validate()



def test_gradient_accumulation_equals_a_larger_batch(char_data, tmp_path):
    big = pretrain(tiny_pretrain_config(char_data, tmp_path / "big", max_steps=15, batch_size=8, save_interval=0))
    accumulated = pretrain(tiny_pretrain_config(char_data, tmp_path / "acc", max_steps=15, batch_size=4,
                                                grad_accum=2, save_interval=0))
    a, b = weights(big.final_checkpoint), weights(accumulated.final_checkpoint)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_other_optimizers_train(char_data, tmp_path, optimizer):
    lr = {"sgd": 0.5, "adagrad": 0.05}[optimizer]
    result = pretrain(tiny_pretrain_config(char_data, tmp_path, optimizer=optimizer, lr=lr, max_steps=80,
                                           save_interval=0))
    assert result.metrics["val_loss"] < math.log(70) - 0.5


def test_checkpoint_round_trip_and_errors(trained_run, tmp_path):
    model, tokenizer, config = load_model(trained_run)
    assert config["family"] == "decoder" and config["step"] in (100, 200, 300)
    assert load_model(trained_run / "checkpoints" / "final")[2]["step"] == 300
    assert resolve_checkpoint(trained_run) == trained_run / "checkpoints" / "best"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an lmforge checkpoint"):
        load_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text('{"format": "something-else"}')
    (fake / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not an lmforge checkpoint"):
        load_model(fake)


def test_vocabulary_mismatch_is_a_config_error(char_data, tmp_path):
    config = tiny_pretrain_config(char_data, tmp_path)
    config.model.vocab_size = 10
    with pytest.raises(ConfigError, match="vocab"):
        pretrain(config)


# ------------------------------------------------------------------ continued pretraining (init)
def test_continued_pretraining_starts_from_the_checkpoints_weights(trained_run, char_data, tmp_path):
    base = resolve_checkpoint(trained_run)
    same = tiny_pretrain_config(char_data, tmp_path / "same", max_steps=1, lr=1e-12, min_lr=0.0, warmup_steps=0,
                                save_interval=0, eval_interval=0)
    same.model.n_layer, same.init = 1, str(trained_run)  # the checkpoint's architecture replaces model
    pretrain(same)
    before, after = weights(base), weights(tmp_path / "same" / "checkpoints" / "final")
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-6)
    assert yaml.safe_load((tmp_path / "same" / "config.yaml").read_text())["init"] == str(trained_run)

    continued = tiny_pretrain_config(char_data, tmp_path / "continued", max_steps=20, save_interval=0,
                                     eval_interval=10)
    continued.init = str(trained_run)
    scratch = tiny_pretrain_config(char_data, tmp_path / "scratch", max_steps=20, save_interval=0, eval_interval=10)
    assert pretrain(continued).metrics["val_loss"] < pretrain(scratch).metrics["val_loss"] - 0.5


def test_continued_pretraining_errors(trained_run, char_data, tmp_path, corpus_file):
    from lmforge.data.shards import prepare
    from lmforge.tokenizer import Tokenizer
    from lmforge.training.checkpoint import update_task_info

    config = tiny_pretrain_config(char_data, tmp_path / "run", max_steps=2)
    config.init = str(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="does not exist"):
        pretrain(config)
    other = tmp_path / "other"  # the same text under a BPE tokenizer
    Tokenizer.train([corpus_file.read_text()], kind="bpe", vocab_size=300).save(other / "tokenizer")
    prepare([corpus_file], other / "tokenizer", other / "data", progress=False)
    config = tiny_pretrain_config(other / "data", tmp_path / "run", max_steps=2)
    config.init = str(trained_run)
    with pytest.raises(ConfigError, match=r"prepared with another tokenizer.*lmforge prepare --tokenizer"):
        pretrain(config)
    classifier = tmp_path / "classifier"
    shutil.copytree(resolve_checkpoint(trained_run), classifier)
    update_task_info(classifier, {"kind": "classification", "labels": ["a", "b"]})
    config = tiny_pretrain_config(char_data, tmp_path / "run", max_steps=2)
    config.init = str(classifier)
    with pytest.raises(CheckpointError, match="holds a classification model"):
        pretrain(config)
    adapters = tmp_path / "adapters"
    shutil.copytree(resolve_checkpoint(trained_run), adapters)
    saved = json.loads((adapters / "config.json").read_text())
    (adapters / "config.json").write_text(json.dumps({**saved, "lora": {"r": 4}}))
    config.init = str(adapters)
    with pytest.raises(CheckpointError, match="holds LoRA adapters; merge them"):
        pretrain(config)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ exact resume after SIGKILL
def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=timeout)


def write_config(path: Path, config) -> Path:
    path.write_text(yaml.safe_dump(to_dict(config)))
    return path


def resume_config(char_data: Path, out: Path):
    config = tiny_pretrain_config(char_data, out, max_steps=400, save_interval=40, eval_interval=50,
                                  keep_checkpoints=2)
    config.model.dropout = 0.1  # so that the dropout RNG state must be restored too
    return config


@pytest.mark.slow
@pytest.mark.parametrize("extra_delay", [0.0, 0.137])
def test_sigkill_then_resume_is_bit_identical(char_data, tmp_path, extra_delay):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = run_cli("pretrain", "--config", str(write_config(tmp_path / "a.yaml", resume_config(char_data,
                                                                                                     reference_dir))))
    assert reference.returncode == 0, reference.stderr
    config_file = write_config(tmp_path / "b.yaml", resume_config(char_data, killed_dir))
    process = subprocess.Popen([sys.executable, "-m", "lmforge", "pretrain", "--config", str(config_file)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_when(process, lambda: (killed_dir / "checkpoints" / "step-80").exists(), extra_delay)
    assert process.returncode == -signal.SIGKILL
    assert not (killed_dir / "checkpoints" / "final").exists()
    resumed = run_cli("pretrain", "--config", str(config_file), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert_bit_identical(weights(reference_dir / "checkpoints" / "final"),
                         weights(killed_dir / "checkpoints" / "final"))
    steps = [r["step"] for r in read_jsonl(killed_dir / "metrics.jsonl") if "train_loss" in r]
    assert steps == sorted(set(steps))  # each step logged once, even after the resume


def test_resume_without_checkpoint_starts_fresh(char_data, tmp_path):
    config = tiny_pretrain_config(char_data, tmp_path, max_steps=10, save_interval=0)
    config.resume = True
    result = pretrain(config)
    assert result.resumed_from is None and result.step == 10


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from lmforge.training import checkpoint
    from lmforge.api import LanguageModel
    lm = LanguageModel.load(sys.argv[1])
    def dying_save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.torch.save = dying_save
    checkpoint.save_checkpoint(sys.argv[2], lm.model, lm.tokenizer, train_state={"step": 99})
""")


def test_kill_during_a_save_leaves_no_partial_checkpoint(trained_run, tmp_path):
    run = tmp_path / "run"
    step_dir = run / "checkpoints" / "step-20"
    good = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE.replace("os.kill(os.getpid(), signal.SIGKILL)",
                                                                          "pass"), str(trained_run), str(step_dir)])
    assert good.returncode == 0 and latest_checkpoint(run) == step_dir
    dying = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(trained_run),
                            str(run / "checkpoints" / "step-40")])
    assert dying.returncode == -signal.SIGKILL
    assert not (run / "checkpoints" / "step-40").exists()
    assert latest_checkpoint(run) == step_dir  # the resume point is still the complete one
    leftovers = list((run / "checkpoints").glob(".*.tmp"))
    assert leftovers
    prune_checkpoints(run, keep=2)
    assert not list((run / "checkpoints").glob(".*.tmp"))


# ------------------------------------------------------------------ distributed data parallel
@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(char_data, tmp_path):
    single = tiny_pretrain_config(char_data, tmp_path / "single", max_steps=40, batch_size=8, log_interval=5,
                                  save_interval=20, eval_interval=20)
    double = tiny_pretrain_config(char_data, tmp_path / "ddp", max_steps=40, batch_size=4, log_interval=5,
                                  save_interval=20, eval_interval=20)
    for name, config in (("single", single), ("ddp", double)):
        extra = ["--nproc", "2"] if name == "ddp" else []
        result = run_cli("pretrain", "--config", str(write_config(tmp_path / f"{name}.yaml", config)), *extra)
        assert result.returncode == 0, result.stderr
    one = [r for r in read_jsonl(tmp_path / "single" / "metrics.jsonl") if "train_loss" in r]
    two = [r for r in read_jsonl(tmp_path / "ddp" / "metrics.jsonl") if "train_loss" in r]
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["tokens"] == b["tokens"]
    val_one = [r["val_loss"] for r in read_jsonl(tmp_path / "single" / "metrics.jsonl") if "val_loss" in r]
    val_two = [r["val_loss"] for r in read_jsonl(tmp_path / "ddp" / "metrics.jsonl") if "val_loss" in r]
    assert val_one == pytest.approx(val_two, rel=1e-4)
    # resume works under DDP too
    config = write_config(tmp_path / "ddp.yaml", double)
    extended = run_cli("pretrain", "--config", str(config), "--nproc", "2", "--resume", "--max-steps", "50")
    assert extended.returncode == 0, extended.stderr
    steps = [r["step"] for r in read_jsonl(tmp_path / "ddp" / "metrics.jsonl") if "train_loss" in r]
    assert steps[-1] == 50 and steps == sorted(set(steps))
