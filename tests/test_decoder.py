"""The decoder model: parity with Hugging Face transformers (same random weights), KV cache, padding."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmforge.config import ModelConfig
from lmforge.interop.hf import architecture_for, to_hf_state
from lmforge.models.decoder import DecoderLM, KVCache
from lmforge.training.checkpoint import unique_state

transformers = pytest.importorskip("transformers")


def hf_state(model: DecoderLM) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face names, through lmforge's interop table."""
    return to_hf_state(unique_state(model), model.config, architecture_for(model.config))


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (norm weights and biases too, so they are really compared)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if is_norm_weight else 0.0))


GPT2_CASES = [
    dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=101, mlp="gelu_tanh", tie_embeddings=True),
    dict(n_layer=3, n_head=3, n_embd=48, block_size=40, vocab_size=77, mlp="gelu", tie_embeddings=True),
    dict(n_layer=1, n_head=4, n_embd=24, block_size=16, vocab_size=53, mlp="gelu_tanh", tie_embeddings=False),
]


@pytest.mark.parametrize("knobs", GPT2_CASES)
def test_gpt2_flavour_matches_transformers(knobs):
    config = ModelConfig(**knobs)
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    randomize(model)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, activation_function="gelu_new" if config.mlp == "gelu_tanh" else "gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    missing, unexpected = hf.load_state_dict(hf_state(model), strict=False)
    tied = {"lm_head.weight"} if config.tie_embeddings else set()  # tied to transformer.wte
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k or k in tied for k in missing)
    ids = torch.randint(0, config.vocab_size, (3, config.block_size))
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


LLAMA_CASES = [
    dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32, vocab_size=97),
    dict(n_layer=2, n_head=6, n_kv_head=1, n_embd=36, block_size=24, vocab_size=61, intermediate_size=50),
    dict(n_layer=1, n_head=2, n_kv_head=2, n_embd=16, block_size=20, vocab_size=33, tie_embeddings=True,
         rope_theta=500000.0),
]


@pytest.mark.parametrize("knobs", LLAMA_CASES)
def test_llama_flavour_matches_transformers(knobs):
    base = dict(norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", position="rope", bias=False, tie_embeddings=False)
    config = ModelConfig(**{**base, **knobs})
    model = DecoderLM(config).eval()
    randomize(model, seed=1)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(hf_state(model), strict=not config.tie_embeddings)
    ids = torch.randint(0, config.vocab_size, (2, config.block_size))
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    assert model.num_parameters() == hf.num_parameters()


def tiny(position: str = "learned", **knobs) -> DecoderLM:
    base = dict(vocab_size=50, block_size=24, n_layer=2, n_head=4, n_embd=32)
    if position == "rope":
        base.update(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**{**base, **knobs})).eval()
    randomize(model, seed=3)
    return model


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_kv_cache_decoding_equals_full_forward(position):
    model = tiny(position)
    ids = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.empty(model.config, 2, model.config.block_size, ids.device, torch.float32)
        steps = [model(ids[:, :7], cache=cache)]
        for t in range(7, 20):
            steps.append(model(ids[:, t:t + 1], cache=cache))
    assert cache.length == 20
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_left_padding_with_mask_matches_unpadded(position):
    model = tiny(position)
    short, long = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    batch = torch.cat([padded, long])
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[0, :4] = False
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(batch, position_ids=positions, attention_mask=mask)
        assert_close(out[0, 4:], model(short)[0], atol=1e-5, rtol=1e-5)
        assert_close(out[1], model(long)[0], atol=1e-5, rtol=1e-5)


def test_last_only_returns_last_position():
    model = tiny()
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        assert_close(model(ids, last_only=True), model(ids)[:, -1:])


def test_too_long_input_is_rejected():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_weight_tying_and_parameter_counts():
    model = tiny(tie_embeddings=True)
    assert model.lm_head.weight is model.tok_emb.weight
    c = model.config
    per_layer = 2 * 2 * c.n_embd + 4 * (c.n_embd * c.n_embd + c.n_embd) + 2 * c.n_embd * 4 * c.n_embd + 5 * c.n_embd
    expected = c.vocab_size * c.n_embd + c.block_size * c.n_embd + c.n_layer * per_layer + 2 * c.n_embd
    assert model.num_parameters() == expected
    assert model.num_parameters(non_embedding=True) == expected - c.vocab_size * c.n_embd - c.block_size * c.n_embd
    untied = tiny(tie_embeddings=False)
    assert untied.num_parameters() == expected + c.vocab_size * c.n_embd


def test_flops_per_token_follows_palm_estimate():
    model = tiny()
    c = model.config
    n = model.num_parameters(non_embedding=True) + c.vocab_size * c.n_embd
    assert model.flops_per_token() == 3 * (2 * n + 4 * c.n_layer * c.block_size * c.n_embd)
    assert model.flops_per_token(training=False) == model.flops_per_token() / 3


