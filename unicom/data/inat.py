"""iNaturalist 2018 retrieval split: ``<root>/iNaturalist/Inat_dataset_splits/``.

``Inaturalist_train_set1.txt`` and ``Inaturalist_test_set1.txt`` list one image path a
line, relative to ``<root>/iNaturalist/``; an image's class is the name of its parent
folder (``train_val2018/Plantae/7477/<hash>.jpg`` is class 7477). The 5,690 training
classes and 2,452 test classes are disjoint. ``train2018.json`` ships with the published
layout but is not needed here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from .base import RetrievalDataset, Split, encode_labels, finish, read_lines, require_path
from .image import ImageDataset

LAYOUT = (
    "<root>/iNaturalist/Inat_dataset_splits/Inaturalist_{train,test}_set1.txt "
    "(paths relative to <root>/iNaturalist/)"
)


def build(
    root: str | os.PathLike,
    split: Split,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
) -> RetrievalDataset:
    """The ``train`` or ``test`` split (set 1) of iNaturalist retrieval."""
    folder = Path(root) / "iNaturalist"
    listing = require_path(folder / "Inat_dataset_splits" / f"Inaturalist_{split}_set1.txt", "inat", LAYOUT,
                           root=root)
    relative = read_lines(listing)
    (labels,), names = encode_labels([PurePosixPath(p).parent.name for p in relative])
    paths = [str(folder / p) for p in relative]
    return finish("inat", split, ImageDataset(paths, labels, transform, skip_bad_images, classes=names),
                  layout=LAYOUT)
