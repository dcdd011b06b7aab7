"""Decoding images, recordings and clips into tensors, with well-kept decoders only.

==================  =================================================  ==============================
function            accepts                                            returns
==================  =================================================  ==============================
:func:`load_image`  a path, bytes (PNG, JPEG, ... via Pillow), a PIL   (3, H, W) float32 in [0, 1]
                    image, an (H, W[, 3|4]) array (uint8 or 0-1 floats)
                    or a (3, H, W) tensor
:func:`load_audio`  a path or bytes (WAV, FLAC, OGG via soundfile;     (N,) float32 mono in [-1, 1]
                    MP3, M4A, ... via PyAV), samples (N,) / (N, C), or  at the asked sample rate
                    ``(samples, sample_rate)``
:func:`load_video`  a video file's path or bytes (PyAV), a folder of   (F, 3, H, W) float32 in [0, 1]
                    frames, a list of images, an (F, H, W, 3) uint8 or
                    (F, 3, H, W) float array
==================  =================================================  ==============================

Every failure (a missing or corrupt file, an unsupported format, an empty recording, a clip without
frames, an image over :data:`MAX_IMAGE_PIXELS`, checked from the header before the pixels are decoded)
is a :class:`~lmforge.errors.DataError` with one line naming what was given. :func:`write_video` writes
real MP4 files (atomically), for benchmarks and tests.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.errors import DataError
from lmforge.fileio import atomic_path

MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused before their pixels are decoded
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv", ".m4v")


def _name(source: Any) -> str:
    """How an error message names a source."""
    if isinstance(source, (bytes, bytearray)):
        return f"the given bytes ({len(source):,} bytes)"
    if isinstance(source, (str, Path)):
        return str(source)
    return f"the given {type(source).__name__}"


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file: {path}")
    return path


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------
def load_image(source: Any, size: int | tuple[int, int] | None = None) -> Tensor:
    """An RGB image (3, H, W) in [0, 1]; with ``size`` (an int: square), resized bilinearly to it."""
    from PIL import Image

    image = _pil_image(source)
    if size is not None:
        width, height = (size, size) if isinstance(size, int) else (size[1], size[0])
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    return pixels.permute(2, 0, 1).float() / 255.0


def _pil_image(source: Any) -> Any:
    """A decoded RGB PIL image from any accepted source."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, Tensor):
        source = source.detach().cpu()
        if source.dim() == 3 and source.shape[0] in (1, 3):
            source = source.permute(1, 2, 0)
        source = source.numpy()
    if isinstance(source, np.ndarray):
        return Image.fromarray(_uint8_pixels(source)).convert("RGB")
    if isinstance(source, (str, Path)):
        opened: Any = _existing(source)
    elif isinstance(source, (bytes, bytearray)):
        opened = io.BytesIO(source)
    else:
        raise DataError(f"cannot read an image from {_name(source)}: give a path, bytes, a PIL image or an array")
    try:
        image = Image.open(opened)
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise DataError(f"{_name(source)}: an image of {width}x{height} pixels exceeds the limit of "
                            f"{MAX_IMAGE_PIXELS:,} pixels")
        return image.convert("RGB")
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{_name(source)} is not a readable image: {_one_line(exc)}") from None


def _uint8_pixels(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) pixels as uint8."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise DataError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), not {tuple(array.shape)}")
    if array.dtype != np.uint8:
        array = np.clip(np.asarray(array, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


# ------------------------------------------------------------------------------------------
# Audio
# ------------------------------------------------------------------------------------------
def load_audio(source: Any, sample_rate: int) -> Tensor:
    """A mono recording (N,) in [-1, 1] at ``sample_rate`` (resampled with a polyphase filter)."""
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], (int, np.integer)):
        samples, rate = _as_samples(source[0]), int(source[1])
    elif isinstance(source, (np.ndarray, Tensor)):
        samples, rate = _as_samples(source), sample_rate
    elif isinstance(source, (str, Path, bytes, bytearray)):
        samples, rate = _decode_audio(source)
    else:
        raise DataError(f"cannot read a recording from {_name(source)}: give a path, bytes, an array of samples "
                        f"or (samples, sample_rate)")
    if samples.size == 0:
        raise DataError(f"{_name(source)} holds no audio samples")
    if rate != sample_rate:
        from scipy.signal import resample_poly

        divisor = math.gcd(rate, sample_rate)
        samples = resample_poly(samples, sample_rate // divisor, rate // divisor)
    return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))


