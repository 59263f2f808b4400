"""uint8 crops normalised on the device (``unicom.data._pipelines.normalize``) against the
published float transform: the very float tensors, on real photographs of every PIL mode."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from pipeline_files import as_mode, crops, photos_fixture  # noqa: E402, F401

from unicom.data._pipelines import eval_transform_uint8, normalization_table, normalize_on_device  # noqa: E402
from unicom.transforms import MEAN, STD, eval_transform  # noqa: E402
from unicom.transforms import test_transform as finetune_test_transform  # noqa: E402  (not a test)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_table_is_the_published_tail_for_every_value():
    """Each of the 256 values of each channel: ToTensor + Normalize == the table, bit for bit."""
    rng = np.random.default_rng(0)
    values = np.stack([rng.permutation(256) for _ in range(3)], axis=-1).astype(np.uint8).reshape(16, 16, 3)
    image = Image.fromarray(values, mode="RGB")
    expected = eval_transform(16).transforms[-1](eval_transform(16).transforms[-2](image))  # Normalize(ToTensor)
    pixels = torch.from_numpy(values).permute(2, 0, 1)[None].contiguous()
    for lookup in (True, False):  # the table (other devices) and the ops (CPU)
        assert torch.equal(normalize_on_device(pixels, lookup=lookup)[0], expected)
    table = normalization_table()
    assert table.shape == (3, 256) and table.dtype == torch.float32
    # and the arithmetic it stands for, in float64, to float32 rounding
    ref = (torch.arange(256, dtype=torch.float64) / 255 - torch.tensor(MEAN, dtype=torch.float64)[:, None]) / \
        torch.tensor(STD, dtype=torch.float64)[:, None]
    assert torch.allclose(table.double(), ref, rtol=0, atol=1e-6)


def test_normalize_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        normalize_on_device(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_uint8_transform_then_table_is_the_published_transform(photos, mode):
    """eval_transform_uint8 + normalize_on_device == eval_transform (torch.equal) on real photos."""
    for image in crops(photos, 6, 640, 427, seed=len(mode)) + [photos[0], photos[1].resize((224, 300))]:
        image = as_mode(image, mode)
        for n_px, resize in ((224, None), (32, 36)):
            published = eval_transform(n_px) if resize is None else finetune_test_transform(n_px)
            expected = published(image)
            pixels = eval_transform_uint8(n_px, resize)(image)
            assert pixels.dtype == torch.uint8 and pixels.shape == (3, n_px, n_px)
            assert torch.equal(normalize_on_device(pixels[None], lookup=True)[0], expected), (mode, image.size, n_px)
            assert torch.equal(normalize_on_device(pixels[None])[0], expected), (mode, image.size, n_px)
