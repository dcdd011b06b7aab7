"""Fusing media features with a text model, two ways (``media.fusion``).

``prefix`` (the seeds' concatenation, LLaVA-style): the encoder's features (B, K, D) go through a
two-layer MLP projector into the decoder's embedding space (B, K, C) and take the place of K
placeholder tokens at the start of the sequence::

    [ m_1 ... m_K | question tokens, sep | answer tokens, eos ]  ->  any lmforge decoder (causal)

(the projected features are added to the placeholder token's embedding, which with the projector's
bias is the same as replacing it). Without media the decoder is exactly the text model it was.

``cross`` (encoder-decoder, Whisper-style): the projected features are the first K inputs of a
seq2seq model's encoder, before the question's tokens; its decoder cross-attends to the result::

    encoder: [ m_1 ... m_K | question tokens, sep ]    decoder: bos, answer tokens -> answer, eos

:class:`MediaLM` is the trainable model (the backbone is a ``decoder`` for prefix fusion, a
``seq2seq`` model for cross fusion). :class:`PrefixPrompted` and :class:`CrossPrompted` bind one
batch of media features to it for the generation loops, which then run unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import MediaConfig
from lmforge.errors import ConfigError
from lmforge.models.multimodal.encoders import build_encoder


class MediaLM(nn.Module):
    """Media (B, ...) and text ids -> next-token logits, with a media encoder, a projector and a
    text backbone. Parameter names: ``encoder.*``, ``projector.*``, ``backbone.*``."""

    def __init__(self, backbone: nn.Module, media: MediaConfig):
        super().__init__()
        family = backbone.config.family
        if media.fusion == "prefix" and family != "decoder":
            raise ConfigError(f"media.fusion prefix puts the media before the text of a decoder (model.family "
                              f"decoder), not a {family}; for a seq2seq model use media.fusion cross")
        if media.fusion == "cross" and family != "seq2seq":
            raise ConfigError(f"media.fusion cross needs an encoder-decoder to cross-attend (model.family seq2seq), "
                              f"not a {family}; for a decoder use media.fusion prefix")
        if getattr(backbone.config, "pointer_generator", False):
            raise ConfigError("a pointer-generator copies source tokens; a media model has none to copy: turn "
                              "model.pointer_generator off")
        self.backbone, self.media = backbone, media
        self.encoder = build_encoder(media)
        width = backbone.config.n_embd
        self.projector = nn.Sequential(nn.Linear(media.width, width), nn.GELU(), nn.Linear(width, width))
        if media.freeze_decoder:
            self.backbone.requires_grad_(False)

    @property
    def config(self):  # noqa: ANN201 - the backbone's ModelConfig (block_size, vocab_size) for the loops
        return self.backbone.config

    @property
    def num_media_tokens(self) -> int:
        """K, the media positions of every example."""
        return self.encoder.num_tokens

    def media_embeddings(self, media: Tensor) -> Tensor:
        """Media (B, ...) -> projected features (B, K, C) in the backbone's embedding space."""
        return self.projector(self.encoder(media))

    def forward(self, input_ids: Tensor, *, media: Tensor, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None) -> Tensor:
        """Teacher-forced logits.

        Prefix: ``input_ids`` (B, T) start with K placeholders and are right-padded (the decoder is
        causal: no mask needed); returns (B, T, V). Cross: ``input_ids`` (B, S) the encoder's text
        (question, sep) with ``attention_mask`` (B, S), ``decoder_input_ids`` (B, T) bos + target;
        returns (B, T, V).
        """
        features = self.media_embeddings(media)  # (B, K, C)
        if self.media.fusion == "prefix":
            T, K = input_ids.shape[1], features.shape[1]
            return self.backbone(input_ids, input_offsets=F.pad(features, (0, 0, 0, T - K)))
        if decoder_input_ids is None:
            raise ValueError("cross fusion needs decoder_input_ids")
        memory = self.backbone.encode(input_ids, attention_mask, prefix=features)
        return self.backbone.decode(decoder_input_ids, memory, _with_prefix(attention_mask, input_ids, features))

    def linear_targets(self) -> dict[str, list[tuple[str, slice | None]]]:
        """The backbone's LoRA targets, under ``backbone.``."""
        return {name: [(f"backbone.{path}", rows) for path, rows in places]
                for name, places in self.backbone.linear_targets().items()}


def _with_prefix(attention_mask: Tensor | None, input_ids: Tensor, features: Tensor) -> Tensor:
    """The (B, K + S) key mask of an encoder input of K media vectors and S tokens."""
    if attention_mask is None:
        attention_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    return torch.cat([attention_mask.new_ones(features.shape[:2]).bool(), attention_mask.bool()], dim=1)


class PrefixPrompted(nn.Module):
    """A prefix-fusion :class:`MediaLM` with one batch of media bound: a decoder for
    :class:`~lmforge.inference.generate.TokenGenerator`, whose prompts are K placeholders followed by
    text. At the prompt's pass (an empty cache) every row's positions 0..K-1 get its media features;
    later steps are plain decoding. ``features`` (B, K, C), one row per generated row."""

    def __init__(self, model: MediaLM, features: Tensor):
        super().__init__()
        self.model, self.features = model, features
        self.config = model.backbone.config
        self._prefilled = False
        self.train(model.training)  # eval_mode(self) restores this mode to the model too

    def forward(self, idx: Tensor, *, position_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                cache=None, last_only: bool = False, logits_at: Tensor | None = None) -> Tensor:  # noqa: ANN001
        offsets = None
        if cache is None or cache.length == 0:
            if self._prefilled:
                raise ValueError("the media prefix would slide out of the context window: generate fewer tokens")
            self._prefilled = cache is not None
            B, T = idx.shape
            K, C = self.features.shape[1:]
            positions = position_ids if position_ids is not None else torch.arange(T, device=idx.device)[None]
            positions = positions.expand(B, T)
            take = positions.clamp(max=K - 1)[..., None].expand(B, T, C)
            offsets = self.features.gather(1, take) * (positions < K)[..., None].to(self.features.dtype)
        return self.model.backbone(idx, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                                   last_only=last_only, logits_at=logits_at, input_offsets=offsets)


class CrossPrompted(nn.Module):
    """A cross-fusion :class:`MediaLM` with one batch of media bound: a seq2seq model for
    :class:`~lmforge.inference.seq2seq_decoding.Seq2SeqDecoding` (and beam search), whose sources are
    the text after the media. ``features`` (B, K, C), one row per source."""

    def __init__(self, model: MediaLM, features: Tensor):
        super().__init__()
        self.model, self.features = model, features
        self.config = model.backbone.config
        self.train(model.training)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model.backbone.encode(input_ids, attention_mask, prefix=self.features)

    def new_cache(self, memory: Tensor, attention_mask: Tensor | None = None, max_len: int | None = None,
                  source_ids: Tensor | None = None):  # noqa: ANN201 - a Seq2SeqCache
        mask = _with_prefix(attention_mask, memory[:, self.features.shape[1]:, 0], self.features)
        return self.model.backbone.new_cache(memory, mask, max_len=max_len)

    def decode(self, *args, **kwargs) -> Tensor:  # noqa: ANN002, ANN003
        return self.model.backbone.decode(*args, **kwargs)
