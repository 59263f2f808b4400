"""Small synthetic datasets written in each benchmark's real on-disk format.

Every image is a tiny solid-colour picture (16x12 by default), so a test can check that the
image loaded at index ``i`` is the one listed there: its mean colour is ``Item.color``
(within JPEG error). Each ``make_*`` function returns what it wrote, in the order the loader
is expected to yield it.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "Item",
    "Written",
    "write_image",
    "make_image_folder",
    "make_cub",
    "make_cars",
    "make_sop",
    "make_inshop",
    "make_inat",
    "make_bad_images",
    "write_tar",
]

SIZE = (16, 12)  # (width, height)

# Bytes that macOS puts in "._name" AppleDouble files: an image extension, not an image.
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)


@dataclass
class Item:
    path: str  # where the image was written
    key: str  # its class as the dataset names it (class folder, class id, item id)
    color: tuple[int, int, int]  # the RGB colour it is filled with


@dataclass
class Written:
    root: Path  # the root to give the loader
    train: list[Item]
    test: list[Item]  # In-Shop: the query images
    gallery: list[Item] | None = None  # In-Shop only
    junk: list[str] = field(default_factory=list)  # files written that the loader must skip


def _color(rng: np.random.Generator, gray: bool = False) -> tuple[int, int, int]:
    if gray:
        g = int(rng.integers(20, 236))
        return (g, g, g)
    return tuple(int(v) for v in rng.integers(20, 236, size=3))  # type: ignore[return-value]


def write_image(
    path: str | os.PathLike, color: tuple[int, int, int], mode: str = "RGB", size: tuple[int, int] = SIZE
) -> None:
    """Write a solid ``color`` image at ``path`` (format from the extension) in PIL ``mode``.

    ``mode`` is RGB, L (``color`` must be gray), RGBA (alpha 128, dropped on loading) or P
    (a palette PNG whose second palette entry is marked transparent but unused).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        image = Image.new("L", size, color[0])
    elif mode == "RGBA":
        image = Image.new("RGBA", size, (*color, 128))
    elif mode == "P":
        image = Image.new("P", size, 0)
        image.putpalette([*color, 255, 0, 255] + [0] * (3 * 254))
        image.info["transparency"] = 1
    else:
        image = Image.new("RGB", size, color)
    if mode == "P":
        image.save(path, transparency=1)
    elif path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=95)
    else:
        image.save(path)


