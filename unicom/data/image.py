"""A dataset of images with integer labels, and the error raised for an undecodable image."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from ..transforms import to_rgb as _to_rgb

__all__ = ["BadImageError", "ImageDataset", "Sample"]

logger = logging.getLogger(__name__)

# A sample is a file to open, or an image already in memory (a PIL image, or a uint8 array
# of shape (H, W) or (H, W, C) as Image.fromarray accepts it).
Sample = Union[str, os.PathLike, Image.Image, np.ndarray]

# What PIL raises for files it cannot decode: OSError covers missing, empty, truncated and
# unidentified files (UnidentifiedImageError is an OSError); some plugins raise SyntaxError
# or ValueError on malformed headers; DecompressionBombError guards absurd sizes.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadImageError(RuntimeError):
    """An image file that cannot be decoded (truncated, empty, not an image, missing).

    ``BadImageError(path, reason)`` names the file and says how to skip such files. With
    one argument the argument is taken as the whole message: that is how PyTorch's
    DataLoader rebuilds an exception raised in a worker process.
    """

    def __init__(self, path: str | os.PathLike, reason: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        if reason is None:
            message = self.path
        else:
            message = (
                f"cannot decode image {self.path}: {reason}. Remove or replace the file, or pass "
                "--skip-bad-images (skip_bad_images=True) to leave it out of the evaluation."
            )
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.path, self.reason)


def _default_transform(image: Image.Image) -> torch.Tensor:
    return pil_to_tensor(image)  # (3, H, W) uint8


class ImageDataset(torch.utils.data.Dataset):
    """Images with integer labels; item ``i`` is ``(image, label, i, ok)``.

    Images are opened with PIL and decoded fully right away (``.load()``), so a truncated
    file fails at this point rather than later, converted to RGB, then given to
    ``transform`` (default: :func:`torchvision.transforms.functional.pil_to_tensor`, a
    (3, H, W) uint8 tensor).

    A file that cannot be decoded raises :class:`BadImageError`, unless
    ``skip_bad_images`` is set: then the item is ``transform`` applied to a blank image of
    ``placeholder_size`` (width, height) with ``ok=False``, and the caller must drop that row.
    Another image is never substituted, so every index stays its own image.

    Attributes:
        labels: (N,) int64 labels.
        paths: one string per sample: the file path, or ``names[i]`` (default ``<memory i>``)
            for an image held in memory; for visualisation and error messages.
        classes: class names indexed by label, when known.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        labels: Sequence[int] | torch.Tensor,
        transform: Callable[[Image.Image], Any] | None = None,
        skip_bad_images: bool = False,
        classes: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
        placeholder_size: tuple[int, int] = (224, 224),
    ) -> None:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(samples) != labels.numel():
            raise ValueError(f"{len(samples)} samples but {labels.numel()} labels")
        if names is not None and len(names) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(names)} names")
        self.samples = list(samples)
        self.labels = labels
        self.transform = transform if transform is not None else _default_transform
        self.skip_bad_images = skip_bad_images
        self.classes = list(classes) if classes is not None else None
        self.placeholder_size = placeholder_size
        self.paths = [
            (str(names[i]) if names is not None else f"<memory {i}>")
            if isinstance(s, (Image.Image, np.ndarray))
            else os.fspath(s)
            for i, s in enumerate(self.samples)
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of item ``index``; raises :class:`BadImageError` if undecodable."""
        sample = self.samples[index]
        if isinstance(sample, Image.Image):
            return _to_rgb(sample)
        if isinstance(sample, np.ndarray):
            return _to_rgb(Image.fromarray(sample))
        try:
            with Image.open(sample) as image:
                image.load()
                return _to_rgb(image)
        except _DECODE_ERRORS as error:
            raise BadImageError(self.paths[index], f"{type(error).__name__}: {error}") from error

    def __getitem__(self, index: int) -> tuple[Any, int, int, bool]:
        label = int(self.labels[index])
        try:
            image = self.load_image(index)
        except BadImageError as error:
            if not self.skip_bad_images:
                raise
            logger.warning("skipping %s", error.path)
            blank = Image.new("RGB", self.placeholder_size)
            return self.transform(blank), label, index, False
        return self.transform(image), label, index, True

    def __repr__(self) -> str:
        n_classes = len(self.classes) if self.classes is not None else "?"
        return f"{type(self).__name__}({len(self)} images, {n_classes} classes)"
