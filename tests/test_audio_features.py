"""The log-Mel front end against an independent computation: transformers' numpy implementation of
the mel filterbank and of Whisper's log-Mel features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.models.multimodal.audio_features import LogMelSpectrogram, mel_filterbank

audio_utils = pytest.importorskip("transformers.audio_utils")


def chirp_with_noise(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(0).standard_normal(t.shape)
    return (0.5 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.05 * noise).astype(np.float32)


@pytest.mark.parametrize("n_fft, n_mels, rate", [(400, 80, 16000), (200, 40, 8000)])
def test_the_filterbank_is_slaney_as_in_librosa_and_whisper(n_fft, n_mels, rate):
    reference = audio_utils.mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels,
                                            min_frequency=0.0, max_frequency=rate / 2, sampling_rate=rate,
                                            norm="slaney", mel_scale="slaney")
    torch.testing.assert_close(mel_filterbank(n_fft, n_mels, rate), torch.from_numpy(reference).float(),
                               atol=1e-6, rtol=1e-5)


def test_log_mel_features_equal_whispers():
    from transformers import WhisperFeatureExtractor

    signal = chirp_with_noise(1.0, 16000)
    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, n_fft=400)
    reference = np.asarray(extractor._np_extract_fbank_features(signal[None], "cpu"))  # (1, 80, 100), no padding
    ours = LogMelSpectrogram(16000, 400, 160, 80)(torch.from_numpy(signal))
    assert ours.shape == (1, 80, 100) == reference.shape
    torch.testing.assert_close(ours, torch.from_numpy(reference).float(), atol=1e-4, rtol=1e-4)


def test_a_batch_equals_its_rows_and_frames_counts_the_output():
    front = LogMelSpectrogram(8000, 200, 80, 40)
    batch = torch.from_numpy(np.stack([chirp_with_noise(0.5, 8000), chirp_with_noise(0.5, 8000)[::-1].copy()]))
    features = front(batch)
    assert features.shape == (2, 40, front.frames(4000)) == (2, 40, 50)
    for row in range(2):
        torch.testing.assert_close(features[row], front(batch[row])[0])
