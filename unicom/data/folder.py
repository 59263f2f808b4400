"""ImageFolder trees: ``<root>/<class folder>/**/<image>``, classes in sorted folder order."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .image import ImageDataset

__all__ = ["IMG_EXTENSIONS", "scan_image_folder", "load_image_folder"]

logger = logging.getLogger(__name__)

# torchvision's ImageFolder extensions, compared case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _is_image(name: str) -> bool:
    # "._name" files are macOS AppleDouble metadata that archives made on a Mac carry next to
    # every image; they have an image extension but are not images.
    return not name.startswith("._") and name.lower().endswith(IMG_EXTENSIONS)


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """Walk an ImageFolder tree: (paths, class indices, class names).

    Class folders are sorted by name, as torchvision's ImageFolder sorts them, so a class's
    index is its position in that order; hidden folders (``.name``) are not classes. Files
    inside a class folder (recursively) are taken in sorted order when their extension is
    one of :data:`IMG_EXTENSIONS` and their name does not start with ``._``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: expected an ImageFolder tree <root>/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths: list[str] = []
    indices: list[int] = []
    for index, name in enumerate(classes):
        found = 0
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            for file in sorted(files):
                if _is_image(file):
                    paths.append(os.path.join(folder, file))
                    indices.append(index)
                    found += 1
        if not found:
            logger.warning("class folder %s holds no image", root / name)
    return paths, indices, classes


def load_image_folder(
    root: str | os.PathLike,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
    class_to_idx: Mapping[str, int] | None = None,
) -> ImageDataset:
    """An :class:`ImageDataset` over an ImageFolder tree (e.g. ImageNet ``train/`` or ``val/``).

    Without ``class_to_idx`` labels are the sorted class folder indices. With it (the training
    set's mapping, ``dict(zip(train.classes, range(len(train.classes))))``) each folder is
    labelled by its NAME, so a validation set that lacks some classes still agrees with the
    training labels; a folder whose name is not in the mapping raises ValueError.
    """
    paths, indices, classes = scan_image_folder(root)
    if not paths:
        raise FileNotFoundError(
            f"no image found under {root}: expected <root>/<class folder>/<image> with an "
            f"extension among {', '.join(IMG_EXTENSIONS)}"
        )
    if class_to_idx is not None:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise ValueError(
                f"class folder(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} under {root} "
                f"are not among the {len(class_to_idx)} training classes"
            )
        labels = [class_to_idx[classes[i]] for i in indices]
        names: list[Any] = [None] * (max(class_to_idx.values()) + 1)
        for name, i in class_to_idx.items():
            names[i] = name
        classes = names
    else:
        labels = indices
    return ImageDataset(paths, labels, transform, skip_bad_images, classes=classes)
