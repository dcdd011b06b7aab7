"""GGUF export (lmforge.interop.gguf): the file read back with gguf's reader, the RoPE row permutation, and
llama.cpp (llama-cpp-python) running the file with lmforge's tokens, logits and greedy generation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import processors
from torch.testing import assert_close

from lmforge.api import LanguageModel
from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.interop.gguf import export_gguf, gguf_name, interleave_rope_rows
from lmforge.models.decoder import DecoderLM, apply_rope, rope_tables
from lmforge.tokenizer import BOS, Tokenizer
from lmforge.training.checkpoint import save_checkpoint

gguf = pytest.importorskip("gguf")

LINES = [
    "The quick brown fox jumps over the lazy dog. Hello, world!",
    "Grüße aus München: Äpfel, Öl und Übermut für die Straße.",
    "你好，世界。我们今天学习语言模型。",
    "مرحبا بالعالم، هذا نص عربي قصير.",
    "Emoji 😀🎉👍 and symbols: ©®™ €42 ±1.",
    "def add(x, y):\n\treturn x + y  # code\n\nprint(add(1, 2))",
]
TEXTS = [
    "Hello wörld! Grüße, Übermaß & Öl.\n你好，语言模型。\tمرحبا بالعالم 😀🎉\n"
    "def f(x):\n\treturn {x: [1, 2]}  # ÄÖÜ ß\r\n  trailing  ",
    "  leading\n\n\n  x   y\t\t z 12345 ²³ 三 ٣٤ I'm you'll WE'LL it's",
    "a <|eos|> b <|bos|> c <|pad|>",  # special-token text stays literal in both
    " ",
    "",
]
PROMPT = "Grüße 你好 def"
CHAT_TEMPLATE = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"

CONTROL, NORMAL, UNUSED = 3, 1, 5  # llama.cpp token types

FLAVOURS = {
    # row lengths: 64 everywhere except ffn_down (72, not a multiple of 32 -> f16 in a q8_0 file)
    "gqa-untied": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=72, tie_embeddings=False,
                       rope_theta=25000.0, norm_eps=1e-6, block_size=64),
    "mqa-tied": dict(n_layer=1, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64, tie_embeddings=True,
                     rope_theta=10000.0, norm_eps=1e-5, block_size=48),
}
LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False)
# weight scale: a one-layer tied model needs larger weights than ~0.1 to do more than repeat a token
SCALE = {"gqa-untied": 0.1, "mqa-tied": 0.3}


def train_tokenizer(kind: str = "bpe", vocab_size: int | None = 300) -> Tokenizer:
    return Tokenizer.train(LINES * 4, kind=kind, vocab_size=vocab_size)


def padded_vocab(tok: Tokenizer) -> int:
    """A model vocabulary larger than the tokenizer's (and odd), so the GGUF vocabulary is padded."""
    return (tok.vocab_size + 8) | 1


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Weights ~ N(0, scale); norm weights around 1, so that logits are far from trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if is_norm else 0.0))


def make_checkpoint(path: Path, tok: Tokenizer, seed: int = 0, scale: float = 0.1,
                    **knobs) -> tuple[Path, DecoderLM]:
    config = ModelConfig(vocab_size=padded_vocab(tok), **{**LLAMA, **knobs})
    model = DecoderLM(config).eval()
    randomize(model, seed, scale)
    return save_checkpoint(path, model, tok), model


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tokenizer()


@pytest.fixture(scope="module")
def checkpoints(bpe, tmp_path_factory) -> dict[str, tuple[Path, DecoderLM]]:
    root = tmp_path_factory.mktemp("gguf-ckpt")
    return {name: make_checkpoint(root / name, bpe, seed=i + 1, scale=SCALE[name], **knobs)
            for i, (name, knobs) in enumerate(FLAVOURS.items())}


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """export(flavour, dtype) -> the GGUF file, written once per module."""
    root = tmp_path_factory.mktemp("gguf-out")
    cache: dict[tuple[str, str], Path] = {}

    def export(flavour: str, dtype: str) -> Path:
        if (flavour, dtype) not in cache:
            out = root / f"{flavour}-{dtype}.gguf"
            assert export_gguf(checkpoints[flavour][0], out, dtype=dtype) == out
            cache[flavour, dtype] = out
        return cache[flavour, dtype]

    return export