def test_gpt2_scaled_initialisation():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=1000, block_size=64, n_layer=8, n_head=4, n_embd=256))
    residual = torch.cat([b.attn.o_proj.weight.flatten() for b in model.blocks])
    other = torch.cat([b.attn.qkv_proj.weight.flatten() for b in model.blocks])
    assert other.std().item() == pytest.approx(0.02, rel=0.05)
    assert residual.std().item() == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)
    assert all(b.attn.qkv_proj.bias.abs().sum() == 0 for b in model.blocks)


def test_bf16_autocast_on_cpu_stays_close_to_fp32():
    model = tiny("rope")
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        reference = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids).float()
    assert (low - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_math_attention_equals_scaled_dot_product_attention(heads):
    from lmforge.models.decoder import math_attention, padding_mask

    n_head, n_kv = heads
    q = torch.randn(2, n_head, 10, 8)
    k, v = torch.randn(2, n_kv, 10, 8), torch.randn(2, n_kv, 10, 8)
    gqa = n_head != n_kv
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    assert_close(math_attention(q, k, v, None, True, 0.0), expected, atol=1e-5, rtol=1e-5)
    real = torch.ones(2, 10, dtype=torch.bool)
    real[0, :3] = False
    mask = padding_mask(real, 10)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    assert_close(math_attention(q, k, v, mask, False, 0.0), expected, atol=1e-5, rtol=1e-5)


def test_bf16_training_step_on_cpu_uses_math_attention_and_matches_fp32():
    model = tiny("rope")
    model.train()
    ids = torch.randint(0, 50, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids).float()
    model.eval()
    with torch.no_grad():
        reference = model(ids)
    assert (low - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_single_query_attention_equals_fp32_attention_on_bf16_inputs(heads):
    from lmforge.models.decoder import single_query_attention

    n_head, n_kv = heads
    q = torch.randn(3, n_head, 1, 8).bfloat16()
    k, v = torch.randn(3, n_kv, 12, 8).bfloat16(), torch.randn(3, n_kv, 12, 8).bfloat16()
    mask = (torch.arange(12)[None, :] < torch.tensor([12, 5, 9])[:, None])[:, None, None, :]  # (3, 1, 1, 12)
    gqa = n_head != n_kv
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in an evaluation under autocast
        got = single_query_attention(q, k, v, mask, gqa)
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                                enable_gqa=gqa)
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), expected, atol=1e-2, rtol=1e-2)
    assert not torch.equal(got[1], single_query_attention(q, k, v, None, gqa)[1])  # the mask is honoured


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("path", ["single_query_attention", "decode_attention"])
def test_bf16_decoding_through_fp32_attention_equals_the_full_forward(position, path, monkeypatch):
    """Both fp32 decoding paths for bf16 models: torch's kernel on upcast copies, and the C kernel."""
    from lmforge.models import decoder

    calls = []
    original = getattr(decoder, path)
    if path == "single_query_attention":
        monkeypatch.setattr(decoder, "kernel_available", lambda dtype: False)
        monkeypatch.setattr(decoder, "UPCAST_KEYS", 0)  # every decoding step takes the upcast path
    elif not decoder.kernel_available(torch.bfloat16):
        pytest.skip("no C compiler for the native kernel")
    monkeypatch.setattr(decoder, path, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    model = tiny(position).to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(ids).float()
        cache = KVCache.empty(model.config, 2, 24, torch.device("cpu"), torch.bfloat16)
        steps = [model(ids[:, :8], cache=cache)[:, -1]]
        steps += [model(ids[:, t:t + 1], cache=cache)[:, -1] for t in range(8, 12)]
    assert len(calls) == 4 * model.config.n_layer
    assert_close(torch.stack(steps[1:], 1).float(), full[:, 8:12], atol=0.05 * full.abs().max().item(), rtol=0)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_batch_one_bf16_decoding_takes_torch_kernels_with_the_same_logits(position, monkeypatch):
    """Single-token bf16 passes run without oneDNN (see ``single_token_kernels``); prefill keeps it,
    and the logits are those of the oneDNN kernels."""
    import contextlib

    from lmforge.models import decoder

    model = tiny(position).to(torch.bfloat16)
    onednn = []
    model.lm_head.register_forward_pre_hook(lambda module, args: onednn.append(torch.backends.mkldnn.enabled))
    ids = torch.randint(0, 50, (1, 12))

    def decode() -> torch.Tensor:
        cache = KVCache.empty(model.config, 1, 24, torch.device("cpu"), torch.bfloat16)
        model(ids[:, :8], cache=cache)
        return torch.stack([model(ids[:, t:t + 1], cache=cache)[:, -1] for t in range(8, 12)]).float()

    with torch.no_grad():
        switched = decode()
        monkeypatch.setattr(decoder, "single_token_kernels", lambda *args: contextlib.nullcontext())
        plain = decode()
    assert onednn[:5] == [True, False, False, False, False]
    assert torch.backends.mkldnn.enabled
    assert_close(switched, plain, atol=0.02 * plain.abs().max().item(), rtol=0)
