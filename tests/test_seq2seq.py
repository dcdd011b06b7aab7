"""The encoder-decoder family: shapes and registry, cached decoding, padding, learning a toy task through
the one training loop, greedy/sampled generation, LoRA targets and checkpoints."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch.testing import assert_close

from lmforge.config import LoraConfig, ModelConfig, SamplingConfig, TrainConfig
from lmforge.data.task_rows import collate_pairs
from lmforge.inference.beam import beam_search
from lmforge.inference.seq2seq_decoding import generate_seq2seq
from lmforge.models import build_model
from lmforge.models.lora import apply_lora
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import load_model, save_checkpoint
from lmforge.training.loop import setup_runtime, train
from lmforge.training.objectives import seq2seq_loss
from seq2seq_helpers import padded

FLAVOURS = {
    "bart": dict(),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1, tie_embeddings=False),
}
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)


def make_model(flavour: str = "bart", seed: int = 0, **knobs) -> Seq2SeqLM:
    torch.manual_seed(seed)
    knobs = {"vocab_size": 40, "block_size": 24, "n_layer": 2, "n_head": 2, "n_embd": 32, **FLAVOURS[flavour], **knobs}
    return Seq2SeqLM(ModelConfig(family="seq2seq", **knobs)).eval()


# ------------------------------------------------------------------------------------------
# Architecture
# ------------------------------------------------------------------------------------------
def test_shapes_names_registry_and_presets():
    model = make_model(n_layer=3, n_decoder_layer=1)
    src, tgt = torch.randint(0, 40, (2, 9)), torch.randint(0, 40, (2, 5))
    assert model(src, decoder_input_ids=tgt).shape == (2, 5, 40)
    assert model.encode(src).shape == (2, 9, 32)
    assert len(model.encoder_blocks) == 3 and len(model.decoder_blocks) == 1
    assert all(not block.attn.causal for block in model.encoder_blocks)
    assert all(block.attn.causal for block in model.decoder_blocks)
    assert model.lm_head.weight is model.tok_emb.weight  # tied by default
    names = dict(model.named_parameters())
    assert {"tok_emb.weight", "enc_pos_emb.weight", "dec_pos_emb.weight", "encoder_norm.weight", "norm.weight",
            "decoder_blocks.0.cross_attn.kv_proj.weight"} <= names.keys()
    assert ModelConfig(family="seq2seq", n_layer=3).n_decoder_layer == 3  # defaults to n_layer
    # Counting: the embeddings (token + 2 position tables) are all that non_embedding leaves out.
    c = model.config
    embeddings = c.vocab_size * c.n_embd + 2 * c.block_size * c.n_embd
    assert model.num_parameters() - model.num_parameters(non_embedding=True) == embeddings
    untied = make_model("llama")
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_parameters() - untied.num_parameters(non_embedding=True) == 2 * 40 * 32
    assert 0 < make_model().flops_per_token(training=False) < make_model().flops_per_token()
    assert make_model(n_decoder_layer=3).flops_per_token() > make_model().flops_per_token()
    # The registry builds it; the presets describe it.
    for preset, params in (("seq2seq-tiny", (0.5e6, 0.7e6)), ("seq2seq-small", (9e6, 11e6))):
        config = ModelConfig.from_dict({"preset": preset, "vocab_size": 8192})
        built = build_model(config)
        assert isinstance(built, Seq2SeqLM) and config.family == "seq2seq"
        assert params[0] < built.num_parameters() < params[1], preset
    small = build_model(ModelConfig.from_dict({"preset": "seq2seq-small", "vocab_size": 16384}))
    assert small.num_parameters() < 15e6


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_cached_incremental_decoding_equals_the_full_decode(flavour):
    model = make_model(flavour)
    src, mask = padded([[5, 6, 7, 8, 9, 2], [11, 12, 2]])
    tgt = torch.randint(3, 40, (2, 7))
    with torch.no_grad():
        full = model(src, attention_mask=mask, decoder_input_ids=tgt)  # (B, T, V)
        memory = model.encode(src, mask)
        assert_close(model.decode(tgt, memory, mask), full)
        cache = model.new_cache(memory, mask)
        # one token, then a chunk of three after cached ones, then one at a time
        parts = [model.decode(tgt[:, :1], cache=cache), model.decode(tgt[:, 1:4], cache=cache)]
        parts += [model.decode(tgt[:, t:t + 1], cache=cache) for t in range(4, 7)]
        assert cache.length == 7
        assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
        # last_only, and a reordered cache decodes the reordered rows
        cache = model.new_cache(memory, mask)
        model.decode(tgt[:, :3], cache=cache)
        cache.select(torch.tensor([1, 1, 0]))
        step = model.decode(tgt[[1, 1, 0], 3:4], cache=cache, last_only=True)
        assert_close(step[:, 0], full[[1, 1, 0], 3], atol=1e-5, rtol=1e-5)


def test_batch_one_bf16_decoding_takes_torch_kernels_with_the_same_logits(monkeypatch):
    import contextlib

    from lmforge.models import seq2seq

    model = make_model().to(torch.bfloat16)
    onednn = []
    model.lm_head.register_forward_pre_hook(lambda module, args: onednn.append(torch.backends.mkldnn.enabled))
    src, tgt = torch.randint(3, 40, (1, 9)), torch.randint(3, 40, (1, 6))

    def decode() -> torch.Tensor:
        cache = model.new_cache(model.encode(src))
        return torch.cat([model.decode(tgt[:, t:t + 1], cache=cache) for t in range(6)], dim=1).float()

    with torch.no_grad():
        switched = decode()
        monkeypatch.setattr(seq2seq, "single_token_kernels", lambda *args: contextlib.nullcontext())
        plain = decode()
        model.decode(tgt, cache=model.new_cache(model.encode(src)))  # several tokens: oneDNN on
    assert onednn == [False] * 6 + [True] * 7
    assert_close(switched, plain, atol=0.02 * plain.abs().max().item(), rtol=0)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_source_padding_changes_nothing(flavour):
    model = make_model(flavour)
    sources = [[4, 5, 6, 7, 8, 9, 10, 2], [20, 21, 2], [30, 31, 32, 33, 2]]
    src, mask = padded(sources)
    tgt = torch.randint(3, 40, (3, 5))
    with torch.no_grad():
        batch = model(src, attention_mask=mask, decoder_input_ids=tgt)
        memory = model.encode(src, mask)
        for i, source in enumerate(sources):
            alone = torch.tensor([source])
            assert_close(model.encode(alone)[0], memory[i, :len(source)], atol=1e-5, rtol=1e-5)
            assert_close(model(alone, decoder_input_ids=tgt[i:i + 1])[0], batch[i], atol=1e-5, rtol=1e-5)
        # what sits in the padding is never seen
        assert_close(model(src.masked_fill(~mask, 17), attention_mask=mask, decoder_input_ids=tgt), batch)
    # generation: a source alone or padded inside a batch gives the same ids
    alone = [generate_seq2seq(model, [s], GREEDY, bos_id=1, eos_id=2, pad_id=0)[0] for s in sources]
    assert generate_seq2seq(model, sources, GREEDY, bos_id=1, eos_id=2, pad_id=0) == alone


def test_cross_attention_reads_the_source():
    model = make_model()
    tgt = torch.tensor([[1, 5, 6]])
    with torch.no_grad():
        a = model(torch.tensor([[7, 8, 9, 2]]), decoder_input_ids=tgt)
        b = model(torch.tensor([[7, 8, 10, 2]]), decoder_input_ids=tgt)
    assert not torch.allclose(a, b)


def test_dropout_trains_and_eval_is_deterministic():
    model = make_model(dropout=0.3).train()
    src, tgt = torch.randint(3, 40, (2, 6)), torch.randint(3, 40, (2, 4))
    assert not torch.allclose(model(src, decoder_input_ids=tgt), model(src, decoder_input_ids=tgt))
    model.eval()
    assert_close(model(src, decoder_input_ids=tgt), model(src, decoder_input_ids=tgt))


def test_context_limits_and_errors():
    model = make_model(block_size=8)
    with pytest.raises(ValueError, match="source of 9 tokens"):
        model.encode(torch.zeros(1, 9, dtype=torch.long))
    memory = model.encode(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="target of 9 tokens"):
        model.decode(torch.ones(1, 9, dtype=torch.long), memory)
    with pytest.raises(ValueError, match="memory"):
        model.decode(torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the context"):
        generate_seq2seq(model, [[3] * 9], GREEDY, bos_id=1, eos_id=2)
    # the target stops at the context however many tokens are asked for
    out = generate_seq2seq(model, [[3, 4]], SamplingConfig(temperature=0.0, max_new_tokens=100), 1, None)
    assert len(out[0]) == 8
    assert generate_seq2seq(model, [[3, 4]], SamplingConfig(max_new_tokens=0), 1, 2) == [[]]


def test_lora_targets_cover_both_stacks_and_start_as_a_no_op():
    for flavour in FLAVOURS:
        base = make_model(flavour)
        modules = dict(base.named_modules())
        targets = base.linear_targets()
        for places in targets.values():
            for path, rows in places:
                assert isinstance(modules[path], torch.nn.Linear), path
                if rows is not None:
                    assert rows.stop <= modules[path].out_features
        assert ("decoder_blocks.1.cross_attn.q_proj", None) in targets["q"]
        assert any(path.startswith("encoder_blocks.0") for path, _ in targets["down"])
        lora = apply_lora(copy.deepcopy(base), LoraConfig(r=2, targets=["all"]))
        src, tgt = torch.randint(3, 40, (2, 6)), torch.randint(3, 40, (2, 4))
        with torch.no_grad():
            assert_close(lora(src, decoder_input_ids=tgt), base(src, decoder_input_ids=tgt))


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = make_model()
    sources = [[4, 5, 6, 2], [7, 8, 2]]
    greedy = generate_seq2seq(model, sources, GREEDY, 1, 2)
    top1 = SamplingConfig(temperature=1.0, top_k=1, max_new_tokens=12, seed=3)
    assert generate_seq2seq(model, sources, top1, 1, 2) == greedy
    sampled = SamplingConfig(temperature=1.5, top_p=0.95, repetition_penalty=1.3, frequency_penalty=0.5,
                             max_new_tokens=12, seed=7)
    first = generate_seq2seq(model, sources, sampled, 1, 2)
    assert first == generate_seq2seq(model, sources, sampled, 1, 2)
    assert all(len(ids) <= 12 and 2 not in ids for ids in first)


# ------------------------------------------------------------------------------------------
# Learning a toy task through the one training loop
# ------------------------------------------------------------------------------------------
DIGITS = "0123456789"


class Reversal:
    """Reverse 2-6 digits: batches for the training loop and held-out pairs."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def pairs(self, rng: random.Random, count: int) -> list[tuple[str, str]]:
        texts = ["".join(rng.choice(DIGITS) for _ in range(rng.randint(2, 6))) for _ in range(count)]
        return [(text, text[::-1]) for text in texts]

    def source(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) + [self.tokenizer.eos_id]

    def collate(self, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        t = self.tokenizer
        rows = [(self.source(s), t.encode(target)) for s, target in pairs]
        return collate_pairs(rows, pad_id=t.pad_id, bos_id=t.bos_id, eos_id=t.eos_id)

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        return self.collate(self.pairs(random.Random(1000 * step + micro), 32))


@pytest.fixture(scope="module")
def reversal(tmp_path_factory):
    """A tiny seq2seq model trained to reverse digit strings: (model, tokenizer, task, result, held-out
    pairs, validation loss before training)."""
    tokenizer = Tokenizer.train([DIGITS], "char")
    task = Reversal(tokenizer)
    held_out = task.pairs(random.Random(-1), 64)
    val_batch = task.collate(held_out)

    def evaluator(model, final):
        with torch.no_grad():
            return {"val_loss": seq2seq_loss(model, val_batch).item()}

    config = TrainConfig(lr=3e-3, warmup_steps=20, max_steps=400, batch_size=32, weight_decay=0.0,
                         eval_interval=0, save_interval=0, log_interval=100, device="cpu", dtype="fp32",
                         progress=False, seed=0)
    runtime = setup_runtime(config)
    model = build_model(ModelConfig.from_dict({"preset": "seq2seq-tiny", "vocab_size": tokenizer.vocab_size,
                                               "block_size": 16}))
    before = evaluator(model.eval(), False)["val_loss"]
    result = train(model.train(), seq2seq_loss, task, evaluator, tokenizer, config,
                   tmp_path_factory.mktemp("seq2seq-run"), runtime)
    return model.eval(), tokenizer, task, result, held_out, before


def test_loss_falls_and_greedy_decoding_solves_the_task(reversal):
    model, tokenizer, task, result, held_out, before = reversal
    assert result.metrics["val_loss"] < 0.1 < before / 10
    sources = [task.source(s) for s, _ in held_out]
    outputs = generate_seq2seq(model, sources, GREEDY, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    correct = sum(tokenizer.decode(ids) == target for ids, (_, target) in zip(outputs, held_out))
    assert correct >= 0.9 * len(held_out)
    # alone or inside the padded batch: the same outputs
    for i in range(0, len(sources), 16):
        alone = generate_seq2seq(model, [sources[i]], GREEDY, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        assert alone[0] == outputs[i]
    # beam search agrees with greedy on a task this easy
    beams = beam_search(model, sources[:16], beam_size=3, max_new_tokens=12, bos_id=tokenizer.bos_id,
                        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    assert [ids for ids, _ in beams] == outputs[:16]
    # a hypothesis' score is its log-probability, eos included, over its length (eos included)
    for source, (ids, score) in zip(sources, beams):
        target = torch.tensor([ids + [tokenizer.eos_id]])
        with torch.no_grad():
            logits = model(torch.tensor([source]), decoder_input_ids=torch.tensor([[tokenizer.bos_id] + ids]))
        logprob = logits.log_softmax(-1).gather(-1, target[..., None]).sum().item()
        assert score == pytest.approx(logprob / target.shape[1], abs=1e-4)


def test_checkpoint_round_trip(reversal, tmp_path):
    model, tokenizer, task, result, held_out, _ = reversal
    sources = [task.source(s) for s, _ in held_out[:8]]
    expected = generate_seq2seq(model, sources, GREEDY, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    batch = task.collate(held_out[:8])
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"])
    for path in (save_checkpoint(tmp_path / "ckpt", model, tokenizer), result.final_checkpoint):
        loaded, loaded_tokenizer, config = load_model(path)
        assert isinstance(loaded, Seq2SeqLM) and config["family"] == "seq2seq"
        assert not loaded.config.tie_embeddings  # as the seq2seq-tiny preset says
        assert loaded_tokenizer.vocab_size == tokenizer.vocab_size
        with torch.no_grad():
            assert_close(loaded(batch["input_ids"], attention_mask=batch["attention_mask"],
                                decoder_input_ids=batch["decoder_input_ids"]), logits)
        assert generate_seq2seq(loaded, sources, GREEDY, tokenizer.bos_id, tokenizer.eos_id,
                                tokenizer.pad_id) == expected
    # a tied head is stored once and comes back tied
    tied = make_model("bart")
    loaded, _, _ = load_model(save_checkpoint(tmp_path / "tied", tied, tokenizer))
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    src, tgt = torch.randint(3, 40, (2, 6)), torch.randint(3, 40, (2, 4))
    with torch.no_grad():
        assert_close(loaded(src, decoder_input_ids=tgt), tied(src, decoder_input_ids=tgt))
