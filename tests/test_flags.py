"""Program flags are checked when they are read: a bad value is a usage error (exit status 2)
that names the flag, before any model, dataset or result is touched."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from test_data import _damaged_jpeg  # noqa: E402

from unicom.metrics import knn_classify  # noqa: E402
from unicom.programs import common, flags, knn, retrieval  # noqa: E402


def _rejects(parse, value):
    with pytest.raises(argparse.ArgumentTypeError):
        parse(value)


@pytest.mark.parametrize("value", ["", "tpu", "mps", "meta", "xla", "cuda:-1", "cpu:x", "cuda:7"])
def test_device_accepts_cpu_and_present_gpus_only(value):
    with pytest.raises(argparse.ArgumentTypeError):
        flags.check_device(value)


def test_device_cuda_without_a_gpu_says_so():
    assert flags.check_device("cpu") == flags.device_option("cpu") == "cpu"
    assert flags.device_option("cuda:7") == "cuda:7"  # the form only: presence is checked after parsing
    if torch.cuda.is_available():
        assert flags.check_device("cuda") == "cuda"
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="no CUDA GPU"):
            flags.check_device("cuda")


def test_numbers_out_of_range():
    for parse, bad, good in [
        (common.positive_float32, ["1e-300", "1e-46", "inf", "nan", "0", "-1", "1e39"], ["0.07", "1e-30"]),
        (common.count_or_all, ["-5", "0", "1.5", "x"], ["-1", "1", "100"]),
        (common.seed, ["-1", str(2**31), "1180591620717411303424", "1.5"], ["0", "1024", str(2**31 - 1)]),
        (common.fraction, ["0", "1.5", "nan"], ["0.1", "1"]),
        (common.non_empty, ["", "  "], ["ViT-B/32"]),
    ]:
        for value in bad:
            _rejects(parse, value)
        for value in good:
            parse(value)


def test_output_folders_are_checked_without_creating_anything(tmp_path):
    (tmp_path / "a_file").write_text("x")
    _rejects(common.output_dir, "")
    _rejects(common.output_dir, str(tmp_path / "a_file"))
    _rejects(common.output_dir, str(tmp_path / "a_file" / "sub" / "deeper"))
    assert common.output_dir(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("program,argv,flag", [
    (retrieval, ["--eval", "--output", "{file}/sub"], "--output"),
    (retrieval, ["--eval", "--output", ""], "--output"),
    (retrieval, ["--eval", "--seed", "1180591620717411303424"], "--seed"),
    (retrieval, ["--eval", "--model_name", ""], "--model_name"),
    (retrieval, ["--eval", "--device", "meta"], "--device"),
    (retrieval, ["--eval", "--device", "cuda:99"], "--device"),  # checked after parsing, still a usage error
    (retrieval, ["--epochs", "-1"], "--epochs"),
    (retrieval, ["--epochs", "0"], "--epochs"),
    (retrieval, ["--sample_rate", "1.5"], "--sample_rate"),
    (knn, ["--temperature", "1e-300"], "--temperature"),
    (knn, ["--n-per-class-list", "-5"], "--n-per-class-list"),
    (knn, ["--n-per-class-list", "0"], "--n-per-class-list"),
    (knn, ["--output-dir", ""], "--output-dir"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(tmp_path, capsys, program, argv, flag):
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    if program is knn:
        argv += ["--train-dataset", str(tmp_path / "none"), "--val-dataset", str(tmp_path / "none")]
    with pytest.raises(SystemExit) as exit_:  # a model name that would fail later, were the flags accepted
        program.main(["--model-name", "no-such-model", *argv])
    assert exit_.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err.splitlines()[-1]


def test_knn_classify_checks_the_temperature_in_its_dtype():
    sims, labels = torch.tensor([[0.9, 0.5]]), torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(sims, labels, 2, temperature=1e-300)  # 0 in float32
    scores = knn_classify(sims.double(), labels, 2, temperature=1e-300)  # float64 holds it
    assert scores[0].tolist() == [1.0, 0.0]


def _tree(root: Path, damaged: bool) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                pixels = np.clip(rng.normal(80 + 90 * c, 20, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg", quality=90)
    if damaged:
        _damaged_jpeg(root / "val" / "b" / "1.jpg")


def test_knn_names_damaged_jpegs_and_strict_mode_leaves_them_out(tmp_path, checkpoint, capsys, one_thread):
    pytest.importorskip("simplejpeg")
    _tree(tmp_path, damaged=True)
    base = ["--train-dataset", str(tmp_path / "train"), "--val-dataset", str(tmp_path / "val"), "--model-name",
            checkpoint, "--num-workers", "0", "--device", "cpu", "--nb_knn", "2", "--output-dir", str(tmp_path / "o")]
    damaged = str(tmp_path / "val" / "b" / "1.jpg")
    assert knn.main(base) == 0
    record = json.loads((tmp_path / "o" / "results_eval_knn.json").read_text())
    assert record["damaged_images"] == [damaged] and record["damaged_images_checked"]
    assert record["skipped_images"] == 0 and record["num_val"] == 6
    assert damaged in capsys.readouterr().err
    with pytest.raises(Exception, match="1.jpg.*damaged JPEG data"):
        knn.main([*base, "--strict-images"])
    assert knn.main([*base, "--strict-images", "--skip-bad-images"]) == 0
    record = json.loads((tmp_path / "o" / "results_eval_knn.json").read_text())
    assert record["skipped_images"] == 1 and record["num_val"] == 5 and record["damaged_images"] == [damaged]
