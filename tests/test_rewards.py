"""Reward functions: answer extraction, the built-in rewards, reward specs and their one-line errors,
combining rewards with weights and None, the batch's error cases, and TRL's reward metrics."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lmforge.alignment import rewards
from lmforge.alignment.rewards import (
    CombinedReward,
    Reward,
    RewardScores,
    classifier_reward,
    exact_answer,
    exact_answer_on,
    extract_answer,
    format_reward,
    length_penalty,
    load_reward,
    normalize_number,
    numeric_answer,
    repetition_penalty,
    reward_metrics,
    reward_model_reward,
)
from lmforge.config import ModelConfig
from lmforge.errors import ConfigError, DataError
from lmforge.models import build_model
from lmforge.models.heads import SequenceClassifier
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import save_checkpoint

GSM8K = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


# ------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{42}.", "42"),
    (r"\boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\frac{1}{2}} is it", r"\frac{1}{2}"),
    (r"\boxed{ x^{2} + {y} }", "x^{2} + {y}"),
    (r"\boxed {7} and 9 later", "7"),
    (r"\boxed{1,234.50}", "1234.5"),
    (r"\boxed{-0}", "0"),
    (r"\boxed{3} then an unclosed \boxed{4", "3"),
    (r"empty \boxed{} but 5", "5"),
    (GSM8K, "72"),
    ("#### 1,000 and then 7", "1000"),
    ("3 #### -12", "-12"),
    ("1 #### nothing 2 #### 3 4", "3"),
    ("#### no number after it, but 9 before? no: 9", "9"),
    ("The total is 85.0 dollars", "85"),
    ("I think it is -17.", "-17"),
    ("\u22124 degrees", "-4"),
    ("values 1,234,567 and 3.50", "3.5"),
    ("ranges 3-5", "5"),
    ("from 007", "7"),
    ("1,2345", "2345"),
    ("no digits at all", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("1,234", "1234"), ("85.0", "85"), ("-0", "0"), ("-0.00", "0"), ("007", "7"), ("3.50", "3.5"),
    ("-12.340", "-12.34"), ("0.5", "0.5"), (" 10 ", "10"), ("100", "100"), ("\u22122", "-2"),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize("text", ["abc", "1.2.3", "", "-", "1e5"])
def test_normalize_number_refuses_non_numbers(text):
    with pytest.raises(ValueError):
        normalize_number(text)


# ------------------------------------------------------------------------------------------
# Built-in rewards
# ------------------------------------------------------------------------------------------
def test_exact_answer_against_gsm8k_and_plain_references():
    completions = ["24 then 72", r"\boxed{72}", "It is 71.", "no idea", "Paris, \\boxed{Paris}", "72"]
    answers = [GSM8K, "72", "72", "72", "Paris", None]
    assert exact_answer([""] * 6, completions, answers, unused=[0] * 6) == [1.0, 1.0, 0.0, 0.0, 1.0, None]
    assert exact_answer(["p"], ["72.00"], [72]) == [1.0]
    assert exact_answer(["p"], ["1,234"], ["#### 1234"]) == [1.0]
    assert exact_answer(["p"], ["9"], ["   "]) == [None]


def test_exact_answer_on_another_column():
    reward = exact_answer_on("final")
    assert reward.name == "exact_answer_final" and exact_answer_on("answer").name == "exact_answer"
    assert reward(["p", "q"], ["5", "6"], final=["5", "5"], answer=["6", "6"]) == [1.0, 0.0]
    with pytest.raises(DataError, match="no 'final' column in the prompt data \\(it has answer\\)"):
        reward(["p"], ["5"], answer=["5"])


def test_numeric_answer_compares_numbers_with_a_tolerance():
    completions = ["72.0000001", "72.1", r"\boxed{x}", "5", "1e"]
    answers = ["72", "72", "72", "five", None]
    assert numeric_answer([""] * 5, completions, answers) == [1.0, 0.0, 0.0, 0.0, None]
    assert numeric_answer(["p"], ["-1,000"], ["#### -1000.0"]) == [1.0]
    assert numeric_answer(["p"], ["0"], ["-0"]) == [1.0]


def test_format_reward():
    reward = format_reward(r"<think>.*</think>\s*<answer>.*</answer>")
    assert reward.name == "format"
    texts = ["<think>a\nb</think>\n<answer>3</answer>", "<answer>3</answer>", "x <think></think><answer></answer>"]
    assert reward(["p"] * 3, texts) == [1.0, 0.0, 1.0]
    with pytest.raises(ConfigError, match=r"bad regular expression '\(' for the format reward") as caught:
        format_reward("(")
    assert "\n" not in str(caught.value)


def test_length_penalty():
    reward = length_penalty(10)
    assert reward(["p"] * 4, ["", "x" * 10, "x" * 15, "x" * 100]) == [0.0, 0.0, -0.5, -1.0]
    with pytest.raises(ConfigError, match="positive"):
        length_penalty(0)


def test_repetition_penalty():
    reward = repetition_penalty(2)
    # "a b a b a b": bigrams ab ba ab ba ab, 2 distinct of 5 -> -(1 - 2/5)
    values = reward(["p"] * 4, ["a b a b a b", "one two three", "single", "The the THE the"])
    assert values == pytest.approx([-0.6, 0.0, 0.0, -2 / 3])
    assert repetition_penalty()(["p"], ["a b"]) == [0.0]  # fewer than 3 words
    assert repetition_penalty(1)(["p"], ["x x x x"]) == [-0.75]
    assert all(-1.0 <= v <= 0.0 for v in reward(["p"], ["w " * 50]))


# ------------------------------------------------------------------------------------------
# Checkpoint rewards
# ------------------------------------------------------------------------------------------
LABELLED = "the quick brown fox jumps over the lazy dog. Sphinx of black quartz, judge my vow!"


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory):
    tokenizer = Tokenizer.train([LABELLED + " 0123456789?"], "char")
    torch.manual_seed(0)
    model = SequenceClassifier(build_model(ModelConfig(family="encoder", n_layer=2, n_head=2, n_embd=32,
                                                       block_size=128, vocab_size=tokenizer.vocab_size)), 3)
    path = tmp_path_factory.mktemp("classifier")
    task = {"kind": "classification", "labels": ["ham", "eggs", "spam"], "multi_label": False, "pooling": "first"}
    save_checkpoint(path, model, tokenizer, info={"task": task})
    return path


def test_classifier_reward_gives_the_label_probability(classifier_checkpoint):
    from lmforge.api import LanguageModel

    lm = LanguageModel.load(classifier_checkpoint, device="cpu")
    prompts, completions = ["the fox ", "a dog "], ["jumps over", "judge my vow!"]
    spam = classifier_reward(str(classifier_checkpoint), "spam")
    assert spam.name == "classifier_spam"
    expected = [c.scores["spam"] for c in lm.classify(completions)]
    assert spam(prompts, completions, answer=["x", "y"]) == pytest.approx(expected, abs=1e-5)
    on_text = classifier_reward(str(classifier_checkpoint), "ham", on="text")
    expected = [c.scores["ham"] for c in lm.classify([p + c for p, c in zip(prompts, completions)])]
    assert on_text(prompts, completions) == pytest.approx(expected, abs=1e-5)
    assert all(0.0 < v < 1.0 for v in expected)


def test_classifier_reward_errors(classifier_checkpoint):
    unknown = classifier_reward(str(classifier_checkpoint), "toast")
    with pytest.raises(ConfigError, match="has no label 'toast'; its labels: ham, eggs, spam"):
        unknown(["p"], ["c"])
    with pytest.raises(ConfigError, match="scores the completion or the text"):
        classifier_reward(str(classifier_checkpoint), "ham", on="prompt")


def test_classifier_reward_loads_lazily_and_once(monkeypatch):
    loads = []

    class FakeClassifier:  # a kind adapter's interface
        capabilities = ("classify",)

        def label_policy(self):
            return ["neg", "pos"], False, {}

        def classify(self, texts, labels, template):
            pos = torch.tensor([len(t) / 10 for t in texts])
            return ["neg", "pos"], torch.stack([1 - pos, pos], dim=1), None

    monkeypatch.setattr(rewards, "_load_model", lambda path: loads.append(path) or FakeClassifier())
    reward = classifier_reward("runs/sst2", "pos")
    assert loads == []
    assert reward(["p"], ["abc"]) == pytest.approx([0.3])
    assert reward(["p", "q"], ["a", "abcde"]) == pytest.approx([0.1, 0.5])
    assert loads == ["runs/sst2"]
    assert reward([], []) == []


def test_reward_model_reward(monkeypatch):
    class RewardModel:
        capabilities = ("reward",)

        def reward(self, prompts, completions):
            return [float(len(p + c)) for p, c in zip(prompts, completions)]

    class LanguageModelWithoutReward:
        capabilities = ("generate", "classify")

    models = {"rm": RewardModel(), "lm": LanguageModelWithoutReward()}
    monkeypatch.setattr(rewards, "_load_model", lambda path: models[path])
    reward = reward_model_reward("rm")
    assert reward.name == "reward_model"
    assert reward(["ab", "c"], ["d", ""], answer=[1, 2]) == [3.0, 1.0]
    for path in ("lm",):
        with pytest.raises(ConfigError, match=f"^{path} is not a reward model \\(train one with 'lmforge "
                                              "train-reward'\\)$"):
            reward_model_reward(path)(["p"], ["c"])


def test_importing_the_rewards_loads_no_models():
    import subprocess
    import sys

    code = "import sys, lmforge.alignment.rewards; print('lmforge.models' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------------------------------
# Specs
# ------------------------------------------------------------------------------------------
def test_load_reward_builtins():
    exact = load_reward("exact_answer")
    assert isinstance(exact, Reward) and exact.name == "exact_answer"
    assert exact(["p"], ["72"], answer=[GSM8K]) == [1.0]
    final = load_reward("exact_answer:final")
    assert final.name == "exact_answer_final" and final(["p"], ["3"], final=["3"]) == [1.0]
    numeric = load_reward("numeric_answer:gold")
    assert numeric.name == "numeric_answer_gold" and numeric(["p"], ["3.0000000001"], gold=["3"]) == [1.0]
    assert load_reward("numeric_answer")(["p"], ["2"], answer=["2.0"]) == [1.0]
    regex = load_reward("format:^a:b$")  # everything after the first colon
    assert regex.name == "format" and regex(["p", "p"], ["a:b", "ab"]) == [1.0, 0.0]
    length = load_reward("length:4")
    assert length.name == "length" and length(["p"], ["abcdef"]) == [-0.5]
    assert load_reward("repetition")(["p"], ["a b c a b c"]) == pytest.approx([-0.25])
    assert load_reward("repetition:1")(["p"], ["a a"]) == [-0.5]
    assert load_reward("format:a ")(["p", "p"], ["a b", "ab"]) == [1.0, 0.0]  # the regex as written


def test_load_reward_checkpoint_specs(monkeypatch):
    class FakeModel:  # a kind adapter's interface
        capabilities = ("reward", "classify")

        def label_policy(self):
            return ["negative", "positive"], False, {}

        def classify(self, texts, labels, template):
            return ["negative", "positive"], torch.tensor([[0.75, 0.25]] * len(texts)), None

        def reward(self, prompts, completions):
            return [2.0] * len(completions)

    seen = []
    monkeypatch.setattr(rewards, "_load_model", lambda path: seen.append(path) or FakeModel())
    positive = load_reward("classifier:positive@runs/sst2/checkpoints/best")
    assert positive.name == "classifier_positive" and positive(["p"], ["c"]) == [0.25]
    model = load_reward("reward_model:runs/rm@v2")
    assert model.name == "reward_model" and model(["p", "q"], ["c", "d"]) == [2.0, 2.0]
    assert seen == ["runs/sst2/checkpoints/best", "runs/rm@v2"]


def test_load_reward_import_paths(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shouting(prompts, completions, **kwargs):\n"
        "    return [float(c.isupper()) for c in completions]\n"
        "class Holder:\n"
        "    @staticmethod\n"
        "    def short(prompts, completions, **kwargs):\n"
        "        return [float(len(c) < 3) for c in completions]\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    shouting = load_reward("my_rewards:shouting")
    assert shouting.name == "shouting" and shouting(["p", "p"], ["HEY", "hey"], answer=[1, 2]) == [1.0, 0.0]
    assert load_reward("my_rewards:Holder.short")(["p"], ["ab"]) == [1.0]

    script = tmp_path / "sub" / "scoring.py"
    script.parent.mkdir()
    script.write_text("from dataclasses import dataclass\n"
                      "@dataclass\n"
                      "class Counter:\n"
                      "    name: str = 'counts_a'\n"
                      "    def __call__(self, prompts, completions, **kwargs):\n"
                      "        return [c.count('a') for c in completions]\n"
                      "counter = Counter()\n"
                      "def exclaims(prompts, completions, **kwargs):\n"
                      "    return [1.0 if c.endswith('!') else None for c in completions]\n")
    exclaims = load_reward(f"{script}:exclaims")
    assert exclaims.name == "exclaims" and exclaims(["p", "p"], ["yes!", "no"]) == [1.0, None]
    monkeypatch.chdir(tmp_path)
    counter = load_reward("sub/scoring.py:counter")
    assert counter.name == "counts_a" and counter(["p"], ["banana"]) == [3]


def test_load_reward_passes_callables_through():
    def my_reward(prompts, completions, **_):
        return [1.0] * len(completions)

    named = load_reward(my_reward)
    assert named.name == "my_reward" and named(["p"], ["c"]) == [1.0]
    assert load_reward(named) is named
    assert load_reward(lambda p, c, **_: [0.0] * len(c)).name == "<lambda>"


@pytest.fixture
def broken_modules(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("import no_such_module_xyz\n")
    (tmp_path / "syntax_rewards.py").write_text("def f(:\n")
    (tmp_path / "ok_rewards.py").write_text("VALUE = 3\ndef f(prompts, completions, **kw):\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("spec, message", [
    ("exactish", "unknown reward 'exactish': use exact_answer[:COLUMN], numeric_answer[:COLUMN], format:REGEX"),
    ("nonsense:", "unknown reward 'nonsense:'"),
    ("format", "reward 'format' needs an argument: format:REGEX"),
    ("format:", "reward 'format:' needs an argument"),
    ("format:(", "reward 'format:(': bad regular expression '('"),
    ("length", "reward 'length' needs an argument: length:LIMIT"),
    ("length:ten", "reward 'length:ten': 'ten' is not an integer"),
    ("length:0", "reward 'length:0': the length penalty's limit must be a positive"),
    ("repetition:2.5", "reward 'repetition:2.5': '2.5' is not an integer"),
    ("repetition:0", "reward 'repetition:0': the repetition penalty's n-gram size must be positive"),
    ("exact_answer:", "reward 'exact_answer:' needs an argument: exact_answer:COLUMN"),
    ("classifier:positive", "reward 'classifier:positive': write classifier:LABEL@CHECKPOINT"),
    ("classifier:@runs/x", "reward 'classifier:@runs/x': write classifier:LABEL@CHECKPOINT"),
    ("reward_model", "reward 'reward_model' needs an argument: reward_model:CHECKPOINT"),
    ("no_such_module_abc:f", "reward 'no_such_module_abc:f': module no_such_module_abc does not import "
                             "(ModuleNotFoundError: No module named 'no_such_module_abc')"),
    ("broken_rewards:f", "reward 'broken_rewards:f': module broken_rewards does not import (ModuleNotFoundError: "
                         "No module named 'no_such_module_xyz')"),
    ("syntax_rewards:f", "reward 'syntax_rewards:f': module syntax_rewards does not import (SyntaxError: "),
    ("ok_rewards:g", "reward 'ok_rewards:g': ok_rewards has no attribute 'g'"),
    ("ok_rewards:VALUE", "reward 'ok_rewards:VALUE': VALUE is not callable (a int)"),
    ("repetition:", "reward 'repetition:' needs an argument: repetition:N"),
    (" length:10", "reward ' length:10': module  length does not import"),
    ("missing/file.py:f", "reward 'missing/file.py:f': no file missing/file.py"),
    ("format:a\nb(", "reward 'format:a\\nb(': bad regular expression"),
])
def test_load_reward_errors_are_one_line_and_name_the_spec(broken_modules, spec, message):
    with pytest.raises(ConfigError) as caught:
        load_reward(spec)
    text = str(caught.value)
    assert "\n" not in text and repr(spec) in text
    assert message in text


def test_a_broken_file_names_the_spec(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("raise RuntimeError('no\\nsecond line')\n")
    with pytest.raises(ConfigError) as caught:
        load_reward(f"{path}:f")
    assert str(caught.value) == f"reward '{path}:f': {path} does not import (RuntimeError: no)"
    with pytest.raises(ConfigError, match="spec string or a callable"):
        load_reward(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="spec string or a callable"):
        load_reward("  ")


# ------------------------------------------------------------------------------------------
# Combining
# ------------------------------------------------------------------------------------------
def constant(value, name="constant"):
    return Reward(lambda prompts, completions, **_: [value] * len(completions), name)


def test_combined_reward_weights_and_none():
    def half_applicable(prompts, completions, answer, **_):
        return [None if a is None else 0.5 for a in answer]

    combined = CombinedReward([load_reward("exact_answer"), half_applicable, load_reward("length:2")],
                              weights=[2.0, 1.0, 0.5])
    scores = combined(["p", "q", "r"], ["4", "5", "4444"], {"answer": ["4", "4", None], "prompt": ["p", "q", "r"]})
    assert scores.per_reward == {"exact_answer": [1.0, 0.0, None], "half_applicable": [0.5, 0.5, None],
                                 "length": [0.0, 0.0, -1.0]}
    assert scores.total == [2.5, 0.5, -0.5]
    every_none = CombinedReward([constant(None), constant(None)])(["p"], ["c"], {})
    assert every_none.total == [0.0] and every_none.per_reward == {"constant": [None], "constant_2": [None]}
    assert CombinedReward([constant(1)])(["p", "q"], ["a", "b"]).total == [1.0, 1.0]


def test_combined_reward_names_are_unique_and_values_are_floats():
    combined = CombinedReward([format_reward("a"), format_reward("b"), constant(True, "format_2"), format_reward("c")])
    assert combined.names == ["format", "format_2", "format_2_2", "format_3"]
    scores = combined(["p"], ["ab"], {})
    assert scores.per_reward == {"format": [1.0], "format_2": [1.0], "format_2_2": [1.0], "format_3": [0.0]}
    assert all(type(v) is float for values in scores.per_reward.values() for v in values)
    tensor = CombinedReward([Reward(lambda p, c, **_: torch.tensor([0.5, 1.5]), "tensor")])(["p", "q"], ["a", "b"])
    assert tensor.total == [0.5, 1.5]
    empty = CombinedReward([constant(1.0)])([], [], {"answer": []})
    assert empty.total == [] and empty.per_reward == {"constant": []}


def test_combined_reward_configuration_errors():
    with pytest.raises(ConfigError, match="^1 reward weights for 2 rewards$"):
        CombinedReward([constant(1.0), constant(2.0)], weights=[1.0])
    with pytest.raises(ConfigError, match="no reward functions"):
        CombinedReward([])
    with pytest.raises(DataError, match="^2 prompts for 1 completions$"):
        CombinedReward([constant(1.0)])(["p", "q"], ["c"])
    with pytest.raises(DataError, match="^column 'answer' has 1 values for 2 completions$"):
        CombinedReward([constant(1.0)])(["p", "q"], ["c", "d"], {"answer": ["x"]})


LONG_PROMPT = "Question: " + "x" * 80 + "\nAnswer:"


def one_line_data_error(reward, prompts=(LONG_PROMPT, "second"), columns=None) -> str:
    with pytest.raises(DataError) as caught:
        CombinedReward([reward])(list(prompts), ["c"] * len(prompts), columns or {})
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_failing_reward_is_a_data_error_naming_it_and_the_prompt():
    def crashes(prompts, completions, **_):
        raise ZeroDivisionError("division by zero\nmore detail")

    excerpt = "Question: " + "x" * 50 + "…"
    assert one_line_data_error(crashes) == f"reward 'crashes' failed on prompt '{excerpt}': ZeroDivisionError: " \
                                           "division by zero"
    assert one_line_data_error(load_reward("exact_answer"), ["a\nb"]) == \
        "reward 'exact_answer' failed on prompt 'a\\nb': DataError: no 'answer' column in the prompt data (it has none)"
    message = one_line_data_error(exact_answer, ["p"])
    assert message.startswith("reward 'exact_answer' failed on prompt 'p': TypeError: ") and "answer" in message


def test_a_configuration_error_inside_a_reward_passes_through(classifier_checkpoint):
    with pytest.raises(ConfigError, match="has no label 'toast'"):
        CombinedReward([classifier_reward(str(classifier_checkpoint), "toast")])(["p"], ["c"])


def test_wrong_return_shapes_are_data_errors():
    short = Reward(lambda prompts, completions, **_: [1.0], "short")
    assert one_line_data_error(short, ["p", "q", "r"]) == \
        "reward 'short' returned 1 values for 3 completions (prompt 'p')"
    scalar = Reward(lambda prompts, completions, **_: 1.0, "scalar")
    assert one_line_data_error(scalar, ["p"]) == "reward 'scalar' returned a float, not a list of 1 values (prompt 'p')"
    text = Reward(lambda prompts, completions, **_: "1", "text")
    assert "returned a str" in one_line_data_error(text, ["p"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.5", [1.0], complex(1, 1), object()])
def test_values_that_are_not_finite_numbers_are_data_errors(bad):
    reward = Reward(lambda prompts, completions, **_: [1.0, bad], "odd")
    message = one_line_data_error(reward, ["first", "second\nprompt"])
    assert message.startswith("reward 'odd' gave ") and "for prompt 'second\\nprompt'" in message
    assert message.endswith("a reward is a finite number or None")
    assert repr(bad)[:20] in message


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------
def test_reward_metrics_against_a_hand_computation():
    scores = RewardScores(total=[1.0, 0.0, 2.0, 2.0, 0.5, 1.5],
                          per_reward={"exact": [1.0, 0.0, 1.0, 1.0, None, None], "never": [None] * 6,
                                      "fmt": [0.0, 0.0, 1.0, 1.0, 0.5, 1.5]})
    metrics = reward_metrics(scores, group_size=2)
    group_stds = [math.sqrt(0.5), 0.0, math.sqrt(0.5)]  # sample std of two values a, b is |a - b| / sqrt(2)
    assert metrics["reward"] == pytest.approx(7.0 / 6)
    assert metrics["reward_std"] == pytest.approx(sum(group_stds) / 3)
    assert metrics["rewards/exact/mean"] == pytest.approx(0.75)
    assert metrics["rewards/exact/std"] == pytest.approx(statistics.stdev([1.0, 0.0, 1.0, 1.0]))  # 0.5
    assert metrics["rewards/exact/std"] == pytest.approx(0.5)
    assert metrics["rewards/fmt/mean"] == pytest.approx(4.0 / 6)
    assert "rewards/never/mean" not in metrics and "rewards/never/std" not in metrics
    assert metrics["frac_reward_zero_std"] == pytest.approx(1 / 3)
    assert set(metrics) == {"reward", "reward_std", "rewards/exact/mean", "rewards/exact/std", "rewards/fmt/mean",
                            "rewards/fmt/std", "frac_reward_zero_std"}


def test_reward_metrics_edge_cases():
    single = reward_metrics(RewardScores([1.0, 3.0], {"r": [1.0, None]}), group_size=1)
    assert single["reward_std"] == 0.0 and single["frac_reward_zero_std"] == 1.0
    assert single["rewards/r/std"] == 0.0 and single["rewards/r/mean"] == 1.0
    whole = reward_metrics(RewardScores([0.1 + 0.2, 0.3, 1.0, 2.0, 3.0, 4.0], {}), group_size=3)
    assert whole["frac_reward_zero_std"] == 0.0
    assert whole["reward_std"] == pytest.approx((statistics.stdev([0.3, 0.3, 1.0]) + 1.0) / 2)
    nearly = reward_metrics(RewardScores([0.1 + 0.2, 0.3], {}), group_size=2)
    assert nearly["frac_reward_zero_std"] == 1.0  # a rounding difference is no spread
    assert reward_metrics(RewardScores([], {}), group_size=4) == {}
    with pytest.raises(ConfigError, match="does not divide 3 rewards"):
        reward_metrics(RewardScores([1.0, 2.0, 3.0], {}), group_size=2)
    with pytest.raises(ConfigError):
        reward_metrics(RewardScores([1.0], {}), group_size=0)
