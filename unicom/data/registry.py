"""Dataset names to builders, and :func:`load_retrieval_dataset`."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import Protocol

from . import cars, cub, custom, digits, inat, inshop, sop
from .base import RetrievalDataset, Split


class Builder(Protocol):
    def __call__(
        self,
        root: str | os.PathLike,
        split: Split,
        transform: Callable | None = None,
        skip_bad_images: bool = False,
    ) -> RetrievalDataset: ...


DATASETS: dict[str, Builder] = {
    "cub": cub.build,
    "car": cars.build,
    "sop": sop.build,
    "inshop": inshop.build,
    "inat": inat.build,
    "digits": digits.build,
    "folder": custom.build,  # the user's own labelled images: --data-root is the folder itself
}

# Other names people use for the same datasets.
ALIASES: dict[str, str] = {"cars": "car"}


def available_datasets() -> list[str]:
    """Every accepted dataset name: the registry's, then the aliases."""
    return [*DATASETS, *ALIASES]


def load_retrieval_dataset(
    name: str,
    root: str | os.PathLike,
    split: Split,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
) -> RetrievalDataset:
    """Build one split of a named retrieval benchmark found under ``root``.

    ``name`` is a key of :data:`DATASETS` or :data:`ALIASES` (case-insensitive). ``split`` is
    ``train`` (the query set is the training set, labels 0..C-1, no gallery) or ``test``.
    ``transform`` maps an RGB PIL image to the model's input; with ``skip_bad_images`` an
    undecodable image yields ``ok=False`` instead of raising :class:`BadImageError`.
    A split whose counts differ from the standard warns with DatasetCountWarning.
    """
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        close = difflib.get_close_matches(name.lower(), available_datasets(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}.{hint}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    return DATASETS[key](root, split, transform, skip_bad_images)
