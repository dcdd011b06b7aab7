"""Hugging Face interop: GPT-2 and Llama-family checkpoints and tokenizers, in both directions.

One table per architecture (:data:`ARCHITECTURES`) says which Hugging Face tensor(s) each lmforge
tensor corresponds to; :func:`to_hf_state` and :func:`from_hf_state` read the same table in opposite
directions, so export and import cannot drift apart::

    lmforge                          GPT2LMHeadModel                  LlamaForCausalLM
    tok_emb.weight                   transformer.wte.weight           model.embed_tokens.weight
    blocks.{i}.attn.qkv_proj         transformer.h.{i}.attn.c_attn^T  self_attn.{q,k,v}_proj (concatenated)
    blocks.{i}.mlp.gate_up_proj      -                                mlp.{gate,up}_proj (concatenated)
    ...

(^T: GPT-2's ``Conv1D`` stores weights as (in, out), ``nn.Linear`` as (out, in).) Conversions are
exact: an lmforge -> Hugging Face -> lmforge round trip gives bit-identical tensors.

    export_hf(checkpoint, out_dir)     -> a folder AutoModelForCausalLM / AutoTokenizer load as is
    import_hf(hf_dir, out_checkpoint)  -> an lmforge checkpoint (weights in fp32)
    load_hf(hf_dir)                    -> (model, tokenizer, info) in memory, for LanguageModel.load
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.device import DTYPES
from lmforge.errors import CheckpointError, ConfigError
from lmforge.fileio import atomic_directory, check_output_folder, read_json_object
from lmforge.models.decoder import DecoderLM
from lmforge.models.lora import has_lora
from lmforge.tokenizer import (
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    Tokenizer,
    token_text,
)
from lmforge.training.checkpoint import (
    assign_weights,
    distinct_tensors,
    load_model,
    resolve_checkpoint,
    save_weights_checkpoint,
    unique_state,
)
from lmforge.training.distributed import barrier
from lmforge.version import __version__

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ------------------------------------------------------------------------------------------
# The correspondence tables
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One lmforge tensor and the Hugging Face tensor(s) it corresponds to.

    Names are templates in which ``{i}`` is a layer index. Several ``theirs`` are concatenated
    along dim 0 into ours (a fused projection); ``split`` gives their sizes for a config, to cut
    ours apart again. ``transpose`` marks GPT-2's ``Conv1D`` weights, stored (in, out).
    """

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False
    split: Callable[[ModelConfig], list[int]] | None = None


def _qkv_sizes(c: ModelConfig) -> list[int]:
    return [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim]


def _gate_up_sizes(c: ModelConfig) -> list[int]:
    return [c.intermediate_size, c.intermediate_size]


def _weight_and_bias(ours: str, theirs: tuple[str, ...], **kwargs: Any) -> list[Param]:
    """``.weight`` and ``.bias`` entries (a bias only maps where the model has one)."""
    return [Param(f"{ours}.{kind}", tuple(f"{t}.{kind}" for t in theirs), **kwargs) for kind in ("weight", "bias")]


GPT2_PARAMS = (
    Param("tok_emb.weight", ("transformer.wte.weight",)),
    Param("pos_emb.weight", ("transformer.wpe.weight",)),
    *_weight_and_bias("norm", ("transformer.ln_f",)),
    Param("lm_head.weight", ("lm_head.weight",)),
    *_weight_and_bias("blocks.{i}.norm1", ("transformer.h.{i}.ln_1",)),
    *_weight_and_bias("blocks.{i}.norm2", ("transformer.h.{i}.ln_2",)),
    Param("blocks.{i}.attn.qkv_proj.weight", ("transformer.h.{i}.attn.c_attn.weight",), transpose=True),
    Param("blocks.{i}.attn.qkv_proj.bias", ("transformer.h.{i}.attn.c_attn.bias",)),
    Param("blocks.{i}.attn.o_proj.weight", ("transformer.h.{i}.attn.c_proj.weight",), transpose=True),
    Param("blocks.{i}.attn.o_proj.bias", ("transformer.h.{i}.attn.c_proj.bias",)),
    Param("blocks.{i}.mlp.up_proj.weight", ("transformer.h.{i}.mlp.c_fc.weight",), transpose=True),
    Param("blocks.{i}.mlp.up_proj.bias", ("transformer.h.{i}.mlp.c_fc.bias",)),
    Param("blocks.{i}.mlp.down_proj.weight", ("transformer.h.{i}.mlp.c_proj.weight",), transpose=True),
    Param("blocks.{i}.mlp.down_proj.bias", ("transformer.h.{i}.mlp.c_proj.bias",)),
)

