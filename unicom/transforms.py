"""The published image transforms.

The eval transform matches the published one pixel for pixel on RGB and grayscale
images. Other modes are first brought to 8-bit RGB properly: 16-bit images are
scaled (not clipped), palette images keep their colours, CMYK is converted.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps
from torchvision import transforms as T

__all__ = ["MEAN", "STD", "to_rgb", "ToRGB", "eval_transform", "train_transform", "test_transform"]

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB.

    Integer images of more than 8 bits (``I;16*``, and ``I``, which PIL uses for 16-bit PNG,
    PGM and TIFF files) are scaled from 0-65535 to 0-255, float images (``F``) from 0-1,
    then clipped: the same stored value gives the same pixel in every image. (PIL's own
    ``convert("RGB")`` clips them at 255, which turns most 16-bit photographs white.)"""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        full_scale = 1.0 if image.mode == "F" else 65535.0
        array = np.clip(np.rint(array * (255.0 / full_scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")  # palette (with optional transparency) -> real colours
    return image.convert("RGB")


class ToRGB:
    """Transform wrapper around :func:`to_rgb` (picklable for DataLoader workers)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return to_rgb(image)

    def __repr__(self) -> str:
        return "ToRGB()"


def _resize_crop(resize: int, n_px: int) -> T.Compose:
    return T.Compose(
        [
            ToRGB(),
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(n_px),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


def eval_transform(n_px: int) -> T.Compose:
    """Resize the shorter side to ``n_px`` (bicubic), center-crop, RGB, tensor, CLIP normalisation."""
    return _resize_crop(n_px, n_px)


def test_transform(n_px: int) -> T.Compose:
    """The ``timm`` fine-tuning choice at test time: resize to n_px/0.875 for n_px <= 224."""
    return _resize_crop(int(n_px / 0.875) if n_px <= 224 else n_px, n_px)


def _posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, valid for every magnitude.

    timm's ``PosterizeIncreasing`` keeps 0 bits at the top magnitude, which Pillow >= 13
    rejects (ValueError) where older Pillow returned a black image: keep that meaning.
    """
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def _make_posterize_safe(transform) -> None:
    """Point every posterize op of a timm augmentation pipeline at :func:`_posterize`."""
    stack = [transform]
    while stack:
        node = stack.pop()
        if "posterize" in str(getattr(node, "name", "")).lower() and hasattr(node, "aug_fn"):
            node.aug_fn = _posterize
        for attr in ("transforms", "ops"):
            stack.extend(getattr(node, attr, None) or [])


def train_transform(n_px: int, kind: str = "origin_clip", **timm_options):
    """Fine-tuning transform: ``origin_clip`` (the eval transform) or ``timm``.

    ``timm`` is timm's ``create_transform(is_training=True)`` with the published settings
    (RandAugment ``rand-m9-mstd0.5-inc1``, colour jitter 0.4, bicubic, random erasing 0.25 in
    pixel mode, once); ``timm_options`` override them (e.g. ``auto_augment=...``).
    """
    if kind == "origin_clip":
        return eval_transform(n_px)
    if kind == "timm":
        from timm.data import create_transform

        options = dict(color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                       re_prob=0.25, re_mode="pixel", re_count=1, mean=MEAN, std=STD)
        options.update(timm_options)
        augment = create_transform(input_size=n_px, is_training=True, **options)
        _make_posterize_safe(augment)
        return T.Compose([ToRGB(), augment])
    raise ValueError(f"Unknown transform {kind!r}: expected 'origin_clip' or 'timm'")
