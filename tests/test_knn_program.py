"""``knn.py`` end to end: small ImageFolder trees, a tiny checkpoint, real gloo processes.

Accuracies are checked against an independent reference (``reference.py``): a float64
brute-force weighted vote on embeddings of each file computed one at a time through the
published pixels and the published model graph, with labels taken from the class folder names.
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

sys.path.insert(0, str(Path(__file__).parent))

import synthetic_datasets as synth  # noqa: E402
from dist_utils import run_in_processes  # noqa: E402
from reference import embed_files, published_model, ref_knn  # noqa: E402

from unicom.data import BadImageError  # noqa: E402
from unicom.programs.knn import few_shot_subset, main  # noqa: E402

# Train: 7 classes, 23 images (uneven shards over 2 and 3 processes). Val: 3 of those
# classes, so val folder indices (0..2) differ from the training labels of the same names,
# and top-5 of 7 classes is not a given.
TRAIN = {"ant": 4, "bee": 4, "cat": 3, "dog": 3, "elk": 3, "fox": 3, "gnu": 3}
VAL = {"bee": 3, "cat": 3, "dog": 3}
# Close class colours and noise of +-40: neighbours often, not always, share a class, so
# accuracies lie between chance and 100% and depend on k and the temperature.
_OFFSETS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (-1, -1, -1), (0, 0, 0)]
COLOURS = {name: tuple(120 + 30 * d for d in offset) for name, offset in zip([*sorted(TRAIN), "yak"], _OFFSETS)}
KS = ["1", "3", "5", "30", "100"]  # 30 and 100 exceed the 23 training images
FAST = ["--num-workers", "0", "--batch-size", "4", "--device", "cpu"]
RESULT_KEYS = ("num_train", "num_val", "temperature", "knn", "few_shot", "skipped_images")


def write_tree(root: Path, counts: dict[str, int], seed: int) -> list[synth.Item]:
    """``<root>/<class>/<class>_<j>.jpg``: one colour per class plus noise, so that neighbours
    tend to share a class; plus a macOS ``._`` file per class that must not count as an image.
    Returns the images in ImageFolder order."""
    rng = np.random.default_rng(seed)
    items = []
    for name in sorted(counts):
        for j in range(counts[name]):
            colour = tuple(int(c + rng.integers(-40, 41)) for c in COLOURS[name])
            path = root / name / f"{name}_{j:04d}.jpg"
            synth.write_image(path, colour)
            items.append(synth.Item(str(path), name, colour))
        (root / name / f"._{name}_0000.jpg").write_bytes(synth.APPLEDOUBLE)
    return items


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, list[synth.Item], Path, list[synth.Item]]:
    root = tmp_path_factory.mktemp("imagefolder")
    return root / "train", write_tree(root / "train", TRAIN, 0), root / "val", write_tree(root / "val", VAL, 1)


@pytest.fixture(scope="module")
def bad_train(tmp_path_factory, trees) -> tuple[Path, str]:
    """The training tree plus a truncated JPEG sorted among the 'bee' images."""
    root = tmp_path_factory.mktemp("bad") / "train"
    shutil.copytree(trees[0], root)
    bad = synth.make_bad_images(tmp_path_factory.mktemp("files"))["truncated"]
    target = root / "bee" / "bee_0002a.jpg"
    shutil.copy(bad, target)
    return root, str(target)


@pytest.fixture(scope="module")
def embed(checkpoint):
    """Embed files one at a time, independently of the library: (N, D) float64."""
    model = published_model(checkpoint)
    return lambda items: embed_files(model, [item.path for item in items], n_px=32)


def knn_accuracy(train, train_labels, test, test_labels, ks, num_classes, temperature=0.07) -> dict:
    return ref_knn(train, train_labels, test, test_labels, list(ks), temperature, num_classes)


def labels_of(items: list[synth.Item]) -> torch.Tensor:
    """Training labels by class NAME: the sorted training class folders."""
    index = {name: i for i, name in enumerate(sorted(TRAIN))}
    return torch.tensor([index[item.key] for item in items])


def percent(table: dict) -> dict:
    return {str(k): {m: pytest.approx(100.0 * v, abs=1e-9) for m, v in r.items()} for k, r in table.items()}


def run_knn(train: Path, val: Path, checkpoint: str, output: Path, *extra: str) -> dict:
    argv = ["--train-dataset", str(train), "--val-dataset", str(val), "--model-name", checkpoint,
            "--output-dir", str(output), "--nb_knn", *KS, *FAST, *extra]
    try:
        assert main(argv) == 0
    except Exception as error:
        # A DataLoader iterator that raised lives on in the traceback; collected later in a
        # reference cycle it waits 5 s per worker. Freed now it shuts its workers down at once.
        traceback.clear_frames(error.__traceback__)
        raise
    return json.loads((output / "results_eval_knn.json").read_text())


def _main_in_process(rank: int, world_size: int, argv: list[str]) -> dict | None:
    """One torchrun-like process: main() joins the gloo group itself."""
    assert main(argv) == 0
    if rank != 0:
        return None
    return json.loads((Path(argv[argv.index("--output-dir") + 1]) / "results_eval_knn.json").read_text())


def same_results(a: dict, b: dict) -> dict:
    return {k: a.get(k) for k in RESULT_KEYS} == {k: b.get(k) for k in RESULT_KEYS}


# ----------------------------------------------------------------------------- results


def test_results_equal_knn_accuracy_on_brute_force_embeddings(trees, checkpoint, embed, tmp_path) -> None:
    train_dir, train_items, val_dir, val_items = trees
    record = run_knn(train_dir, val_dir, checkpoint, tmp_path)

    assert {"model", "num_train", "num_val", "temperature", "world_size", "knn"} <= set(record)
    assert record["model"] == checkpoint and record["world_size"] == 1 and record["temperature"] == 0.07
    assert (record["num_train"], record["num_val"]) == (23, 9)
    assert list(record["knn"]) == KS
    assert record["skipped_images"] == 0 and "few_shot" not in record

    train_f, val_f = embed(train_items), embed(val_items)
    train_l, val_l = labels_of(train_items), labels_of(val_items)
    expected = knn_accuracy(train_f, train_l, val_f, val_l, ks=[int(k) for k in KS], temperature=0.07,
                            num_classes=len(TRAIN))
    assert record["knn"] == percent(expected)
    # k beyond the training set: every training image votes.
    assert record["knn"]["30"] == record["knn"]["100"]
    # Guard: labelling val by its own folder order (bee=0, cat=1, dog=2) scores otherwise,
    # so a program that ignored the folder names would fail here.
    wrong = knn_accuracy(train_f, train_l, val_f, val_l - 1, ks=[int(k) for k in KS], num_classes=len(TRAIN))
    assert all(wrong[k]["top1"] < expected[k]["top1"] for k in expected)
    assert any(r["top5"] < 1.0 for r in expected.values())


def test_temperature_changes_the_vote(trees, checkpoint, embed, tmp_path) -> None:
    train_dir, train_items, val_dir, val_items = trees
    record = run_knn(train_dir, val_dir, checkpoint, tmp_path, "--temperature", "0.5")
    assert record["temperature"] == 0.5
    expected = knn_accuracy(embed(train_items), labels_of(train_items), embed(val_items), labels_of(val_items),
                            ks=[int(k) for k in KS], temperature=0.5, num_classes=len(TRAIN))
    assert record["knn"] == percent(expected)
    default = knn_accuracy(embed(train_items), labels_of(train_items), embed(val_items), labels_of(val_items),
                           ks=[int(k) for k in KS], num_classes=len(TRAIN))
    assert default != expected  # guard: this data tells the two temperatures apart


def test_val_class_absent_from_train_is_an_error(trees, checkpoint, tmp_path) -> None:
    val = tmp_path / "val"
    write_tree(val, {"bee": 2, "yak": 2}, seed=2)
    with pytest.raises(ValueError, match=r"\['yak'\].*not among the 7 training classes"):
        run_knn(trees[0], val, checkpoint, tmp_path / "out")


def test_missing_folder_is_named(trees, checkpoint, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        run_knn(tmp_path / "nowhere", trees[2], checkpoint, tmp_path / "out")


def test_gather_on_cpu_in_small_chunks_gives_identical_results(trees, checkpoint, tmp_path) -> None:
    train_dir, _, val_dir, _ = trees
    plain = run_knn(train_dir, val_dir, checkpoint, tmp_path / "plain")
    streamed = run_knn(train_dir, val_dir, checkpoint, tmp_path / "streamed", "--gather-on-cpu",
                       "--train-chunk-rows", "5", "--chunk-size", "2")
    assert same_results(streamed, plain)


def test_few_shot_subsets(trees, checkpoint, embed, tmp_path, capsys) -> None:
    train_dir, train_items, val_dir, val_items = trees
    record = run_knn(train_dir, val_dir, checkpoint, tmp_path, "--n-per-class-list", "1", "2", "--n-tries", "2")
    assert list(record["few_shot"]) == ["1", "2"]
    # The ks up to n, and n itself.
    assert list(record["few_shot"]["1"]) == ["1"] and list(record["few_shot"]["2"]) == ["1", "2"]
    # ... and the output says so, once per n, on stderr; the tables go to stdout
    out, err = capsys.readouterr()
    capped = [line for line in err.splitlines() if "k is capped" in line]
    assert len(capped) == 2 and capped[0].endswith("few-shot with 1 per class: k is capped at 1, so 3, 5, 30, "
                                                   "100-NN are not evaluated there (evaluated: 1-NN)")
    assert "k is capped" not in out and "per class    1-NN  top-1" in out

    train_f, val_f = embed(train_items), embed(val_items)
    train_l, val_l = labels_of(train_items), labels_of(val_items)
    for n in (1, 2):
        tries = []
        for t in range(2):  # the program's subsets: seed + try
            mask = few_shot_subset(train_l, torch.ones(len(train_l), dtype=torch.bool), n, seed=t)
            assert torch.bincount(train_l[mask], minlength=len(TRAIN)).tolist() == [n] * len(TRAIN)
            tries.append(knn_accuracy(train_f[mask], train_l[mask], val_f, val_l, ks=range(1, n + 1),
                                      num_classes=len(TRAIN)))
        mean = {k: {m: sum(r[k][m] for r in tries) / 2 for m in ("top1", "top5")} for k in range(1, n + 1)}
        assert record["few_shot"][str(n)] == percent(mean)


# ----------------------------------------------------------------------------- processes


@pytest.mark.parametrize("world_size", [2, 3])
def test_identical_results_for_any_number_of_processes(trees, checkpoint, tmp_path, world_size: int) -> None:
    train_dir, _, val_dir, _ = trees
    extra = ["--n-per-class-list", "-1", "2", "--n-tries", "2"]
    single = run_knn(train_dir, val_dir, checkpoint, tmp_path / "single", *extra)
    argv = ["--train-dataset", str(train_dir), "--val-dataset", str(val_dir), "--model-name", checkpoint,
            "--output-dir", str(tmp_path / "multi"), "--nb_knn", *KS, *FAST, *extra]
    if world_size == 3:
        argv += ["--gather-on-cpu", "--train-chunk-rows", "3"]
    records = run_in_processes(_main_in_process, world_size, argv, init=False, timeout_s=120)
    assert records[1:] == [None] * (world_size - 1)
    assert records[0]["world_size"] == world_size
    assert same_results(records[0], single)


# ----------------------------------------------------------------------------- bad images


def test_bad_image_stops_the_run_naming_the_file(bad_train, trees, checkpoint, tmp_path) -> None:
    train_dir, bad = bad_train
    with pytest.raises(BadImageError, match=re.escape(bad)):
        run_knn(train_dir, trees[2], checkpoint, tmp_path)
    assert not (tmp_path / "results_eval_knn.json").exists()


def test_skip_bad_images(bad_train, trees, checkpoint, embed, tmp_path) -> None:
    train_dir, _ = bad_train
    _, train_items, val_dir, val_items = trees
    record = run_knn(train_dir, val_dir, checkpoint, tmp_path / "one", "--skip-bad-images", "--num-workers", "1")
    assert record["skipped_images"] == 1 and record["num_train"] == 23
    # The good images score exactly as without the bad file: nothing substituted for it.
    expected = knn_accuracy(embed(train_items), labels_of(train_items), embed(val_items), labels_of(val_items),
                            ks=[int(k) for k in KS], num_classes=len(TRAIN))
    assert record["knn"] == percent(expected)

    argv = ["--train-dataset", str(train_dir), "--val-dataset", str(val_dir), "--model-name", checkpoint,
            "--output-dir", str(tmp_path / "two"), "--nb_knn", *KS, *FAST, "--skip-bad-images"]
    two = run_in_processes(_main_in_process, 2, argv, init=False, timeout_s=120)[0]
    assert same_results(two, record)
