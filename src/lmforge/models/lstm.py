"""The LSTM language model: stacked LSTM layers between a token embedding and an output head.

A recurrent baseline for the transformers of :mod:`lmforge.models.decoder`, built from the same
:class:`~lmforge.config.ModelConfig` (``family: lstm``). Only ``vocab_size``, ``n_layer``, ``n_embd``,
``dropout``, ``bias`` and ``tie_embeddings`` apply; the attention and MLP knobs are ignored.
``block_size`` is the training window (truncated back-propagation through time: every window starts
from a zero state) and the prompt-length limit of the API; the model itself reads any length.

Shapes in comments: B batch, T tokens, C width (``n_embd``, also the hidden size), L layers, V vocabulary.

    idx (B, T) -> tok_emb -> dropout
               -> L x LSTM(C -> C), dropout between layers     state: (h, c), each (L, B, C)
               -> dropout -> lm_head -> logits (B, T, V)

The state (h, c) after a sequence summarises all of it: feeding the next tokens with that state gives
the same logits as a forward over the whole sequence, which is how generation runs one token at a
time (see :mod:`lmforge.inference.generate`, which picks that path by :attr:`LSTMLM.recurrent`).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig

LSTMState = tuple[Tensor, Tensor]
"""(h, c): the hidden and cell states of every layer, each (L, B, C)."""


class LSTMLM(nn.Module):
    """A recurrent causal language model: token ids (B, T) -> next-token logits (B, T, V)."""

    recurrent = True  # generation carries a state instead of a KV cache, and needs no window

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        if config.vocab_size is None:
            raise ValueError("config.vocab_size must be set before building a model")
        self.config = config
        C, V = config.n_embd, config.vocab_size
        self.tok_emb = nn.Embedding(V, C)
        # nn.LSTM drops out between layers only (and warns when given dropout with one layer)
        self.lstm = nn.LSTM(C, C, config.n_layer, bias=config.bias, batch_first=True,
                            dropout=config.dropout if config.n_layer > 1 else 0.0)
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embedding U(-1, 1); LSTM weights and an untied head U(-1/sqrt(C), 1/sqrt(C)); biases zero
        except the forget gate's, which starts at 1 so that the cell remembers by default.

        Without a norm after it, the embedding's scale is the scale of the gates' input: at 1 the
        input moves the gates from the first step (at 0.1, a tiny model stays stuck near the
        unigram loss for hundreds of steps), while a tied head's initial logits stay small.
        """
        C = self.config.n_embd
        bound = 1.0 / math.sqrt(C)
        nn.init.uniform_(self.tok_emb.weight, -1.0, 1.0)
        if not self.config.tie_embeddings:
            nn.init.uniform_(self.lm_head.weight, -bound, bound)
        for name, parameter in self.lstm.named_parameters():
            if name.startswith("weight"):
                nn.init.uniform_(parameter, -bound, bound)
            else:  # bias_ih_l{k} and bias_hh_l{k}, gates in the order input, forget, cell, output
                nn.init.zeros_(parameter)
                if name.startswith("bias_ih"):
                    nn.init.ones_(parameter[C:2 * C])

    # -------------------------------------------------------------- forward
    def forward(self, idx: Tensor, *, state: LSTMState | None = None, return_state: bool = False,
                last_only: bool = False) -> Tensor | tuple[Tensor, LSTMState]:
        """Next-token logits.

        Args:
            idx: (B, T) token ids, continuing ``state`` if one is given.
            state: (h, c), each (L, B, C), after the tokens before ``idx``; None starts from zeros.
            return_state: also return the state after ``idx``.
            last_only: compute logits for the last position only (generation).

        Returns:
            (B, T, V) logits, or (B, 1, V) with ``last_only``; with ``return_state``, a tuple
            ``(logits, (h, c))``.
        """
        x, state = self._trunk(idx, state)  # (B, T, C)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        return (logits, state) if return_state else logits

    def hidden_states(self, idx: Tensor, attention_mask: Tensor | None = None,
                      input_offsets: Tensor | None = None) -> Tensor:
        """The top layer's outputs (B, T, C) for token ids (B, T), for task heads.

        The model is causal, so a row's outputs at its real tokens do not depend on right padding;
        ``attention_mask`` is accepted for the common task-head interface and not needed. (Left
        padding would run through the recurrence: pad on the right.) ``input_offsets`` (B, T, C), if
        given, is added to the token embeddings (a head's own input features).
        """
        return self._trunk(idx, None, input_offsets)[0]

    def _trunk(self, idx: Tensor, state: LSTMState | None,
               input_offsets: Tensor | None = None) -> tuple[Tensor, LSTMState]:
        """Embedding, LSTM stack and output dropout: (B, T) ids -> (B, T, C) outputs and the new state."""
        dropout = self.config.dropout if self.training else 0.0
        x = self.tok_emb(idx)  # (B, T, C)
        if input_offsets is not None:
            x = x + input_offsets
        if dropout:
            x = F.dropout(x, dropout)
        x, state = self.lstm(x, state)  # (B, T, C); h, c each (L, B, C)
        if dropout:
            x = F.dropout(x, dropout)
        return x, state

    # -------------------------------------------------------------- introspection
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors once); ``non_embedding`` leaves out the token embedding
        (and an untied head)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if non_embedding:
            total -= self.tok_emb.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def linear_targets(self) -> dict[str, list[tuple[str, slice | None]]]:
        """Where each LoRA target lives (see :meth:`lmforge.models.decoder.DecoderLM.linear_targets`).
        Only the output head is an ``nn.Linear``: the LSTM's gates are fused inside ``nn.LSTM``."""
        return {"head": [("lm_head", None)]}

    def flops_per_token(self, training: bool = True) -> float:
        """Estimated FLOPs per token: 2 per weight of every matrix multiply (per layer the input and
        recurrent gate projections, each 4C x C, and the V x C head); training (forward + backward) is 3x.
        Gate nonlinearities and the elementwise cell update are left out."""
        c = self.config
        matmul_weights = c.n_layer * 2 * 4 * c.n_embd * c.n_embd + c.vocab_size * c.n_embd
        forward = 2 * matmul_weights
        return float(3 * forward if training else forward)
