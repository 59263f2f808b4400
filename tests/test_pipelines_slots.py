"""The shared-memory slot ring (``unicom.data._pipelines.slots``) and the pipelines' use of it:
worker processes write batches into reused slots, with the same pixels, order and indices
as batches in fresh memory."""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import synthetic_datasets as synth  # noqa: E402
from pipeline_files import CPU, files_fixture, loader_batches, photos_fixture, uint8_batch  # noqa: E402, F401

from unicom.data import ImageDataset  # noqa: E402
from unicom.data._pipelines import PIPELINES, make_pipeline, pipeline_loader, slots  # noqa: E402
from unicom.transforms import eval_transform  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class _TinySlots(PIPELINES["device-resize"]):
    """device-resize with slots too small for any batch of whole images."""

    def slot_bytes(self, dataset, batch_size: int, num_slots: int) -> int:
        return 16


@pytest.mark.parametrize("decode, batch_type", [("exact", "Crops"), ("device-resize", "WholeImages"),
                                                ("turbo", "WholeImages")])
def test_slots_deliver_the_same_batches(files, decode, batch_type):
    """Worker processes write into reused shared-memory slots: same pixels, order, indices."""
    kinds, pixels, ok, indices = loader_batches(files * 3, decode, use_slots=True)  # 12 batches > 6 slots
    assert kinds == {(batch_type, True)}
    reference_kinds, reference, _, _ = loader_batches(files * 3, decode, use_slots=False)
    assert reference_kinds == {(batch_type, False)}
    assert torch.equal(pixels, reference) and ok.all() and torch.equal(indices, torch.arange(len(files) * 3))


def test_slots_fall_back_for_batches_too_large(files):
    slots.clear()  # else an idle pool of an earlier loader, with room to spare, is taken
    kinds, pixels, _, _ = loader_batches(files, None, use_slots=True, pipeline=_TinySlots(48))
    assert kinds == {("WholeImages", False)}
    assert torch.equal(pixels, loader_batches(files, "device-resize", use_slots=False)[1])


def test_slots_with_bad_images_skipped(files, tmp_path):
    bad = str(synth.make_bad_images(tmp_path)["truncated"])
    paths = [files[0], bad, files[2], bad]
    for decode in ("exact", "device-resize", "turbo"):
        kinds, pixels, ok, _ = loader_batches(paths, decode, use_slots=True, skip_bad_images=True)
        assert kinds == {("Crops" if decode == "exact" else "WholeImages", True)}
        assert ok.tolist() == [True, False, True, False]
        assert torch.equal(pixels[ok], uint8_batch([files[0], files[2]]))


def test_slots_detect_batches_used_out_of_order(files):
    """Holding batches back lets workers reuse their slots: using one then raises, never wrong pixels."""
    dataset = ImageDataset(files, list(range(len(files))), eval_transform(48))
    pipeline = make_pipeline("exact", n_px=48)
    loader = pipeline_loader(dataset, pipeline, 1, 1, CPU, normalize_in_workers=False, use_slots=True,
                             prefetch_factor=1)  # 3 slots, 8 batches
    batches = list(loader)
    with pytest.raises(RuntimeError, match="overwritten"):
        for images, _, _, ok in batches:
            pipeline.pixels(images, CPU)


def test_slot_pool_basics():
    pool = slots.SlotPool(2, 8)
    assert pool.slot_for(0, 9) is None  # too large
    slot, view = pool.slot_for(3, 4)
    assert slot == 1
    view.copy_(torch.arange(4, dtype=torch.uint8))
    ref = pool.ref(slot, 3, 4)
    assert ref.pin_memory() is ref and slots.pool_of(ref) is pool
    out = pool.fetch(ref, CPU)
    view.zero_()
    assert out.tolist() == [0, 1, 2, 3]  # a copy: the slot may be rewritten at once
    pool.slot_for(5, 4)  # the next user of slot 1
    with pytest.raises(RuntimeError, match="batch 3 was overwritten by batch 5"):
        pool.fetch(ref, CPU)
    slots.release(pool.id)
    with pytest.raises(RuntimeError, match="pool is gone"):
        slots.pool_of(ref)
    with pytest.raises(ValueError):
        slots.SlotPool(0, 8)


