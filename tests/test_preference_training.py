"""DPO and reward models end to end on a tiny model: held-out preference accuracy rises, the results
load with LanguageModel.load, the reference is the starting model, resume is exact, bad data is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import corpus_text, read_jsonl, tiny_pretrain_config
from lmforge.alignment.config import PreferenceConfig, PreferenceTrainConfig
from lmforge.alignment.losses import sequence_logprobs
from lmforge.alignment.preference_training import attach_reference, dpo, read_pairs, train_reward
from lmforge.alignment.rewards import load_reward
from lmforge.api import LanguageModel
from lmforge.config import LoraConfig
from lmforge.errors import ConfigError, DataError, RequestError
from lmforge.training.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["cat", "dog", "sun", "tree", "bird", "fish", "rain", "moon", "star", "road", "lake", "wind"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from lmforge.data.shards import prepare
    from lmforge.data.sources import iter_texts
    from lmforge.recipes.pretrain import pretrain
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("prefbase")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(30_000), encoding="utf-8")
    Tokenizer.train(iter_texts([corpus]), kind="char").save(root / "tokenizer")
    prepare([corpus], root / "tokenizer", root / "data", val_fraction=0.1, progress=False)
    pretrain(tiny_pretrain_config(root / "data", root / "run", max_steps=30, save_interval=0, eval_interval=0))
    return root / "run"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Chosen replies praise the word, rejected ones scold it."""
    path = tmp_path_factory.mktemp("prefs") / "pairs.jsonl"
    rows = [{"prompt": f"About the {w} {i}:", "chosen": f" a good {w}.", "rejected": f" a bad {w}!"}
            for i in range(10) for w in WORDS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_for(base: Path, pairs: Path, out: Path, **options) -> PreferenceConfig:
    train = dict(batch_size=8, max_steps=40, lr=3e-3, warmup_steps=0, eval_interval=20, save_interval=20,
                 log_interval=5, progress=False, dtype="fp32", device="cpu", seed=3)
    train.update(options.pop("train", {}))
    return PreferenceConfig(checkpoint=str(base), data=str(pairs), out=str(out), val_fraction=0.2,
                            train=PreferenceTrainConfig(**train), **options)


def test_dpo_learns_the_preference_and_loads(base, pairs, tmp_path):
    result = dpo(config_for(base, pairs, tmp_path / "dpo", beta=0.5))
    assert result.metrics["val_accuracy"] > 0.9 and result.metrics["val_margin"] > 0
    lines = [line for line in read_jsonl(tmp_path / "dpo" / "metrics.jsonl") if "rewards/margins" in line]
    assert lines[-1]["rewards/margins"] > lines[0]["rewards/margins"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert name in lines[-1]
    lm = LanguageModel.load(tmp_path / "dpo")
    assert lm.kind == "causal_lm"
    good, bad = lm.score("About the owl 3: a good owl."), lm.score("About the owl 3: a bad owl!")
    reference = LanguageModel.load(base)
    assert good - bad > reference.score("About the owl 3: a good owl.") - reference.score("About the owl 3: a bad owl!")


@pytest.mark.parametrize("loss_type", ["ipo", "robust", "hinge"])
def test_the_dpo_variants_learn_too(base, pairs, tmp_path, loss_type):
    options = {"label_smoothing": 0.1} if loss_type == "robust" else {}
    result = dpo(config_for(base, pairs, tmp_path / loss_type, beta=0.5, loss_type=loss_type,
                            train=dict(max_steps=30, eval_interval=0), **options))
    assert result.metrics["val_accuracy"] > 0.8


def test_the_reference_is_the_starting_model_computed_once(base, pairs, tmp_path):
    config = config_for(base, pairs, tmp_path / "ref", lora=LoraConfig(r=4, alpha=8))
    model, tokenizer, _ = load_model(base)
    train_pairs, _ = read_pairs(config, tokenizer, model.config.block_size)
    from lmforge.models.lora import apply_lora
    apply_lora(model, config.lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # adapters that change the policy: the reference must not see them
    attach_reference(model, train_pairs[:4], 0, torch.device("cpu"), 2)
    plain, _, _ = load_model(base)
    for pair in train_pairs[:4]:
        for ids, start, expected in ((pair.chosen, pair.chosen_start, pair.reference[0]),
                                     (pair.rejected, pair.rejected_start, pair.reference[1])):
            x = torch.tensor([ids])
            with torch.no_grad():
                logps = sequence_logprobs(plain(x), x)[0, start - 1:].sum()
            assert float(logps) == pytest.approx(expected, abs=1e-4)


def test_lora_dpo_saves_adapters_that_load(base, pairs, tmp_path):
    result = dpo(config_for(base, pairs, tmp_path / "lora", beta=0.5, lora=LoraConfig(r=8, alpha=16),
                            train=dict(max_steps=30, lr=1e-2, eval_interval=0)))
    assert (result.final_checkpoint / "adapter.safetensors").is_file()
    assert result.metrics["val_accuracy"] > 0.8
    assert LanguageModel.load(tmp_path / "lora").kind == "causal_lm"


def test_dpo_resumes_bit_exactly_after_a_kill(base, pairs, tmp_path):
    whole = dpo(config_for(base, pairs, tmp_path / "whole"))
    dpo(config_for(base, pairs, tmp_path / "parts"))
    shutil.rmtree(tmp_path / "parts" / "checkpoints" / "final")  # killed after step-20 was saved
    resumed = dpo(config_for(base, pairs, tmp_path / "parts", resume=True))
    assert resumed.resumed_from.name == "step-20"
    first, _, _ = load_model(whole.final_checkpoint)
    second, _, _ = load_model(resumed.final_checkpoint)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_reward_model_ranks_held_out_pairs_and_serves_as_a_reward(base, pairs, tmp_path):
    result = train_reward(config_for(base, pairs, tmp_path / "rm", train=dict(max_steps=60)))
    assert result.metrics["val_accuracy"] > 0.9
    lm = LanguageModel.load(tmp_path / "rm")
    assert lm.capabilities == ("reward",)
    assert lm.score_pair("About the owl 3:", " a good owl.", " a bad owl!") > 0.5
    scores = lm.reward(["About the owl 3:"] * 2, [" a good owl.", " a bad owl!"])
    assert isinstance(scores, list) and scores[0] > scores[1]
    assert isinstance(lm.reward("About the owl 3:", " a good owl."), float)
    reward = load_reward(f"reward_model:{tmp_path / 'rm'}")
    values = reward(["About the owl 3:"] * 2, [" a good owl.", " a bad owl!"])
    assert values == pytest.approx(scores, abs=1e-5)
    with pytest.raises(RequestError, match="cannot reward"):
        LanguageModel.load(base).reward("a", "b")
    conversation = [{"role": "user", "content": "About the owl 3:"}]
    one, many = lm.reward(conversation, " a good owl."), lm.reward([conversation, "About the owl 3:"], [" a", " b"])
    assert isinstance(one, float) and len(many) == 2  # a chat prompt goes through the chat template
    assert 0.0 < lm.score_pair(conversation, " a good owl.", " a bad owl!") < 1.0
    with pytest.raises(RequestError, match="2 prompts but 1 replies"):
        lm.reward(["a", "b"], [" c"])
    with pytest.raises(RequestError, match="prompts must be"):
        lm.reward([], [])


def test_bad_preference_data_is_a_one_line_error(base, pairs, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        dpo(config_for(base, empty, tmp_path / "a"))
    holes = tmp_path / "holes.jsonl"
    holes.write_text("".join(json.dumps({"prompt": "p", "chosen": " x", "rejected": " y"}) + "\n" for _ in range(9))
                     + json.dumps({"prompt": "p", "chosen": " x"}) + "\n")
    with pytest.raises(DataError, match="row 10 has no 'rejected'"):
        dpo(config_for(base, holes, tmp_path / "b"))
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "p", "chosen": " x", "rejected": " y"}) + "\n")
    with pytest.raises(DataError, match="no held-out pairs"):
        train_reward(config_for(base, one, tmp_path / "c"))
    with pytest.raises(ConfigError, match="lora"):
        train_reward(config_for(base, pairs, tmp_path / "d", lora=LoraConfig(r=4)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    from lmforge.cli import main
    assert main(["dpo", str(base), "--data", str(holes), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no 'rejected'" in err and len(err.splitlines()) == 1
    assert main(["train-reward", str(base), "--data", str(pairs), "--out", str(tmp_path / "f"), "--train.max_steps",
                 "2", "--train.progress", "false"]) == 0
    assert "held-out pairs: loss" in capsys.readouterr().out


def test_chat_pairs_go_through_the_chat_template(base, tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Tell me about the {w}."}],
             "chosen": {"role": "assistant", "content": f"A good {w}."},
             "rejected": [{"role": "assistant", "content": f"A bad {w}!"}]} for w in WORDS * 2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = dpo(config_for(base, path, tmp_path / "chat", beta=0.5, train=dict(max_steps=4, eval_interval=0)))
    lm = LanguageModel.load(result.final_checkpoint)
    assert lm.tokenizer.chat_template  # the default template, saved with the run's checkpoints
    assert "### Assistant:" in lm.tokenizer.decode(lm.chat_prompt([{"role": "user", "content": "hi"}]),
                                                   skip_special_tokens=False)


def test_a_reward_model_stopped_by_max_steps_resumes_to_the_uninterrupted_run(base, pairs, tmp_path):
    """Stop at max_steps 20, resume with max_steps 40: the weights equal those of one 40-step run (a constant
    schedule, so that the budget does not change the first steps' learning rates; dropout draws from the RNG)."""
    options = dict(schedule="constant", eval_interval=10, save_interval=10)
    whole = train_reward(config_for(base, pairs, tmp_path / "whole", dropout=0.1, train=dict(options, max_steps=40)))
    train_reward(config_for(base, pairs, tmp_path / "parts", dropout=0.1, train=dict(options, max_steps=20)))
    resumed = train_reward(config_for(base, pairs, tmp_path / "parts", dropout=0.1, resume=True,
                                      train=dict(options, max_steps=40)))
    assert resumed.resumed_from is not None and resumed.step == whole.step == 40
    first, _, _ = load_model(whole.final_checkpoint)
    second, _, _ = load_model(resumed.final_checkpoint)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_reward_adapter_cuts_the_start_of_a_long_prompt(base, pairs, tmp_path):
    result = train_reward(config_for(base, pairs, tmp_path / "rm", train=dict(max_steps=2, eval_interval=0)))
    lm = LanguageModel.load(result.final_checkpoint)
    block = lm.model.config.block_size
    tail = "About the owl 3: " * (block // 8)  # longer than the context by itself
    cut, other = lm.reward(["a" * 3 * block + tail, "b" * 3 * block + tail], [" a good owl."] * 2)
    assert cut == pytest.approx(other, abs=1e-6)  # only the tail of the prompt was read
    assert cut == pytest.approx(lm.reward(tail, " a good owl."), abs=1e-6)
