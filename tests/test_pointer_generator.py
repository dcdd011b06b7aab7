"""Pointer-generator copying in the encoder-decoder family (``ModelConfig.pointer_generator``): the output
is the mixture written out, cached and padded decoding agree with the full decode, it learns to copy
words it has never seen in a target, and the errors and checkpoints."""

from __future__ import annotations

import random

import pytest
import torch
from torch.testing import assert_close

from lmforge.config import ModelConfig, SamplingConfig
from lmforge.errors import ConfigError
from lmforge.inference.beam import beam_search
from lmforge.inference.seq2seq_decoding import generate_seq2seq
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import load_model, save_checkpoint
from seq2seq_helpers import padded

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)


def make_model(seed: int = 0, **knobs) -> Seq2SeqLM:
    torch.manual_seed(seed)
    knobs = {"vocab_size": 40, "block_size": 24, "n_layer": 2, "n_head": 2, "n_embd": 32, "pointer_generator": True,
             **knobs}
    return Seq2SeqLM(ModelConfig(family="seq2seq", **knobs)).eval()


def test_the_output_is_the_mixture_of_generating_and_copying_written_out():
    model = make_model()
    src, mask = padded([[5, 6, 5, 9, 2], [11, 12, 2]])  # token 5 twice: its copy weights add up
    tgt = torch.randint(3, 40, (2, 4))
    seen = {}
    model.norm.register_forward_hook(lambda module, args, out: seen.__setitem__("states", out))
    model.lm_head.register_forward_hook(lambda module, args, out: seen.__setitem__("logits", out))
    with torch.no_grad():
        out = model(src, attention_mask=mask, decoder_input_ids=tgt)  # (B, T, V)
        memory = model.encode(src, mask)
        states, logits, pointer = seen["states"], seen["logits"], model.pointer
        for b in range(2):
            length = int(mask[b].sum())
            for t in range(4):
                scores = torch.stack([pointer.query(states[b, t]) @ memory[b, s] for s in range(length)]) / 32 ** 0.5
                attention = scores.softmax(-1)
                context = sum(attention[s] * memory[b, s] for s in range(length))
                gate = torch.sigmoid(pointer.gate(torch.cat([states[b, t], context])))
                expected = gate * logits[b, t].softmax(-1)
                for s in range(length):
                    expected[src[b, s]] += (1 - gate[0]) * attention[s]
                assert_close(out[b, t].exp(), expected, atol=1e-6, rtol=1e-5)
    assert_close(out.exp().sum(-1), torch.ones(2, 4))  # a distribution: every consumer's log-softmax keeps it


def test_the_gate_chooses_between_the_vocabulary_and_the_source():
    model = make_model()
    plain = Seq2SeqLM(ModelConfig(**{**vars(model.config), "pointer_generator": False})).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    src, tgt = torch.tensor([[7, 8, 9, 2]]), torch.tensor([[1, 4, 5]])
    with torch.no_grad():
        model.pointer.gate.bias.fill_(30.0)   # always generate: the plain model's distribution
        assert_close(model(src, decoder_input_ids=tgt), plain(src, decoder_input_ids=tgt).log_softmax(-1),
                     atol=1e-5, rtol=1e-5)
        model.pointer.gate.bias.fill_(-30.0)  # always copy: all the mass on the source's tokens
        probs = model(src, decoder_input_ids=tgt).exp()
    assert_close(probs[..., [7, 8, 9, 2]].sum(-1), torch.ones(1, 3))


