"""Step 3 input: (image, pseudo label) pairs, streamed, for cluster discrimination pretraining.

Pseudo labels come from the clustering step (:func:`unicom._pretrain.kmeans.save_clustering`):
``labels.npy`` holds one label per feature row, in the order of
:func:`unicom._pretrain.features.load_features`, and the features folder holds the matching
sample keys (``keys_<shard>.txt``, listed by its ``manifest.json``). :class:`PseudoLabels`
joins the two: the label of a sample is looked up by its key. A negative label leaves the
sample out (a way to drop samples after clustering); a sample whose key is not in the
clustering (an image that could not be decoded when the features were made) is skipped.

Lookups are per shard when the training shard has the same name as a features shard (tar
shards always do; a folder's virtual shards do when cut with the same ``folder_shard_size``
as the feature run, which the shards' recorded identities check): only that shard's keys and
labels are read, memory-mapped, so 400M labels never sit in memory at once. Otherwise one
dictionary of all keys is built, once per data loading process. A sample whose key repeats an
earlier one's in its shard is skipped (the feature run skipped it too), and a damaged tar is
read up to the damage, as the feature run read it.

:class:`PseudoLabelStream` is an :class:`~torch.utils.data.IterableDataset` over *units*
(tar shards, a folder's virtual shards, or index ranges of an in-memory dataset). Each
pass (``set_epoch(epoch, repeat)``) shuffles the units with ``(seed, epoch, repeat)``,
deals them to processes (``order[rank::world]``) and then to data loading workers
(``mine[worker::workers]``), reads each unit front to back as a stream and mixes samples
through a shuffle buffer. One pass yields every labelled, decodable sample exactly once
across all processes and workers. Data larger than a disk works: a unit is read as a
stream and never stored.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .. import _distributed as dist
from ..transforms import to_rgb
from .features import read_manifest
from .webdataset import Shard, iter_shard_samples, list_shards, shard_identity

__all__ = ["InMemoryReader", "PseudoLabelStream", "PseudoLabels", "ShardReader"]

logger = logging.getLogger(__name__)

_MAX_LOGGED = 20  # individual warnings per worker about skipped samples; later ones are only counted


class PseudoLabels:
    """Sample key -> pseudo label, from a clustering folder and the features folder it clustered.

    Args:
        labels_dir: output of ``cluster.py``: ``labels.npy`` (N,) int64 and ``stats.json``.
        features_dir: output of ``extract_features.py`` whose N rows were clustered; default:
            the ``features`` path recorded in ``stats.json``.

    Attributes:
        num_classes: K, the number of pseudo classes (``stats.json``'s ``k``; else the
            largest label + 1).
        num_samples: N, the number of clustered samples.
    """

    def __init__(self, labels_dir: str | os.PathLike, features_dir: str | os.PathLike | None = None) -> None:
        labels_dir = Path(labels_dir)
        path = labels_dir / "labels.npy"
        if not path.is_file():
            raise FileNotFoundError(f"no labels.npy in {labels_dir}: give the output folder of cluster.py")
        stats_path = labels_dir / "stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        if features_dir is None:
            if "features" not in stats:
                raise ValueError(f"{labels_dir}/stats.json does not name the features folder: pass features_dir")
            features_dir = stats["features"]
        self.labels_dir, self.features_dir = labels_dir, Path(features_dir)
        self.labels = np.load(path, mmap_mode="r")  # (N,) int64, read lazily
        manifest = read_manifest(self.features_dir)
        self.num_samples = int(self.labels.shape[0])
        if manifest["num_samples"] != self.num_samples:
            raise ValueError(f"{path} holds {self.num_samples} labels but {self.features_dir} holds "
                             f"{manifest['num_samples']} features: not the clustering of these features")
        # shard name -> (first row, number of rows), in load_features order; and what each was read from
        self.shards: dict[str, tuple[int, int]] = {}
        self.identities: dict[str, dict | None] = {}
        offset = 0
        for entry in manifest["shards"]:
            self.shards[entry["shard"]] = (offset, entry["num_samples"])
            self.identities[entry["shard"]] = entry.get("input_id")  # None: written before identities
            offset += entry["num_samples"]
        k = stats.get("k")
        self.num_classes = int(k) if k is not None else int(np.max(self.labels)) + 1 if self.num_samples else 0
        self._all: dict[str, int] | None = None

    def _keys(self, shard: str) -> list[str]:
        # split on "\n" only, as the features step writes them (keys may hold other separators)
        return (self.features_dir / f"keys_{shard}.txt").read_text(encoding="utf-8").split("\n")[:-1]

    def shard_labels(self, shard: str) -> dict[str, int] | None:
        """The labels of one features shard by key, or None if no features shard has this name."""
        if shard not in self.shards:
            return None
        start, count = self.shards[shard]
        keys = self._keys(shard)
        if len(keys) != count:
            raise RuntimeError(f"keys_{shard}.txt holds {len(keys)} keys, the manifest says {count}")
        table = dict(zip(keys, np.asarray(self.labels[start : start + count]).tolist()))
        if len(table) != count:
            repeated = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"keys_{shard}.txt names {repeated!r} more than once: labels are looked up by key "
                             "(extract the features again: samples with a repeated key are now skipped)")
        return table

    def all_labels(self) -> dict[str, int]:
        """Every key's label (built once, then cached): for inputs not cut into the features' shards."""
        if self._all is None:
            table: dict[str, int] = {}
            for shard in self.shards:
                part = self.shard_labels(shard)
                duplicated = table.keys() & part.keys()
                if duplicated:
                    raise ValueError(f"key {next(iter(duplicated))!r} occurs in more than one features shard: "
                                     "keys must be unique to look labels up by key")
                table.update(part)
            self._all = table
        return self._all

    def labels_for(self, unit_name: str, identity: dict | None = None) -> dict[str, int]:
        """The key -> label table to read the unit ``unit_name`` with: its own shard's, else all.

        ``identity`` (:func:`~unicom._pretrain.webdataset.shard_identity` of the unit, when known):
        a folder's virtual shard cut otherwise than in the feature run (another
        ``folder_shard_size``) shares a name with a features shard but not its images, so it
        reads with all keys; a tar with another identity than the one whose features were made
        is read with its own shard's keys after a warning (a re-packed copy of the same samples
        has another identity too)."""
        own = self.shard_labels(unit_name)
        recorded = self.identities.get(unit_name)
        if own is None or identity is None or recorded is None or recorded == identity:
            return own if own is not None else self.all_labels()
        if "keys_sha1" in identity:
            return self.all_labels()
        logger.warning("%s is not the input whose features were clustered as shard %s (%s, recorded %s): its "
                       "labels are looked up by key in that shard", unit_name, unit_name, identity, recorded)
        return own


# ----------------------------------------------------------------------------- readers


class _Unusable:
    """The payload of a sample a reader must skip, and why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class ShardReader:
    """Units are webdataset tar shards or a folder's virtual shards (see :func:`list_shards`).

    A payload is the encoded image (bytes); it is decoded only when it leaves the shuffle
    buffer, so the buffer holds compressed images.
    """

    def __init__(self, shards: Sequence[Shard], transform: Callable[[Image.Image], Any]) -> None:
        self.shards, self.transform = list(shards), transform

    @classmethod
    def from_inputs(cls, inputs: str | os.PathLike | Sequence[str | os.PathLike], transform: Callable,
                    folder_shard_size: int = 10_000) -> ShardReader:
        """Tar shards (paths, ``{000..099}`` patterns, globs) or one folder of images."""
        return cls(list_shards(inputs, folder_shard_size), transform)

    def __len__(self) -> int:
        return len(self.shards)

    def name(self, unit: int) -> str:
        return self.shards[unit].name

    def identity(self, unit: int) -> dict | None:
        """What the unit was read from (:func:`shard_identity`), to match it with the features shard."""
        try:
            return shard_identity(self.shards[unit])
        except OSError:
            return None  # reading the unit will say what is wrong

    def read(self, unit: int) -> Iterator[tuple[str, Any]]:
        """(key, payload) per sample; a damaged tar ends its unit after the samples read before the
        damage (as the feature run kept them), with a warning."""
        shard = self.shards[unit]
        try:
            for sample in iter_shard_samples(shard):
                # image None: no image member; a problem (a repeated key, say): decode reports either
                yield sample.key, sample.image if sample.problem is None else _Unusable(sample.problem)
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise  # a missing file is not damaged data
        except (OSError, EOFError, tarfile.TarError) as e:
            logger.warning("%s is damaged: read the samples before the damage (%s: %s)", shard.describe(),
                           type(e).__name__, e)

    def decode(self, payload: Any) -> Any:
        if isinstance(payload, _Unusable):
            raise ValueError(payload.reason)
        if payload is None:
            raise ValueError("the sample has no image")
        image = Image.open(io.BytesIO(payload))
        image.load()  # decode fully now so a truncated file fails here
        return self.transform(to_rgb(image))


