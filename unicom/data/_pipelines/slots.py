"""Reusable shared-memory slots between DataLoader workers and the main process.

A DataLoader worker returns each batch in a fresh shared-memory segment: the kernel zero-fills
every page of it, the worker and the main process each fault it in, and a pinned copy is made
before the transfer to the GPU. For a batch of decoded images that costs more than decoding
them. A :class:`SlotPool` allocates a ring of segments once (pinned for CUDA where the driver
allows); the worker of batch ``seq`` writes into slot ``seq % num_slots`` and returns only a
small :class:`SlotRef`; the main process copies the slot to the device and lets it go.

Safety rests on two facts: a DataLoader has at most ``num_workers * prefetch_factor`` batches
in flight and hands them out in order, so with more slots than that a slot is written again
only after the main process asked for the batch after the one that used it; and the copy out
of a slot finishes (host-synchronised) before :meth:`SlotPool.fetch` returns. Batches must be
fetched in order, each before asking for the next; a slot overwritten too early is detected
(each slot records the batch that last wrote it) and raises.

Making a pool costs time in the main process (allocating the shared memory and page-locking
it), so a finished loader gives its pool back (:func:`release`, once its workers are gone)
and the next loader with the same needs takes it (:func:`acquire`): query then gallery, train
then val, or pass after pass pay it once.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from dataclasses import dataclass

import torch

__all__ = ["SlotPool", "SlotRef", "acquire", "clear", "release"]

_POOLS: dict[int, SlotPool] = {}  # pool id -> pool, in this process (workers inherit or re-register)
_IDLE: list[SlotPool] = []  # pools of finished loaders, kept for the next (oldest first)
MAX_IDLE = 1  # one loader at a time is the common case (query, then gallery; train, then val)
_ids = itertools.count()
_lock = threading.RLock()  # re-entrant: a loader's finaliser (release) may run in a garbage collection under it


@dataclass(frozen=True)
class SlotRef:
    """Where a batch's bytes wait: ``nbytes`` at the start of slot ``slot`` of pool ``pool_id``."""

    pool_id: int
    slot: int
    seq: int
    nbytes: int

    def pin_memory(self) -> SlotRef:  # the DataLoader's pinning thread: the slot is pinned already
        return self


class SlotPool:
    """``num_slots`` shared uint8 buffers of ``slot_bytes`` each, optionally pinned for CUDA."""

    def __init__(self, num_slots: int, slot_bytes: int, pin: bool = False) -> None:
        if num_slots < 1 or slot_bytes < 1:
            raise ValueError(f"a slot pool needs slots and bytes, got {num_slots} x {slot_bytes}")
        self.slot_bytes = int(slot_bytes)
        # Fresh shared memory, untouched: pages are faulted in where first written (a worker), once.
        self.buffers = [torch.empty(0, dtype=torch.uint8).new(torch.UntypedStorage._new_shared(self.slot_bytes))
                        for _ in range(num_slots)]
        self.owner = torch.full((num_slots,), -1, dtype=torch.int64).share_memory_()
        self.creator = os.getpid()
        with _lock:
            self.id = _new_id()
            _POOLS[self.id] = self
        self.pinned = pin and self._pin()

    def __len__(self) -> int:
        return len(self.buffers)

    def _pin(self) -> bool:
        """Page-lock the buffers (cudaHostRegister) so copies to the GPU need no staging."""
        cudart = torch.cuda.cudart()
        registered = []
        for buffer in self.buffers:
            if int(cudart.cudaHostRegister(buffer.data_ptr(), self.slot_bytes, 0)) != 0:
                for ptr in registered:
                    cudart.cudaHostUnregister(ptr)
                return False
            registered.append(buffer.data_ptr())
        weakref.finalize(self, _unregister, os.getpid(), registered)
        return True

    def __getstate__(self) -> dict:  # spawned workers: the buffers travel as shared memory
        return {"slot_bytes": self.slot_bytes, "buffers": self.buffers, "owner": self.owner, "id": self.id,
                "creator": self.creator}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, pinned=False)
        with _lock:
            _POOLS.setdefault(self.id, self)

    # ------------------------------------------------------------------ worker side

    def slot_for(self, seq: int, nbytes: int) -> tuple[int, torch.Tensor] | None:
        """(slot, its first ``nbytes``) to write batch ``seq`` into, or None if it does not fit."""
        if nbytes > self.slot_bytes:
            return None
        slot = seq % len(self.buffers)
        self.owner[slot] = seq
        return slot, self.buffers[slot][:nbytes]

    def ref(self, slot: int, seq: int, nbytes: int) -> SlotRef:
        return SlotRef(self.id, slot, seq, nbytes)

    # ------------------------------------------------------------------ main side

    def fetch(self, ref: SlotRef, device: torch.device) -> torch.Tensor:
        """The slot's bytes, (nbytes,) uint8 on ``device``; the slot may be rewritten once this returns."""
        source = self.buffers[ref.slot][: ref.nbytes]
        if device.type == "cuda":
            stream = _copy_stream(device)
            with torch.cuda.stream(stream):
                out = source.to(device, non_blocking=True)
            stream.synchronize()  # only the copy: work queued on the compute stream goes on
            out.record_stream(torch.cuda.current_stream(device))
        else:
            out = source.clone()
        if int(self.owner[ref.slot]) != ref.seq:
            raise RuntimeError(f"batch {ref.seq} was overwritten by batch {int(self.owner[ref.slot])} before it "
                               "was used: fetch the loader's batches in order, each before asking for the next")
        return out


