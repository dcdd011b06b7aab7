"""The fine-tuning recipe end to end on a real (tiny, char-level) base model: full and LoRA fine-tuning learn,
LoRA checkpoints hold adapters only and reference their base, exact resume after SIGKILL, options and errors."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lmforge.api import LanguageModel
from lmforge.config import (
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneEvalConfig,
    FinetuneTrainConfig,
    LoraConfig,
)
from lmforge.data.formats import DEFAULT_CHAT_TEMPLATE, read_records, record_format
from lmforge.data.supervised import encode_set, split_records
from lmforge.errors import CheckpointError, ConfigError, DataError, RequestError
from lmforge.models.lora import has_lora, merge_lora
from lmforge.recipes.finetune import ExampleLossEvaluator, finetune
from lmforge.training.checkpoint import fingerprint, load_model, resolve_checkpoint, save_checkpoint
from lmforge.training.distributed import DistContext
from process_control import kill_when

WORDS = ["cat", "dog", "sun", "red", "box", "pen", "cup", "map"]


# ------------------------------------------------------------------------------------ data and helpers
def alpaca_records(n: int = 40) -> list[dict]:
    """A learnable pattern: 'Repeat: w' -> 'w w'; every word is both in training and held-out records."""
    return [{"instruction": f"Repeat: {WORDS[i % 8]}", "output": f"{WORDS[i % 8]} {WORDS[i % 8]}"} for i in range(n)]


def chat_records(n: int = 40) -> list[dict]:
    records = []
    for i in range(n):
        w, v = WORDS[i % 8], WORDS[(i + 3) % 8]
        messages = [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": f"{w} {w}"},
                    {"role": "user", "content": f"Now: {v}"}, {"role": "assistant", "content": f"{v} {v}"}]
        if i % 2:
            messages.insert(0, {"role": "system", "content": "Echo twice."})
        records.append({"messages": messages})
    return records


def prompt_completion_records(n: int = 40) -> list[dict]:
    return [{"prompt": f"Repeat {WORDS[i % 8]} ->", "completion": f" {WORDS[i % 8]} {WORDS[i % 8]}"}
            for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ftdata")
    return {"alpaca": write_jsonl(root / "alpaca.jsonl", alpaca_records()),
            "chat": write_jsonl(root / "chat.jsonl", chat_records()),
            "prompt_completion": write_jsonl(root / "pc.jsonl", prompt_completion_records())}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these tiny models train far faster so, above all on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ft_config(base: Path, data: Path, out: Path, lora: dict | None = None, eval: dict | None = None,
              val_fraction: float = 0.2, **train) -> FinetuneConfig:
    options = dict(max_steps=40, lr=3e-3, warmup_steps=5, batch_size=8, eval_interval=20, save_interval=0,
                   log_interval=5, progress=False, device="cpu", dtype="fp32", num_threads=1)
    options.update(train)
    return FinetuneConfig(checkpoint=str(base), out=str(out),
                          data=FinetuneDataConfig(path=str(data), val_fraction=val_fraction),
                          train=FinetuneTrainConfig(**options), lora=LoraConfig(**(lora or {})),
                          eval=FinetuneEvalConfig(**(eval or {})))


def held_out_loss(checkpoint: Path, data: Path, val_fraction: float = 0.2) -> float:
    """The response loss of a checkpoint on the records a run holds out (what its val_loss measures)."""
    model, tokenizer, _ = load_model(checkpoint)
    records = read_records(data)
    fmt = record_format(records)
    if fmt in ("chat", "alpaca") and not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    val = encode_set(split_records(records, val_fraction)[1], fmt, tokenizer, model.config.block_size, name="val")
    evaluator = ExampleLossEvaluator(val, 16, tokenizer.pad_id, None, None, DistContext())
    with torch.no_grad():
        return evaluator(model, True)["val_loss"]


def digest(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def val_losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["val_loss"] for r in lines if "val_loss" in r]


def greedy_answer(lm: LanguageModel, word: str) -> tuple[str, str]:
    completion = lm.chat([{"role": "user", "content": f"Repeat: {word}"}], temperature=0, max_new_tokens=20)
    return completion.text, completion.finish_reason


class Remember(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def base(trained_run) -> Path:
    return resolve_checkpoint(trained_run)


@pytest.fixture(scope="module")
def base_loss(base, data) -> float:
    return held_out_loss(base, data["alpaca"])


@pytest.fixture(scope="module")
def full_run(base, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    result = finetune(ft_config(base, data["alpaca"], out, max_steps=200, eval_interval=100,
                                eval={"examples": 4, "max_new_tokens": 16}))
    return result, out


@pytest.fixture(scope="module")
def lora_run(base, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    before = digest(base / "model.safetensors")
    logger = logging.getLogger("lmforge.recipes.finetune")
    remember = Remember()
    logger.addHandler(remember)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        result = finetune(ft_config(base, data["alpaca"], out, lora={"r": 8}, max_steps=100, lr=1e-2,
                                    eval_interval=50))
    finally:
        logger.removeHandler(remember)
        logger.setLevel(level)
    return result, out, before, remember.messages


# ------------------------------------------------------------------------------------ full fine-tuning
def test_full_finetuning_lowers_the_held_out_response_loss(full_run, base_loss, data):
    result, out = full_run
    assert 3.5 < base_loss < 6  # the base model has never seen the pattern
    assert result.step == 200 and result.final_checkpoint == out / "checkpoints" / "final"
    assert result.metrics["val_loss"] < 0.5 < base_loss - 3
    assert result.metrics["val_ppl"] == pytest.approx(math.exp(result.metrics["val_loss"]))
    losses = val_losses(out)
    assert losses[0] < base_loss and losses[-1] <= losses[0] + 0.05
    # the recorded metric is what the evaluator computes from the saved checkpoint
    assert held_out_loss(out / "checkpoints" / "final", data["alpaca"]) == pytest.approx(result.metrics["val_loss"],
                                                                                       rel=1e-5)
    # generation metrics on held-out prompts: the answers are learned and end with eos
    assert result.metrics["gen_eos_rate"] == 1.0
    assert result.metrics["gen_chrf"] == result.metrics["gen_rougeL"] == 100.0
    assert result.metrics["gen_mean_new_tokens"] == 7.0  # 'w w' and nothing more


def test_fine_tuned_answers_end_with_eos(full_run):
    _, out = full_run
    lm = LanguageModel.load(out, device="cpu")
    for word in ("cat", "pen", "map"):
        assert greedy_answer(lm, word) == (f"{word} {word}", "stop")
    messages = [{"role": "user", "content": "Repeat: box"}]
    completion = lm.chat(messages, temperature=0, max_new_tokens=20)
    assert completion.token_ids == lm.tokenizer.encode("box box")  # eos ends it and is not part of the answer
    assert completion.prompt_tokens == len(lm.chat_prompt(messages))
    assert "".join(lm.stream_chat(messages, temperature=0, max_new_tokens=20)) == "box box"
    # a plain prompt in the training format gets the same answer
    assert lm.generate("### User:\nRepeat: sun\n\n### Assistant:\n", temperature=0, max_new_tokens=20) == "sun sun"


def test_chat_history_is_cut_to_the_context_keeping_the_system_message(full_run):
    from lmforge.chat import fit_history

    _, out = full_run
    lm = LanguageModel.load(out, device="cpu")
    system = {"role": "system", "content": "Echo."}
    turns = [{"role": "user", "content": "Repeat: cat"}, {"role": "assistant", "content": "cat cat"},
             {"role": "user", "content": "Repeat: dog"}]
    short = [{"role": "user", "content": "Repeat: dog"}]
    assert fit_history(lm, short, reserve=10) == 0 and short == [{"role": "user", "content": "Repeat: dog"}]
    messages = [system, *turns]
    assert len(lm.chat_prompt(messages)) + 10 > lm.context_length == 64
    assert fit_history(lm, messages, reserve=10) == 2
    assert messages == [system, turns[2]]  # the oldest exchange went; the system message and newest turn stay
    too_long = [system, *turns[:2], {"role": "user", "content": "x" * 100}]
    with pytest.raises(RequestError, match="134 tokens long"):  # refused before any history is dropped
        fit_history(lm, too_long, reserve=10)
    assert len(too_long) == 4


def test_full_run_directory_and_checkpoint(full_run, base, data):
    result, out = full_run
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "checkpoints/final/model.safetensors",
                 "checkpoints/final/train_state.pt", "checkpoints/best/model.safetensors"):
        assert (out / name).exists(), name
    assert not (out / "checkpoints" / "final" / "adapter.safetensors").exists()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["checkpoint"] == str(base) and config["data"]["path"] == str(data["alpaca"])
    assert config["lora"]["r"] == 0 and config["train"]["max_steps"] == 200
    info = json.loads((out / "checkpoints" / "final" / "config.json").read_text())
    assert info["recipe"] == "finetune" and info["data_format"] == "alpaca" and info["step"] == 200
    assert info["base_checkpoint"] == str(base.resolve())
    assert "lora" not in info and "base" not in info
    # the chat template the run trained with is stored with the tokenizer of every checkpoint
    for name in ("final", "best"):
        tokenizer_config = json.loads((out / "checkpoints" / name / "tokenizer_config.json").read_text())
        assert tokenizer_config["chat_template"] == DEFAULT_CHAT_TEMPLATE
    assert "chat_template" not in json.loads((base / "tokenizer_config.json").read_text())  # base untouched
    assert LanguageModel.load(out, device="cpu").tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE


# ------------------------------------------------------------------------------------ LoRA
def test_layer_lr_decay_scales_each_blocks_first_step(base, data, tmp_path):
    """Adam's first step moves each weight that has a gradient by the step's rate itself, so with
    layer-wise decay 0.5 the final norm moves by lr, block k of L by lr x 0.5^(L - k) and the
    (tied) embeddings by lr x 0.5^(L + 1)."""
    before = load_file(str(base / "model.safetensors"))
    result = finetune(ft_config(base, data["alpaca"], tmp_path / "llrd", max_steps=1, warmup_steps=0, lr=1e-3,
                                eval_interval=0, layer_lr_decay=0.5))
    after = load_file(str(Path(result.final_checkpoint) / "model.safetensors"))
    layers = 1 + max(int(name.split(".")[1]) for name in before if name.startswith("blocks."))

    def moved(name: str) -> float:
        return (after[name] - before[name]).abs().max().item()

    assert moved("norm.weight") == pytest.approx(1e-3, rel=1e-3)
    for k in range(layers):
        assert moved(f"blocks.{k}.mlp.up_proj.weight") == pytest.approx(1e-3 * 0.5 ** (layers - k), rel=1e-3)
    assert moved("tok_emb.weight") == pytest.approx(1e-3 * 0.5 ** (layers + 1), rel=1e-3)


def test_lora_lowers_the_loss_and_trains_only_adapters(lora_run, base, base_loss):
    result, out, base_digest_before, messages = lora_run
    assert result.metrics["val_loss"] < base_loss - 1.0
    final = out / "checkpoints" / "final"
    assert (final / "adapter.safetensors").is_file() and not (final / "model.safetensors").exists()
    assert (out / "checkpoints" / "best" / "adapter.safetensors").is_file()
    assert (final / "adapter.safetensors").stat().st_size * 4 < (base / "model.safetensors").stat().st_size
    adapters = load_file(str(final / "adapter.safetensors"))
    assert adapters and all(".lora_A." in name or ".lora_B." in name for name in adapters)
    assert all(t.shape[0] == 8 for name, t in adapters.items() if ".lora_A." in name)  # rank 8
    assert all(t.shape[1] == 8 for name, t in adapters.items() if ".lora_B." in name)
    assert any(t.abs().sum() > 0 for name, t in adapters.items() if ".lora_B." in name)  # they learned
    info = json.loads((final / "config.json").read_text())
    assert info["lora"]["r"] == 8 and info["lora"]["targets"] == ["q", "k", "v", "o"]
    assert info["base"] == {"path": str(base.resolve()), "fingerprint": fingerprint(base)}
    # the base checkpoint's weights are unchanged by the LoRA run
    assert digest(base / "model.safetensors") == base_digest_before
    # only the adapters were trainable: a small share of the parameters
    summary = next(m for m in messages if "trainable parameters" in m)
    share = float(summary.split("(")[-1].split("%")[0])
    assert 0 < share < 25, summary


def test_lora_checkpoint_loads_on_its_base_and_generates_like_the_merged_one(lora_run, base, tmp_path):
    _, out, _, _ = lora_run
    model, tokenizer, info = load_model(out)
    assert has_lora(model)
    base_model, _, _ = load_model(base)
    adapted = model.state_dict()
    for name, tensor in base_model.state_dict().items():  # the frozen weights are the base's, bit for bit
        wrapped = name.replace("qkv_proj.", "qkv_proj.base.").replace("o_proj.", "o_proj.base.")
        key = wrapped if wrapped in adapted else name
        assert key in adapted and torch.equal(adapted[key], tensor), name
    merge_lora(model)
    merged_dir = save_checkpoint(tmp_path / "merged", model, tokenizer, info={"step": info["step"]})
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter.safetensors").exists()
    lora_lm, merged_lm = LanguageModel.load(out, device="cpu"), LanguageModel.load(merged_dir, device="cpu")
    assert not has_lora(merged_lm.model) and has_lora(lora_lm.model)
    for word in ("cat", "sun", "box"):
        assert greedy_answer(lora_lm, word) == greedy_answer(merged_lm, word)
    sampling = dict(temperature=0, max_new_tokens=30, ignore_eos=True)
    assert lora_lm.generate("The for", **sampling) == merged_lm.generate("The for", **sampling)
    ids = torch.tensor([lora_lm.chat_prompt([{"role": "user", "content": "Repeat: cup"}])])
    with torch.no_grad():
        torch.testing.assert_close(lora_lm.model(ids), merged_lm.model(ids), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(lora_lm.model(ids), base_model(ids), atol=1e-3)  # the adapters do something


def lora_on_a_copied_base(trained_run: Path, data: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """(base, LoRA run directory): a 3-step LoRA run on a private copy of the base checkpoint."""
    base = tmp_path / "base"
    shutil.copytree(resolve_checkpoint(trained_run), base)
    out = tmp_path / "lora"
    finetune(ft_config(base, data["alpaca"], out, lora={"r": 4}, max_steps=3, eval_interval=0))
    return base, out


def change_weights(base: Path) -> None:
    weights = load_file(str(base / "model.safetensors"))
    weights["tok_emb.weight"] = weights["tok_emb.weight"] * 1.01
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})


def test_moved_or_changed_base_is_a_clear_checkpoint_error(trained_run, data, tmp_path):
    base, out = lora_on_a_copied_base(trained_run, data, tmp_path)
    final = out / "checkpoints" / "final"
    assert has_lora(load_model(final)[0])

    base.rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match="base checkpoint .* is missing") as info:
        load_model(final)
    assert str(base) in str(info.value) and "merge-lora" in str(info.value)
    with pytest.raises(CheckpointError, match="is missing"):
        LanguageModel.load(out, device="cpu")
    (tmp_path / "moved").rename(base)
    assert has_lora(load_model(final)[0])  # back in place: fine again

    change_weights(base)
    with pytest.raises(CheckpointError, match=f"the base checkpoint {base} has changed since {final}"):
        load_model(final)
    with pytest.raises(CheckpointError, match="has changed since"):
        LanguageModel.load(out, device="cpu")


def test_resuming_a_lora_run_on_a_changed_base_is_refused(trained_run, data, tmp_path):
    base, out = lora_on_a_copied_base(trained_run, data, tmp_path)
    change_weights(base)
    config = ft_config(base, data["alpaca"], out, lora={"r": 4}, max_steps=5, eval_interval=0)
    config.resume = True
    with pytest.raises(CheckpointError, match="cannot resume .*weights differ"):
        finetune(config)


# ------------------------------------------------------------------------------------ exact resume
def lmforge_finetune(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmforge", "finetune", str(base), "--data", str(data), "--out", str(out),
            "--train.max_steps", "200", "--train.save_interval", "25", "--train.eval_interval", "50",
            "--train.lr", "3e-3", "--train.warmup_steps", "5", "--train.batch_size", "4", "--train.log_interval", "5",
            "--train.device", "cpu", "--train.dtype", "fp32", "--train.num_threads", "1", "--train.progress",
            "false", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sigkill_then_resume_is_bit_identical(trained_run, data, tmp_path, lora):
    base = tmp_path / "base"
    shutil.copytree(resolve_checkpoint(trained_run), base)
    config = json.loads((base / "config.json").read_text())
    config["model"]["dropout"] = 0.1  # so that the dropout RNG state must be restored too
    (base / "config.json").write_text(json.dumps(config))
    extra = ["--lora.r", "8", "--lora.dropout", "0.1", "--train.lr", "1e-2"] if lora else []
    weights_file = "adapter.safetensors" if lora else "model.safetensors"
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    reference = subprocess.run(lmforge_finetune(base, data["chat"], reference_dir, *extra), capture_output=True,
                               text=True, timeout=300, env=env)
    assert reference.returncode == 0, reference.stderr
    process = subprocess.Popen(lmforge_finetune(base, data["chat"], killed_dir, *extra), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env)
    kill_when(process, lambda: (killed_dir / "checkpoints" / "step-25").exists(), extra_delay=0.05)
    assert process.returncode == -signal.SIGKILL
    assert not (killed_dir / "checkpoints" / "final").exists()
    resumed = subprocess.run(lmforge_finetune(base, data["chat"], killed_dir, *extra, "--resume"),
                             capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr
    resumed_step = int(resumed.stderr.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert 25 <= resumed_step < 200

    a = load_file(str(reference_dir / "checkpoints" / "final" / weights_file))
    b = load_file(str(killed_dir / "checkpoints" / "final" / weights_file))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"
    assert not (killed_dir / "checkpoints" / "final" / ("model.safetensors" if lora else "adapter.safetensors")
                ).exists()
    steps = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in line]
    assert steps == sorted(set(steps)) and steps[-1] == 200  # each step logged once, even after the resume
    assert val_losses(killed_dir) == val_losses(reference_dir)


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("option", ["packing", "train_on_prompt"])
def test_packing_and_train_on_prompt_run_and_learn(base, data, tmp_path, option):
    config = ft_config(base, data["chat"], tmp_path / "run", max_steps=40)
    setattr(config.data, option, True)
    result = finetune(config)
    assert result.step == 40
    assert result.metrics["val_loss"] < held_out_loss(base, data["chat"]) - 1.0  # responses are learned
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"][option] is True


def test_separate_validation_file_and_prompt_completion_data(base, data, tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", prompt_completion_records(6))
    config = ft_config(base, data["prompt_completion"], tmp_path / "run", max_steps=30, eval_interval=0,
                       eval={"examples": 2, "max_new_tokens": 8})
    config.data.val_path = str(val)
    result = finetune(config)
    assert math.isfinite(result.metrics["val_loss"]) and "gen_bleu" in result.metrics
    info = json.loads((tmp_path / "run" / "checkpoints" / "final" / "config.json").read_text())
    assert info["data_format"] == "prompt_completion"
    # prompt/completion pairs need no chat template, so none is added to the tokenizer
    assert "chat_template" not in json.loads((tmp_path / "run" / "checkpoints" / "final" /
                                              "tokenizer_config.json").read_text())


def test_finetune_from_a_hugging_face_folder(trained_run, data, tmp_path):
    from lmforge.interop.hf import export_hf, is_hf_folder

    hf = export_hf(trained_run, tmp_path / "hf")
    assert is_hf_folder(hf)
    out = tmp_path / "run"
    result = finetune(ft_config(hf, data["alpaca"], out, lora={"r": 4}, max_steps=10, eval_interval=0))
    imported = out / "base"
    assert (imported / "model.safetensors").is_file() and (imported / "config.json").is_file()
    info = json.loads((result.final_checkpoint / "config.json").read_text())
    assert info["base"]["path"] == str(imported.resolve()) and info["base_checkpoint"] == str(imported.resolve())
    # the imported base is the exported model, bit for bit
    original, converted = load_model(trained_run)[0].state_dict(), load_model(imported)[0].state_dict()
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[k], converted[k]) for k in original)
    lm = LanguageModel.load(out, device="cpu")
    assert has_lora(lm.model) and lm.chat([{"role": "user", "content": "Repeat: cat"}], max_new_tokens=5,
                                          temperature=0).prompt_tokens > 0
    # a resume reuses the imported base rather than importing it again
    before = (imported / "model.safetensors").stat().st_mtime_ns
    config = ft_config(hf, data["alpaca"], out, lora={"r": 4}, max_steps=12, eval_interval=0)
    config.resume = True
    resumed = finetune(config)
    assert resumed.step == 12 and resumed.resumed_from is not None
    assert (imported / "model.safetensors").stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------ errors
def test_no_data_is_an_error(base, data, tmp_path):
    out = tmp_path / "run"
    config = ft_config(base, data["alpaca"], out)
    config.data.path = None
    with pytest.raises(ConfigError, match="no data"):
        finetune(config)
    with pytest.raises(DataError, match="does not exist"):
        finetune(ft_config(base, tmp_path / "missing.jsonl", out))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no examples"):
        finetune(ft_config(base, empty, out))
    with pytest.raises(DataError, match="no held-out examples"):
        finetune(ft_config(base, data["alpaca"], out, val_fraction=0.0))
    one = write_jsonl(tmp_path / "one.jsonl", alpaca_records(1))
    with pytest.raises(DataError, match="no held-out examples"):
        finetune(ft_config(base, one, out))  # 5% of one record is nothing
    config = ft_config(base, data["alpaca"], out)
    config.checkpoint = None
    with pytest.raises(ConfigError, match="no base checkpoint"):
        finetune(config)
    assert not out.exists()  # nothing written for a run that could not start


def test_a_lora_checkpoint_cannot_be_the_base(lora_run, data, tmp_path):
    _, lora_out, _, _ = lora_run
    for checkpoint in (lora_out, lora_out / "checkpoints" / "final"):
        with pytest.raises(ConfigError, match="is a LoRA checkpoint; merge it first"):
            finetune(ft_config(checkpoint, data["alpaca"], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_conversation_without_an_assistant_message_is_an_error(base, tmp_path):
    records = chat_records(10)
    records[6] = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Repeat: cat"}]}
    file = write_jsonl(tmp_path / "chat.jsonl", records)
    with pytest.raises(DataError, match="example 7: a conversation without an assistant message"):
        finetune(ft_config(base, file, tmp_path / "run", val_fraction=0.1))  # record 7 is a training record
    mixed = write_jsonl(tmp_path / "mixed.jsonl", alpaca_records(5) + chat_records(5))
    with pytest.raises(DataError, match="mixes formats"):
        finetune(ft_config(base, mixed, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_lora_target_the_model_lacks_is_a_config_error(base, data, tmp_path):
    with pytest.raises(ConfigError, match="no gate layer"):
        finetune(ft_config(base, data["alpaca"], tmp_path / "run", lora={"r": 4, "targets": ["gate"]}))
