"""The programs' ``--decode`` and ``--compile`` options, end to end on synthetic datasets in
their real on-disk formats: exact pipelines give the published results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import synthetic_datasets as synth  # noqa: E402
from pipeline_files import IGNORE_DECODER_DEPRECATION  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), IGNORE_DECODER_DEPRECATION]

RESULT_KEYS = ("recall", "map_at_r", "r_precision", "num_query")


def _retrieval(checkpoint: str, root: Path, out: Path, *flags: str) -> dict:
    from unicom.programs.retrieval import main

    argv = ["--eval", "--dataset", "cub", "--data-root", str(root), "--model_name", checkpoint, "--output", str(out),
            "--num_workers", "0", "--device", "cpu", *flags]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.filterwarnings("ignore::unicom.data.DatasetCountWarning")
def test_retrieval_program_decode_option(checkpoint, tmp_path):
    written = synth.make_cub(tmp_path / "data", num_classes=6, per_class=3)
    records = {decode: _retrieval(checkpoint, written.root, tmp_path / decode, "--batch_size", "4",
                                  "--decode", decode)
               for decode in ("exact", "device-resize", "turbo")}
    assert {k: records["device-resize"][k] for k in RESULT_KEYS} == {k: records["exact"][k] for k in RESULT_KEYS}
    assert {k: records["turbo"][k] for k in RESULT_KEYS} == {k: records["exact"][k] for k in RESULT_KEYS}
    assert records["device-resize"]["num_query"] == records["exact"]["num_query"] == 9
    assert records["turbo"]["decode"] == "turbo" and records["exact"]["precision"] == "fp32"
    assert records["exact"]["device"] == "cpu" and records["exact"]["compile"] is False


def test_knn_program_decode_option(checkpoint, tmp_path):
    from unicom.programs.knn import main

    synth.make_image_folder(tmp_path / "train", ["ant", "bee", "cat"], per_class=3)
    synth.make_image_folder(tmp_path / "val", ["ant", "bee"], per_class=2, seed=1)
    results = {}
    for decode in ("exact", "turbo"):
        out = tmp_path / decode
        argv = ["--train-dataset", str(tmp_path / "train"), "--val-dataset", str(tmp_path / "val"),
                "--model-name", checkpoint, "--output-dir", str(out), "--num-workers", "0", "--batch-size", "4",
                "--device", "cpu", "--nb_knn", "1", "3", "--decode", decode]
        assert main(argv) == 0
        results[decode] = json.loads((out / "results_eval_knn.json").read_text())
    assert results["turbo"]["knn"] == results["exact"]["knn"]  # the decoders agree: the same pixels
    assert results["exact"]["num_train"] == 9 and results["exact"]["num_val"] == 4
    assert results["turbo"]["decode"] == "turbo" and results["turbo"]["precision"] == "fp32"


def test_compile_flag_is_for_evaluation_only(checkpoint, tmp_path):
    from unicom.programs.retrieval import main

    with pytest.raises(ValueError, match="--compile applies to --eval"):
        main(["--dataset", "cub", "--data-root", str(tmp_path), "--model_name", checkpoint, "--compile",
              "--device", "cpu", "--output", str(tmp_path / "out")])


@pytest.mark.filterwarnings("ignore::unicom.data.DatasetCountWarning")
def test_retrieval_program_compiled_model(checkpoint, tmp_path):
    """--compile (torch.compile through load()) embeds as the eager model does (inductor on the CPU)."""
    written = synth.make_cub(tmp_path / "data", num_classes=6, per_class=3)
    records = {flags: _retrieval(checkpoint, written.root, tmp_path / str(len(flags)), "--batch_size", "8", *flags)
               for flags in ((), ("--compile",))}
    assert {k: records[("--compile",)][k] for k in RESULT_KEYS} == {k: records[()][k] for k in RESULT_KEYS}
