"""Calibration videos: a video file (``clip.mp4``) or a list of frame images, as a (T, H, W, 3)
uint8 array that the model's own video processor turns into inputs.

transformers' video processors need torchvision. Frames given as images need nothing else;
a video file needs a decoder besides (PyAV: ``pip install av``; or torchcodec, decord, OpenCV).
Long videos are sampled uniformly down to :data:`MAX_FRAMES` frames.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tamp_fx.errors import TampError, first_line

MAX_FRAMES = 8  # frames per calibration video: enough tokens for the statistics, a bounded cost
_DECODERS = ("pyav", "torchcodec", "decord", "opencv")  # transformers.video_utils.load_video backends


def video_problem(processor: Any) -> str | None:
    """Why ``processor`` cannot turn a video into inputs (None: it can), with what to do."""
    from transformers.utils import is_torchvision_available
    if getattr(processor, "video_processor", None) is not None:
        return None
    if "video_processor" not in inspect.signature(type(processor).__init__).parameters:
        return "the model takes no video"
    if not is_torchvision_available():
        return ("transformers' video processors need torchvision: pip install torchvision "
                "(the build that matches your torch), or drop the video samples")
    return "its processor was saved without a video processor: add one to the model's processor_config.json"


def _uniform(n_total: int, n: int = MAX_FRAMES) -> np.ndarray:
    """Indices of ``min(n, n_total)`` frames spread evenly over ``n_total``.

    >>> _uniform(20, 4).tolist()
    [0, 6, 12, 19]
    """
    return np.linspace(0, n_total - 1, min(n, n_total)).round().astype(int)


def installed_decoder() -> str | None:
    """The name of the first installed video decoder in :data:`_DECODERS` order, or None."""
    from transformers.utils import import_utils as iu
    available: dict[str, Callable[[], bool]] = {"pyav": iu.is_av_available, "torchcodec": iu.is_torchcodec_available,
                                                "decord": iu.is_decord_available, "opencv": iu.is_cv2_available}
    return next((name for name in _DECODERS if available[name]()), None)


def load_video(paths: list[Path], load_image: Callable[[Path], Any]) -> np.ndarray:
    """One video as (T, H, W, 3) uint8: the frames of one video file, or the image files ``paths``
    (in order, all of one size), sampled to at most :data:`MAX_FRAMES` frames."""
    if len(paths) == 1 and paths[0].suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        return _decode(paths[0])
    frames = [np.asarray(load_image(paths[i])) for i in _uniform(len(paths))]   # T x (H, W, 3)
    sizes = {f.shape for f in frames}
    if len(sizes) != 1:
        raise TampError(f"the frames of calibration video {paths[0].parent} differ in size ({sorted(sizes)}): "
                        "give frames of one size")
    return np.stack(frames)                                                     # (T, H, W, 3)


def _decode(path: Path) -> np.ndarray:
    from transformers.video_utils import load_video as hf_load_video
    backend = installed_decoder()
    if backend is None:
        raise TampError(f"calibration video {path} needs a video decoder: pip install av "
                        "(or give the video as a list of frame images)")
    try:
        frames, _ = hf_load_video(str(path), backend=backend,
                                  sample_indices_fn=lambda metadata, **_: _uniform(metadata.total_num_frames))
    except Exception as error:  # noqa: BLE001 - any decoder failure is a bad input file
        raise TampError(f"calibration video {path} cannot be decoded with {backend} ({first_line(error)}): "
                        "pass an .mp4 / .webm / .avi file or a list of frame images") from error
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise TampError(f"calibration video {path} has no frames")
    return frames.astype(np.uint8)                                              # (T, H, W, 3)
