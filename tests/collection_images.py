"""Folders of drawn pictures for the collection tests: distinct shapes and colours that a tiny
random model tells apart, and altered copies of them (re-encoded, downscaled, cropped, brighter)."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance

__all__ = ["altered", "draw", "write_folder"]


def draw(seed: int, size: int = 96) -> Image.Image:
    """A picture of a few random shapes on a random background, the same for the same seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    pen = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.randrange(size - 20), rng.randrange(size - 20)
        x1, y1 = x0 + rng.randrange(16, size - x0 + 1), y0 + rng.randrange(16, size - y0 + 1)
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = rng.choice(("rectangle", "ellipse", "polygon"))
        if shape == "polygon":
            pen.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
        else:
            getattr(pen, shape)([x0, y0, x1, y1], fill=colour)
    return image


def altered(image: Image.Image, how: str) -> Image.Image:
    """``image`` re-encoded as a lower-quality JPEG, downscaled, slightly cropped, or brighter."""
    if how == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=60)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if how == "downscale":
        return image.resize((image.width * 2 // 3, image.height * 2 // 3), Image.BICUBIC)
    if how == "crop":
        dx, dy = image.width // 20, image.height // 20
        return image.crop((dx, dy, image.width - dx, image.height - dy))
    if how == "brightness":
        return ImageEnhance.Brightness(image).enhance(1.15)
    raise ValueError(how)


def write_folder(folder: Path, seeds, fmt: str = "png") -> list[Path]:
    """One picture per seed, ``folder/img_<seed>.<fmt>``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = folder / f"img_{seed:04d}.{fmt}"
        draw(seed).save(path)
        paths.append(path)
    return paths
