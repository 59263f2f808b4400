"""Pretraining on pseudo labels (issue 7, step 3): the streamed (image, pseudo label) input,
the digits pipeline in small (features -> k-means -> pretraining -> zero-shot retrieval),
exact resume after SIGKILL, and two gloo processes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_utils import run_in_processes
from PIL import Image
from synthetic_datasets import write_tar
from torchvision.transforms.functional import pil_to_tensor

import unicom
from unicom.data import load_retrieval_dataset
from unicom._pretrain.dataset import PseudoLabels, PseudoLabelStream, ShardReader
from unicom._pretrain.features import PixelSource, extract_features, load_features
from unicom._pretrain.kmeans import save_clustering
from unicom.programs import cluster, pretrain, retrieval
from unicom.programs.pretrain import _rebatch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: much faster for tiny models on a busy 2-core machine, and the same
    thread count as the subprocess below, so in- and out-of-process runs agree bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the stream


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory) -> tuple[Path, Path, dict[str, int]]:
    """7 tar shards of 1 to 7 samples whose 4x4 images hold their id in every pixel; sample
    ``s003/0001`` is undecodable. Features (pixels) and a clustering with chosen labels:
    id % 5, and -1 (left out) for every id divisible by 7."""
    root = tmp_path_factory.mktemp("ids")
    sid = 0
    for s in range(7):
        members = []
        for i in range(s + 1):
            key = f"s{s:03d}/{i:04d}"
            data = b"not an image" if key == "s003/0001" else png(np.full((4, 4), sid, np.uint8))
            members += [(f"{key}.png", data), (f"{key}.txt", b"caption")]
            sid += 1
        write_tar(root / "in" / f"shard-{s:03d}.tar", members)
    features = root / "features"
    extract_features(PixelSource(size=4), str(root / "in" / "*.tar"), features, batch_size=3)
    _, keys = load_features(features)
    ids = {k: int(k[1:4]) * (int(k[1:4]) + 1) // 2 + int(k[5:]) for k in keys}  # the id written in its pixels
    labels = torch.tensor([-1 if ids[k] % 7 == 0 else ids[k] % 5 for k in keys])
    stats = {"k": 5, "features": str(features)}
    save_clustering(root / "clusters", labels, torch.zeros(5, 48), stats)
    expected = {k: int(label) for k, label in zip(keys, labels)}
    return root, features, expected


def _stream(root: Path, rank: int, world: int, seed: int = 3, buffer: int = 4) -> PseudoLabelStream:
    reader = ShardReader.from_inputs(str(root / "in" / "shard-{000..006}.tar"), pil_to_tensor)
    return PseudoLabelStream(reader, PseudoLabels(root / "clusters"), seed=seed, shuffle_buffer=buffer,
                             rank=rank, world_size=world)


def _read_pass(root: Path, epoch: int, workers: int = 2, world: int = 2, seed: int = 3) -> list[list[tuple[int, int]]]:
    """Per rank, the (id, label) pairs of one pass, read through DataLoaders of ``workers`` workers."""
    out = []
    for rank in range(world):
        stream = _stream(root, rank, world, seed)
        stream.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=workers)
        out.append([(int(x[0, 0, 0]), int(y)) for images, labels in loader for x, y in zip(images, labels)])
    return out


def test_stream_yields_every_labelled_sample_once_per_epoch(id_shards) -> None:
    root, _, expected = id_shards
    labelled = {k: v for k, v in expected.items() if v >= 0}
    # ids from keys: shard s starts at s(s+1)/2
    want = Counter((int(k[1:4]) * (int(k[1:4]) + 1) // 2 + int(k[5:]), v) for k, v in labelled.items())
    assert len(expected) == 27 and len(want) == 24  # 28 samples; id 7 undecodable, 0, 14, 21 left out (-1)
    for epoch in (0, 1):
        per_rank = _read_pass(root, epoch)
        assert all(per_rank), "each process gets samples"
        got = Counter(pair for rank in per_rank for pair in rank)
        assert got == want  # every labelled sample exactly once, with the label of its key
    # deterministic per (seed, epoch); another epoch or seed shuffles differently
    assert _read_pass(root, 0) == _read_pass(root, 0)
    assert _read_pass(root, 0) != _read_pass(root, 1)
    assert _read_pass(root, 0) != _read_pass(root, 0, seed=4)


def test_stream_units_are_dealt_to_processes_then_workers(id_shards) -> None:
    root, _, _ = id_shards
    streams = [_stream(root, rank, 2) for rank in range(2)]
    units = [s.units(w, 2) for s in streams for w in range(2)]
    assert sorted(u for part in units for u in part) == list(range(7))
    assert all(part for part in units)


def test_labels_by_key_per_shard_and_global(id_shards) -> None:
    root, features, expected = id_shards
    labels = PseudoLabels(root / "clusters")  # the features folder read from stats.json
    assert labels.num_classes == 5 and labels.num_samples == 27
    assert labels.shard_labels("shard-002") == {k: v for k, v in expected.items() if k.startswith("s002/")}
    assert labels.shard_labels("elsewhere") is None
    assert labels.labels_for("elsewhere") == expected
    save_clustering(root / "short", torch.zeros(3, dtype=torch.long), torch.zeros(1, 48), {"k": 1})
    with pytest.raises(ValueError, match="27 features"):
        PseudoLabels(root / "short", features)


def _label_table(tmp_path: Path, features: Path, labels: list[int]) -> PseudoLabels:
    save_clustering(tmp_path / "clusters", torch.tensor(labels), torch.zeros(max(labels) + 1, 48),
                    {"k": max(labels) + 1, "features": str(features)})
    return PseudoLabels(tmp_path / "clusters")


def test_stream_reads_a_damaged_tar_up_to_the_damage_as_the_feature_run_did(tmp_path) -> None:
    members = [(f"k{i}.png", png(np.full((4, 4), 10 * i, np.uint8))) for i in range(6)]
    path = write_tar(tmp_path / "in" / "cut.tar", members)
    path.write_bytes(path.read_bytes()[:2600])  # inside k2's data
    manifest = extract_features(PixelSource(size=4), str(path), tmp_path / "features")
    assert manifest["damaged_shards"] == ["cut"] and manifest["num_samples"] == 2
    labels = _label_table(tmp_path, tmp_path / "features", [0, 1])
    stream = PseudoLabelStream(ShardReader.from_inputs(str(path), pil_to_tensor), labels, shuffle_buffer=1)
    assert sorted((int(x[0, 0, 0]), y) for x, y in stream) == [(0, 0), (10, 1)]  # no crash, nothing lost


def test_stream_skips_a_repeated_key_instead_of_giving_it_the_first_ones_label(tmp_path) -> None:
    members = [(f"{k}.png", png(np.full((4, 4), v, np.uint8))) for k, v in (("a", 1), ("b", 2), ("a", 3))]
    path = write_tar(tmp_path / "in" / "s0.tar", members)
    extract_features(PixelSource(size=4), str(path), tmp_path / "features")
    labels = _label_table(tmp_path, tmp_path / "features", [5, 6])
    stream = PseudoLabelStream(ShardReader.from_inputs(str(path), pil_to_tensor), labels, shuffle_buffer=1)
    assert sorted((int(x[0, 0, 0]), y) for x, y in stream) == [(1, 5), (2, 6)]


def test_folder_cut_otherwise_than_in_the_feature_run_still_finds_every_label(tmp_path) -> None:
    """Virtual shards of another size share names with the features shards, not their images."""
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png(np.full((4, 4), 10 * i, np.uint8)))
    extract_features(PixelSource(size=4), str(tmp_path / "imgs"), tmp_path / "features", folder_shard_size=2)
    labels = _label_table(tmp_path, tmp_path / "features", [0, 1, 2, 3, 4, 5])
    for size in (2, 4, 10_000):
        reader = ShardReader.from_inputs(str(tmp_path / "imgs"), pil_to_tensor, folder_shard_size=size)
        stream = PseudoLabelStream(reader, labels, shuffle_buffer=1)
        assert sorted((int(x[0, 0, 0]), y) for x, y in stream) == [(10 * i, i) for i in range(6)], size


def test_rebatch_gives_exact_batches_in_order() -> None:
    parts = [(torch.arange(n0, n1).float()[:, None], torch.arange(n0, n1)) for n0, n1 in [(0, 3), (3, 4), (4, 9)]]
    batches = list(_rebatch(parts, 2))
    assert [b[1].tolist() for b in batches] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # the odd last one is dropped
    assert all(torch.equal(x[:, 0].long(), y) for x, y in batches)


# ----------------------------------------------------------------------------- digits in small


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The demo's first steps, small: the training classes' digits (0-4) as webdataset
    shards, pixel features, 10 k-means pseudo classes (cluster.py)."""
    root = tmp_path_factory.mktemp("digits")
    train = load_retrieval_dataset("digits", root, "train").query
    for s in range(4):
        members = [(f"{train.paths[i]}.png", png(train.samples[i])) for i in range(s, len(train), 4)]
        write_tar(root / "shards" / f"d-{s}.tar", members)
    extract_features(PixelSource(size=8), str(root / "shards" / "d-{0..3}.tar"), root / "features", batch_size=256)
    assert cluster.main(["--features", str(root / "features"), "--k", "10", "--output", str(root / "clusters"),
                         "--device", "cpu"]) == 0
    return root


