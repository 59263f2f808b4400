"""In-Shop Clothes Retrieval: ``<root>/Inshop_Clothes/Eval/list_eval_partition.txt``.

The file's first line is the row count, the second the header
``image_name item_id evaluation_status``, then one row per image with the status train,
query or gallery. The split ``train`` is the rows marked train; ``test`` is the query rows
searching the gallery rows, their item ids encoded as one set of labels.

``image_name`` starts with ``img/``. The published release resolves it under
``Inshop_Clothes/Img/`` (``Img/img/WOMEN/...``, as the archive unpacks); a tree with
``img/`` straight inside ``Inshop_Clothes/`` works too: whichever of the two holds the
first listed image (or its top folder) is used for all of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from .base import RetrievalDataset, Split, encode_labels, finish, read_lines, require_path
from .image import ImageDataset

logger = logging.getLogger(__name__)

LAYOUT = (
    "<root>/Inshop_Clothes/Eval/list_eval_partition.txt, with the images under "
    "<root>/Inshop_Clothes/Img/img/..."
)


def read_partition(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """The ``(image_name, item_id, evaluation_status)`` rows of list_eval_partition.txt."""
    lines = read_lines(Path(path))
    if len(lines) < 2 or not lines[0].isdigit():
        raise ValueError(f"{path}: expected a count line, a header line, then rows")
    rows = []
    for n, line in enumerate(lines[2:], start=3):
        row = line.split()
        if len(row) != 3 or row[2] not in ("train", "query", "gallery"):
            raise ValueError(f"{path}:{n}: expected 'image_name item_id train|query|gallery', got {line!r}")
        rows.append((row[0], row[1], row[2]))
    if int(lines[0]) != len(rows):
        logger.warning("%s announces %s rows but holds %d", path, lines[0], len(rows))
    return rows


def _image_base(folder: Path, first: str) -> Path:
    candidates = (folder / "Img", folder)
    for base in candidates:
        if (base / first).exists():
            return base
    top = Path(first).parts[0]
    for base in candidates:
        if (base / top).is_dir():
            return base
    raise FileNotFoundError(
        f"inshop: neither {candidates[0] / first} nor {candidates[1] / first} exists. "
        f"Expected the layout {LAYOUT}."
    )


def build(
    root: str | os.PathLike,
    split: Split,
    transform: Callable | None = None,
    skip_bad_images: bool = False,
) -> RetrievalDataset:
    """The ``train`` split, or the ``test`` split as query and gallery, of In-Shop."""
    folder = Path(root) / "Inshop_Clothes"
    rows = read_partition(require_path(folder / "Eval" / "list_eval_partition.txt", "inshop", LAYOUT,
                                            root=root))
    if not rows:
        raise ValueError(f"{folder / 'Eval' / 'list_eval_partition.txt'} lists no image")
    base = _image_base(folder, rows[0][0])

    def subset(status: str) -> tuple[list[str], list[str]]:
        chosen = [r for r in rows if r[2] == status]
        return [str(base / r[0]) for r in chosen], [r[1] for r in chosen]

    if split == "train":
        paths, items = subset("train")
        (labels,), names = encode_labels(items)
        return finish("inshop", split, ImageDataset(paths, labels, transform, skip_bad_images, classes=names),
                      layout=LAYOUT)
    query_paths, query_items = subset("query")
    gallery_paths, gallery_items = subset("gallery")
    (query_labels, gallery_labels), names = encode_labels(query_items, gallery_items)
    query = ImageDataset(query_paths, query_labels, transform, skip_bad_images, classes=names)
    gallery = ImageDataset(gallery_paths, gallery_labels, transform, skip_bad_images, classes=names)
    return finish("inshop", split, query, gallery, layout=LAYOUT)
