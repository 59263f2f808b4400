"""``turbo``: ``device-resize`` with JPEGs decoded by libjpeg-turbo's TurboJPEG API, in place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..image import ImageDataset
from . import jpeg
from .whole import DeviceResizePipeline, Pending

__all__ = ["TurboPipeline"]


class _Jpeg(Pending):
    """A JPEG file's bytes and header size; decoded when its place in the batch is known."""

    def __init__(self, data: bytes, size: tuple[int, int], path: str,
                 fallback: Callable[[], tuple[torch.Tensor, bool]]) -> None:
        self.data, self.size, self.path, self._fallback = data, size, path, fallback

    def decode_into(self, out: np.ndarray) -> bool:
        return jpeg.decode(self.data, out) is not None

    def fallback(self) -> tuple[torch.Tensor, bool]:
        return self._fallback()


@dataclass(frozen=True)
class TurboPipeline(DeviceResizePipeline):
    """The workers read each batch's JPEG headers, lay the images out in the batch's buffer (a
    shared-memory slot) and decode each straight into its place with TurboJPEG (the optional
    ``simplejpeg`` package: no copies, the GIL released); the device resizes as in
    ``device-resize``. PIL's pixels wherever the two libjpeg-turbo builds agree, which is
    checked when the pipeline is made (:func:`.jpeg.agrees_with_pil`: where they disagree, PIL
    decodes, with a warning); CMYK JPEGs, damaged files and other formats go through PIL."""

    decode = "turbo"
    exact = False  # the same pixels where two decoders agree, not by construction
    agrees: bool = field(default=False, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        jpeg.require()  # an ImportError that says how to install simplejpeg
        object.__setattr__(self, "agrees", jpeg.agrees_with_pil())

    def load(self, dataset: ImageDataset, index: int) -> tuple[torch.Tensor | Pending, bool]:
        def pil() -> tuple[torch.Tensor, bool]:
            return super(TurboPipeline, self).load(dataset, index)

        if not self.agrees or isinstance(dataset.samples[index], (Image.Image, np.ndarray)):
            return pil()
        data = jpeg.read(dataset.paths[index])
        size = jpeg.header(data) if data is not None else None
        if size is None:
            return pil()
        return _Jpeg(data, size, dataset.paths[index], pil), True
