"""Policy optimisation end to end on a tiny model: the reward rises, resume is exact, the reference
policy is the base, and bad input stops the run with the promised errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import corpus_text, read_jsonl, tiny_pretrain_config
from lmforge.alignment.config import RLConfig, RLTrainConfig
from lmforge.alignment.environments import Episode, Turn
from lmforge.alignment.losses import sequence_logprobs
from lmforge.alignment.policy_optimization import build_rewards, rl
from lmforge.alignment.rollouts import RolloutBatches, RunningStats, padded_episodes
from lmforge.config import LoraConfig
from lmforge.errors import ConfigError, DataError
from lmforge.models.lora import adapters_disabled, apply_lora
from lmforge.training.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

E_REWARD = "def e_share(prompts, completions, **columns):\n" \
           "    return [c.count('e') / max(len(c), 1) for c in completions]\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A char-level GPT barely pretrained (30 steps): it writes letters, rarely the same one."""
    from lmforge.data.shards import prepare
    from lmforge.data.sources import iter_texts
    from lmforge.recipes.pretrain import pretrain
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("rlbase")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text(30_000), encoding="utf-8")
    Tokenizer.train(iter_texts([corpus]), kind="char").save(root / "tokenizer")
    prepare([corpus], root / "tokenizer", root / "data", val_fraction=0.1, progress=False)
    pretrain(tiny_pretrain_config(root / "data", root / "run", max_steps=30, save_interval=0, eval_interval=0))
    return root / "run"


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path]:
    """(prompt set, reward file): write as many letter e's as possible."""
    root = tmp_path_factory.mktemp("rltask")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write {i}:", "answer": str(i)}) + "\n" for i in range(80)))
    reward = root / "letters.py"
    reward.write_text(E_REWARD)
    return prompts, reward


def config_for(base: Path, task: tuple[Path, Path], out: Path, **options) -> RLConfig:
    train = dict(batch_size=16, max_steps=30, lr=3e-3, eval_interval=10, eval_windows=16, save_interval=10,
                 log_interval=5, progress=False, dtype="fp32", device="cpu", seed=1)
    train.update(options.pop("train", {}))
    values = dict(checkpoint=str(base), prompts=str(task[0]), reward=[f"{task[1]}:e_share"], val_size=16,
                  num_generations=4, max_new_tokens=16, out=str(out), train=RLTrainConfig(**train))
    values.update(options)
    return RLConfig(**values)


