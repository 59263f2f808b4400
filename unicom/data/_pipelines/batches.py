"""The two forms a batch takes between the DataLoader workers and the device.

A worker writes a batch's pixels into one flat uint8 buffer: the slot of a shared-memory
ring (:mod:`.slots`) when the loader has one and the batch fits, else fresh memory (shared,
in a worker process). The batch names the buffer (:data:`Payload`) and says how its bytes
are laid out; :func:`fetch` brings the bytes to the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Union

import numpy as np
import torch

from . import slots

__all__ = ["Allocate", "Crops", "Payload", "WholeImages", "allocate", "fetch"]

# Where a batch's bytes wait: a slot, or a tensor of their own (uint8, or float32 normalised by the workers).
Payload = Union[slots.SlotRef, torch.Tensor]
# nbytes -> (a flat uint8 tensor to write the batch into, the payload that names it)
Allocate = Callable[[int], tuple[torch.Tensor, Payload]]


def _shared_empty(numel: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An empty 1-D tensor, in shared memory when called in a DataLoader worker (sent without a copy)."""
    if torch.utils.data.get_worker_info() is not None:
        return torch.empty(0, dtype=dtype).new(torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel))
    return torch.empty(numel, dtype=dtype)


def allocate(nbytes: int, pool: slots.SlotPool | None = None, seq: int = 0) -> tuple[torch.Tensor, Payload]:
    """Room for a batch of ``nbytes``: ``pool``'s slot for batch ``seq`` when it fits, else fresh memory."""
    place = pool.slot_for(seq, nbytes) if pool is not None else None
    if place is None:
        flat = _shared_empty(nbytes)
        return flat, flat
    slot, view = place
    return view, pool.ref(slot, seq, nbytes)


def fetch(payload: Payload, device: torch.device) -> torch.Tensor:
    """The payload's tensor on ``device`` (a slot is copied out before it can be rewritten)."""
    if isinstance(payload, slots.SlotRef):
        return slots.pool_of(payload).fetch(payload, device)
    return payload.to(device, non_blocking=True)


def _pin(payload: Payload) -> Payload:
    return payload.pin_memory()  # a slot is pinned already (SlotRef.pin_memory returns it)


@dataclass
class Crops:
    """A batch of center crops, (B, 3, n, n): uint8 pixels, or float32 already normalised."""

    data: Payload
    shape: tuple[int, int, int, int]

    @property
    def in_slot(self) -> bool:
        return isinstance(self.data, slots.SlotRef)

    @property
    def normalized(self) -> bool:
        return isinstance(self.data, torch.Tensor) and self.data.is_floating_point()

    def pin_memory(self) -> Crops:  # called by the DataLoader's pinning thread
        return replace(self, data=_pin(self.data))

    def __len__(self) -> int:
        return self.shape[0]


@dataclass
class WholeImages:
    """Whole decoded images, (h, w, 3) uint8 back to back in one buffer, grouped for the device resize.

    sizes: (h, w) and offsets (bytes) of each image, in batch order. The images lie group by
    group, so a group whose images share one size is one (G, h, w, 3) block. groups:
    (positions in the batch, vertical_first, the group's stacked resampling tables as int64
    arrays: :func:`.resample.padded_tables`), built by the workers.
    """

    data: Payload
    sizes: list[tuple[int, int]]
    offsets: list[int]
    groups: list[tuple[list[int], bool, tuple[np.ndarray, ...]]]

    @property
    def in_slot(self) -> bool:
        return isinstance(self.data, slots.SlotRef)

    def pin_memory(self) -> WholeImages:
        return replace(self, data=_pin(self.data))

    def __len__(self) -> int:
        return len(self.sizes)