def test_cached_padded_and_reordered_decoding_equal_the_full_decode():
    model = make_model()
    sources = [[5, 6, 7, 8, 9, 2], [11, 12, 2], [13, 14, 15, 2]]
    src, mask = padded(sources)
    tgt = torch.randint(3, 40, (3, 6))
    with torch.no_grad():
        full = model(src, attention_mask=mask, decoder_input_ids=tgt)
        memory = model.encode(src, mask)
        cache = model.new_cache(memory, mask, source_ids=src)
        parts = [model.decode(tgt[:, :2], cache=cache)] + [model.decode(tgt[:, t:t + 1], cache=cache)
                                                             for t in range(2, 6)]
        assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
        cache = model.new_cache(memory, mask, source_ids=src)
        model.decode(tgt[:, :3], cache=cache)
        cache.select(torch.tensor([2, 0, 0]))
        step = model.decode(tgt[[2, 0, 0], 3:4], cache=cache, last_only=True)
        assert_close(step[:, 0], full[[2, 0, 0], 3], atol=1e-5, rtol=1e-5)
        # padding is never copied from, and a source alone is decoded as inside the batch
        for i, source in enumerate(sources):
            alone = model(torch.tensor([source]), decoder_input_ids=tgt[i:i + 1])
            assert_close(alone[0], full[i], atol=1e-5, rtol=1e-5)
        assert_close(model(src.masked_fill(~mask, 17), attention_mask=mask, decoder_input_ids=tgt), full)
    alone = [generate_seq2seq(model, [s], GREEDY, bos_id=1, eos_id=2, pad_id=0)[0] for s in sources]
    assert generate_seq2seq(model, sources, GREEDY, bos_id=1, eos_id=2, pad_id=0) == alone
    beams = beam_search(model, sources, beam_size=1, max_new_tokens=12, bos_id=1, eos_id=2, pad_id=0)
    assert [ids for ids, _ in beams] == alone  # beam 1 is greedy, copying included


def copy_batch(rng: random.Random, count: int, vocab: range) -> dict[str, torch.Tensor]:
    """Sources of 3-6 random words; the target is the source (then eos). bos 1, eos 2, pad 0."""
    rows = [[rng.choice(vocab) for _ in range(rng.randint(3, 6))] for _ in range(count)]
    src, mask = padded([row + [2] for row in rows])
    target, _ = padded([[1] + row + [2] for row in rows])
    labels = target[:, 1:].masked_fill(target[:, 1:] == 0, -100)
    return {"input_ids": src, "attention_mask": mask, "decoder_input_ids": target[:, :-1], "labels": labels}


def test_it_learns_to_copy_words_it_never_saw_as_targets():
    """Trained on words 3-299 only, the pointer-generator copies words 300-499 that no target ever held:
    its vocabulary softmax has never put mass on them, so only copying can produce them."""
    torch.manual_seed(0)
    model = make_model(vocab_size=500, block_size=16, n_embd=64, n_head=4).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(150):
        batch = copy_batch(rng, 32, range(3, 300))
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    unseen = [[rng.choice(range(300, 500)) for _ in range(rng.randint(3, 6))] for _ in range(32)]
    outputs = generate_seq2seq(model, [row + [2] for row in unseen], GREEDY, bos_id=1, eos_id=2, pad_id=0)
    assert sum(out == row for out, row in zip(outputs, unseen)) >= 0.9 * len(unseen)


def test_errors_and_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="pointer_generator.*seq2seq family"):
        ModelConfig(family="decoder", pointer_generator=True).validate()
    model = make_model()
    src = torch.tensor([[5, 6, 2]])
    with pytest.raises(ValueError, match="source_ids"):
        model.decode(torch.ones(1, 2, dtype=torch.long), model.encode(src))
    with pytest.raises(ValueError, match="source_ids"):
        model.new_cache(model.encode(src))
    tokenizer = Tokenizer.train(["abcdefghijklmnopqrstuvwxyz0123456789"], "char")
    model = make_model(vocab_size=tokenizer.vocab_size)
    loaded, _, config = load_model(save_checkpoint(tmp_path / "ckpt", model, tokenizer))
    assert config["model"]["pointer_generator"] and loaded.pointer is not None
    tgt = torch.tensor([[1, 4, 5]])
    with torch.no_grad():
        assert_close(loaded(src, decoder_input_ids=tgt), model(src, decoder_input_ids=tgt))
