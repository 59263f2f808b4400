"""The interface of an input pipeline: one ``--decode`` mode, from an index to pixels on the device."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import numpy as np
import torch
from PIL import Image

from ..image import BadImageError, ImageDataset
from . import batches
from .batches import Allocate, Crops, WholeImages
from .normalize import normalize_on_device

__all__ = ["Batch", "InputPipeline"]

logger = logging.getLogger(__name__)

Batch = Union[Crops, WholeImages]


@dataclass(frozen=True)
class InputPipeline(ABC):
    """How images travel from files to normalised batches on the device: one ``--decode`` mode.

    ``n_px`` is the crop (the model's input size), ``resize`` the shorter side before the crop
    (default ``n_px``: the eval transform; the fine-tuning test transform uses n_px / 0.875).

    A mode says what a DataLoader worker produces for one index (:meth:`load`), how a batch of
    those is laid out in one buffer (:meth:`assemble`), how a batch becomes uint8 pixels on the
    device (:meth:`pixels`; :meth:`to_device` normalises them), and how large the reused
    shared-memory slots of its loaders are (:meth:`slot_bytes`).
    """

    decode: ClassVar[str]  # the --decode name
    exact: ClassVar[bool]  # the published pixels by construction
    resizes_on_device: ClassVar[bool]  # the device resizes: slow where the device is the CPU
    n_px: int = 224
    resize: int | None = None

    def __post_init__(self) -> None:
        if self.resize is None:
            object.__setattr__(self, "resize", self.n_px)
        if self.resize < self.n_px:
            raise ValueError(f"resize {self.resize} is smaller than the crop {self.n_px}")

    # ------------------------------------------------------------------ worker side

    @abstractmethod
    def load(self, dataset: ImageDataset, index: int) -> tuple[Any, bool]:
        """Item ``index`` of ``dataset`` as this pipeline's workers hold it before batching, and
        whether it is an image (False: a bad image skipped, and a placeholder in its place)."""

    @abstractmethod
    def assemble(self, images: list[Any], ok: np.ndarray, allocate: Allocate,
                 normalize: bool = False) -> tuple[Batch, np.ndarray]:
        """A batch of :meth:`load`'s images written into ``allocate(nbytes)``, and ok (B,) bool.
        ``normalize``: the float32 input itself, where the pipeline can (for a CPU device)."""

    @abstractmethod
    def slot_bytes(self, dataset: ImageDataset, batch_size: int, num_slots: int) -> int:
        """Bytes per slot for a loader of ``dataset`` with ``num_slots`` batches in flight (0: no slots)."""

    def load_batch(self, dataset: ImageDataset, indices: Sequence[int], allocate: Allocate = batches.allocate,
                   normalize: bool = False) -> tuple[Batch, np.ndarray, np.ndarray, np.ndarray]:
        """(batch, labels (B,), indices (B,), ok (B,)) for items ``indices`` of ``dataset``, the
        small arrays as NumPy arrays (a worker sends those inside its message; each tensor would
        cost a shared-memory file and a socket hand-over)."""
        images, ok = zip(*(self.load(dataset, i) for i in indices))
        batch, ok = self.assemble(list(images), np.array(ok, dtype=bool), allocate, normalize)
        labels = dataset.labels[list(indices)].numpy()
        return batch, labels, np.asarray(indices, dtype=np.int64), ok

    def _pil(self, dataset: ImageDataset, index: int, convert: Callable[[Image.Image], Any]) -> tuple[Any, bool]:
        """Item ``index`` decoded by PIL as ``ImageDataset`` does, then ``convert``ed."""
        try:
            return convert(dataset.load_image(index)), True
        except BadImageError as error:
            if not dataset.skip_bad_images:
                raise
            logger.warning("skipping %s", error.path)
        return convert(Image.new("RGB", dataset.placeholder_size)), False

    # ------------------------------------------------------------------ main side

    @abstractmethod
    def pixels(self, batch: Batch, device: torch.device) -> torch.Tensor:
        """A loader's batch -> uint8 (B, 3, n_px, n_px) on ``device``."""

    def to_device(self, batch: Batch, ok: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader's batch -> (float32 normalised (B, 3, n_px, n_px) on ``device``, ok (B,)): the
        ``preprocess`` of :func:`unicom.evaluate.embed_loader`."""
        return normalize_on_device(self.pixels(batch, device)), ok
