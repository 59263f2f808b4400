"""The pipelines through their loaders (``unicom.data._pipelines``: the registry, ``exact`` and
``device-resize``, ``pipeline_loader`` and ``embedding_loader``) against the published float
transform: the very float tensors, from real JPEG and PNG files loaded by real DataLoader
worker processes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import synthetic_datasets as synth  # noqa: E402
from pipeline_files import (  # noqa: E402, F401
    CPU,
    IGNORE_DECODER_DEPRECATION,
    PIXEL,
    files_fixture,
    photos_fixture,
    published_batch,
    run_pipeline,
)

from unicom.data import BadImageError, ImageDataset, sharded_loader  # noqa: E402
from unicom.data._pipelines import (  # noqa: E402
    DECODE_CHOICES,
    PIPELINES,
    embedding_loader,
    eval_transform_uint8,
    make_pipeline,
    pipeline_for_transform,
    pipeline_loader,
    resolve_decode,
)
from unicom.transforms import eval_transform, train_transform  # noqa: E402
from unicom.transforms import test_transform as finetune_test_transform  # noqa: E402  (not a test)

pytestmark = [pytest.mark.usefixtures("one_thread"), IGNORE_DECODER_DEPRECATION]


@pytest.mark.parametrize("decode", ["exact", "device-resize"])
@pytest.mark.parametrize("normalize_in_workers", [False, True])
def test_exact_pipelines_bit_identical_on_files(files, decode, normalize_in_workers):
    for n_px, resize in ((48, None), (32, 36)):
        images, ok, indices = run_pipeline(files, decode, n_px, resize=resize,
                                           normalize_in_workers=normalize_in_workers)
        assert torch.equal(indices, torch.arange(len(files))) and ok.all()
        assert torch.equal(images, published_batch(files, n_px, resize))


def test_exact_pipelines_with_worker_processes(files):
    """Shared-memory batches from 2 worker processes, uneven last batch, same tensors."""
    expected = published_batch(files, 48)
    for decode in ("exact", "device-resize"):
        images, ok, indices = run_pipeline(files, decode, workers=2, batch=3, normalize_in_workers=False)
        assert torch.equal(indices, torch.arange(len(files))) and ok.all()
        assert torch.equal(images, expected)


@pytest.mark.parametrize("decode", DECODE_CHOICES)
def test_bad_images_raise_or_are_skipped(files, tmp_path, decode):
    bad = synth.make_bad_images(tmp_path)["truncated"]
    paths = [files[0], str(bad), files[2]]
    with pytest.raises(BadImageError, match="truncated.jpg"):
        run_pipeline(paths, decode)
    images, ok, indices = run_pipeline(paths, decode, skip_bad_images=True)
    assert ok.tolist() == [True, False, True] and torch.equal(indices, torch.arange(3))
    expected = published_batch([files[0], files[2]], 48)
    keep = images[ok]
    if PIPELINES[decode].exact:
        assert torch.equal(keep, expected)
    else:
        assert ((keep - expected).abs() * PIXEL).mean() < 2.5


def test_in_memory_samples(photos):
    """Images held in memory (the digits dataset) take the PIL path in every pipeline."""
    samples = [np.asarray(photos[0].resize((60, 40))), photos[1].resize((30, 50))]
    expected = torch.stack([eval_transform(24)(Image.fromarray(samples[0])), eval_transform(24)(samples[1])])
    for decode in DECODE_CHOICES:
        dataset = ImageDataset(samples, [0, 1], eval_transform(24))
        pipeline = pipeline_for_transform(dataset.transform, decode)
        (x, _, _, ok), = list(pipeline_loader(dataset, pipeline, 2, 0, normalize_in_workers=False))
        images, ok = pipeline.to_device(x, ok, CPU)
        assert torch.equal(images, expected), decode


def test_pipeline_recognises_only_the_published_transforms():
    assert pipeline_for_transform(eval_transform(224)) == make_pipeline("exact", 224, 224)
    assert pipeline_for_transform(finetune_test_transform(224), "device-resize") == \
        make_pipeline("device-resize", 224, 256)
    assert pipeline_for_transform(train_transform(224, "timm")) is None
    assert pipeline_for_transform(None) is None
    with pytest.raises(ValueError, match="decode"):
        make_pipeline("nvdali")
    with pytest.raises(ValueError, match="smaller than the crop"):
        make_pipeline("exact", 224, 200)


def test_device_side_resizing_on_a_cpu_warns(files, caplog):
    dataset = ImageDataset(files, list(range(len(files))), eval_transform(32))
    with caplog.at_level("WARNING", logger="unicom.data._pipelines"):
        embedding_loader(dataset, "auto", 4, 0, CPU)
        embedding_loader(dataset, "exact", 4, 0, CPU)
        assert "slower" not in caplog.text
        embedding_loader(dataset, "turbo", 4, 0, CPU)
    assert "decode=turbo resizes on the device, which is the CPU here" in caplog.text


def test_embedding_loader_falls_back_for_other_transforms(files, caplog):
    dataset = ImageDataset(files[:2], [0, 1], train_transform(32, "timm"))
    with caplog.at_level("WARNING", logger="unicom.data._pipelines"):
        loader, preprocess = embedding_loader(dataset, "device-resize", 2, 0, CPU)
    assert preprocess is None and "decode=device-resize needs the eval transform" in caplog.text
    (x, *_), = list(loader)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32)


def test_sharding_matches_sharded_loader(files):
    dataset = ImageDataset(files, list(range(len(files))), eval_transform(32))
    pipeline = pipeline_for_transform(dataset.transform)
    for rank in range(3):
        ours = [i for *_, idx, _ in pipeline_loader(dataset, pipeline, 2, 0, CPU, rank, 3) for i in idx.tolist()]
        theirs = [i for *_, idx, _ in sharded_loader(dataset, 2, 0, rank, 3) for i in idx.tolist()]
        assert ours == theirs


def test_auto_decode_is_exact_on_every_device():
    assert resolve_decode("auto", "cpu") == "exact"
    assert resolve_decode("auto", torch.device("cuda", 0)) == "device-resize"  # a device name, no GPU needed
    assert resolve_decode("turbo", "cuda") == "turbo"
    for name in ("auto", "exact", "device-resize"):
        assert PIPELINES[resolve_decode(name, "cuda")].exact and PIPELINES[resolve_decode(name, "cpu")].exact
    with pytest.raises(ValueError, match="expected auto or one of"):
        resolve_decode("nvjpeg", "cpu")


def test_device_resize_batches_carry_their_resampling_tables(files):
    """The workers build the coefficient tables; the device only expands them (same pixels)."""
    dataset = ImageDataset(files, list(range(len(files))), eval_transform(32))
    pipeline = make_pipeline("device-resize", n_px=32)
    batch, _, _, ok = pipeline.load_batch(dataset, range(len(files)))
    assert ok.all() and all(len(tables) == 4 and tables[1].dtype == np.int64 for _, _, tables in batch.groups)
    expected = torch.stack([eval_transform_uint8(32)(Image.open(p)) for p in files])
    assert torch.equal(pipeline.pixels(batch, CPU), expected)
