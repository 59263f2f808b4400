"""``unicom dedup --threshold auto``: the near-duplicate threshold, calibrated on the collection itself.

A sample of the collection's images is altered as copies are in the wild (JPEG re-encoding,
downscaling, a small crop, brighter), the copies are embedded with the collection's model, and
each copy is scored against its original (a positive) and against its nearest *distinct* image
in the collection (a negative). The threshold is the lowest similarity at which the positives
are told from the negatives at the requested precision.

The collection may already hold duplicates of a sampled image, so its nearest neighbour is not
always distinct: a neighbour with the same bytes, or at least as similar to the original as the
original's own altered copies are, is not counted as a negative.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile

import numpy as np
from PIL import Image, ImageEnhance

__all__ = ["ALTERATIONS", "alter", "calibrate_threshold", "pick_threshold"]

logger = logging.getLogger(__name__)

ALTERATIONS = ("jpeg", "downscale", "crop", "brightness")
NEIGHBOURS = 10


def alter(image: Image.Image, how: str) -> Image.Image:
    """One altered copy of ``image``: re-encoded as JPEG (quality 75), downscaled to half, 5%
    cropped from every side, or 20% brighter."""
    if how == "jpeg":
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=75)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if how == "downscale":
        return image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.BICUBIC)
    if how == "crop":
        dx, dy = image.width // 20, image.height // 20
        return image.crop((dx, dy, image.width - dx, image.height - dy))
    if how == "brightness":
        return ImageEnhance.Brightness(image).enhance(1.2)
    raise ValueError(f"unknown alteration {how!r}: expected one of {ALTERATIONS}")


def _open(path: str) -> Image.Image:
    """The RGB image of a row's path: a file, or a member of a tar (``archive.tar/member``)."""
    if os.path.isfile(path):
        with Image.open(path) as image:
            return image.convert("RGB")
    head, _, member = path.partition(".tar/")
    with tarfile.open(head + ".tar", "r:") as archive:
        data = archive.extractfile(member).read()
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def pick_threshold(positives: np.ndarray, negatives: np.ndarray, precision: float = 0.99) -> dict:
    """The lowest threshold whose precision (positives at or above it, over everything at or
    above it) reaches ``precision``, with the precision and recall measured there."""
    candidates = np.unique(np.r_[positives, negatives])
    best = None
    for t in candidates[::-1]:  # from the highest: recall grows as the threshold falls
        tp = int((positives >= t).sum())
        fp = int((negatives >= t).sum())
        if tp and tp / (tp + fp) >= precision:
            best = (float(t), tp / (tp + fp), tp / len(positives))
    if best is None:  # no threshold separates them: the highest positive is the best we can say
        t = float(positives.max()) if len(positives) else 1.0
        tp, fp = int((positives >= t).sum()), int((negatives >= t).sum())
        best = (t, tp / max(tp + fp, 1), tp / max(len(positives), 1))
        logger.warning("no threshold reaches precision %.2f on this collection; using %.4f", precision, t)
    threshold, reached, recall = best
    return {"threshold": threshold, "precision": reached, "recall": recall,
            "positives": len(positives), "negatives": len(negatives)}


def calibrate_threshold(collection, sample: int = 100, precision: float = 0.99, seed: int = 0) -> dict:
    """Calibrate the near-duplicate threshold of ``collection`` (see the module docstring)."""
    ids = collection.ids()
    if len(ids) < 2:
        raise ValueError(f"{collection.path} has {len(ids)} searchable image(s): calibration needs at least 2 "
                         "(or give --threshold)")
    chosen = np.sort(np.random.default_rng(seed).choice(ids, min(sample, len(ids)), replace=False))
    table = collection.metadata(["id", "sha256"])
    sha_of = dict(zip(table.column("id").to_pylist(), table.column("sha256").to_pylist()))
    copies, owners = [], []
    for id_, path in zip(chosen, collection.paths_of(chosen)):
        try:
            image = _open(path)
        except (OSError, KeyError, tarfile.TarError) as error:
            logger.warning("calibration leaves out %s: %s", path, error)
            continue
        copies += [alter(image, how) for how in ALTERATIONS]
        owners += [int(id_)] * len(ALTERATIONS)
    if not copies:
        raise ValueError(f"none of the sampled images of {collection.path} could be opened to calibrate "
                         "(moved?); give --threshold")
    owners = np.asarray(owners)
    copy_vectors = collection.embed_images(copies)
    originals = collection.vectors_of(owners)
    positives = np.einsum("nd,nd->n", copy_vectors, originals)
    lowest_copy = {o: positives[owners == o].min() for o in np.unique(owners)}
    negatives = []
    for owner, row in zip(owners, collection.search(copy_vectors, NEIGHBOURS)):
        original = collection.vectors_of([owner])[0]
        for hit in row:
            other = hit["id"]
            if other == owner or sha_of.get(other) == sha_of.get(owner):
                continue
            if float(collection.vectors_of([other])[0] @ original) >= lowest_copy[owner]:
                continue  # as close to the original as its own copies: a duplicate already there
            negatives.append(hit["score"])
            break
    return pick_threshold(positives, np.asarray(negatives, np.float32), precision)
