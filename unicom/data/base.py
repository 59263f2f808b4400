"""What every dataset format shares: the result type, label encoding, layout and count checks."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .image import ImageDataset
from .standard import STANDARD

logger = logging.getLogger(__name__)

Split = Literal["train", "test"]


class DatasetCountWarning(UserWarning):
    """A split's image or class count differs from the benchmark's standard count."""


@dataclass
class RetrievalDataset:
    """One split of a retrieval benchmark.

    ``gallery`` is None when the query set is its own gallery (each query then has to be
    excluded from its own ranking); otherwise queries search the gallery, whose labels share
    one encoding with the queries'. Labels are contiguous, 0 to ``num_classes - 1``.
    """

    name: str
    query: ImageDataset
    gallery: ImageDataset | None
    num_classes: int
    ks: tuple[int, ...]


def _sort_key(key: Hashable) -> tuple:
    # Numeric class names ("7477", or ints) sort by value, everything else as text, so
    # labels follow the dataset's own numbering where it has one.
    text = str(key)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def encode_labels(*keys: Sequence[Hashable]) -> tuple[list[torch.Tensor], list[str]]:
    """Map class keys to contiguous labels, sorted by key, one encoding across all ``keys``.

    Returns one (N_i,) int64 tensor per sequence in ``keys`` and the class names by label.
    """
    classes = sorted({k for seq in keys for k in seq}, key=_sort_key)
    index = {k: i for i, k in enumerate(classes)}
    labels = [torch.tensor([index[k] for k in seq], dtype=torch.long) for seq in keys]
    return labels, [str(c) for c in classes]


def require_path(path: Path, name: str, layout: str, root: str | os.PathLike | None = None) -> Path:
    """``path`` if it exists, else a FileNotFoundError naming it and the expected layout.

    ``path`` lies under ``root/<dataset folder>/``; a ``root`` that is that dataset folder
    itself (one level too deep: ``data/CUB_200_2011`` for ``data``) is named as such, since
    the path the layout asks for would only repeat the folder's name.
    """
    if not path.exists() and root is not None:
        root = Path(root)
        folder, *rest = path.relative_to(root).parts
        if root.name == folder or (rest and root.joinpath(*rest).exists()):
            raise FileNotFoundError(
                f"{name}: the dataset root {root} is the {folder} folder itself; give the folder that holds "
                f"it ({root.parent}) as the root. Expected the layout {layout}."
            )
    if not path.exists():
        raise FileNotFoundError(
            f"{name}: {path} not found. Expected the layout {layout}, where <root> is the "
            "folder given as the dataset root."
        )
    return path


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a text file, stripped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _check(name: str, split: str, what: str, found: int, standard: int) -> None:
    if found != standard:
        warnings.warn(
            f"{name} {split}: found {found} {what}, standard {standard} "
            "(a subset or an incomplete copy of the dataset?)",
            DatasetCountWarning,
            stacklevel=4,
        )


def finish(name: str, split: Split, query: ImageDataset, gallery: ImageDataset | None = None,
           layout: str | None = None, ks: tuple[int, ...] | None = None) -> RetrievalDataset:
    """Wrap a built split: fill in Recall@K (``ks``, default the benchmark's) and warn where counts
    differ from the standard (a name without one, a user's own data, has no count to check);
    an empty split is an error that names the expected ``layout``."""
    standard = STANDARD.get(name)
    for part, dataset in (("images", query), ("gallery images", gallery)):
        if dataset is not None and len(dataset) == 0:
            raise FileNotFoundError(f"{name} {split}: no {part} found (an empty or misplaced copy of the dataset?)"
                                    + (f"; expected the layout {layout}" if layout else ""))
    labels = query.labels if gallery is None else torch.cat([query.labels, gallery.labels])
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    images = "query images" if gallery is not None else "images"
    if standard is not None:
        counts = getattr(standard, split)
        _check(name, split, images, len(query), counts.images)
        if gallery is not None and counts.gallery is not None:
            _check(name, split, "gallery images", len(gallery), counts.gallery)
        _check(name, split, "classes", num_classes, counts.classes)
    logger.info(
        "%s %s: %d %s%s, %d classes", name, split, len(query), images,
        "" if gallery is None else f", {len(gallery)} gallery images", num_classes,
    )
    return RetrievalDataset(name, query, gallery, num_classes, ks or standard.ks)
