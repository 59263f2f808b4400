"""``exact``: the published PIL transform in the workers, uint8 crops to the device."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T

from ...transforms import ToRGB
from ..image import ImageDataset
from .base import InputPipeline
from .batches import Allocate, Crops, fetch
from .normalize import normalize_on_device

__all__ = ["ExactPipeline", "eval_transform_uint8"]


def eval_transform_uint8(n_px: int, resize: int | None = None) -> T.Compose:
    """The eval transform up to the crop, returning uint8 (3, n_px, n_px): pixels for the device.

    ``normalize_on_device`` of its output equals ``eval_transform(n_px)`` exactly (with
    ``resize`` set, the test transform's ``Resize(resize)`` -> ``CenterCrop(n_px)``).
    """
    bicubic = T.InterpolationMode.BICUBIC
    return T.Compose([ToRGB(), T.Resize(resize or n_px, interpolation=bicubic), T.CenterCrop(n_px), T.PILToTensor()])


_crop_transform = functools.lru_cache(maxsize=8)(eval_transform_uint8)  # one per geometry, per process


@dataclass(frozen=True)
class ExactPipeline(InputPipeline):
    """PIL decodes, resizes (bicubic) and center-crops in the workers, as published; the workers
    send uint8 crops (a quarter of the float bytes) and the device normalises them through the
    published ToTensor + Normalize (:func:`.normalize_on_device`): bit-identical. For a CPU
    device the workers normalise, as the published transform does."""

    decode = "exact"
    exact = True
    resizes_on_device = False

    def load(self, dataset: ImageDataset, index: int) -> tuple[torch.Tensor, bool]:
        return self._pil(dataset, index, _crop_transform(self.n_px, self.resize))

    def assemble(self, images: list[Any], ok: np.ndarray, allocate: Allocate,
                 normalize: bool = False) -> tuple[Crops, np.ndarray]:
        shape = (len(images), 3, self.n_px, self.n_px)
        if normalize:  # the crops are in this process already: no buffer to share
            return Crops(normalize_on_device(torch.stack(images)), shape), ok
        flat, data = allocate(math.prod(shape))
        torch.stack(images, out=flat.view(shape))
        return Crops(data, shape), ok

    def slot_bytes(self, dataset: ImageDataset, batch_size: int, num_slots: int) -> int:
        return batch_size * 3 * self.n_px * self.n_px

    def pixels(self, batch: Crops, device: torch.device) -> torch.Tensor:
        if batch.normalized:
            raise ValueError("this batch was normalised in the loader: build it with normalize_in_workers=False")
        return fetch(batch.data, device).view(batch.shape)

    def to_device(self, batch: Crops, ok: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.normalized:  # by the workers
            return batch.data.to(device, non_blocking=True), ok
        return super().to_device(batch, ok, device)