_LAYER = "model.layers.{i}."
LLAMA_PARAMS = (
    Param("tok_emb.weight", ("model.embed_tokens.weight",)),
    Param("norm.weight", ("model.norm.weight",)),
    Param("lm_head.weight", ("lm_head.weight",)),
    Param("blocks.{i}.norm1.weight", (_LAYER + "input_layernorm.weight",)),
    Param("blocks.{i}.norm2.weight", (_LAYER + "post_attention_layernorm.weight",)),
    *_weight_and_bias("blocks.{i}.attn.qkv_proj", tuple(_LAYER + f"self_attn.{x}_proj" for x in "qkv"),
                      split=_qkv_sizes),
    *_weight_and_bias("blocks.{i}.attn.o_proj", (_LAYER + "self_attn.o_proj",)),
    *_weight_and_bias("blocks.{i}.mlp.gate_up_proj", (_LAYER + "mlp.gate_proj", _LAYER + "mlp.up_proj"),
                      split=_gate_up_sizes),
    *_weight_and_bias("blocks.{i}.mlp.down_proj", (_LAYER + "mlp.down_proj",)),
)


@dataclass(frozen=True)
class Architecture:
    """A Hugging Face architecture lmforge converts to and from."""

    model_type: str                       # config.json "model_type"
    hf_class: str                         # config.json "architectures"
    params: tuple[Param, ...]
    read_config: Callable[[dict], ModelConfig]
    write_config: Callable[[ModelConfig], dict]
    # Tensors that hold no weights (cached masks, rotary tables in old files): skipped on import.
    buffers: re.Pattern = field(default=re.compile(r"$^"))
    prefix: str = ""                      # added to names saved without it (GPT-2 files from the Hub)

    def expand(self, config: ModelConfig) -> list[Param]:
        """The table with ``{i}`` filled in for every layer."""
        out = []
        for p in self.params:
            layers = range(config.n_layer) if "{i}" in p.ours else [None]
            for i in layers:
                out.append(Param(p.ours.format(i=i), tuple(t.format(i=i) for t in p.theirs), p.transpose, p.split))
        return out


def _gpt2_config(hf: dict) -> ModelConfig:
    activations = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    activation = hf.get("activation_function", "gelu_new")
    if activation not in activations:
        raise CheckpointError(f"GPT-2 activation {activation!r} is not supported "
                              f"(lmforge has {', '.join(activations)})")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise CheckpointError("GPT-2 attention scaling other than 1/sqrt(head size) is not supported")
    n_embd = hf.get("n_embd", 768)
    return ModelConfig(
        vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
        intermediate_size=hf.get("n_inner") or 4 * n_embd, norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp=activations[activation], position="learned", bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True))


def _gpt2_hf_config(c: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
        "n_inner": c.intermediate_size, "activation_function": "gelu_new" if c.mlp == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": c.norm_eps, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout, "scale_attn_weights": True, "tie_word_embeddings": c.tie_embeddings,
        "use_cache": True,
    }


def _llama_config(hf: dict) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"Llama activation {hf['hidden_act']!r} is not supported (lmforge has silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"RoPE scaling {rope_type!r} is not supported yet (lmforge has plain RoPE)")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, width // heads):
        raise CheckpointError(f"a head size ({hf['head_dim']}) other than hidden_size / num_attention_heads "
                              f"({width // heads}) is not supported")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise CheckpointError("biases in only the attention or only the MLP are not supported")
    context = hf.get("max_position_embeddings", 2048)
    if hf.get("sliding_window"):  # Mistral: exact up to the window, so the context stops there
        context = min(context, hf["sliding_window"])
    return ModelConfig(
        vocab_size=hf["vocab_size"], block_size=context, n_layer=hf["num_hidden_layers"], n_head=heads,
        n_kv_head=hf.get("num_key_value_heads") or heads, n_embd=width, intermediate_size=hf["intermediate_size"],
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", position="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), bias=bool(hf.get("attention_bias")),
        tie_embeddings=hf.get("tie_word_embeddings", False))


