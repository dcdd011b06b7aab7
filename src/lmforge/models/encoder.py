"""The bidirectional transformer encoder (BERT-style), pretrained by masked-language modelling.

The same blocks as :mod:`lmforge.models.decoder` (attention, MLP, norms, RoPE and every knob of
:class:`~lmforge.config.ModelConfig`), built with ``causal=False``: every token sees every real token
of its row, before and after it. The head predicts each position's own token (the masked ones are
what :func:`lmforge.training.objectives.masked_lm_objective` scores), not the next one.

Differences from BERT: pre-norm blocks with a final norm (as GPT-2), no token-type embeddings, no
pooler and a plain linear head (tied to the embedding) instead of BERT's dense + norm "transform".
Classification and QA heads live in :mod:`lmforge.models.heads` and read :meth:`EncoderLM.hidden_states`;
inputs start with bos, which stands for BERT's CLS.

Shapes in comments: B batch, T tokens, C width, V vocabulary.

    idx (B, T) -> tok_emb [+ pos_emb] -> dropout
               -> n_layer x [ x + attn(norm1(x)) ; x + mlp(norm2(x)) ]    (bidirectional attention)
               -> norm -> lm_head -> logits (B, T, V)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.models.decoder import Block, DecoderLM, make_norm, rope_tables


def key_padding_mask(attention_mask: Tensor) -> Tensor:
    """(B, 1, T, T) bool attention mask from a (B, T) padding mask: every query sees the real keys.

    Padding queries also see themselves, so that no row of the softmax is empty, even in a row
    that is all padding (their outputs are never used).
    """
    T = attention_mask.shape[1]
    diagonal = torch.eye(T, dtype=torch.bool, device=attention_mask.device)  # (T, T)
    return attention_mask[:, None, None, :] | diagonal                       # (B, 1, T, T)


def bidirectional_inputs(attention_mask: Tensor | None, T: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Position ids ((1, T), or (B, T) counting real tokens only) and the (B, 1, T, T) attention mask
    (None without padding) of T tokens read bidirectionally; ``attention_mask`` is (B, T), True for real
    tokens."""
    if attention_mask is None:
        return torch.arange(T, device=device).unsqueeze(0), None
    attention_mask = attention_mask.bool()
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0), key_padding_mask(attention_mask)


class EncoderLM(nn.Module):
    """A bidirectional masked language model: token ids (B, T) -> logits (B, T, V) of each position's token.

    Parameter names match :class:`~lmforge.models.decoder.DecoderLM` (``tok_emb``, ``pos_emb``,
    ``blocks.N.*``, ``norm``, ``lm_head``), so checkpoints, LoRA and the optimizer's decay groups
    treat both families alike.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        if config.vocab_size is None:
            raise ValueError("config.vocab_size must be set before building a model")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":
            self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, causal=False) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.position == "rope":
            cos, sin = rope_tables(config, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # The parameter layout is the decoder's, so are initialisation, counting and the LoRA targets.
    reset_parameters = DecoderLM.reset_parameters
    num_parameters = DecoderLM.num_parameters
    linear_targets = DecoderLM.linear_targets
    flops_per_token = DecoderLM.flops_per_token

    # -------------------------------------------------------------- forward
    def forward(self, idx: Tensor, *, attention_mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Logits (B, T, V) of every position's token, given token ids ``idx`` (B, T).

        ``attention_mask`` (B, T) bool is True for real tokens: padding keys are hidden from every
        query, so a row's logits at its real tokens do not depend on the padding around it.
        ``positions`` (B, T) bool picks positions: the result is then the logits (N, V) of the N
        picked ones only, in row-major order (MLM scores ~15% of the tokens, and the (B, T, V) head
        would otherwise cost as much as the blocks).
        """
        hidden = self.hidden_states(idx, attention_mask)
        return self.lm_head(hidden if positions is None else hidden[positions])

    def hidden_states(self, idx: Tensor, attention_mask: Tensor | None = None,
                      input_offsets: Tensor | None = None) -> Tensor:
        """The final normed states (B, T, C) of token ids (B, T) (``attention_mask`` as in :meth:`forward`).

        Positions count real tokens only, so left padding gives the same states as right padding.
        ``input_offsets`` (B, T, C), if given, is added to the token embeddings (a head's own input
        features, e.g. :class:`~lmforge.models.heads.SpanExtractor`'s question matches).
        """
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
        position_ids, mask = bidirectional_inputs(attention_mask, T, idx.device)
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
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, None, i)
        return self.norm(x)  # (B, T, C)
