"""The LSTM family: state-carrying forward, pretraining, exact resume, checkpoints, generation through the API."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import read_jsonl, tiny_pretrain_config
from lmforge.config import LoraConfig, ModelConfig, SamplingConfig
from lmforge.errors import ConfigError
from lmforge.inference.generate import TokenGenerator
from lmforge.models import build_model
from lmforge.models.lora import apply_lora
from lmforge.models.lstm import LSTMLM
from lmforge.recipes.pretrain import pretrain
from lmforge.training.checkpoint import load_model, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides: object) -> ModelConfig:
    return ModelConfig.from_dict({"preset": "lstm-tiny", "vocab_size": 61, **overrides})


def tiny_model(seed: int = 0, **overrides: object) -> LSTMLM:
    torch.manual_seed(seed)
    return build_model(tiny_config(**overrides)).eval()


def lstm_pretrain_config(char_data, out, **train: object):
    config = tiny_pretrain_config(char_data, out, **train)
    config.model = ModelConfig.from_dict("lstm-tiny")
    return config


# ------------------------------------------------------------------ the model
@torch.no_grad()
def test_state_carrying_steps_equal_the_full_forward():
    model = tiny_model()
    idx = torch.randint(61, (3, 40))
    full = model(idx)  # (B, T, V)
    assert full.shape == (3, 40, 61)
    state, steps = None, []
    for t in range(idx.shape[1]):  # one token at a time
        logits, state = model(idx[:, t:t + 1], state=state, return_state=True)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    head, state = model(idx[:, :17], return_state=True)  # two chunks, the second continuing the first
    tail = model(idx[:, 17:], state=state, last_only=True)
    assert state[0].shape == state[1].shape == (2, 3, 32) and tail.shape == (3, 1, 61)
    torch.testing.assert_close(tail, full[:, -1:])
    torch.testing.assert_close(head, full[:, :17])


@torch.no_grad()
def test_hidden_states_are_unaffected_by_right_padding():
    model = tiny_model()
    ids = torch.randint(1, 61, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], dim=1).bool()
    alone = model.hidden_states(ids)
    assert alone.shape == (1, 9, 32)
    torch.testing.assert_close(model.hidden_states(padded, attention_mask=mask)[:, :9], alone)
    torch.testing.assert_close(model.lm_head(alone), model(ids))


def test_dropout_only_in_training_and_the_init():
    model = tiny_model(dropout=0.3)
    idx = torch.randint(61, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(idx), model(idx))  # eval: no dropout
        model.train()
        assert not torch.equal(model(idx), model(idx))
    C = model.config.n_embd
    assert torch.equal(model.lstm.bias_ih_l0[C:2 * C], torch.ones(C))  # forget gate starts at 1
    assert torch.equal(model.lstm.bias_hh_l1, torch.zeros(4 * C))
    assert model.tok_emb.weight.abs().max() <= 1.0


def test_parameter_counts_flops_and_lora_on_the_head():
    V, C, L = 61, 32, 2
    lstm = L * (8 * C * C + 8 * C)  # per layer: weight_ih, weight_hh (4C x C each), two biases (4C)
    tied = tiny_model()
    assert tied.lm_head.weight is tied.tok_emb.weight and tied.recurrent
    assert tied.num_parameters() == V * C + lstm and tied.num_parameters(non_embedding=True) == lstm
    untied = tiny_model(tie_embeddings=False)
    assert untied.num_parameters() == 2 * V * C + lstm and untied.num_parameters(non_embedding=True) == lstm
    assert tied.flops_per_token(training=False) == 2 * (L * 8 * C * C + V * C)
    assert tied.flops_per_token() == 3 * tied.flops_per_token(training=False)
    assert tied.linear_targets() == {"head": [("lm_head", None)]}
    idx = torch.randint(61, (2, 10))
    with torch.no_grad():
        before = tied(idx)
    apply_lora(tied, LoraConfig(r=4, targets=["all"]))
    assert [n for n, p in tied.named_parameters() if p.requires_grad] == ["lm_head.lora_A.head", "lm_head.lora_B.head"]
    with torch.no_grad():
        torch.testing.assert_close(tied(idx), before)  # B starts at zero
    with pytest.raises(ConfigError, match="no q layer"):
        apply_lora(tiny_model(), LoraConfig(r=4, targets=["q"]))


def test_presets_load_and_build():
    tiny = ModelConfig.from_dict("lstm-tiny")
    assert tiny.family == "lstm" and (tiny.n_layer, tiny.n_embd) == (2, 32)
    tiny.vocab_size = 61
    assert isinstance(build_model(tiny), LSTMLM)
    ten = ModelConfig.from_dict({"preset": "lstm-10m", "vocab_size": 8192})
    assert ten.family == "lstm"
    assert 9e6 < build_model(ten).num_parameters() < 11e6


# ------------------------------------------------------------------ training and checkpoints
@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("lstm-run")
    pretrain(lstm_pretrain_config(char_data, out, max_steps=200, lr=2e-2, save_interval=0, eval_interval=100))
    return out


@pytest.fixture(scope="module")
def lstm_lm(lstm_run):
    from lmforge.api import LanguageModel

    return LanguageModel.load(lstm_run, device="cpu")


def test_pretraining_makes_the_loss_fall(lstm_run):
    records = read_jsonl(lstm_run / "metrics.jsonl")
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert train_losses[0] > 3.5  # about log(vocabulary) at the start
    assert train_losses[-1] < train_losses[0] - 1.0
    assert [r["val_loss"] for r in records if "val_loss" in r][-1] < 3.0


def test_checkpoint_round_trip(lstm_run, tmp_path):
    model, tokenizer, info = load_model(lstm_run)
    assert isinstance(model, LSTMLM) and info["family"] == "lstm" and not model.training
    assert model.lm_head.weight is model.tok_emb.weight  # the tie survives: the head is stored once
    stored = load_file(str(lstm_run / "checkpoints" / "best" / "model.safetensors"))
    assert "lm_head.weight" not in stored and "lstm.weight_hh_l1" in stored
    save_checkpoint(tmp_path / "copy", model, tokenizer)
    again, _, _ = load_model(tmp_path / "copy")
    idx = torch.randint(tokenizer.vocab_size, (2, 30))
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))


def test_exact_resume_is_bit_identical(char_data, tmp_path):
    """Resuming from a mid-run checkpoint (as after a kill) ends where the uninterrupted run ends."""
    options = dict(max_steps=16, save_interval=8, eval_interval=0, final_eval_windows=4, keep_checkpoints=2)
    reference = lstm_pretrain_config(char_data, tmp_path / "reference", **options)
    reference.model.dropout = 0.1  # so that the dropout RNG state must be restored too
    pretrain(reference)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "reference" / "checkpoints" / "step-8", resumed_dir / "checkpoints" / "step-8")
    config = lstm_pretrain_config(char_data, resumed_dir, **options)
    config.model.dropout = 0.1
    config.resume = True
    result = pretrain(config)
    assert result.resumed_from == resumed_dir / "checkpoints" / "step-8" and result.step == 16
    a = load_file(str(tmp_path / "reference" / "checkpoints" / "final" / "model.safetensors"))
    b = load_file(str(resumed_dir / "checkpoints" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


# ------------------------------------------------------------------ generation and scoring through the API
def test_greedy_is_the_same_alone_and_in_a_batch(lstm_lm):
    prompts = ["The ", "A statement such as while x", "if", "Note that the expression list is evaluated once"]
    alone = [lstm_lm.generate(p, max_new_tokens=20, temperature=0) for p in prompts]
    assert len(set(alone)) > 1
    assert lstm_lm.generate(prompts, max_new_tokens=20, temperature=0) == alone
    assert lstm_lm.generate(list(reversed(prompts)), max_new_tokens=20, temperature=0) == list(reversed(alone))


def test_greedy_generation_matches_argmax_of_full_forward(lstm_lm):
    ids = lstm_lm.tokenizer.encode("The value of")
    completion = lstm_lm.complete("The value of", max_new_tokens=10, temperature=0)[0]
    tokens = list(ids)
    with torch.no_grad():
        for expected in completion.token_ids:
            assert int(lstm_lm.model(torch.tensor([tokens]))[0, -1].argmax()) == expected
            tokens.append(expected)


def test_stream_joins_to_generate_and_sampling_is_seeded(lstm_lm):
    options = dict(max_new_tokens=30, temperature=0)
    assert "".join(lstm_lm.stream("The ", **options)) == lstm_lm.generate("The ", **options)
    sampled = dict(max_new_tokens=25, temperature=1.0, top_k=20, seed=7, repetition_penalty=1.2,
                   presence_penalty=0.5, frequency_penalty=0.3)
    assert lstm_lm.generate("The", **sampled) == lstm_lm.generate("The", **sampled)
    samples = lstm_lm.generate("The", num_samples=4, **{**sampled, "seed": 3})
    assert len(samples) == 4 and len(set(samples)) > 1


def test_generation_runs_past_the_training_window(lstm_lm):
    block = lstm_lm.context_length
    completion = lstm_lm.complete("The ", max_new_tokens=2 * block, temperature=0)[0]
    assert len(completion.token_ids) == 2 * block and completion.finish_reason == "length"
    with pytest.raises(ValueError, match="context"):  # prompts are still limited to block_size
        list(TokenGenerator(lstm_lm.model, [[1] * (block + 1)], SamplingConfig(), eos_id=None))


def test_perplexity_equals_exp_of_the_direct_cross_entropy(lstm_lm):
    text = "The for statement is used to iterate."
    ids = torch.tensor([lstm_lm.tokenizer.start_ids + lstm_lm.tokenizer.encode(text)])
    assert ids.shape[1] <= lstm_lm.context_length
    with torch.no_grad():
        logits = lstm_lm.model(ids[:, :-1])
    expected = math.exp(float(F.cross_entropy(logits[0].double(), ids[0, 1:])))
    assert lstm_lm.perplexity(text) == pytest.approx(expected, rel=1e-5)
    assert 1.0 < expected < 40.0  # trained: better than uniform over ~70 characters
