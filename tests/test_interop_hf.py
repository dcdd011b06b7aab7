"""Hugging Face interop (lmforge.interop.hf): import, export and round trips against real transformers models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import processors
from torch.testing import assert_close

from lmforge.api import LanguageModel
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.interop.hf import (
    GPT2,
    LLAMA,
    architecture_for,
    export_hf,
    from_hf_state,
    import_hf,
    is_hf_folder,
    load_hf,
    read_hf_tokenizer,
    to_hf_state,
)
from lmforge.models.decoder import DecoderLM
from lmforge.tokenizer import BOS, EOS, PAD, Tokenizer
from lmforge.training.checkpoint import load_model, save_checkpoint, unique_state

transformers = pytest.importorskip("transformers")

LINES = [
    "The quick brown fox jumps over the lazy dog. Hello, world!",
    "Grüße aus München: Äpfel, Öl und Übermut für die Straße.",
    "你好，世界。我们今天学习语言模型。",
    "مرحبا بالعالم، هذا نص عربي قصير.",
    "Emoji 😀🎉👍 and symbols: ©®™ €42 ±1.",
    "def add(x, y):\n\treturn x + y  # code\n\nprint(add(1, 2))",
]
TEXT = ("Hello wörld! Grüße, Übermaß & Öl.\n你好，语言模型。\tمرحبا بالعالم 😀🎉\n"
        "def f(x):\n\treturn {x: [1, 2]}  # ÄÖÜ ß\r\n  trailing  ")
PROMPT = "Grüße 你好 def"
SHORT = "Öl 你好\tمرحبا 😀\n"  # fits a 64-token context


def train_tokenizer(kind: str = "bpe", vocab_size: int | None = 300) -> Tokenizer:
    return Tokenizer.train(LINES * 4, kind=kind, vocab_size=vocab_size)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tokenizer("bpe")


def odd_vocab(tok: Tokenizer) -> int:
    """A model vocabulary a bit larger than the tokenizer's, and odd."""
    return (tok.vocab_size + 8) | 1


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere; norm weights around 1 (lmforge's and Hugging Face's norm names)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = any(n in name for n in ("norm", "ln_")) and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if is_norm_weight else 0.0))


def save_hf_tokenizer(tok: Tokenizer, folder: Path) -> None:
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf, bos_token=BOS, eos_token=EOS,
                                         pad_token=PAD).save_pretrained(folder)


# ------------------------------------------------------------------------------------------
# Hugging Face models with random weights
# ------------------------------------------------------------------------------------------
GPT2_CASES = {
    "gpt2-tied-gelu_new": dict(n_layer=2, n_embd=32, n_head=2, activation_function="gelu_new",
                               tie_word_embeddings=True),
    "gpt2-untied-gelu-48x3": dict(n_layer=3, n_embd=48, n_head=3, activation_function="gelu",
                                  tie_word_embeddings=False),
    "gpt2-odd-inner-tanh": dict(n_layer=1, n_embd=24, n_head=4, n_inner=50,
                                activation_function="gelu_pytorch_tanh", tie_word_embeddings=False,
                                layer_norm_epsilon=1e-4),
}
LLAMA_CASES = {
    "llama-gqa-odd-mlp-theta": dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=6,
                                    num_key_value_heads=2, intermediate_size=37, rope_theta=50000.0),
    "llama-tied-mqa": dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=40, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama-biases": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=45, attention_bias=True, mlp_bias=True, rope_theta=1234.5),
}


def hf_gpt2(tok: Tokenizer, seed: int = 0, **knobs):
    config = transformers.GPT2Config(
        vocab_size=odd_vocab(tok), n_positions=64, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id, **knobs)
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize(model, seed)
    return model


def hf_llama(tok: Tokenizer, seed: int = 0, **knobs):
    config = transformers.LlamaConfig(
        vocab_size=odd_vocab(tok), max_position_embeddings=64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id, **{"tie_word_embeddings": False, **knobs})
    model = transformers.LlamaForCausalLM(config).eval()
    randomize(model, seed)
    return model


def make_hf(case: str, tok: Tokenizer, seed: int = 0):
    if case in GPT2_CASES:
        return hf_gpt2(tok, seed, **GPT2_CASES[case])
    return hf_llama(tok, seed, **LLAMA_CASES[case])


