"""``retrieval.py`` fine-tuning end to end: outputs, exact resume after SIGKILL, gradient
accumulation, NaN handling, and several gloo processes, on a tiny model and synthetic CUB."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import synthetic_datasets as synth  # noqa: E402
from dist_utils import run_in_processes  # noqa: E402

import unicom  # noqa: E402
from unicom.data import load_retrieval_dataset  # noqa: E402
from unicom.losses import CombinedMarginLoss, PartialFC  # noqa: E402
from unicom import _training as training  # noqa: E402
from unicom.programs import retrieval  # noqa: E402
from unicom.programs.retrieval import main  # noqa: E402
from unicom.transforms import eval_transform  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::unicom.data.DatasetCountWarning"),
              pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[1]
# Synthetic CUB with 6 classes of 5 images: 15 training images in 3 classes, 15 test images.
TRAIN_IMAGES = 15
METRICS = ("num_query", "num_gallery", "recall", "map_at_r", "r_precision", "num_lone_queries", "skipped_images")
EVAL_FIELDS = {"dataset", "model", "num_query", "num_gallery", "world_size", "recall", "map_at_r", "r_precision",
               "skipped_images", "images_per_second", "seconds"}


@pytest.fixture(scope="module")
def cub(tmp_path_factory) -> synth.Written:
    return synth.make_cub(tmp_path_factory.mktemp("cub"), num_classes=6, per_class=5)


def train_argv(cub: synth.Written, checkpoint: str, output: Path, *extra: str) -> list[str]:
    return ["--dataset", "cub", "--data-root", str(cub.root), "--model_name", checkpoint, "--output", str(output),
            "--num_workers", "0", "--batch_size", "4", "--device", "cpu", "--transform", "origin_clip",
            "--epochs", "2", "--log-every", "1", *extra]


def results(output: Path) -> dict:
    return json.loads((output / "results.json").read_text())


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    model, _ = unicom.load(path, device="cpu")
    return model.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def _main_in_process(rank: int, world_size: int, argv: list[str]) -> dict | None:
    """One torchrun-like process: main() joins the gloo group itself."""
    assert main(argv) == 0
    return results(Path(argv[argv.index("--output") + 1])) if rank == 0 else None


# ----------------------------------------------------------------------------- a run's outputs


def test_run_writes_loadable_models_results_and_a_checkpoint(cub, checkpoint, tmp_path) -> None:
    out = tmp_path / "run"
    assert main(train_argv(cub, checkpoint, out)) == 0

    record = results(out)
    assert EVAL_FIELDS <= set(record)
    assert record["epoch"] == 2 and record["world_size"] == 1 and record["dataset"] == "cub"
    assert record["num_query"] == 15
    assert record["settings"]["epochs"] == 2 and record["settings"]["lr_pfc_weight"] == 10.0  # how it was trained
    last, best = state_dict(out / "model_last.pt"), state_dict(out / "model_best.pt")
    start = state_dict(Path(checkpoint))
    assert any(not torch.equal(last[k], start[k]) for k in start), "training changed nothing"
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())
    assert best.keys() == last.keys()

    folder = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert folder.name == "epoch_0002"
    saved = torch.load(folder / "rank_0.pt", map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["world_size"]) == (2, 1)
    assert_same_weights(saved["model"], last)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0002", "latest"]

    # The final results are those of the final weights: a zero-shot evaluation of
    # model_last.pt gives the same metrics (origin_clip tests with the eval transform).
    assert main(["--eval", "--dataset", "cub", "--data-root", str(cub.root), "--model_name",
                 str(out / "model_last.pt"), "--output", str(tmp_path / "eval"), "--num_workers", "0",
                 "--batch_size", "4", "--device", "cpu"]) == 0
    evaluated = results(tmp_path / "eval")
    assert {k: record[k] for k in METRICS} == {k: evaluated[k] for k in METRICS}


# ----------------------------------------------------------------------------- resume after SIGKILL


@pytest.mark.parametrize("workers,transform", [("0", "origin_clip"), ("1", "timm")])
def test_killed_run_resumes_to_the_uninterrupted_result(cub, checkpoint, tmp_path, workers: str,
                                                        transform: str) -> None:
    # Random choices in every step (stochastic depth, one random feature subset per step;
    # with timm, augmentation in the loader worker), so the RNG states must resume too.
    # Four epochs: three still to run when the kill comes, a wide margin on a busy machine.
    epochs = ["--epochs", "4", "--num_workers", workers, "--transform", transform, "--drop_path_rate", "0.1",
              "--num_feat", "16"]
    straight = tmp_path / "straight"
    assert main(train_argv(cub, checkpoint, straight, *epochs)) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = tmp_path / "killed.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, str(ROOT / "retrieval.py"),
                                    *train_argv(cub, checkpoint, killed, *epochs)],
                                   cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        latest = killed / "checkpoints" / "latest"
        deadline = time.monotonic() + 120
        while not latest.exists():  # the first epoch's checkpoint is complete: kill mid-run
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()  # no-op once it is dead; never leave it running if the test fails
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "results.json").exists(), "the run ended before it was killed"

    assert main(train_argv(cub, checkpoint, killed, *epochs, "--resume", "auto")) == 0
    assert_same_weights(state_dict(killed / "model_last.pt"), state_dict(straight / "model_last.pt"))
    a, b = results(killed), results(straight)
    assert {k: a[k] for k in (*METRICS, "epoch", "best_recall_at_1")} == \
           {k: b[k] for k in (*METRICS, "epoch", "best_recall_at_1")}


# ----------------------------------------------------------------------------- gradient accumulation


def test_gradient_accumulation_counts_optimiser_steps(cub, checkpoint, tmp_path) -> None:
    # 15 images, batch 4: 3 micro-batches an epoch; accumulating 2, the last step of an
    # epoch takes the odd one: 2 optimiser steps an epoch, 4 in 2 epochs.
    out = tmp_path / "acc"
    assert main(train_argv(cub, checkpoint, out, "--gradient_acc", "2")) == 0
    saved = torch.load(out / "checkpoints" / "epoch_0002" / "rank_0.pt", map_location="cpu", weights_only=True)
    assert saved["step"] == 4
    assert saved["scheduler"]["last_epoch"] == 4
    steps = {float(s["step"]) for s in saved["optimizer"]["state"].values()}  # AdamW's own count
    assert steps == {4.0}
    # Each micro-batch ran forward in training mode once: BatchNorm counted 2 x 3 batches.
    tracked = [v for k, v in saved["model"].items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == 6 for v in tracked)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


class _StopAfterFirstCheckpoint(Exception):
    pass


def test_gradient_accumulation_sums_micro_batch_gradients(cub, checkpoint, tmp_path, monkeypatch) -> None:
    """One SGD step over 3 accumulated micro-batches of 5 uses the mean of their gradients.

    SGD with momentum stores the first step's gradient as its momentum buffer, so the
    checkpoint holds the gradient the program applied; it is recomputed here by hand, one
    micro-batch at a time (BatchNorm sees each micro-batch's own statistics, as in the run).
    """
    real_save = training.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _StopAfterFirstCheckpoint

    # 10 epochs of one optimiser step each, so that the one-cycle schedule's warm-up starts
    # at lr / 25 (with fewer steps than 1 / pct_start it has no warm-up); stop after the first.
    monkeypatch.setattr(training, "save_checkpoint", save_then_stop)
    out = tmp_path / "sgd"
    lr = 0.05
    with pytest.raises(_StopAfterFirstCheckpoint):
        main(train_argv(cub, checkpoint, out, "--epochs", "10", "--batch_size", "5", "--gradient_acc", "3",
                        "--optimizer", "sgd", "--lr", str(lr)))
    saved = torch.load(out / "checkpoints" / "epoch_0001" / "rank_0.pt", map_location="cpu", weights_only=True)
    assert saved["step"] == 1
    lr_backbone, lr_centres = (g["initial_lr"] for g in saved["optimizer"]["param_groups"])
    assert (lr_backbone, lr_centres) == pytest.approx((lr / 25, lr * 10.0 / 25))  # one-cycle's first lr

    model, _ = unicom.load(checkpoint, device="cpu")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [saved["optimizer"]["state"][i]["momentum_buffer"] for i in range(len(params) + 1)]

    # The class centres before the step, from after it: p1 = p0 - lr * g.
    pfc = PartialFC(CombinedMarginLoss(32.0, 1.0, 0.3, 0.0), 32, 3)
    with torch.no_grad():
        pfc.weight.copy_(saved["partial_fc"]["weight"] + lr_centres * buffers[-1])
    train = load_retrieval_dataset("cub", cub.root, "train", eval_transform(32)).query
    batches = retrieval.EpochSampler(TRAIN_IMAGES, 5, seed=1024).batches(0)
    assert len(batches) == 3
    for batch in batches:
        images = torch.stack([train[i][0] for i in batch])
        labels = train.labels[batch]
        (pfc(model(images), labels) / 3).backward()

    for i, (p, g) in enumerate(zip([*params, pfc.weight], buffers)):
        # float32 noise, mostly from recovering the centres: ~1e-6 of the largest entry, and
        # ~1e-7 for biases that feed a BatchNorm (their true gradient is zero).
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-6), i
    # The backbone moved by exactly one step along that gradient.
    named = dict(model.named_parameters())
    for (name, p), g in zip(((n, p) for n, p in named.items() if p.requires_grad), buffers):
        assert torch.allclose(saved["model"][name], p.detach() - lr_backbone * g, rtol=1e-5, atol=1e-7), name


def test_a_short_last_accumulation_group_applies_its_own_mean_gradient(cub, checkpoint, tmp_path, monkeypatch):
    """15 images in batches of 5 with --gradient_acc 2: the epoch's second step accumulates one
    micro-batch, whose gradient must be applied whole (the mean over the group), not halved."""
    assert [training.group_size(m, 2, 3) for m in (1, 2, 3)] == [2, 2, 1]
    assert [training.group_size(m, 3, 7) for m in range(1, 8)] == [3, 3, 3, 3, 3, 3, 1]
    captured = []
    real_step = training.optimizer_step

    def spy(optimizer, scheduler, scaler):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        captured.append(([p.detach().clone() for p in params], [p.grad.clone() for p in params]))
        real_step(optimizer, scheduler, scaler)
        if len(captured) == 2:
            raise _StopAfterFirstCheckpoint

    monkeypatch.setattr(training, "optimizer_step", spy)
    with pytest.raises(_StopAfterFirstCheckpoint):
        main(train_argv(cub, checkpoint, tmp_path / "out", "--batch_size", "5", "--gradient_acc", "2",
                        "--optimizer", "sgd", "--lr", "0.05"))
    before, applied = captured[1]
    model, _ = unicom.load(checkpoint, device="cpu")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    pfc = PartialFC(CombinedMarginLoss(32.0, 1.0, 0.3, 0.0), 32, 3)
    with torch.no_grad():
        for p, value in zip([*params, pfc.weight], before):
            p.copy_(value)
    train = load_retrieval_dataset("cub", cub.root, "train", eval_transform(32)).query
    batch = retrieval.EpochSampler(TRAIN_IMAGES, 5, seed=1024).batches(0)[2]  # the lone micro-batch of step 2
    pfc(model(torch.stack([train[i][0] for i in batch])), train.labels[batch]).backward()
    for p, g in zip([*params, pfc.weight], applied):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-7)


# ----------------------------------------------------------------------------- NaN


def test_absurd_learning_rate_stops_with_a_nan_error(cub, checkpoint, tmp_path) -> None:
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="NaN"):
        main(train_argv(cub, checkpoint, out, "--lr", "1e6"))
    assert not (out / "results.json").exists() and not (out / "model_last.pt").exists()


class _NaNAfter:
    """A transform whose images turn NaN after ``count`` calls (a dataset that goes bad)."""

    def __init__(self, transform, count: int) -> None:
        self.transform, self.count = transform, count

    def __call__(self, image):
        x = self.transform(image)
        self.count -= 1
        return x if self.count >= 0 else torch.full_like(x, float("nan"))


def test_nan_in_a_later_epoch_keeps_the_last_good_checkpoint(cub, checkpoint, tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    saved: dict[str, str] = {}
    real_load, real_save = retrieval.load_retrieval_dataset, training.save_checkpoint

    def load_going_bad(name, root, split, transform, skip):
        # The first epoch reads 3 batches of 4 training images; NaN from the second epoch on.
        return real_load(name, root, split, _NaNAfter(transform, 12) if split == "train" else transform, skip)

    def save_and_hash(folder, *args, **kwargs):
        real_save(folder, *args, **kwargs)
        saved.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).iterdir()})

    monkeypatch.setattr(retrieval, "load_retrieval_dataset", load_going_bad)
    monkeypatch.setattr(training, "save_checkpoint", save_and_hash)
    with pytest.raises(FloatingPointError, match="NaN.*epoch 2"):
        main(train_argv(cub, checkpoint, out, "--epochs", "3"))
    monkeypatch.undo()

    # The first epoch's checkpoint is untouched and still the latest; nothing later was written.
    assert (out / "checkpoints" / "latest").read_text().strip() == "epoch_0001"
    assert [Path(p).name for p in saved] == ["rank_0.pt"]
    assert {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in saved} == saved
    assert not (out / "results.json").exists()
    first = torch.load(out / "checkpoints" / "epoch_0001" / "rank_0.pt", map_location="cpu", weights_only=True)
    assert first["epoch"] == 1
    assert_same_weights(state_dict(out / "model_last.pt"), first["model"])
    # ... and a run resumes from it once the data is fixed.
    assert main(train_argv(cub, checkpoint, out, "--epochs", "3", "--resume", "auto")) == 0
    assert results(out)["epoch"] == 3


# ----------------------------------------------------------------------------- several processes


@pytest.fixture(scope="module")
def two_process_run(cub, checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    record = run_in_processes(_main_in_process, 2, train_argv(cub, checkpoint, out), init=False, timeout_s=120)[0]
    assert record["world_size"] == 2
    return out


def test_two_processes_fine_tune_end_to_end(two_process_run: Path) -> None:
    out = two_process_run
    record = results(out)
    assert record["epoch"] == 2 and record["num_query"] == 15
    folder = out / "checkpoints" / "epoch_0002"
    assert sorted(p.name for p in folder.iterdir()) == ["rank_0.pt", "rank_1.pt"]
    # Each process keeps its own share of the 3 class centres: [0, 2) and [2, 3).
    shares = [torch.load(folder / f"rank_{r}.pt", map_location="cpu", weights_only=True)["partial_fc"]["weight"]
              for r in (0, 1)]
    assert [s.shape[0] for s in shares] == [2, 1]
    assert all(torch.isfinite(v).all() for v in state_dict(out / "model_last.pt").values() if v.is_floating_point())


def test_two_processes_report_what_the_saved_model_scores(two_process_run: Path, cub, tmp_path) -> None:
    """Without SyncBatchNorm (CPUs) each process's BatchNorm statistics drift apart after DDP's
    last copy; the evaluation must use one model, the one saved (rank 0's)."""
    assert main(["--eval", "--dataset", "cub", "--data-root", str(cub.root), "--model_name",
                 str(two_process_run / "model_last.pt"), "--output", str(tmp_path), "--num_workers", "0",
                 "--batch_size", "4", "--device", "cpu"]) == 0
    assert {k: results(tmp_path)[k] for k in METRICS} == {k: results(two_process_run)[k] for k in METRICS}


def test_resuming_a_finished_two_process_run_reports_it_again(two_process_run: Path, cub, checkpoint,
                                                             tmp_path, monkeypatch) -> None:
    """Every process embeds its share of the test set (rank 0 alone would wait for the others)."""
    import shutil

    monkeypatch.setenv("UNICOM_DIST_TIMEOUT_MIN", "0.5")  # a hang fails in 30 s instead of 2 hours

    out = tmp_path / "run"
    shutil.copytree(two_process_run, out)
    (out / "results.json").unlink()
    record = run_in_processes(_main_in_process, 2, train_argv(cub, checkpoint, out, "--resume", "auto"),
                              init=False, timeout_s=60, wall_timeout_s=90)[0]
    assert {k: record[k] for k in METRICS} == {k: results(two_process_run)[k] for k in METRICS}


def test_resume_with_another_world_size_is_an_error(two_process_run: Path, cub, checkpoint, tmp_path) -> None:
    folder = two_process_run / "checkpoints" / "epoch_0002"
    with pytest.raises(RuntimeError, match="written by 2 processes"):
        main(train_argv(cub, checkpoint, tmp_path, "--resume", str(folder)))


# ----------------------------------------------------------------------------- published settings


def _reference_runs() -> dict[tuple[str, str], dict]:
    """The published scripts' settings (tests/fixtures/published_runs.json, with its source): (dataset, model) ->
    processes, batch_size, epochs, lr, margin_loss_m2, output_dim and (where the script names it) transform."""
    return {(run.pop("dataset"), run.pop("model")): run for run in _published_scripts()["runs"]}


def _published_scripts() -> dict:
    return json.loads((Path(__file__).parent / "fixtures" / "published_runs.json").read_text())


def test_published_runs_are_the_reference_scripts() -> None:
    reference = _reference_runs()
    assert set(reference) == set(retrieval.PUBLISHED_RUNS)
    for key, run in reference.items():
        assert {k: retrieval.PUBLISHED_RUNS[key][k] for k in run} == run, key
    common = _published_scripts()["common"]
    assert {k: retrieval.PUBLISHED_COMMON[k] for k in common} == common


def test_published_flag_fills_in_what_the_command_line_leaves_out() -> None:
    from unicom.programs.retrieval import parse_args

    args = parse_args(["--dataset", "sop", "--model_name", "ViT-L/14", "--published", "--lr", "2e-5"])
    assert (args.batch_size, args.epochs, args.margin_loss_m2, args.output_dim, args.transform) == \
        (16, 64, 0.3, 768, "origin_clip")
    assert (args.num_feat, args.sample_rate, args.lr_pfc_weight, args.margin_loss_s, args.seed) == \
        (512, 1.0, 10.0, 32.0, 1024)
    assert args.lr == 2e-5  # given explicitly: it wins
    plain = parse_args(["--dataset", "sop", "--model_name", "ViT-L/14"])
    assert (plain.lr, plain.num_feat, plain.lr_pfc_weight) == (1e-4, None, 10.0)


@pytest.mark.parametrize("argv,message", [
    (["--published", "--dataset", "cub", "--model_name", "ViT-B/32"], "no published fine-tuning run for --dataset cub"),
    (["--published", "--dataset", "sop", "--model_name", "ViT-B/32", "--eval"], "--eval has none to set"),
])
def test_published_flag_errors(argv: list[str], message: str, capsys) -> None:
    from unicom.programs.retrieval import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_published_run_on_another_global_batch_is_reported(caplog) -> None:
    from unicom.programs.retrieval import _compare_with_published, parse_args

    args = parse_args(["--dataset", "sop", "--model_name", "ViT-L/14", "--published"])  # 4 x 16 published
    with caplog.at_level("WARNING", logger="unicom.retrieval"):
        _compare_with_published(args)
    assert "4 process(es) x 16 images (64 per step); this one 1 x 16 (16)" in caplog.text
    caplog.clear()
    args = parse_args(["--dataset", "sop", "--model_name", "ViT-L/14", "--published", "--batch_size", "64"])
    with caplog.at_level("WARNING", logger="unicom.retrieval"):
        _compare_with_published(args)
    assert caplog.text == ""
