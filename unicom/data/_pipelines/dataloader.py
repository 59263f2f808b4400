"""DataLoaders that run a pipeline: its workers load batches, reusing shared-memory slots."""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..._distributed import shard_range
from ..image import ImageDataset
from ..loader import sharded_loader
from . import batches, slots
from .base import InputPipeline
from .registry import pipeline_for_transform, resolve_decode

__all__ = ["LOADER_BATCH", "embedding_loader", "pipeline_loader"]

logger = logging.getLogger(__name__)

LOADER_BATCH = 64  # images per worker batch: small batches keep every worker busy to the end


class _Shard(Dataset):
    """This rank's shard of a dataset, a batch at a time: the DataLoader hands a worker the
    positions of one whole batch (``__getitems__``), and batch ``seq`` (positions
    ``seq * batch_size`` onwards, in order) is written into the pool's slot for ``seq``."""

    def __init__(self, base: ImageDataset, pipeline: InputPipeline, indices: Sequence[int], batch_size: int,
                 pool: slots.SlotPool | None, normalize: bool) -> None:
        self.base, self.pipeline, self.indices = base, pipeline, indices
        self.batch_size, self.pool, self.normalize = batch_size, pool, normalize

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, positions: list[int]):
        seq, rest = divmod(positions[0], self.batch_size)
        if rest or positions != list(range(positions[0], positions[0] + len(positions))):
            raise RuntimeError("a pipeline loader's batches are consecutive positions, in order")
        allocate = functools.partial(batches.allocate, pool=self.pool, seq=seq)
        return self.pipeline.load_batch(self.base, [self.indices[p] for p in positions], allocate, self.normalize)


def _whole(batch):
    return batch


class _Loader(DataLoader):
    """Batches as (images, labels, indices, ok), the last three tensors again (the workers send
    them as NumPy arrays: as_tensor makes no copies)."""

    def __iter__(self):
        for images, labels, indices, ok in super().__iter__():
            yield images, torch.as_tensor(labels), torch.as_tensor(indices), torch.as_tensor(ok)


def pipeline_loader(dataset: ImageDataset, pipeline: InputPipeline, batch_size: int, num_workers: int,
                    device: torch.device | str = "cpu", rank: int | None = None, world_size: int | None = None,
                    persistent_workers: bool = False, prefetch_factor: int = 4,
                    normalize_in_workers: bool | None = None, use_slots: bool | None = None) -> DataLoader:
    """A DataLoader over this rank's contiguous shard of ``dataset``, loaded as ``pipeline`` says.

    Like :func:`unicom.data.loader.sharded_loader` (same shards, order and item indices), with
    pinned host memory for CUDA devices and a deeper prefetch queue. Give ``pipeline.to_device``
    to :func:`unicom.evaluate.embed_loader` as ``preprocess``. ``normalize_in_workers`` (default:
    for CPU devices) normalises the uint8 crops of ``exact`` in the workers.

    ``use_slots`` (default: with worker processes, unless the workers normalise): the workers
    write pixels into a ring of reused shared-memory slots (:mod:`.slots`) of
    ``pipeline.slot_bytes`` each instead of fresh memory per batch (crops:
    ``batch_size * 3 * n_px**2``; whole images: at most ``UNICOM_SLOT_POOL_MB`` MiB in all,
    default 2048, 0 turns them off); a batch that does not fit travels the usual way. Batches
    must then be moved to the device (``pixels`` or ``to_device``) in order, each before the
    next is fetched, as ``embed_loader`` does.
    """
    device = torch.device(device)
    if normalize_in_workers is None:
        normalize_in_workers = device.type == "cpu"
    indices = shard_range(len(dataset), rank, world_size)
    pool = None
    if (num_workers > 0 if use_slots is None else use_slots) and not normalize_in_workers:
        # Two batches ahead per worker keep it busy; every batch in flight needs a slot of its own.
        slot_prefetch = min(prefetch_factor, 2)
        num_slots = (num_workers * slot_prefetch if num_workers > 0 else 1) + 2
        slot_bytes = pipeline.slot_bytes(dataset, batch_size, num_slots)
        if slot_bytes > 0:
            prefetch_factor = slot_prefetch
            pool = slots.acquire(num_slots, slot_bytes, pin=device.type == "cuda")
    shard = _Shard(dataset, pipeline, indices, batch_size, pool, normalize_in_workers)
    if pool is not None:
        weakref.finalize(shard, slots.release, pool.id)  # loaders and their iterators hold the shard
    workers = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers} if num_workers > 0 else {}
    return _Loader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_whole,
                   pin_memory=device.type == "cuda", drop_last=False, **workers)


def embedding_loader(dataset: ImageDataset, decode: str, batch_size: int, num_workers: int,
                     device: torch.device | str = "cpu", rank: int | None = None, world_size: int | None = None,
                     loader_batch_size: int | None = None) -> tuple[DataLoader, Callable | None]:
    """(loader, preprocess) to embed ``dataset`` with :func:`unicom.evaluate.embed_loader`.

    When the dataset's transform is the published eval or test transform, the ``decode``
    pipeline replaces it (same pixels for ``auto``, ``exact`` and ``device-resize``); any other
    transform is kept as it is (``sharded_loader``, preprocess None). The loader's batches hold
    ``loader_batch_size`` images (default: ``batch_size`` or 64, whichever is smaller): give
    ``batch_size`` to ``embed_loader``, which runs the model on batches of that size. With
    one large batch per worker, a pass over a dataset of a few dozen batches ends with most
    workers idle, and every worker holds many batches of decoded images in memory.
    """
    device = torch.device(device)
    decode = resolve_decode(decode, device)
    loader_batch_size = loader_batch_size or min(batch_size, LOADER_BATCH)
    pipeline = pipeline_for_transform(dataset.transform, decode)
    if pipeline is None:
        if decode != "exact":
            logger.warning("decode=%s needs the eval transform; %r is used as it is", decode, dataset.transform)
        pin = device.type == "cuda"
        return sharded_loader(dataset, loader_batch_size, num_workers, rank, world_size, pin_memory=pin), None
    if pipeline.resizes_on_device and device.type == "cpu":
        logger.warning("decode=%s resizes on the device, which is the CPU here: several times slower than "
                       "decode=exact (what auto picks on CPUs)", decode)
    loader = pipeline_loader(dataset, pipeline, loader_batch_size, num_workers, device, rank, world_size)
    return loader, pipeline.to_device
