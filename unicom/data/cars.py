"""Cars196: ``<root>/cars196/cars_annos.mat`` and the images it names.

``cars_annos.mat`` holds a MATLAB struct array ``annotations`` with the fields
relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, test; image paths are relative
to ``<root>/cars196/`` and classes are 1-based. The metric-learning split ignores the
``test`` field: classes 1-98 train and 99-196 test (0-based 0-97 and 98-195), that is the
classes below and above half the largest class id.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .base import RetrievalDataset, Split, encode_labels, finish, require_path
from .image import ImageDataset

LAYOUT = "<root>/cars196/cars_annos.mat (with the images it names under <root>/cars196/)"


def _scalar(value: np.ndarray):
    # loadmat wraps each struct field in a small array: (1,) for text, (1, 1) for numbers.
    return np.asarray(value).ravel()[0]


def read_annotations(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """(relative image paths, 1-based classes) from a ``cars_annos.mat`` file."""
    from scipy.io import loadmat  # scipy is only needed for this format

    contents = loadmat(path)
    if "annotations" not in contents:
        found = sorted(k for k in contents if not k.startswith("__"))
        raise ValueError(f"{path} holds no 'annotations' variable (found: {found}): expected the cars_annos.mat "
                         "of Stanford Cars")
    annotations = contents["annotations"].ravel()
    fields = annotations.dtype.names or ()
    if "relative_im_path" not in fields or "class" not in fields:
        raise ValueError(f"{path}: annotations lack relative_im_path or class; fields are {fields}")
    paths = [str(_scalar(a)) for a in annotations["relative_im_path"]]
    classes = [int(_scalar(a)) for a in annotations["class"]]
    return paths, classes


def build(
    root: str | os.PathLike,
    split: Split,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
) -> RetrievalDataset:
    """The ``train`` (classes 1-98) or ``test`` (classes 99-196) split of Cars196."""
    folder = Path(root) / "cars196"
    relative, classes = read_annotations(require_path(folder / "cars_annos.mat", "car", LAYOUT, root=root))
    half = max(classes, default=0) // 2
    keep = [i for i, c in enumerate(classes) if (c <= half) == (split == "train")]
    (labels,), names = encode_labels([classes[i] for i in keep])
    paths = [str(folder / relative[i]) for i in keep]
    return finish("car", split, ImageDataset(paths, labels, transform, skip_bad_images, classes=names),
                  layout=LAYOUT)