def make_image_folder(root: str | os.PathLike, classes: list[str], per_class: int = 3, seed: int = 0) -> list[Item]:
    """``<root>/<class>/<class>_<j>.jpg`` for each class, plus a ``._`` file and a ``.txt``
    per class that an ImageFolder loader must skip. Returns the images in ImageFolder order
    (sorted class names, then sorted file names)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    items = []
    for name in sorted(classes):
        for j in range(per_class):
            path = root / name / f"{name}_{j:04d}.jpg"
            color = _color(rng)
            write_image(path, color)
            items.append(Item(str(path), name, color))
        (root / name / f"._{name}_0000.jpg").write_bytes(APPLEDOUBLE)
        (root / name / "notes.txt").write_text("not an image\n")
    return items


def make_cub(root: str | os.PathLike, num_classes: int = 6, per_class: int = 3, seed: int = 0) -> Written:
    """``<root>/CUB_200_2011/images/<NNN.Name>/*`` with JPEGs (RGB and grayscale) and PNGs
    (RGBA and palette), and ``._`` AppleDouble files; train = first num_classes // 2 classes.
    Class folders are created in reverse order so that only sorting gives ImageFolder order."""
    rng = np.random.default_rng(seed)
    images = Path(root) / "CUB_200_2011" / "images"
    modes = [("RGB", "jpg"), ("L", "jpg"), ("RGBA", "png"), ("P", "png")]
    by_class: dict[int, list[Item]] = {}
    junk = []
    for c in reversed(range(num_classes)):
        name = f"{c + 1:03d}.Bird_{chr(ord('A') + c % 26)}"
        by_class[c] = []
        for j in range(per_class):
            mode, ext = modes[(c * per_class + j) % len(modes)]
            path = images / name / f"Bird_{c:03d}_{j:04d}.{ext}"
            color = _color(rng, gray=mode == "L")
            write_image(path, color, mode)
            by_class[c].append(Item(str(path), name, color))
        apple = images / name / f"._Bird_{c:03d}_0000.jpg"
        apple.write_bytes(APPLEDOUBLE)
        junk.append(str(apple))
    half = num_classes // 2
    train = [item for c in range(half) for item in by_class[c]]
    test = [item for c in range(half, num_classes) for item in by_class[c]]
    return Written(Path(root), train, test, junk=junk)


def make_cars(root: str | os.PathLike, num_classes: int = 6, per_class: int = 3, seed: int = 0) -> Written:
    """``<root>/cars196/cars_annos.mat`` (written with scipy.io.savemat, the real struct array
    layout) and ``car_ims/NNNNNN.jpg``; annotations in a shuffled class order, 1-based
    classes, train = classes 1..num_classes // 2."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder = Path(root) / "cars196"
    classes = rng.permutation(np.repeat(np.arange(1, num_classes + 1), per_class))
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annotations = np.zeros((1, len(classes)), dtype=[(f, "O") for f in fields])
    items = []
    for n, cls in enumerate(classes):
        relative = f"car_ims/{n + 1:06d}.jpg"
        color = _color(rng)
        write_image(folder / relative, color)
        items.append(Item(str(folder / relative), str(int(cls)), color))
        annotations[0, n] = (
            np.array([relative]),
            *(np.array([[v]], dtype=np.uint8) for v in (1, 2, SIZE[0] - 1, SIZE[1] - 1)),
            np.array([[cls]], dtype=np.uint8),
            np.array([[n % 2]], dtype=np.uint8),  # the classification split, unused here
        )
    class_names = np.array([f"car {c}" for c in range(num_classes)], dtype=object)
    savemat(folder / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    half = num_classes // 2
    train = [item for item in items if int(item.key) <= half]
    test = [item for item in items if int(item.key) > half]
    return Written(Path(root), train, test)


def make_sop(
    root: str | os.PathLike, train_classes: int = 4, test_classes: int = 3, per_class: int = 2, seed: int = 0
) -> Written:
    """``<root>/Stanford_Online_Products/Ebay_{train,test}.txt`` and ``<super>_final/*.JPG``;
    test class ids follow the training ones, as in SOP."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "Stanford_Online_Products"
    supers = ["bicycle", "chair", "kettle"]
    written: dict[str, list[Item]] = {}
    image_id = 0
    splits = {"train": range(1, train_classes + 1), "test": range(train_classes + 1, train_classes + test_classes + 1)}
    for split, ids in splits.items():
        lines = ["image_id class_id super_class_id path"]
        written[split] = []
        for class_id in ids:
            super_id = class_id % len(supers)
            for j in range(per_class):
                image_id += 1
                relative = f"{supers[super_id]}_final/{1000 + class_id}_{j}.JPG"
                color = _color(rng)
                write_image(folder / relative, color)
                written[split].append(Item(str(folder / relative), str(class_id), color))
                lines.append(f"{image_id} {class_id} {super_id + 1} {relative}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return Written(Path(root), written["train"], written["test"])


def make_inshop(
    root: str | os.PathLike,
    train_items: int = 3,
    test_items: int = 3,
    per_item: int = 2,
    gallery_only_items: int = 1,
    under_img: bool = True,
    seed: int = 0,
) -> Written:
    """``<root>/Inshop_Clothes/Eval/list_eval_partition.txt`` (count line, header, rows with
    padded columns as in the release) and images under ``Inshop_Clothes/Img/img/...``
    (``under_img=False``: ``Inshop_Clothes/img/...``). Each test item has ``per_item`` query
    and ``per_item`` gallery images, and ``gallery_only_items`` more items appear only in the
    gallery (so query and gallery labels agree only when encoded together). Item ids are
    shuffled so the listing is not in id order."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "Inshop_Clothes"
    base = folder / "Img" if under_img else folder
    rows: list[tuple[str, str, str]] = []
    written: dict[str, list[Item]] = {"train": [], "query": [], "gallery": []}
    ids = rng.permutation(np.arange(1, train_items + test_items + gallery_only_items + 1) * 7)
    for n, number in enumerate(ids):
        item_id = f"id_{number:08d}"
        if n < train_items:
            statuses = ["train"] * per_item
        elif n < train_items + test_items:
            statuses = ["query", "gallery"] * per_item
        else:
            statuses = ["gallery"] * per_item
        for j, status in enumerate(statuses):
            name = f"img/WOMEN/Dresses/{item_id}/{j:02d}_{j % 4 + 1}_front.jpg"
            color = _color(rng)
            write_image(base / name, color)
            rows.append((name, item_id, status))
            written[status].append(Item(str(base / name), item_id, color))
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    lines += [f"{name:<60}{item:<24}{status}" for name, item, status in rows]
    (folder / "Eval").mkdir(parents=True, exist_ok=True)
    (folder / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return Written(Path(root), written["train"], written["query"], written["gallery"])


def make_inat(
    root: str | os.PathLike, train_classes: int = 3, test_classes: int = 2, per_class: int = 2, seed: int = 0
) -> Written:
    """``<root>/iNaturalist/Inat_dataset_splits/Inaturalist_{train,test}_set1.txt`` and images
    at ``train_val2018/<Kingdom>/<class id>/<hash>.jpg``. Class ids are numbers whose text
    order differs from their numeric order (95 < 1203 < 7477). No train2018.json is written:
    the loader must not need it."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "iNaturalist"
    class_ids = [95, 7477, 1203, 40, 512, 8000, 3, 66][: train_classes + test_classes]
    assert len(class_ids) == train_classes + test_classes, "at most 8 classes"
    kingdoms = ["Plantae", "Animalia"]
    written: dict[str, list[Item]] = {"train": [], "test": []}
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for n, class_id in enumerate(class_ids):
        split = "train" if n < train_classes else "test"
        for j in range(per_class):
            relative = f"train_val2018/{kingdoms[n % 2]}/{class_id}/{rng.bytes(8).hex()}.jpg"
            color = _color(rng)
            write_image(folder / relative, color)
            written[split].append(Item(str(folder / relative), str(class_id), color))
            lines[split].append(relative)
    (folder / "Inat_dataset_splits").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        listing = folder / "Inat_dataset_splits" / f"Inaturalist_{split}_set1.txt"
        listing.write_text("\n".join(lines[split]) + "\n")
    return Written(Path(root), written["train"], written["test"])


def make_bad_images(folder: str | os.PathLike) -> dict[str, Path]:
    """Undecodable files with a .jpg name: ``truncated`` (a real JPEG cut in half),
    ``empty`` (0 bytes) and ``text`` (a text file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.jpg"
    rng = np.random.default_rng(0)
    # Noise, not a solid colour, so the JPEG has enough entropy data to cut in half.
    Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(good, quality=95)
    data = good.read_bytes()
    good.unlink()
    paths = {"truncated": folder / "truncated.jpg", "empty": folder / "empty.jpg", "text": folder / "text.jpg"}
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("this is not a JPEG\n")
    return paths


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar holding ``(name, data)`` members in this order (the webdataset layout)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path
