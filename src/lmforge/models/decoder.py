"""The decoder-only transformer: GPT-2 and Llama in one readable file.

Every architectural difference is a knob of :class:`~lmforge.config.ModelConfig`::

                  GPT-2                      Llama
    positions     learned embedding          rotary (RoPE), rotate-half convention
    norm          LayerNorm (+bias)          RMSNorm
    MLP           up -> GELU -> down         down(SiLU(gate) * up)   (SwiGLU)
    attention     n_kv_head == n_head        grouped-query: n_kv_head divides n_head
    biases        yes                        no
    head          tied to the embedding      separate

Queries, keys and values come from one fused projection (``qkv_proj``, rows in that order), and
SwiGLU's gate and up projections from another (``gate_up_proj``): fewer, larger matrix multiplies
are ~10% faster on a CPU for small models.

Shapes in comments: B batch, T new tokens, S keys (cached + new), C width, H heads,
Hkv key/value heads, D head size, V vocabulary.

    idx (B, T) -> tok_emb [+ pos_emb] -> dropout
               -> n_layer x [ x + attn(norm1(x)) ; x + mlp(norm2(x)) ]
               -> norm -> lm_head -> logits (B, T, V)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.device import cpu_has_amx, single_token_kernels
from lmforge.models.cpu_attention import decode_attention, kernel_available
from lmforge.models.cpu_linear import Linear, decoding_step


# ------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------
@dataclass
class KVCache:
    """Preallocated keys and values of every layer for generation.

    ``keys[i]`` and ``values[i]`` are (B, Hkv, max_len, D); positions ``[0, length)`` are filled.
    All rows share ``length``: a batch of prompts of different lengths is left-padded and the
    padding is masked out (see ``attention_mask`` in :meth:`DecoderLM.forward`).
    """

    keys: list[Tensor]
    values: list[Tensor]
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, batch_size: int, max_len: int, device: torch.device,
              dtype: torch.dtype) -> KVCache:
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)])

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write new (B, Hkv, T, D) keys/values after ``length``; return all (B, Hkv, S, D)."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def decode_lengths(self, mask: Tensor | None) -> Tensor | None:
        """(B,) int64: how many positions each row attends to in a one-token step (the new one stored),
        when that is all the step's ``mask`` says (no mask) and the cache has room; None otherwise (e.g.
        left padding)."""
        if mask is not None or self.length >= self.max_len:
            return None
        return torch.full((self.keys[0].shape[0],), self.length + 1, dtype=torch.long, device=self.keys[0].device)

    def select(self, rows: Tensor) -> None:
        """Keep only batch ``rows`` (e.g. for beam search or dropping finished sequences)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]

    def advance(self, T: int) -> None:
        """Count ``T`` new tokens as cached (called by :meth:`DecoderLM.forward` after every layer stored them)."""
        self.length += T


