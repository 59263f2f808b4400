"""The command-line entry points: bad input ends with a one-line error and status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "UNICOM_TRACEBACK"}
    environment.update(env)
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          env=environment, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("args,expected", [
    (["--eval", "--dataset", "cubb", "--model_name", "CHECKPOINT"], "Did you mean 'cub'"),
    (["--eval", "--dataset", "digits", "--model_name", "ViT-B/33"], "Did you mean 'ViT-B/32'"),
    (["--eval", "--dataset", "digits", "--model_name", "ViT-B/32"], "UNICOM_OFFLINE is set"),
])
def test_retrieval_bad_input_is_one_line(tmp_path, checkpoint, args, expected):
    args = [checkpoint if a == "CHECKPOINT" else a for a in args]
    result = run("retrieval.py", *args, "--device", "cpu", UNICOM_OFFLINE="1", UNICOM_CACHE_DIR=str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and expected in result.stderr
    assert "Traceback" not in result.stderr


def test_knn_missing_folder(tmp_path, checkpoint):
    result = run("knn.py", "--train-dataset", str(tmp_path / "nope"), "--val-dataset", str(tmp_path / "nope"),
                 "--model-name", checkpoint, "--device", "cpu")
    assert result.returncode == 2 and "nope" in result.stderr and "Traceback" not in result.stderr


def test_traceback_on_request(tmp_path):
    result = run("retrieval.py", "--eval", "--dataset", "cubb", "--model_name", "x.pt", "--device", "cpu",
                 UNICOM_TRACEBACK="1", UNICOM_CACHE_DIR=str(tmp_path))
    assert result.returncode == 1 and "Traceback" in result.stderr


@pytest.mark.parametrize("flag,value", [("--nb_knn", "0"), ("--temperature", "nan"), ("--temperature", "-1"),
                                        ("--n-tries", "0"), ("--train-chunk-rows", "-1")])
def test_knn_bad_values_are_usage_errors(tmp_path, flag, value, capsys):
    from unicom.programs import knn

    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and status 2, before anything loads
        knn.main(["--train-dataset", str(tmp_path), "--val-dataset", str(tmp_path), flag, value])
    assert exit_info.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_retrieval_num_feat_is_checked(tmp_path, checkpoint, capsys):
    from unicom.programs import retrieval

    with pytest.raises(SystemExit) as exit_info:
        retrieval.main(["--eval", "--dataset", "digits", "--model_name", checkpoint, "--num_feat", "0"])
    assert exit_info.value.code == 2 and "argument --num_feat" in capsys.readouterr().err
    result = run("retrieval.py", "--eval", "--dataset", "digits", "--model_name", checkpoint, "--num_feat", "999",
                 "--device", "cpu", "--output", str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: --num_feat 999 is larger than")


def test_a_bad_image_in_a_worker_process_is_one_line(tmp_path, checkpoint):
    """PyTorch re-raises a worker's error with the worker's whole traceback as its message."""
    import synthetic_datasets as synth

    written = synth.make_cub(tmp_path / "data", num_classes=4, per_class=3)
    bad = synth.make_bad_images(tmp_path / "bad")["truncated"]
    target = sorted((written.root / "CUB_200_2011" / "images").glob("*/*.jpg"))[-1]  # a test class
    target.write_bytes(Path(bad).read_bytes())
    result = run("retrieval.py", "--eval", "--dataset", "cub", "--data-root", str(written.root), "--model_name",
                 checkpoint, "--device", "cpu", "--num_workers", "2", "--output", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot decode image {target}"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("program,argv", [
    ("cluster", ["--features", "x", "--output", "y", "--k", "3", "--niter", "-1"]),
    ("cluster", ["--features", "x", "--output", "y", "--k", "3", "--chunk-size", "0"]),
    ("cluster", ["--features", "x", "--output", "y", "--k", "3", "--max-points-per-centroid", "0"]),
    ("extract_features", ["--source", "pixels", "--inputs", "x", "--output", "y", "--batch-size", "0"]),
    ("extract_features", ["--source", "pixels", "--inputs", "x", "--output", "y", "--pixel-size", "0"]),
    ("retrieval", ["--eval", "--dataset", "digits", "--visualize", "-1"]),
])
def test_pretraining_and_visualize_flags_are_checked(program, argv, capsys):
    import importlib

    module = importlib.import_module(f"unicom.programs.{program}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2 and "expected a whole number" in capsys.readouterr().err


def test_library_checks_behind_those_flags():
    from unicom._pretrain.features import PixelSource, extract_features
    from unicom._pretrain.kmeans import spherical_kmeans

    x = torch.nn.functional.normalize(torch.randn(20, 4), dim=1)
    for options in (dict(niter=0), dict(chunk_size=-1), dict(max_points_per_centroid=0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            spherical_kmeans(x, 3, backend="torch", **options)
    with pytest.raises(ValueError, match="pixel size"):
        PixelSource(size=0)
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(PixelSource(size=2), "nowhere", "nowhere", batch_size=0)


def test_unicom_command_embeds_and_searches_as_json(tmp_path, checkpoint):
    """`python -m unicom` (the `unicom` console script) end to end: embed, then search --json."""
    import json

    from collection_images import altered, draw, write_folder

    write_folder(tmp_path / "images", range(6))
    altered(draw(2), "jpeg").save(tmp_path / "query.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "unicom"]
    embed = subprocess.run([*base, "embed", str(tmp_path / "images"), "--output", str(tmp_path / "col"), "--model",
                            checkpoint, "--device", "cpu", "--num-workers", "0"], capture_output=True, text=True,
                           env=env, timeout=120, cwd=ROOT)
    assert embed.returncode == 0 and "embedded 6, unchanged 0, skipped 0, deleted 0" in embed.stdout, embed.stderr
    search = subprocess.run([*base, "search", str(tmp_path / "col"), str(tmp_path / "query.png"), "id:0", "-k", "2",
                             "--json", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120,
                            cwd=ROOT)
    assert search.returncode == 0, search.stderr
    lines = [json.loads(line) for line in search.stdout.splitlines()]
    assert [line["query"] for line in lines] == [str(tmp_path / "query.png"), "id:0"]
    assert lines[0]["results"][0]["image_path"].endswith("img_0002.png") and len(lines[0]["results"]) == 2
    assert lines[1]["results"][0]["id"] == 0 and set(lines[1]["results"][0]) == {"id", "image_path", "score"}


@pytest.mark.parametrize("args,expected", [
    (["search", "NOPE", "id:1"], "is not a collection: no manifest.json"),
    (["embed", "NOPE/missing", "--output", "NOPE/col", "--model", "CHECKPOINT"], "not found: expected a folder"),
    (["index", "NOPE"], "is not a collection"),
])
def test_unicom_bad_input_is_one_line(tmp_path, checkpoint, capsys, args, expected):
    from unicom.cli import main

    args = [a.replace("NOPE", str(tmp_path / "nope")).replace("CHECKPOINT", checkpoint) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1


@pytest.mark.parametrize("args", [["dedup", "COL", "--threshold", "2"], ["index", "COL", "--memory", "lots"],
                                  ["search", "COL", "id:1", "-k", "0"]])
def test_unicom_bad_values_are_usage_errors(args, capsys):
    from unicom.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "error: argument" in capsys.readouterr().err
