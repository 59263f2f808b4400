"""``--dataset folder``: a user's own labelled images in each of the three layouts, the errors for
folders that fit none, and retrieval.py (evaluation against a float64 brute force, fine-tuning)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import synthetic_datasets as synth  # noqa: E402

import unicom  # noqa: E402
from unicom.data import load_retrieval_dataset  # noqa: E402
from unicom.programs.retrieval import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--num_workers", "0", "--batch_size", "4", "--device", "cpu"]


def paths(items: list[synth.Item]) -> list[str]:
    return [i.path for i in items]


def labels_by_name(dataset) -> list[str]:
    return [dataset.classes[int(label)] for label in dataset.labels]


# ----------------------------------------------------------------------------- layouts


def test_class_folders_split_in_half(tmp_path) -> None:
    items = synth.make_image_folder(tmp_path, ["b", "a", "d", "c", "e"], per_class=2)  # written unsorted
    test = load_retrieval_dataset("folder", tmp_path, "test")
    train = load_retrieval_dataset("folder", tmp_path, "train")

    assert test.query.paths == paths([i for i in items if i.key in "cde"]) and test.gallery is None
    assert train.query.paths == paths([i for i in items if i.key in "ab"])
    assert labels_by_name(test.query) == [i.key for i in items if i.key in "cde"]
    assert test.query.labels.tolist() == [0, 0, 1, 1, 2, 2] and train.num_classes == 2
    assert test.name == "folder" and test.ks == (1, 2, 4, 8)


def test_train_and_test_folders(tmp_path) -> None:
    train = synth.make_image_folder(tmp_path / "train", ["x", "y"], per_class=2, seed=1)
    test = synth.make_image_folder(tmp_path / "test", ["p", "q", "r"], per_class=2, seed=2)
    assert load_retrieval_dataset("folder", tmp_path, "train").query.paths == paths(train)
    data = load_retrieval_dataset("folder", tmp_path, "test")
    assert data.query.paths == paths(test) and data.gallery is None and data.num_classes == 3


def test_query_and_gallery_folders_share_labels_by_name(tmp_path, caplog) -> None:
    query = synth.make_image_folder(tmp_path / "query", ["b", "c", "z"], per_class=1, seed=1)
    gallery = synth.make_image_folder(tmp_path / "gallery", ["a", "b", "c"], per_class=2, seed=2)
    with caplog.at_level("INFO"):
        data = load_retrieval_dataset("folder", tmp_path, "test")

    assert data.query.paths == paths(query) and data.gallery.paths == paths(gallery)
    assert labels_by_name(data.query) == ["b", "c", "z"]
    assert labels_by_name(data.gallery) == ["a", "a", "b", "b", "c", "c"]
    assert data.query.classes == data.gallery.classes
    assert "query-gallery layout" in caplog.text and "have no gallery image (z)" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"has no train/, which fine-tuning needs"):
        load_retrieval_dataset("folder", tmp_path, "train")
    train = synth.make_image_folder(tmp_path / "train", ["t1", "t2"], per_class=1, seed=3)
    assert load_retrieval_dataset("folder", tmp_path, "train").query.paths == paths(train)


@pytest.mark.parametrize("setup,error,message", [
    ("missing", FileNotFoundError, "is not a folder"),
    ("empty", FileNotFoundError, "holds no class or split folder"),
    ("mixed", ValueError, r"ambiguous: split folders \(train\) beside other folders \(cats, dogs\)"),
    ("test+query", ValueError, "ambiguous: it holds test/ and query/"),
    ("query only", FileNotFoundError, "has query/ but no gallery/"),
    ("one class", ValueError, "holds 1 class folder"),
    ("no images", FileNotFoundError, "no images found"),
    ("train only", FileNotFoundError, "has no test/, which evaluation needs"),
])
def test_folders_that_fit_no_layout(tmp_path, setup: str, error, message: str) -> None:
    root = tmp_path / "data"
    if setup != "missing":
        root.mkdir()
    folders = {"mixed": ["train/a", "cats", "dogs"], "test+query": ["test/a", "query/a", "gallery/a"],
               "query only": ["query/a"], "one class": ["a"], "no images": ["a", "b"], "train only": ["train/a"]}
    for folder in folders.get(setup, []):
        synth.write_image(root / folder / "x.jpg", (10, 20, 30)) if setup != "no images" else (root / folder).mkdir()
    with pytest.raises(error, match=message) as info:
        load_retrieval_dataset("folder", root, "test")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- the program


def brute_force(query: torch.Tensor, q_labels: list[str], gallery: torch.Tensor | None, g_labels: list[str] | None,
                ks=(1, 2, 4, 8)) -> dict[str, float]:
    """Recall@K in float64, a full similarity matrix, each query's own image excluded when the
    queries are their own gallery."""
    q = torch.nn.functional.normalize(query.double(), dim=1)
    g = q if gallery is None else torch.nn.functional.normalize(gallery.double(), dim=1)
    g_labels = q_labels if g_labels is None else g_labels
    sims = q @ g.t()
    if gallery is None:
        sims.fill_diagonal_(-float("inf"))
    order = sims.argsort(dim=1, descending=True, stable=True)
    recall = {}
    for k in ks:
        hits = [any(g_labels[j] == q_labels[i] for j in order[i, :k].tolist()) for i in range(len(q_labels))]
        recall[str(k)] = 100.0 * sum(hits) / len(hits)
    return recall


@pytest.fixture(scope="module")
def embed_files(checkpoint):
    model, transform = unicom.load(checkpoint, device="cpu")

    @torch.no_grad()
    def embed(files: list[str]) -> torch.Tensor:
        return torch.cat([model(transform(Image.open(f).convert("RGB")).unsqueeze(0)) for f in files]).double()

    return embed


@pytest.mark.parametrize("layout", ["classes", "train-test", "query-gallery"])
def test_evaluation_matches_a_float64_brute_force(tmp_path, checkpoint, embed_files, capsys, layout: str) -> None:
    root = tmp_path / "data"
    if layout == "classes":
        items = synth.make_image_folder(root, [f"c{i}" for i in range(6)], per_class=3)
        query, gallery = [i for i in items if i.key >= "c3"], None
    elif layout == "train-test":
        synth.make_image_folder(root / "train", ["t0", "t1"], per_class=2, seed=3)
        query, gallery = synth.make_image_folder(root / "test", ["u0", "u1", "u2"], per_class=3, seed=4), None
    else:
        query = synth.make_image_folder(root / "query", ["a", "b", "c"], per_class=2, seed=1)
        gallery = synth.make_image_folder(root / "gallery", ["a", "b", "c", "d"], per_class=3, seed=2)
    out = tmp_path / "out"
    assert main(["--eval", "--dataset", "folder", "--data-root", str(root), "--model_name", checkpoint,
                 "--output", str(out), *FAST]) == 0
    record = json.loads((out / "results.json").read_text())

    assert f"folder: {layout} layout under {root}" in capsys.readouterr().err  # a log line: stderr
    expected = brute_force(embed_files(paths(query)), [i.key for i in query],
                           None if gallery is None else embed_files(paths(gallery)),
                           None if gallery is None else [i.key for i in gallery])
    assert record["dataset"] == "folder" and record["num_query"] == len(query)
    assert record["num_gallery"] == len(gallery or query)
    assert record["recall"] == pytest.approx(expected, abs=1e-9)


def test_fine_tuning_one_epoch(tmp_path, checkpoint) -> None:
    root = tmp_path / "data"
    synth.make_image_folder(root / "train", ["a", "b", "c"], per_class=4, seed=1)
    synth.make_image_folder(root / "test", ["d", "e"], per_class=3, seed=2)
    out = tmp_path / "run"
    assert main(["--dataset", "folder", "--data-root", str(root), "--model_name", checkpoint, "--output", str(out),
                 *FAST, "--epochs", "1", "--transform", "origin_clip", "--lr", "1e-5"]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["dataset"] == "folder" and record["epoch"] == 1 and record["num_query"] == 6
    assert record["settings"]["dataset"] == "folder"
    unicom.load(str(out / "model_best.pt"), device="cpu")
