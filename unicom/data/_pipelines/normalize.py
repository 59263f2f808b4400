"""uint8 pixels -> the published float input, bit for bit, on any device."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from ...transforms import MEAN, STD

__all__ = ["normalization_table", "normalize_on_device"]


@functools.cache
def _table_cpu(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    # Every value 0..255 in each channel, pushed through the published float transform tail
    # (ToTensor: x.float().div(255), Normalize: sub_(mean).div_(std)) on the CPU. The ops are
    # elementwise, so the table holds exactly what they give for that value in any image.
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8), (1, 256))
    image = Image.fromarray(np.ascontiguousarray(np.stack([ramp] * 3, axis=-1)), mode="RGB")
    table = T.Normalize(mean, std)(T.ToTensor()(image))  # (3, 1, 256) float32
    return table.reshape(3, 256).contiguous()


def normalization_table(mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """(3, 256) float32: entry ``[c, v]`` is what ToTensor + Normalize give for value v in channel c."""
    return _table_cpu(tuple(mean), tuple(std)).clone()


@functools.lru_cache(maxsize=16)
def _table_on(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return _table_cpu(mean, std).reshape(-1).to(device)


def normalize_on_device(
    images: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD, lookup: bool | None = None
) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> float32 normalised, bit-identical to ToTensor + Normalize.

    With ``lookup`` (default: on any device but the CPU) a table lookup, so no device's
    arithmetic can differ from the CPU's (CUDA divides by a scalar as a multiplication by its
    reciprocal; compiled code may fuse operations). Without, the published ops themselves
    (``float().div(255)``, ``sub_(mean)``, ``div_(std)``), which are exact on the CPU and
    cheaper there than a gather.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if lookup is None:
        lookup = images.device.type != "cpu"
    if not lookup:
        mean_ = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        std_ = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        return images.float().div(255).sub_(mean_).div_(std_)
    table = _table_on(images.device, tuple(mean), tuple(std))  # (3 * 256,)
    offsets = torch.arange(0, 3 * 256, 256, device=images.device, dtype=torch.int32).view(1, 3, 1, 1)
    return table[images.int() + offsets]
