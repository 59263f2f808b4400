"""Stanford Online Products: ``<root>/Stanford_Online_Products/Ebay_{train,test}.txt``.

Each file has a header line, then rows ``image_id class_id super_class_id path`` with
1-based ids and paths relative to the ``Stanford_Online_Products`` folder. The training
classes (11,318) and test classes (11,316) are disjoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .base import RetrievalDataset, Split, encode_labels, finish, read_lines, require_path
from .image import ImageDataset

LAYOUT = "<root>/Stanford_Online_Products/Ebay_{train,test}.txt (with the images they name)"


def build(
    root: str | os.PathLike,
    split: Split,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
) -> RetrievalDataset:
    """The ``train`` (Ebay_train.txt) or ``test`` (Ebay_test.txt) split of SOP."""
    folder = Path(root) / "Stanford_Online_Products"
    listing = require_path(folder / f"Ebay_{split}.txt", "sop", LAYOUT, root=root)
    rows = [line.split(None, 3) for line in read_lines(listing)[1:]]  # [1:]: the header line
    for n, row in enumerate(rows, start=2):
        if len(row) != 4:
            raise ValueError(f"{listing}:{n}: expected 'image_id class_id super_class_id path', got {row}")
    (labels,), names = encode_labels([int(row[1]) for row in rows])
    paths = [str(folder / row[3]) for row in rows]
    return finish("sop", split, ImageDataset(paths, labels, transform, skip_bad_images, classes=names),
                  layout=LAYOUT)
