"""The ``--decode`` names, and the pipeline a name and a transform stand for."""

from __future__ import annotations

import torch
from torchvision import transforms as T

from ...transforms import MEAN, STD, ToRGB
from .base import InputPipeline
from .crops import ExactPipeline
from .turbo import TurboPipeline
from .whole import DeviceResizePipeline

__all__ = ["DECODE_CHOICES", "PIPELINES", "make_pipeline", "pipeline_for_transform", "resolve_decode"]

PIPELINES: dict[str, type[InputPipeline]] = {p.decode: p for p in (ExactPipeline, DeviceResizePipeline, TurboPipeline)}
DECODE_CHOICES = tuple(PIPELINES)
# ``auto`` by device type: the fastest exact pipeline there. A CPU's cores are the workers'
# cores, and PIL's resize costs less there than the exact replay; on CUDA the workers only decode.
_AUTO = {"cuda": "device-resize"}


def resolve_decode(decode: str, device: torch.device | str) -> str:
    """``auto``: ``device-resize`` on CUDA, ``exact`` elsewhere; other names are returned as they are."""
    if decode == "auto":
        return _AUTO.get(torch.device(device).type, "exact")
    if decode not in PIPELINES:
        raise ValueError(f"unknown decode {decode!r}: expected auto or one of {DECODE_CHOICES}")
    return decode


def make_pipeline(decode: str = "exact", n_px: int = 224, resize: int | None = None) -> InputPipeline:
    """The ``decode`` pipeline for crops of ``n_px`` after resizing the shorter side to ``resize``
    (default ``n_px``). ``turbo`` raises ImportError where simplejpeg is missing."""
    if decode not in PIPELINES:
        raise ValueError(f"unknown decode {decode!r}: expected one of {DECODE_CHOICES}")
    return PIPELINES[decode](n_px, resize)


def _resize_crop_sizes(transform) -> tuple[int, int] | None:
    """(resize, crop) when ``transform`` is the published eval/test transform, else None."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or steps is None or len(steps) != 5:
        return None
    rgb, resize, crop, to_tensor, normalize = steps
    if not (isinstance(rgb, ToRGB) and isinstance(resize, T.Resize) and isinstance(crop, T.CenterCrop)
            and isinstance(to_tensor, T.ToTensor) and isinstance(normalize, T.Normalize)):
        return None
    size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
    if (size is None or resize.interpolation != T.InterpolationMode.BICUBIC or resize.max_size is not None
            or resize.antialias is False or crop.size[0] != crop.size[1]):
        return None
    if tuple(normalize.mean) != MEAN or tuple(normalize.std) != STD or normalize.inplace:
        return None
    return int(size), int(crop.size[0])


def pipeline_for_transform(transform, decode: str = "exact") -> InputPipeline | None:
    """The ``decode`` pipeline giving what ``transform`` gives, when it is the published eval or
    test transform (their resize and crop sizes are kept); None for any other transform."""
    sizes = _resize_crop_sizes(transform)
    return make_pipeline(decode, n_px=sizes[1], resize=sizes[0]) if sizes is not None else None
