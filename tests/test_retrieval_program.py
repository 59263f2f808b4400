"""``retrieval.py --eval`` end to end: synthetic benchmark trees, a tiny checkpoint, real processes.

Every metric the program writes is checked against ``unicom.metrics.retrieval_metrics`` run
on embeddings this file computes itself, one image at a time, straight from the files.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import synthetic_datasets as synth  # noqa: E402
from dist_utils import run_in_processes  # noqa: E402

import unicom  # noqa: E402
from unicom.data import BadImageError  # noqa: E402
from unicom.metrics import retrieval_metrics  # noqa: E402
from unicom.programs.retrieval import main  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::unicom.data.DatasetCountWarning"),
              pytest.mark.usefixtures("one_thread")]

# Synthetic CUB: 10 classes, the last 5 test, 5 images each: 25 test images, a count that
# splits unevenly over 2 (13 + 12) and 3 (9 + 8 + 8) processes.
CUB_CLASSES, CUB_PER_CLASS = 10, 5
REQUIRED = {"dataset", "model", "num_query", "num_gallery", "world_size", "recall", "map_at_r", "r_precision",
            "skipped_images", "images_per_second", "seconds"}
METRICS = ("num_query", "num_gallery", "recall", "map_at_r", "r_precision", "num_lone_queries", "skipped_images")
FAST = ["--num_workers", "0", "--batch_size", "4", "--device", "cpu"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cub(tmp_path_factory) -> synth.Written:
    return synth.make_cub(tmp_path_factory.mktemp("cub"), num_classes=CUB_CLASSES, per_class=CUB_PER_CLASS)


@pytest.fixture(scope="module")
def cub_bad(tmp_path_factory) -> tuple[synth.Written, str]:
    """The CUB tree plus a truncated JPEG in a test class folder, sorted among its images."""
    written = synth.make_cub(tmp_path_factory.mktemp("cub_bad"), num_classes=CUB_CLASSES, per_class=CUB_PER_CLASS)
    bad = synth.make_bad_images(tmp_path_factory.mktemp("bad"))["truncated"]
    folder = Path(written.test[7].path).parent
    target = folder / (Path(written.test[7].path).stem + "a.jpg")  # between images 7 and 8 of the split
    shutil.copy(bad, target)
    return written, str(target)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Embed files one at a time with the checkpoint: (N, D) float64 features."""
    model, transform = unicom.load(checkpoint, device="cpu")

    @torch.no_grad()
    def embed(paths: list[str]) -> torch.Tensor:
        images = []
        for path in paths:
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
        return torch.cat([model(x.unsqueeze(0)) for x in images]).double()

    return embed


def encode(keys: list[str], *more: list[str]) -> list[torch.Tensor]:
    """Contiguous labels by sorted class key, one encoding over all lists (as the loaders do)."""
    classes = sorted({k for seq in (keys, *more) for k in seq})
    index = {k: i for i, k in enumerate(classes)}
    return [torch.tensor([index[k] for k in seq]) for seq in (keys, *more)]


def run_eval(data_root, checkpoint: str, output: Path, *extra: str, dataset: str = "cub") -> dict:
    argv = ["--eval", "--dataset", dataset, "--data-root", str(data_root), "--model_name", checkpoint,
            "--output", str(output), *FAST, *extra]
    try:
        assert main(argv) == 0
    except Exception as error:
        release_frames(error)
        raise
    return json.loads((output / "results.json").read_text())


def release_frames(error: BaseException) -> None:
    """Drop the locals of the frames an error passed through.

    A DataLoader iterator that raised lives on in its traceback; collected later as part of
    a reference cycle, its worker queues may already be torn down and it waits 5 s per
    worker for them to exit. Freed now, while intact, it shuts its workers down at once.
    """
    traceback.clear_frames(error.__traceback__)


def assert_metrics_equal(record: dict, expected: dict) -> None:
    """The JSON record (percent) against retrieval_metrics fractions."""
    assert record["num_query"] == expected["num_query"]
    assert record["num_gallery"] == expected["num_gallery"]
    assert record["recall"] == {str(k): pytest.approx(100.0 * v, abs=1e-9) for k, v in expected["recall"].items()}
    assert record["map_at_r"] == pytest.approx(100.0 * expected["map_at_r"], abs=1e-9)
    assert record["r_precision"] == pytest.approx(100.0 * expected["r_precision"], abs=1e-9)


def _main_in_process(rank: int, world_size: int, argv: list[str]) -> dict | None:
    """One torchrun-like process: main() joins the gloo group itself (unicom._distributed.setup)."""
    assert main(argv) == 0
    if rank != 0:
        return None
    index = argv.index("--output") + 1
    return json.loads((Path(argv[index]) / "results.json").read_text())


