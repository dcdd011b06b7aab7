"""``lmforge export hf``, ``lmforge import hf``, ``lmforge export gguf`` and ``lmforge generate HF_FOLDER``
end to end, as a user runs them, including the promised one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_clean_error, lmforge
from cli_helpers import lmforge_all as run_all
from torch.testing import assert_close

from lmforge.api import LanguageModel
from lmforge.config import ModelConfig
from lmforge.models.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import save_checkpoint

transformers = pytest.importorskip("transformers")

LINES = [
    "The quick brown fox jumps over the lazy dog. Hello, world!",
    "Grüße aus München: Äpfel, Öl und Übermut für die Straße.",
    "你好，世界。我们今天学习语言模型。",
    "def add(x, y):\n\treturn x + y  # code\n\nprint(add(1, 2))",
]
PROMPT = "Grüße 你好 def"


def lmforge_all(*commands: tuple) -> list:
    return run_all(*commands, workers=4)


def random_checkpoint(path: Path, tok: Tokenizer, seed: int, **knobs) -> Path:
    config = ModelConfig(vocab_size=tok.vocab_size + 5, block_size=48, **knobs)
    model = DecoderLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name and "weight" in name else 0.0))
    return save_checkpoint(path, model, tok)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A Llama-flavoured and a GPT-2 flavoured checkpoint (random weights, a byte-level BPE tokenizer)."""
    root = tmp_path_factory.mktemp("interop")
    tok = Tokenizer.train(LINES * 4, kind="bpe", vocab_size=300)
    random_checkpoint(root / "llama", tok, seed=1, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=40,
                      position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
    random_checkpoint(root / "gpt2", tok, seed=2, n_layer=1, n_head=2, n_embd=16)
    return root


@pytest.fixture(scope="module")
def hf_dir(root) -> Path:
    result = lmforge("export", "hf", root / "llama", root / "hf")
    assert result.returncode == 0, result.stderr
    assert str(root / "hf") in result.stdout and "AutoModelForCausalLM" in result.stdout
    return root / "hf"


def test_export_hf_loads_in_transformers_with_equal_logits(root, hf_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    lm = LanguageModel.load(root / "llama", device="cpu")
    ids = torch.randint(0, lm.model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(model(ids).logits, lm.model(ids), atol=1e-5, rtol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.encode(PROMPT, add_special_tokens=False) == lm.tokenizer.encode(PROMPT)


def test_import_hf_and_generate_give_the_same_text(root, hf_dir):
    imported = lmforge("import", "hf", hf_dir, root / "imported")
    assert imported.returncode == 0, imported.stderr
    assert str(root / "imported") in imported.stdout and "lmforge generate" in imported.stdout
    assert json.loads((root / "imported" / "config.json").read_text())["imported_from"]["architecture"] == \
        "LlamaForCausalLM"
    original, again, direct = lmforge_all(
        *(("generate", path, "--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 10)
          for path in (root / "llama", root / "imported", hf_dir)))
    for result in (original, again, direct):
        assert result.returncode == 0, result.stderr
    assert original.stdout.startswith(PROMPT) and len(original.stdout) > len(PROMPT) + 1
    assert again.stdout == original.stdout
    assert direct.stdout == original.stdout  # an HF folder is converted in memory


def test_export_gguf_writes_a_file_gguf_reads(root):
    gguf = pytest.importorskip("gguf")
    out = root / "gguf" / "model.gguf"
    result = lmforge("export", "gguf", root / "llama", out, "--dtype", "q8_0")
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout and "MB" in result.stdout and "llama-cli" in result.stdout
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("llama.block_count").contents() == 2
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.attn_k.weight"} <= names and len(names) == 3 + 2 * 9
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]  # no temporary file left


# ------------------------------------------------------------------ errors: one line, exit code 2
def test_errors_are_one_line(root, hf_dir, tmp_path):
    bert = tmp_path / "bert"
    shutil.copytree(hf_dir, bert)
    config = json.loads((bert / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertForMaskedLM"])
    (bert / "config.json").write_text(json.dumps(config))
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    cases = {
        ("import", "hf", bert, out): ("'bert'", "not supported", "LlamaForCausalLM"),
        ("import", "hf", tmp_path / "nowhere", out): ("nowhere", "not a directory"),
        ("export", "gguf", root / "gpt2", out): ("Llama-flavoured", "lmforge export hf"),
        ("export", "gguf", tmp_path / "empty", out): ("not an lmforge checkpoint",),
        ("export", "hf", root / "llama", out, "--bogus"): ("unrecognized arguments: --bogus",),
        ("export", "gguf", root / "llama", out, "--dtype", "bf16"): ("invalid choice", "bf16"),
        ("export", "hf", root / "llama", out, "--dtype", "f16"): ("invalid choice", "f16"),
        ("import", "hf", hf_dir): ("OUT_CHECKPOINT",),
    }
    for command, result in zip(cases, lmforge_all(*cases), strict=True):
        assert_clean_error(result, *cases[command])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "empty"]


def test_export_gguf_onto_a_directory_is_a_clean_error(root, tmp_path):
    (tmp_path / "taken").mkdir()
    assert_clean_error(lmforge("export", "gguf", root / "llama", tmp_path / "taken", "--dtype", "f32"), "taken")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_export_hf_onto_a_file_leaves_nothing_behind(root, tmp_path):
    (tmp_path / "taken").write_text("a file")
    result = lmforge("export", "hf", root / "llama", tmp_path / "taken")
    if result.returncode == 0:  # replacing the file with the folder is acceptable
        assert (tmp_path / "taken" / "config.json").is_file()
    else:  # and so is refusing, leaving the file alone
        assert_clean_error(result, "taken")
        assert (tmp_path / "taken").read_text() == "a file"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
