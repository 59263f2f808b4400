"""Cluster discrimination pretraining: a ViT from random weights on pseudo labels (step 3).

    python pretrain.py --train-shards 'laion/{00000..00099}.tar' --labels clusters/ \\
        --model ViT-B/32 --sample_rate 0.1 --output runs/pretrain
    torchrun --nproc_per_node 8 pretrain.py --train-shards 'laion/*.tar' --labels clusters/ ...
    python pretrain.py --train-shards images/ --labels clusters/ --model ViT-B/32 --input-size 32 ...
    python pretrain.py --dataset digits --labels clusters/ --input-size 32 --patch-size 4 --dim 64 ...

Input: webdataset tar shards or one folder of images (streamed, see
unicom/_pretrain/dataset.py), or the training split of a registered dataset (``--dataset``,
its true labels never read). Pseudo labels are looked up by sample key: ``--labels`` is the
output of cluster.py (labels.npy, stats.json), and the keys come from the features folder it
clustered (``--features``; default: the one recorded in stats.json).

Training: margin softmax with Partial FC (``--sample_rate`` of the class centres and
``--num_feat`` of the embedding dimensions per step), DDP with summed gradients, mixed
precision (``--precision``), gradient accumulation, AdamW, a one-cycle or cosine schedule.
An epoch is ``--samples-per-epoch`` samples (default: every clustered sample once) in whole
batches on every process; a process whose shards run out first reads them again in a new
shuffle, so every process takes the same number of steps.

Outputs: ``<output>/model_last.pt`` (loads with ``unicom.load``; evaluate it with
``retrieval.py --eval`` or ``knn.py``), ``results.json`` (per-epoch mean loss, and
Recall@K / MAP@R on ``--eval-dataset`` when given), and checkpoints as in fine-tuning:
``--resume auto`` continues a killed run (exactly, from epoch checkpoints; from
``--save-every`` checkpoints the data order is exact and random augmentation is exact with
``--num_workers`` > 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

# Only the flags at import: --help and usage errors answer before torch loads (see .flags);
# each function below imports what it uses.
from .flags import (DATASET_NAMES, SCHEDULES, add_loader_args, add_runtime_args, add_train_args, output_dir, parse,
                    program_parser, seed)

if TYPE_CHECKING:
    import torch

    from ..model import VisionTransformer
    from .._pretrain.dataset import PseudoLabels, PseudoLabelStream

logger = logging.getLogger("unicom.pretrain")

# Explicit architecture flags -> VisionTransformer keyword; each overrides the --model config.
ARCH_FLAGS = {"input_size": "input_size", "patch_size": "patch_size", "dim": "dim", "depth": "depth",
              "heads": "num_heads", "embedding_size": "embedding_size"}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = program_parser("pretrain", __doc__, add_help)
    g = p.add_argument_group("model (random weights)")
    g.add_argument("--model", default="ViT-B/32", help="registered architecture to start from")
    g.add_argument("--input-size", "--input_size", dest="input_size", type=int, default=None)
    g.add_argument("--patch-size", "--patch_size", dest="patch_size", type=int, default=None)
    g.add_argument("--dim", type=int, default=None, help="transformer width")
    g.add_argument("--depth", type=int, default=None, help="transformer blocks")
    g.add_argument("--heads", type=int, default=None, help="attention heads")
    g.add_argument("--embedding-size", "--embedding_size", dest="embedding_size", type=int, default=None)

    g = p.add_argument_group("input")
    g.add_argument("--train-shards", "--train_shards", dest="train_shards", nargs="+", default=None,
                   help="webdataset tar shards (paths, 'shards/{000..099}.tar', globs) or one folder of images")
    g.add_argument("--dataset", default=None,
                   help=f"instead: the train split of a registered dataset ({', '.join(DATASET_NAMES)}), "
                        "its labels unused")
    g.add_argument("--data-root", "--data_root", dest="data_root", default="data")
    g.add_argument("--labels", required=True, help="output folder of cluster.py (labels.npy, stats.json)")
    g.add_argument("--features", default=None,
                   help="the features folder that was clustered (its keys); default: recorded in stats.json")
    g.add_argument("--folder-shard-size", "--folder_shard_size", dest="folder_shard_size", type=int, default=10_000,
                   help="folder input: images per unit; the feature run's value gives per-shard label lookups")
    g.add_argument("--shuffle-buffer", "--shuffle_buffer", dest="shuffle_buffer", type=int, default=1000,
                   help="samples mixed at once per data loading worker")
    g.add_argument("--samples-per-epoch", "--samples_per_epoch", dest="samples_per_epoch", type=int, default=None,
                   help="samples in one epoch over all processes (default: the number of clustered samples)")

    add_loader_args(p, 128, "images per process per micro-batch", "data loading processes per process")
    p.add_argument("--num_feat", type=int, default=None,
                   help="Partial FC feature sampling: dimensions used per step (default: all)")
    p.add_argument("--lr-schedule", "--lr_schedule", dest="lr_schedule", default="onecycle",
                   choices=list(SCHEDULES), help="per optimiser step; both warm up over the first 10%%")
    p.add_argument("--save-every", "--save_every", dest="save_every", type=int, default=0,
                   help="also checkpoint every N optimiser steps within an epoch (0: at epoch ends only)")
    p.add_argument("--eval-dataset", "--eval_dataset", dest="eval_dataset", default=None,
                   help="after each epoch, zero-shot retrieval on this dataset's test split (e.g. digits)")
    p.add_argument("--chunk-size", "--chunk_size", dest="chunk_size", type=int, default=1024,
                   help="evaluation: queries searched at once")
    p.add_argument("--output", default="output", type=output_dir,
                   help="folder for model_last.pt, results.json, checkpoints")
    p.add_argument("--seed", type=seed, default=1024)
    add_runtime_args(p, compile=False)
    add_train_args(p, title="training")
    # Published pretraining values where they differ from fine-tuning's; lr_pfc_weight 5 (fine-tuning:
    # the published scripts' 10) is what the pretraining runs and the digits demo were measured with.
    p.set_defaults(drop_path_rate=0.1, sample_rate=0.1, lr=1e-3, weight_decay=0.05, epochs=32, transform="timm",
                   lr_pfc_weight=5.0)
    return p


# ----------------------------------------------------------------------------- building


def build_model(args) -> VisionTransformer:
    """The architecture of ``--model`` with the explicit flags' overrides, random weights seeded
    with ``--seed`` (the same on every process; DDP broadcasts rank 0's anyway)."""
    import torch

    from .._factory import create_model

    overrides = {key: getattr(args, flag) for flag, key in ARCH_FLAGS.items() if getattr(args, flag) is not None}
    output_dim = getattr(args, "output_dim", None)
    if output_dim is not None and overrides.setdefault("embedding_size", output_dim) != output_dim:
        raise ValueError("--output_dim and --embedding-size disagree")
    torch.manual_seed(args.seed)
    return create_model(args.model, drop_path_rate=args.drop_path_rate, **overrides)


def build_train_data(args, transform) -> tuple[PseudoLabelStream, PseudoLabels]:
    """The streamed training input and its pseudo labels."""
    from .. import _distributed as dist
    from ..data import load_retrieval_dataset
    from .._pretrain.dataset import InMemoryReader, PseudoLabels, PseudoLabelStream, ShardReader

    if (args.train_shards is None) == (args.dataset is None):
        raise ValueError("give exactly one of --train-shards and --dataset")
    labels = PseudoLabels(args.labels, args.features)
    if args.train_shards is not None:
        reader = ShardReader.from_inputs(args.train_shards, transform, args.folder_shard_size)
    else:
        split = load_retrieval_dataset(args.dataset, args.data_root, "train", transform, args.skip_bad_images)
        # small units so that every process and worker gets several
        unit = max(1, min(256, len(split.query) // (8 * dist.get_world_size())))
        reader = InMemoryReader(split.query, unit_size=unit, name=f"{args.dataset}-train")
    if len(reader) < dist.get_world_size():
        raise ValueError(f"{len(reader)} input shard(s) for {dist.get_world_size()} processes: every process "
                         "needs at least one")
    return PseudoLabelStream(reader, labels, args.seed, args.shuffle_buffer), labels


def _rebatch(batches, size: int):
    """Exact batches of ``size`` from the loader's (images, labels) batches of any size.

    Each loader worker ends its pass with a short batch; joining them keeps every sample.
    """
    import torch

    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    n = 0
    for x, y in batches:
        images.append(x)
        labels.append(y)
        n += y.shape[0]
        while n >= size:
            x_all, y_all = torch.cat(images), torch.cat(labels)  # (n, C, H, W), (n,)
            yield x_all[:size], y_all[:size]
            images, labels, n = [x_all[size:]], [y_all[size:]], n - size


def epoch_batches(stream: PseudoLabelStream, epoch: int, num_batches: int, args, pin: bool, skip: int = 0):
    """This process's ``num_batches`` micro-batches of ``epoch``, leaving out the first ``skip``.

    The data is a pure function of (seed, epoch, rank): data loading workers are seeded from
    a generator of those, not from the global RNG, so a resumed epoch reads the same batches.
    """
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    produced, repeat = 0, 0
    while produced < num_batches:
        stream.set_epoch(epoch, repeat)
        seed = int(np.random.SeedSequence([args.seed, epoch, repeat, stream.rank]).generate_state(1)[0])
        loader = DataLoader(stream, batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=pin,
                            generator=torch.Generator().manual_seed(seed), persistent_workers=False)
        got = 0
        for batch in _rebatch(loader, args.batch_size):
            got += 1
            if produced >= skip:
                yield batch
            produced += 1
            if produced == num_batches:
                return
        if got == 0:
            raise RuntimeError(f"rank {stream.rank}: no labelled image in its {len(stream.units())} shard(s); "
                               "check --labels/--features against the input")
        repeat += 1
        logger.info("epoch %d: this process's shards ran out after %d of %d batches; reading them again "
                    "(new shuffle)", epoch + 1, produced, num_batches)


# ----------------------------------------------------------------------------- training


def _load_history(output: Path, epochs_done: int) -> list[dict]:
    path = output / "results.json"
    if epochs_done == 0 or not path.is_file():
        return []
    return [e for e in json.loads(path.read_text()).get("history", []) if e["epoch"] <= epochs_done]


def train(args, device: torch.device) -> int:
    """Pretrain a ViT from random weights on pseudo labels; see the module docstring."""
    from .. import _distributed as dist
    from .._utils import write_json
    from ..checkpoint import save_model
    from ..data import load_retrieval_dataset
    from ..evaluate import evaluate_retrieval
    from .._training import build_trainer, seed_everything, train_epoch
    from ..transforms import eval_transform
    from .common import check_images, embedding_options, print_retrieval, train_transforms, trainer_options

    model = build_model(args)
    config = model.config
    seed_everything(args.seed)
    model.set_grad_checkpointing(args.grad_checkpointing)
    stream, labels = build_train_data(args, train_transforms(args, config.input_size)[0])
    test_data = None
    if args.eval_dataset:
        test_data = load_retrieval_dataset(args.eval_dataset, args.data_root, "test", eval_transform(config.input_size),
                                           args.skip_bad_images)
        check_images([test_data.query, test_data.gallery], args.strict_images)
    world = dist.get_world_size()
    samples = args.samples_per_epoch or labels.num_samples
    micro_per_epoch = samples // (world * args.batch_size)
    if micro_per_epoch == 0:
        raise ValueError(f"{samples} samples per epoch are too few for {world} process(es) x batch size "
                         f"{args.batch_size}")
    steps_per_epoch = math.ceil(micro_per_epoch / args.gradient_acc)
    total_steps = args.epochs * steps_per_epoch
    logger.info("%d pseudo classes, %d samples per epoch: %d optimiser steps per epoch, %d in all; model %s",
                labels.num_classes, samples, steps_per_epoch, total_steps, config)
    trainer = build_trainer(model, num_classes=labels.num_classes, total_steps=total_steps,
                            **trainer_options(args, device))
    resumed_loss = trainer.resume(args.resume).get("epoch_loss")  # (sum, count) before a mid-epoch checkpoint
    output = Path(args.output)
    history = _load_history(output, trainer.epoch)
    for epoch in range(trainer.epoch, args.epochs):
        done = trainer.step - epoch * steps_per_epoch  # > 0 when resuming a --save-every checkpoint
        if done:
            logger.info("epoch %d: skipping the %d optimiser steps already done", epoch + 1, done)
        micro = done * args.gradient_acc
        batches = epoch_batches(stream, epoch, micro_per_epoch, args, device.type == "cuda", skip=micro)
        epoch_loss = train_epoch(trainer, batches, micro_per_epoch, first_micro=micro, save_every=args.save_every,
                                 epoch_loss=resumed_loss if done else None)
        # PartialFC's loss is already the mean over all processes' samples: average the means
        entry = {"epoch": epoch + 1, "step": trainer.step, "loss": float(epoch_loss[0] / max(float(epoch_loss[1]), 1))}
        if test_data is not None:
            # the whole embedding: Partial FC's --num_feat picks random dimensions per step, not a prefix
            result = evaluate_retrieval(trainer.model, test_data.query, test_data.gallery, ks=test_data.ks,
                                        chunk_size=args.chunk_size, **embedding_options(args, device))
            trainer.best = max(trainer.best, result.metrics["recall"][test_data.ks[0]])
            record = result.record()
            entry.update(recall=record["recall"], map_at_r=record["map_at_r"])
        history.append(entry)
        if dist.is_main_process():
            save_model(trainer.model, output / "model_last.pt")
            logger.info("epoch %d/%d: mean loss %.4f", epoch + 1, args.epochs, entry["loss"])
            if test_data is not None:
                print_retrieval({"dataset": test_data.name, "model": str(output / "model_last.pt"), **record},
                                f"epoch {epoch + 1}/{args.epochs}")
            write_json(_record(args, labels, config, history, world), output / "results.json")
        trainer.finish_epoch()
    if dist.is_main_process():
        if not (output / "model_last.pt").exists():  # --epochs 0: the random initialisation
            save_model(trainer.model, output / "model_last.pt")
        write_json(_record(args, labels, config, history, world), output / "results.json")
    dist.barrier()
    return 0


def _record(args, labels: PseudoLabels, config, history: list[dict], world: int) -> dict:
    return {
        "labels": str(args.labels), "num_classes": labels.num_classes, "num_clustered": labels.num_samples,
        "config": config.to_dict(), "sample_rate": args.sample_rate, "num_feat": args.num_feat,
        "world_size": world, "epochs": len(history) and history[-1]["epoch"], "history": history,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(get_args_parser(), argv)
    from .common import process_group

    with process_group(args.device) as device:
        return train(args, device)