def hf_folder(folder: Path, model, tok: Tokenizer, **save_kwargs) -> Path:
    model.save_pretrained(folder, **save_kwargs)
    save_hf_tokenizer(tok, folder)
    return folder


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def lm_logits(lm: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(ids)


def random_ids(model, batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)


def assert_same_logits(lm: LanguageModel, model) -> None:
    ids = random_ids(model)
    assert_close(lm_logits(lm, ids), hf_logits(model, ids), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# 1. Import parity
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [*GPT2_CASES, *LLAMA_CASES])
def test_import_matches_transformers_logits_and_greedy_generation(case, bpe, tmp_path):
    model = make_hf(case, bpe, seed=len(case))
    folder = hf_folder(tmp_path / "hf", model, bpe)
    assert is_hf_folder(folder)
    out = import_hf(folder, tmp_path / "imported")
    assert out == tmp_path / "imported"
    info = json.loads((out / "config.json").read_text())
    expected_class = "GPT2LMHeadModel" if case in GPT2_CASES else "LlamaForCausalLM"
    assert info["imported_from"]["architecture"] == expected_class
    assert not is_hf_folder(out)  # an lmforge checkpoint, not a Hugging Face folder

    imported = LanguageModel.load(out, device="cpu")
    direct = LanguageModel.load(folder, device="cpu")
    prompt_ids = imported.encode_prompt(PROMPT)[0]
    assert prompt_ids == bpe.encode(PROMPT) and not imported.tokenizer.adds_bos

    # Greedy decoding. eos is unset for Hugging Face so that min_new_tokens suppresses nothing:
    # lmforge with ignore_eos keeps eos a candidate, so both pick from the same logits.
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                  attention_mask=torch.ones_like(ids), pad_token_id=bpe.pad_id)
    expected = expected[0, len(prompt_ids):].tolist()
    assert len(expected) == 20

    for lm in (imported, direct):
        assert lm.model.config.vocab_size == odd_vocab(bpe)
        assert lm.tokenizer.encode(TEXT) == bpe.encode(TEXT)
        assert_same_logits(lm, model)
        got = lm.complete(PROMPT, max_new_tokens=20, temperature=0, ignore_eos=True)[0]
        assert got.token_ids == expected
        assert got.prompt_tokens == len(prompt_ids)


@pytest.mark.parametrize("case", ["gpt2-tied-gelu_new", "llama-gqa-odd-mlp-theta"])
def test_load_hf_converts_in_memory(case, bpe, tmp_path):
    model = make_hf(case, bpe, seed=5)
    folder = hf_folder(tmp_path / "hf", model, bpe)
    ours, tok, info = load_hf(folder)
    assert not ours.training
    assert tok.encode(TEXT) == bpe.encode(TEXT)
    assert info["imported_from"]["format"] == "huggingface"
    assert Path(info["imported_from"]["path"]) == folder.resolve()
    ids = random_ids(model, seed=1)
    with torch.no_grad():
        assert_close(ours(ids), hf_logits(model, ids), atol=1e-5, rtol=1e-5)
    config = ours.config
    if case.startswith("gpt2"):
        assert (config.position, config.norm, config.mlp, config.tie_embeddings) == \
            ("learned", "layernorm", "gelu_tanh", True)
        assert ours.lm_head.weight is ours.tok_emb.weight
    else:
        assert (config.position, config.norm, config.mlp, config.n_head, config.n_kv_head) == \
            ("rope", "rmsnorm", "swiglu", 6, 2)
        assert config.rope_theta == 50000.0 and config.intermediate_size == 37 and config.block_size == 64


def test_hf_state_names_match_transformers_state_dict(bpe):
    for case in [*GPT2_CASES, *LLAMA_CASES]:
        hf = make_hf(case, bpe)
        ours, _, _ = _convert_in_memory(hf)
        names = set(to_hf_state(unique_state(ours), ours.config, architecture_for(ours.config)))
        expected = set(hf.state_dict()) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
        assert names == expected, case


def _convert_in_memory(hf):
    """An lmforge model from a transformers model through from_hf_state (no files)."""
    state = hf.state_dict()
    arch = GPT2 if hf.config.model_type == "gpt2" else LLAMA
    config = arch.read_config(hf.config.to_dict())
    converted = from_hf_state(state.__getitem__, set(state), config, arch)
    model = DecoderLM(config).eval()
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if config.tie_embeddings else [])
    return model, config, converted