def _llama_hf_config(c: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
        "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
        # rope_theta for transformers 4.x, rope_parameters for 5.x
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": c.bias, "mlp_bias": c.bias, "attention_dropout": c.dropout,
        "tie_word_embeddings": c.tie_embeddings, "use_cache": True,
    }


GPT2 = Architecture("gpt2", "GPT2LMHeadModel", GPT2_PARAMS, _gpt2_config, _gpt2_hf_config,
                    buffers=re.compile(r"\.attn\.(bias|masked_bias)$"), prefix="transformer.")
LLAMA = Architecture("llama", "LlamaForCausalLM", LLAMA_PARAMS, _llama_config, _llama_hf_config,
                     buffers=re.compile(r"\.rotary_emb\.inv_freq$"))
# Mistral is Llama with an optional sliding window (see _llama_config).
ARCHITECTURES = {"gpt2": GPT2, "llama": LLAMA, "mistral": LLAMA}


def architecture_for(config: ModelConfig) -> Architecture:
    """The Hugging Face architecture that computes exactly what ``config`` computes."""
    gpt2 = dict(position="learned", norm="layernorm", bias=True)
    llama = dict(position="rope", norm="rmsnorm", mlp="swiglu")
    if all(getattr(config, k) == v for k, v in gpt2.items()) and config.mlp != "swiglu" and \
            config.n_kv_head == config.n_head:
        return GPT2
    if all(getattr(config, k) == v for k, v in llama.items()):
        return LLAMA
    knobs = ", ".join(f"{k}={getattr(config, k)}" for k in ("position", "norm", "mlp", "bias", "n_kv_head"))
    raise ConfigError(f"this model ({knobs}) mixes GPT-2 and Llama knobs, so no Hugging Face architecture "
                      f"computes it; GPT-2 needs learned positions, layernorm, gelu, biases and no "
                      f"grouped-query attention, Llama needs rope, rmsnorm and swiglu")


# ------------------------------------------------------------------------------------------
# Weights, in both directions
# ------------------------------------------------------------------------------------------
def to_hf_state(state: dict[str, Tensor], config: ModelConfig, arch: Architecture) -> dict[str, Tensor]:
    """Hugging Face tensors from lmforge ``state`` (as saved: a tied head absent)."""
    out = {}
    for p in arch.expand(config):
        if p.ours not in state:  # no biases, or a tied head
            continue
        tensor = state[p.ours]
        parts = tensor.split(p.split(config)) if p.split else (tensor,)
        for name, part in zip(p.theirs, parts, strict=True):
            out[name] = (part.t() if p.transpose else part).contiguous()
    return out


def from_hf_state(read: Callable[[str], Tensor], names: set[str], config: ModelConfig,
                  arch: Architecture) -> dict[str, Tensor]:
    """lmforge tensors (fp32) for ``config`` from Hugging Face tensors ``names``, fetched with ``read``.

    Every expected tensor must be there; a Hugging Face tensor that maps to nothing is an error,
    so a model with parts lmforge lacks is refused rather than converted wrongly.
    """
    with torch.device("meta"):
        expected = distinct_tensors(DecoderLM(config))  # names and shapes, no memory
    state, used = {}, set()
    for p in arch.expand(config):
        if p.ours not in expected:
            continue
        missing = [name for name in p.theirs if name not in names]
        if missing:
            raise CheckpointError(f"the Hugging Face weights lack {missing[0]} (needed for {p.ours})")
        shape = expected[p.ours].shape
        rows = p.split(config) if p.split else [shape[0]]
        parts = []
        for name, n in zip(p.theirs, rows, strict=True):
            part = read(name)
            want = (n, *shape[1:])[::-1] if p.transpose else (n, *shape[1:])
            if tuple(part.shape) != tuple(want):
                raise CheckpointError(f"{name} has shape {tuple(part.shape)} but the config implies {tuple(want)}")
            parts.append(part.t() if p.transpose else part)
        state[p.ours] = (torch.cat(parts) if len(parts) > 1 else parts[0]).float().contiguous()
        used.update(p.theirs)
    tied = config.tie_embeddings and "lm_head.weight" in names
    unused = sorted(n for n in names - used if not arch.buffers.search(n) and not (tied and n == "lm_head.weight"))
    if unused:
        raise CheckpointError(f"the Hugging Face weights hold tensors lmforge's {arch.model_type} model has no "
                              f"place for: {', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}")
    return state


