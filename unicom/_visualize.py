"""A picture of retrieval results: random queries with their top results, right or wrong."""

from __future__ import annotations

import os

import torch
from PIL import Image, ImageDraw, ImageOps

from ._utils import atomic_write
from .metrics import knn_topk

__all__ = ["retrieval_grid"]

GREEN, RED, BLUE = (40, 170, 60), (210, 40, 40), (40, 90, 210)


def _tile(image: Image.Image, size: int, colour: tuple[int, int, int], border: int) -> Image.Image:
    # Scale to fit, up or down (small images such as 8x8 digits are enlarged).
    image = ImageOps.contain(image, (size - 2 * border, size - 2 * border), Image.Resampling.BICUBIC)
    tile = Image.new("RGB", (size, size), colour)
    inner = Image.new("RGB", (size - 2 * border, size - 2 * border), (255, 255, 255))
    inner.paste(image, ((inner.width - image.width) // 2, (inner.height - image.height) // 2))
    tile.paste(inner, (border, border))
    return tile


def retrieval_grid(query, gallery, data, num_queries: int, path: str | os.PathLike, top: int = 8,
                   tile: int = 128, seed: int = 0, num_feat: int | None = None) -> None:
    """Write a PNG: one row per random query (blue frame), then its top results, framed green
    when they share the query's label and red when not. ``query``/``gallery`` are
    :class:`unicom.evaluate.Embeddings` (gallery None: queries search their own set, self excluded).
    """
    same_set = gallery is None
    gallery = query if same_set else gallery
    query_images = data.query
    gallery_images = data.query if same_set else data.gallery
    dims = slice(None) if num_feat is None else slice(0, num_feat)
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(query.labels), generator=generator)[:num_queries]
    sims, idx = knn_topk(query.features[picked.to(query.features.device), dims], gallery.features[:, dims],
                         top + int(same_set))
    rows = []
    for row, q in enumerate(picked.tolist()):
        neighbours = idx[row].tolist()
        if same_set:  # exclude the query itself by index, never by rank
            neighbours = [n for n in neighbours if n != q][:top]
        q_label = int(query.labels[q])
        tiles = [_tile(query_images.load_image(int(query.indices[q])), tile, BLUE, 6)]
        for n in neighbours:
            colour = GREEN if int(gallery.labels[n]) == q_label else RED
            tiles.append(_tile(gallery_images.load_image(int(gallery.indices[n])), tile, colour, 6))
        rows.append(tiles)
    width = max(len(r) for r in rows) * tile + tile // 4
    canvas = Image.new("RGB", (width, len(rows) * tile), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, tiles in enumerate(rows):
        for c, t in enumerate(tiles):
            x = c * tile + (tile // 4 if c else 0)  # a gap after the query column
            canvas.paste(t, (x, r * tile))
        draw.line([(tile + tile // 8, r * tile), (tile + tile // 8, (r + 1) * tile)], fill=(180, 180, 180), width=2)
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))