# ------------------------------------------------------------------------------------------
# lmforge models with random weights
# ------------------------------------------------------------------------------------------
FLAVOURS = {
    "gpt2-gelu-tied": dict(n_layer=2, n_head=2, n_embd=32, mlp="gelu", tie_embeddings=True),
    "gpt2-gelu_tanh-untied": dict(n_layer=3, n_head=3, n_embd=48, mlp="gelu_tanh", tie_embeddings=False,
                                  intermediate_size=70, norm_eps=1e-4),
    "llama-gqa": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, position="rope", norm="rmsnorm", mlp="swiglu",
                      bias=False, tie_embeddings=False, intermediate_size=43, rope_theta=25000.0, norm_eps=1e-6),
    "llama-tied-mqa": dict(n_layer=1, n_head=4, n_kv_head=1, n_embd=16, position="rope", norm="rmsnorm",
                           mlp="swiglu", bias=False, tie_embeddings=True),
    "llama-bias-untied": dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=24, position="rope", norm="rmsnorm",
                              mlp="swiglu", bias=True, tie_embeddings=False, intermediate_size=31),
}


def lmforge_checkpoint(path: Path, flavour: str, tok: Tokenizer, seed: int = 0) -> Path:
    config = ModelConfig(vocab_size=odd_vocab(tok), block_size=40, **FLAVOURS[flavour])
    model = DecoderLM(config).eval()
    randomize(model, seed)
    return save_checkpoint(path, model, tok)


# ------------------------------------------------------------------------------------------
# 2. Export parity
# ------------------------------------------------------------------------------------------
EXPORTED_FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json"}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_export_loads_in_transformers_with_equal_logits(flavour, bpe, tmp_path):
    checkpoint = lmforge_checkpoint(tmp_path / "ckpt", flavour, bpe, seed=3)
    out = export_hf(checkpoint, tmp_path / "hf")
    assert out == tmp_path / "hf"
    assert EXPORTED_FILES <= {p.name for p in out.iterdir()}
    assert is_hf_folder(out)

    model, loading = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
    model.eval()
    expected_class = "GPT2LMHeadModel" if flavour.startswith("gpt2") else "LlamaForCausalLM"
    assert type(model).__name__ == expected_class
    assert next(model.parameters()).dtype == torch.float32
    lm = LanguageModel.load(checkpoint, device="cpu")
    ids = random_ids(model, batch=3, length=40, seed=2)
    assert_close(hf_logits(model, ids), lm_logits(lm, ids), atol=1e-5, rtol=1e-5)
    assert model.num_parameters() == lm.model.num_parameters()

    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for role in ("bos", "eos", "pad"):
        assert config[f"{role}_token_id"] == generation[f"{role}_token_id"] == bpe.hf.token_to_id(bpe.special[role])
    assert config["tie_word_embeddings"] == FLAVOURS[flavour]["tie_embeddings"]
    assert json.loads((out / "special_tokens_map.json").read_text()) == {
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD}


def test_export_of_gpt2_greedy_generation_matches_transformers(bpe, tmp_path):
    checkpoint = lmforge_checkpoint(tmp_path / "ckpt", "gpt2-gelu_tanh-untied", bpe, seed=9)
    out = export_hf(checkpoint, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    model.generation_config.eos_token_id = None  # see test_import_matches_transformers_logits_and_greedy_generation
    lm = LanguageModel.load(checkpoint, device="cpu")
    ids = torch.tensor([lm.encode_prompt(PROMPT)[0]])
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                  attention_mask=torch.ones_like(ids), pad_token_id=bpe.pad_id)
    got = lm.complete(PROMPT, max_new_tokens=20, temperature=0, ignore_eos=True)[0].token_ids
    assert got == expected[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_export_in_half_precision(dtype, torch_dtype, bpe, tmp_path):
    checkpoint = lmforge_checkpoint(tmp_path / "ckpt", "llama-gqa", bpe)
    out = export_hf(checkpoint, tmp_path / "hf", dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch_dtype}
    fp32 = load_file(str(export_hf(checkpoint, tmp_path / "hf32") / "model.safetensors"))
    assert set(fp32) == set(weights)
    for name, tensor in fp32.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor.to(torch_dtype), weights[name]), name
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch_dtype


