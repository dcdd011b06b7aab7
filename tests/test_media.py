"""Media decoding: images, recordings and clips from files, bytes and arrays, and the errors promised
for missing, corrupt and oversized inputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from lmforge.data import media
from lmforge.data.media import load_audio, load_image, load_video, write_video
from lmforge.errors import DataError


def one_line_error(call, match: str) -> str:
    with pytest.raises(DataError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------
@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)


def test_an_image_reads_the_same_from_a_path_bytes_pil_and_arrays(tmp_path, pixels):
    Image.fromarray(pixels).save(tmp_path / "a.png")
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), (tmp_path / "a.png").read_bytes(),
                   Image.open(tmp_path / "a.png"), pixels, pixels / 255.0):
        image = load_image(source)
        assert image.shape == (3, 12, 20) and image.dtype == torch.float32
        torch.testing.assert_close(image, expected, atol=1 / 255, rtol=0)


def test_jpeg_grey_and_rgba_images_become_rgb_and_resize(tmp_path, pixels):
    smooth = np.stack([*np.meshgrid(np.linspace(0, 255, 20), np.linspace(0, 255, 12)), np.full((12, 20), 128.0)],
                      axis=2).astype(np.uint8)  # gradients: what JPEG keeps well
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    jpeg = load_image(tmp_path / "a.jpg")
    assert (jpeg - torch.from_numpy(smooth).permute(2, 0, 1) / 255).abs().mean() < 0.03
    grey = load_image(Image.fromarray(pixels[..., 0]))
    assert grey.shape == (3, 12, 20) and torch.equal(grey[0], grey[2])
    rgba = np.concatenate([pixels, np.full((12, 20, 1), 255, np.uint8)], axis=2)
    assert load_image(rgba).shape == (3, 12, 20)
    assert load_image(pixels, size=8).shape == (3, 8, 8) and load_image(pixels, size=(6, 10)).shape == (3, 6, 10)


def test_bad_images_are_one_line_data_errors(tmp_path, monkeypatch, pixels):
    one_line_error(lambda: load_image(b"definitely not a png"), "the given bytes .* not a readable image")
    one_line_error(lambda: load_image(tmp_path / "missing.png"), "no such file")
    one_line_error(lambda: load_image(np.zeros((4, 4, 2))), r"must be \(H, W\)")
    Image.fromarray(pixels).save(tmp_path / "a.png")
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 100)
    one_line_error(lambda: load_image(tmp_path / "a.png"), "20x12 pixels exceeds the limit of 100")


# ------------------------------------------------------------------------------------------
# Audio
# ------------------------------------------------------------------------------------------
def sine(rate: int, seconds: float = 0.5, hz: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


@pytest.mark.parametrize("suffix", ["wav", "flac"])
def test_recordings_read_from_files_and_bytes_and_resample(tmp_path, suffix):
    wave = sine(8000)
    path = tmp_path / f"a.{suffix}"
    soundfile.write(path, wave, 8000, subtype="PCM_16")
    for source in (path, path.read_bytes()):
        torch.testing.assert_close(load_audio(source, 8000), torch.from_numpy(wave), atol=1 / 16000, rtol=0)
    upsampled = load_audio(path, 16000)
    assert upsampled.shape == (8000,)
    spectrum = np.abs(np.fft.rfft(upsampled.numpy()))
    assert abs(np.argmax(spectrum) * 16000 / 8000 - 440) < 3  # the tone is still 440 Hz


def test_stereo_arrays_and_rate_pairs():
    left, right = sine(8000), sine(8000, hz=880)
    stereo = np.stack([left, right], axis=1)
    torch.testing.assert_close(load_audio(stereo, 8000), torch.from_numpy((left + right) / 2))
    assert load_audio((left, 16000), 8000).shape == (2000,)
    buffer = io.BytesIO()
    soundfile.write(buffer, stereo, 8000, format="WAV")
    torch.testing.assert_close(load_audio(buffer.getvalue(), 8000), torch.from_numpy((left + right) / 2),
                               atol=1e-4, rtol=0)


def test_bad_recordings_are_one_line_data_errors(tmp_path):
    one_line_error(lambda: load_audio(b"RIFF....WAVEnot really", 8000), "not a readable recording")
    one_line_error(lambda: load_audio(tmp_path / "missing.wav", 8000), "no such file")
    one_line_error(lambda: load_audio(np.zeros(0, np.float32), 8000), "holds no audio samples")


# ------------------------------------------------------------------------------------------
# Video
# ------------------------------------------------------------------------------------------
def moving_square(frames: int = 16, size: int = 64) -> torch.Tensor:
    """A white 12-pixel square moving left to right on black: (F, 3, S, S)."""
    clip = torch.zeros(frames, 3, size, size)
    for f in range(frames):
        x = 4 + f * (size - 20) // (frames - 1)
        clip[f, :, 26:38, x:x + 12] = 1.0
    return clip


def centroid_x(frame: torch.Tensor) -> float:
    weights = frame.mean(0)
    return float((weights.sum(0) * torch.arange(frame.shape[-1])).sum() / weights.sum())


def test_an_mp4_clip_round_trips_and_keeps_its_motion(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, moving_square())
    assert path.read_bytes()[4:8] == b"ftyp"  # a real MP4 container
    clip = load_video(path, frames=16, size=64)
    assert clip.shape == (16, 3, 64, 64)
    xs = [centroid_x(frame) for frame in clip]
    assert all(b > a for a, b in zip(xs, xs[1:])) and xs[-1] - xs[0] > 35
    four = load_video(path.read_bytes(), frames=4, size=32)
    assert four.shape == (4, 3, 32, 32)
    assert abs(centroid_x(four[0]) * 2 - xs[0]) < 3 and abs(centroid_x(four[-1]) * 2 - xs[-1]) < 3


def test_clips_from_frame_folders_lists_and_arrays(tmp_path):
    clip = moving_square(8, 32)
    frames = (clip.permute(0, 2, 3, 1) * 255).to(torch.uint8).numpy()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"{i:03d}.png")
    from_folder = load_video(tmp_path, frames=8, size=32)
    torch.testing.assert_close(from_folder, clip, atol=1 / 255, rtol=0)
    torch.testing.assert_close(load_video(list(frames), frames=8, size=32), clip, atol=1 / 255, rtol=0)
    torch.testing.assert_close(load_video(frames, frames=8, size=32), clip, atol=1 / 255, rtol=0)
    assert load_video(clip, frames=3, size=32).shape == (3, 3, 32, 32)


def test_bad_clips_are_one_line_data_errors(tmp_path):
    one_line_error(lambda: load_video(b"\x00\x00\x00\x18ftypmp42 broken", frames=4, size=32), "not a readable video")
    one_line_error(lambda: load_video(tmp_path / "missing.mp4", frames=4, size=32), "no such file")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: load_video(tmp_path / "empty", frames=4, size=32), "holds no frames")
    with pytest.raises(ValueError, match="even height and width"):
        write_video(tmp_path / "odd.mp4", torch.zeros(2, 3, 31, 32))
