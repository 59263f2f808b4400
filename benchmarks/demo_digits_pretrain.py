"""Cluster discrimination pretraining shown on scikit-learn's digits, offline, on the CPU.

    python benchmarks/demo_digits_pretrain.py --work /tmp/digits_demo

1. The training classes' images (digits 0-4) are written to a folder of PNGs; their true
   labels are never used to make pseudo labels.
2. ``extract_features.py --source pixels``: one raw-pixel feature per image.
3. ``cluster.py --k K``: K pseudo classes by spherical k-means.
4. ``pretrain.py``: a small ViT from random weights on the pseudo labels (Partial FC).
5. ``retrieval.py --eval --dataset digits``: zero-shot Recall@1 and MAP@R on the held-out
   classes 5-9, side by side with the same architecture at random initialisation, supervised
   fine-tuning on the true labels 0-4 (``retrieval.py`` without ``--eval``) from the random
   initialisation and from the pretrained model, and ablations of Partial FC's class
   sampling (sample_rate) and feature sampling (num_feat).

Every step is the library's program, called through its ``main(argv)``; the commands are
printed as they run, so each can be repeated from a shell.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unicom.checkpoint import save_model  # noqa: E402  (after the sys.path line)
from unicom.data import load_retrieval_dataset  # noqa: E402
from unicom.programs import cluster, extract_features, pretrain, retrieval  # noqa: E402


def run(name: str, main, argv: list[str]) -> float:
    print(f"$ python {name}.py {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    code = main(argv)
    if code != 0:
        raise SystemExit(f"{name}.py failed with exit code {code}")
    return time.perf_counter() - start


def metrics(output: Path) -> tuple[float, float]:
    record = json.loads((output / "results.json").read_text())
    return record["recall"]["1"], record["map_at_r"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="digits_pretrain_demo", help="folder for every output")
    p.add_argument("--k", type=int, default=32, help="pseudo classes")
    p.add_argument("--epochs", type=int, default=30, help="pretraining epochs")
    p.add_argument("--finetune-epochs", type=int, default=10, help="supervised fine-tuning epochs")
    p.add_argument("--sample-rate", type=float, default=0.1, help="Partial FC class sampling of the main run")
    p.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.getLogger().setLevel(logging.WARNING)
    work = Path(args.work)
    arch = ["--input-size", "32", "--patch-size", "8", "--dim", "64", "--depth", "2", "--heads", "4",
            "--embedding-size", "64"]
    cpu = ["--device", "cpu", "--num_workers", "0"]

    # 1. the training classes' images, keys digits/train/<index>
    train = load_retrieval_dataset("digits", work, "train").query
    for image, name in zip(train.samples, train.paths):
        path = work / "images" / f"{name}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    seconds = {}
    # 2-3. features from raw pixels, K pseudo classes
    seconds["features"] = run("extract_features", extract_features.main, [
        "--source", "pixels", "--pixel-size", "8", "--inputs", str(work / "images"), "--output",
        str(work / "features"), "--num-workers", "0", "--device", "cpu"])
    seconds["cluster"] = run("cluster", cluster.main, [
        "--features", str(work / "features"), "--k", str(args.k), "--output", str(work / "clusters"),
        "--seed", str(args.seed), "--device", "cpu"])
    stats = json.loads((work / "clusters" / "stats.json").read_text())
    pseudo = np.load(work / "clusters" / "labels.npy")
    # for the report only: how well the pseudo classes match the true digits
    from sklearn.metrics import normalized_mutual_info_score

    keys = [line for f in sorted((work / "features").glob("keys_*.txt")) for line in f.read_text().split("\n")[:-1]]
    truth = dict(zip(train.paths, train.labels.tolist()))
    nmi = normalized_mutual_info_score([truth[k] for k in keys], pseudo)

    # 4. pretraining on the pseudo labels
    base = ["--train-shards", str(work / "images"), "--labels", str(work / "clusters"), *arch, *cpu,
            "--batch_size", "64", "--epochs", str(args.epochs), "--lr", "1e-3", "--transform", "origin_clip",
            "--seed", str(args.seed), "--log-every", "1000"]
    runs = {f"pseudo labels, sample_rate {args.sample_rate}": ["--sample_rate", str(args.sample_rate)]}
    if args.ablations:
        other = 1.0 if args.sample_rate != 1.0 else 0.1
        runs[f"pseudo labels, sample_rate {other}"] = ["--sample_rate", str(other)]
        runs[f"pseudo labels, sample_rate {args.sample_rate}, num_feat 32 of 64"] = [
            "--sample_rate", str(args.sample_rate), "--num_feat", "32"]
    rows: list[tuple[str, float, float, float]] = []

    # the random initialisation every run starts from (pretrain.py builds the same one from --seed)
    init = work / "random_init.pt"
    save_model(pretrain.build_model(pretrain.get_args_parser().parse_args(base)), init)
    evaluate = ["--eval", "--dataset", "digits", *cpu, "--batch_size", "256"]
    run("retrieval", retrieval.main, [*evaluate, "--model_name", str(init), "--output", str(work / "eval_init")])
    rows.append(("random initialisation (no training)", *metrics(work / "eval_init"), 0.0))

    finetune = ["--dataset", "digits", *cpu, "--batch_size", "64", "--epochs", str(args.finetune_epochs),
                "--lr", "1e-3", "--weight_decay", "0.05", "--transform", "origin_clip", "--seed", str(args.seed),
                "--log-every", "1000"]
    t = run("retrieval", retrieval.main, [*finetune, "--model_name", str(init), "--output", str(work / "ft_init")])
    rows.append(("supervised, true labels 0-4, from random init", *metrics(work / "ft_init"), t))

    main_run = None
    for i, (name, extra) in enumerate(runs.items()):
        out = work / f"pretrain_{i}"
        t = run("pretrain", pretrain.main, [*base, *extra, "--output", str(out)])
        run("retrieval", retrieval.main, [*evaluate, "--model_name", str(out / "model_last.pt"), "--output",
                                          str(out / "eval")])
        rows.append((name, *metrics(out / "eval"), t))
        main_run = main_run or out
    t = run("retrieval", retrieval.main, [*finetune, "--model_name", str(main_run / "model_last.pt"), "--output",
                                          str(work / "ft_pretrained")])
    rows.append(("pseudo-label pretraining, then supervised 0-4", *metrics(work / "ft_pretrained"), t))

    print(f"\ndigits: {stats['n']} training images (classes 0-4, labels unused) -> {stats['k']} pseudo classes "
          f"(sizes {stats['smallest']}-{stats['largest']}, NMI with the true digits {nmi:.3f}); "
          f"zero-shot retrieval on the 896 test images of classes 5-9")
    print("ViT: input 32, patch 8, dim 64, depth 2, 4 heads, embedding 64; "
          f"{args.epochs} pretraining epochs, {args.finetune_epochs} fine-tuning epochs; CPU, fp32\n")
    print(f"| {'model':<58} | Recall@1 | MAP@R | train s |")
    print(f"|{'-' * 60}|---------:|------:|--------:|")
    for name, r1, map_r, t in rows:
        print(f"| {name:<58} | {r1:8.2f} | {map_r:5.2f} | {t:7.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
