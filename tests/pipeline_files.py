"""Shared material of the input pipeline tests: real photographs (scikit-learn's sample images)
cropped to many sizes and saved as real JPEG and PNG files, and the published float transform
they are checked against. Test modules import the fixtures by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from unicom.data import ImageDataset
from unicom.data._pipelines import Crops, eval_transform_uint8, make_pipeline, pipeline_for_transform, pipeline_loader
from unicom.transforms import STD, eval_transform
from unicom.transforms import test_transform as finetune_test_transform

CPU = torch.device("cpu")
# Per-channel std in 0-255 units: turns a difference of normalised values back into pixels.
PIXEL = torch.tensor(STD).view(1, 3, 1, 1) * 255
# torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work.
IGNORE_DECODER_DEPRECATION = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(name="photos", scope="module")
def photos_fixture() -> list[Image.Image]:
    return [Image.fromarray(a) for a in load_sample_images().images]  # china, flower: 640x427 RGB


def crops(photos, count: int, max_w: int, max_h: int, seed: int, min_side: int = 3) -> list[Image.Image]:
    """Random crops (any aspect ratio, down to a few pixels) of the sample photographs."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image = photos[i % 2]
        w, h = int(rng.integers(min_side, max_w + 1)), int(rng.integers(min_side, max_h + 1))
        x0, y0 = int(rng.integers(0, 640 - w + 1)), int(rng.integers(0, 427 - h + 1))
        out.append(image.crop((x0, y0, x0 + w, y0 + h)))
    return out


def as_mode(image: Image.Image, mode: str) -> Image.Image:
    if mode == "P":
        return image.quantize(64)
    if mode == "I;16":
        return Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    return image.convert(mode)


@pytest.fixture(name="files", scope="module")
def files_fixture(photos, tmp_path_factory) -> list[str]:
    """JPEGs of several sizes, a grayscale and a CMYK JPEG, and PNGs."""
    folder = tmp_path_factory.mktemp("photos")
    specs = [((160, 120), "RGB", "jpg"), ((120, 160), "RGB", "jpg"), ((400, 300), "RGB", "jpg"),
             ((90, 90), "L", "jpg"), ((130, 97), "CMYK", "jpg"), ((70, 50), "RGBA", "png"), ((64, 200), "P", "png"),
             ((33, 41), "RGB", "jpg")]
    paths = []
    for i, (size, mode, ext) in enumerate(specs):
        image = as_mode(photos[i % 2].resize(size, Image.BICUBIC), mode)
        path = folder / f"{i:02d}.{ext}"
        image.save(path, **({"quality": 90} if ext == "jpg" else {}))
        paths.append(str(path))
    return paths


def published_batch(paths, n_px: int, resize: int | None = None) -> torch.Tensor:
    """The published float transform of ``paths``, (B, 3, n_px, n_px)."""
    transform = eval_transform(n_px) if resize is None else finetune_test_transform(n_px)
    dataset = ImageDataset(paths, [0] * len(paths), transform)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def uint8_batch(paths, n_px: int = 48) -> torch.Tensor:
    """The published transform's uint8 crops of ``paths``."""
    return torch.stack([eval_transform_uint8(n_px)(Image.open(p)) for p in paths])


def run_pipeline(paths, decode: str, n_px: int = 48, workers: int = 0, batch: int = 3, resize=None,
                 normalize_in_workers: bool | None = None, **kw):
    """(normalised images, ok, indices) of ``paths`` through the ``decode`` pipeline, on the CPU."""
    transform = eval_transform(n_px) if resize is None else finetune_test_transform(n_px)
    dataset = ImageDataset(paths, list(range(len(paths))), transform, **kw)
    pipeline = pipeline_for_transform(transform, decode)
    images, oks, indices = [], [], []
    loader = pipeline_loader(dataset, pipeline, batch, workers, normalize_in_workers=normalize_in_workers)
    for x, labels, idx, ok in loader:
        if isinstance(x, Crops):  # exact: uint8 crops, or normalised in the workers
            assert x.normalized == (normalize_in_workers is not False)
        assert torch.equal(labels, idx)
        x, ok = pipeline.to_device(x, ok, CPU)
        images.append(x)
        oks.append(ok)
        indices.append(idx)
    return torch.cat(images), torch.cat(oks), torch.cat(indices)


def loader_batches(paths, decode, use_slots, workers=2, batch=2, skip_bad_images=False, pipeline=None):
    """({(batch type, in a slot)}, uint8 pixels, ok, indices) of ``paths`` at n_px 48, uint8 to the device."""
    dataset = ImageDataset(paths, list(range(len(paths))), eval_transform(48), skip_bad_images=skip_bad_images)
    pipeline = pipeline or make_pipeline(decode, n_px=48)
    loader = pipeline_loader(dataset, pipeline, batch, workers, CPU, normalize_in_workers=False, use_slots=use_slots)
    kinds, pixels, oks, indices = set(), [], [], []
    for images, _, idx, ok in loader:
        kinds.add((type(images).__name__, images.in_slot))
        pixels.append(pipeline.pixels(images, CPU))
        oks.append(ok)
        indices.append(idx)
    return kinds, torch.cat(pixels), torch.cat(oks), torch.cat(indices)
