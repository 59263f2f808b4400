"""Reading pretraining inputs: webdataset tar shards and folders of images with captions.

No dependency on the ``webdataset`` package: shards are read with the standard library's
:mod:`tarfile` in streaming mode (``r|*``), so a shard is read once, front to back, and may
be compressed. The webdataset convention is followed: the files of one sample sit next to
each other in the tar and share a key, the member name up to the first dot of its base name
(``shard/000123.jpg`` and ``shard/000123.txt`` are the image and caption of key
``shard/000123``).

A folder of images (with optional same-name ``.txt`` captions) is cut into *virtual shards*
of a fixed number of images in sorted path order, so it is processed, written and resumed
shard by shard exactly like tar input.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "IMAGE_EXTENSIONS",
    "RawSample",
    "Shard",
    "expand_braces",
    "expand_shard_pattern",
    "iter_shard_samples",
    "iter_tar_samples",
    "list_shards",
    "shard_identity",
]

logger = logging.getLogger(__name__)

# Image members of a webdataset sample, in order of preference when a sample has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass
class RawSample:
    """One sample before decoding: the key, the encoded image (if any) and the caption (if any).
    ``problem`` says why the sample cannot be used whatever its image (its key repeats an
    earlier sample's in the shard, or is not UTF-8): readers skip it and count it."""

    key: str
    image: bytes | None = None
    caption: str | None = None
    problem: str | None = None


@dataclass
class Shard:
    """A unit of work and of output: a tar file, or a slice of a folder's sorted images.

    Attributes:
        name: the name of the output files (``features_<name>.npy``), unique in a run.
        source: the tar path, or the folder for a virtual shard.
        files: for a virtual shard, ``(key, image path, caption path or None)`` per image.
    """

    name: str
    source: str
    files: list[tuple[str, str, str | None]] | None = field(default=None, repr=False)

    def describe(self) -> str:
        return self.source if self.files is None else f"{self.source} [{self.name}, {len(self.files)} images]"


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` ranges and ``{a,b,c}`` alternatives, as webdataset patterns use them.

    A range keeps the zero padding of its bounds (``{08..10}`` gives ``08 09 10``). Groups are
    expanded left to right; nested braces are not supported.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        width = max(len(lo), len(hi)) if (lo.lstrip("-").startswith("0") or hi.lstrip("-").startswith("0")) else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def expand_shard_pattern(patterns: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Tar paths from paths, brace patterns (``shard-{000..009}.tar``) and globs (``*.tar``).

    Order is kept as given; a glob contributes its matches in sorted order. A pattern that
    matches nothing is an error (a typo should not silently drop data).
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths: list[str] = []
    for pattern in patterns:
        for path in expand_braces(os.fspath(pattern)):
            if glob.has_magic(path):
                found = sorted(glob.glob(path))
                if not found:
                    raise FileNotFoundError(f"no file matches {path!r}")
                paths.extend(found)
            else:
                paths.append(path)
    return paths


def _split_key(member_name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``); the extension is lower-cased."""
    folder, base = os.path.split(member_name)
    stem, dot, ext = base.partition(".")
    key = os.path.join(folder, stem) if folder else stem
    return key, ext.lower() if dot else ""


def _finish(key: str, members: dict[str, bytes]) -> RawSample:
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    caption = members.get(CAPTION_EXTENSION)
    text = caption.decode("utf-8", errors="replace").strip() if caption is not None else None
    return RawSample(key, image, text or None)


class _CheckedTarInfo(tarfile.TarInfo):
    """Notes why a tar's stream of members ended. After the first member, :mod:`tarfile` takes
    a damaged header (bad checksum), a cut one, or the file's end without the end-of-archive
    blocks for the end of the archive: the members after it would vanish without a word."""

    @classmethod
    def fromtarfile(cls, tar):  # noqa: D102
        try:
            return super().fromtarfile(tar)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError, tarfile.EmptyHeaderError) as e:
            if tar.offset:
                reason = "the file ends without the end-of-archive blocks (cut short?)" \
                    if isinstance(e, tarfile.EmptyHeaderError) else str(e)
                tar.unicom_damage = f"damaged tar at byte {tar.offset}: {reason}"
            raise


def _utf8(key: str) -> bool:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # tarfile keeps undecodable name bytes as surrogates
        return False
    return True


def _checked(samples: Iterator[RawSample]) -> Iterator[RawSample]:
    """Samples whose key repeats an earlier one's in the shard, or is not UTF-8, get a
    ``problem``: pseudo labels are looked up by key, so each key must name one sample."""
    seen: set[str] = set()
    for sample in samples:
        if not _utf8(sample.key):
            sample.problem = "key is not valid UTF-8"
        elif sample.key in seen:
            sample.problem = "key repeats an earlier sample's in the shard"
        seen.add(sample.key)
        yield sample


def iter_tar_samples(path: str | os.PathLike) -> Iterator[RawSample]:
    """Stream the samples of one webdataset tar shard, in the order they are stored.

    Members are grouped by key while consecutive (the webdataset rule); members whose
    extension is neither an image nor ``txt`` (``json``, ``cls``, ...) are ignored. A sample
    with no image member is still yielded (``image=None``) so the caller can count it.
    A damaged tar raises :class:`tarfile.ReadError` (or ``EOFError``) where the damage is
    found, after the samples read before it; the sample whose members were being read then
    is dropped (it may lack some).
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(os.fspath(path), mode="r|*", tarinfo=_CheckedTarInfo) as tar:
        for info in tar:
            if not info.isfile():
                continue
            if os.path.basename(info.name).startswith("._"):  # macOS metadata, not a sample
                continue
            member_key, ext = _split_key(info.name)
            if member_key != key:
                if key is not None:
                    yield _finish(key, members)
                key, members = member_key, {}
            if ext in IMAGE_EXTENSIONS or ext == CAPTION_EXTENSION:
                handle = tar.extractfile(info)
                members[ext] = handle.read() if handle is not None else b""
        damage = getattr(tar, "unicom_damage", None)
    if damage is not None:
        raise tarfile.ReadError(damage)
    if key is not None:
        yield _finish(key, members)


def _iter_folder_samples(shard: Shard) -> Iterator[RawSample]:
    for key, image_path, caption_path in shard.files or ():
        try:
            image = Path(image_path).read_bytes()
        except OSError as e:
            logger.warning("cannot read %s: %s", image_path, e)
            image = None
        caption = None
        if caption_path is not None:
            caption = Path(caption_path).read_text(encoding="utf-8", errors="replace").strip() or None
        yield RawSample(key, image, caption)


def iter_shard_samples(shard: Shard) -> Iterator[RawSample]:
    """The samples of a shard, tar or virtual, in a fixed order; a sample whose key repeats an
    earlier one's in the shard, or is not UTF-8, has a ``problem`` (see :class:`RawSample`)."""
    return _checked(iter_tar_samples(shard.source) if shard.files is None else _iter_folder_samples(shard))


_HEAD_BYTES = 1 << 16


def shard_identity(shard: Shard) -> dict:
    """What tells one input shard from another of the same name, cheaply: a tar's size and the
    SHA-1 of its first 64 KiB; a virtual shard's number of images and the SHA-1 of their keys."""
    if shard.files is not None:
        keys = "\n".join(key for key, _, _ in shard.files).encode("utf-8", "surrogateescape")
        return {"images": len(shard.files), "keys_sha1": hashlib.sha1(keys).hexdigest()}
    with open(shard.source, "rb") as f:
        head = f.read(_HEAD_BYTES)
    return {"bytes": os.path.getsize(shard.source), "head_sha1": hashlib.sha1(head).hexdigest()}


def _shard_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in _TAR_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def _folder_shards(root: Path, shard_size: int) -> list[Shard]:
    """Virtual shards of ``shard_size`` images of ``root`` (recursive, sorted relative paths)."""
    if shard_size < 1:
        raise ValueError(f"folder shard size must be positive, got {shard_size}")
    entries: list[tuple[str, str, str | None]] = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        names = set(files)
        for name in files:
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext[1:].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(folder, name)
            key = Path(os.path.relpath(path, root)).with_suffix("").as_posix()
            caption = stem + ".txt"
            entries.append((key, path, os.path.join(folder, caption) if caption in names else None))
    entries.sort(key=lambda e: (e[0], e[1]))
    if not entries:
        raise FileNotFoundError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return [
        Shard(f"{root.name or 'folder'}-{i:05d}", str(root), list(chunk))
        for i, chunk in enumerate(_batched(entries, shard_size))
    ]


def _batched(items: list, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def list_shards(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    folder_shard_size: int = 10_000,
) -> list[Shard]:
    """The shards of ``inputs``, in processing (and output) order.

    ``inputs`` is either one folder of images (cut into virtual shards of
    ``folder_shard_size`` images) or tar shards given as paths, brace patterns or globs.
    Shard names must be unique: two tars with one base name in different folders are refused
    rather than written over each other.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if len(items) == 1 and Path(items[0]).is_dir():
        return _folder_shards(Path(items[0]), folder_shard_size)
    paths = expand_shard_pattern(items)
    folders = [p for p in paths if os.path.isdir(p)]
    if folders:
        raise ValueError(f"{folders[0]} is a folder: give one folder of images alone, or tar shards")
    if not paths:
        raise ValueError("no input shard given")
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} input shard(s) not found, e.g. {missing[0]}")
    shards = [Shard(_shard_name(p), p) for p in paths]
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.name in seen:
            raise ValueError(f"two input shards share the name {shard.name!r}: {seen[shard.name]} and {shard.source}")
        seen[shard.name] = shard.source
    return shards
