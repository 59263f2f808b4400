"""A dataset of images with integer labels, the error raised for an undecodable image, and the
checks that keep bad files from passing as images: only regular files are opened, and JPEGs
whose compressed data libjpeg reports as corrupt (which PIL decodes without a word) are found,
counted and named, or with ``strict`` treated as bad images."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from ..transforms import to_rgb as _to_rgb

__all__ = ["BadImageError", "ImageDataset", "Sample", "check_jpegs", "jpeg_check_available", "jpeg_damage",
           "open_image_file"]

logger = logging.getLogger(__name__)

# A sample is a file to open, or an image already in memory (a PIL image, or a uint8 array
# of shape (H, W) or (H, W, C) as Image.fromarray accepts it).
Sample = Union[str, os.PathLike, Image.Image, np.ndarray]

# What PIL raises for files it cannot decode: OSError covers missing, empty, truncated and
# unidentified files (UnidentifiedImageError is an OSError); some plugins raise SyntaxError
# or ValueError on malformed headers; DecompressionBombError guards absurd sizes.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class NotAFileError(OSError):
    """A path that names something other than a regular file (a FIFO, socket, device or folder)."""


_KINDS = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
          stat.S_ISBLK: "a block device", stat.S_ISDIR: "a folder"}


def open_image_file(path: str | os.PathLike) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file, else :class:`NotAFileError` (an
    OSError). The file is opened without blocking and checked through its descriptor, so a FIFO
    named ``x.jpg`` is refused at once instead of waiting forever for a writer."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS.items() if test(mode)), "not a regular file")
            raise NotAFileError(f"{os.fspath(path)} is {kind}, not an image file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def jpeg_check_available() -> bool:
    """Whether damaged JPEG data can be detected here (it needs the simplejpeg package)."""
    from ._pipelines import jpeg

    return jpeg.available()


def jpeg_damage(data: bytes) -> str | None:
    """What libjpeg reports as corrupt in a JPEG it can decode anyway (``Corrupt JPEG data: ...``,
    ``Premature end of JPEG file``), else None: None also for non-JPEG bytes, for files libjpeg
    cannot decode at all (the decoder's own error decides those) and without simplejpeg.

    PIL hides these warnings and decodes such files with wrong pixels; libjpeg-turbo's TurboJPEG
    API (through simplejpeg) stops at them. The check decodes grayscale at 1/8 scale: the
    entropy-coded data, where the damage is found, is read in full either way.
    """
    from ._pipelines import jpeg

    module = jpeg._module()
    if module is None or data[:3] != b"\xff\xd8\xff":
        return None
    try:
        module.decode_jpeg(data, "GRAY", min_factor=8, strict=True)
        return None
    except ValueError as warning:
        try:  # decodable when warnings are ignored: the file is damaged, not unsupported
            module.decode_jpeg(data, "GRAY", min_factor=8, strict=False)
        except ValueError:
            return None
        return " ".join(str(warning).split())


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
        # index -> what libjpeg reported; filled by check_jpegs (rejected: with strict=True)
        self.damaged: dict[int, str] = {}
        self.rejected: dict[int, str] = {}
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
        if index in self.rejected:
            raise BadImageError(self.paths[index], f"damaged JPEG data ({self.rejected[index]}); strict image "
                                "checks are on")
        try:
            with open_image_file(sample) as f, Image.open(f) as image:
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


def _damage_of(dataset: ImageDataset, index: int) -> str | None:
    sample = dataset.samples[index]
    if isinstance(sample, (Image.Image, np.ndarray)):
        return None
    try:
        with open_image_file(sample) as f:
            data = f.read()
    except OSError:
        return None  # missing or not a file: loading the image reports it
    return jpeg_damage(data)


def check_jpegs(dataset: ImageDataset, strict: bool = False, threads: int | None = None) -> dict[int, str]:
    """Find the JPEGs of ``dataset`` whose compressed data libjpeg reports as corrupt: {index: what
    it reported}, the same on every process (each checks its share of the files, then the
    indices are gathered). They are recorded in ``dataset.damaged``; PIL still decodes them, as
    the published pipeline does, unless ``strict``: then they are bad images (``dataset.rejected``),
    and without ``skip_bad_images`` the first one raises :class:`BadImageError` here, before any
    embedding. Without simplejpeg nothing can be checked and the result is empty (see
    :func:`jpeg_check_available`)."""
    import torch

    from .. import _distributed as dist

    if not jpeg_check_available():
        return {}
    share = dist.shard_range(len(dataset))
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:  # simplejpeg and file reads release the GIL
        found = {i: reason for i, reason in zip(share, pool.map(lambda i: _damage_of(dataset, i), share))
                 if reason is not None}
    indices = dist.all_gather_varlen(torch.tensor(sorted(found), dtype=torch.long)).tolist()
    # Another process's finding: checked again here for its message (damaged files are few).
    damaged = {i: found.get(i) or _damage_of(dataset, i) or "corrupt JPEG data" for i in indices}
    dataset.damaged = damaged
    if strict:
        dataset.rejected = dict(damaged)
        if damaged and not dataset.skip_bad_images:
            first = min(damaged)
            more = f" (and {len(damaged) - 1} other damaged JPEG(s))" if len(damaged) > 1 else ""
            raise BadImageError(dataset.paths[first], f"damaged JPEG data ({damaged[first]}){more}; "
                                "strict image checks are on")
    return damaged
