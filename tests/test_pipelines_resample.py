"""Pillow's bicubic resize replayed on tensors (``unicom.data._pipelines.resample``): bit-identical
to Pillow on real photographs of many sizes, both of Pillow's pass orders."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from pipeline_files import CPU, crops, photos_fixture  # noqa: E402, F401

from unicom.data._pipelines import eval_transform_uint8, pillow_resize_crop, resized_size  # noqa: E402
from unicom.data._pipelines.resample import pass_order, resize_group  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_device_resize_bit_identical_to_pillow_on_many_sizes(photos):
    """Upscaling, downscaling, extreme aspect ratios, both of Pillow's pass orders, crops == whole."""
    images = crops(photos, 60, 200, 200, seed=1, min_side=2)
    images += [photos[0].crop((0, 0, 300, 9)), photos[1].crop((0, 0, 7, 260)), photos[0].crop((0, 0, 48, 48))]
    tensors = [torch.from_numpy(np.array(im)) for im in images]  # (H, W, 3)
    rule = pass_order()
    for n_px, resize in ((48, None), (24, 27), (17, None)):
        got = pillow_resize_crop(tensors, n_px, resize, CPU)
        expected = torch.stack([eval_transform_uint8(n_px, resize)(im) for im in images])
        same = (got == expected).flatten(1).all(1)
        assert same.all(), [images[i].size for i in torch.nonzero(~same).flatten().tolist()]
        orders = {rule(w, h, *resized_size(w, h, resize or n_px)) for w, h in (im.size for im in images)}
        assert orders == {True, False} or rule(100, 100, 90, 10) is False  # both orders exercised where they exist


def test_resize_group_matches_pillow_for_arbitrary_output_sizes():
    """The core resampler, no crop: any (w, h) -> (w', h') as Image.resize does it."""
    rng = np.random.default_rng(2)
    rule = pass_order()
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(4, 90, size=2))
        nh, nw = (int(v) for v in rng.integers(3, 120, size=2))
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        expected = torch.from_numpy(np.array(Image.fromarray(pixels).resize((nw, nh), Image.BICUBIC)))
        got = resize_group(torch.from_numpy(pixels)[None], [(h, w)], [(nw, nh)], [(0, 0)], (nh, nw),
                           vertical_first=rule(w, h, nw, nh))
        assert torch.equal(got[0].permute(1, 2, 0), expected), (w, h, nw, nh)
