"""unicom.data: every on-disk format read from synthetic trees in that format."""

from __future__ import annotations

import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

sys.path.insert(0, str(Path(__file__).parent))

import synthetic_datasets as synth  # noqa: E402

from unicom.data import (  # noqa: E402
    DATASETS,
    STANDARD,
    BadImageError,
    DatasetCountWarning,
    ImageDataset,
    load_image_folder,
    load_retrieval_dataset,
    sharded_loader,
)
from unicom.data.loader import collate  # noqa: E402

# The largest gap allowed between a decoded solid-colour JPEG and the colour written.
JPEG_TOLERANCE = 4.0


def load_quietly(name, root, split, **kwargs):
    """Synthetic trees are far smaller than the benchmarks: ignore the count warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetCountWarning)
        return load_retrieval_dataset(name, root, split, **kwargs)


def assert_matches(dataset: ImageDataset, items: list[synth.Item]) -> None:
    """Same files in the same order, same-class <-> same-label, and the right pixels."""
    assert dataset.paths == [item.path for item in items]
    labels = dataset.labels.tolist()
    keys = [item.key for item in items]
    for i in range(len(items)):
        for j in range(len(items)):
            assert (labels[i] == labels[j]) == (keys[i] == keys[j])
    assert [dataset.classes[label] for label in labels] == keys
    for i, item in enumerate(items):
        image, label, index, ok = dataset[i]
        assert (label, index, ok) == (labels[i], i, True)
        assert image.dtype == torch.uint8 and image.shape == (3, synth.SIZE[1], synth.SIZE[0])
        mean = image.double().mean(dim=(1, 2))
        assert torch.allclose(mean, torch.tensor(item.color, dtype=torch.float64), atol=JPEG_TOLERANCE), item.path


def assert_contiguous(dataset: ImageDataset, num_classes: int) -> None:
    assert dataset.labels.dtype == torch.long
    assert sorted(set(dataset.labels.tolist())) == list(range(num_classes))


# ---------------------------------------------------------------- ImageFolder


def test_image_folder_order_labels_and_skipped_files(tmp_path):
    # "c10" sorts before "c2" as text, as torchvision's ImageFolder sorts it.
    items = synth.make_image_folder(tmp_path, ["c2", "b", "c10", "a"], per_class=2)
    (tmp_path / ".hidden").mkdir()
    synth.write_image(tmp_path / ".hidden" / "x.jpg", (1, 2, 3))
    dataset = load_image_folder(tmp_path)
    assert dataset.classes == ["a", "b", "c10", "c2"]
    assert dataset.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert_matches(dataset, items)
    assert not any("._" in p or p.endswith(".txt") or ".hidden" in p for p in dataset.paths)


def test_image_folder_val_mapped_by_folder_name(tmp_path):
    train = load_image_folder(_folder(tmp_path / "train", ["ant", "bee", "cat", "dog"]))
    class_to_idx = {name: i for i, name in enumerate(train.classes)}
    # The val tree lacks "ant" and "cat": its own sorted order would give bee=0, dog=1.
    val = load_image_folder(_folder(tmp_path / "val", ["dog", "bee"]), class_to_idx=class_to_idx)
    assert val.labels.tolist() == [1, 1, 3, 3]
    assert val.classes == train.classes
    with pytest.raises(ValueError, match="eel"):
        load_image_folder(_folder(tmp_path / "other", ["bee", "eel"]), class_to_idx=class_to_idx)


def _folder(root: Path, classes: list[str]) -> Path:
    synth.make_image_folder(root, classes, per_class=2)
    return root


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no image found"):
        load_image_folder(tmp_path / "empty")


# ---------------------------------------------------------------- benchmark formats


def test_cub_split_by_sorted_class_and_modes(tmp_path):
    written = synth.make_cub(tmp_path, num_classes=6, per_class=3)
    for split, items in (("train", written.train), ("test", written.test)):
        with pytest.warns(DatasetCountWarning) as record:
            ds = load_retrieval_dataset("cub", tmp_path, split)
        messages = [str(w.message) for w in record]
        standard = getattr(STANDARD["cub"], split)
        assert any(f"found 9 images, standard {standard.images}" in m for m in messages)
        assert any(f"found 3 classes, standard {standard.classes}" in m for m in messages)
        assert ds.gallery is None and ds.num_classes == 3 and ds.ks == (1, 2, 4, 8)
        assert_contiguous(ds.query, 3)
        assert_matches(ds.query, items)  # includes grayscale JPEG, RGBA and palette PNGs
    assert load_quietly("cub", tmp_path, "train").query.classes == ["001.Bird_A", "002.Bird_B", "003.Bird_C"]
    assert not set(written.junk) & set(load_quietly("cub", tmp_path, "train").query.paths)


def test_cub_odd_number_of_classes_splits_at_half(tmp_path):
    synth.make_cub(tmp_path, num_classes=5, per_class=1)
    assert load_quietly("cub", tmp_path, "train").num_classes == 2
    assert load_quietly("cub", tmp_path, "test").num_classes == 3


def test_cars_from_savemat_file(tmp_path):
    written = synth.make_cars(tmp_path, num_classes=6, per_class=3)
    for split, items in (("train", written.train), ("test", written.test)):
        ds = load_quietly("car", tmp_path, split)
        assert_matches(ds.query, items)  # annotation order is kept
        assert_contiguous(ds.query, 3)
    assert load_quietly("car", tmp_path, "train").query.classes == ["1", "2", "3"]
    assert load_quietly("cars", tmp_path, "test").query.classes == ["4", "5", "6"]


def test_sop_files(tmp_path):
    written = synth.make_sop(tmp_path, train_classes=4, test_classes=3, per_class=2)
    train = load_quietly("sop", tmp_path, "train")
    test = load_quietly("sop", tmp_path, "test")
    assert_matches(train.query, written.train)
    assert_matches(test.query, written.test)
    assert (train.num_classes, test.num_classes, test.ks) == (4, 3, (1, 10, 100, 1000))
    assert_contiguous(train.query, 4)
    assert test.gallery is None


@pytest.mark.parametrize("under_img", [True, False], ids=["Img", "flat"])
def test_inshop_query_gallery_share_labels(tmp_path, under_img):
    written = synth.make_inshop(
        tmp_path, train_items=3, test_items=4, per_item=2, gallery_only_items=1, under_img=under_img
    )
    train = load_quietly("inshop", tmp_path, "train")
    assert_matches(train.query, written.train)
    assert train.gallery is None and train.num_classes == 3
    assert_contiguous(train.query, 3)

    with pytest.warns(DatasetCountWarning) as record:
        test = load_retrieval_dataset("inshop", tmp_path, "test")
    messages = " | ".join(str(w.message) for w in record)
    assert "found 8 query images, standard 14218" in messages
    assert "found 10 gallery images, standard 12612" in messages
    assert test.num_classes == 5 and test.ks == (1, 10, 20, 30, 40, 50)
    assert_matches(test.query, written.test)
    assert_matches(test.gallery, written.gallery)
    # One encoding for both sides: an item's query and gallery images share a label.
    by_item_query = {it.key: int(label) for it, label in zip(written.test, test.query.labels)}
    by_item_gallery = {it.key: int(label) for it, label in zip(written.gallery, test.gallery.labels)}
    assert len(by_item_query) == 4 and len(by_item_gallery) == 5
    assert by_item_query.items() <= by_item_gallery.items()
    assert sorted(by_item_gallery.values()) == [0, 1, 2, 3, 4]


def test_inshop_images_missing(tmp_path):
    synth.make_inshop(tmp_path)
    shutil.rmtree(tmp_path / "Inshop_Clothes" / "Img")
    with pytest.raises(FileNotFoundError, match="Inshop_Clothes/Img/img/WOMEN"):
        load_quietly("inshop", tmp_path, "train")


def test_inat_class_is_parent_folder(tmp_path):
    written = synth.make_inat(tmp_path, train_classes=3, test_classes=2, per_class=2)
    assert not (tmp_path / "iNaturalist" / "train2018.json").exists()
    train = load_quietly("inat", tmp_path, "train")
    test = load_quietly("inat", tmp_path, "test")
    assert_matches(train.query, written.train)
    assert_matches(test.query, written.test)
    # Numeric class ids are ordered by value, not as text ("1203" < "7477" < "95").
    assert train.query.classes == ["95", "1203", "7477"]
    assert test.ks == (1, 4, 16, 32) and test.num_classes == 2


def test_digits_offline_split():
    from sklearn.datasets import load_digits

    digits = load_digits()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetCountWarning)  # the standard counts match
        train = load_retrieval_dataset("digits", "unused", "train")
        test = load_retrieval_dataset("digits", "unused", "test")
    for ds, mask, first in ((train, digits.target < 5, 0), (test, digits.target >= 5, 5)):
        assert len(ds.query) == int(mask.sum()) and ds.num_classes == 5 and ds.gallery is None
        assert ds.query.labels.tolist() == (digits.target[mask] - first).tolist()
        assert ds.query.classes == [str(d) for d in range(first, first + 5)]
        source = digits.images[mask]
        for i in (0, len(ds.query) - 1):
            image, label, index, ok = ds.query[i]
            expected = torch.from_numpy(np.rint(source[i] * 255 / 16)).to(torch.uint8)
            assert ok and index == i and image.shape == (3, 8, 8)
            assert torch.equal(image, expected.expand(3, 8, 8))


# ---------------------------------------------------------------- names, layouts


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cub", "CUB_200_2011/images"),
        ("car", "cars196/cars_annos.mat"),
        ("sop", "Stanford_Online_Products/Ebay_test.txt"),
        ("inshop", "Inshop_Clothes/Eval/list_eval_partition.txt"),
        ("inat", "iNaturalist/Inat_dataset_splits/Inaturalist_test_set1.txt"),
    ],
)
def test_missing_layout_names_expected_path(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as error:
        load_retrieval_dataset(name, tmp_path, "test")
    message = str(error.value)
    assert str(tmp_path / expected) in message
    assert "<root>/" in message  # and the layout it belongs to


def test_an_empty_split_names_the_expected_layout(tmp_path):
    (tmp_path / "CUB_200_2011" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"cub test: no images found .*<root>/CUB_200_2011/images"):
        load_retrieval_dataset("cub", tmp_path, "test")
    folder = tmp_path / "Stanford_Online_Products"
    folder.mkdir()
    (folder / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n")  # the header alone
    with pytest.raises(FileNotFoundError, match="sop test: no images found"):
        load_retrieval_dataset("sop", tmp_path, "test")


def test_cars_annotations_without_the_variable_are_a_clear_error(tmp_path):
    from scipy.io import savemat

    (tmp_path / "cars196").mkdir()
    savemat(tmp_path / "cars196" / "cars_annos.mat", {"something_else": np.zeros(3)})
    with pytest.raises(ValueError, match="no 'annotations' variable .*something_else"):
        load_retrieval_dataset("car", tmp_path, "test")


def test_shard_range_checks_the_rank():
    from unicom._distributed import shard_range

    assert [len(shard_range(23, r, 2)) for r in (0, 1)] == [12, 11]
    for rank, world in ((-1, 2), (2, 2), (0, 0)):
        with pytest.raises(ValueError, match="rank"):
            shard_range(23, rank, world)


def test_dataset_names():
    assert set(DATASETS) == {"cub", "car", "sop", "inshop", "inat", "digits"}
    assert set(DATASETS) == set(STANDARD)
    with pytest.raises(ValueError, match=r"available: cub, car.*Did you mean 'inshop'"):
        load_retrieval_dataset("inshp", ".", "test")
    with pytest.raises(ValueError, match="split"):
        load_retrieval_dataset("digits", ".", "val")
    assert load_retrieval_dataset("DIGITS", ".", "test").name == "digits"


# ---------------------------------------------------------------- bad images


@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
def test_bad_image_raises_naming_file(tmp_path, kind):
    bad = synth.make_bad_images(tmp_path)[kind]
    dataset = ImageDataset([bad], [0])
    with pytest.raises(BadImageError, match="--skip-bad-images") as error:
        dataset[0]
    assert error.value.path == str(bad) and str(bad) in str(error.value)
    assert isinstance(error.value, RuntimeError)
    copy = pickle.loads(pickle.dumps(error.value))
    assert (copy.path, copy.reason, str(copy)) == (error.value.path, error.value.reason, str(error.value))


def test_bad_images_skipped_give_placeholder(tmp_path):
    bad = synth.make_bad_images(tmp_path)
    good = tmp_path / "good.png"
    synth.write_image(good, (10, 200, 30), size=(40, 30))
    resize = lambda image: TF.pil_to_tensor(TF.resize(image, [20, 20]))  # noqa: E731
    samples = [good, bad["truncated"], bad["empty"], bad["text"], good]
    dataset = ImageDataset(samples, [0, 1, 2, 3, 4], transform=resize, skip_bad_images=True)
    rows = [dataset[i] for i in range(len(dataset))]
    assert [r[3] for r in rows] == [True, False, False, False, True]
    assert [r[2] for r in rows] == [0, 1, 2, 3, 4] and [r[1] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r[0].shape == (3, 20, 20) for r in rows)
    assert int(rows[1][0].abs().sum()) == 0  # a blank image, never another image
    # Through a loader: the ok mask marks the rows to drop.
    batches = list(sharded_loader(dataset, batch_size=3, num_workers=0, rank=0, world_size=1))
    ok = torch.cat([b[3] for b in batches])
    assert ok.tolist() == [True, False, False, False, True]
    # Without a resizing transform the placeholder is still a (3, H, W) uint8 image.
    image, _, _, ok = ImageDataset([bad["empty"]], [0], skip_bad_images=True)[0]
    assert not ok and image.dtype == torch.uint8 and image.shape[0] == 3


def test_bad_image_in_worker_process(tmp_path):
    bad = synth.make_bad_images(tmp_path)["truncated"]
    loader = sharded_loader(ImageDataset([bad], [0]), batch_size=1, num_workers=1, rank=0, world_size=1)
    with pytest.raises(BadImageError, match="truncated.jpg"):
        list(loader)


def test_in_memory_samples_and_transform():
    arrays = [np.full((5, 7), 9, np.uint8), np.full((5, 7, 3), 200, np.uint8)]
    pil = Image.new("RGBA", (7, 5), (1, 2, 3, 4))
    dataset = ImageDataset([*arrays, pil], [2, 0, 1], transform=lambda im: (im.mode, im.size), names=["a", "b", "c"])
    assert [dataset[i][0] for i in range(3)] == [("RGB", (7, 5))] * 3
    assert dataset.paths == ["a", "b", "c"]
    assert dataset.labels.dtype == torch.long and dataset.labels.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(arrays, [0])


# ---------------------------------------------------------------- sharded loader


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 2, 10])
def test_sharded_loader_covers_every_index_once(world_size, n):
    dataset = ImageDataset([np.full((4, 6), i, np.uint8) for i in range(n)], list(range(n)))
    seen = []
    for rank in range(world_size):
        shard = []
        for images, labels, indices, ok in sharded_loader(dataset, 3, 0, rank, world_size):
            assert images.shape[1:] == (3, 4, 6) and images.dtype == torch.uint8
            assert labels.dtype == indices.dtype == torch.long and ok.dtype == torch.bool and ok.all()
            assert torch.equal(labels, indices) and torch.equal(images[:, 0, 0, 0], indices.to(torch.uint8))
            shard += indices.tolist()
        # This rank's block is contiguous and in order.
        if shard:
            assert shard == list(range(shard[0], shard[0] + len(shard)))
        seen += shard
    assert seen == list(range(n))


def test_sharded_loader_with_workers():
    dataset = ImageDataset([np.full((4, 6), i, np.uint8) for i in range(7)], list(range(7)))
    # Rank 0 in this process, rank 1 through two worker processes: same contract.
    got = [b[2] for rank, workers in ((0, 0), (1, 2)) for b in sharded_loader(dataset, 2, workers, rank, 2)]
    assert torch.cat(got).tolist() == list(range(7))


def test_collate_rejects_mixed_shapes():
    batch = [(torch.zeros(3, 4, 4), 0, 0, True), (torch.zeros(3, 5, 4), 1, 1, True)]
    with pytest.raises(ValueError, match="resizes"):
        collate(batch)


# ---------------------------------------------------------------- integrity of folders and files


@pytest.fixture
def alarm():
    """Fail instead of hanging: a FIFO opened for reading waits for a writer forever."""
    import signal

    def fire(signum, frame):
        raise TimeoutError("hung")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _tree(root: Path, classes: int = 3, per_class: int = 2) -> None:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            synth.write_image(root / f"c{c}" / f"{i}.png", (40 * c, 20 * i, 9), size=(8, 8))


@pytest.mark.parametrize("mutation", ["cycle", "parent", "deep", "file_link", "hard_link", "class_link"])
def test_folder_scans_visit_each_real_file_once(tmp_path, mutation, caplog):
    import os

    root = tmp_path / "images"
    _tree(root)
    expected = load_image_folder(root).paths
    {"cycle": lambda: os.symlink(".", root / "c2" / "loop"),  # ln -s . images/c2/loop
     "parent": lambda: os.symlink("..", root / "c1" / "up"),
     "deep": lambda: ((root / "c0" / "a").mkdir(), os.symlink(root / "c0", root / "c0" / "a" / "back")),
     "file_link": lambda: os.symlink(root / "c0" / "0.png", root / "c0" / "9.png"),
     "hard_link": lambda: os.link(root / "c0" / "0.png", root / "c1" / "9.png"),
     "class_link": lambda: os.symlink(root / "c0", root / "c3")}[mutation]()
    with caplog.at_level("WARNING", logger="unicom.data.folder"):
        dataset = load_image_folder(root)
    assert dataset.paths == expected  # nothing counted twice, nothing lost
    assert "seen before" in caplog.text


def test_only_regular_files_are_images(tmp_path, alarm, caplog):
    import os
    import socket

    root = tmp_path / "images"
    _tree(root)
    os.mkfifo(root / "c1" / "x.jpg")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "c0" / "s.jpg"))
    (root / "c2" / "d.jpg").mkdir()
    os.symlink(root / "nowhere.jpg", root / "c2" / "gone.jpg")
    with caplog.at_level("WARNING", logger="unicom.data.folder"):
        dataset = load_image_folder(root)
    assert len(dataset) == 6 and all(dataset[i][3] for i in range(6))
    assert "not a regular file" in caplog.text and "broken link" in caplog.text
    # Named directly (a listing file), a FIFO is a bad image at once, with or without skipping.
    with pytest.raises(BadImageError, match="x.jpg.*a FIFO"):
        ImageDataset([root / "c1" / "x.jpg"], [0])[0]
    assert not ImageDataset([root / "c1" / "x.jpg"], [0], skip_bad_images=True)[0][3]
    with pytest.raises(BadImageError, match="a folder"):
        ImageDataset([root / "c2" / "d.jpg"], [0])[0]


def _damaged_jpeg(path: Path) -> Path:
    """A JPEG with one bit flipped in its compressed data, of the kind libjpeg warns about
    (``Corrupt JPEG data``) and PIL decodes without a word."""
    from unicom.data.image import jpeg_damage

    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(128, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    data = path.read_bytes()
    start = data.index(b"\xff\xda") + 20
    for i in range(start, len(data) - 2):
        flipped = data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:]
        if jpeg_damage(flipped) is not None:
            path.write_bytes(flipped)
            return path
    raise AssertionError("no damaging flip found")


def test_damaged_jpeg_data_is_found_counted_and_with_strict_a_bad_image(tmp_path):
    pytest.importorskip("simplejpeg")
    from unicom.data.image import check_jpegs

    damaged = _damaged_jpeg(tmp_path / "damaged.jpg")
    Image.open(damaged).load()  # what the check is for: PIL decodes it without a word
    clean = tmp_path / "clean.jpg"
    Image.new("RGB", (32, 24), (200, 10, 10)).save(clean)
    png = tmp_path / "p.png"
    synth.write_image(png, (1, 2, 3))
    samples = [clean, damaged, png, tmp_path / "missing.jpg"]

    dataset = ImageDataset(samples, [0, 1, 2, 3], skip_bad_images=True)
    found = check_jpegs(dataset)
    assert list(found) == [1] and "Corrupt JPEG data" in found[1] and dataset.damaged == found
    assert dataset[1][3]  # by default still decoded, as published: counted and named, not dropped

    strict = ImageDataset(samples, [0, 1, 2, 3], skip_bad_images=True)
    assert list(check_jpegs(strict, strict=True)) == [1]
    assert [strict[i][3] for i in range(3)] == [True, False, True]
    with pytest.raises(BadImageError, match="damaged.jpg.*damaged JPEG data"):
        check_jpegs(ImageDataset(samples, [0, 1, 2, 3]), strict=True)  # before any embedding