def test_export_rejects_an_unknown_dtype(bpe, tmp_path):
    checkpoint = lmforge_checkpoint(tmp_path / "ckpt", "llama-gqa", bpe)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        export_hf(checkpoint, tmp_path / "hf", dtype="int8")
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------
# 3. Round trip lmforge -> Hugging Face -> lmforge
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_round_trip_is_bit_identical(flavour, bpe, tmp_path):
    checkpoint = lmforge_checkpoint(tmp_path / "ckpt", flavour, bpe, seed=11)
    before, tok_before, _ = load_model(checkpoint)
    export_hf(checkpoint, tmp_path / "hf")
    after, tok_after, info = load_model(import_hf(tmp_path / "hf", tmp_path / "back"))
    assert after.config == before.config
    assert info["imported_from"]["path"] == str((tmp_path / "hf").resolve())
    original, restored = unique_state(before), unique_state(after)
    assert set(original) == set(restored)
    for name, tensor in original.items():
        assert restored[name].dtype == torch.float32
        assert torch.equal(tensor, restored[name]), name
    if before.config.tie_embeddings:
        assert after.lm_head.weight is after.tok_emb.weight
    assert tok_after.hf.to_str() == tok_before.hf.to_str()
    assert tok_after.special == tok_before.special and tok_after.kind == tok_before.kind


def test_hf_state_round_trip_in_memory():
    for flavour in FLAVOURS:
        config = ModelConfig(vocab_size=77, block_size=16, **FLAVOURS[flavour])
        model = DecoderLM(config)
        randomize(model, seed=4)
        arch = architecture_for(config)
        assert arch is (GPT2 if flavour.startswith("gpt2") else LLAMA)
        state = unique_state(model)
        hf_state = to_hf_state(state, config, arch)
        back = from_hf_state(hf_state.__getitem__, set(hf_state), config, arch)
        assert set(back) == set(state), flavour
        assert all(torch.equal(back[k], state[k]) for k in state), flavour


# ------------------------------------------------------------------------------------------
# 4. Tokenizer parity
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_exported_tokenizer_matches_in_transformers(kind, tmp_path):
    tok = train_tokenizer(kind, vocab_size=300 if kind == "bpe" else None)
    checkpoint = lmforge_checkpoint(tmp_path / "ckpt", "gpt2-gelu-tied", tok)
    out = export_hf(checkpoint, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.encode(TEXT)
    assert len(ids) > 20
    if kind == "char":
        assert tok.hf.token_to_id("<|unk|>") in ids  # "ö", "Ö", "\r", ... were never seen in training
        assert hf.unk_token == "<|unk|>"
    assert hf.encode(TEXT, add_special_tokens=False) == ids
    assert hf(TEXT, add_special_tokens=False).input_ids == ids
    assert hf(TEXT).input_ids == ids  # neither adds bos or eos
    assert hf.encode(TEXT) == ids
    assert hf.decode(ids) == tok.decode(ids, skip_special_tokens=False)
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)
    if kind == "bpe":
        assert tok.decode(ids) == TEXT
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, EOS, PAD)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    with_specials = [tok.bos_id, *ids[:5], tok.eos_id]
    assert hf.decode(with_specials, skip_special_tokens=True) == tok.decode(with_specials)
    assert hf.decode(with_specials) == tok.decode(with_specials, skip_special_tokens=False)
    assert len(hf) == tok.vocab_size


def test_chat_template_survives_export(bpe, tmp_path):
    tok = train_tokenizer("bpe")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    checkpoint = lmforge_checkpoint(tmp_path / "ckpt", "llama-gqa", tok)
    out = export_hf(checkpoint, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "system", "content": "Sei kurz."}, {"role": "user", "content": "Grüße! 你好?"}]
    rendered = hf.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|system|>Sei kurz.<|eos|>\n<|user|>Grüße! 你好?<|eos|>\n"
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered + "<|assistant|>"
    # ... and back into lmforge
    back = load_model(import_hf(out, tmp_path / "back"))[1]
    assert back.chat_template == tok.chat_template


