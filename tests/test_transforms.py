"""The eval transform on real photos (scikit-learn's bundled samples) and every PIL mode."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision import transforms as T

from unicom import transforms as tfm
from unicom.transforms import MEAN, STD, eval_transform, to_rgb, train_transform


@pytest.fixture(scope="module", params=["china.jpg", "flower.jpg"])
def photo(request) -> Image.Image:
    return Image.fromarray(load_sample_image(request.param))


def published_pipeline(n_px: int) -> T.Compose:
    """The published order: resize, crop, then convert to RGB."""
    return T.Compose([
        T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(n_px),
        lambda image: image.convert("RGB"),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


@pytest.mark.parametrize("n_px", [224, 336])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_same_pixels_as_published_transform(photo, n_px, mode):
    image = photo.convert(mode)
    out = eval_transform(n_px)(image)
    assert out.shape == (3, n_px, n_px) and out.dtype == torch.float32
    torch.testing.assert_close(out, published_pipeline(n_px)(image), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "1", "I", "F"])
def test_every_pil_mode_gives_rgb_tensor(photo, mode):
    image = photo.convert(mode)
    out = eval_transform(224)(image)
    assert out.shape == (3, 224, 224) and torch.isfinite(out).all()


def test_palette_keeps_colours(photo):
    image = photo.convert("P")
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))


def test_16_bit_images_are_scaled_not_clipped(photo):
    gray8 = np.asarray(photo.convert("L")).astype(np.uint16)
    gray16 = Image.fromarray(gray8 * 257)  # the same picture in 16 bits
    assert gray16.mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(to_rgb(gray16)), np.asarray(photo.convert("L").convert("RGB")))
    torch.testing.assert_close(eval_transform(224)(gray16), eval_transform(224)(photo.convert("L")), rtol=0, atol=0)


def test_16_bit_scaling_does_not_depend_on_the_rest_of_the_image(tmp_path):
    """A stored value maps to one pixel value whatever else the image holds (16-bit PGM: mode I
    or I;16 by Pillow version; float images are taken as 0-1)."""
    outputs = []
    for i, extra in enumerate((200, 256, 65535)):
        values = np.full((4, 4), 200 * 257, dtype=">u2")  # 200 of 255, in 16 bits
        values[0, 0] = extra * 257 if extra <= 255 else extra
        path = tmp_path / f"{i}.pgm"
        path.write_bytes(b"P5 4 4 65535\n" + values.tobytes())
        with Image.open(path) as image:
            image.load()
            outputs.append(np.asarray(to_rgb(image))[1:, 1:])
    assert all(np.array_equal(out, np.full((3, 3, 3), 200, np.uint8)) for out in outputs)
    floats = [Image.fromarray(np.full((2, 2), 0.5, np.float32)), Image.fromarray(np.array([[0.5, 7.0]], np.float32))]
    assert [np.asarray(to_rgb(f))[0, 0, 0] for f in floats] == [128, 128]


def test_test_and_train_transforms(photo):
    assert tfm.test_transform(224)(photo).shape == (3, 224, 224)
    assert tfm.test_transform(336).transforms[1].size == 336
    torch.manual_seed(0)
    assert train_transform(64, "timm")(photo.convert("L")).shape == (3, 64, 64)
    assert train_transform(64, "origin_clip")(photo).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="origin_clip"):
        train_transform(64, "autoaug")


def test_timm_posterize_at_top_magnitude_does_not_crash(photo):
    """timm asks Pillow for 0 bits at magnitude 10; Pillow >= 13 refuses it."""
    transform = train_transform(32, "timm", auto_augment="rand-m10-n3-inc1")
    ops = [op for op in transform.transforms[1].transforms[2].ops if "Posterize" in op.name]
    assert ops and all(op.aug_fn.__module__ == "unicom.transforms" for op in ops)
    small = photo.resize((48, 40))
    black = ops[0].aug_fn(small, 0)
    assert black.size == small.size and black.getextrema() == ((0, 0), (0, 0), (0, 0))
    assert ops[0].aug_fn(small, 8) is small
    torch.manual_seed(0)
    import random

    random.seed(0)
    for _ in range(50):  # three ops at magnitude 10 each time: posterize comes up often
        assert transform(small).shape == (3, 32, 32)
