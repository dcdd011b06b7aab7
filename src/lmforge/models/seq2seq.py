"""The encoder-decoder transformer (T5/BART-style) for translation, summarisation and other seq2seq tasks.

The encoder is the bidirectional stack of :mod:`lmforge.models.encoder` (``Block(config, causal=False)``);
the decoder adds a cross-attention between its causal self-attention and its MLP. Every knob of
:class:`~lmforge.config.ModelConfig` applies to both stacks (norm, MLP kind, positions, grouped-query
heads, biases); ``n_layer`` counts the encoder blocks and ``n_decoder_layer`` the decoder blocks.
Source and target share one token embedding, and the head is tied to it when ``tie_embeddings`` (the
presets untie it: a tied head learns slowly when many tokens are never targets; see seq2seq-small.yaml).

Shapes in comments: B batch, S source tokens, T target tokens (new ones, with a cache), C width,
H heads, Hkv key/value heads, D head size, V vocabulary.

    input_ids (B, S) -> tok_emb [+ enc_pos_emb] -> dropout
                     -> n_layer x [ x + attn(norm1(x)) ; x + mlp(norm2(x)) ]          (bidirectional)
                     -> encoder_norm -> memory (B, S, C)
    decoder_input_ids (B, T) -> tok_emb [+ dec_pos_emb] -> dropout
                     -> n_decoder_layer x [ x + attn(norm1(x))                         (causal, KV cache)
                                          ; x + cross_attn(norm2(x), memory)           (source padding hidden)
                                          ; x + mlp(norm3(x)) ]
                     -> norm -> lm_head -> logits (B, T, V)
                     [-> pointer_generator(states, logits, memory, source ids) -> log-probabilities (B, T, V)]

With ``pointer_generator`` (See et al. 2017) the model can also copy: its output mixes the vocabulary
softmax with an attention over the source tokens (:class:`PointerGenerator`), and it returns normalised
log-probabilities instead of logits. Everything downstream (losses, beam search, sampling) takes a
log-softmax of what the model returns, which leaves log-probabilities unchanged, so both kinds work alike.

Differences from BART/T5: pre-norm blocks with a final norm in each stack (as T5 and GPT-2), learned
positions or RoPE as configured (no relative position buckets), and no rescaling of the tied head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.device import single_token_kernels
from lmforge.models.cpu_linear import Linear
from lmforge.models.decoder import MLP, Attention, Block, KVCache, make_norm, math_attention, rope_tables
from lmforge.models.encoder import bidirectional_inputs


# ------------------------------------------------------------------------------------------
# Decoding cache
# ------------------------------------------------------------------------------------------
@dataclass
class Seq2SeqCache:
    """Everything the decoder needs to take one step after another (made by :meth:`Seq2SeqLM.new_cache`).

    ``self_attn`` holds the decoder's own keys/values, (B, Hkv, max_len, D) per layer; ``cross_keys[i]``
    and ``cross_values[i]`` are layer i's keys/values of the encoder output, (B, Hkv, S, D), computed
    once; ``source_mask`` (B, S) bool is True for real source tokens (None: no padding). A pointer-generator
    model also keeps the encoder output ``memory`` (B, S, C) and the ``source_ids`` (B, S) it copies from.
    """

    self_attn: KVCache
    cross_keys: list[Tensor]
    cross_values: list[Tensor]
    source_mask: Tensor | None
    memory: Tensor | None = None
    source_ids: Tensor | None = None

    @property
    def length(self) -> int:
        """Target tokens decoded so far (the same for every row)."""
        return self.self_attn.length

    @property
    def batch_size(self) -> int:
        return self.cross_keys[0].shape[0]

    def select(self, rows: Tensor) -> None:
        """Keep batch ``rows`` (B',) in that order: row i becomes old row ``rows[i]``. Rows may repeat
        (one source expanded into several beams) or go (finished sequences dropped)."""
        self.self_attn.select(rows)
        self.cross_keys = [k[rows] for k in self.cross_keys]
        self.cross_values = [v[rows] for v in self.cross_values]
        if self.source_mask is not None:
            self.source_mask = self.source_mask[rows]
        if self.memory is not None:
            self.memory, self.source_ids = self.memory[rows], self.source_ids[rows]


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """Multi-head attention from decoder queries (B, T, C) to the encoder output (B, S, C).

    Keys and values come from one fused projection of the memory (``kv_proj``: keys, then values),
    computed once per source with :meth:`memory_kv`. No positions are applied here: the memory
    already carries them, and a target position has no place in the source.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.kv_proj = Linear(config.n_embd, 2 * config.n_kv_head * config.head_dim, bias=config.bias)
        self.o_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, Hkv, S, D) of the encoder output (B, S, C)."""
        B, S, _ = memory.shape
        kv = self.kv_proj(memory).view(B, S, 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        k, v = kv.split([self.n_kv_head, self.n_kv_head], dim=1)
        return k, v

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """x (B, T, C), memory keys/values (B, Hkv, S, D), mask (B, 1, 1, S) bool or None -> (B, T, C)."""
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        dropout = self.dropout if self.training else 0.0
        if x.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled() and T <= 256:
            y = math_attention(q, k, v, mask, False, dropout)  # as Attention: faster there
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class DecoderBlock(nn.Module):
    """Pre-norm residual decoder block: x + attn(norm1(x)), x + cross_attn(norm2(x), memory),
    then x + mlp(norm3(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config, causal=True)
        self.norm2 = make_norm(config)
        self.cross_attn = CrossAttention(config)
        self.norm3 = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, self_mask: Tensor | None,
                cache: KVCache | None, layer: int, memory_kv: tuple[Tensor, Tensor],
                source_mask: Tensor | None) -> Tensor:
        x = x + self._drop(self.attn(self.norm1(x), rope, self_mask, cache, layer))
        x = x + self._drop(self.cross_attn(self.norm2(x), *memory_kv, source_mask))
        return x + self._drop(self.mlp(self.norm3(x)))

    def _drop(self, y: Tensor) -> Tensor:
        return F.dropout(y, self.dropout) if self.training and self.dropout else y