# ------------------------------------------------------------------------------------------
# 5. Other layouts
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["gpt2-untied-gelu-48x3", "llama-gqa-odd-mlp-theta"])
def test_sharded_safetensors_import(case, bpe, tmp_path):
    model = make_hf(case, bpe, seed=21)
    folder = hf_folder(tmp_path / "hf", model, bpe, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    lm = LanguageModel.load(import_hf(folder, tmp_path / "imported"), device="cpu")
    assert_same_logits(lm, model)
    assert_same_logits(LanguageModel.load(folder, device="cpu"), model)


@pytest.mark.parametrize("case", ["gpt2-tied-gelu_new", "llama-tied-mqa", "llama-biases"])
def test_pytorch_model_bin_import(case, bpe, tmp_path):
    model = make_hf(case, bpe, seed=22)
    folder = tmp_path / "hf"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    save_hf_tokenizer(bpe, folder)
    assert not list(folder.glob("*.safetensors"))
    lm = LanguageModel.load(import_hf(folder, tmp_path / "imported"), device="cpu")
    assert_same_logits(lm, model)
    assert_same_logits(LanguageModel.load(folder, device="cpu"), model)


def test_sharded_pytorch_model_bin_import(bpe, tmp_path):
    model = make_hf("llama-biases", bpe, seed=26)
    folder = tmp_path / "hf"
    model.config.save_pretrained(folder)
    save_hf_tokenizer(bpe, folder)
    state = model.state_dict()
    weight_map = {}
    for i, names in enumerate((list(state)[::2], list(state)[1::2])):  # interleaved: reads alternate files
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: state[n] for n in names}, folder / file)
        weight_map.update(dict.fromkeys(names, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_logits(LanguageModel.load(folder, device="cpu"), model)


def test_mistral_import(bpe, tmp_path):
    config = transformers.MistralConfig(
        vocab_size=odd_vocab(bpe), hidden_size=32, intermediate_size=41, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=24, tie_word_embeddings=False,
        bos_token_id=bpe.bos_id, eos_token_id=bpe.eos_id)
    model = transformers.MistralForCausalLM(config).eval()
    randomize(model, seed=27)
    folder = hf_folder(tmp_path / "hf", model, bpe)
    lm = LanguageModel.load(import_hf(folder, tmp_path / "imported"), device="cpu")
    assert lm.context_length == 24  # exact up to the sliding window, so the context stops there
    assert_same_logits(lm, model)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_old_hub_gpt2_layout_import(fmt, bpe, tmp_path):
    """GPT-2 as on the Hub: names without "transformer.", causal-mask buffers saved, no lm_head (tied)."""
    model = make_hf("gpt2-tied-gelu_new", bpe, seed=23)
    n = model.config.n_positions
    state = {k.removeprefix("transformer."): v.clone().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert "wte.weight" in state and not any(k.startswith("transformer.") for k in state)
    folder = tmp_path / "hf"
    model.config.save_pretrained(folder)
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, folder / "pytorch_model.bin")
    save_hf_tokenizer(bpe, folder)
    lm = LanguageModel.load(import_hf(folder, tmp_path / "imported"), device="cpu")
    assert_same_logits(lm, model)
    assert_same_logits(LanguageModel.load(folder, device="cpu"), model)


def test_old_hub_gpt2_layout_with_untied_head_import(bpe, tmp_path):
    model = make_hf("gpt2-untied-gelu-48x3", bpe, seed=24)
    state = {k.removeprefix("transformer."): v.clone().contiguous() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in state
    folder = tmp_path / "hf"
    model.config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"))
    save_hf_tokenizer(bpe, folder)
    assert_same_logits(LanguageModel.load(folder, device="cpu"), model)


def test_gpt2_vocab_and_merges_tokenizer_import(bpe, tmp_path):
    model = make_hf("gpt2-tied-gelu_new", bpe, seed=25)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    written = bpe.hf.model.save(str(folder))
    assert {Path(f).name for f in written} == {"vocab.json", "merges.txt"}
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": {"content": EOS, "special": True}, "pad_token": PAD}))
    assert not (folder / "tokenizer.json").exists()

    tok = read_hf_tokenizer(folder)
    assert tok.special == {"bos": BOS, "eos": EOS, "pad": PAD}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)
    assert tok.vocab_size == bpe.vocab_size and not tok.adds_bos
    assert tok.encode(TEXT) == bpe.encode(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT

    lm = LanguageModel.load(import_hf(folder, tmp_path / "imported"), device="cpu")
    assert lm.tokenizer.encode(TEXT) == bpe.encode(TEXT)
    assert lm.tokenizer.encode(f"a {EOS} b") == bpe.encode(f"a {EOS} b")  # special text stays literal
    assert lm.encode_prompt(PROMPT)[0] == bpe.encode(PROMPT)
    assert_same_logits(lm, model)
    # the imported checkpoint has a real tokenizer.json now, which transformers reads the same way
    hf_tok = transformers.AutoTokenizer.from_pretrained(export_hf(tmp_path / "imported", tmp_path / "re"))
    assert hf_tok.encode(TEXT, add_special_tokens=False) == bpe.encode(TEXT)


# ------------------------------------------------------------------------------------------
# 6. A Llama-style tokenizer that starts every text with bos
# ------------------------------------------------------------------------------------------
def test_llama_tokenizer_that_adds_bos(bpe, tmp_path):
    tok = train_tokenizer("bpe")
    bos = tok.bos_id
    tok.hf.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos)])
    model = make_hf("llama-gqa-odd-mlp-theta", tok, seed=31)
    folder = hf_folder(tmp_path / "hf", model, tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    expected = hf_tok("text").input_ids
    assert expected[0] == bos and expected[1:] == tok.encode("text")

    for lm in (LanguageModel.load(import_hf(folder, tmp_path / "imported"), device="cpu"),
               LanguageModel.load(folder, device="cpu")):
        assert lm.tokenizer.adds_bos
        assert lm.tokenizer.start_ids == [bos]
        assert lm.encode_prompt("text")[0] == expected
        assert lm.encode_prompt(SHORT)[0] == hf_tok(SHORT).input_ids
        assert lm.encode_prompt("")[0] == [bos]
        # generation from a bos-prefixed prompt matches transformers too
        prompt = lm.encode_prompt(PROMPT)[0]
        assert prompt[0] == bos
        model.generation_config.eos_token_id = None
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                  attention_mask=torch.ones_like(ids), pad_token_id=tok.pad_id)
        got = lm.complete(PROMPT, max_new_tokens=20, temperature=0, ignore_eos=True)[0].token_ids
        assert got == want[0, len(prompt):].tolist()

    # exported again, transformers still adds bos
    exported = export_hf(tmp_path / "imported", tmp_path / "re")
    assert json.loads((exported / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert transformers.AutoTokenizer.from_pretrained(exported)("text").input_ids == expected


# ------------------------------------------------------------------------------------------
# 7. Errors
# ------------------------------------------------------------------------------------------
@pytest.fixture
def gpt2_folder(bpe, tmp_path) -> Path:
    return hf_folder(tmp_path / "gpt2", make_hf("gpt2-tied-gelu_new", bpe), bpe)


@pytest.fixture
def llama_folder(bpe, tmp_path) -> Path:
    return hf_folder(tmp_path / "llama", make_hf("llama-gqa-odd-mlp-theta", bpe), bpe)


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


def rewrite_weights(folder: Path, change) -> None:
    file = folder / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    change(state)
    save_file(state, str(file), metadata={"format": "pt"})


def test_unsupported_model_type_names_the_supported_ones(gpt2_folder, tmp_path):
    edit_json(gpt2_folder / "config.json", model_type="bert", architectures=["BertForMaskedLM"])
    assert is_hf_folder(gpt2_folder)
    for load in (lambda: import_hf(gpt2_folder, tmp_path / "out"), lambda: LanguageModel.load(gpt2_folder, "cpu")):
        with pytest.raises(CheckpointError) as err:
            load()
        message = str(err.value)
        for part in ("'bert'", "BertForMaskedLM", "not supported", "gpt2", "llama", "GPT2LMHeadModel",
                     "LlamaForCausalLM"):
            assert part in message, message
    assert not (tmp_path / "out").exists()


def test_missing_tensor(gpt2_folder, tmp_path):
    rewrite_weights(gpt2_folder, lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"lack transformer\.h\.1\.mlp\.c_fc\.bias.*blocks\.1\.mlp\.up_proj"):
        import_hf(gpt2_folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_llama_projection(llama_folder, tmp_path):
    rewrite_weights(llama_folder, lambda s: s.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lack model\.layers\.0\.self_attn\.k_proj\.weight"):
        import_hf(llama_folder, tmp_path / "out")


def test_extra_unknown_tensor(gpt2_folder, llama_folder, tmp_path):
    rewrite_weights(gpt2_folder, lambda s: s.update({"transformer.h.0.attn.q_norm.weight": torch.ones(32)}))
    with pytest.raises(CheckpointError, match=r"no place for: transformer\.h\.0\.attn\.q_norm\.weight"):
        import_hf(gpt2_folder, tmp_path / "out")
    rewrite_weights(llama_folder, lambda s: s.update({"model.layers.1.self_attn.q_norm.weight": torch.ones(8)}))
    with pytest.raises(CheckpointError, match=r"gpt2|llama") as err:
        LanguageModel.load(llama_folder, device="cpu")
    assert "model.layers.1.self_attn.q_norm.weight" in str(err.value) and "llama" in str(err.value)


def test_wrongly_shaped_tensor(llama_folder, gpt2_folder, tmp_path):
    rewrite_weights(llama_folder, lambda s: s.update({"model.layers.1.self_attn.o_proj.weight": torch.ones(48, 40)}))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight has shape \(48, 40\).*implies \(48, 48\)"):
        import_hf(llama_folder, tmp_path / "out")
    rewrite_weights(gpt2_folder, lambda s: s.update({"transformer.wpe.weight": torch.ones(32, 32)}))
    with pytest.raises(CheckpointError, match=r"wpe\.weight has shape \(32, 32\).*implies \(64, 32\)"):
        import_hf(gpt2_folder, tmp_path / "out")


def test_wrongly_shaped_part_of_a_fused_tensor_is_named(llama_folder, tmp_path):
    rewrite_weights(llama_folder, lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.ones(36, 48)}))
    with pytest.raises(CheckpointError, match=r"up_proj\.weight has shape \(36, 48\)"):
        import_hf(llama_folder, tmp_path / "out")


def test_wrongly_shaped_parts_with_the_right_total_are_refused(llama_folder, tmp_path):
    """q/k/v sizes 48/16/16 stored as 56/8/16: the fused qkv has the right shape, the split is wrong."""
    def change(state):
        q, k = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
        state["model.layers.0.self_attn.q_proj.weight"] = torch.cat([q, k[:8]])
        state["model.layers.0.self_attn.k_proj.weight"] = k[8:].contiguous()

    rewrite_weights(llama_folder, change)
    with pytest.raises(CheckpointError, match=r"(q|k)_proj\.weight has shape"):
        import_hf(llama_folder, tmp_path / "out")


def test_llama_without_its_untied_head(llama_folder, tmp_path):
    rewrite_weights(llama_folder, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"lack lm_head\.weight"):
        import_hf(llama_folder, tmp_path / "out")


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"type": "linear", "factor": 2.0},
])
def test_rope_scaled_llama_config_v4_style(scaling, llama_folder, tmp_path):
    """transformers 4.x writes rope_scaling beside rope_theta (and no rope_parameters)."""
    edit_json(llama_folder / "config.json", rope_scaling=scaling, rope_theta=500000.0, rope_parameters=None)
    with pytest.raises(CheckpointError, match=r"RoPE scaling '(llama3|linear)' is not supported"):
        import_hf(llama_folder, tmp_path / "out")


