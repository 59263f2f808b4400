"""Fast input pipelines: image files to normalised batches on the device.

The published evaluation decodes, resizes and normalises every image in DataLoader workers
and ships float32 tensors to the model. Evaluation is then decode-bound. The pipelines here
split the work differently; the ``decode`` option picks one:

``exact`` (default)
    PIL decodes, resizes (bicubic) and center-crops in the workers, as published, but the
    workers return uint8 crops (4x less traffic to the GPU, pinned, copied asynchronously)
    and the normalisation ``(x / 255 - mean) / std`` runs on the GPU through a 256-entry
    table per channel computed by the published ``ToTensor`` + ``Normalize`` themselves:
    bit-identical. (For a CPU "device" the workers normalise, with the published ops.)
``device-resize``
    PIL decodes in the workers; the bicubic resize and crop run on the device, reproducing
    Pillow's fixed-point resampling exactly (its integer coefficients, float64 sums that are
    exact integers, and its order of the two passes, which Pillow 13 changed: found at run
    time). Bit-identical too, and the workers only decode: meant for GPUs (on a CPU the
    dense float64 matmuls cost more than PIL's resize).
``draft``
    JPEG draft mode: libjpeg decodes large images at 1/2, 1/4 or 1/8 scale (never below
    ``draft_factor`` times the resize target), then the exact resize. Changes pixels of
    large JPEGs only.
``tv``
    torchvision decodes (libjpeg-turbo) and resizes (antialiased bicubic on uint8) in the
    workers. Changes pixels slightly; much cheaper than PIL's resize on the CPU.
``device-decode``
    The workers read file bytes; torchvision decodes the batch on the device (nvJPEG on
    CUDA) and the exact resize runs there. Changes pixels where the decoder differs from
    libjpeg-turbo (nvJPEG does).
``tv-decode``
    torchvision's CPU decoder (libjpeg-turbo, a third less work than PIL's decode, which
    parses and feeds the file from Python) decodes JPEGs in the workers, and the exact
    resize runs on the device. PIL's pixels wherever the two libjpeg-turbo builds agree: on
    every file checked so far (thousands, with Pillow 12.3 and 13.0), but they are two
    builds, so this is not guaranteed; CMYK JPEGs and other formats go through PIL.
``turbo``
    As ``tv-decode`` with libjpeg-turbo's own TurboJPEG API (the optional ``simplejpeg``
    package): the workers read each batch's JPEG headers, lay the images out in the shared
    slot, and decode every image straight into its place (no copies; the least CPU per image
    of all exact options). PIL's pixels wherever the two libjpeg-turbo builds agree, checked
    at start on probe images of every chroma subsampling (PIL decodes instead, with a warning,
    if they disagree); CMYK JPEGs and other formats go through PIL.

Every pipeline starts from an :class:`~unicom.data.image.ImageDataset` whose transform is the
published eval (or test) transform: :meth:`InputPipeline.from_transform` recognises it and
keeps its resize and crop sizes. Undecodable files behave as in ``ImageDataset``.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from ..distributed import shard_range
from ..transforms import MEAN, STD, ToRGB, to_rgb
from . import jpeg, slots
from .image import _DECODE_ERRORS, BadImageError, ImageDataset, open_image_file
from .loader import sharded_loader

__all__ = [
    "DECODE_CHOICES",
    "EXACT_DECODES",
    "InputPipeline",
    "embedding_loader",
    "eval_transform_uint8",
    "normalization_table",
    "normalize_on_device",
    "pillow_resize_crop",
    "pipeline_loader",
    "resized_size",
    "resolve_decode",
]

logger = logging.getLogger(__name__)

DECODE_CHOICES = ("exact", "device-resize", "draft", "tv", "device-decode", "tv-decode", "turbo")
EXACT_DECODES = ("exact", "device-resize")
WHOLE_IMAGE_DECODES = ("device-resize", "tv-decode", "turbo")  # the workers send whole decoded images


def resolve_decode(decode: str, device: torch.device | str) -> str:
    """``auto``: the fastest exact pipeline for ``device``: ``device-resize`` on CUDA (the
    workers only decode), ``exact`` elsewhere (a CPU's cores are the workers' cores, and PIL's
    resize costs less there than the exact replay). Other names are returned as they are."""
    if decode == "auto":
        return "device-resize" if torch.device(device).type == "cuda" else "exact"
    if decode not in DECODE_CHOICES:
        raise ValueError(f"unknown decode {decode!r}: expected auto or one of {DECODE_CHOICES}")
    return decode

_BICUBIC = T.InterpolationMode.BICUBIC


# ----------------------------------------------------------------------------- normalisation


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
    (``float().div(255)``, ``sub_(mean)``, ``div_(std)``): ~10x faster than a gather on CPUs.
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


# ----------------------------------------------------------------------------- uint8 transforms


def eval_transform_uint8(n_px: int, resize: int | None = None) -> T.Compose:
    """The eval transform up to the crop, returning uint8 (3, n_px, n_px): pixels for the device.

    ``normalize_on_device`` of its output equals ``eval_transform(n_px)`` exactly (with
    ``resize`` set, the test transform's ``Resize(resize)`` -> ``CenterCrop(n_px)``).
    """
    return T.Compose([ToRGB(), T.Resize(resize or n_px, interpolation=_BICUBIC), T.CenterCrop(n_px), T.PILToTensor()])


class TorchvisionResizeCrop:
    """uint8 (3, H, W) -> (3, n, n): torchvision's antialiased bicubic resize and center crop.

    The ``transforms.v2`` kernels resample uint8 directly (about 10x faster than PIL on the CPU).
    """

    def __init__(self, n_px: int, resize: int | None = None) -> None:
        self.n_px = n_px
        self.resize = resize or n_px

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = TF.resize(image, [self.resize], interpolation=_BICUBIC, antialias=True)
        return TF.center_crop(image, [self.n_px])


# ----------------------------------------------------------------------------- Pillow's resample, on tensors

_PRECISION_BITS = 22  # Pillow's 8-bit resampling: 32 - 8 - 2 fractional bits per coefficient
_HALF = float(1 << (_PRECISION_BITS - 1))
_ONE = float(1 << _PRECISION_BITS)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(size)``: shorter side = size, aspect kept (truncated)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _crop_offset(length: int, crop: int) -> int:
    return round((length - crop) / 2.0)  # torchvision's CenterCrop (round half to even)


def _bicubic(x: np.ndarray) -> np.ndarray:
    # Pillow's bicubic kernel (a = -0.5), same operation order, float64.
    x = np.abs(x)
    out = np.zeros_like(x)
    near, far = x < 1.0, (x >= 1.0) & (x < 2.0)
    xn, xf = x[near], x[far]
    out[near] = ((-0.5 + 2.0) * xn - (-0.5 + 3.0)) * xn * xn + 1
    out[far] = (((xf - 5) * xf + 8) * xf - 4) * -0.5
    return out


@functools.lru_cache(maxsize=4096)
def _axis_table(in_size: int, out_size: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's integer coefficients for outputs start..start+count of one axis.

    Returns ``first`` (count,) int64, the first input index each output reads, and
    ``weights`` (count, K) int64 fixed-point coefficients (zero past each output's window).
    Replays Pillow's ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` in float64, in
    the same operation order, so the integers are the ones Pillow uses.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale  # bicubic support 2, widened when downscaling
    ksize = math.ceil(support) * 2 + 1
    center = 0.0 + (np.arange(start, start + count, dtype=np.float64) + 0.5) * scale
    inv = 1.0 / filterscale
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    span = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    taps = np.arange(ksize)
    w = _bicubic(((taps[None, :] + first[:, None]) - center[:, None] + 0.5) * inv)
    w[taps[None, :] >= span[:, None]] = 0.0
    total = np.zeros(count)
    for k in range(ksize):  # sequential sum, as Pillow's loop adds
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    scaled = w * _ONE
    weights = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return first, weights


def _reference_order(w: int, h: int, nw: int, nh: int) -> bool:
    """Pillow 13's pass order: vertical first when the height shrinks by more than twice the width."""
    return nh < h and (h - nh) > 2 * (w - nw)


@functools.lru_cache(maxsize=1)
def _pillow_order_rule() -> Callable[[int, int, int, int], bool]:
    """Which pass Pillow runs first, found by resizing a probe image both ways.

    Pillow ran the horizontal pass first up to version 12; later versions run the vertical
    pass first when the height shrinks much more than the width. Both passes round to
    8 bits, so the order changes pixels and must be matched.
    """
    rng = np.random.default_rng(0)
    probe = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
    rules = {"vertical-first when height shrinks more": _reference_order, "horizontal first": lambda *_: False}
    for w_out, h_out in ((90, 10), (60, 20)):  # sizes where the two rules differ
        expected = torch.from_numpy(np.array(Image.fromarray(probe).resize((w_out, h_out), Image.BICUBIC)))
        for name, rule in list(rules.items()):
            got = _resize_group(torch.from_numpy(probe)[None], [(100, 100)], [(w_out, h_out)], [(0, 0)],
                                (h_out, w_out), vertical_first=rule(100, 100, w_out, h_out))
            if not torch.equal(got[0].permute(1, 2, 0), expected):
                del rules[name]
    if not rules:
        raise RuntimeError(f"this Pillow ({Image.__version__}) resamples in a way the device resize does not "
                           "reproduce; use decode='exact'")
    name, rule = next(iter(rules.items()))
    logger.debug("Pillow %s resample order: %s", Image.__version__, name)
    return rule


def _stack_tables(tables: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (first, weights) tables -> (G, count) and (G, count, K) int64 tensors (K: the widest)."""
    ksize = max(w.shape[1] for _, w in tables)
    first = torch.from_numpy(np.stack([f for f, _ in tables]))
    weights = torch.from_numpy(np.stack([w if w.shape[1] == ksize else np.pad(w, ((0, 0), (0, ksize - w.shape[1])))
                                         for _, w in tables]))
    return first, weights


def _dense(first, weights, length: int, device: torch.device) -> torch.Tensor:
    """Stacked (first (G, count), weights (G, count, K)) tables (tensors or arrays) -> dense
    (G, count, length) float64 matrices (G = 1: one table for every image of the group)."""
    first = torch.as_tensor(first).to(device, non_blocking=True)
    weights = torch.as_tensor(weights).to(device, non_blocking=True).to(torch.float64)
    index = (first[..., None] + torch.arange(weights.shape[-1], device=device)).clamp_(max=length - 1)
    # Taps past an output's window weigh 0 and may be clamped onto a real index: adding 0 is harmless.
    return torch.zeros(*first.shape, length, dtype=torch.float64, device=device).scatter_add_(2, index, weights)


def _round(x: torch.Tensor) -> torch.Tensor:
    # Pillow: (sum + 2^21) >> 22, clipped to 0..255. Sums are exact integers in float64.
    return torch.floor((x + _HALF) / _ONE).clamp_(0, 255)


def _group_tables(
    in_hw: Sequence[tuple[int, int]],
    out_wh: Sequence[tuple[int, int]],
    offsets: Sequence[tuple[int, int]],
    crop_hw: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stacked coefficient tables of one group: (first_x, weights_x, first_y, weights_y), CPU int64.

    Cheap to build (per-size tables are cached) and small to ship: the pipeline's workers
    build them, the device expands them into dense matrices.
    """
    ch, cw = crop_hw
    geometry = list(zip(in_hw, out_wh, offsets))
    fx, wx = _stack_tables([_axis_table(w, nw, left, cw) for (_, w), (nw, _), (left, _) in geometry])
    fy, wy = _stack_tables([_axis_table(h, nh, top, ch) for (h, _), (_, nh), (_, top) in geometry])
    return fx, wx, fy, wy


def _resize_group(
    pixels: torch.Tensor,
    in_hw: Sequence[tuple[int, int]],
    out_wh: Sequence[tuple[int, int]],
    offsets: Sequence[tuple[int, int]],
    crop_hw: tuple[int, int],
    vertical_first: bool,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pillow's bicubic resize of images padded into ``pixels``, then a crop: (G, 3, ch, cw) uint8.

    pixels: (G, Hmax, Wmax, 3) uint8, image g in its top-left (h, w) = in_hw[g] corner.
    out_wh: each image's full resized (width, height); offsets: each crop's (left, top).
    ``tables``: :func:`_group_tables` of these, when already built.
    Both passes are matmuls with the integer coefficients as float64: every product and sum
    is an integer below 2^53, so the result is exact whatever the summation order.
    """
    g, hmax, wmax, _ = pixels.shape
    ch, cw = crop_hw
    device = pixels.device
    fx, wx, fy, wy = tables if tables is not None else _group_tables(in_hw, out_wh, offsets, crop_hw)
    # (G, cw, Wmax) and (G, ch, Hmax): row j holds the weights of output column / row j of the crop
    mx = _dense(fx, wx, wmax, device)
    my = _dense(fy, wy, hmax, device)
    x = pixels.to(torch.float64)
    if vertical_first:
        t = _round(my @ x.reshape(g, hmax, wmax * 3))  # (G, ch, Wmax * 3)
        t = t.view(g, ch, wmax, 3).permute(0, 1, 3, 2).reshape(g, ch * 3, wmax)
        out = _round(t @ mx.transpose(1, 2)).view(g, ch, 3, cw)  # (G, ch, 3, cw)
    else:
        t = x.permute(0, 1, 3, 2).reshape(g, hmax * 3, wmax)
        t = _round(t @ mx.transpose(1, 2)).view(g, hmax, 3 * cw)  # (G, Hmax, 3 * cw)
        out = _round(my @ t).view(g, ch, 3, cw)
    return out.permute(0, 2, 1, 3).to(torch.uint8)  # (G, 3, ch, cw)


def _geometry(h: int, w: int, resize: int, n_px: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """An (h, w) image's resized (width, height) and the (left, top) of its center crop."""
    nw, nh = resized_size(w, h, resize)
    return (nw, nh), (_crop_offset(nw, n_px), _crop_offset(nh, n_px))


def _plan(sizes: Sequence[tuple[int, int]], resize: int, n_px: int, slack: float = 1.25):
    """Group images of sizes (h, w) for batched resizing: one pass order per group, and padding
    to the group's largest height and width within ``slack`` times the pixels it holds.

    Returns [(positions, vertical_first)], positions being indices into ``sizes``.
    """
    rule = _pillow_order_rule()
    flags = []
    for h, w in sizes:
        (nw, nh), _ = _geometry(h, w, resize, n_px)
        flags.append(bool(rule(w, h, nw, nh)))
    groups: list[tuple[list[int], bool]] = []
    area = hmax = wmax = 0
    for i in sorted(range(len(sizes)), key=lambda i: (flags[i], sizes[i])):
        h, w = sizes[i]
        if groups and groups[-1][1] == flags[i]:
            grown_h, grown_w = max(hmax, h), max(wmax, w)
            if grown_h * grown_w * (len(groups[-1][0]) + 1) <= slack * (area + h * w):
                groups[-1][0].append(i)
                area, hmax, wmax = area + h * w, grown_h, grown_w
                continue
        groups.append(([i], flags[i]))
        area, hmax, wmax = h * w, h, w
    return groups


def _pad(images: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """(h, w, 3) uint8 images -> (G, Hmax, Wmax, 3), zero padded (into ``out`` when given)."""
    hmax = max(x.shape[0] for x in images)
    wmax = max(x.shape[1] for x in images)
    if out is None:
        out = torch.empty(len(images), hmax, wmax, 3, dtype=torch.uint8, device=images[0].device)
    for g, x in enumerate(images):
        h, w = x.shape[:2]
        out[g, :h, :w] = x
        out[g, h:] = 0
        out[g, :h, w:] = 0
    return out


def _padded_tables(sizes: Sequence[tuple[int, int]], resize: int, n_px: int):
    """:func:`_group_tables` for images of ``sizes`` (h, w) resized to ``resize`` and cropped to
    ``n_px``; for images of one size, the tables of one image (the resize broadcasts them)."""
    if len(set(sizes)) == 1:
        sizes = sizes[:1]
    geometry = [_geometry(h, w, resize, n_px) for h, w in sizes]
    return _group_tables(sizes, [g[0] for g in geometry], [g[1] for g in geometry], (n_px, n_px))


def _resize_padded(pixels: torch.Tensor, sizes: Sequence[tuple[int, int]], resize: int, n_px: int,
                   vertical_first: bool, tables=None) -> torch.Tensor:
    """One group: padded (G, Hmax, Wmax, 3) uint8 images of ``sizes`` (h, w) -> (G, 3, n_px, n_px)."""
    tables = tables if tables is not None else _padded_tables(sizes, resize, n_px)
    return _resize_group(pixels, sizes, (), (), (n_px, n_px), vertical_first, tables)


def pillow_resize_crop(
    images: Sequence[torch.Tensor], n_px: int, resize: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """``Resize(resize or n_px, bicubic)`` -> ``CenterCrop(n_px)`` of (H, W, 3) uint8 images, on ``device``.

    Bit-identical to torchvision's transforms on PIL images (Pillow's fixed-point resampling,
    replayed with exact integer arithmetic), whatever the device. Returns (B, 3, n_px, n_px) uint8.
    """
    device = torch.device(device) if device is not None else images[0].device
    resize = resize or n_px
    sizes = [(x.shape[0], x.shape[1]) for x in images]
    out = torch.empty(len(images), 3, n_px, n_px, dtype=torch.uint8, device=device)
    for positions, vertical_first in _plan(sizes, resize, n_px):
        pixels = _pad([images[i].to(device, non_blocking=True) for i in positions])
        result = _resize_padded(pixels, [sizes[i] for i in positions], resize, n_px, vertical_first)
        out[torch.tensor(positions, device=device)] = result
    return out


# ----------------------------------------------------------------------------- batches of whole images


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor, in shared memory when called in a DataLoader worker (no copy to send it)."""
    if torch.utils.data.get_worker_info() is not None:
        numel = math.prod(shape)
        storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
        return torch.empty(0, dtype=dtype).new(storage).view(shape)
    return torch.empty(shape, dtype=dtype)


@dataclass
class PaddedGroups:
    """Whole decoded images of one batch, grouped for the device resize (built in the workers).

    groups: (pixels (G, Hmax, Wmax, 3) uint8, sizes (G, 2) int64 (h, w), positions (G,) int64,
    vertical_first, tables) per group; ``positions`` are the images' places in the batch and
    ``tables`` the group's stacked resampling coefficients (:func:`_group_tables`).
    """

    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, tuple[torch.Tensor, ...]]]
    batch_size: int

    def pin_memory(self) -> PaddedGroups:
        return PaddedGroups([(p.pin_memory(), s, i, f, tuple(t.pin_memory() for t in tables))
                             for p, s, i, f, tables in self.groups], self.batch_size)

    def __len__(self) -> int:
        return self.batch_size


@dataclass
class EncodedBatch:
    """One batch for ``device-decode``: JPEG bytes (1-D uint8) or, for other images, (H, W, 3) pixels."""

    items: list[torch.Tensor]
    encoded: list[bool]
    paths: list[str]
    skip_bad_images: bool

    def pin_memory(self) -> EncodedBatch:
        return self  # nvJPEG reads host bytes itself; pinning many small buffers costs more than it saves

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class PackedCrops:
    """A batch of uint8 crops (B, 3, n, n) waiting in a shared-memory slot (see :mod:`.slots`)."""

    ref: slots.SlotRef
    shape: tuple[int, int, int, int]

    def pin_memory(self) -> PackedCrops:
        return self

    def __len__(self) -> int:
        return self.shape[0]


@dataclass
class PackedImages:
    """Whole decoded images, back to back (H, W, 3) in a shared-memory slot, for the device resize.

    sizes: (h, w) and offsets (bytes) of each image, in batch order; the images lie group by
    group, so a group whose images share one size is a (G, h, w, 3) block. groups:
    (positions, vertical_first, tables) as in :class:`PaddedGroups`.
    """

    ref: slots.SlotRef
    sizes: list[tuple[int, int]]
    offsets: list[int]
    groups: list[tuple[list[int], bool, tuple[torch.Tensor, ...]]]

    def pin_memory(self) -> PackedImages:
        return self

    def __len__(self) -> int:
        return len(self.sizes)


def _jpeg_bytes(path: str) -> bytes | None:
    """The file's bytes if it is a complete JPEG (SOI marker, EOI marker near the end) with a
    frame header within PIL's pixel limit and headers PIL opens, else None.

    Truncated files go to PIL, which rejects them as ``ImageDataset`` does (GPU decoders may
    silently decode what is there), and so do decompression bombs, which other decoders would
    allocate whatever their header claims for, and headers PIL refuses but libjpeg-turbo and
    nvJPEG skip over (the published path fails or skips those files).
    """
    try:
        with open_image_file(path) as f:  # a FIFO or folder is PIL's to refuse
            data = f.read()
    except OSError:
        return None
    if data[:3] != b"\xff\xd8\xff" or b"\xff\xd9" not in data[-1024:] or not jpeg.within_pil_limit(data):
        return None
    if not jpeg.pil_opens(data):
        return None
    return data


# ----------------------------------------------------------------------------- datasets


class _PipelineDataset(Dataset):
    """An ImageDataset's images and labels, loaded the way a pipeline's workers need them."""

    def __init__(self, base: ImageDataset, pipeline: InputPipeline, normalize_in_workers: bool = False) -> None:
        self.base = base
        self.pipeline = pipeline
        self.normalize_in_workers = normalize_in_workers
        decode = pipeline.decode
        if decode in ("exact", "draft"):
            self._transform = eval_transform_uint8(pipeline.n_px, pipeline.resize)
        elif decode == "tv":
            self._tv = TorchvisionResizeCrop(pipeline.n_px, pipeline.resize)
            self._transform = T.Compose([ToRGB(), T.PILToTensor(), self._tv])
        else:  # whole images, (H, W, 3): the device resizes
            self._transform = _hwc
        self._turbo = decode == "turbo" and jpeg.agrees_with_pil()  # else PIL decodes (device-resize)

    def __len__(self) -> int:
        return len(self.base)

    def collate(self, batch: Sequence[tuple[Any, int, int, bool]]):
        """The pipeline's collate, knowing this dataset's file names."""
        return self.pipeline.collate(batch, self.base, self.normalize_in_workers)

    def load_batch(self, seq: int, positions: Sequence[int], pool: slots.SlotPool | None):
        """Batch ``seq`` (items ``positions`` of this dataset), collated; its pixels go into
        ``pool``'s slot for ``seq`` when they fit (else, and without a pool, as :meth:`collate`)."""
        if pool is None:
            return self.collate([self[i] for i in positions])
        if self.pipeline.decode in WHOLE_IMAGE_DECODES:
            return self._load_whole(seq, positions, pool)
        batch = [self[i] for i in positions]
        images, labels, indices, ok = _unzip(batch, arrays=True)
        shape = (len(images), *images[0].shape)
        place = pool.slot_for(seq, math.prod(shape))
        if place is None:
            return self.collate(batch)
        slot, view = place
        torch.stack(list(images), out=view.view(shape))
        return PackedCrops(pool.ref(slot, seq, math.prod(shape)), shape), labels, indices, ok

    def _load_whole(self, seq: int, positions: Sequence[int], pool: slots.SlotPool):
        """Whole images into the slot, group by group (a group of one size is one (G, h, w, 3)
        block). ``turbo`` reads the JPEGs' headers first and decodes each into its place."""
        items = []
        for i in positions:
            source = self._turbo_source(i) if self._turbo else None
            items.append((source, int(self.base.labels[i]), i, True) if source is not None else self[i])
        sizes = [x[0][1] if isinstance(x[0], tuple) else (x[0].shape[0], x[0].shape[1]) for x in items]
        plan = _plan(sizes, self.pipeline.resize, self.pipeline.n_px)
        order = [i for positions_, _ in plan for i in positions_]
        ends = np.cumsum([3 * sizes[i][0] * sizes[i][1] for i in order]).tolist()
        place = pool.slot_for(seq, ends[-1])
        if place is None:
            return self.collate([self._decoded(item) for item in items])
        slot, view = place
        offsets = [0] * len(items)
        for i, end in zip(order, ends):
            (h, w), start = sizes[i], end - 3 * sizes[i][0] * sizes[i][1]
            offsets[i], target = start, view[start:end]
            if isinstance(items[i][0], tuple):  # a JPEG to decode in place
                if jpeg.decode(items[i][0][0], target.numpy().reshape(h, w, 3)) is not None:
                    continue
                items[i] = self._pil_item(items[i][2])  # TurboJPEG refused it: PIL decides
                if items[i][0].shape != (h, w, 3):
                    if items[i][3]:
                        raise RuntimeError(f"{self.base.paths[items[i][2]]}: PIL decoded {tuple(items[i][0].shape)}, "
                                           f"the JPEG header says {(h, w, 3)}")
                    target.zero_()  # a bad image, skipped: its row is dropped (ok False)
                    continue
            target.copy_(items[i][0].reshape(-1))
        _, labels, indices, ok = _unzip(items, arrays=True)
        groups = [(positions_, flag, tuple(t.numpy() for t in _padded_tables([sizes[i] for i in positions_],
                                                                             self.pipeline.resize, self.pipeline.n_px)))
                  for positions_, flag in plan]
        return PackedImages(pool.ref(slot, seq, ends[-1]), sizes, offsets, groups), labels, indices, ok

    def _turbo_source(self, index: int) -> tuple[bytes, tuple[int, int]] | None:
        """(JPEG bytes, (h, w)) of an item ``turbo`` decodes itself, else None (PIL's turn)."""
        if isinstance(self.base.samples[index], (Image.Image, np.ndarray)):
            return None
        data = _jpeg_bytes(self.base.paths[index])
        size = jpeg.header(data) if data is not None else None
        return (data, size) if size is not None else None

    def _decoded(self, item: tuple[Any, int, int, bool]) -> tuple[Any, int, int, bool]:
        """An item of :meth:`_load_whole` with its JPEG decoded (out of the slot)."""
        if not isinstance(item[0], tuple):
            return item
        pixels = jpeg.decode(item[0][0])
        return (torch.from_numpy(pixels), *item[1:]) if pixels is not None else self._pil_item(item[2])

    def _pil(self, index: int) -> Image.Image:
        if self.pipeline.decode != "draft":
            return self.base.load_image(index)
        sample = self.base.samples[index]
        if isinstance(sample, (Image.Image, np.ndarray)):
            return self.base.load_image(index)
        try:
            with open_image_file(sample) as f, Image.open(f) as image:
                w, h = image.size
                want = self.pipeline.resize * self.pipeline.draft_factor
                if min(w, h) >= 2 * want:  # JPEG only (others ignore draft): decode at 1/2, 1/4 or 1/8
                    image.draft(image.mode, (want, want))
                image.load()
                return to_rgb(image)
        except _DECODE_ERRORS as error:
            raise BadImageError(self.base.paths[index], f"{type(error).__name__}: {error}") from error

    def __getitem__(self, index: int) -> tuple[Any, int, int, bool]:
        label = int(self.base.labels[index])
        sample = self.base.samples[index]
        decode = self.pipeline.decode
        if self._turbo:
            source = self._turbo_source(index)
            pixels = jpeg.decode(source[0]) if source is not None else None
            if pixels is not None:
                return torch.from_numpy(pixels), label, index, True
        elif (decode in ("tv", "device-decode", "tv-decode") and not isinstance(sample, (Image.Image, np.ndarray))
              and index not in self.base.rejected):  # a damaged JPEG refused by strict checks: PIL's turn
            data = _jpeg_bytes(self.base.paths[index])
            if data is not None:
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                if decode == "device-decode":
                    return encoded, label, index, True
                try:
                    from torchvision.io import ImageReadMode, decode_jpeg

                    if decode == "tv":
                        return self._tv(decode_jpeg(encoded, mode=ImageReadMode.RGB)), label, index, True
                    pixels = _tv_hwc(decode_jpeg(encoded, mode=ImageReadMode.UNCHANGED))
                    if pixels is not None:
                        return pixels, label, index, True
                except RuntimeError:
                    pass  # e.g. a JPEG flavour libjpeg-turbo refuses: PIL decides below
        return self._pil_item(index)

    def _pil_item(self, index: int) -> tuple[Any, int, int, bool]:
        """Item ``index`` decoded by PIL (a placeholder, ok False, for a bad image skipped)."""
        label = int(self.base.labels[index])
        try:
            image = self._pil(index)
        except BadImageError as error:
            if not self.base.skip_bad_images:
                raise
            logger.warning("skipping %s", error.path)
            return self._transform(Image.new("RGB", self.base.placeholder_size)), label, index, False
        return self._transform(image), label, index, True


def _tv_hwc(decoded: torch.Tensor) -> torch.Tensor | None:
    """torchvision's decode (C, H, W) -> (H, W, 3) as PIL's ``convert("RGB")`` gives it, for
    colour (YCbCr) and grayscale JPEGs; None for others (CMYK: PIL converts those its own way)."""
    if decoded.shape[0] == 3:
        return decoded.permute(1, 2, 0).contiguous()
    if decoded.shape[0] == 1:
        return decoded.expand(3, -1, -1).permute(1, 2, 0).contiguous()  # L -> RGB repeats the value
    return None


def _unzip(batch: Sequence[tuple[Any, int, int, bool]], arrays: bool = False):
    """Items (image, label, index, ok) -> (images, labels (B,), indices (B,), ok (B,)): tensors,
    or with ``arrays`` NumPy arrays (a worker's batch in a slot: arrays travel inside the
    message, while every tensor costs its own shared-memory file and socket hand-over)."""
    images, labels, indices, ok = zip(*batch)
    if arrays:
        return images, np.array(labels, dtype=np.int64), np.array(indices, dtype=np.int64), np.array(ok, dtype=bool)
    return (images, torch.tensor(labels, dtype=torch.long), torch.tensor(indices, dtype=torch.long),
            torch.tensor(ok, dtype=torch.bool))


def _hwc(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8))  # (H, W, 3)


# ----------------------------------------------------------------------------- the pipeline


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
    if (size is None or resize.interpolation != _BICUBIC or resize.max_size is not None
            or resize.antialias is False or crop.size[0] != crop.size[1]):
        return None
    if tuple(normalize.mean) != MEAN or tuple(normalize.std) != STD or normalize.inplace:
        return None
    return int(size), int(crop.size[0])


@dataclass(frozen=True)
class InputPipeline:
    """How images travel from files to normalised batches on the device (see the module doc).

    ``n_px`` is the crop (the model's input size), ``resize`` the shorter side before the crop
    (default ``n_px``: the eval transform; the fine-tuning test transform uses n_px / 0.875).
    """

    decode: str = "exact"
    n_px: int = 224
    resize: int | None = None
    draft_factor: int = 2

    def __post_init__(self) -> None:
        if self.decode not in DECODE_CHOICES:
            raise ValueError(f"unknown decode {self.decode!r}: expected one of {DECODE_CHOICES}")
        if self.resize is None:
            object.__setattr__(self, "resize", self.n_px)
        if self.resize < self.n_px:
            raise ValueError(f"resize {self.resize} is smaller than the crop {self.n_px}")
        if self.decode == "turbo":
            jpeg.require()

    @property
    def exact(self) -> bool:
        """Whether the pixels are those of the published PIL transform."""
        return self.decode in EXACT_DECODES

    @classmethod
    def from_transform(cls, transform, decode: str = "exact", **options) -> InputPipeline | None:
        """The pipeline equivalent to ``transform`` (the eval or test transform), or None for others."""
        sizes = _resize_crop_sizes(transform)
        if sizes is None:
            return None
        return cls(decode, n_px=sizes[1], resize=sizes[0], **options)

    def dataset(self, base: ImageDataset, normalize_in_workers: bool = False) -> _PipelineDataset:
        """``base``'s items as this pipeline's workers produce them (same labels, indices, ok)."""
        return _PipelineDataset(base, self, normalize_in_workers)

    def collate(self, batch: Sequence[tuple[Any, int, int, bool]], base: ImageDataset | None = None,
                normalize: bool = False):
        """(images, labels (B,), indices (B,), ok (B,)): images as :meth:`to_device` takes them.

        ``base`` (the dataset the items come from) names files in errors of ``device-decode``.
        With ``normalize`` the crops of ``exact``, ``draft`` and ``tv`` are normalised here
        (float32, the same values): better for a CPU "device", whose cores are the workers'.
        """
        images, labels, indices, ok = _unzip(batch)
        if self.decode in ("exact", "draft", "tv"):
            pixels = default_collate(list(images))  # (B, 3, n, n) uint8, in shared memory
            return (normalize_on_device(pixels) if normalize else pixels), labels, indices, ok
        if self.decode == "device-decode":
            encoded = [x.dim() == 1 for x in images]
            paths = [base.paths[i] if base is not None else f"<item {i}>" for i in indices.tolist()]
            skip = bool(base.skip_bad_images) if base is not None else False
            return EncodedBatch(list(images), encoded, paths, skip), labels, indices, ok
        packed = []
        for positions, vertical_first in _plan([(x.shape[0], x.shape[1]) for x in images], self.resize, self.n_px):
            members = [images[i] for i in positions]
            hmax, wmax = max(x.shape[0] for x in members), max(x.shape[1] for x in members)
            pixels = _pad(members, _shared_empty((len(members), hmax, wmax, 3), torch.uint8))
            shapes = [(x.shape[0], x.shape[1]) for x in members]
            tables = _padded_tables(shapes, self.resize, self.n_px)
            sizes = torch.tensor(shapes, dtype=torch.long)
            packed.append((pixels, sizes, torch.tensor(positions, dtype=torch.long), vertical_first, tables))
        return PaddedGroups(packed, len(images)), labels, indices, ok

    def pixels(self, images, ok: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch -> (uint8 (B, 3, n, n) on ``device``, ok (B,))."""
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            raise ValueError("this batch was normalised in the loader: build it with normalize_in_workers=False")
        if isinstance(images, PackedCrops):
            return slots.pool_of(images.ref).fetch(images.ref, device).view(images.shape), ok
        if isinstance(images, PackedImages):
            return self._resize_packed(images, device), ok
        if isinstance(images, PaddedGroups):
            out = torch.empty(images.batch_size, 3, self.n_px, self.n_px, dtype=torch.uint8, device=device)
            for pixels, sizes, positions, vertical_first, tables in images.groups:
                result = _resize_padded(pixels.to(device, non_blocking=True), [tuple(x) for x in sizes.tolist()],
                                        self.resize, self.n_px, vertical_first, tables)
                out[positions.to(device, non_blocking=True)] = result
            return out, ok
        if isinstance(images, EncodedBatch):
            decoded, ok = _decode_on(images, ok, device)
            return pillow_resize_crop(decoded, self.n_px, self.resize, device), ok
        return images.to(device, non_blocking=True), ok

    def _resize_packed(self, images: PackedImages, device: torch.device) -> torch.Tensor:
        flat = slots.pool_of(images.ref).fetch(images.ref, device)
        out = torch.empty(len(images), 3, self.n_px, self.n_px, dtype=torch.uint8, device=device)
        for positions, vertical_first, tables in images.groups:
            sizes = [images.sizes[i] for i in positions]
            hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
            start = images.offsets[positions[0]]
            if all(size == (hmax, wmax) for size in sizes):  # packed back to back: a view, no copies
                padded = flat[start:start + len(positions) * hmax * wmax * 3].view(len(positions), hmax, wmax, 3)
            else:
                padded = torch.zeros(len(positions), hmax, wmax, 3, dtype=torch.uint8, device=device)
                for g, (i, (h, w)) in enumerate(zip(positions, sizes)):
                    start = images.offsets[i]
                    padded[g, :h, :w] = flat[start:start + h * w * 3].view(h, w, 3)
            result = _resize_padded(padded, sizes, self.resize, self.n_px, vertical_first, tables)
            out[torch.tensor(positions, device=device)] = result
        return out

    def to_device(self, images, ok: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch -> (float32 normalised (B, 3, n, n) on ``device``, ok (B,))."""
        if isinstance(images, torch.Tensor) and images.is_floating_point():  # normalised by the workers
            return images.to(device, non_blocking=True), ok
        pixels, ok = self.pixels(images, ok, device)
        return normalize_on_device(pixels), ok


def _decode_on(batch: EncodedBatch, ok: torch.Tensor, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Decode a batch's JPEG bytes on ``device`` (one batched call); (H, W, 3) images on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(batch.items)
    jobs = [i for i, e in enumerate(batch.encoded) if e]
    # torchvision's CUDA decoder allocates its outputs on the current stream but writes them from
    # a stream of its own that does not wait for this one: memory that queued kernels still read
    # (freed tensors the caching allocator hands back) gets overwritten, giving wrong embeddings
    # (seen on an H100 with torchvision 0.26: one image's cosine to the exact path 0.30; pytorch/
    # vision#9606). Draining this stream first, and the decoder's after, keeps the two apart.
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    try:
        decoded = decode_jpeg([batch.items[i] for i in jobs], mode=ImageReadMode.RGB, device=device) if jobs else []
    except RuntimeError:
        decoded = None  # one bad file fails the batch call: decode one by one below
    if cuda:
        torch.cuda.synchronize(device)
    ok = ok.clone()
    for n, i in enumerate(jobs):
        image = decoded[n] if decoded is not None else None
        if image is None:
            try:
                image = decode_jpeg(batch.items[i], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                image = _pil_fallback(batch, i)
                if image is None:
                    ok[i] = False
                    image = torch.zeros(3, 224, 224, dtype=torch.uint8)
        out[i] = image.to(device).permute(1, 2, 0)  # (H, W, 3) view
    for i, e in enumerate(batch.encoded):
        if not e:
            out[i] = batch.items[i].to(device, non_blocking=True)
    return out, ok  # type: ignore[return-value]


def _pil_fallback(batch: EncodedBatch, i: int) -> torch.Tensor | None:
    """PIL's verdict on bytes the device decoder refused: (3, H, W) pixels, None to skip, or raise."""
    try:
        with Image.open(io.BytesIO(batch.items[i].numpy().tobytes())) as image:
            image.load()
            return torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).permute(2, 0, 1)
    except _DECODE_ERRORS as error:
        if not batch.skip_bad_images:
            raise BadImageError(batch.paths[i], f"{type(error).__name__}: {error}") from error
        logger.warning("skipping %s", batch.paths[i])
        return None


class _BatchDataset(Dataset):
    """Whole batches as items (the DataLoader's auto-batching off): item ``seq`` is batch ``seq``,
    loaded by :meth:`_PipelineDataset.load_batch` into the pool's slot for ``seq``."""

    def __init__(self, wrapped: _PipelineDataset, batches: list[list[int]], pool: slots.SlotPool | None) -> None:
        self.wrapped = wrapped
        self.batches = batches
        self.pool = pool

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, seq: int):
        return self.wrapped.load_batch(seq, self.batches[seq], self.pool)


def _whole(batch):
    return batch


class _SlotLoader(DataLoader):
    """The DataLoader of slot batches: the workers send labels, indices and ok as NumPy arrays
    (inside the message; a tensor would cost a shared-memory file and a socket hand-over each:
    measured 4 ms of the main process per batch of 7 small tensors on the 2-core CPU, 0.4 ms as
    arrays); they are tensors again here, as every loader of this module yields them (a batch
    that did not fit its slot comes as tensors already)."""

    def __iter__(self):
        for images, labels, indices, ok in super().__iter__():
            yield images, torch.as_tensor(labels), torch.as_tensor(indices), torch.as_tensor(ok)  # no copies


SLOT_POOL_MB = 2048  # default cap of a whole-image loader's slots (shared, and on CUDA pinned, memory)


def _slot_pool_bytes() -> int:
    value = os.environ.get("UNICOM_SLOT_POOL_MB", str(SLOT_POOL_MB))
    try:
        megabytes = int(value)
    except ValueError:
        raise ValueError(f"UNICOM_SLOT_POOL_MB must be a whole number of MiB, got {value!r}") from None
    return max(megabytes, 0) << 20


_IMAGE_ALLOWANCE = 3 * 1024 * 768  # bytes per decoded image a whole-image slot plans for, unsampled


def _image_allowance(dataset: ImageDataset, samples: int = 32, margin: float = 1.25) -> int:
    """Bytes per decoded image a whole-image slot plans for: ``margin`` times the largest of
    ``samples`` images spread over the dataset (their headers only: PIL reads no pixels here);
    a batch whose images do not fit travels the usual way."""
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


def pipeline_loader(
    dataset: ImageDataset,
    pipeline: InputPipeline,
    batch_size: int,
    num_workers: int,
    device: torch.device | str = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
    persistent_workers: bool = False,
    prefetch_factor: int = 4,
    normalize_in_workers: bool | None = None,
    use_slots: bool | None = None,
) -> DataLoader:
    """A DataLoader over this rank's contiguous shard of ``dataset``, loaded as ``pipeline`` says.

    Like :func:`unicom.data.loader.sharded_loader` (same shards, order and item indices), with
    pinned host memory for CUDA devices and a deeper prefetch queue. Give ``pipeline.to_device``
    to :func:`unicom.embed.embed_loader` as ``preprocess``. ``normalize_in_workers`` (default:
    for CPU devices) normalises the uint8 crops in the workers rather than on the device.

    ``use_slots`` (default: with worker processes, when the workers return uint8 pixels): the
    workers write pixels into a ring of reused shared-memory slots (:mod:`unicom.data.slots`)
    instead of a fresh segment per batch (never for ``device-decode`` or batches normalised in
    the workers). Crops need ``batch_size * 3 * n_px**2`` bytes per slot; whole images
    (``device-resize``, ``tv-decode``) share at most ``UNICOM_SLOT_POOL_MB`` MiB (default 2048;
    0 turns their slots off), and a batch that does not fit travels the usual way. Batches must
    then be moved to the device (``pixels`` or ``to_device``) in order, each before the next is
    fetched, as ``embed_loader`` does.
    """
    device = torch.device(device)
    if normalize_in_workers is None:
        normalize_in_workers = device.type == "cpu"
    indices = shard_range(len(dataset), rank, world_size)
    workers = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers} if num_workers > 0 else {}
    wrapped = pipeline.dataset(dataset, normalize_in_workers)
    if use_slots is None:
        use_slots = num_workers > 0 and (pipeline.decode not in WHOLE_IMAGE_DECODES or _slot_pool_bytes() > 0)
    if not use_slots or normalize_in_workers or pipeline.decode == "device-decode":
        return DataLoader(Subset(wrapped, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          collate_fn=wrapped.collate, pin_memory=device.type == "cuda", drop_last=False, **workers)
    # Two batches ahead per worker keep it busy; every batch in flight needs a slot of its own.
    prefetch_factor = min(prefetch_factor, 2)
    if num_workers > 0:
        workers["prefetch_factor"] = prefetch_factor
    in_flight = max(num_workers, 1) * (prefetch_factor if num_workers > 0 else 1)
    num_slots = in_flight + 2
    if pipeline.decode in WHOLE_IMAGE_DECODES:
        slot_bytes = max(1, min(batch_size * _image_allowance(dataset), _slot_pool_bytes() // num_slots))
    else:
        slot_bytes = batch_size * 3 * pipeline.n_px * pipeline.n_px
    pool = slots.acquire(num_slots, slot_bytes, pin=device.type == "cuda")
    batches = [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    batch_dataset = _BatchDataset(wrapped, batches, pool)
    weakref.finalize(batch_dataset, slots.release, pool.id)  # loaders and their iterators hold the dataset
    return _SlotLoader(batch_dataset, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_whole,
                       pin_memory=device.type == "cuda", **workers)


LOADER_BATCH = 64  # images per worker batch: small batches keep every worker busy to the end


def embedding_loader(
    dataset: ImageDataset,
    decode: str,
    batch_size: int,
    num_workers: int,
    device: torch.device | str = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
    loader_batch_size: int | None = None,
) -> tuple[DataLoader, Callable | None]:
    """(loader, preprocess) to embed ``dataset`` with :func:`unicom.embed.embed_loader`.

    When the dataset's transform is the published eval or test transform, the ``decode``
    pipeline replaces it (same pixels for ``auto``, ``exact`` and ``device-resize``); any other
    transform is kept as it is (``sharded_loader``, preprocess None). The loader's batches hold
    ``loader_batch_size`` images (default: ``batch_size`` or 64, whichever is smaller): give
    ``batch_size`` to ``embed_loader``, which runs the model on batches of that size. With
    one large batch per worker, a pass over a dataset of a few dozen batches ends with most
    workers idle, and every worker holds many batches of decoded images in memory.
    """
    device = torch.device(device)
    decode = resolve_decode(decode, device)
    loader_batch_size = loader_batch_size or min(batch_size, LOADER_BATCH)
    pipeline = InputPipeline.from_transform(dataset.transform, decode)
    if pipeline is None:
        if decode != "exact":
            logger.warning("decode=%s needs the eval transform; %r is used as it is", decode, dataset.transform)
        pin = device.type == "cuda"
        return sharded_loader(dataset, loader_batch_size, num_workers, rank, world_size, pin_memory=pin), None
    if decode in WHOLE_IMAGE_DECODES + ("device-decode",) and device.type == "cpu":
        logger.warning("decode=%s resizes on the device, which is the CPU here: several times slower than "
                       "decode=exact (what auto picks on CPUs)", decode)
    loader = pipeline_loader(dataset, pipeline, loader_batch_size, num_workers, device, rank, world_size)
    return loader, pipeline.to_device
