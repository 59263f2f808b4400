"""``unicom.embed``: rows in input order, equal to embedding each file alone (float64 reference),
whatever the input form (paths, PIL images, Datasets), batch size or worker count; bad files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import synthetic_datasets as synth  # noqa: E402

import unicom  # noqa: E402
from unicom.data import BadImageError, ImageDataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """Noise images of several sizes, modes and formats (so every embedding differs)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h, ext) in enumerate([(40, 30, "jpg"), (30, 50, "png"), (33, 33, "jpg"), (64, 20, "png"),
                                     (45, 45, "jpg")]):
        path = folder / f"img{i}.{ext}"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def model(checkpoint):
    return unicom.load(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def reference(model, files) -> torch.Tensor:
    """Each file alone through the published transform, normalised in float64: (N, D)."""
    net, transform = model
    with torch.no_grad():
        rows = [net(transform(Image.open(p).convert("RGB")).unsqueeze(0)).double() for p in files]
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1)


def test_rows_follow_the_input_order(model, files, reference) -> None:
    net, _ = model
    features = unicom.embed(net, files, batch_size=2, progress=False)
    assert features.shape == (5, 32) and features.dtype == torch.float32 and features.device.type == "cpu"
    torch.testing.assert_close(features.double(), reference, atol=1e-5, rtol=0)
    backwards = unicom.embed(net, files[::-1], batch_size=3, progress=False)
    torch.testing.assert_close(backwards, features.flip(0), atol=1e-6, rtol=0)


def test_worker_processes_keep_the_order(model, files, reference) -> None:
    features = unicom.embed(model[0], files, batch_size=2, num_workers=2, progress=False)
    torch.testing.assert_close(features.double(), reference, atol=1e-5, rtol=0)


def test_paths_pil_images_and_datasets_agree(model, files, reference) -> None:
    net, transform = model
    pil = [Image.open(p) for p in files]
    dataset = ImageDataset(files, [0] * len(files), transform)

    class Pairs(torch.utils.data.Dataset):  # torchvision-style (image, label) items
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return Image.open(files[i]), i

    mixed = [files[0], pil[1], *files[2:]]
    bare = ImageDataset(files, [0] * len(files))  # no transform: the model's eval transform is used
    for images in (pil, dataset, Pairs(), mixed, bare):
        torch.testing.assert_close(unicom.embed(net, images, progress=False).double(), reference, atol=1e-5, rtol=0)


def test_normalize_false_gives_the_model_output(model, files) -> None:
    net, transform = model
    raw = unicom.embed(net, files[:2], normalize=False, progress=False)
    with torch.no_grad():
        expected = net(torch.stack([transform(Image.open(p).convert("RGB")) for p in files[:2]]))
    torch.testing.assert_close(raw, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(2))


def test_skip_bad_gives_a_mask_and_zero_rows(model, files, reference, tmp_path) -> None:
    bad = synth.make_bad_images(tmp_path)
    images = [files[0], str(bad["truncated"]), files[1], str(bad["text"])]
    features, valid = unicom.embed(model[0], images, skip_bad=True, batch_size=2, progress=False)
    assert valid.tolist() == [True, False, True, False]
    assert torch.count_nonzero(features[~valid]) == 0
    torch.testing.assert_close(features[valid].double(), reference[:2], atol=1e-5, rtol=0)



def test_skip_bad_overrides_an_image_datasets_own(model, files, reference, tmp_path) -> None:
    net, transform = model
    bad = str(synth.make_bad_images(tmp_path)["text"])
    strict = ImageDataset([files[0], bad, files[1]], [0, 0, 0], transform, skip_bad_images=False)
    features, valid = unicom.embed(net, strict, skip_bad=True, progress=False)
    assert valid.tolist() == [True, False, True] and torch.count_nonzero(features[1]) == 0
    torch.testing.assert_close(features[valid].double(), reference[:2], atol=1e-5, rtol=0)
    lenient = ImageDataset([files[0], bad], [0, 0], transform, skip_bad_images=True)
    with pytest.raises(BadImageError, match="cannot decode image"):
        unicom.embed(net, lenient, progress=False)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_undecodable_file_is_named(model, files, tmp_path, num_workers: int) -> None:
    bad = synth.make_bad_images(tmp_path)["text"]
    with pytest.raises(BadImageError) as info:
        unicom.embed(model[0], [files[0], str(bad)], num_workers=num_workers, progress=False)
    message = str(info.value)
    assert message.startswith(f"cannot decode image {bad}") and "skip_bad=True" in message
    assert "Traceback" not in message


def test_bad_arguments(model, files) -> None:
    net, _ = model
    with pytest.raises(TypeError, match="wrap a single image in a list"):
        unicom.embed(net, files[0])
    with pytest.raises(TypeError, match=r"images\[1\] is a int"):
        unicom.embed(net, [files[0], 3])
    with pytest.raises(ValueError, match="batch_size"):
        unicom.embed(net, files, batch_size=0)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        unicom.embed(net, files, precision="fp8")
    assert unicom.embed(net, [], progress=False).shape == (0, 32)


def test_unicom_embed_is_the_function() -> None:
    """A module named unicom/embed.py would shadow the function once imported: there is none."""
    import importlib.util

    assert importlib.util.find_spec("unicom.embed") is None
    assert callable(unicom.embed) and unicom.embed.__module__ == "unicom.embedding"
    assert {"embed", "save_pretrained", "push_to_hub"} <= set(unicom.__all__)