def pool_of(ref: SlotRef) -> SlotPool:
    try:
        return _POOLS[ref.pool_id]
    except KeyError:
        raise RuntimeError("this batch's slot pool is gone (its DataLoader was deleted)") from None


def _new_id() -> int:
    """A new pool id, unique in this process tree (the creating pid in its high bits)."""
    return next(_ids) + (os.getpid() << 20)


def acquire(num_slots: int, slot_bytes: int, pin: bool = False) -> SlotPool:
    """A pool of at least ``num_slots`` slots of ``slot_bytes``: an idle one given back by a
    finished loader when one fits (no new shared memory to allocate, fault in and pin), else a
    new one. A reused pool gets a new id, so batches of the loader that had it can no longer
    be fetched (:func:`pool_of` raises)."""
    with _lock:
        fits = [p for p in _IDLE if len(p) >= num_slots and p.slot_bytes >= slot_bytes and p.pinned >= pin]
        if fits:
            pool = min(fits, key=lambda p: len(p) * p.slot_bytes)
            if pool in _IDLE:  # a release run by a collection just now may have dropped it: it is ours anyway
                _IDLE.remove(pool)
            pool.owner.fill_(-1)
            pool.id = _new_id()
            _POOLS[pool.id] = pool
            return pool
    return SlotPool(num_slots, slot_bytes, pin)


def release(pool_id: int) -> None:
    """A loader is done with its pool (its workers are gone): keep it for the next loader
    (at most ``MAX_IDLE`` pools are kept; :func:`clear` frees them)."""
    with _lock:
        pool = _POOLS.pop(pool_id, None)
        if pool is None or pool.creator != os.getpid():
            return
        _IDLE.append(pool)
        while len(_IDLE) > MAX_IDLE:
            _IDLE.pop(0)  # freed once unreferenced


def clear() -> None:
    """Free the idle pools kept for reuse (their shared, and on CUDA pinned, memory)."""
    with _lock:
        _IDLE.clear()


def _unregister(pid: int, pointers: list[int]) -> None:
    if os.getpid() != pid:  # a forked worker's copy: the registration belongs to the parent
        return
    cudart = torch.cuda.cudart()
    for ptr in pointers:
        cudart.cudaHostUnregister(ptr)


_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]
