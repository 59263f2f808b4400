"""scikit-learn's bundled handwritten digits: a retrieval set that needs no download.

1,797 grayscale 8x8 images with values 0-16, scaled to 0-255 and kept in memory; digits
0-4 train and 5-9 test. Meant for smoke tests and examples, not as a benchmark.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from .base import RetrievalDataset, Split, finish
from .image import ImageDataset


def build(
    root: str | os.PathLike | None = None,
    split: Split = "test",
    transform: Callable | None = None,
    skip_bad_images: bool = False,
) -> RetrievalDataset:
    """The ``train`` (digits 0-4) or ``test`` (digits 5-9) split; ``root`` is ignored."""
    from sklearn.datasets import load_digits  # scikit-learn is only needed for this set

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    keep = np.flatnonzero((digits.target < 5) == (split == "train"))
    first = 0 if split == "train" else 5
    labels = digits.target[keep] - first
    names = [f"digits/{split}/{i:04d}" for i in keep]
    classes = [str(d) for d in range(first, first + 5)]
    query = ImageDataset(list(images[keep]), labels, transform, skip_bad_images, classes=classes, names=names)
    return finish("digits", split, query)