def test_rope_scaled_llama_config_v5_style(llama_folder, tmp_path):
    edit_json(llama_folder / "config.json", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    with pytest.raises(CheckpointError, match=r"RoPE scaling 'llama3' is not supported"):
        LanguageModel.load(llama_folder, device="cpu")


def test_plain_rope_theta_v4_style_is_read(llama_folder):
    edit_json(llama_folder / "config.json", rope_theta=777.0, rope_parameters=None)
    model, _, _ = load_hf(llama_folder)
    assert model.config.rope_theta == 777.0


def test_folder_without_weights(gpt2_folder, tmp_path):
    (gpt2_folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no weights"):
        import_hf(gpt2_folder, tmp_path / "out")
    with pytest.raises(CheckpointError, match="holds no weights"):
        LanguageModel.load(gpt2_folder, device="cpu")


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_corrupt_weights_file(name, gpt2_folder, tmp_path):
    (gpt2_folder / "model.safetensors").unlink()
    (gpt2_folder / name).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=f"cannot read .*{name}"):
        import_hf(gpt2_folder, tmp_path / "out")


def test_sharded_index_naming_a_missing_shard(bpe, tmp_path):
    folder = hf_folder(tmp_path / "hf", make_hf("llama-gqa-odd-mlp-theta", bpe), bpe, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1].name} is missing"):
        import_hf(folder, tmp_path / "out")


