"""Pillow's bicubic resize and torchvision's center crop, replayed exactly on tensors.

Pillow resamples 8-bit images in fixed point: integer coefficients with 22 fractional bits,
two separable passes each rounded to 8 bits. The functions here rebuild those integers (in
float64, in Pillow's operation order) and apply them as float64 matmuls, whose products and
sums are integers below 2^53 and so exact in any summation order: the pixels are Pillow's,
bit for bit, on any device. Which pass runs first changed in Pillow 13; it is found at run
time (:func:`pass_order`).
"""

from __future__ import annotations

import functools
import math
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["pad", "padded_tables", "pass_order", "pillow_resize_crop", "plan", "resize_group", "resize_padded",
           "resized_size"]

logger = logging.getLogger(__name__)

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
def pass_order() -> Callable[[int, int, int, int], bool]:
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
            got = resize_group(torch.from_numpy(probe)[None], [(100, 100)], [(w_out, h_out)], [(0, 0)],
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


def resize_group(
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
    ``tables``: the stacked coefficient tables of these (:func:`padded_tables`), when already built.
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


def plan(sizes: Sequence[tuple[int, int]], resize: int, n_px: int, slack: float = 1.25):
    """Group images of sizes (h, w) for batched resizing: one pass order per group, and padding
    to the group's largest height and width within ``slack`` times the pixels it holds.

    Returns [(positions, vertical_first)], positions being indices into ``sizes``.
    """
    rule = pass_order()
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


def pad(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(h, w, 3) uint8 images -> (G, Hmax, Wmax, 3), each in its top-left corner, zeros elsewhere."""
    hmax = max(x.shape[0] for x in images)
    wmax = max(x.shape[1] for x in images)
    out = torch.zeros(len(images), hmax, wmax, 3, dtype=torch.uint8, device=images[0].device)
    for g, x in enumerate(images):
        out[g, :x.shape[0], :x.shape[1]] = x
    return out


def padded_tables(sizes: Sequence[tuple[int, int]], resize: int, n_px: int):
    """:func:`_group_tables` for images of ``sizes`` (h, w) resized to ``resize`` and cropped to
    ``n_px``; for images of one size, the tables of one image (the resize broadcasts them)."""
    if len(set(sizes)) == 1:
        sizes = sizes[:1]
    geometry = [_geometry(h, w, resize, n_px) for h, w in sizes]
    return _group_tables(sizes, [g[0] for g in geometry], [g[1] for g in geometry], (n_px, n_px))


def resize_padded(pixels: torch.Tensor, sizes: Sequence[tuple[int, int]], resize: int, n_px: int,
                  vertical_first: bool, tables=None) -> torch.Tensor:
    """One group: padded (G, Hmax, Wmax, 3) uint8 images of ``sizes`` (h, w) -> (G, 3, n_px, n_px)."""
    tables = tables if tables is not None else padded_tables(sizes, resize, n_px)
    return resize_group(pixels, sizes, (), (), (n_px, n_px), vertical_first, tables)


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
    for positions, vertical_first in plan(sizes, resize, n_px):
        pixels = pad([images[i].to(device, non_blocking=True) for i in positions])
        result = resize_padded(pixels, [sizes[i] for i in positions], resize, n_px, vertical_first)
        out[torch.tensor(positions, device=device)] = result
    return out