def argv(digits: Path, output: Path, *extra: str) -> list[str]:
    return ["--train-shards", str(digits / "shards" / "d-{0..3}.tar"), "--labels", str(digits / "clusters"),
            "--input-size", "16", "--patch-size", "4", "--dim", "32", "--depth", "1", "--heads", "2",
            "--embedding-size", "16", "--batch_size", "32", "--samples-per-epoch", "192", "--epochs", "2",
            "--num_workers", "0", "--device", "cpu", "--transform", "origin_clip", "--lr", "2e-3",
            "--shuffle-buffer", "64", "--log-every", "1", "--output", str(output), *extra]


def results(output: Path) -> dict:
    return json.loads((output / "results.json").read_text())


def weights(path: Path) -> dict[str, torch.Tensor]:
    return unicom.load(path, device="cpu")[0].state_dict()


def test_digits_pipeline_in_small(digits, tmp_path) -> None:
    out = tmp_path / "run"
    assert pretrain.main(argv(digits, out, "--epochs", "3", "--eval-dataset", "digits", "--sample_rate", "0.5",
                              "--num_feat", "12")) == 0
    record = results(out)
    assert record["num_classes"] == 10 and record["num_clustered"] == 901 and record["epochs"] == 3
    history = record["history"]
    assert [e["epoch"] for e in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"], history  # it learns the pseudo classes
    assert all(0 < e["recall"]["1"] <= 100 and 0 < e["map_at_r"] <= 100 for e in history)

    # The result is a plain unicom model: it loads, and retrieval.py --eval reproduces the
    # recall recorded after the last epoch.
    model, _ = unicom.load(out / "model_last.pt", device="cpu")
    assert model.config.input_size == 16 and model.config.embedding_size == 16
    assert retrieval.main(["--eval", "--dataset", "digits", "--model_name", str(out / "model_last.pt"), "--output",
                           str(tmp_path / "eval"), "--num_workers", "0", "--device", "cpu", "--batch_size", "256"]) == 0
    evaluated = results(tmp_path / "eval")
    assert evaluated["recall"]["1"] == pytest.approx(history[-1]["recall"]["1"])
    assert evaluated["map_at_r"] == pytest.approx(history[-1]["map_at_r"])

    # 10 pseudo classes in the class centres, not the 5 true ones
    saved = torch.load(out / "checkpoints" / "epoch_0003" / "rank_0.pt", map_location="cpu", weights_only=True)
    assert saved["partial_fc"]["weight"].shape == (10, 16)
    assert saved["step"] == 3 * 6  # 192 samples / 32 per step, 3 epochs


def test_in_memory_dataset_and_folder_inputs_train_too(digits, tmp_path) -> None:
    # --dataset digits: the train split in memory, keys = its names (the tar keys above)
    out = tmp_path / "memory"
    args = argv(digits, out, "--epochs", "1")
    i = args.index("--train-shards")
    del args[i : i + 2]
    assert pretrain.main([*args, "--dataset", "digits"]) == 0
    assert results(out)["history"][0]["step"] == 6
    with pytest.raises(ValueError, match="exactly one of"):
        pretrain.main([*args, "--dataset", "digits", "--train-shards", str(digits / "shards" / "d-0.tar")])


# ----------------------------------------------------------------------------- resume after SIGKILL


def test_killed_run_resumes_to_the_uninterrupted_result(digits, tmp_path) -> None:
    # Random choices in every step (stochastic depth, Partial FC's class and feature
    # sampling), a loader worker, and a checkpoint every 2 steps: the kill comes mid-epoch.
    extra = ["--epochs", "3", "--num_workers", "1", "--drop_path_rate", "0.1", "--num_feat", "12",
             "--sample_rate", "0.5", "--save-every", "2"]
    straight = tmp_path / "straight"
    assert pretrain.main(argv(digits, straight, *extra)) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    log = tmp_path / "killed.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), *argv(digits, killed, *extra)],
                                   cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        latest = killed / "checkpoints" / "latest"
        deadline = time.monotonic() + 120
        while not latest.exists():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    first = latest.read_text().strip()
    assert "step" in first, first  # a mid-epoch checkpoint
    assert not (killed / "checkpoints" / "epoch_0003").exists(), "the run ended before it was killed"

    assert pretrain.main(argv(digits, killed, *extra, "--resume", "auto")) == 0
    a, b = weights(killed / "model_last.pt"), weights(straight / "model_last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def history(out):
        return [(e["epoch"], e["step"]) for e in results(out)["history"]]

    assert history(killed) == history(straight) == [(1, 6), (2, 12), (3, 18)]
    # the same mean losses, the interrupted epoch's included (its first steps' losses travel in the checkpoint)
    assert [e["loss"] for e in results(killed)["history"]] == [e["loss"] for e in results(straight)["history"]]


# ----------------------------------------------------------------------------- two processes


def _main_in_process(rank: int, world_size: int, args: list[str]) -> int:
    return pretrain.main(args)


def test_two_gloo_processes(digits, tmp_path) -> None:
    out = tmp_path / "two"
    # 192 samples per epoch: 3 micro-batches of 32 per process; Partial FC splits the 10 centres 5/5
    codes = run_in_processes(_main_in_process, 2, argv(digits, out, "--sample_rate", "0.5"), init=False,
                             timeout_s=120)
    assert codes == [0, 0]
    record = results(out)
    assert record["world_size"] == 2 and [e["step"] for e in record["history"]] == [3, 6]
    folder = out / "checkpoints" / "epoch_0002"
    shares = [torch.load(folder / f"rank_{r}.pt", map_location="cpu", weights_only=True)["partial_fc"]["weight"]
              for r in (0, 1)]
    assert [s.shape for s in shares] == [(5, 16), (5, 16)]
    assert all(torch.isfinite(v).all() for v in weights(out / "model_last.pt").values() if v.is_floating_point())
