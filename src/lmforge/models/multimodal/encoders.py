"""Media encoders: an image, a recording or a clip in, a sequence of feature vectors out.

Every encoder maps a batch of fixed-size inputs to ``(B, K, D)`` features, ``K`` fixed by the
:class:`~lmforge.config.MediaConfig` (``num_tokens``) and ``D = media.width``; the fusion
(:mod:`lmforge.models.multimodal.fusion`) projects them into a text model.

==================  ===========================  =====================================================
encoder             input                        tokens
==================  ===========================  =====================================================
``ImageCNN``        images (B, 3, S, S)          the (S/8)^2 cells of a 3-stage conv stack (VGG-style:
                                                 two 3x3 conv + BatchNorm + ReLU per stage, 2x pooling)
``ViT``             images (B, 3, S, S)          the (S/P)^2 patches (patch embedding), through
                                                 ``n_layer`` transformer blocks
``AudioEncoder``    waveforms (B, N)             log-Mel frames / 4: two stride-2 1-D convs (Whisper's
                                                 subsampler has one), through ``n_layer`` blocks
``VideoEncoder``    clips (B, F, 3, S, S)        F frame vectors (each frame's image-encoder cells,
                                                 flattened and projected), through a temporal
                                                 transformer; or their mean (``temporal: mean``), 1 token
==================  ===========================  =====================================================

The transformer blocks are the decoder's (:class:`~lmforge.models.decoder.Block`, bidirectional),
with learned positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import MediaConfig, ModelConfig
from lmforge.models.decoder import Block
from lmforge.models.multimodal.audio_features import LogMelSpectrogram
from lmforge.models.multimodal.augment import flip_and_shift, perturb_waveforms, spec_augment


def _blocks(media: MediaConfig, positions: int) -> tuple[nn.ModuleList, nn.LayerNorm, ModelConfig]:
    """``media.n_layer`` bidirectional pre-norm blocks of width ``media.width`` and their final norm."""
    config = ModelConfig(n_embd=media.width, n_head=media.n_head, n_layer=media.n_layer, block_size=positions,
                         mlp="gelu", norm="layernorm", bias=True, vocab_size=1)
    return nn.ModuleList(Block(config, causal=False) for _ in range(media.n_layer)), nn.LayerNorm(media.width), config


class TransformerStack(nn.Module):
    """Learned positions, bidirectional blocks, a final LayerNorm: (B, K, D) -> (B, K, D)."""

    def __init__(self, media: MediaConfig, positions: int):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.randn(positions, media.width) * 0.02)
        self.blocks, self.norm, _ = _blocks(media, positions)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos_emb[:x.shape[1]]
        for i, block in enumerate(self.blocks):
            x = block(x, None, None, None, i)
        return self.norm(x)


class ImageCNN(nn.Module):
    """Images (B, 3, S, S) in [0, 1] -> (B, (S/8)^2, D): three conv stages of widths D/4, D/2, D."""

    def __init__(self, media: MediaConfig):
        super().__init__()
        widths = [3, max(media.width // 4, 8), max(media.width // 2, 8), media.width]
        layers: list[nn.Module] = []
        for stage in range(3):
            for conv in range(2):
                channels_in = widths[stage] if conv == 0 else widths[stage + 1]
                layers += [nn.Conv2d(channels_in, widths[stage + 1], 3, padding=1, bias=False),
                           nn.BatchNorm2d(widths[stage + 1]), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
        self.stages = nn.Sequential(*layers)
        self.grid = media.image_size // 8
        self.pos_emb = nn.Parameter(torch.randn(self.grid * self.grid, media.width) * 0.02)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)
        self.augment = media.augment

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def forward(self, images: Tensor, group: int = 1) -> Tensor:
        if self.training and self.augment:
            images = flip_and_shift(images, group)
        x = self.stages((images - self.mean) / 0.25)   # (B, D, S/8, S/8)
        return x.flatten(2).transpose(1, 2) + self.pos_emb  # (B, (S/8)^2, D)


class ViT(nn.Module):
    """Images (B, 3, S, S) in [0, 1] -> (B, (S/P)^2, D): patch embedding (a P x P conv of stride P),
    learned positions, ``n_layer`` transformer blocks."""

    def __init__(self, media: MediaConfig):
        super().__init__()
        self.patch = nn.Conv2d(3, media.width, media.patch_size, stride=media.patch_size)
        self.grid = media.image_size // media.patch_size
        self.transformer = TransformerStack(media, self.grid * self.grid)
        self.augment = media.augment

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def forward(self, images: Tensor, group: int = 1) -> Tensor:
        if self.training and self.augment:
            images = flip_and_shift(images, group)
        x = self.patch((images - 0.5) / 0.25).flatten(2).transpose(1, 2)  # (B, (S/P)^2, D)
        return self.transformer(x)


class AudioEncoder(nn.Module):
    """Waveforms (B, N) of ``max_seconds * sample_rate`` samples -> (B, frames / 4, D): log-Mel
    spectrogram (:class:`LogMelSpectrogram`), two 3-wide 1-D convs of stride 2 with GELU, learned
    positions, ``n_layer`` transformer blocks."""

    def __init__(self, media: MediaConfig):
        super().__init__()
        self.samples = round(media.max_seconds * media.sample_rate)
        self.mel = LogMelSpectrogram(media.sample_rate, media.n_fft, media.hop_length, media.n_mels)
        self.conv1 = nn.Conv1d(media.n_mels, media.width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(media.width, media.width, 3, stride=2, padding=1)
        frames = self.mel.frames(self.samples)
        self.tokens = math.ceil(math.ceil(frames / 2) / 2)
        self.transformer = TransformerStack(media, self.tokens)
        self.augment = media.augment

    @property
    def num_tokens(self) -> int:
        return self.tokens

    def forward(self, waveforms: Tensor) -> Tensor:
        if self.training and self.augment:
            waveforms = perturb_waveforms(waveforms)
        x = self.mel(waveforms)                      # (B, n_mels, frames)
        if self.training and self.augment:
            x = spec_augment(x)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x))))  # (B, D, frames / 4)
        return self.transformer(x.transpose(1, 2))   # (B, K, D)


class VideoEncoder(nn.Module):
    """Clips (B, F, 3, S, S) -> (B, F, D) (``temporal: transformer``) or (B, 1, D) (``mean``): every
    frame through the image encoder, its cells flattened and projected to one vector (so where things
    are in the frame survives), then a temporal transformer over the frames, or their average."""

    def __init__(self, media: MediaConfig):
        super().__init__()
        self.frames, self.temporal = media.frames, media.temporal
        self.image = ViT(media) if media.encoder == "vit" else ImageCNN(media)
        self.frame_proj = nn.Linear(self.image.num_tokens * media.width, media.width)
        self.transformer = TransformerStack(media, media.frames) if media.temporal == "transformer" else None

    @property
    def num_tokens(self) -> int:
        return self.frames if self.temporal == "transformer" else 1

    def forward(self, clips: Tensor) -> Tensor:
        B, frames = clips.shape[:2]
        cells = self.image(clips.flatten(0, 1), group=frames)            # (B*F, K_image, D)
        x = self.frame_proj(cells.flatten(1)).view(B, frames, -1)         # (B, F, D)
        if self.transformer is None:
            return x.mean(dim=1, keepdim=True)                            # (B, 1, D)
        return self.transformer(x)


def build_encoder(media: MediaConfig) -> nn.Module:
    """The encoder of a resolved :class:`MediaConfig` (modality and encoder filled in)."""
    if media.modality == "audio":
        return AudioEncoder(media)
    if media.modality == "video":
        return VideoEncoder(media)
    if media.modality == "image":
        return ViT(media) if media.encoder == "vit" else ImageCNN(media)
    raise ValueError(f"no encoder for modality {media.modality!r}")