class InMemoryReader:
    """Units are index ranges of a map-style :class:`~unicom.data.image.ImageDataset`.

    Keys are the dataset's ``paths`` (for in-memory images, their names, e.g. the digits'
    ``digits/train/0123``); the dataset's own labels are never read. The dataset applies its
    transform.
    """

    def __init__(self, dataset, unit_size: int = 64, name: str = "memory") -> None:
        self.dataset, self.unit_size, self.prefix = dataset, unit_size, name
        self.num_units = max(math.ceil(len(dataset) / unit_size), 1)

    def __len__(self) -> int:
        return self.num_units

    def name(self, unit: int) -> str:
        return f"{self.prefix}-{unit:05d}"

    def read(self, unit: int) -> Iterator[tuple[str, Any]]:
        for index in range(unit * self.unit_size, min((unit + 1) * self.unit_size, len(self.dataset))):
            yield self.dataset.paths[index], index

    def decode(self, payload: Any) -> Any:
        image, _, _, ok = self.dataset[payload]
        if not ok:
            raise ValueError(f"cannot decode {self.dataset.paths[payload]}")
        return image


# ----------------------------------------------------------------------------- the stream


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


class PseudoLabelStream(IterableDataset):
    """Yields ``(image, pseudo label)`` once per labelled, decodable sample per pass.

    Args:
        reader: a :class:`ShardReader` or :class:`InMemoryReader` (anything with ``len``,
            ``name(unit)``, ``read(unit) -> (key, payload)`` and ``decode(payload)``).
        labels: the key -> label source, usually :class:`PseudoLabels` (anything with
            ``labels_for(unit_name) -> Mapping[str, int]``).
        seed: with the pass's epoch and repeat, fixes the unit order and the shuffle buffer.
        shuffle_buffer: samples mixed at once per worker (1 or 0: no mixing within units).
        rank, world_size: this process's place (default: from :mod:`unicom._distributed`).
    """

    def __init__(self, reader, labels, seed: int = 0, shuffle_buffer: int = 1000,
                 rank: int | None = None, world_size: int | None = None) -> None:
        self.reader, self.labels, self.seed, self.shuffle_buffer = reader, labels, seed, shuffle_buffer
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.epoch, self.repeat = 0, 0

    def set_epoch(self, epoch: int, repeat: int = 0) -> None:
        """Choose the pass: call before creating the DataLoader iterator (workers copy it)."""
        self.epoch, self.repeat = epoch, repeat

    def units(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        """The units this process's ``worker`` reads in the current pass, in reading order."""
        order = _seed(self.seed, self.epoch, self.repeat).permutation(len(self.reader))
        mine = order[self.rank :: self.world_size]
        return [int(u) for u in mine[worker::num_workers]]

    def _samples(self, units: list[int], counts: dict[str, int]) -> Iterator[tuple[str, Any, int]]:
        for unit in units:
            identity = self.reader.identity(unit) if hasattr(self.reader, "identity") else None
            table = self.labels.labels_for(self.reader.name(unit), identity)
            for key, payload in self.reader.read(unit):
                label = table.get(key)
                if label is None:
                    counts["unlabelled"] += 1
                    if counts["unlabelled"] <= _MAX_LOGGED:
                        logger.warning("no pseudo label for %s (unit %s): skipped", key, self.reader.name(unit))
                    continue
                if label < 0:  # left out on purpose
                    counts["excluded"] += 1
                    continue
                yield key, payload, int(label)

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = _seed(self.seed, self.epoch, self.repeat, self.rank, worker, 1)
        counts = {"unlabelled": 0, "excluded": 0, "bad": 0}
        buffer: list[tuple[str, Any, int]] = []
        size = max(self.shuffle_buffer, 1)

        def emit(item: tuple[str, Any, int]):
            key, payload, label = item
            try:
                return self.reader.decode(payload), label
            except Exception as e:  # noqa: BLE001 - any decoding failure skips the sample, whatever raised it
                counts["bad"] += 1
                if counts["bad"] <= _MAX_LOGGED:
                    logger.warning("skipped %s: %s: %s", key, type(e).__name__, e)
                return None

        for item in self._samples(self.units(worker, workers), counts):
            if len(buffer) < size:
                buffer.append(item)
                continue
            # a full buffer: a uniformly chosen old sample leaves, the new one takes its place
            j = int(rng.integers(size))
            item, buffer[j] = buffer[j], item
            out = emit(item)
            if out is not None:
                yield out
        for j in rng.permutation(len(buffer)):
            out = emit(buffer[j])
            if out is not None:
                yield out
        if any(counts.values()):
            logger.warning("pass (epoch %d, repeat %d), rank %d worker %d: skipped %d unlabelled, %d excluded "
                           "and %d undecodable samples", self.epoch, self.repeat, self.rank, worker,
                           counts["unlabelled"], counts["excluded"], counts["bad"])
