"""The C decoding-attention kernel against torch's attention, and the models' use of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig, SamplingConfig
from lmforge.inference.engine import Engine
from lmforge.inference.generate import TokenGenerator
from lmforge.models import cpu_attention, native
from lmforge.models.cpu_attention import decode_attention, kernel_available
from lmforge.models.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(not kernel_available(torch.float32), reason="no C compiler for the native kernel")


def reference(q, keys, values, lengths):
    """torch's attention of each row alone over its own positions, in fp32: (B, 1, H * D)."""
    rows = []
    for b, n in enumerate(lengths.tolist()):
        k, v = keys[b:b + 1, :, :n].float(), values[b:b + 1, :, :n].float()
        rows.append(F.scaled_dot_product_attention(q[b:b + 1].float(), k, v, enable_gqa=k.shape[1] != q.shape[1]))
    return torch.cat(rows).transpose(1, 2).reshape(len(rows), 1, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 8, 32), (4, 2, 64), (6, 3, 24), (2, 1, 128)])
def test_matches_torch_attention_over_each_rows_own_positions(dtype, heads, kv_heads, dim):
    torch.manual_seed(0)
    B, S = 5, 40
    keys, values = torch.randn(7, kv_heads, S, dim, dtype=dtype), torch.randn(7, kv_heads, S, dim, dtype=dtype)
    qkv = torch.randn(B, 1, 3 * heads, dim, dtype=dtype).transpose(1, 2)  # strided, as the model's
    q = qkv[:, :heads]
    lengths = torch.tensor([1, 40, 17, 33, 2])
    out = decode_attention(q, keys, values, lengths)
    assert out.shape == (B, 1, heads * dim) and out.dtype == dtype and out.is_contiguous()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), reference(q, keys, values, lengths), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_keys_and_values_are_stored_at_each_rows_last_position(dtype):
    torch.manual_seed(2)
    keys, values = torch.randn(3, 2, 16, 32, dtype=dtype), torch.randn(3, 2, 16, 32, dtype=dtype)
    qkv = torch.randn(3, 1, 8, 32, dtype=dtype).transpose(1, 2)  # (B, 4 + 2 + 2, 1, D) as the model's
    q, k, v = qkv.split([4, 2, 2], dim=1)
    lengths = torch.tensor([5, 16, 1])
    stored_keys, stored_values = keys.clone(), values.clone()
    for b, n in enumerate(lengths.tolist()):
        stored_keys[b, :, n - 1], stored_values[b, :, n - 1] = k[b, :, 0], v[b, :, 0]
    expected = decode_attention(q, stored_keys, stored_values, lengths)
    got = decode_attention(q, keys, values, lengths, new=(k.contiguous(), v))  # any strides
    assert torch.equal(got, expected)
    assert torch.equal(keys, stored_keys) and torch.equal(values, stored_values)


def test_a_rows_result_does_not_depend_on_the_batch():
    torch.manual_seed(1)
    keys, values = torch.randn(4, 2, 64, 32).bfloat16(), torch.randn(4, 2, 64, 32).bfloat16()
    q = torch.randn(4, 2, 1, 32).bfloat16()
    together = decode_attention(q, keys, values, torch.tensor([10, 64, 30, 5]))
    alone = decode_attention(q[2:3], keys[2:], values[2:], torch.tensor([30]))
    assert torch.equal(together[2], alone[0])
    stale = keys.clone()
    stale[2, :, 30:] = float("nan")  # positions past a row's length are never read
    assert torch.equal(decode_attention(q[2:3], stale[2:], values[2:], torch.tensor([30])), alone)


def test_refuses_caches_it_cannot_read():
    q, keys = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="contiguous"):
        decode_attention(q, keys.transpose(2, 3).contiguous().transpose(2, 3), keys, torch.tensor([8]))
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(q, keys.bfloat16(), keys.bfloat16(), torch.tensor([8]))


def tiny_model(dtype):
    torch.manual_seed(0)
    config = ModelConfig.from_dict({"preset": "llama-tiny", "vocab_size": 97, "n_head": 4, "n_kv_head": 2})
    model = DecoderLM(config).eval()
    with torch.no_grad():  # large random weights, so that greedy outputs vary
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 1)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_with_the_kernel_matches_torchs_attention(monkeypatch, dtype):
    """Greedy decoding of a GQA model: the same tokens with the kernel as with torch's attention."""
    model = tiny_model(dtype)
    def greedy_tokens():
        steps = TokenGenerator(model, [[5, 17, 42, 8, 3]], SamplingConfig(max_new_tokens=30, temperature=0), None)
        return [int(ids[0]) for ids in steps]

    native = greedy_tokens()
    monkeypatch.setattr("lmforge.models.decoder.kernel_available", lambda dtype: False)
    assert greedy_tokens() == native and len(set(native)) > 3


def test_the_engine_decodes_through_the_kernel(monkeypatch):
    """Every decoding step of a batched engine goes through the kernel (prefills do not)."""
    model = tiny_model(torch.bfloat16)
    calls = []
    real = cpu_attention.decode_attention
    monkeypatch.setattr("lmforge.models.decoder.decode_attention",
                        lambda q, *args, **kw: calls.append(q.shape[0]) or real(q, *args, **kw))
    tokenizer = Tokenizer.train(["The quick brown fox jumps over the lazy dog."], kind="char")
    engine = Engine(model, tokenizer, max_batch_size=4, prefix_cache_tokens=0)
    handles = [engine.submit(list(range(3, 7 + i * 3)), SamplingConfig(max_new_tokens=6, temperature=0,
                                                                      ignore_eos=True)) for i in range(3)]
    engine.run_until_idle()
    assert all(len(h.result().token_ids) == 6 for h in handles)
    assert calls and set(calls) == {3} and len(calls) == 5 * model.config.n_layer


def _clear_caches():
    native.load.cache_clear()
    cpu_attention._library.cache_clear()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("LMFORGE_NATIVE_KERNELS", "0")
    _clear_caches()
    try:
        assert not kernel_available(torch.float32)
    finally:
        monkeypatch.delenv("LMFORGE_NATIVE_KERNELS")
        _clear_caches()
    assert kernel_available(torch.float32)


def test_without_a_compiler_decoding_takes_torchs_kernels(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))  # nothing compiled there yet
    _clear_caches()
    try:
        assert not kernel_available(torch.bfloat16)
        sampling = SamplingConfig(max_new_tokens=5, temperature=0)
        steps = TokenGenerator(tiny_model(torch.bfloat16), [[5, 17, 42]], sampling, None)
        assert len(list(steps)) == 5
    finally:
        _clear_caches()
    assert not (tmp_path / "cache").exists()


def test_never_writes_outside_the_cache():
    keys, values = torch.zeros(2, 1, 4, 32), torch.zeros(2, 1, 4, 32)
    q, new = torch.randn(2, 1, 1, 32), torch.ones(2, 1, 1, 32)
    decode_attention(q, keys, values, torch.tensor([5, 4]), new=(new, new))  # row 0's position 4 is past S = 4
    assert keys[0].sum() == 0  # not written (its position 4 would be row 1's position 0)
    assert keys[1, 0, :3].sum() == 0 and torch.equal(keys[1, 0, 3], torch.ones(32))