class WeightFiles:
    """The tensors of a Hugging Face model folder, read lazily by name.

    Reads ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, and, only
    when there are no safetensors, ``pytorch_model.bin`` (sharded or not) through
    ``torch.load(weights_only=True)``, which never unpickles code.
    """

    def __init__(self, folder: Path, prefix: str = ""):
        self.folder, self.prefix = folder, prefix
        self.file_of: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        for single, index in (("model.safetensors", "model.safetensors.index.json"),
                              ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            if (folder / single).is_file():
                self._add_file(folder / single)
                return
            if (folder / index).is_file():
                weight_map = read_json_object(folder / index).get("weight_map", {})
                for name, file in weight_map.items():
                    self.file_of[self._canonical(name)] = folder / file
                return
        raise CheckpointError(f"{folder} holds no weights (model.safetensors, a sharded index, or pytorch_model.bin)")

    def _canonical(self, name: str) -> str:
        if self.prefix and not name.startswith(self.prefix) and not name.startswith("lm_head."):
            return self.prefix + name
        return name

    def _add_file(self, file: Path) -> None:
        for name in self._tensors(file).keys():
            self.file_of[self._canonical(name)] = file

    def _tensors(self, file: Path) -> Any:
        if file not in self._open:
            if not file.is_file():
                raise CheckpointError(f"{file} is missing (named in the index)")
            try:
                if file.suffix == ".safetensors":
                    self._open[file] = safe_open(str(file), framework="pt")
                else:
                    self._open = {file: torch.load(file, map_location="cpu", weights_only=True, mmap=True)}
            except (SafetensorError, OSError, RuntimeError, EOFError) as exc:
                raise CheckpointError(f"cannot read {file}: {exc}") from None
        return self._open[file]

    @property
    def names(self) -> set[str]:
        return set(self.file_of)

    def read(self, name: str) -> Tensor:
        tensors = self._tensors(self.file_of[name])
        original = next(n for n in (name, name.removeprefix(self.prefix)) if n in tensors.keys())
        return tensors.get_tensor(original) if hasattr(tensors, "get_tensor") else tensors[original]


# ------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------
def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` looks like a Hugging Face model folder (a config.json with a model_type)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        return False
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and "model_type" in config and "format" not in config


def read_hf_config(folder: Path) -> tuple[Architecture, ModelConfig]:
    """The architecture and lmforge model config of a Hugging Face model folder."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a directory")
    hf = read_json_object(folder / CONFIG_FILE)
    if not hf:
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}: not a Hugging Face model folder")
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        names = ", ".join(f"{a.hf_class} ({t})" for t, a in ARCHITECTURES.items() if t == a.model_type)
        raise CheckpointError(f"{folder}: Hugging Face model type {model_type!r} "
                              f"({', '.join(hf.get('architectures') or [])}) is not supported; lmforge imports "
                              f"{names} and mistral")
    try:
        config = ARCHITECTURES[model_type].read_config(hf)
        config.validate()
    except KeyError as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE} lacks {exc.args[0]!r}") from None
    except ConfigError as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {exc}") from None
    return ARCHITECTURES[model_type], config


def read_hf_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer of a Hugging Face folder: ``tokenizer.json``, or GPT-2's ``vocab.json`` + ``merges.txt``."""
    if (folder / TOKENIZER_FILE).is_file():
        return Tokenizer.load(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        hf = HFTokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        config = {**read_json_object(folder / SPECIAL_TOKENS_MAP_FILE),
                  **read_json_object(folder / TOKENIZER_CONFIG_FILE)}
        special = {role: token_text(config.get(f"{role}_token")) for role in ("bos", "eos", "pad", "unk")}
        special = {role: token for role, token in special.items() if token}
        hf.add_special_tokens(sorted(set(special.values())))
        return Tokenizer(hf, special)
    raise CheckpointError(f"{folder} has no tokenizer.json (nor GPT-2's vocab.json and merges.txt); a folder "
                          f"with only a SentencePiece tokenizer.model can be converted with transformers: "
                          f"AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")


def _hf_checkpoint(folder: str | Path) -> tuple[ModelConfig, dict[str, Tensor], Tokenizer, dict[str, Any]]:
    folder = Path(folder)
    arch, config = read_hf_config(folder)
    tokenizer = read_hf_tokenizer(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{config.vocab_size}")
    weights = WeightFiles(folder, arch.prefix)
    state = from_hf_state(weights.read, weights.names, config, arch)
    info = {"imported_from": {"format": "huggingface", "path": str(folder.resolve()), "architecture": arch.hf_class}}
    return config, state, tokenizer, info


def import_hf(folder: str | Path, out: str | Path) -> Path:
    """Convert a Hugging Face GPT-2 / Llama / Mistral folder into an lmforge checkpoint at ``out``."""
    check_output_folder(out, lambda p: (p / CONFIG_FILE).is_file() and not is_hf_folder(p))
    config, state, tokenizer, info = _hf_checkpoint(folder)
    return save_weights_checkpoint(out, config, state, tokenizer, info=info)


def load_hf(folder: str | Path) -> tuple[DecoderLM, Tokenizer, dict[str, Any]]:
    """A Hugging Face folder as ``(model in eval mode, tokenizer, info)``, converted in memory."""
    config, state, tokenizer, info = _hf_checkpoint(folder)
    model = DecoderLM(config)
    assign_weights(model, state, str(folder))
    return model.eval(), tokenizer, info


# ------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------
def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write ``checkpoint`` as a Hugging Face folder at ``out`` (atomically): config.json,
    model.safetensors, generation_config.json and the tokenizer files."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    check_output_folder(out, is_hf_folder)  # an earlier export may be replaced, nothing else
    model, tokenizer, _ = load_model(checkpoint)
    config = model.config
    if config.family != "decoder":
        raise ConfigError(f"only decoder models export to Hugging Face, not {config.family!r} models")
    if hasattr(model, "backbone"):
        raise ConfigError("task checkpoints (classification or QA heads) do not export; export the language model "
                          "they were fine-tuned from")
    arch = architecture_for(config)
    state = {k: v.to(DTYPES[dtype]) for k, v in to_hf_state(unique_state(model), config, arch).items()}
    special_ids = {f"{role}_token_id": tokenizer.hf.token_to_id(token) for role, token in tokenizer.special.items()
                   if role != "unk"}
    hf_config = {**arch.write_config(config), **special_ids, "dtype": HF_DTYPE_NAMES[dtype],
                 "torch_dtype": HF_DTYPE_NAMES[dtype],
                 "lmforge_version": __version__}
    generation = {**special_ids, "do_sample": False}
    tokenizer_config = {**tokenizer.config_dict(), "model_max_length": config.block_size,
                        "add_bos_token": tokenizer.adds_bos, "add_eos_token": False}
    token_map = {f"{role}_token": token for role, token in sorted(tokenizer.special.items())}

    def fill(folder: Path) -> None:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for name, value in ((CONFIG_FILE, hf_config), (GENERATION_CONFIG_FILE, generation),
                            (TOKENIZER_CONFIG_FILE, tokenizer_config), (SPECIAL_TOKENS_MAP_FILE, token_map)):
            (folder / name).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / TOKENIZER_FILE).write_text(tokenizer.hf.to_str(pretty=True), encoding="utf-8")

    atomic_directory(out, fill)
    return Path(out)


def load_base_model(checkpoint: str | Path, run_dir: Path, context: Any, dropout: float | None = None) -> tuple[
        torch.nn.Module, Tokenizer, Path]:
    """The starting model of a fine-tuning, RL or preference run: (model, tokenizer, checkpoint path).
    A Hugging Face folder is first imported into ``run_dir/base`` (by the main process of a
    distributed ``context``). A LoRA checkpoint is refused: merge it first."""
    base = Path(checkpoint)
    if is_hf_folder(base):
        converted = run_dir / "base"
        if context.is_main and not (converted / "config.json").is_file():
            log.info("importing the Hugging Face model %s into %s", base, converted)
            import_hf(base, converted)
        barrier(context)
        base = converted
    base = resolve_checkpoint(base)
    model, tokenizer, _ = load_model(base, dropout=dropout)
    if has_lora(model):
        raise ConfigError(f"{base} is a LoRA checkpoint; merge it first ('lmforge merge-lora') and train the "
                          f"merged checkpoint")
    return model, tokenizer, base
