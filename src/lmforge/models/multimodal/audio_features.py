"""The audio front end: log-Mel spectrograms computed in torch (no run-time downloads, no librosa).

:func:`mel_filterbank` is librosa's default filterbank (Slaney's mel scale and area normalisation,
the one Whisper uses); :class:`LogMelSpectrogram` is Whisper's recipe on top of it: a centred STFT
with a periodic Hann window, power, mel bands, ``log10``, a floor 8 (80 dB) below each example's
peak, then ``(x + 4) / 4`` so values sit around [-1, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_F_SP = 200.0 / 3          # Slaney: Hz per mel below 1 kHz
_MIN_LOG_HZ = 1000.0       # where the scale turns logarithmic
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: Tensor) -> Tensor:
    linear = hz / _F_SP
    log = _MIN_LOG_MEL + torch.log(hz.clamp(min=_MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
    return torch.where(hz >= _MIN_LOG_HZ, log, linear)


def _mel_to_hz(mel: Tensor) -> Tensor:
    linear = mel * _F_SP
    log = _MIN_LOG_HZ * torch.exp(_LOG_STEP * (mel - _MIN_LOG_MEL))
    return torch.where(mel >= _MIN_LOG_MEL, log, linear)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> Tensor:
    """Triangular mel filters (n_fft // 2 + 1, n_mels), float32: ``librosa.filters.mel`` with
    ``htk=False, norm="slaney"`` (each filter's area is 1 in Hz)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)        # (F,)
    mels = torch.linspace(float(_hz_to_mel(torch.tensor(f_min, dtype=torch.float64))),
                          float(_hz_to_mel(torch.tensor(f_max, dtype=torch.float64))), n_mels + 2,
                          dtype=torch.float64)
    edges = _mel_to_hz(mels)                                                                 # (n_mels + 2,)
    widths = edges.diff()                                                                    # (n_mels + 1,)
    ramps = edges[:, None] - freqs[None, :]                                                  # (n_mels + 2, F)
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = torch.minimum(lower, upper).clamp(min=0)                                       # (n_mels, F)
    weights = weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.T.contiguous().float()


class LogMelSpectrogram(nn.Module):
    """Waveforms (B, N) or (N,) at ``sample_rate`` -> log-Mel features (B, n_mels, N // hop_length)."""

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, hop_length: int = 160, n_mels: int = 80):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)   # periodic
        self.register_buffer("filters", mel_filterbank(n_fft, n_mels, sample_rate), persistent=False)  # (F, M)

    def frames(self, num_samples: int) -> int:
        """Output frames for a waveform of ``num_samples`` samples."""
        return num_samples // self.hop_length

    def forward(self, waveform: Tensor) -> Tensor:
        if waveform.dim() == 1:
            waveform = waveform[None]
        stft = torch.stft(waveform.float(), self.n_fft, self.hop_length, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)                  # (B, F, frames + 1)
        power = stft[..., :-1].abs() ** 2                                             # (B, F, frames)
        mel = torch.einsum("fm,bft->bmt", self.filters, power)                        # (B, n_mels, frames)
        log = mel.clamp(min=1e-10).log10()
        peak = log.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log, peak - 8.0) + 4.0) / 4.0