def value(reader, key: str):
    field = reader.get_field(key)
    assert field is not None, f"GGUF metadata lacks {key}"
    return field.contents()


def pair_order(n_head: int, head_dim: int) -> list[int]:
    """Row order of llama.cpp's interleaved-pair RoPE: within each head, rows j and j + D/2 side by side."""
    half = head_dim // 2
    return [h * head_dim + j + s * half for h in range(n_head) for j in range(half) for s in (0, 1)]


def expected_tensors(model: DecoderLM) -> dict[str, torch.Tensor]:
    """llama.cpp's tensors, built from the lmforge modules directly (not through the exporter's tables)."""
    c = model.config
    D, inner = c.head_dim, c.intermediate_size
    out = {"token_embd.weight": model.tok_emb.weight, "output_norm.weight": model.norm.weight}
    if not c.tie_embeddings:
        out["output.weight"] = model.lm_head.weight
    for i, block in enumerate(model.blocks):
        q, k, v = block.attn.qkv_proj.weight.split([c.n_head * D, c.n_kv_head * D, c.n_kv_head * D])
        gate, up = block.mlp.gate_up_proj.weight.split([inner, inner])
        out.update({
            f"blk.{i}.attn_norm.weight": block.norm1.weight, f"blk.{i}.ffn_norm.weight": block.norm2.weight,
            f"blk.{i}.attn_q.weight": q[pair_order(c.n_head, D)],
            f"blk.{i}.attn_k.weight": k[pair_order(c.n_kv_head, D)],
            f"blk.{i}.attn_v.weight": v, f"blk.{i}.attn_output.weight": block.attn.o_proj.weight,
            f"blk.{i}.ffn_gate.weight": gate, f"blk.{i}.ffn_up.weight": up,
            f"blk.{i}.ffn_down.weight": block.mlp.down_proj.weight,
        })
    return {name: t.detach().float() for name, t in out.items()}


# ------------------------------------------------------------------------------------------
# 1. The file, read back
# ------------------------------------------------------------------------------------------
def expected_type(tensor: torch.Tensor, dtype: str):
    T = gguf.GGMLQuantizationType
    if dtype == "f32" or tensor.dim() == 1:
        return T.F32
    if dtype == "q8_0" and tensor.shape[-1] % 32 == 0:
        return T.Q8_0
    return T.F16


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tensors_names_shapes_types_and_values(flavour, dtype, checkpoints, exported):
    model = checkpoints[flavour][1]
    reader = gguf.GGUFReader(exported(flavour, dtype))
    expected = expected_tensors(model)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(reader.tensors)  # no name twice
    assert set(tensors) == set(expected)
    n_layer = model.config.n_layer
    assert len([n for n in tensors if n.startswith("blk.")]) == 9 * n_layer
    assert ("output.weight" in tensors) == (not model.config.tie_embeddings)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    assert value(reader, "general.file_type") == file_type

    types = set()
    for name, want in expected.items():
        t = tensors[name]
        assert t.shape.tolist() == list(want.shape)[::-1], name  # ggml order: the row length first
        assert t.n_elements == want.numel(), name
        assert t.tensor_type == expected_type(want, dtype), (name, t.tensor_type)
        types.add(t.tensor_type)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            assert t.data.dtype == np.float32
            assert torch.equal(torch.from_numpy(np.array(t.data)).reshape(want.shape), want), name
        elif t.tensor_type == gguf.GGMLQuantizationType.F16:
            assert t.data.dtype == np.float16
            got = torch.from_numpy(np.array(t.data)).reshape(want.shape)
            assert torch.equal(got, want.half()), name
        else:  # Q8_0: blocks of 32 values sharing one f16 scale amax / 127
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(want.shape)
            blocks = want.reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            error = (got.reshape(-1, 32) - blocks).abs()
            assert (error <= 0.6 * step + 1e-7).all(), name
            assert error.max() > 0  # really quantized
    if dtype == "q8_0":  # ffn_down's rows (72) do not split into blocks of 32
        assert types == {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0,
                         *([gguf.GGMLQuantizationType.F16] if model.config.intermediate_size % 32 else [])}