class PointerGenerator(nn.Module):
    """Copying from the source (See et al. 2017, "Get To The Point"). The next-token distribution is

        p(w) = g * softmax(logits)(w) + (1 - g) * sum of a(s) over the source positions s holding token w

    where a (B, T, S) is a single-head attention of the decoder's final states over the encoder output
    and the gate g = sigmoid(w . [state; context]) in (0, 1) chooses, per target position, between
    generating and copying. The mixture is computed in fp32; returns log p (B, T, V).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.query = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.gate = nn.Linear(2 * config.n_embd, 1)

    def forward(self, states: Tensor, logits: Tensor, memory: Tensor, source_ids: Tensor,
                source_mask: Tensor | None) -> Tensor:
        """states (B, T, C) and logits (B, T, V) of the decoder, memory (B, S, C) and source_ids (B, S)
        of the encoder, source_mask (B, S) bool True for real source tokens (None: no padding)."""
        T = states.shape[1]
        scores = self.query(states) @ memory.transpose(1, 2) / math.sqrt(states.shape[-1])  # (B, T, S)
        if source_mask is not None:
            scores = scores.masked_fill(~source_mask[:, None, :], float("-inf"))
        attention = scores.float().softmax(-1)                                                # (B, T, S)
        context = attention.to(memory.dtype) @ memory                                          # (B, T, C)
        gate = torch.sigmoid(self.gate(torch.cat([states, context.to(states.dtype)], -1)).float())  # (B, T, 1)
        probs = gate * logits.float().softmax(-1)                                              # (B, T, V)
        probs = probs.scatter_add(-1, source_ids[:, None, :].expand(-1, T, -1), (1 - gate) * attention)
        return probs.clamp_min(torch.finfo(torch.float32).tiny).log()


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
class Seq2SeqLM(nn.Module):
    """An encoder-decoder: source ids (B, S) and target ids (B, T) -> next-target-token logits (B, T, V).

    Parameter names: ``tok_emb`` (shared), ``enc_pos_emb``/``dec_pos_emb`` (learned positions),
    ``encoder_blocks.N.*`` (as :class:`~lmforge.models.decoder.Block`), ``encoder_norm``,
    ``decoder_blocks.N.{attn,cross_attn,mlp,norm1,norm2,norm3}.*``, ``norm``, ``lm_head`` and, with
    ``pointer_generator``, ``pointer.{query,gate}.*``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        if config.vocab_size is None:
            raise ValueError("config.vocab_size must be set before building a model")
        self.config = config
        self.n_decoder_layer = config.n_decoder_layer or config.n_layer
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":
            self.enc_pos_emb = nn.Embedding(config.block_size, config.n_embd)
            self.dec_pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.encoder_blocks = nn.ModuleList(Block(config, causal=False) for _ in range(config.n_layer))
        self.encoder_norm = make_norm(config)
        self.decoder_blocks = nn.ModuleList(DecoderBlock(config) for _ in range(self.n_decoder_layer))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.pointer = PointerGenerator(config) if config.pointer_generator else None
        if config.position == "rope":
            cos, sin = rope_tables(config, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(residual branches of
        their stack): 2 per encoder block, 3 per decoder block. A pointer-generator's gate starts at 1/2."""
        encoder_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        decoder_std = 0.02 / math.sqrt(3 * self.n_decoder_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 0.02
                if name.endswith(("o_proj", "down_proj")):
                    std = encoder_std if name.startswith("encoder") else decoder_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V) (log-probabilities with ``pointer_generator``): ``input_ids``
        (B, S) the source, ``attention_mask`` (B, S) True for real source tokens (None: no padding),
        ``decoder_input_ids`` (B, T) the target shifted right (starting with bos). Right padding of the
        target needs no mask: the decoder is causal."""
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask, source_ids=input_ids)

    def _embed(self, ids: Tensor, position_ids: Tensor, pos_emb: nn.Embedding | None
               ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Token embeddings [+ learned positions], dropout: (B, T) -> (B, T, C), and the RoPE tables
        (B or 1, 1, T, D) of ``position_ids`` when positions are rotary."""
        return self._positioned(self.tok_emb(ids), position_ids, pos_emb)

    def _positioned(self, x: Tensor, position_ids: Tensor, pos_emb: nn.Embedding | None
                    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Embeddings (B, T, C) [+ learned positions], dropout, and the RoPE tables (as :meth:`_embed`)."""
        rope = None
        if pos_emb is not None:
            x = x + pos_emb(position_ids)
        else:
            rope = (self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1))
        if self.training and self.config.dropout:
            x = F.dropout(x, self.config.dropout)
        return x, rope

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
               prefix: Tensor | None = None) -> Tensor:
        """The encoder output ("memory") (B, S, C) of source ids (B, S).

        ``attention_mask`` (B, S) bool is True for real tokens: padding keys are hidden and positions
        count real tokens only, so a source's memory at its real tokens does not depend on its padding.
        ``prefix`` (B, K, C), if given, are input vectors read before the tokens (a multimodal model's
        projected media features): the memory is then (B, K + S, C), the prefix always real.
        """
        if prefix is not None:
            if attention_mask is None:
                attention_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            attention_mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask.bool()], dim=1)
        S = input_ids.shape[1] + (prefix.shape[1] if prefix is not None else 0)
        if S > self.config.block_size:
            raise ValueError(f"source of {S} tokens exceeds the context of {self.config.block_size}")
        position_ids, mask = bidirectional_inputs(attention_mask, S, input_ids.device)
        x = self.tok_emb(input_ids)  # (B, S, C)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        x, rope = self._positioned(x, position_ids, getattr(self, "enc_pos_emb", None))
        for i, block in enumerate(self.encoder_blocks):
            x = block(x, rope, mask, None, i)
        return self.encoder_norm(x)  # (B, S, C)

    def new_cache(self, memory: Tensor, attention_mask: Tensor | None = None, max_len: int | None = None,
                  source_ids: Tensor | None = None) -> Seq2SeqCache:
        """An empty decoding cache for the encoder output ``memory`` (B, S, C) of sources with padding
        mask ``attention_mask`` (B, S); it holds up to ``max_len`` target tokens (default block_size).
        Every layer's cross-attention keys/values are computed here, once. A pointer-generator model
        needs the ``source_ids`` (B, S) to copy from."""
        c = self.config
        B, max_len = memory.shape[0], min(max_len or c.block_size, c.block_size)
        shape = (B, c.n_kv_head, max_len, c.head_dim)
        self_attn = KVCache([memory.new_zeros(shape) for _ in range(self.n_decoder_layer)],
                            [memory.new_zeros(shape) for _ in range(self.n_decoder_layer)])
        keys, values = zip(*(block.cross_attn.memory_kv(memory) for block in self.decoder_blocks))
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        if self.pointer is None:
            return Seq2SeqCache(self_attn, list(keys), list(values), mask)
        return Seq2SeqCache(self_attn, list(keys), list(values), mask, memory, self._require_source_ids(source_ids))

    def decode(self, decoder_input_ids: Tensor, memory: Tensor | None = None,
               attention_mask: Tensor | None = None, *, cache: Seq2SeqCache | None = None,
               last_only: bool = False, source_ids: Tensor | None = None) -> Tensor:
        """Next-token logits of target ids given the encoder output (log-probabilities with
        ``pointer_generator``).

        Args:
            decoder_input_ids: (B, T) target ids; with a cache, the tokens after the cached ones.
            memory: (B, S, C) encoder output (:meth:`encode`); not needed with a cache, which
                holds its keys/values (:meth:`new_cache`).
            attention_mask: (B, S) bool source padding mask, True for real tokens (without a cache).
            cache: a :class:`Seq2SeqCache` to read and extend (incremental decoding).
            last_only: compute logits for the last position only (generation).
            source_ids: (B, S) the source ids a pointer-generator copies from (without a cache).

        Returns:
            (B, T, V) logits, or (B, 1, V) with ``last_only``.
        """
        if cache is None:
            if memory is None:
                raise ValueError("decode needs the encoder output (memory) or a cache made by new_cache")
            cache_kv = [block.cross_attn.memory_kv(memory) for block in self.decoder_blocks]
            source_mask = attention_mask.bool() if attention_mask is not None else None
            if self.pointer is not None:
                source_ids = self._require_source_ids(source_ids)
        else:
            cache_kv = list(zip(cache.cross_keys, cache.cross_values))
            source_mask = cache.source_mask
            memory, source_ids = cache.memory, cache.source_ids
        cross_mask = source_mask[:, None, None, :] if source_mask is not None else None  # (B, 1, 1, S)

        T = decoder_input_ids.shape[1]
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"target of {past + T} tokens exceeds the context of {self.config.block_size}")
        position_ids = torch.arange(past, past + T, device=decoder_input_ids.device).unsqueeze(0)  # (1, T)
        with single_token_kernels(decoder_input_ids, self.tok_emb.weight):
            x, rope = self._embed(decoder_input_ids, position_ids, getattr(self, "dec_pos_emb", None))
            # Causal self-attention: Attention applies it itself unless T > 1 new tokens follow cached
            # ones, where the mask must be aligned to the end of the keys.
            self_mask = None
            if past and T > 1:
                self_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)[None, None]
            for i, block in enumerate(self.decoder_blocks):
                x = block(x, rope, self_mask, cache.self_attn if cache else None, i, cache_kv[i], cross_mask)
            if cache is not None:
                cache.self_attn.advance(T)
            if last_only:
                x = x[:, -1:]
            states = self.norm(x)
            logits = self.lm_head(states)  # (B, T, V)
            if self.pointer is None:
                return logits
            return self.pointer(states, logits, memory, source_ids, source_mask)

    def _require_source_ids(self, source_ids: Tensor | None) -> Tensor:
        if source_ids is None:
            raise ValueError("a pointer-generator model copies from its source: pass source_ids")
        return source_ids

    # -------------------------------------------------------------- introspection
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors once); ``non_embedding`` leaves out the token and position
        embeddings (and an untied head)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied head once
        if non_embedding:
            total -= self.tok_emb.weight.numel()
            if self.config.position == "learned":
                total -= self.enc_pos_emb.weight.numel() + self.dec_pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def linear_targets(self) -> dict[str, list[tuple[str, slice | None]]]:
        """Where each LoRA target lives: target name -> [(module path, output rows or None for all)], as
        :meth:`~lmforge.models.decoder.DecoderLM.linear_targets`.

        Both stacks: q, k, v are row slices of a self-attention's ``qkv_proj``; in the decoder's
        cross-attention q is ``q_proj`` and k, v are the two halves of ``kv_proj``; o covers every
        attention output. SwiGLU's gate, up are the halves of ``gate_up_proj``.
        """
        c = self.config
        q_rows, kv_rows, hidden = c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.intermediate_size
        targets: dict[str, list[tuple[str, slice | None]]] = {}

        def add(name: str, path: str, rows: slice | None = None) -> None:
            targets.setdefault(name, []).append((path, rows))

        blocks = [f"encoder_blocks.{i}" for i in range(c.n_layer)]
        blocks += [f"decoder_blocks.{i}" for i in range(self.n_decoder_layer)]
        for block in blocks:
            add("q", f"{block}.attn.qkv_proj", slice(0, q_rows))
            add("k", f"{block}.attn.qkv_proj", slice(q_rows, q_rows + kv_rows))
            add("v", f"{block}.attn.qkv_proj", slice(q_rows + kv_rows, q_rows + 2 * kv_rows))
            add("o", f"{block}.attn.o_proj")
            if block.startswith("decoder"):
                add("q", f"{block}.cross_attn.q_proj")
                add("k", f"{block}.cross_attn.kv_proj", slice(0, kv_rows))
                add("v", f"{block}.cross_attn.kv_proj", slice(kv_rows, 2 * kv_rows))
                add("o", f"{block}.cross_attn.o_proj")
            if c.mlp == "swiglu":
                add("gate", f"{block}.mlp.gate_up_proj", slice(0, hidden))
                add("up", f"{block}.mlp.gate_up_proj", slice(hidden, 2 * hidden))
            else:
                add("up", f"{block}.mlp.up_proj")
            add("down", f"{block}.mlp.down_proj")
        add("head", "lm_head")
        return targets

    def flops_per_token(self, training: bool = True) -> float:
        """Estimated FLOPs per target token, with one source token beside it, at full context (PaLM
        appendix B, as :meth:`~lmforge.models.decoder.DecoderLM.flops_per_token`).

        Forward: 2 per weight of every matrix multiply (both stacks and the head) plus 2 * 2 * T * C per
        attention layer (encoder self, decoder self and cross) for the scores and the weighted sum.
        Training (forward + backward) is 3x.
        """
        c = self.config
        matmul_weights = self.num_parameters(non_embedding=True) + self.lm_head.weight.numel()
        attention_layers = c.n_layer + 2 * self.n_decoder_layer
        forward = 2 * matmul_weights + 2 * 2 * attention_layers * c.block_size * c.n_embd
        return float(3 * forward if training else forward)
