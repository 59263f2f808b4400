"""A user's own labelled images (``--dataset folder --data-root DIR``), in one of three layouts:

``classes``
    ``DIR/<class>/*``: the classes are split in half by sorted name, the first half trains and
    the second half tests (each test image searches the other test images), as CUB.
``train-test``
    ``DIR/train/<class>/*`` and ``DIR/test/<class>/*``: the test images search each other.
``query-gallery``
    ``DIR/query/<class>/*`` searching ``DIR/gallery/<class>/*`` (In-Shop style: a query is never
    in the gallery, classes match by folder name), and ``DIR/train/<class>/*`` for fine-tuning.

Class folders are read as ImageFolder trees (:func:`unicom.data.folder.scan_image_folder`: sorted,
recursive, images by extension, links followed once). The layout found is logged; a folder
that fits none, or fits more than one, is an error that says what was found and expected.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from .base import RetrievalDataset, Split, encode_labels, finish
from .folder import scan_image_folder
from .image import ImageDataset

__all__ = ["KS", "LAYOUT", "build", "find_layout"]

logger = logging.getLogger(__name__)

LAYOUT = ("DIR/<class>/* (classes split in half by sorted name, the first half trains), or DIR/train/<class>/* "
          "and DIR/test/<class>/*, or DIR/query/<class>/* and DIR/gallery/<class>/* (plus DIR/train/<class>/* "
          "to fine-tune)")
KS = (1, 2, 4, 8)  # Recall@K, as for CUB and Cars
_SPLITS = ("train", "test", "query", "gallery")


def _folders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def find_layout(root: str | os.PathLike) -> str:
    """Which layout ``root`` holds: ``classes``, ``train-test`` or ``query-gallery``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"folder: {root} is not a folder. Expected {LAYOUT}")
    folders = _folders(root)
    if not folders:
        raise FileNotFoundError(f"folder: {root} holds no class or split folder. Expected {LAYOUT}")
    splits = [f for f in folders if f in _SPLITS]
    others = [f for f in folders if f not in _SPLITS]
    if not splits:
        return "classes"
    if others:
        raise ValueError(f"folder: {root} is ambiguous: split folders ({', '.join(splits)}) beside other folders "
                         f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); are they classes or "
                         f"splits? Rename or move them. Expected {LAYOUT}")
    if "query" in splits or "gallery" in splits:
        if "test" in splits:
            raise ValueError(f"folder: {root} is ambiguous: it holds test/ and query/ or gallery/; keep test/ "
                             "(queries search the test images) or query/ + gallery/")
        missing = {"query", "gallery"} - set(splits)
        if missing:
            raise FileNotFoundError(f"folder: {root} has {({'query', 'gallery'} - missing).pop()}/ but no "
                                    f"{missing.pop()}/: queries search a gallery. Expected {LAYOUT}")
        return "query-gallery"
    return "train-test"


def _scan(folder: Path, root: Path, layout: str, split: Split) -> tuple[list[str], list[str]]:
    """(paths, class names) of the ImageFolder tree ``folder``; an error if it is missing."""
    if not folder.is_dir():
        needed = "fine-tuning" if split == "train" else "evaluation"
        raise FileNotFoundError(f"folder: {root} ({layout} layout) has no {folder.name}/, which {needed} needs. "
                                f"Expected {LAYOUT}")
    paths, indices, classes = scan_image_folder(folder)
    return paths, [classes[i] for i in indices]


def build(
    root: str | os.PathLike,
    split: Split,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
) -> RetrievalDataset:
    """The ``train`` or ``test`` split of the labelled images under ``root`` (see the module)."""
    root = Path(root)
    layout = find_layout(root)
    gallery = None
    if layout == "classes":
        all_paths, all_indices, classes = scan_image_folder(root)
        if len(classes) < 2:
            raise ValueError(f"folder: {root} holds {len(classes)} class folder(s); splitting classes in half needs "
                             f"at least 2 (or give DIR/train and DIR/test). Expected {LAYOUT}")
        half = len(classes) // 2
        keep = [i for i, c in enumerate(all_indices) if (c < half) == (split == "train")]
        paths, keys = [all_paths[i] for i in keep], [classes[all_indices[i]] for i in keep]
    elif layout == "train-test" or split == "train":
        paths, keys = _scan(root / split, root, layout, split)
    else:
        paths, keys = _scan(root / "query", root, layout, split)
        gallery_paths, gallery_keys = _scan(root / "gallery", root, layout, split)
        (labels, gallery_labels), names = encode_labels(keys, gallery_keys)
        lone = sorted(set(keys) - set(gallery_keys))
        if lone:
            logger.warning("folder: %d query class(es) have no gallery image (%s): their queries cannot be right",
                           len(lone), ", ".join(lone[:5]))
        gallery = ImageDataset(gallery_paths, gallery_labels, transform, skip_bad_images, classes=names)
    if gallery is None:
        (labels,), names = encode_labels(keys)
    query = ImageDataset(paths, labels, transform, skip_bad_images, classes=names)
    logger.info("folder: %s layout under %s; %s split: %d %s in %d classes%s", layout, root, split, len(paths),
                "query images" if gallery is not None else "images", len(set(keys)),
                "" if gallery is None else f", {len(gallery)} gallery images")
    return finish("folder", split, query, gallery, layout=LAYOUT, ks=KS)
