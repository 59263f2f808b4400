"""The eval transform on real photos (scikit-learn's bundled samples) and every PIL mode.

The expected pixels never come from the module's own constants: the published mean and std
are written out here, and the reference pipeline (Pillow bicubic resize, torchvision's crop
offsets, float64 normalisation in numpy) is written in this file.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision import transforms as T

from reference import PUBLISHED_MEAN, PUBLISHED_STD, reference_pixels
from unicom import transforms as tfm
from unicom.transforms import MEAN, STD, eval_transform, to_rgb, train_transform


def small_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic (height, width, 3) uint8 picture: a different gradient per channel plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    return np.clip(smooth + rng.integers(-40, 41, (height, width, 3)), 0, 255).astype(np.uint8)


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
        T.Normalize(PUBLISHED_MEAN, PUBLISHED_STD),
    ])


@pytest.mark.parametrize("n_px", [224, 336])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_same_pixels_as_published_transform(photo, n_px, mode):
    image = photo.convert(mode)
    out = eval_transform(n_px)(image)
    assert out.shape == (3, n_px, n_px) and out.dtype == torch.float32
    torch.testing.assert_close(out, published_pipeline(n_px)(image), rtol=0, atol=0)


def test_published_normalisation_constants():
    assert (MEAN, STD) == (PUBLISHED_MEAN, PUBLISHED_STD)
    for transform in (eval_transform(224), tfm.test_transform(224)):
        normalize = transform.transforms[-1]
        assert tuple(normalize.mean) == PUBLISHED_MEAN and tuple(normalize.std) == PUBLISHED_STD
    timm_normalize = [t for t in train_transform(32, "timm").transforms[1].transforms if isinstance(t, T.Normalize)]
    assert len(timm_normalize) == 1
    # timm keeps them as float32 tensors
    np.testing.assert_allclose(np.asarray(timm_normalize[0].mean, dtype=np.float64), PUBLISHED_MEAN, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(timm_normalize[0].std, dtype=np.float64), PUBLISHED_STD, rtol=1e-7)


def test_uniform_colours_give_the_published_values():
    """Bicubic resizing keeps a uniform image uniform: the output is (c / 255 - mean) / std per
    channel, written out here by hand (R, G, B order)."""
    for colour, expected in (
        ((255, 0, 128), (1.930336254158794, -1.7520971281645974, 0.33994864299551714)),
        ((0, 255, 64), (-1.79226253374815, 2.0748838377332515, -0.5701355628940245)),
    ):
        out = eval_transform(16)(Image.new("RGB", (37, 23), colour))
        assert out.shape == (3, 16, 16)
        want = torch.tensor(expected, dtype=torch.float32)[:, None, None].expand(3, 16, 16)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("width,height,n_px", [(45, 31, 16), (30, 50, 20), (24, 24, 24), (64, 48, 24)])
def test_small_image_matches_independent_reference(width, height, n_px):
    """Landscape (odd crop margin), portrait (torchvision rounds 6.5 to 6), square with no
    resize, and a downscale: against the float64 pipeline written above."""
    rgb = small_image(width, height)
    out = eval_transform(n_px)(Image.fromarray(rgb))
    assert out.shape == (3, n_px, n_px) and out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), reference_pixels(rgb, n_px), rtol=0, atol=2e-6)
    # the timm choice at test time: resize to int(n_px / 0.875) first
    out = tfm.test_transform(n_px)(Image.fromarray(rgb))
    np.testing.assert_allclose(out.double().numpy(), reference_pixels(rgb, n_px, int(n_px / 0.875)), rtol=0, atol=2e-6)


def _palette_image(rng: np.random.Generator, shape: tuple, transparency: bool) -> tuple[Image.Image, np.ndarray]:
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, shape, dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.tobytes())
    if transparency:
        image.info["transparency"] = int(index[0, 0])  # a transparent colour keeps its RGB value
    return image, palette[index]


def mode_image(mode: str, seed: int = 1) -> tuple[Image.Image, np.ndarray]:
    """An image in ``mode`` and its 8-bit RGB pixels by the rule written here (not by to_rgb):
    Pillow's convert("RGB") for 8-bit modes (alpha dropped, grey repeated, CMYK as
    (255 - C)(255 - K) / 255 rounded), 16-bit integers scaled by 255 / 65535 and floats by
    255, rounded, then clipped to 0-255."""
    rng = np.random.default_rng(seed)
    shape = (27, 35)
    if mode == "RGBA":
        array = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
        return Image.fromarray(array, "RGBA"), array[..., :3]
    if mode == "LA":
        array = rng.integers(0, 256, (*shape, 2), dtype=np.uint8)
        return Image.fromarray(array, "LA"), np.repeat(array[..., :1], 3, axis=2)
    if mode == "CMYK":
        array = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
        cmy, k = array[..., :3].astype(np.float64), array[..., 3:].astype(np.float64)
        return Image.fromarray(array, "CMYK"), np.rint((255 - cmy) * (255 - k) / 255).astype(np.uint8)
    if mode == "1":
        bits = rng.random(shape) < 0.5
        return Image.fromarray(bits), np.repeat(bits[..., None] * np.uint8(255), 3, axis=2)
    if mode == "I":  # how Pillow opens 16-bit PNG / PGM / TIFF; beyond 0-65535 clips
        values = rng.integers(-3000, 70000, shape).astype(np.int32)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(values, "I"), np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":  # floats are 0-1; beyond clips
        values = (rng.random(shape) * 1.4 - 0.2).astype(np.float32)
        grey = np.clip(np.rint(values.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(values, "F"), np.repeat(grey[..., None], 3, axis=2)
    if mode in ("P", "PA"):
        return _palette_image(rng, shape, transparency=mode == "PA")
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA", "CMYK", "1", "I", "F"])
def test_every_pil_mode_gives_the_documented_rgb_pixels(mode):
    """PA: a palette image with a transparent index."""
    image, rgb = mode_image(mode)
    assert image.mode == ("P" if mode == "PA" else mode)
    converted = to_rgb(image)
    assert converted.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(converted), rgb)
    out = eval_transform(16)(image)
    np.testing.assert_allclose(out.double().numpy(), reference_pixels(rgb, 16), rtol=0, atol=2e-6)


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
    # timm's crop_pct 0.875 up to 224 pixels (224 -> 256), none for the 336-pixel model
    assert [tfm.test_transform(n).transforms[1].size for n in (32, 224, 225, 336)] == [36, 256, 225, 336]
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