def test_folder_without_tokenizer(bpe, tmp_path):
    folder = tmp_path / "hf"
    make_hf("gpt2-tied-gelu_new", bpe).save_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json.*vocab\.json and merges\.txt"):
        import_hf(folder, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json"):
        LanguageModel.load(folder, device="cpu")


def test_tokenizer_larger_than_the_model(bpe, tmp_path):
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=bpe.vocab_size - 10, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=None,
        eos_token_id=None))
    folder = hf_folder(tmp_path / "hf", model, bpe)
    with pytest.raises(CheckpointError, match=f"the tokenizer has {bpe.vocab_size} tokens but the model only"):
        import_hf(folder, tmp_path / "out")


@pytest.mark.parametrize("change, message", [
    (dict(activation_function="relu"), "GPT-2 activation 'relu' is not supported"),
    (dict(scale_attn_by_inverse_layer_idx=True), "attention scaling"),
    (dict(n_head=5), "divisible"),
    (dict(vocab_size=None), "lacks 'vocab_size'"),
])
def test_unsupported_gpt2_configs(change, message, gpt2_folder, tmp_path):
    edit_json(gpt2_folder / "config.json", **change)
    with pytest.raises(CheckpointError, match=message):
        import_hf(gpt2_folder, tmp_path / "out")


