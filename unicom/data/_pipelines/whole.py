"""``device-resize``: the workers only decode; the device replays Pillow's resize exactly."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...transforms import to_rgb
from ..image import _DECODE_ERRORS, ImageDataset, open_image_file
from .base import InputPipeline
from .batches import Allocate, WholeImages, fetch
from .resample import pad, padded_tables, plan, resize_padded

__all__ = ["DeviceResizePipeline", "Pending", "SLOT_POOL_MB"]

SLOT_POOL_MB = 2048  # default cap of a whole-image loader's slots (shared, and on CUDA pinned, memory)
_IMAGE_ALLOWANCE = 3 * 1024 * 768  # bytes per decoded image a slot plans for where no image can be sampled


class Pending(ABC):
    """An image whose size is known before its pixels: decoded straight into its place in the batch."""

    size: tuple[int, int]  # (h, w)
    path: str

    @abstractmethod
    def decode_into(self, out: np.ndarray) -> bool:
        """Write the (h, w, 3) uint8 pixels into ``out``; False where this decoder refuses the file."""

    @abstractmethod
    def fallback(self) -> tuple[torch.Tensor, bool]:
        """(h, w, 3) pixels and ok, decoded by PIL, for a file :meth:`decode_into` refused."""


def _hwc(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8))  # (H, W, 3)


def _size(image: torch.Tensor | Pending) -> tuple[int, int]:
    return image.size if isinstance(image, Pending) else (image.shape[0], image.shape[1])


def _write(image: torch.Tensor | Pending, ok: bool, target: torch.Tensor, size: tuple[int, int]) -> bool:
    """Put one image in its place in the batch's buffer; returns its ok."""
    if isinstance(image, Pending):
        if image.decode_into(target.numpy().reshape(*size, 3)):
            return ok
        pending, (image, ok) = image, image.fallback()  # the fast decoder refused it: PIL decides
        if tuple(image.shape) != (*size, 3):
            if ok:
                raise RuntimeError(f"{pending.path}: PIL decoded {tuple(image.shape)}, the JPEG header says "
                                   f"{(*size, 3)}")
            target.zero_()  # a bad image, skipped: its row is dropped (ok False)
            return ok
    target.copy_(image.reshape(-1))
    return ok


def _slot_pool_bytes() -> int:
    value = os.environ.get("UNICOM_SLOT_POOL_MB", str(SLOT_POOL_MB))
    try:
        megabytes = int(value)
    except ValueError:
        raise ValueError(f"UNICOM_SLOT_POOL_MB must be a whole number of MiB, got {value!r}") from None
    return max(megabytes, 0) << 20


def _image_allowance(dataset: ImageDataset, samples: int = 32, margin: float = 1.25) -> int:
    """Bytes per decoded image a slot plans for: ``margin`` times the largest of ``samples``
    images spread over the dataset (their headers only: PIL reads no pixels here)."""
    if len(dataset) == 0:
        return _IMAGE_ALLOWANCE
    largest = 0
    for i in np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).astype(int).tolist():
        sample = dataset.samples[i]
        try:
            if isinstance(sample, np.ndarray):
                h, w = sample.shape[:2]
            elif isinstance(sample, Image.Image):
                w, h = sample.size
            else:
                with open_image_file(sample) as f, Image.open(f) as image:
                    w, h = image.size
        except _DECODE_ERRORS:  # unreadable or refused: the loader reports it; plan generously
            return _IMAGE_ALLOWANCE
        largest = max(largest, 3 * w * h)
    return int(margin * largest) if largest else _IMAGE_ALLOWANCE


@dataclass(frozen=True)
class DeviceResizePipeline(InputPipeline):
    """PIL decodes in the workers, which send whole images; the device resizes and crops them
    with Pillow's own integer coefficients (:mod:`.resample`): bit-identical, and the workers
    only decode. For GPUs: on a CPU the dense float64 matmuls cost more than PIL's resize."""

    decode = "device-resize"
    exact = True
    resizes_on_device = True

    def load(self, dataset: ImageDataset, index: int) -> tuple[torch.Tensor | Pending, bool]:
        return self._pil(dataset, index, _hwc)

    def assemble(self, images: list[Any], ok: np.ndarray, allocate: Allocate,
                 normalize: bool = False) -> tuple[WholeImages, np.ndarray]:
        """The images back to back, group by group of :func:`.resample.plan` (a group of one size
        is one (G, h, w, 3) block); pending images are decoded in their place. ``normalize`` is
        ignored: the device resizes first."""
        sizes = [_size(x) for x in images]
        groups = plan(sizes, self.resize, self.n_px)
        order = [i for positions, _ in groups for i in positions]
        ends = np.cumsum([3 * sizes[i][0] * sizes[i][1] for i in order]).tolist()
        flat, data = allocate(ends[-1])
        offsets = [0] * len(images)
        for i, end in zip(order, ends):
            offsets[i] = end - 3 * sizes[i][0] * sizes[i][1]
            ok[i] = _write(images[i], bool(ok[i]), flat[offsets[i]:end], sizes[i])
        tables = [tuple(t.numpy() for t in padded_tables([sizes[i] for i in positions], self.resize, self.n_px))
                  for positions, _ in groups]
        return WholeImages(data, sizes, offsets, [(p, f, t) for (p, f), t in zip(groups, tables)]), ok

    def slot_bytes(self, dataset: ImageDataset, batch_size: int, num_slots: int) -> int:
        """Within ``UNICOM_SLOT_POOL_MB`` (0 turns these slots off); a batch that does not fit
        its slot is written to fresh memory."""
        pool = _slot_pool_bytes()
        return max(1, min(batch_size * _image_allowance(dataset), pool // num_slots)) if pool else 0

    def pixels(self, batch: WholeImages, device: torch.device) -> torch.Tensor:
        flat = fetch(batch.data, device)
        out = torch.empty(len(batch), 3, self.n_px, self.n_px, dtype=torch.uint8, device=device)
        for positions, vertical_first, tables in batch.groups:
            sizes = [batch.sizes[i] for i in positions]
            starts = [batch.offsets[i] for i in positions]
            if len(set(sizes)) == 1:  # one block, back to back: a view, no copies
                (h, w), count = sizes[0], len(sizes)
                padded = flat[starts[0]:starts[0] + count * h * w * 3].view(count, h, w, 3)
            else:
                padded = pad([flat[s:s + h * w * 3].view(h, w, 3) for s, (h, w) in zip(starts, sizes)])
            result = resize_padded(padded, sizes, self.resize, self.n_px, vertical_first, tables)
            out[torch.tensor(positions, device=device)] = result
        return out