@dataclass
class SlotKVCache:
    """Keys and values of several sequences of different lengths, one per row ("slot").

    For continuous batching (:mod:`lmforge.inference.engine`): sequences join and leave between
    decoding steps, each in its own row with its own length. ``keys[i]`` and ``values[i]`` are
    (N, Hkv, max_len, D); row r holds positions ``[0, lengths[r])``, the rest is stale and masked.

    Rows ``[0, rows)`` take part in the next forward; the caller keeps them packed at the front
    (:meth:`move` the last row into a freed one). A forward on this cache decodes ONE new token per
    row: pass ``position_ids`` and ``attention_mask`` from :meth:`decode_inputs`; :meth:`store` writes
    row r's new key/value at position ``lengths[r]``. A prompt is prefilled alone into its row
    through :meth:`row_cache` (a plain :class:`KVCache` viewing that row), then :meth:`set_length`.
    """

    keys: list[Tensor]
    values: list[Tensor]
    lengths: list[int]   # (N,) filled positions of every row, on the host
    positions: Tensor    # (N,) the same on the device: where each row's next token goes
    rows: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, slots: int, max_len: int, device: torch.device,
              dtype: torch.dtype) -> SlotKVCache:
        cache = KVCache.empty(config, slots, max_len, device, dtype)
        return cls(cache.keys, cache.values, [0] * slots, torch.zeros(slots, dtype=torch.long, device=device))

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def length(self) -> int:
        """The longest of rows ``[0, rows)``: the next forward's keys span ``length + 1`` positions."""
        return max(self.lengths[:self.rows], default=0)

    def row_cache(self, row: int, count: int = 1) -> KVCache:
        """An empty :class:`KVCache` whose tensors are views of rows ``[row, row + count)``: prefilling it
        fills those rows (then :meth:`set_length` each)."""
        end = row + count
        return KVCache([k[row:end] for k in self.keys], [v[row:end] for v in self.values])

    def set_length(self, row: int, length: int) -> None:
        """Row ``row`` now holds ``length`` positions (after a prefill through :meth:`row_cache`)."""
        self.lengths[row] = length
        self.positions[row] = length

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` (its filled keys and values, and its length) into row ``dst``."""
        filled = self.lengths[src]
        for k, v in zip(self.keys, self.values):
            k[dst, :, :filled] = k[src, :, :filled]
            v[dst, :, :filled] = v[src, :, :filled]
        self.set_length(dst, self.lengths[src])

    def decode_inputs(self) -> tuple[Tensor, Tensor]:
        """``position_ids`` (rows, 1) and ``attention_mask`` (rows, 1, 1, length + 1) for one new token
        per row: row r's token sits at position ``lengths[r]`` and sees keys ``[0, lengths[r]]``."""
        positions = self.positions[:self.rows, None]                       # (B, 1)
        keys = torch.arange(self.length + 1, device=positions.device)     # (S,)
        return positions, (keys[None, :] <= positions)[:, None, None, :]  # (B, 1, 1, S)

    def store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one new (B, Hkv, 1, D) key/value per row r < B at ``lengths[r]``; return (B, Hkv, S, D)
        keys/values with S = ``length + 1`` (positions past a row's own length are stale: mask them)."""
        B, T = k.shape[0], k.shape[2]
        if B != self.rows or T != 1:
            raise ValueError(f"a SlotKVCache decodes one token for each of its {self.rows} rows, not {B} x {T}")
        rows = torch.arange(B, device=k.device)
        self.keys[layer][rows, :, self.positions[:B]] = k[:, :, 0]
        self.values[layer][rows, :, self.positions[:B]] = v[:, :, 0]
        end = self.length + 1
        return self.keys[layer][:B, :, :end], self.values[layer][:B, :, :end]

    def decode_lengths(self, mask: Tensor | None) -> Tensor:
        """(rows,) int64: row r attends to its ``lengths[r]`` filled positions and the new one (the step's
        ``mask``, from :meth:`decode_inputs`, says exactly that)."""
        return self.positions[:self.rows] + 1

    def advance(self, T: int) -> None:
        """Count the token just stored in every row."""
        for row in range(self.rows):
            self.lengths[row] += T
        self.positions[:self.rows] += T


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x) * weight (Llama). No bias, no mean subtraction."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: ModelConfig, length: int) -> tuple[Tensor, Tensor]:
    """cos and sin tables, each (length, D), in the rotate-half layout used by Hugging Face Llama."""
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32)
                                            / config.head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (length, D)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) queries or keys; cos/sin are (B or 1, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout: float) -> Tensor:
    """softmax(q k^T / sqrt(D) + mask) v with plain batched matrix multiplies: (B, H, T, D) -> (B, H, T, D).

    Used to train in bf16 on CPUs with contexts up to 256 tokens, where it makes a whole training step
    10-35% faster than torch 2.13's fused CPU attention kernel (measured in docs/benchmarks.md); for
    longer contexts the fused kernel wins. Grouped key/value heads are repeated to match the queries.
    """
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
    if causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), dropout) if dropout else scores.softmax(dim=-1)
    return weights.to(v.dtype) @ v


UPCAST_MIN_KEYS = 4 * 8 * 128 * 32
"""On a CPU without AMX, decoding attention in bf16 reads at least this many key elements
(B * Hkv * S * D) per layer before :func:`single_query_attention` pays off: below it, the upcasts cost
more than they save."""

UPCAST_KEYS = math.inf if cpu_has_amx() else UPCAST_MIN_KEYS
"""The smallest read that :class:`Attention` upcasts: never on a CPU with AMX tiles, whose fused bf16
kernel is the faster one (measured in docs/benchmarks.md: 1.35x faster than the upcast at 16 rows)."""


def single_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, gqa: bool) -> Tensor:
    """Decoding attention on CPU for bf16 queries (B, H, 1, D) over (B, Hkv, S, D) keys and values,
    computed in fp32 and returned in the queries' dtype.

    On a CPU with AVX-512 bf16 but no AMX (AMD Zen 4), torch 2.13's fused CPU kernel is 1.5-2.5x slower
    in bf16 than in fp32 for one query per row over many keys (16 rows of 190 cached positions, 8 heads
    of 32: ~1 ms against ~0.4 ms per layer); both accumulate in fp32, so the results agree to bf16
    rounding. For a single short row the upcasts cost more than they save: see ``UPCAST_KEYS``.
    """
    with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 inputs back to bf16
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=gqa)
    return y.to(q.dtype)


def native_decode_lengths(q: Tensor, cache: KVCache | SlotKVCache, layer: int, mask: Tensor | None) -> Tensor | None:
    """For a one-token step (q: (B, H, 1, D)) that the C kernel of :mod:`lmforge.models.cpu_attention` can
    take (CPU, no gradient, a compiler, a contiguous cache of q's dtype, a mask that only says how far
    each row reaches): how many positions each row attends to, (B,) int64. Else None (torch's kernels).
    """
    if q.device.type != "cpu" or q.requires_grad or not kernel_available(q.dtype):
        return None
    keys, values = cache.keys[layer], cache.values[layer]
    if keys.dtype != q.dtype or not keys.is_contiguous() or not values.is_contiguous():
        return None
    return cache.decode_lengths(mask)


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads and an optional KV cache; causal unless
    ``causal=False`` (the bidirectional encoders of the encoder and seq2seq families)."""

    def __init__(self, config: ModelConfig, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv_width = config.n_kv_head * config.head_dim
        self.qkv_proj = Linear(config.n_embd, config.n_embd + 2 * kv_width, bias=config.bias)
        self.o_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                cache: KVCache | SlotKVCache | None, layer: int) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv_proj(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None and T == 1 and (lengths := native_decode_lengths(q, cache, layer, mask)) is not None:
            # store the new key/value and attend in one call of the C kernel: (B, 1, C)
            return self.o_proj(decode_attention(q, cache.keys[layer], cache.values[layer], lengths, new=(k, v)))
        if cache is not None:
            k, v = cache.store(layer, k, v)  # (B, Hkv, S, D)
        # Without an explicit mask: causal over the new tokens, or (one new token) attend to all.
        dropout = self.dropout if self.training else 0.0
        causal = self.causal and mask is None and T > 1
        gqa = self.n_kv_head != self.n_head
        if x.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled() and T <= 256:
            y = math_attention(q, k, v, mask, causal, dropout)  # faster there: see math_attention
        elif x.device.type == "cpu" and q.dtype != torch.float32 and T == 1 and k.numel() >= UPCAST_KEYS:
            y = single_query_attention(q, k, v, mask, gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               is_causal=causal, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    """GPT-2: down(gelu(up(x))). Llama (SwiGLU): down(silu(gate(x)) * up(x)).

    ``gelu`` is the exact (erf) GELU; ``gelu_tanh`` the tanh approximation of the original GPT-2
    (Hugging Face's ``gelu_new``), which is ~5x slower on CPU in torch 2.13.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"
        if self.gated:  # gate and up projections in one matrix multiply: (C) -> (2 * hidden)
            self.gate_up_proj = Linear(config.n_embd, 2 * config.intermediate_size, bias=config.bias)
        else:
            self.up_proj = Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.down_proj = Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: ModelConfig, causal: bool = True):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config, causal)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                cache: KVCache | SlotKVCache | None, layer: int) -> Tensor:
        if self.training and self.dropout:
            x = x + F.dropout(self.attn(self.norm1(x), rope, mask, cache, layer), self.dropout)
            return x + F.dropout(self.mlp(self.norm2(x)), self.dropout)
        x = x + self.attn(self.norm1(x), rope, mask, cache, layer)
        return x + self.mlp(self.norm2(x))


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
class DecoderLM(nn.Module):
    """A causal language model: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        if config.vocab_size is None:
            raise ValueError("config.vocab_size must be set before building a model")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":
            self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.position == "rope":
            cos, sin = rope_tables(config, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -------------------------------------------------------------- forward
    def forward(self, idx: Tensor, *, position_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, cache: KVCache | SlotKVCache | None = None,
                last_only: bool = False, logits_at: Tensor | None = None,
                input_offsets: Tensor | None = None) -> Tensor:
        """Next-token logits.

        Args:
            idx: (B, T) token ids; with a cache, the tokens after the cached ones.
            position_ids: (B, T) positions; default ``cache.length + arange(T)``.
            attention_mask: (B, S) bool, True for real tokens, False for left padding; S covers
                the cached tokens and ``idx``. None means no padding. Or a ready (B, 1, T, S) bool
                mask, True where a query may see a key, used as is (a :class:`SlotKVCache`'s
                ``decode_inputs``).
            cache: a :class:`KVCache` to read and extend (generation), or a :class:`SlotKVCache`
                (one new token per row, rows of different lengths).
            last_only: compute logits for the last position only (generation).
            logits_at: (B,) one position per row whose logits alone are computed (right-padded prompts).
            input_offsets: (B, T, C) added to the token embeddings (a multimodal model's media
                features at its placeholder tokens).

        Returns:
            (B, T, V) logits, or (B, 1, V) with ``last_only`` or ``logits_at``.
        """
        with single_token_kernels(idx, self.tok_emb.weight), decoding_step(idx, self.tok_emb.weight):
            x = self._trunk(idx, position_ids, attention_mask, cache, input_offsets)  # (B, T, C)
            if logits_at is not None:
                x = x[torch.arange(idx.shape[0], device=x.device), logits_at].unsqueeze(1)  # (B, 1, C)
            elif last_only:
                x = x[:, -1:]
            return self.lm_head(self.norm(x))

    def hidden_states(self, idx: Tensor, attention_mask: Tensor | None = None,
                      input_offsets: Tensor | None = None) -> Tensor:
        """The final normed states (B, T, C) of token ids (B, T), for task heads (no cache).

        ``attention_mask`` (B, T) bool is True for real tokens; positions count real tokens only, so
        a row's states at its real tokens are the same alone, right-padded or left-padded.
        ``input_offsets`` (B, T, C), if given, is added to the token embeddings (a head's own input
        features, e.g. :class:`~lmforge.models.heads.SpanExtractor`'s question matches).
        """
        position_ids = None
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        return self.norm(self._trunk(idx, position_ids, attention_mask, None, input_offsets))

    def _trunk(self, idx: Tensor, position_ids: Tensor | None, attention_mask: Tensor | None,
               cache: KVCache | SlotKVCache | None, input_offsets: Tensor | None = None) -> Tensor:
        """Embeddings and the block stack: (B, T) ids -> (B, T, C) states before the final norm
        (arguments as in :meth:`forward` and :meth:`hidden_states`); extends ``cache`` when one is given."""
        T = idx.shape[1]
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds the context of {self.config.block_size}")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=idx.device).unsqueeze(0)  # (1, T)
        x = self.tok_emb(idx)  # (B, T, C)
        if input_offsets is not None:
            x = x + input_offsets
        rope = None
        if self.config.position == "learned":
            x = x + self.pos_emb(position_ids)
        else:
            rope = (self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1))
        if self.training and self.config.dropout:
            x = F.dropout(x, self.config.dropout)
        mask = attention_mask
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = padding_mask(attention_mask, T)  # (B, 1, T, S)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return x

    # -------------------------------------------------------------- introspection
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors once); ``non_embedding`` leaves out token and position
        embeddings (and an untied head)."""
        seen: dict[int, int] = {id(p): p.numel() for p in self.parameters()}
        total = sum(seen.values())
        if non_embedding:
            total -= self.tok_emb.weight.numel()
            if self.config.position == "learned":
                total -= self.pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def linear_targets(self) -> dict[str, list[tuple[str, slice | None]]]:
        """Where each LoRA target lives: target name -> [(module path, output rows or None for all)].

        Paths are as in ``named_modules()``. Fused projections are shared: q, k, v are row slices of
        ``qkv_proj`` (n_head*D, then n_kv_head*D twice) and SwiGLU's gate, up are the two halves of
        ``gate_up_proj``. Targets this model lacks (``gate`` in a GELU MLP) are absent.
        """
        c = self.config
        q_rows, kv_rows, hidden = c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.intermediate_size
        targets: dict[str, list[tuple[str, slice | None]]] = {}

        def add(name: str, path: str, rows: slice | None = None) -> None:
            targets.setdefault(name, []).append((path, rows))

        for i in range(c.n_layer):
            attn, mlp = f"blocks.{i}.attn", f"blocks.{i}.mlp"
            add("q", f"{attn}.qkv_proj", slice(0, q_rows))
            add("k", f"{attn}.qkv_proj", slice(q_rows, q_rows + kv_rows))
            add("v", f"{attn}.qkv_proj", slice(q_rows + kv_rows, q_rows + 2 * kv_rows))
            add("o", f"{attn}.o_proj")
            if c.mlp == "swiglu":
                add("gate", f"{mlp}.gate_up_proj", slice(0, hidden))
                add("up", f"{mlp}.gate_up_proj", slice(hidden, 2 * hidden))
            else:
                add("up", f"{mlp}.up_proj")
            add("down", f"{mlp}.down_proj")
        add("head", "lm_head")
        return targets

    def flops_per_token(self, training: bool = True) -> float:
        """Estimated FLOPs to process one token at full context (PaLM appendix B).

        Forward: 2 per weight of every matrix multiply (blocks and head) plus 2 * 2 * T * C per
        layer for the attention scores and the weighted sum. Training (forward + backward) is 3x.
        """
        c = self.config
        matmul_weights = self.num_parameters(non_embedding=True) + self.lm_head.weight.numel()
        forward = 2 * matmul_weights + 2 * 2 * c.n_layer * c.block_size * c.n_embd
        return float(3 * forward if training else forward)


def padding_mask(attention_mask: Tensor, T: int) -> Tensor:
    """(B, 1, T, S) bool attention mask from a (B, S) padding mask, for the last T queries.

    A query may see a key that is real and not in its future. Padding queries also see
    themselves, so that no row of the softmax is empty (their outputs are never used).
    """
    B, S = attention_mask.shape
    q_pos = torch.arange(S - T, S, device=attention_mask.device).view(T, 1)  # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device).view(1, S)         # (1, S)
    causal = k_pos <= q_pos                                                  # (T, S)
    mask = causal & attention_mask[:, None, None, :]                         # (B, 1, T, S)
    return mask | (k_pos == q_pos)
