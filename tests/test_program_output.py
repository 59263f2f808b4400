"""What a newcomer sees first: --help and usage errors before torch loads, defaults shown,
results on stdout, logs and warnings on stderr once each, in our words."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("retrieval", "knn", "extract_features", "cluster", "pretrain")
HEAVY = ("torch", "torchvision", "PIL", "faiss", "timm", "open_clip")


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("UNICOM_TRACEBACK", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_help_and_usage_errors_import_no_heavy_module():
    """Each root script run for --help, for a usage error and through its parser with valid flags:
    nothing heavy is imported (the time this saves is measured by hand, not asserted)."""
    result = python(f"""
        import contextlib, io, json, runpy, sys
        from unicom.programs import cluster, extract_features, knn, pretrain, retrieval
        seen = {{}}
        for name in {PROGRAMS!r}:
            for flag in ("--help", "--no-such-flag"):
                sys.argv = [name + ".py", flag]
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    try:
                        runpy.run_path(name + ".py", run_name="__main__")
                    except SystemExit as done:
                        seen[name + " " + flag] = [done.code, out.getvalue(), err.getvalue()]
        retrieval.parse_args(["--eval", "--device", "cpu"])
        knn.parse(knn.get_args_parser(), ["--train-dataset", "a", "--val-dataset", "b", "--decode", "exact"])
        pretrain.parse(pretrain.get_args_parser(), ["--labels", "l", "--epochs", "1"])
        cluster.parse(cluster.get_args_parser(), ["--features", "f", "--output", "o", "--k", "2"])
        extract_features.parse(extract_features.get_args_parser(), ["--inputs", "x", "--output", "o"])
        seen["heavy"] = sorted(m for m in {HEAVY!r} if m in sys.modules)
        print(json.dumps(seen))
    """)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen.pop("heavy") == []
    for name in PROGRAMS:
        code, out, err = seen[f"{name} --help"]
        assert code == 0 and out.startswith(f"usage: {name}") and err == ""
        code, out, err = seen[f"{name} --no-such-flag"]
        assert code == 2 and out == ""
        assert err.startswith(f"{name}: error: ") and err.endswith(" (--help lists the flags)\n")
        assert err.count("\n") == 1  # one line, not the whole usage


def test_a_usage_error_is_one_line_and_status_2():
    result = subprocess.run([sys.executable, str(ROOT / "knn.py"), "--train-dataset", "a", "--val-dataset", "b",
                             "--nb_knn", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["knn: error: argument --nb_knn/--nb-knn: expected a whole number >= 1, "
                                          "got 0 (--help lists the flags)"]


def test_help_shows_the_defaults():
    from unicom.programs import knn, pretrain, retrieval
    from unicom.programs.flags import default_num_workers

    text = " ".join(retrieval.get_args_parser().format_help().split())
    assert "a checkpoint path (default: ViT-B/16, as published)" in text
    assert "--seed SEED (default: 1024)" in text and "--epochs EPOCHS (default: 32)" in text
    assert f"(default: {default_num_workers()})" in text
    assert "(default: data)" in text and text.count("(default: data)") == 1
    text = " ".join(knn.get_args_parser().format_help().split())
    assert "a registered model name or a checkpoint path (default: ViT-B/32)" in text
    text = " ".join(pretrain.get_args_parser().format_help().split())
    assert "--lr LR peak learning rate of the backbone (default: 0.001)" in text  # pretraining's own default
    assert "(default: False)" not in text and "(default: None)" not in text


def test_default_workers_fit_the_machine():
    from unicom.programs import knn, retrieval
    from unicom.programs.flags import default_num_workers

    cpus = len(os.sched_getaffinity(0))
    assert default_num_workers() == min(8, cpus) and default_num_workers(4) == min(4, cpus)
    assert retrieval.parse_args(["--eval"]).num_workers == min(8, cpus)
    assert knn.get_args_parser().parse_args(["--train-dataset", "a", "--val-dataset", "b"]).num_workers == min(4, cpus)


def test_the_flags_offer_the_registries_names():
    """The parsers hold torch-free copies of these names (unicom/programs/flags.py)."""
    from unicom._utils import PRECISIONS
    from unicom.data._pipelines import DECODE_CHOICES
    from unicom.data.registry import available_datasets
    from unicom.losses import MARGIN_GRADIENTS
    from unicom._pretrain.features import FUSIONS, available_sources
    from unicom._pretrain.kmeans import BACKENDS
    from unicom.programs import flags
    from unicom._training import SCHEDULES

    assert flags.PRECISION_CHOICES == ("auto", *PRECISIONS)
    assert flags.DECODE_CHOICES == tuple(DECODE_CHOICES)
    assert flags.MARGIN_GRADIENTS == tuple(MARGIN_GRADIENTS)
    assert flags.SCHEDULES == tuple(SCHEDULES)
    assert flags.DATASET_NAMES == tuple(available_datasets())
    assert flags.KMEANS_BACKENDS == tuple(BACKENDS)
    assert flags.FUSIONS == tuple(FUSIONS)
    assert flags.FEATURE_SOURCES == tuple(available_sources())


def test_warnings_and_faiss_are_said_once_in_our_words(tmp_path):
    """A DatasetCountWarning without the library line that raised it; faiss' loader messages and
    its "please provide at least N training points" replaced by one line of ours."""
    pytest.importorskip("faiss")
    sys.path.insert(0, str(Path(__file__).parent))
    import synthetic_datasets as synth

    written = synth.make_cub(tmp_path / "data", num_classes=4, per_class=2)
    result = python("""
        import sys
        import torch
        from unicom.data import load_retrieval_dataset
        from unicom._pretrain.kmeans import spherical_kmeans
        from unicom.programs.common import setup_logging
        setup_logging()
        for _ in range(2):
            load_retrieval_dataset("cub", sys.argv[1], "test")
        x = torch.nn.functional.normalize(torch.randn(100, 8, generator=torch.Generator().manual_seed(0)), dim=1)
        spherical_kmeans(x, 8, 2, backend="faiss")
        print("done")
    """, str(written.root))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n"  # logs and warnings all on stderr
    err = result.stderr
    assert err.count("cub test: found 4 images, standard 5924") == 1
    assert "warnings.warn" not in err and "return DATASETS" not in err and ".py:" not in err
    assert "Could not load library" not in err and "faiss.loader" not in err
    assert "please provide at least" not in err
    assert err.count("100 points for 8 clusters: k-means wants at least 39 per cluster (312 points)") == 1