def test_slot_pools_are_reused_by_the_next_loader(files):
    """A finished loader gives its pool back; the next one with the same needs takes it (no new
    shared memory), under a new id, so a batch of the old loader can no longer be fetched."""
    slots.clear()
    dataset = ImageDataset(files * 2, list(range(len(files) * 2)), eval_transform(48))
    pipeline = make_pipeline("device-resize", n_px=48)
    expected = uint8_batch(files * 2)
    pools, old_batch = [], None
    for _ in range(2):
        loader = pipeline_loader(dataset, pipeline, 2, 2, CPU, normalize_in_workers=False, use_slots=True)
        pixels = []
        for images, _, _, ok in loader:
            pools.append(slots.pool_of(images.data))
            pixels.append(pipeline.pixels(images, CPU))
            old_batch = old_batch or images
        assert torch.equal(torch.cat(pixels), expected)
        del loader
        gc.collect()
    assert pools[0] is pools[-1] and len({id(p) for p in pools}) == 1  # one pool for both loaders
    with pytest.raises(RuntimeError, match="pool is gone"):
        pipeline.pixels(old_batch, CPU)
    assert slots.acquire(1, 1) is pools[0]  # kept idle for the next loader ...
    slots.release(pools[0].id)
    slots.clear()
    assert slots.acquire(1, 1) is not pools[0]  # ... until cleared


def test_slot_pool_acquire_takes_an_idle_pool_that_fits():
    slots.clear()
    pool = slots.acquire(4, 100)
    first_id = pool.id
    pool.owner.fill_(7)
    slots.release(pool.id)
    assert slots.acquire(6, 100) is not pool  # too few slots: a new pool; the idle one stays
    smaller = slots.acquire(3, 50)  # fits in the idle pool
    assert smaller is pool and pool.id != first_id and (pool.owner == -1).all()
    slots.release(pool.id)
    other = slots.acquire(2, 10_000)
    slots.release(other.id)
    # at most MAX_IDLE (1) kept: the newest (were pool kept too, the smaller one would be taken)
    assert slots.MAX_IDLE == 1 and slots.acquire(1, 10) is other
    slots.clear()


def test_whole_image_slots_are_sized_from_the_images(files, tmp_path, monkeypatch):
    monkeypatch.delenv("UNICOM_SLOT_POOL_MB", raising=False)  # the default: 2048 MiB
    pipeline = make_pipeline("device-resize", n_px=48)
    dataset = ImageDataset(files, list(range(len(files))), eval_transform(48))
    largest = max(3 * Image.open(p).size[0] * Image.open(p).size[1] for p in files)  # the 400x300 JPEG
    assert pipeline.slot_bytes(dataset, 1, 1) == int(1.25 * largest)
    assert pipeline.slot_bytes(dataset, 4, 1) == 4 * int(1.25 * largest)
    assert pipeline.slot_bytes(dataset, 4, 2048) == 1 << 20  # the pool's cap, shared by its slots
    in_memory = ImageDataset([np.zeros((10, 20, 3), np.uint8)], [0], eval_transform(48))
    assert pipeline.slot_bytes(in_memory, 1, 1) == int(1.25 * 600)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    unreadable = ImageDataset([str(tmp_path / "bad.jpg")], [0], eval_transform(48))
    assert pipeline.slot_bytes(unreadable, 1, 1) == 3 * 1024 * 768  # a generous allowance per image


def test_slot_pool_size_from_the_environment(files, monkeypatch):
    monkeypatch.setenv("UNICOM_SLOT_POOL_MB", "0")  # whole-image slots off
    kinds, _, _, _ = loader_batches(files, "device-resize", use_slots=None)
    assert kinds == {("WholeImages", False)}
    assert loader_batches(files, "exact", use_slots=None)[0] == {("Crops", True)}  # crops are small: still on
    monkeypatch.setenv("UNICOM_SLOT_POOL_MB", "lots")
    with pytest.raises(ValueError, match="UNICOM_SLOT_POOL_MB"):
        loader_batches(files, "device-resize", use_slots=None)


@pytest.mark.parametrize("decode", ["device-resize", "turbo"])
def test_slots_with_groups_of_one_size_and_of_many(files, decode):
    """Images of one size lie as one block in the slot (no copies on the device); mixed sizes are padded."""
    uniform = [files[0]] * 4 + [files[1]] * 4  # 160x120 and 120x160: one group each
    mixed = files[:4] * 2
    for paths in (uniform, mixed):
        kinds, pixels, ok, _ = loader_batches(paths, decode, use_slots=True, batch=4)
        assert kinds == {("WholeImages", True)} and ok.all()
        assert torch.equal(pixels, uint8_batch(paths))
