"""Training-time augmentation of media inputs (``media.augment``), applied by the encoders in training
mode only, with torch's global generator (saved in checkpoints, like dropout's, so a resumed run
draws the same numbers).

- Recordings: speed perturbation (each example played 0.85-1.15x as fast: pitch and tempo move
  together, a cheap stand-in for another speaker's voice), a random gain of +-6 dB and white noise
  at 20-40 dB SNR; then, on the log-Mel features, SpecAugment's masks (two bands of up to an eighth
  of the mel bins, two spans of up to a tenth of the frames).
- Images (and video frames): a random horizontal flip and a random shift of up to an eighth of the
  side (zero padding, then a crop back to size), the same for every frame of a clip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def perturb_waveforms(waves: Tensor) -> Tensor:
    """(B, N) -> (B, N): every row resampled by a random speed factor (cut or padded with silence
    back to N samples), a random gain and white noise."""
    B, N = waves.shape
    rows = []
    for wave, factor in zip(waves, torch.empty(B).uniform_(0.85, 1.15).tolist()):
        length = max(2, round(N / factor))
        stretched = F.interpolate(wave[None, None], size=length, mode="linear", align_corners=False)[0, 0]
        rows.append(F.pad(stretched[:N], (0, max(0, N - length))))
    out = torch.stack(rows)
    out = out * 10 ** (torch.empty(B, 1, device=waves.device).uniform_(-6, 6) / 20)
    power = out.pow(2).mean(dim=1, keepdim=True).clamp(min=1e-10)
    snr = torch.empty(B, 1, device=waves.device).uniform_(20, 40)
    return out + torch.randn_like(out) * (power / 10 ** (snr / 10)).sqrt()


def spec_augment(features: Tensor, masks: int = 2) -> Tensor:
    """(B, M, T) log-Mel features with ``masks`` frequency bands and time spans set to each row's mean."""
    B, M, T = features.shape
    out = features.clone()
    fill = features.mean(dim=(1, 2))
    for row in range(B):
        for _ in range(masks):
            width = int(torch.randint(0, max(1, M // 8) + 1, ()))
            start = int(torch.randint(0, M - width + 1, ()))
            out[row, start:start + width, :] = fill[row]
            span = int(torch.randint(0, max(1, T // 10) + 1, ()))
            begin = int(torch.randint(0, T - span + 1, ()))
            out[row, :, begin:begin + span] = fill[row]
    return out


def flip_and_shift(images: Tensor, group: int = 1) -> Tensor:
    """(B * group, 3, S, S) -> same shape: each run of ``group`` images (a clip's frames) flipped
    horizontally with probability 1/2 and shifted by up to S/8 pixels, all alike."""
    N, _, S, _ = images.shape
    B, pad = N // group, max(1, S // 8)
    flips = (torch.rand(B) < 0.5).repeat_interleave(group)
    out = torch.where(flips.view(N, 1, 1, 1).to(images.device), images.flip(-1), images)
    padded = F.pad(out, (pad, pad, pad, pad))
    shifts = torch.randint(0, 2 * pad + 1, (B, 2)).repeat_interleave(group, dim=0).tolist()
    return torch.stack([padded[i, :, y:y + S, x:x + S] for i, (y, x) in enumerate(shifts)])
