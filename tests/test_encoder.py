"""The encoder family: bidirectional attention, padding invariance, masked-LM learning, registry and LoRA."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmforge.config import LoraConfig, ModelConfig
from lmforge.models import build_model
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import EncoderLM
from lmforge.models.lora import apply_lora
from lmforge.tokenizer import Tokenizer
from lmforge.training.objectives import masked_lm_objective

FLAVOURS = {
    "bert": dict(),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2),
}


def make_model(flavour: str = "bert", seed: int = 0, **knobs) -> EncoderLM:
    torch.manual_seed(seed)
    knobs = {"vocab_size": 40, "block_size": 24, "n_layer": 2, "n_head": 4, "n_embd": 32, **FLAVOURS[flavour], **knobs}
    config = ModelConfig(family="encoder", **knobs)
    return EncoderLM(config).eval()


def test_shapes_names_and_registry():
    model = make_model()
    ids = torch.randint(0, 40, (3, 10))
    assert model(ids).shape == (3, 10, 40)
    states = model.hidden_states(ids)
    assert states.shape == (3, 10, 32)
    assert_close(model(ids), model.lm_head(states))
    assert model.lm_head.weight is model.tok_emb.weight  # tied by default
    names = dict(model.named_parameters())
    assert {"tok_emb.weight", "pos_emb.weight", "norm.weight", "blocks.1.attn.qkv_proj.weight"} <= names.keys()
    assert all(not block.attn.causal for block in model.blocks)
    # The registry builds it; the presets describe it.
    for preset, params in (("encoder-tiny", (0.2e6, 0.4e6)), ("encoder-small", (9e6, 11e6))):
        config = ModelConfig.from_dict({"preset": preset, "vocab_size": 8192})
        built = build_model(config)
        assert isinstance(built, EncoderLM) and config.family == "encoder"
        assert params[0] < built.num_parameters() < params[1]
    assert ModelConfig.from_dict({"preset": "encoder-small"}).block_size in (256, 384)
    # Counting and FLOPs follow the decoder's conventions (same layout).
    twin = DecoderLM(ModelConfig(vocab_size=40, block_size=24, n_layer=2, n_head=4, n_embd=32))
    assert model.num_parameters() == twin.num_parameters()
    assert model.num_parameters(non_embedding=True) == twin.num_parameters(non_embedding=True)
    assert model.flops_per_token() == twin.flops_per_token() > 0
    assert model.linear_targets() == twin.linear_targets()


def test_attention_is_bidirectional():
    model = make_model()
    ids = torch.randint(0, 40, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 40
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert not torch.allclose(before[0, 0], after[0, 0])  # the first token sees the last one


def test_logits_of_picked_positions_only():
    model = make_model().eval()
    ids = torch.randint(0, 40, (2, 8))
    picked = torch.rand(2, 8) < 0.3
    picked[1, 2] = True
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 6:] = False
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        assert_close(model(ids, attention_mask=mask, positions=picked), full[picked])


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_padding_does_not_change_a_row(flavour):
    model = make_model(flavour)
    lengths = [9, 5, 2]
    rows = [torch.randint(1, 40, (n,)) for n in lengths]
    T = max(lengths)
    right = torch.zeros(len(rows), T, dtype=torch.long)
    left = torch.zeros(len(rows), T, dtype=torch.long)
    right_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    left_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, row in enumerate(rows):
        right[i, :len(row)], right_mask[i, :len(row)] = row, True
        left[i, T - len(row):], left_mask[i, T - len(row):] = row, True
    with torch.no_grad():
        padded_right = model(right, attention_mask=right_mask)
        padded_left = model(left, attention_mask=left_mask)
        for i, row in enumerate(rows):
            alone = model(row[None])[0]
            assert_close(padded_right[i, :len(row)], alone, atol=1e-5, rtol=1e-5)
            assert_close(padded_left[i, T - len(row):], alone, atol=1e-5, rtol=1e-5)
        # A row that is all padding gives finite outputs (no empty softmax) and leaves the others alone.
        empty = torch.zeros(1, T, dtype=torch.bool)
        both = model(torch.cat([right[:1], right[:1]]), attention_mask=torch.cat([right_mask[:1], empty]))
    assert torch.isfinite(both).all()
    assert_close(both[0, :lengths[0]], padded_right[0, :lengths[0]], atol=1e-5, rtol=1e-5)


def test_lora_applies_to_the_encoder():
    model = make_model("llama")
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        before = model(ids)
    apply_lora(model, LoraConfig(r=4, targets=["all"]))
    with torch.no_grad():
        assert_close(model(ids), before)  # adapters start as a no-op
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_masked_lm_training_learns_a_repetitive_corpus():
    torch.manual_seed(0)
    text = "the cat sat on the mat. the dog ate the log. "
    tokenizer = Tokenizer.train([text], "char").with_mask()
    corpus = torch.tensor(tokenizer.encode(text * 40))
    V = tokenizer.vocab_size
    config = ModelConfig.from_dict({"preset": "encoder-tiny", "vocab_size": V, "block_size": 32})
    model = EncoderLM(config)
    objective = masked_lm_objective(tokenizer.mask_id, V, probability=0.15, special_ids=tokenizer.special_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def batch(size: int = 32) -> dict[str, torch.Tensor]:
        starts = torch.randint(0, len(corpus) - 32, (size,))
        return {"input_ids": torch.stack([corpus[s:s + 32] for s in starts.tolist()])}

    model.train()
    losses = []
    for _ in range(600):
        loss = objective(model, batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first / 3, (first, last)

    # Mask one in every eight tokens of held-out windows and predict them.
    model.eval()
    ids = batch(64)["input_ids"]
    chosen = torch.zeros_like(ids, dtype=torch.bool)
    chosen[:, torch.arange(ids.shape[1]) % 8 == 3] = True
    corrupted = ids.masked_fill(chosen, tokenizer.mask_id)
    with torch.no_grad():
        predicted = model(corrupted).argmax(-1)
    accuracy = (predicted[chosen] == ids[chosen]).float().mean().item()
    chance = 1 / len(set(text))
    assert accuracy > 0.9 > 5 * chance, accuracy
    # Padding: the objective masks only real tokens and the model sees the attention mask.
    padded = batch(4)
    padded["attention_mask"] = torch.ones_like(padded["input_ids"], dtype=torch.bool)
    padded["attention_mask"][:, 20:] = False
    assert torch.isfinite(objective(model, padded))


def test_checkpoint_round_trip(tmp_path):
    from lmforge.training.checkpoint import load_model, save_checkpoint

    tokenizer = Tokenizer.train(["abcdefgh ijkl"], "char").with_mask()
    model = make_model(vocab_size=tokenizer.vocab_size)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    loaded, loaded_tokenizer, _ = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, EncoderLM) and loaded_tokenizer.mask_id == tokenizer.mask_id
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    ids = torch.randint(0, tokenizer.vocab_size, (2, 7))
    with torch.no_grad():
        assert_close(loaded(ids), model(ids))
