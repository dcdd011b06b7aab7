"""LoRA by injection: exact no-op at init, merge parity, frozen base, row segments, tied heads, state dicts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lmforge.config import LoraConfig, ModelConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models.decoder import DecoderLM
from lmforge.models.lora import (
    LoRALinear,
    apply_lora,
    count_trainable,
    has_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
)
from lmforge.training.checkpoint import assign_weights, unique_state

FLAVOURS = {
    "gpt2": dict(),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2),
}


def make_config(flavour: str, **knobs) -> ModelConfig:
    return ModelConfig(vocab_size=50, block_size=24, n_layer=2, n_head=4, n_embd=32, **FLAVOURS[flavour], **knobs)


def make_model(flavour: str = "gpt2", seed: int = 0, **knobs) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(make_config(flavour, **knobs)).eval()


def tokens(seed: int = 1, batch: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Give every B (zero at init) random values, so the adapters really change the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


# ------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_linear_targets_name_real_linear_layers_and_cover_fused_rows(flavour):
    model = make_model(flavour)
    targets = model.linear_targets()
    modules = dict(model.named_modules())
    expected = ["q", "k", "v", "o", "gate", "up", "down", "head"] if flavour == "llama" else \
               ["q", "k", "v", "o", "up", "down", "head"]
    assert sorted(targets) == sorted(expected)
    for name, places in targets.items():
        assert len(places) == (1 if name == "head" else 2)
        for path, _ in places:
            assert isinstance(modules[path], torch.nn.Linear)
    qkv = model.blocks[0].attn.qkv_proj
    q, k, v = (dict(targets[t])["blocks.0.attn.qkv_proj"] for t in "qkv")
    kv_rows = model.config.n_kv_head * model.config.head_dim
    assert (q.start, q.stop, k.stop - k.start, v.stop - v.start) == (0, 32, kv_rows, kv_rows)
    assert q.stop == k.start and k.stop == v.start and v.stop == qkv.out_features
    if flavour == "llama":
        gate, up = (dict(targets[t])["blocks.1.mlp.gate_up_proj"] for t in ("gate", "up"))
        hidden = model.config.intermediate_size
        assert (gate.start, gate.stop, up.start, up.stop) == (0, hidden, hidden, 2 * hidden)
    else:
        assert targets["up"][0] == ("blocks.0.mlp.up_proj", None)
    assert targets["head"] == [("lm_head", None)]


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_fresh_adapters_change_nothing(flavour):
    base = make_model(flavour)
    lora = apply_lora(copy.deepcopy(base), LoraConfig(r=4, targets=["all"]))
    assert has_lora(lora) and not has_lora(base)
    idx = tokens()
    assert torch.equal(logits(lora, idx), logits(base, idx))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("targets", ["attn", "mlp", "all"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_merged_model_computes_what_the_adapted_one_does(flavour, targets, tie, tmp_path):
    base = make_model(flavour, tie_embeddings=tie)
    lora = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets=[targets]))
    randomize_adapters(lora)
    idx = tokens()
    adapted = logits(lora, idx)
    assert (adapted - logits(base, idx)).abs().max() > 1e-2  # the adapters matter

    merged = merge_lora(copy.deepcopy(lora))
    assert_close(logits(merged, idx), adapted, atol=1e-5, rtol=1e-5)
    assert not has_lora(merged)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    plain = DecoderLM(merged.config)
    assert list(merged.state_dict()) == list(plain.state_dict())

    head_changed = tie and targets == "all"
    assert merged.config.tie_embeddings == (tie and not head_changed)
    assert lora.config.tie_embeddings == tie  # the adapted model's config is not rewritten
    assert (merged.lm_head.weight is merged.tok_emb.weight) == merged.config.tie_embeddings
    assert torch.equal(merged.tok_emb.weight, base.tok_emb.weight)

    # it saves and loads as a normal checkpoint (a tied head is stored once, so the config must be right)
    assign_weights(plain, unique_state(merged), "merged")
    assert_close(logits(plain.eval(), idx), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_merge_is_exact_in_float64(flavour):
    """In float64 the merge leaves only float64 rounding, even for large updates on every layer."""
    lora = apply_lora(make_model(flavour, tie_embeddings=True).double(), LoraConfig(r=4, alpha=8, targets=["all"]))
    randomize_adapters(lora, scale=0.5)
    idx = tokens()
    merged = merge_lora(copy.deepcopy(lora))
    assert merged.lm_head.weight.dtype == torch.float64
    assert_close(logits(merged, idx), logits(lora, idx), atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_only_adapters_train_and_base_weights_stay_bit_identical(flavour):
    model = apply_lora(make_model(flavour), LoraConfig(r=4, alpha=8, targets=["all"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if ".lora_" not in n}

    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6] * 3])  # (1, 24): a tiny repeated sequence
    x, y = seq[:, :-1], seq[:, 1:]
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(15):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad == trainable
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for name, tensor in model.state_dict().items():
        if name in frozen:
            assert torch.equal(tensor, frozen[name]), name


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_bf16_autocast_and_bf16_weights(flavour):
    model = apply_lora(make_model(flavour), LoraConfig(r=4, targets=["all"]))
    randomize_adapters(model)
    idx = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters() if p.requires_grad)

    half = apply_lora(make_model(flavour).to(torch.bfloat16), LoraConfig(r=4, targets=["attn"]))
    assert half.blocks[0].attn.qkv_proj.lora_A["q"].dtype == torch.bfloat16
    assert logits(half, idx).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ segments
def test_q_adapter_changes_only_the_query_rows():
    model = apply_lora(make_model("llama"), LoraConfig(r=4, targets=["q"]))
    randomize_adapters(model)
    layer = model.blocks[0].attn.qkv_proj
    assert isinstance(layer, LoRALinear) and list(layer.lora_A) == ["q"]
    assert not isinstance(model.blocks[0].attn.o_proj, LoRALinear)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out, base = layer(x), layer.base(x)
    assert not torch.allclose(out[..., :32], base[..., :32])
    assert torch.equal(out[..., 32:], base[..., 32:])  # k and v rows


def test_gate_adapter_changes_only_the_gate_half():
    model = apply_lora(make_model("llama"), LoraConfig(r=4, targets=["gate"]))
    randomize_adapters(model)
    layer = model.blocks[1].mlp.gate_up_proj
    hidden = model.config.intermediate_size
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out, base = layer(x), layer.base(x)
    assert not torch.allclose(out[..., :hidden], base[..., :hidden])
    assert torch.equal(out[..., hidden:], base[..., hidden:])


def test_several_targets_on_one_fused_layer_share_one_wrapper():
    model = apply_lora(make_model("llama"), LoraConfig(r=2, targets=["attn", "mlp"]))
    qkv, gate_up = model.blocks[0].attn.qkv_proj, model.blocks[0].mlp.gate_up_proj
    assert list(qkv.lora_A) == ["q", "k", "v"] and list(gate_up.lora_A) == ["gate", "up"]
    assert not isinstance(qkv.base, LoRALinear)
    names = set(model.state_dict())
    assert {"blocks.0.attn.qkv_proj.base.weight", "blocks.0.attn.qkv_proj.lora_A.q",
            "blocks.0.attn.qkv_proj.lora_B.v", "blocks.0.mlp.gate_up_proj.lora_B.up"} <= names
    assert qkv.lora_B["k"].shape == (model.config.n_kv_head * model.config.head_dim, 2)


# ------------------------------------------------------------------------------------------ tied head
def test_tied_embedding_is_untouched_by_training_and_merging_a_head_adapter():
    base = make_model("gpt2", tie_embeddings=True)
    embedding = base.tok_emb.weight.detach().clone()
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets=["head"]))
    assert model.lm_head.base.weight is model.tok_emb.weight  # still tied
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seq = tokens(batch=1, length=24)
    for _ in range(5):
        loss = F.cross_entropy(model(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert torch.equal(model.tok_emb.weight, embedding)
    assert model.lm_head.lora_B["head"].abs().max() > 0  # the head adapter did learn

    idx = tokens()
    merged = merge_lora(copy.deepcopy(model))
    assert torch.equal(merged.tok_emb.weight, embedding)
    assert merged.lm_head.weight is not merged.tok_emb.weight
    assert not torch.equal(merged.lm_head.weight, embedding)
    assert merged.config.tie_embeddings is False
    assert_close(logits(merged, idx), logits(model, idx), atol=1e-5, rtol=1e-5)


def test_merging_untrained_head_adapter_keeps_the_head_tied():
    model = apply_lora(make_model("gpt2", tie_embeddings=True), LoraConfig(r=4, targets=["all"]))
    merged = merge_lora(model)
    assert merged.lm_head.weight is merged.tok_emb.weight and merged.config.tie_embeddings


# ------------------------------------------------------------------------------------------ state dicts
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_lora_state_dict_round_trip(flavour):
    config = LoraConfig(r=4, alpha=8, targets=["all"])
    model = apply_lora(make_model(flavour), config)
    randomize_adapters(model, seed=3)
    state = lora_state_dict(model)
    assert state and set(state) <= set(model.state_dict())
    assert all(".lora_A." in n or ".lora_B." in n for n in state)
    assert "lm_head.lora_B.head" in state and "blocks.1.mlp.down_proj.lora_A.down" in state

    fresh = apply_lora(make_model(flavour), config)  # same base weights, new adapters
    idx = tokens()
    assert not torch.equal(logits(fresh, idx), logits(model, idx))
    load_lora_state_dict(fresh, {k: v.clone() for k, v in state.items()})
    assert torch.equal(logits(fresh, idx), logits(model, idx))


def test_load_lora_state_dict_rejects_what_does_not_fit():
    model = apply_lora(make_model("gpt2"), LoraConfig(r=4, targets=["attn"]))
    state = lora_state_dict(model)
    missing = dict(state)
    missing.pop("blocks.0.attn.o_proj.lora_A.o")
    with pytest.raises(CheckpointError, match=r"missing \['blocks.0.attn.o_proj.lora_A.o'\]") as error:
        load_lora_state_dict(model, missing)
    assert "\n" not in str(error.value)  # one line, as the CLI prints it
    with pytest.raises(CheckpointError, match=r"unexpected \['lm_head.lora_A.head'\]"):
        load_lora_state_dict(model, {**state, "lm_head.lora_A.head": torch.zeros(4, 32)})
    other_rank = lora_state_dict(apply_lora(make_model("gpt2"), LoraConfig(r=8, targets=["attn"])))
    with pytest.raises(CheckpointError, match="shape"):
        load_lora_state_dict(model, other_rank)
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        load_lora_state_dict(make_model("gpt2"), state)


# ------------------------------------------------------------------------------------------ dropout
def test_dropout_acts_on_the_adapter_path_in_training_only():
    model = apply_lora(make_model("gpt2"), LoraConfig(r=4, targets=["all"], dropout=0.5))
    assert not model.blocks[0].attn.qkv_proj.training  # applied to an eval model: stays in eval
    randomize_adapters(model)
    idx = tokens()
    assert torch.equal(logits(model, idx), logits(model, idx))
    model.train()
    torch.manual_seed(0)
    first = logits(model, idx)
    assert not torch.equal(first, logits(model, idx))

    base = make_model("gpt2").train()  # the base path has no dropout (model.dropout is 0)
    frozen_only = apply_lora(copy.deepcopy(base), LoraConfig(r=4, targets=["all"], dropout=0.5)).train()
    assert torch.equal(logits(frozen_only, idx), logits(base, idx))  # B = 0: dropout has nothing to drop


# ------------------------------------------------------------------------------------------ errors
def test_absent_unknown_and_repeated_targets_are_config_errors():
    with pytest.raises(ConfigError, match="no gate.*offers q, k, v, o, up, down, head"):
        apply_lora(make_model("gpt2"), LoraConfig(r=4, targets=["gate"]))
    with pytest.raises(ConfigError, match="unknown lora target"):
        apply_lora(make_model("gpt2"), LoraConfig(r=4, targets=["qkv"]))
    with pytest.raises(ConfigError, match="r must be > 0"):
        apply_lora(make_model("gpt2"), LoraConfig(r=0))
    model = apply_lora(make_model("gpt2"), LoraConfig(r=4, targets=["mlp"]))  # a group takes what exists
    assert isinstance(model.blocks[0].mlp.up_proj, LoRALinear) and isinstance(model.blocks[0].mlp.down_proj,
                                                                              LoRALinear)
    assert not isinstance(model.blocks[0].attn.qkv_proj, LoRALinear)
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, LoraConfig(r=4, targets=["attn"]))
    with pytest.raises(ConfigError, match="linear_targets"):
        apply_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraConfig(r=4))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_count_trainable_matches_the_analytic_count(flavour):
    base = make_model(flavour)
    total_base = base.num_parameters()
    model = apply_lora(base, LoraConfig(r=8, targets=["attn"]))
    c, r = model.config, 8
    q_rows, kv_rows = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    # per layer: A is (r, C) for each of q, k, v, o; B is (rows, r): q, k, v rows of qkv_proj and C for o
    expected = c.n_layer * (4 * r * c.n_embd + r * (q_rows + 2 * kv_rows) + r * c.n_embd)
    assert count_trainable(model) == (expected, total_base + expected)
    assert expected == {"gpt2": 4096, "llama": 3584}[flavour]


# ------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_generation_with_adapters_equals_the_merged_model(flavour):
    from lmforge.api import LanguageModel
    from lmforge.config import SamplingConfig
    from lmforge.inference.generate import TokenGenerator
    from lmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["hello world", "the quick brown fox jumps over the lazy dog"], kind="char")
    model = apply_lora(make_model(flavour), LoraConfig(r=4, alpha=16, targets=["all"]))
    randomize_adapters(model)
    merged = merge_lora(copy.deepcopy(model))

    lm, lm_merged = LanguageModel(model, tokenizer), LanguageModel(merged, tokenizer)
    text = lm.generate("the ", max_new_tokens=15, temperature=0)
    assert text == lm_merged.generate("the ", max_new_tokens=15, temperature=0)
    assert text != LanguageModel(make_model(flavour), tokenizer).generate("the ", max_new_tokens=15, temperature=0)

    sampling = SamplingConfig(max_new_tokens=10, temperature=0)
    prompts = [tokenizer.encode("hello"), tokenizer.encode("fox")]  # different lengths: left padding
    steps = [torch.stack(list(TokenGenerator(m, prompts, sampling, eos_id=None))) for m in (model, merged)]
    assert torch.equal(*steps)