def weights(path: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_model(path)
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_grpo_raises_the_reward_and_logs_what_trl_logs(base, task, tmp_path):
    result = rl(config_for(base, task, tmp_path / "rl"))
    lines = [line for line in read_jsonl(tmp_path / "rl" / "metrics.jsonl") if "reward" in line]
    assert lines[-1]["reward"] > lines[0]["reward"] + 0.3, [line["reward"] for line in lines]
    for name in ("rewards/e_share/mean", "rewards/e_share/std", "reward_std", "frac_reward_zero_std",
                 "completions/mean_length", "completions/min_length", "completions/max_length",
                 "completions/clipped_ratio", "entropy", "kl", "clip_ratio/region_mean", "train_loss"):
        assert name in lines[-1], name
    assert lines[-1]["entropy"] < lines[0]["entropy"]
    assert result.metrics["val_reward"] > 0.5 and "val_reward_e_share" in result.metrics
    assert set(result.metrics) >= {"time/rollout", "time/scoring", "time/update", "rollout_tokens_per_sec"}
    samples = read_jsonl(tmp_path / "rl" / "samples.jsonl")
    assert samples and {"step", "prompt", "completion", "reward"} <= set(samples[0])
    assert (tmp_path / "rl" / "checkpoints" / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize("options", [dict(algorithm="rloo"),
                                     dict(num_iterations=2, beta=0.05, loss_type="grpo", epsilon_high=0.28),
                                     dict(algorithm="reinforce", loss_type="dr_grpo", train=dict(grad_accum=2))],
                         ids=["rloo", "ppo-epochs-kl", "reinforce-accum"])
def test_resume_after_a_kill_continues_bit_exactly(base, task, tmp_path, options):
    train = dict(max_steps=20, **options.pop("train", {}))
    whole = rl(config_for(base, task, tmp_path / "whole", **options, train=train))
    rl(config_for(base, task, tmp_path / "parts", **options, train=train))
    shutil.rmtree(tmp_path / "parts" / "checkpoints" / "final")  # killed after saving step-10
    resumed = rl(config_for(base, task, tmp_path / "parts", resume=True, **options, train=train))
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "step-10"
    first, second = weights(whole.final_checkpoint), weights(resumed.final_checkpoint)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_the_kl_to_the_reference_is_measured_and_beta_holds_the_policy_near_it(base, task, tmp_path):
    free = rl(config_for(base, task, tmp_path / "free", beta=0.0, train=dict(max_steps=20, eval_interval=0)))
    held = rl(config_for(base, task, tmp_path / "held", beta=2.0, train=dict(max_steps=20, eval_interval=0)))
    kl = [line["kl"] for line in read_jsonl(tmp_path / "held" / "metrics.jsonl") if "kl" in line]
    assert kl[-1] > 0
    assert held.metrics["reward"] < free.metrics["reward"]


def test_with_lora_the_reference_is_the_base_with_adapters_off(base, task, tmp_path):
    config = config_for(base, task, tmp_path / "lora", beta=0.1, lora=LoraConfig(r=4, alpha=8))
    model, tokenizer, _ = load_model(base)
    reference, _, _ = load_model(base)
    apply_lora(model, config.lora)
    with torch.no_grad():  # adapters that change the policy
        for name, parameter in model.named_parameters():
            if "lora_b" in name.lower():
                parameter.normal_()
    rows = [json.loads(line) for line in task[0].read_text().splitlines()][:8]
    batches = RolloutBatches(model, tokenizer, rows, config, build_rewards(config), "prompt", RunningStats(),
                             reference=lambda: adapters_disabled(model))
    batch = batches.batch(0, 0)
    with torch.no_grad():
        expected = sequence_logprobs(reference(batch["input_ids"]), batch["input_ids"])
        policy = sequence_logprobs(model(batch["input_ids"]), batch["input_ids"])
    assert torch.allclose(batch["ref_logprobs"], expected, atol=1e-5)
    assert not torch.allclose(policy, expected, atol=1e-3)
    result = rl(config_for(base, task, tmp_path / "lora-run", beta=0.1, lora=LoraConfig(r=4, alpha=8),
                           train=dict(max_steps=10, eval_interval=0)))
    assert (result.final_checkpoint / "adapter.safetensors").is_file()


def test_padded_episodes_train_only_on_the_policys_tokens():
    episode = Episode({"prompt": "p"}, [Turn([1, 2], "ab", False), Turn([3, 4], "cd", True), Turn([5], "e", False),
                                        Turn([6], "f", True)])
    short = Episode({"prompt": "p"}, [Turn([1], "a", False), Turn([7], "g", True)])
    ids, mask = padded_episodes([episode, short], block_size=16, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6], [1, 7, 0, 0, 0, 0]]
    # mask[i, t]: token t + 1 is the policy's
    assert mask.tolist() == [[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]]


def test_bad_input_is_a_one_line_error(base, task, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        rl(config_for(base, task, tmp_path / "a", prompts=str(empty)))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(40)))
    with pytest.raises(DataError, match="no prompt column"):
        rl(config_for(base, task, tmp_path / "b", prompts=str(other)))
    holes = tmp_path / "holes.jsonl"
    holes.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"question": "b"}) + "\n")
    with pytest.raises(DataError, match="row 2 has no 'prompt' column"):
        rl(config_for(base, task, tmp_path / "c", prompts=str(holes)))
    with pytest.raises(ConfigError, match="num_generations must be at least 2"):
        rl(config_for(base, task, tmp_path / "d", num_generations=1))
    with pytest.raises(ConfigError, match="does not divide"):
        rl(config_for(base, task, tmp_path / "e", num_generations=3))
    with pytest.raises(ConfigError, match="nowhere_to_be_found"):
        rl(config_for(base, task, tmp_path / "f", reward=["nowhere_to_be_found.rewards:exact"]))
    with pytest.raises(DataError, match="only 20 prompts"):
        few = tmp_path / "few.jsonl"
        few.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(20)))
        rl(config_for(base, task, tmp_path / "g", prompts=str(few)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.mark.skipif(not GSM8K.is_file(), reason="needs ../shared/data/gsm8k")
def test_gsm8k_is_a_prompt_set_out_of_the_box():
    from lmforge.alignment.policy_optimization import read_prompts

    rows, column = read_prompts(str(GSM8K), "auto")
    assert column == "question" and len(rows) > 7000
    rewards = build_rewards(RLConfig(checkpoint="x", prompts=str(GSM8K)))  # the default: exact_answer
    final = [row["answer"].rsplit("####", 1)[1].strip() for row in rows[:4]]
    completions = [f"Step by step... so the answer is {n}." for n in final[:2]] + ["It is 3.", "#### -1"]
    scores = rewards([r["question"] for r in rows[:4]], completions, {"answer": [r["answer"] for r in rows[:4]]})
    assert scores.total[:2] == [1.0, 1.0] and scores.total[2:] == [float(final[2] == "3"), 0.0]


def test_the_command_line_runs_and_refuses_bad_input_with_exit_code_2(base, task, tmp_path, capsys):
    from lmforge.cli import main

    common = [str(base), "--prompts", str(task[0]), "--val_size", "16", "--num_generations", "4",
              "--max_new_tokens", "8", "--train.batch_size", "8", "--train.progress", "false"]
    assert main(["rl", *common, "--reward", f"{task[1]}:e_share", "--train.max_steps", "2",
                 "--out", str(tmp_path / "cli")]) == 0
    assert "held-out (greedy) reward" in capsys.readouterr().out
    assert (tmp_path / "cli" / "checkpoints" / "final").is_dir()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for argv, message in ((["rl", str(base), "--prompts", str(empty), "--out", str(tmp_path / "x")], "empty"),
                          ([*common[:-4], "--num_generations", "3"], "does not divide"),
                          (["rl", *common, "--reward", "no_such_package.rewards:f"], "does not import"),
                          (["rl", *common, "--algorithm", "ppo"], "algorithm")):
        if argv[0] != "rl":
            argv = ["rl", *argv]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and len(err.splitlines()) == 1, err
