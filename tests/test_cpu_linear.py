"""The C small-batch bf16 linear kernel against torch, and :class:`lmforge.models.cpu_linear.Linear`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig, SamplingConfig
from lmforge.inference.engine import Engine
from lmforge.models import cpu_linear, native
from lmforge.models.cpu_linear import MAX_ROWS, Linear, kernel_available, linear
from lmforge.models.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="no C compiler or no AVX512-BF16 on this CPU")


def rounded_reference(x, weight, bias):
    """x W^T + b computed in fp64 from the bf16 inputs, then rounded once to bf16."""
    out = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    return out.to(torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 31, 64])
@pytest.mark.parametrize("out_features,in_features", [(768, 256), (100, 37), (7, 1030), (6, 32), (1, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_a_rounded_exact_product(rows, out_features, in_features, with_bias):
    """Every output is the exact product summed in fp32 and rounded once: within one bf16 step of the
    fp64 result (fp32 sums of exact bf16 products), as torch's own kernels are."""
    torch.manual_seed(rows * 1000 + out_features + in_features)
    x = torch.randn(rows, in_features).bfloat16()
    weight = torch.randn(out_features, in_features).bfloat16()
    bias = torch.randn(out_features).bfloat16() if with_bias else None
    out = linear(x, weight, bias)
    assert out.shape == (rows, out_features) and out.dtype == torch.bfloat16 and out.is_contiguous()
    expected = rounded_reference(x, weight, bias).float()
    step = expected.abs().clamp_min(1e-3) * 2 ** -7  # one bf16 step (8 significant bits) at that size
    assert ((out.float() - expected).abs() <= step + 1e-4 * in_features ** 0.5).all()
    torch_out = F.linear(x, weight, bias).float()
    assert (out.float() - torch_out).abs().max() <= 2 * step.max()


@needs_kernel
def test_a_row_is_bit_identical_alone_or_in_any_batch():
    torch.manual_seed(0)
    weight, bias = torch.randn(300, 200).bfloat16(), torch.randn(300).bfloat16()
    batch = torch.randn(37, 200).bfloat16()
    together = linear(batch, weight, bias)
    for row in (0, 3, 4, 17, 36):
        assert torch.equal(linear(batch[row:row + 1], weight, bias), together[row:row + 1])
        assert torch.equal(linear(batch[row:row + 5], weight, bias)[0], together[row])


@needs_kernel
def test_takes_strided_rows_and_leading_dimensions():
    torch.manual_seed(1)
    weight = torch.randn(64, 48).bfloat16()
    states = torch.randn(3, 7, 48).bfloat16()
    last = states[:, -1:]  # (3, 1, 48), rows 7 * 48 apart
    out = linear(last, weight)
    assert out.shape == (3, 1, 64)
    assert torch.equal(out, linear(last.contiguous(), weight))


@needs_kernel
def test_refuses_inputs_it_cannot_read():
    weight = torch.randn(8, 16).bfloat16()
    with pytest.raises(ValueError, match="bf16"):
        linear(torch.randn(2, 16), weight)  # fp32 rows
    with pytest.raises(ValueError, match="contiguous"):
        linear(torch.randn(2, 16).bfloat16(), torch.randn(16, 8).bfloat16().T)  # transposed weight


@needs_kernel
def test_the_module_runs_the_kernel_only_for_small_bf16_batches_without_gradients(monkeypatch):
    calls = []
    real = cpu_linear.linear
    monkeypatch.setattr(cpu_linear, "linear", lambda x, *a: calls.append(x.shape) or real(x, *a))
    layer = Linear(32, 16).bfloat16()
    plain = nn.Linear(32, 16).bfloat16()
    plain.load_state_dict(layer.state_dict())  # the same parameters and state dict as nn.Linear
    x = torch.randn(4, 32).bfloat16()
    with torch.no_grad():
        out = layer(x)
        assert calls == [(4, 32)]
        assert torch.allclose(out.float(), plain(x).float(), atol=0.05)
        layer(torch.randn(MAX_ROWS + 1, 32).bfloat16())  # too many rows: torch
        layer.float()(torch.randn(4, 32))  # fp32: torch
    assert len(calls) == 1
    layer.bfloat16()
    layer(x).sum().backward()  # with gradients: torch's kernels, which autograd can differentiate
    assert len(calls) == 1 and layer.weight.grad is not None


@needs_kernel
def test_decoding_through_the_kernel_gives_torchs_tokens(monkeypatch):
    """A bf16 model's greedy tokens in the batched engine are those with torch's kernels."""
    torch.manual_seed(0)
    config = ModelConfig.from_dict({"preset": "gpt2-tiny", "vocab_size": 64, "block_size": 64, "n_embd": 64})
    model = DecoderLM(config).bfloat16().eval()
    tokenizer = Tokenizer.train(["The quick brown fox jumps over the lazy dog."], kind="char")
    prompts = [[3, 4, 5, 6, 7], [9, 8, 7], [11, 12, 13, 14, 15, 16, 17]]

    def tokens():
        engine = Engine(model, tokenizer, max_batch_size=4, prefix_cache_tokens=0)
        handles = [engine.submit(p, SamplingConfig(max_new_tokens=12, temperature=0, ignore_eos=True))
                   for p in prompts]
        engine.run_until_idle()
        return [h.result().token_ids for h in handles]

    calls = []
    real = cpu_linear.linear
    monkeypatch.setattr(cpu_linear, "linear", lambda x, *a: calls.append(x.shape) or real(x, *a))
    native_tokens = tokens()
    assert calls  # the engine's steps went through the kernel
    monkeypatch.setattr(cpu_linear, "MAX_ROWS", 0)
    calls.clear()
    assert tokens() == native_tokens and not calls


@needs_kernel
def test_a_decoding_step_runs_torchs_own_operations_on_one_thread():
    """Inside a small bf16 decoding step torch's ops take one thread and the kernels keep torch's count."""
    weight = torch.zeros(8, 4, dtype=torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            with cpu_linear.decoding_step(torch.zeros(5, 1, dtype=torch.long), weight):
                assert torch.get_num_threads() == 1 and native.kernel_threads() == 2
            assert torch.get_num_threads() == 2 and native.kernel_threads() == 2
            for tokens, w in ((torch.zeros(5, 3, dtype=torch.long), weight),  # a prefill
                              (torch.zeros(MAX_ROWS + 1, 1, dtype=torch.long), weight),  # too many rows
                              (torch.zeros(5, 1, dtype=torch.long), weight.float())):  # fp32: torch's products
                with cpu_linear.decoding_step(tokens, w):
                    assert torch.get_num_threads() == 2
        with cpu_linear.decoding_step(torch.zeros(5, 1, dtype=torch.long), weight):  # with gradients
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_without_a_compiler_the_module_takes_torchs_kernels(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    native.load.cache_clear()
    cpu_linear._library.cache_clear()
    try:
        assert not kernel_available()
        layer = Linear(16, 8).bfloat16()
        x = torch.randn(2, 16).bfloat16()
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    finally:
        native.load.cache_clear()
        cpu_linear._library.cache_clear()
    assert not (tmp_path / "cache").exists()
