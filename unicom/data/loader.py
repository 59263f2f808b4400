"""A DataLoader over this process's contiguous shard of a dataset, for embedding it once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data import default_collate

from .._distributed import shard_range

__all__ = ["collate", "sharded_loader"]


def collate(batch: Sequence[tuple[Any, int, int, bool]]) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch :class:`ImageDataset` items: (images, labels (B,), indices (B,), ok (B,) bool).

    Image tensors are stacked to (B, C, H, W); other transform outputs (tuples of crops,
    dicts) go through PyTorch's default collate.
    """
    images, labels, indices, ok = zip(*batch)
    if all(isinstance(x, torch.Tensor) for x in images):
        shapes = {tuple(x.shape) for x in images}
        if len(shapes) > 1:
            raise ValueError(
                f"images of one batch differ in shape {sorted(shapes)[:3]}...; give a transform "
                "that resizes every image to one size (or use batch_size=1)"
            )
        stacked = torch.stack(images)
    else:
        stacked = default_collate(list(images))
    return (
        stacked,
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(indices, dtype=torch.long),
        torch.tensor(ok, dtype=torch.bool),
    )


def sharded_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of the block :func:`unicom._distributed.shard_range` gives this rank, in order.

    No shuffling, padding or dropped last batch: across ranks every item is loaded exactly
    once, and shards may differ in size by one. Items keep their index in ``dataset`` (the
    third element of each :class:`ImageDataset` item), so gathered results can be put back
    in dataset order. ``rank`` and ``world_size`` default to the current process group's.
    """
    indices = shard_range(len(dataset), rank, world_size)
    return DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=False,
    )
