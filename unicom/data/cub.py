"""CUB-200-2011: ``<root>/CUB_200_2011/images/<class folder>/*.jpg``.

The split is by class, in ImageFolder order (sorted class folder names): the first half of
the classes trains, the second half tests. With the standard 200 classes that is classes
0-99 for training and 100-199 for testing; a tree of C classes splits at C // 2.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .base import RetrievalDataset, Split, encode_labels, finish, require_path
from .folder import scan_image_folder
from .image import ImageDataset

LAYOUT = "<root>/CUB_200_2011/images/<class folder>/*.jpg"


def build(
    root: str | os.PathLike,
    split: Split,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
) -> RetrievalDataset:
    """The ``train`` (first half of the classes) or ``test`` (second half) split of CUB."""
    images = require_path(Path(root) / "CUB_200_2011" / "images", "cub", LAYOUT, root=root)
    paths, indices, classes = scan_image_folder(images)
    half = len(classes) // 2
    keep = [i for i, c in enumerate(indices) if (c < half) == (split == "train")]
    (labels,), names = encode_labels([classes[indices[i]] for i in keep])
    query = ImageDataset([paths[i] for i in keep], labels, transform, skip_bad_images, classes=names)
    return finish("cub", split, query, layout=LAYOUT)