def _as_samples(array: Any) -> np.ndarray:
    """Samples (N,) or (N, C) (channels averaged) as float32."""
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind in "iu":  # integer PCM
        array = array.astype(np.float32) / float(np.iinfo(array.dtype).max)
    array = array.astype(np.float32)
    if array.ndim == 2:
        array = array.mean(axis=1)
    if array.ndim != 1:
        raise DataError(f"audio samples must be (N,) or (N, channels), not {tuple(array.shape)}")
    return array


def _decode_audio(source: str | Path | bytes | bytearray) -> tuple[np.ndarray, int]:
    """(samples (N,), sample rate) of an audio file: soundfile, else PyAV."""
    import soundfile

    if isinstance(source, (str, Path)):
        _existing(source)
    try:
        data, rate = soundfile.read(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source),
                                    dtype="float32", always_2d=True)
        return data.mean(axis=1), int(rate)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
        pass
    return _decode_audio_av(source)


def _decode_audio_av(source: str | Path | bytes | bytearray) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)) as container:
            if not container.streams.audio:
                raise DataError(f"{_name(source)} has no audio stream")
            stream = container.streams.audio[0]
            chunks = [frame.to_ndarray().astype(np.float32).reshape(len(frame.layout.channels), -1)
                      for frame in container.decode(stream)]
            rate = stream.rate or stream.codec_context.sample_rate
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise DataError(f"{_name(source)} is not a readable recording: {_one_line(exc)}") from None
    if not chunks:
        raise DataError(f"{_name(source)} holds no audio samples")
    samples = np.concatenate(chunks, axis=1).mean(axis=0)
    if np.abs(samples).max() > 1.5:  # integer sample formats
        samples = samples / 32768.0
    return samples, int(rate)


# ------------------------------------------------------------------------------------------
# Video
# ------------------------------------------------------------------------------------------
def load_video(source: Any, frames: int, size: int | tuple[int, int]) -> Tensor:
    """``frames`` frames (F, 3, H, W) in [0, 1] sampled uniformly over the clip (the first and the
    last included), each resized to ``size``."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        files = sorted(p for p in Path(source).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        if not files:
            raise DataError(f"{source}: the folder holds no frames (.png, .jpg, .jpeg, .bmp)")
        chosen = [files[i] for i in _uniform(len(files), frames)]
        return torch.stack([load_image(f, size) for f in chosen])
    if isinstance(source, (np.ndarray, Tensor)):
        clip = source if isinstance(source, Tensor) else torch.from_numpy(np.asarray(source))
        if clip.dim() != 4:
            raise DataError(f"a clip array must be (F, H, W, 3) or (F, 3, H, W), not {tuple(clip.shape)}")
        if clip.shape[1] == 3 and clip.shape[-1] != 3:
            clip = clip.permute(0, 2, 3, 1)
        images: Sequence[Any] = [frame.numpy() for frame in clip]
    elif isinstance(source, list):
        images = source
    elif isinstance(source, (str, Path, bytes, bytearray)):
        images = _decode_video(source)
    else:
        raise DataError(f"cannot read a clip from {_name(source)}: give a video file, a folder of frames, a list "
                        f"of images or an array")
    if not images:
        raise DataError(f"{_name(source)} holds no frames")
    return torch.stack([load_image(images[i], size) for i in _uniform(len(images), frames)])


def _uniform(count: int, frames: int) -> list[int]:
    return [round(float(i)) for i in np.linspace(0, count - 1, frames)]


def _decode_video(source: str | Path | bytes | bytearray) -> list[np.ndarray]:
    import av

    if isinstance(source, (str, Path)):
        _existing(source)
    try:
        with av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)) as container:
            if not container.streams.video:
                raise DataError(f"{_name(source)} has no video stream")
            return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise DataError(f"{_name(source)} is not a readable video: {_one_line(exc)}") from None


def write_video(path: str | Path, frames: Tensor, fps: int = 8) -> None:
    """Write frames (F, 3, H, W) in [0, 1] as an MP4 file (H.264 where PyAV has it, else MPEG-4 part 2),
    atomically. H and W must be even (the yuv420p pixel format halves the colour resolution)."""
    import av

    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be (F, 3, H, W), not {tuple(frames.shape)}")
    height, width = frames.shape[2:]
    if height % 2 or width % 2:
        raise ValueError(f"video frames need an even height and width, not {height}x{width}")
    pixels = (frames.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with atomic_path(path) as temporary:
        with av.open(str(temporary), mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "12", "preset": "veryfast"}
            else:
                stream.bit_rate = 2_000_000
            for frame in pixels:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