# ----------------------------------------------------------------------------- results and wiring


def test_cub_results_equal_metrics_on_brute_force_embeddings(cub, checkpoint, reference, tmp_path) -> None:
    record = run_eval(cub.root, checkpoint, tmp_path)

    assert REQUIRED <= set(record)
    assert record["dataset"] == "cub" and record["model"] == checkpoint and record["world_size"] == 1
    assert list(record["recall"]) == ["1", "2", "4", "8"]
    assert record["skipped_images"] == 0
    assert record["images_per_second"] > 0 and record["seconds"] > 0

    features = reference([item.path for item in cub.test])
    (labels,) = encode([item.key for item in cub.test])
    expected = retrieval_metrics(features, labels, ks=(1, 2, 4, 8))
    assert expected["num_query"] == expected["num_gallery"] == CUB_PER_CLASS * (CUB_CLASSES - CUB_CLASSES // 2)
    assert_metrics_equal(record, expected)


def test_inshop_query_searches_gallery(checkpoint, reference, tmp_path) -> None:
    written = synth.make_inshop(tmp_path / "data", train_items=2, test_items=4, per_item=2, gallery_only_items=2)
    record = run_eval(written.root, checkpoint, tmp_path / "out", dataset="inshop")

    query_labels, gallery_labels = encode([i.key for i in written.test], [i.key for i in written.gallery])
    expected = retrieval_metrics(reference([i.path for i in written.test]), query_labels,
                                 reference([i.path for i in written.gallery]), gallery_labels,
                                 ks=(1, 10, 20, 30, 40, 50))
    assert (record["num_query"], record["num_gallery"]) == (8, 12)
    assert record["dataset"] == "inshop"
    assert list(record["recall"]) == ["1", "10", "20", "30", "40", "50"]
    assert_metrics_equal(record, expected)


def test_cars_alias(checkpoint, reference, tmp_path) -> None:
    written = synth.make_cars(tmp_path / "data", num_classes=6, per_class=3)
    record = run_eval(written.root, checkpoint, tmp_path / "out", dataset="cars")

    assert record["dataset"] == "car"
    # Cars classes are numbers: the loader orders them by value, as int keys do here.
    (labels,) = encode([int(i.key) for i in written.test])
    assert_metrics_equal(record, retrieval_metrics(reference([i.path for i in written.test]), labels))


def test_digits_runs_without_a_data_root(checkpoint, tmp_path) -> None:
    record = run_eval(tmp_path / "nothing_here", checkpoint, tmp_path / "out", "--batch_size", "128",
                      dataset="digits")
    assert record["dataset"] == "digits"
    assert record["num_query"] == record["num_gallery"] == 896  # digits 5-9
    recall = [record["recall"][k] for k in ("1", "2", "4", "8")]
    assert all(0.0 <= r <= 100.0 for r in recall) and recall == sorted(recall)
    assert 0.0 < record["map_at_r"] <= 100.0


def test_num_feat_uses_the_first_dimensions(cub, checkpoint, reference, tmp_path) -> None:
    record = run_eval(cub.root, checkpoint, tmp_path, "--num_feat", "16")

    features = reference([item.path for item in cub.test])
    (labels,) = encode([item.key for item in cub.test])
    expected = retrieval_metrics(features[:, :16], labels)
    # Guard: the full embedding scores differently, so a program ignoring --num_feat fails.
    full = retrieval_metrics(features, labels)
    assert (full["map_at_r"], full["recall"]) != (expected["map_at_r"], expected["recall"])
    assert_metrics_equal(record, expected)

    # A few lines of float64 brute force for Recall@1 on the first 16 dimensions.
    f = torch.nn.functional.normalize(features[:, :16], dim=1)
    sims = f @ f.t()
    sims.fill_diagonal_(-float("inf"))
    recall_at_1 = (labels[sims.argmax(dim=1)] == labels).double().mean().item()
    assert record["recall"]["1"] == pytest.approx(100.0 * recall_at_1, abs=1e-9)


# ----------------------------------------------------------------------------- processes


@pytest.mark.parametrize("world_size", [2, 3])
def test_metrics_identical_for_any_number_of_processes(cub, checkpoint, tmp_path, world_size: int) -> None:
    single = run_eval(cub.root, checkpoint, tmp_path / "single")
    argv = ["--eval", "--dataset", "cub", "--data-root", str(cub.root), "--model_name", checkpoint,
            "--output", str(tmp_path / "multi"), *FAST]
    records = run_in_processes(_main_in_process, world_size, argv, init=False, timeout_s=120)

    record = records[0]
    assert records[1:] == [None] * (world_size - 1)
    assert record["world_size"] == world_size and single["world_size"] == 1
    # Exactly equal: each image is embedded once, gathered in dataset order, searched alike.
    assert {k: record[k] for k in METRICS} == {k: single[k] for k in METRICS}


# ----------------------------------------------------------------------------- bad images and errors


def test_bad_image_stops_the_run_naming_the_file(cub_bad, checkpoint, tmp_path) -> None:
    written, bad = cub_bad
    with pytest.raises(BadImageError, match=re.escape(bad)):
        run_eval(written.root, checkpoint, tmp_path)
    assert not (tmp_path / "results.json").exists()
    # Through DataLoader worker processes too: the error is rebuilt in the main process.
    with pytest.raises(BadImageError, match=re.escape(bad)):
        run_eval(written.root, checkpoint, tmp_path, "--num_workers", "2")


def test_skip_bad_images_leaves_them_out(cub_bad, checkpoint, reference, tmp_path) -> None:
    written, _ = cub_bad
    # One worker process here: the loader path the real runs take.
    record = run_eval(written.root, checkpoint, tmp_path, "--skip-bad-images", "--num_workers", "1")

    assert record["skipped_images"] == 1
    assert record["num_query"] == record["num_gallery"] == len(written.test)
    # The good images score exactly as if the bad file were not there (nothing substituted).
    (labels,) = encode([item.key for item in written.test])
    assert_metrics_equal(record, retrieval_metrics(reference([item.path for item in written.test]), labels))


def test_skip_bad_images_in_two_processes(cub_bad, checkpoint, tmp_path) -> None:
    written, _ = cub_bad
    single = run_eval(written.root, checkpoint, tmp_path / "single", "--skip_bad_images")
    argv = ["--eval", "--dataset", "cub", "--data-root", str(written.root), "--model_name", checkpoint,
            "--output", str(tmp_path / "multi"), "--skip-bad-images", *FAST]
    record = run_in_processes(_main_in_process, 2, argv, init=False, timeout_s=120)[0]
    assert record["skipped_images"] == 1 and record["num_query"] == len(written.test)
    assert {k: record[k] for k in METRICS} == {k: single[k] for k in METRICS}


def test_missing_layout_names_the_expected_path(checkpoint, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "CUB_200_2011" / "images"))):
        run_eval(tmp_path, checkpoint, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        run_eval(tmp_path, checkpoint, tmp_path / "out", dataset="inshop")


def test_unknown_dataset_lists_the_available_ones(checkpoint, tmp_path) -> None:
    with pytest.raises(ValueError, match="cub, car, sop, inshop, inat, digits"):
        run_eval(tmp_path, checkpoint, tmp_path / "out", dataset="birds")


def test_unknown_model_lists_the_available_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match=re.escape(str(unicom.available_models()))):
        run_eval(tmp_path, "ViT-Q/99", tmp_path / "out", dataset="digits")


