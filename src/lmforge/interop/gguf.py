"""GGUF export for llama.cpp and Ollama: a Llama-flavoured checkpoint with its tokenizer embedded.

Written with the ``gguf`` package that llama.cpp publishes. The file holds::

    general.*, llama.*              architecture metadata (context, width, heads, RoPE base, ...)
    tokenizer.ggml.*                the byte-level BPE vocabulary, merges, token types, special ids,
                                    and the chat template when there is one
    token_embd, blk.N.attn_q, ...   the weights, under llama.cpp's tensor names

llama.cpp rotates query/key pairs that sit side by side (``x[2j], x[2j+1]``) where lmforge and
Hugging Face rotate the two halves of each head (``x[j], x[j + D/2]``), so the query and key rows of
every head are reordered (:func:`interleave_rope_rows`); the attention scores are unchanged.

    export_gguf(checkpoint, "model.gguf", dtype="f16")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch import Tensor

from lmforge.errors import ConfigError
from lmforge.fileio import atomic_path, check_output_file
from lmforge.interop.hf import LLAMA, architecture_for, to_hf_state
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpoint import load_model, unique_state

DTYPES = ("f32", "f16", "q8_0")

# Hugging Face Llama tensor name (after "model.layers.{i}." for block tensors) -> llama.cpp name.
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face Llama tensor name."""
    if hf_name.startswith("model.layers."):
        layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{GGUF_NAMES[rest]}"
    return GGUF_NAMES[hf_name]


def interleave_rope_rows(weight: Tensor, n_head: int) -> Tensor:
    """Reorder the (n_head * D, C) rows of a query/key projection from rotate-half to interleaved
    pairs: within each head, row j and row j + D/2 become rows 2j and 2j + 1."""
    rows, cols = weight.shape
    D = rows // n_head
    return weight.reshape(n_head, 2, D // 2, cols).transpose(1, 2).reshape(rows, cols)


def export_gguf(checkpoint: str | Path, out: str | Path, dtype: str = "f16") -> Path:
    """Write a Llama-flavoured checkpoint as one GGUF file at ``out`` (atomically).

    ``dtype``: ``f32``, ``f16`` (default; what llama.cpp's converter writes) or ``q8_0`` (8-bit
    blocks of 32 for the matrices). Norm weights are always f32.
    """
    import gguf  # the gguf package is only needed here

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    check_output_file(out)
    model, tokenizer, info = load_model(checkpoint)
    config = model.config
    if hasattr(model, "backbone"):
        raise ConfigError("task checkpoints (classification or QA heads) do not export to GGUF")
    if config.family != "decoder" or architecture_for(config) is not LLAMA:
        raise ConfigError("GGUF export needs a Llama-flavoured model (rope, rmsnorm, swiglu); export GPT-2 "
                          "flavoured models with 'lmforge export hf' instead")
    if config.bias:
        raise ConfigError("GGUF export does not handle biases (model.bias is true)")
    vocab = _gguf_vocabulary(tokenizer, config.vocab_size)

    out = Path(out)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(Path(checkpoint).resolve().name)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        writer.add_context_length(config.block_size)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.n_head)
        writer.add_head_count_kv(config.n_kv_head)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
        _add_tokenizer(writer, tokenizer, vocab, gguf)
        for name, tensor in to_hf_state(unique_state(model), config, LLAMA).items():
            if name.endswith("q_proj.weight"):
                tensor = interleave_rope_rows(tensor, config.n_head)
            elif name.endswith("k_proj.weight"):
                tensor = interleave_rope_rows(tensor, config.n_kv_head)
            array, qtype = _encode(tensor, dtype, gguf)
            writer.add_tensor(gguf_name(name), array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def _encode(tensor: Tensor, dtype: str, gguf) -> tuple[np.ndarray, object]:
    """The numpy data and GGML type of one tensor: 1-D tensors (norms) stay f32, and q8_0 falls back
    to f16 for matrices whose rows do not split into blocks of 32."""
    data = tensor.float().numpy()
    if tensor.dim() == 1 or dtype == "f32":
        return data, gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def _gguf_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> dict:
    """Tokens, types and merges of a byte-level BPE tokenizer, padded to the model's vocabulary."""
    spec = json.loads(tokenizer.hf.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    gpt2_style = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    if model.get("type") != "BPE" or not gpt2_style:
        raise ConfigError("GGUF export needs a GPT-2 style byte-level BPE tokenizer (lmforge's 'bpe' kind or "
                          "GPT-2's); this checkpoint's tokenizer is another kind")
    id_to_token = {i: t for t, i in tokenizer.hf.get_vocab(with_added_tokens=True).items()}
    special = tokenizer.special_ids | {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in id_to_token:
            tokens.append(id_to_token[i])
            types.append(3 if i in special else 1)  # CONTROL or NORMAL
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _add_tokenizer(writer, tokenizer: Tokenizer, vocab: dict, gguf) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre("gpt-2")   # the GPT-2 pre-tokenizer regex, which lmforge's bpe uses
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if role in tokenizer.special:
            add(tokenizer.hf.token_to_id(tokenizer.special[role]))
    writer.add_add_bos_token(tokenizer.adds_bos)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