def tokenizer_merges(tok: Tokenizer) -> list[str]:
    merges = json.loads(tok.hf.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_metadata_and_vocabulary(flavour, bpe, checkpoints, exported):
    checkpoint, model = checkpoints[flavour]
    c = model.config
    reader = gguf.GGUFReader(exported(flavour, "f16"))
    assert value(reader, "general.architecture") == "llama"
    assert value(reader, "general.name") == checkpoint.name
    expected = {
        "llama.context_length": c.block_size, "llama.embedding_length": c.n_embd, "llama.block_count": c.n_layer,
        "llama.feed_forward_length": c.intermediate_size, "llama.attention.head_count": c.n_head,
        "llama.attention.head_count_kv": c.n_kv_head, "llama.rope.dimension_count": c.head_dim,
        "llama.vocab_size": c.vocab_size,
    }
    for key, want in expected.items():
        assert value(reader, key) == want, key
    assert value(reader, "llama.rope.freq_base") == pytest.approx(c.rope_theta)
    assert value(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.norm_eps, rel=1e-6)

    assert value(reader, "tokenizer.ggml.model") == "gpt2"
    assert value(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = value(reader, "tokenizer.ggml.tokens")
    vocab = {i: t for t, i in bpe.hf.get_vocab(with_added_tokens=True).items()}
    assert bpe.vocab_size < c.vocab_size
    assert tokens == [vocab[i] for i in range(bpe.vocab_size)] + \
        [f"[PAD{i}]" for i in range(bpe.vocab_size, c.vocab_size)]
    special = {bpe.bos_id, bpe.eos_id, bpe.pad_id}
    assert value(reader, "tokenizer.ggml.token_type") == \
        [CONTROL if i in special else NORMAL for i in range(bpe.vocab_size)] + \
        [UNUSED] * (c.vocab_size - bpe.vocab_size)
    merges = value(reader, "tokenizer.ggml.merges")
    assert merges == tokenizer_merges(bpe) and len(merges) > 0
    assert value(reader, "tokenizer.ggml.bos_token_id") == bpe.bos_id
    assert value(reader, "tokenizer.ggml.eos_token_id") == bpe.eos_id
    assert value(reader, "tokenizer.ggml.padding_token_id") == bpe.pad_id
    assert reader.get_field("tokenizer.ggml.unknown_token_id") is None  # byte-level BPE has no unknown token
    assert value(reader, "tokenizer.ggml.add_bos_token") is False
    assert value(reader, "tokenizer.ggml.add_eos_token") is False
    assert reader.get_field("tokenizer.chat_template") is None


def test_chat_template_and_bos_flag_are_written(tmp_path):
    tok = train_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.hf.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.bos_id)])
    checkpoint, _ = make_checkpoint(tmp_path / "ckpt", tok, **FLAVOURS["mqa-tied"])
    assert Tokenizer.load(checkpoint).chat_template == CHAT_TEMPLATE
    reader = gguf.GGUFReader(export_gguf(checkpoint, tmp_path / "m.gguf", dtype="f32"))
    assert value(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    assert value(reader, "tokenizer.ggml.add_bos_token") is True


def test_gguf_names():
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    assert gguf_name("model.norm.weight") == "output_norm.weight"
    assert gguf_name("model.layers.11.self_attn.o_proj.weight") == "blk.11.attn_output.weight"
    assert gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"


# ------------------------------------------------------------------------------------------
# 2. The RoPE row permutation
# ------------------------------------------------------------------------------------------
def interleaved_rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """llama.cpp's RoPE on (H, T, D): rotate pairs (x[2j], x[2j+1]) by theta_j = pos * base^(-2j/D)."""
    H, T, D = x.shape
    j = torch.arange(D // 2, dtype=torch.float64)
    theta = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-2 * j / D)  # (T, D/2)
    cos, sin = theta.cos(), theta.sin()
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(H, T, D)


def attention_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (H, T, D) . k (Hkv, T, D) -> (H, T, T), each query head reading its key/value group."""
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    return q @ k.transpose(-2, -1)


@pytest.mark.parametrize("n_head, n_kv_head, n_embd, theta", [(4, 2, 48, 1234.5), (2, 2, 16, 10000.0),
                                                              (6, 1, 96, 500000.0)])
def test_interleaved_rows_give_the_same_attention_scores(n_head, n_kv_head, n_embd, theta):
    config = ModelConfig(vocab_size=10, n_layer=1, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                         rope_theta=theta, **LLAMA)
    D, T = config.head_dim, 11
    g = torch.Generator().manual_seed(n_embd)
    wq = torch.randn(n_head * D, n_embd, generator=g, dtype=torch.float64)
    wk = torch.randn(n_kv_head * D, n_embd, generator=g, dtype=torch.float64)
    x = torch.randn(T, n_embd, generator=g, dtype=torch.float64)

    def heads(w: torch.Tensor) -> torch.Tensor:
        return (x @ w.T).reshape(T, -1, D).transpose(0, 1)  # (heads, T, D)

    cos, sin = (t.double()[None, None] for t in rope_tables(config, T))
    ours = attention_scores(apply_rope(heads(wq)[None], cos, sin)[0], apply_rope(heads(wk)[None], cos, sin)[0])
    pq, pk = interleave_rope_rows(wq, n_head), interleave_rope_rows(wk, n_kv_head)
    theirs = attention_scores(interleaved_rope(heads(pq), theta), interleaved_rope(heads(pk), theta))
    scale = float(ours.abs().max())  # rope_tables' angles are float32: agreement to ~1e-6 relative
    assert_close(theirs, ours, rtol=1e-5, atol=1e-5 * scale)
    # the permutation matters: interleaved RoPE on the original rows gives other scores
    unpermuted = attention_scores(interleaved_rope(heads(wq), theta), interleaved_rope(heads(wk), theta))
    assert not torch.allclose(unpermuted, ours, rtol=1e-2, atol=1e-2 * scale)
    # and it is exactly the row order llama.cpp's converter uses
    rows = torch.arange(n_head * D, dtype=torch.float64)[:, None].expand(-1, 3)
    assert interleave_rope_rows(rows, n_head)[:, 0].long().tolist() == pair_order(n_head, D)
    assert torch.equal(pq, wq[pair_order(n_head, D)])


# ------------------------------------------------------------------------------------------
# 3. llama.cpp runs the file
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_cpp():
    module = pytest.importorskip("llama_cpp")
    # llama.cpp repacks weights for the CPU's fastest kernels ("extra buffer types"); on CPUs with AMX its
    # q8_0 kernel crashes (segmentation fault) on these tiny models. The plain kernels read the file as is.
    bindings = module.llama_cpp  # the ctypes bindings, which Llama() asks for its default parameters
    defaults = bindings.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bindings, "llama_model_default_params", without_repacking)
        yield module


def load_llama(llama_cpp, path: Path, n_ctx: int, **kwargs):
    # f32 keys and values in llama.cpp's cache (its default is f16), so f32 files compare tightly
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kwargs)


def test_llama_cpp_tokenizes_like_lmforge(llama_cpp, bpe, exported):
    llm = load_llama(llama_cpp, exported("gqa-untied", "f32"), 64)
    assert llm.n_vocab() == padded_vocab(bpe)
    assert (llm.token_bos(), llm.token_eos()) == (bpe.bos_id, bpe.eos_id)
    for text in [*TEXTS, *LINES]:
        ids = bpe.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        # this tokenizer does not start texts with bos, and llama.cpp honours that
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text
        assert llm.detokenize(ids).decode() == text


def test_llama_cpp_adds_bos_where_the_tokenizer_does(llama_cpp, tmp_path):
    tok = train_tokenizer()
    tok.hf.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.bos_id)])
    checkpoint, _ = make_checkpoint(tmp_path / "ckpt", tok, **FLAVOURS["mqa-tied"])
    llm = load_llama(llama_cpp, export_gguf(checkpoint, tmp_path / "m.gguf", dtype="f32"), 48)
    lm = LanguageModel.load(checkpoint, device="cpu")
    assert lm.tokenizer.adds_bos
    for text in (PROMPT, LINES[2]):
        expected = lm.encode_prompt(text)[0]
        assert expected[0] == tok.bos_id
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == expected


def scores(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


# Largest error relative to the largest logit, and the error's norm relative to the logits' norm. llama.cpp
# multiplies f16 and q8_0 matrices by activations rounded to the same type. Measured: f32 1.5e-6 / 6.5e-7,
# f16 6.7e-3 / 1.8e-3, q8_0 6.5e-2 / 3.4e-2 (the one-layer tied model with weights ~0.3 is the worse one).
TOLERANCE = {"f32": (1e-5, 1e-5), "f16": (2e-2, 5e-3), "q8_0": (0.15, 0.08)}


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_llama_cpp_logits_match_lmforge(flavour, dtype, llama_cpp, bpe, checkpoints, exported):
    model = checkpoints[flavour][1]
    ids = bpe.encode(TEXTS[0])[:model.config.block_size]
    assert len(ids) > 30
    llm = load_llama(llama_cpp, exported(flavour, dtype), model.config.block_size)
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0]
    scale = float(expected.abs().max())
    assert scale > 1.0  # not trivial logits
    got = scores(llm, ids)
    assert got.shape == expected.shape
    largest, overall = TOLERANCE[dtype]
    assert_close(got, expected, atol=largest * scale, rtol=0)
    assert (got - expected).norm() < overall * expected.norm()
    if dtype == "f32":
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_llama_cpp_greedy_generation_matches_lmforge(flavour, llama_cpp, bpe, checkpoints, exported):
    checkpoint, model = checkpoints[flavour]
    lm = LanguageModel.load(checkpoint, device="cpu")
    completion = lm.complete(PROMPT, max_new_tokens=20, temperature=0, ignore_eos=True)[0]
    assert len(completion.token_ids) == 20

    llm = load_llama(llama_cpp, exported(flavour, "f32"), model.config.block_size)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
    assert prompt == lm.encode_prompt(PROMPT)[0]
    llm.reset()
    llm.eval(prompt)
    generated = []
    for _ in range(20):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(token)
        llm.eval([token])
    assert generated == completion.token_ids
    assert len(set(generated)) > 3  # more than a repeated token


# ------------------------------------------------------------------------------------------
# 4. Errors
# ------------------------------------------------------------------------------------------
def assert_refused(checkpoint: Path, out: Path, match: str, **kwargs) -> None:
    before = set(out.parent.iterdir()) if out.parent.exists() else set()
    with pytest.raises(ConfigError, match=match):
        export_gguf(checkpoint, out, **kwargs)
    assert not out.exists()
    assert (set(out.parent.iterdir()) if out.parent.exists() else set()) == before  # no temporary file left


def test_gpt2_flavoured_model_is_refused(bpe, tmp_path):
    config = ModelConfig(vocab_size=padded_vocab(bpe), block_size=16, n_layer=1, n_head=2, n_embd=16)
    checkpoint = save_checkpoint(tmp_path / "gpt2", DecoderLM(config), bpe)
    assert_refused(checkpoint, tmp_path / "out" / "m.gguf", r"Llama-flavoured.*lmforge export hf")


def test_mixed_knobs_model_is_refused(bpe, tmp_path):
    config = ModelConfig(vocab_size=padded_vocab(bpe), block_size=16, n_layer=1, n_head=2, n_embd=16,
                         position="rope", norm="layernorm", mlp="gelu", bias=False)
    checkpoint = save_checkpoint(tmp_path / "mixed", DecoderLM(config), bpe)
    assert_refused(checkpoint, tmp_path / "m.gguf", r"mixes GPT-2 and Llama knobs")


def test_llama_with_biases_is_refused(bpe, tmp_path):
    checkpoint, _ = make_checkpoint(tmp_path / "bias", bpe, **{**FLAVOURS["mqa-tied"], "bias": True})
    assert_refused(checkpoint, tmp_path / "m.gguf", r"does not handle biases")


def test_char_tokenizer_is_refused(tmp_path):
    tok = train_tokenizer("char", None)
    checkpoint, _ = make_checkpoint(tmp_path / "char", tok, **FLAVOURS["mqa-tied"])
    assert_refused(checkpoint, tmp_path / "m.gguf", r"byte-level BPE tokenizer")


@pytest.mark.parametrize("dtype", ["bf16", "F16", "q4_0", ""])
def test_unknown_dtype_is_refused(dtype, checkpoints, tmp_path):
    assert_refused(checkpoints["mqa-tied"][0], tmp_path / "m.gguf", r"dtype must be one of f32, f16, q8_0",
                   dtype=dtype)


def test_failure_while_writing_leaves_no_file_and_keeps_an_old_one(checkpoints, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    out = tmp_path / "m.gguf"
    with pytest.raises(OSError, match="disk full"):
        export_gguf(checkpoints["mqa-tied"][0], out, dtype="f32")
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"the previous file")
    with pytest.raises(OSError, match="disk full"):
        export_gguf(checkpoints["mqa-tied"][0], out, dtype="f32")
    assert out.read_bytes() == b"the previous file"
    assert list(tmp_path.iterdir()) == [out]