@pytest.mark.parametrize("change, message", [
    (dict(hidden_act="gelu"), "Llama activation 'gelu' is not supported"),
    (dict(head_dim=16), "head size"),
    (dict(attention_bias=True, mlp_bias=False), "only the attention or only the MLP"),
])
def test_unsupported_llama_configs(change, message, llama_folder, tmp_path):
    edit_json(llama_folder / "config.json", **change)
    with pytest.raises(CheckpointError, match=message):
        import_hf(llama_folder, tmp_path / "out")


@pytest.mark.parametrize("knobs, fragment", [
    (dict(position="rope", norm="layernorm", mlp="gelu", bias=True), "position=rope, norm=layernorm"),
    (dict(position="learned", norm="rmsnorm", mlp="swiglu", bias=False), "position=learned, norm=rmsnorm"),
    (dict(position="learned", norm="layernorm", mlp="swiglu", bias=True), "mlp=swiglu"),
    (dict(position="learned", norm="layernorm", mlp="gelu", bias=False), "bias=False"),
    (dict(position="learned", norm="layernorm", mlp="gelu", bias=True, n_kv_head=2), "n_kv_head=2"),
    (dict(position="rope", norm="rmsnorm", mlp="gelu", bias=False), "mlp=gelu"),
])
def test_export_of_mixed_knobs_is_a_config_error(knobs, fragment, bpe, tmp_path):
    config = ModelConfig(vocab_size=odd_vocab(bpe), block_size=16, n_layer=1, n_head=4, n_embd=16, **knobs)
    with pytest.raises(ConfigError, match="mixes GPT-2 and Llama knobs") as err:
        architecture_for(config)
    assert fragment in str(err.value)
    checkpoint = save_checkpoint(tmp_path / "ckpt", DecoderLM(config), bpe)
    with pytest.raises(ConfigError, match="no Hugging Face architecture"):
        export_hf(checkpoint, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_is_hf_folder(bpe, gpt2_folder, tmp_path):
    assert is_hf_folder(gpt2_folder)
    checkpoint = lmforge_checkpoint(tmp_path / "ckpt", "gpt2-gelu-tied", bpe)
    assert not is_hf_folder(checkpoint)  # lmforge's config.json has a "format"
    assert not is_hf_folder(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert not is_hf_folder(tmp_path / "broken")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1, 2]")
    assert not is_hf_folder(tmp_path / "list")


def test_outputs_never_replace_user_files(bpe, llama_folder, tmp_path):
    """Export and import replace an earlier output of their own kind, and refuse anything else."""
    checkpoint = lmforge_checkpoint(tmp_path / "ck", "llama-gqa", bpe)
    export_hf(checkpoint, tmp_path / "hf")
    export_hf(checkpoint, tmp_path / "hf")  # a second export over the first is fine
    import_hf(llama_folder, tmp_path / "imported")
    import_hf(llama_folder, tmp_path / "imported")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    for convert, source in ((export_hf, checkpoint), (import_hf, llama_folder)):
        with pytest.raises(CheckpointError, match="holds other files"):
            convert(source, notes)
    with pytest.raises(CheckpointError, match="holds other files"):
        import_hf(llama_folder, tmp_path / "hf")  # an HF folder is not an lmforge checkpoint to replace
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
