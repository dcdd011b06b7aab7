"""Text environments: the calculator's arithmetic, episodes turn by turn with the environment's turns
masked, the turn and context limits, and a real model playing through the one generation loop."""

from __future__ import annotations

import pytest

from lmforge.alignment.environments import (
    Calculator,
    Episode,
    SingleTurn,
    calculate,
    format_number,
    policy_generate,
    run_episodes,
)
from lmforge.config import SamplingConfig
from lmforge.errors import ConfigError, DataError
from lmforge.inference.completion import Completion
from lmforge.inference.prompts import encode_prompt
from lmforge.tokenizer import Tokenizer
from serving_helpers import LINES, make_lm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("expression, value", [
    ("37*48", 1776), ("37 * 48", 1776), ("(2+3)*4", 20), ("-7+2", -5), ("10/4", 2.5), ("10//4", 2), ("10%4", 2),
    ("2**10", 1024), ("1.5*2", 3.0), ("37×48", 1776), ("9÷3", 3.0), ("--3", 3), ("+4", 4),
])
def test_the_calculator_computes_arithmetic(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression", [
    "__import__('os')", "open('x')", "a+1", "1 if 1 else 2", "[1]", "2**1000", "9**9**9", "1/0", "1e308*10",
    "True+1", "'a'*3", "", "1+", "x" * 201, "(-8)**0.5",
])
def test_the_calculator_refuses_anything_else(expression):
    with pytest.raises(ValueError):
        calculate(expression)


def test_numbers_are_written_plainly():
    assert [format_number(v) for v in (1776, 3.0, -5, 2.5, 10 / 3)] == ["1776", "3", "-5", "2.5", "3.333333"]


def test_the_calculator_environment_answers_calls_and_ends_on_an_answer():
    env = Calculator(instructions=" Use <calc></calc>.")
    assert env.reset({"prompt": "What is 37 * 48?"}) == "What is 37 * 48? Use <calc></calc>."
    assert env.step("Let me compute <calc>37*48</calc>") == ("<result>1776</result>", None, False)
    assert env.step("<calc>1/0</calc>") == ("<result>error</result>", None, False)
    assert env.step(" The answer is 1776.") == (None, None, True)
    with pytest.raises(DataError, match="'prompt' column"):
        env.reset({"question": "?"})


def byte_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer: every script below round-trips (make_lm's characters lack * and /)."""
    return Tokenizer.train(LINES + ["<calc>12*3</calc><result>36</result> What is 2+2?"], kind="bpe", vocab_size=300)


class Scripted:
    """A stand-in policy: each call answers every prompt with the next scripted turn of its episode (keyed by
    the prompt's first token ids), as the generation loop would (ids generated, text decoded)."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]]):
        self.tokenizer, self.calls = tokenizer, []
        self.scripts = {tuple(encode_prompt(tokenizer, prompt)): list(turns) for prompt, turns in scripts.items()}

    def __call__(self, prompts):
        self.calls.append([list(p.ids) for p in prompts])
        out = []
        for prompt in prompts:
            key = next(k for k in self.scripts if tuple(prompt.ids[:len(k)]) == k)
            ids = self.tokenizer.encode(self.scripts[key].pop(0))
            out.append(Completion(self.tokenizer.decode(ids), ids, "stop", len(prompt.ids)))
        return out


def test_episodes_mask_the_environments_turns_and_keep_the_generated_ids():
    tok = byte_tokenizer()
    rows = [{"prompt": "What is 12*3?", "answer": "36"}, {"prompt": "What is 2+2?", "answer": "4"}]
    policy = Scripted(tok, {"What is 12*3?": ["<calc>12*3</calc>", " so 36"], "What is 2+2?": [" 4"]})
    episodes = run_episodes([Calculator(), Calculator()], rows, tok, 160, policy, max_turns=3)
    first, second = episodes
    assert [t.text for t in first.turns] == ["What is 12*3?", "<calc>12*3</calc>", "<result>36</result>", " so 36"]
    assert [t.trained for t in first.turns] == [False, True, False, True]
    assert first.ids == [i for t in first.turns for i in t.ids]
    assert first.trained_mask == [t.trained for t in first.turns for _ in t.ids]
    assert first.completion == " so 36" and first.finish == "done" and first.reward is None
    assert first.transcript == "<calc>12*3</calc><result>36</result> so 36"
    assert [t.text for t in second.turns] == ["What is 2+2?", " 4"] and second.finish == "done"
    # turn 1 generates for both episodes in one batch, turn 2 only for the one still playing
    assert [len(batch) for batch in policy.calls] == [2, 1]
    assert policy.calls[1][0] == first.ids[:-len(first.turns[-1].ids)]


def test_the_turn_limit_and_the_context_end_episodes():
    tok = byte_tokenizer()
    looping = Scripted(tok, {"loop": ["<calc>1+1</calc>"] * 5})
    [episode] = run_episodes([Calculator()], [{"prompt": "loop"}], tok, 160, looping, max_turns=2)
    assert episode.finish == "turns" and sum(t.trained for t in episode.turns) == 2
    long = Scripted(tok, {"long": ["<calc>1+1</calc>" * 4] * 5})
    [episode] = run_episodes([Calculator()], [{"prompt": "long"}], tok, 60, long, max_turns=5)
    assert episode.finish == "context" and len(episode.ids) >= 60  # no room left for a new token
    assert all(len(ids) <= 59 for batch in long.calls for ids in batch) and len(long.calls) < 5


def test_bad_arguments_are_config_errors():
    lm = make_lm()
    with pytest.raises(ConfigError, match="2 environments for 1 rows"):
        run_episodes([SingleTurn(), SingleTurn()], [{"prompt": "a"}], lm.tokenizer, 160, lambda p: [])
    with pytest.raises(ConfigError, match="max_turns"):
        run_episodes([SingleTurn()], [{"prompt": "a"}], lm.tokenizer, 160, lambda p: [], max_turns=0)


def test_a_model_plays_through_the_generation_loop():
    lm = make_lm()
    envs = [Calculator(), SingleTurn()]
    rows = [{"prompt": "The quick brown fox"}, {"prompt": "Pack my box"}]
    sampling = SamplingConfig(max_new_tokens=6, temperature=0, stop=["\n"])
    generate = policy_generate(lm.model, lm.tokenizer, sampling, envs)
    episodes = run_episodes(envs, rows, lm.tokenizer, lm.context_length, generate, max_turns=2)
    single = episodes[1]
    expected = lm.complete("Pack my box", max_new_tokens=6, temperature=0, stop=["\n", "</calc>"])[0]
    assert isinstance(single, Episode) and single.finish == "done"
    assert single.turns[1].ids == expected.token_ids  # the generated ids themselves
    assert episodes[0].turns[1].trained and episodes[0].finish in ("done", "turns")
