"""ImageFolder trees: ``<root>/<class folder>/**/<image>``, classes in sorted folder order."""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .image import ImageDataset

logger = logging.getLogger(__name__)

# torchvision's ImageFolder extensions, compared case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _is_image(name: str) -> bool:
    # "._name" files are macOS AppleDouble metadata that archives made on a Mac carry next to
    # every image; they have an image extension but are not images.
    return not name.startswith("._") and name.lower().endswith(IMG_EXTENSIONS)


def scan_files(folder: str | os.PathLike, accept: Callable[[str], bool] = _is_image, *,
               seen: set[tuple[int, int]] | None = None, left_out: Counter | None = None) -> list[str]:
    """The files under ``folder`` whose names ``accept`` takes, recursively, in sorted path order.

    Symbolic links are followed, but every real folder and every real file is visited once
    (told apart by device and inode, kept in ``seen``, which one scan may share across several
    folders): a link back to a parent (``ln -s . loop``) cannot repeat a tree, and a second
    link to a file (or a hard link) does not count it twice. Only regular files are taken:
    FIFOs, sockets, devices, folders named like images and broken links are left out, and
    counted by kind in ``left_out``.
    """
    seen = seen if seen is not None else set()
    left_out = left_out if left_out is not None else Counter()
    found: list[tuple[str, str]] = []
    stack = [os.fspath(folder)]
    try:
        top = os.stat(stack[0])
    except OSError:
        return []
    if (top.st_dev, top.st_ino) in seen:
        left_out["folder seen before (a link cycle or a second link)"] += 1
        return []
    seen.add((top.st_dev, top.st_ino))
    while stack:
        current = stack.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError:
            left_out["unreadable folder"] += 1
            continue
        folders = []  # visited after this folder's files, in sorted order
        for entry in entries:
            try:
                info = os.stat(entry.path)  # follows links
            except OSError:
                if accept(entry.name):
                    left_out["broken link"] += 1
                continue
            key = (info.st_dev, info.st_ino)
            if stat.S_ISDIR(info.st_mode):
                if key in seen:
                    left_out["folder seen before (a link cycle or a second link)"] += 1
                else:
                    seen.add(key)
                    folders.append(entry.path)
            elif accept(entry.name):
                if not stat.S_ISREG(info.st_mode):
                    left_out["not a regular file (FIFO, socket or device)"] += 1
                elif key in seen:
                    left_out["file seen before (a second link to it)"] += 1
                else:
                    seen.add(key)
                    found.append((current, entry.name))
        stack += reversed(folders)
    return [os.path.join(d, f) for d, f in sorted(found)]


def _report(root: os.PathLike, left_out: Counter) -> None:
    if left_out:
        logger.warning("scanning %s left out %s", root,
                       ", ".join(f"{n} x {what}" for what, n in sorted(left_out.items())))


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """Walk an ImageFolder tree: (paths, class indices, class names).

    Class folders are sorted by name, as torchvision's ImageFolder sorts them, so a class's
    index is its position in that order; hidden folders (``.name``) are not classes. Files
    inside a class folder (recursively, see :func:`scan_files`) are taken in sorted order when
    they are regular files, their extension is one of :data:`IMG_EXTENSIONS` and their name
    does not start with ``._``; each real file and folder is visited once in the whole tree.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: expected an ImageFolder tree <root>/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths: list[str] = []
    indices: list[int] = []
    seen: set[tuple[int, int]] = set()
    left_out: Counter = Counter()
    top = os.stat(root)
    seen.add((top.st_dev, top.st_ino))
    for index, name in enumerate(classes):
        found = scan_files(root / name, seen=seen, left_out=left_out)
        paths += found
        indices += [index] * len(found)
        if not found:
            logger.warning("class folder %s holds no image", root / name)
    _report(root, left_out)
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
