"""What ``unicom embed SOURCE...`` reads: folders, webdataset ``.tar`` files, brace/glob patterns,
text files listing paths, single images; and a dataset that opens every kind of item.

Every item has a stable path string (absolute; a tar member is ``/abs/shard.tar/member.jpg``),
its size and mtime, read once while listing, so every process of a run lists the same items
in the same order.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from ..data.folder import scan_files
from ..data.image import ImageDataset, open_image_file
from .._pretrain.webdataset import expand_shard_pattern

__all__ = ["Item", "SourceDataset", "file_info", "list_sources", "read_item_bytes"]

_HASH_CHUNK = 1 << 20


def image_extensions() -> frozenset[str]:
    """Every extension Pillow opens here (``.jpg``, ``.png``, ``.webp``, ``.tif``, ...)."""
    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())


@dataclass(frozen=True)
class Item:
    """One image to embed: its path string, size in bytes, mtime (seconds), and where a tar
    member's bytes start (``offset`` -1 for a plain file)."""

    path: str
    size: int
    mtime: float
    tar: str | None = None
    offset: int = -1


class Listing:
    """Items found, and what was left out, counted by reason."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.left_out: Counter = Counter()
        self._seen: set[tuple[int, int]] = set()

    def accept(self, name: str) -> bool:
        ext = os.path.splitext(name)[1].lower()
        if name.startswith("._"):  # macOS AppleDouble files next to every image of an archive made on a Mac
            self.left_out["macOS metadata file (._name)"] += 1
            return False
        if ext in image_extensions():
            return True
        self.left_out[f"not an image file ({ext or 'no extension'})"] += 1
        return False

    def add_file(self, path: str) -> None:
        try:
            info = os.stat(path)
        except OSError as error:
            self.left_out[f"cannot read ({error.strerror})"] += 1
            return
        self.items.append(Item(os.path.abspath(path), info.st_size, info.st_mtime))


def _add_folder(listing: Listing, folder: str) -> None:
    for path in scan_files(folder, listing.accept, seen=listing._seen, left_out=listing.left_out):
        listing.add_file(path)


def _add_tar(listing: Listing, path: str) -> None:
    try:
        archive = tarfile.open(path, "r:")  # offsets into the file need an uncompressed tar
    except tarfile.ReadError as error:
        raise ValueError(f"{path}: expected an uncompressed webdataset .tar ({error})") from None
    with archive:
        members = [m for m in archive.getmembers() if m.isfile()]
    root = os.path.abspath(path)
    for member in sorted(members, key=lambda m: m.name):
        if listing.accept(os.path.basename(member.name)):
            listing.items.append(Item(f"{root}/{member.name}", member.size, float(member.mtime), root,
                                      member.offset_data))


def _add_list_file(listing: Listing, path: str) -> None:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                _add_one(listing, os.path.join(base, line), from_list=True)


def _add_one(listing: Listing, source: str, from_list: bool = False) -> None:
    if os.path.isdir(source):
        _add_folder(listing, source)
    elif source.endswith(".tar") and os.path.isfile(source):
        _add_tar(listing, source)
    elif os.path.isfile(source) and (from_list or os.path.splitext(source)[1].lower() in image_extensions()):
        if listing.accept(os.path.basename(source)):
            listing.add_file(source)
    elif os.path.isfile(source):
        _add_list_file(listing, source)
    elif from_list:
        listing.left_out["listed but missing"] += 1
    else:
        raise FileNotFoundError(f"source {source!r} not found: expected a folder, a .tar file, an image, a "
                                "text file listing paths, or a brace/glob pattern")


def list_sources(sources: Sequence[str | os.PathLike]) -> Listing:
    """The items of ``sources`` in order (a path seen twice is kept once), and what was left out."""
    listing = Listing()
    for path in dict.fromkeys(expand_shard_pattern(list(sources))):  # in order, each once
        _add_one(listing, path)
    unique: dict[str, Item] = {}
    for item in listing.items:
        unique.setdefault(item.path, item)
    listing.items = list(unique.values())
    return listing


def read_item_bytes(item: Item) -> bytes:
    """The bytes of ``item`` (a regular file, or a member of an uncompressed tar)."""
    if item.tar is None:
        with open_image_file(item.path) as f:
            return f.read()
    with open_image_file(item.tar) as f:
        f.seek(item.offset)
        return f.read(item.size)


def file_info(item: Item) -> tuple[bytes, int, int]:
    """(SHA256 digest of the bytes, width, height); width and height -1 when the header is unreadable."""
    try:
        data = read_item_bytes(item)
    except OSError:
        return bytes(32), -1, -1
    digest = hashlib.sha256(data).digest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - any header Pillow cannot parse: decoding reports the reason
        return digest, -1, -1
    return digest, width, height


class SourceDataset(ImageDataset):
    """An :class:`ImageDataset` over items, tar members included (read at their offsets), so the
    project's input pipelines embed them like files."""

    def __init__(self, items: Sequence[Item], transform, placeholder_size: tuple[int, int] = (224, 224)) -> None:
        super().__init__([item.path for item in items], [0] * len(items), transform, skip_bad_images=True,
                         placeholder_size=placeholder_size)
        self.members = {i: item for i, item in enumerate(items) if item.tar is not None}

    def load_image(self, index: int) -> Image.Image:
        item = self.members.get(index)
        if item is None:
            return super().load_image(index)
        from ..data.image import BadImageError
        from ..transforms import to_rgb

        try:
            with Image.open(io.BytesIO(read_item_bytes(item))) as image:
                image.load()
                return to_rgb(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise BadImageError(item.path, f"{type(error).__name__}: {error}") from error
