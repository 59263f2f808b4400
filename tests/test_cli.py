"""The command-line entry points: bad input ends with a one-line error and status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