# ----------------------------------------------------------------------------- visualisation


def test_visualize_writes_a_grid_marking_right_and_wrong(cub, checkpoint, reference, tmp_path) -> None:
    from unicom._visualize import BLUE, GREEN, RED

    run_eval(cub.root, checkpoint, tmp_path, "--visualize", "3", "--seed", "7")
    image = Image.open(tmp_path / "retrieval_examples.png").convert("RGB")
    tile, top = 128, 8  # retrieval_grid's defaults: a query column, a gap of tile // 4, 8 results
    assert image.size == ((1 + top) * tile + tile // 4, 3 * tile)

    # Which queries (the program's seed) and which of their top 8 share their label, by brute force.
    features = torch.nn.functional.normalize(reference([item.path for item in cub.test]), dim=1)
    (labels,) = encode([item.key for item in cub.test])
    picked = torch.randperm(len(labels), generator=torch.Generator().manual_seed(7))[:3]
    pixels = np.asarray(image)
    for row, q in enumerate(picked.tolist()):
        sims = features @ features[q]
        sims[q] = -float("inf")
        neighbours = sims.argsort(descending=True, stable=True)[:top]
        y = row * tile + 2  # inside the top frame of each tile in this row
        assert tuple(pixels[y, 2]) == BLUE
        for c, n in enumerate(neighbours.tolist()):
            x = (c + 1) * tile + tile // 4 + 2
            assert tuple(pixels[y, x]) == (GREEN if labels[n] == labels[q] else RED), (row, c)
