"""Supervised fine-tuning for retrieval: margin softmax with Partial FC (``retrieval.py`` without ``--eval``).

One process or many (torchrun): DDP for the backbone, class centres split across
processes, mixed precision, gradient accumulation, a one-cycle schedule per optimiser
step, evaluation after each epoch, and checkpoints from which a killed run resumes to
exactly where an uninterrupted run ends.

Checkpoints: ``<output>/checkpoints/epoch_NNNN/rank_R.pt`` (rank 0 also holds the model
and the backbone's optimiser state; every rank its class centres, their optimiser state and
its RNG states), made visible by atomically rewriting ``<output>/checkpoints/latest``
once every rank has written its file. ``--resume auto`` follows ``latest``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import distributed as dist
from ..checkpoint import atomic_save, save_model
from ..data import load_retrieval_dataset
from ..embed import autocast_for
from ..factory import load
from ..losses import MARGIN_GRADIENTS, CombinedMarginLoss, PartialFC
from ..transforms import test_transform, train_transform
from .common import (check_images, fraction, non_negative_float, non_negative_int, positive_int, resolve_precision,
                     write_json)

logger = logging.getLogger("unicom.finetune")

CHECKPOINTS = "checkpoints"

# The published fine-tuning scripts, as data: (dataset, model) -> processes x batch per process,
# epochs, peak lr, ArcFace margin m2, embedding size, augmentation. Every one of them also uses
# the settings in PUBLISHED_COMMON. ``retrieval.py --published`` starts from these.
PUBLISHED_RUNS = {
    ("sop", "ViT-B/32"): dict(processes=1, batch_size=64, epochs=64, lr=1e-5, margin_loss_m2=0.25, output_dim=512,
                              transform="origin_clip"),
    ("sop", "ViT-B/16"): dict(processes=1, batch_size=64, epochs=64, lr=1e-5, margin_loss_m2=0.25, output_dim=768,
                              transform="origin_clip"),
    ("sop", "ViT-L/14"): dict(processes=4, batch_size=16, epochs=64, lr=1e-5, margin_loss_m2=0.3, output_dim=768,
                              transform="origin_clip"),
    ("sop", "ViT-L/14@336px"): dict(processes=8, batch_size=16, epochs=64, lr=1e-5, margin_loss_m2=0.25,
                                    output_dim=768, transform="origin_clip"),
    ("inshop", "ViT-B/16"): dict(processes=4, batch_size=16, epochs=128, lr=1e-5, margin_loss_m2=0.25,
                                 output_dim=768, transform="timm"),
    ("inshop", "ViT-L/14"): dict(processes=4, batch_size=16, epochs=128, lr=1e-5, margin_loss_m2=0.25,
                                 output_dim=768, transform="timm"),
    ("inshop", "ViT-L/14@336px"): dict(processes=8, batch_size=16, epochs=128, lr=1e-5, margin_loss_m2=0.25,
                                       output_dim=768, transform="timm"),
    ("inat", "ViT-B/16"): dict(processes=8, batch_size=128, epochs=128, lr=4e-5, margin_loss_m2=0.35,
                               output_dim=768, transform="timm"),
    ("inat", "ViT-L/14"): dict(processes=8, batch_size=64, epochs=64, lr=1e-5, margin_loss_m2=0.35,
                               output_dim=768, transform="timm"),
}
PUBLISHED_COMMON = dict(margin_loss_s=32.0, margin_loss_m1=1.0, margin_loss_m3=0.0, num_feat=512, sample_rate=1.0,
                        lr_pfc_weight=10.0, optimizer="adamw", weight_decay=0.0, gradient_acc=1, seed=1024)


def settings(args) -> dict:
    """The run's flags (plain values), as checkpoints and results.json record them."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def published_settings(dataset: str, model_name: str) -> dict:
    """The flags of the published fine-tuning script for ``dataset`` and ``model_name`` (without
    ``processes``, the number of GPUs it ran on); a ValueError names the runs that exist."""
    run = PUBLISHED_RUNS.get((dataset, model_name))
    if run is None:
        runs = ", ".join(f"{d} {m}" for d, m in PUBLISHED_RUNS)
        raise ValueError(f"no published fine-tuning run for --dataset {dataset} --model_name {model_name}; "
                         f"published: {runs}")
    return {**PUBLISHED_COMMON, **{k: v for k, v in run.items() if k != "processes"}}


def add_train_args(p: argparse.ArgumentParser, title: str = "fine-tuning (without --eval)") -> None:
    """The published fine-tuning flags (names kept) and a few of ours (also used by pretraining)."""
    g = p.add_argument_group(title)
    g.add_argument("--epochs", type=non_negative_int, default=32)
    g.add_argument("--lr", type=non_negative_float, default=1e-4, help="peak learning rate of the backbone")
    # 10: what every published fine-tuning script passes (the published argparse default, 5, is in none)
    g.add_argument("--lr_pfc_weight", type=non_negative_float, default=10.0,
                   help="the class centres get lr * lr_pfc_weight (default %(default)s)")
    g.add_argument("--weight_decay", type=non_negative_float, default=0.0)
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    g.add_argument("--gradient_acc", type=positive_int, default=1, help="micro-batches accumulated per optimiser step")
    g.add_argument("--margin_loss_s", type=float, default=32.0)
    g.add_argument("--margin_loss_m1", type=float, default=1.0)
    g.add_argument("--margin_loss_m2", type=float, default=0.3)
    g.add_argument("--margin_loss_m3", type=float, default=0.0)
    g.add_argument("--margin-gradient", "--margin_gradient", dest="margin_gradient", default="straight-through",
                   choices=MARGIN_GRADIENTS,
                   help="how the margin is differentiated: straight-through (as published: the margin's value, "
                        "the cosine's gradient) or exact (see unicom.losses.CombinedMarginLoss)")
    g.add_argument("--sample_rate", type=fraction, default=1.0,
                   help="share of class centres used per step (Partial FC)")
    g.add_argument("--output_dim", type=positive_int, default=None, help="embedding size; must equal the model's")
    g.add_argument("--transform", default="timm", choices=["timm", "origin_clip"],
                   help="training augmentation: timm (RandAugment, random erasing) or origin_clip (eval transform)")
    g.add_argument("--color_jitter", type=float, default=0.4)
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--remode", default="pixel")
    g.add_argument("--recount", type=int, default=1)
    g.add_argument("--drop_path_rate", type=float, default=0.0, help="stochastic depth for fine-tuning")
    g.add_argument("--grad-checkpointing", "--grad_checkpointing", dest="grad_checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, for the large models)")
    g.add_argument("--resume", default=None,
                   help="a checkpoint folder (…/checkpoints/epoch_NNNN) or 'auto' for the latest in --output")
    g.add_argument("--log-every", "--log_every", dest="log_every", type=positive_int, default=10,
                   help="log a progress line every N optimiser steps")


# ----------------------------------------------------------------------------- data


class EpochSampler:
    """Shuffled per epoch (seed + epoch), split evenly over processes, whole batches only.

    Every process gets the same number of batches (DDP and Partial FC need every process in
    every step); the few images beyond the last whole batch of an epoch are left out of it.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int) -> None:
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.batches_per_epoch = num_items // self.world // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_items} training images are too few for {self.world} process(es) x batch size {batch_size}"
            )

    def batches(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
        per_rank = self.batches_per_epoch * self.batch_size
        mine = order[self.rank :: self.world][:per_rank].tolist()
        return [mine[i : i + self.batch_size] for i in range(0, per_rank, self.batch_size)]


def train_loader(dataset, sampler: EpochSampler, epoch: int, args, pin: bool):
    from ..data.loader import collate

    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler.batches(epoch), num_workers=args.num_workers, collate_fn=collate,
        pin_memory=pin, persistent_workers=False,
    )


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """This process's RNG states, in types that load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- checkpoints


def _split_optimizer_state(state: dict, pfc_ids: set[int], keep_backbone: bool) -> dict:
    """Rank 0 keeps the whole optimiser state; the others only their class centres' part."""
    if keep_backbone:
        return state
    return {"state": {i: s for i, s in state["state"].items() if i in pfc_ids}, "param_groups": state["param_groups"]}


def save_checkpoint(folder: Path, model, pfc, optimizer, scheduler, scaler, epoch: int, step: int, best: float,
                    args, extra: dict | None = None) -> None:
    """Every rank writes its file; rank 0 then points ``latest`` at the folder (atomic). ``extra``:
    plain values a program needs to resume exactly (:func:`load_checkpoint` gives them back)."""
    rank = dist.get_rank()
    pfc_ids = set(range(len(optimizer.param_groups[0]["params"]),
                        len(optimizer.param_groups[0]["params"]) + len(optimizer.param_groups[1]["params"])))
    payload = {
        "epoch": epoch,  # epochs completed
        "step": step,
        "best": best,
        "world_size": dist.get_world_size(),
        "partial_fc": pfc.state_dict(),
        "optimizer": _split_optimizer_state(optimizer.state_dict(), pfc_ids, keep_backbone=rank == 0),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "args": settings(args),
        "extra": extra or {},
    }
    if rank == 0:
        payload["model"] = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
        payload["config"] = unwrap(model).config.to_dict()
    atomic_save(payload, folder / f"rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        root = folder.parent
        tmp = root / ".latest.tmp"
        tmp.write_text(folder.name + "\n")
        tmp.replace(root / "latest")
        for old in root.glob("epoch_*"):  # keep only the latest complete checkpoint
            if old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def find_resume(resume: str, output: Path) -> Path | None:
    if resume != "auto":
        folder = Path(resume)
        if folder.is_file():
            folder = folder.parent
        if not (folder / "rank_0.pt").is_file():
            raise FileNotFoundError(f"--resume {resume}: expected a checkpoint folder holding rank_0.pt")
        return folder
    pointer = output / CHECKPOINTS / "latest"
    if not pointer.is_file():
        logger.info("--resume auto: no checkpoint in %s, starting from scratch", output / CHECKPOINTS)
        return None
    return output / CHECKPOINTS / pointer.read_text().strip()


def load_checkpoint(folder: Path, model, pfc, optimizer, scheduler, scaler) -> tuple[int, int, float, dict]:
    """Restore a checkpoint into the given objects: (epochs done, step, best, the ``extra`` values
    this process saved with it)."""
    rank = dist.get_rank()
    main_state = torch.load(folder / "rank_0.pt", map_location="cpu", weights_only=True)
    if main_state["world_size"] != dist.get_world_size():
        raise RuntimeError(
            f"{folder} was written by {main_state['world_size']} processes; resume it with the same number "
            f"(this run has {dist.get_world_size()}): the class centres are split per process"
        )
    mine = main_state if rank == 0 else torch.load(folder / f"rank_{rank}.pt", map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(main_state["model"])
    pfc.load_state_dict(mine["partial_fc"])
    opt_state = main_state["optimizer"]
    if rank != 0:
        opt_state = {"state": {**opt_state["state"], **mine["optimizer"]["state"]},
                     "param_groups": mine["optimizer"]["param_groups"]}
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(mine["scheduler"])
    if scaler is not None and mine["scaler"] is not None:
        scaler.load_state_dict(mine["scaler"])
    set_rng_state(mine["rng"])
    logger.info("resumed from %s (epoch %d, step %d)", folder, mine["epoch"], mine["step"])
    return mine["epoch"], mine["step"], mine["best"], mine.get("extra", {})


# ----------------------------------------------------------------------------- training


def _allreduce_sum_hook(state, bucket):
    """DDP communication hook that sums gradients instead of averaging them.

    Partial FC's loss is the mean over the samples of *all* processes, and each process's
    backward already yields its exact share of that loss's gradient; the backbone's true
    gradient is therefore the sum over processes (DDP's default mean would divide it by the
    world size, unlike the class centres' gradients).
    """
    work = torch.distributed.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


class StepLogger:
    """A progress line every N optimiser steps: loss, learning rates, images/s, time left."""

    def __init__(self, every: int, total_steps: int, images_per_step: int) -> None:
        self.every, self.total, self.images_per_step = every, total_steps, images_per_step
        self.start = self.tic = time.perf_counter()
        self.first_step: int | None = None

    def __call__(self, step: int, loss_sum: torch.Tensor, count: int, scheduler) -> None:
        if self.first_step is None:
            self.first_step = step - 1
        if step % self.every and step != self.total:
            return
        now = time.perf_counter()
        done = step - self.first_step
        rate = done * self.images_per_step / max(now - self.start, 1e-9)
        left = (self.total - step) * (now - self.start) / max(done, 1)
        lrs = " ".join(f"{lr:.3g}" for lr in scheduler.get_last_lr())
        logger.info("step %d/%d  loss %.4f  lr %s  %.1f img/s  %s left", step, self.total,
                    loss_sum.item() / max(count, 1), lrs, rate, time.strftime("%H:%M:%S", time.gmtime(left)))


def group_size(micro: int, gradient_acc: int, micro_per_epoch: int) -> int:
    """Micro-batches in the accumulation group of micro-batch ``micro`` (1-based) of an epoch:
    ``gradient_acc``, fewer for the epoch's last group when they do not divide evenly."""
    start = (micro - 1) // gradient_acc * gradient_acc
    return min(gradient_acc, micro_per_epoch - start)


def backward(loss: torch.Tensor, group: int, scaler) -> None:
    """Backward of one micro-batch's share of its accumulation group's mean loss (``group``
    micro-batches; scaled for fp16)."""
    scaled = loss / group
    (scaler.scale(scaled) if scaler is not None else scaled).backward()


def optimizer_step(optimizer, scheduler, scaler) -> None:
    """Apply the accumulated gradients (through the scaler with fp16), clear them, advance the schedule."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def build_optimizer(args, model, pfc) -> torch.optim.Optimizer:
    groups = [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": args.lr},
        {"params": list(pfc.parameters()), "lr": args.lr * args.lr_pfc_weight},
    ]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)


def train(args, device: torch.device) -> int:
    """Fine-tune ``args.model_name`` on ``args.dataset``'s train split; evaluate on its test split each epoch."""
    from .retrieval import evaluate, report  # the evaluation of the same program

    if args.gradient_acc < 1:
        raise ValueError("--gradient_acc must be >= 1")
    torch.manual_seed(args.seed + dist.get_rank())
    random.seed(args.seed + dist.get_rank())
    np.random.seed(args.seed + dist.get_rank())
    output = Path(args.output)
    precision = resolve_precision(args.precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 training needs a GPU; use bf16 or fp32 on the CPU")

    model, _ = load(args.model_name, device="cpu")
    config = model.config
    if args.output_dim is not None and args.output_dim != config.embedding_size:
        raise ValueError(f"--output_dim {args.output_dim} differs from the model's embedding size "
                         f"{config.embedding_size}")
    if args.num_feat is not None and not 0 < args.num_feat <= config.embedding_size:
        raise ValueError(f"--num_feat must be in 1..{config.embedding_size}")
    if args.drop_path_rate:
        depth = len(model.blocks)
        for i, block in enumerate(model.blocks):
            block.drop_path.p = args.drop_path_rate * i / max(depth - 1, 1)
    model.set_grad_checkpointing(args.grad_checkpointing)
    n_px = config.input_size
    if args.transform == "timm":
        tf_train = train_transform(n_px, "timm", color_jitter=args.color_jitter, auto_augment=args.aa,
                                   re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
        tf_test = test_transform(n_px)
    else:
        tf_train = tf_test = train_transform(n_px, "origin_clip")
    train_data = load_retrieval_dataset(args.dataset, args.data_root, "train", tf_train, args.skip_bad_images)
    test_data = load_retrieval_dataset(args.dataset, args.data_root, "test", tf_test, args.skip_bad_images)
    damaged = check_images([train_data.query, test_data.query, test_data.gallery], args.strict_images)

    model = model.to(device).train()
    if dist.get_world_size() > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = model
    if dist.get_world_size() > 1:
        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        ddp.register_comm_hook(None, _allreduce_sum_hook)
    margin = CombinedMarginLoss(args.margin_loss_s, args.margin_loss_m1, args.margin_loss_m2, args.margin_loss_m3,
                                args.margin_gradient)
    pfc = PartialFC(margin, config.embedding_size, train_data.num_classes, args.sample_rate, args.num_feat)
    pfc = pfc.to(device).train()
    optimizer = build_optimizer(args, model, pfc)
    sampler = EpochSampler(len(train_data.query), args.batch_size, args.seed)
    steps_per_epoch = math.ceil(sampler.batches_per_epoch / args.gradient_acc)
    total_steps = args.epochs * steps_per_epoch
    # torch's OneCycleLR divides by pct_start * total_steps - 1, which is zero when the warm-up
    # is exactly one step (10 steps in all); a hair more keeps that one-step warm-up.
    pct_start = 0.1 if 0.1 * total_steps != 1 else 0.1 + 1e-6
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[args.lr, args.lr * args.lr_pfc_weight], total_steps=total_steps, pct_start=pct_start)
    scaler = torch.amp.GradScaler(device.type, growth_interval=200) if precision == "fp16" else None

    start_epoch, step, best = 0, 0, -1.0
    if args.resume:
        folder = find_resume(args.resume, output)
        if folder is not None:
            start_epoch, step, best, _ = load_checkpoint(folder, model, pfc, optimizer, scheduler, scaler)

    images_per_step = args.batch_size * args.gradient_acc * dist.get_world_size()
    log = StepLogger(args.log_every, total_steps, images_per_step)
    record: dict = {}
    for epoch in range(start_epoch, args.epochs):
        ddp.train()
        pfc.train()
        loss_sum = torch.zeros((), device=device)
        count = 0
        finite = torch.ones((), dtype=torch.bool, device=device)
        batches = train_loader(train_data.query, sampler, epoch, args, pin=device.type == "cuda")
        micro = 0
        for images, labels, _, ok in batches:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if not bool(ok.all()):  # undecodable images (with --skip-bad-images) are dropped, never replaced
                keep = ok.to(device)
                images, labels = images[keep], labels[keep]
            micro += 1
            last_micro = micro % args.gradient_acc == 0 or micro == sampler.batches_per_epoch
            sync = contextlib.nullcontext() if last_micro or ddp is model else ddp.no_sync()
            with sync:
                with autocast_for(device, precision):
                    embeddings = ddp(images)
                loss = pfc(embeddings.float(), labels)
                backward(loss, group_size(micro, args.gradient_acc, sampler.batches_per_epoch), scaler)
            finite &= torch.isfinite(loss.detach())
            loss_sum += loss.detach()
            count += 1
            if not last_micro:
                continue
            optimizer_step(optimizer, scheduler, scaler)
            step += 1
            if step % args.log_every == 0 or step == total_steps:
                _check_finite(finite, loss_sum, epoch, step)
                log(step, loss_sum, count, scheduler)
                loss_sum.zero_()
                count = 0
        _check_finite(finite, loss_sum, epoch, step)

        dist.broadcast_buffers(unwrap(ddp))  # one model: rank 0's BatchNorm statistics everywhere
        result = evaluate(unwrap(ddp), test_data, args, device, precision)
        score = result["recall"][test_data.ks[0]]
        best = max(best, score)
        if dist.is_main_process():
            record = report(result, test_data, args)
            record.update(epoch=epoch + 1, best_recall_at_1=100.0 * best)
            save_model(unwrap(ddp), output / "model_last.pt")
            if score >= best:
                save_model(unwrap(ddp), output / "model_best.pt")
        save_checkpoint(output / CHECKPOINTS / f"epoch_{epoch + 1:04d}", ddp, pfc, optimizer, scheduler, scaler,
                        epoch + 1, step, best, args)
    if start_epoch >= args.epochs:  # resumed a finished run: report the final model again (every rank embeds)
        dist.broadcast_buffers(unwrap(ddp))
        result = evaluate(unwrap(ddp), test_data, args, device, precision)
        if dist.is_main_process():
            record = report(result, test_data, args)
            record.update(epoch=args.epochs, best_recall_at_1=100.0 * best)
    if dist.is_main_process():
        write_json({**record, **damaged, "settings": settings(args)}, output / "results.json")
    dist.barrier()
    return 0


def _check_finite(finite: torch.Tensor, loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    if not bool(finite):
        raise FloatingPointError(
            f"the loss became NaN or infinite in epoch {epoch + 1}, at or before optimiser step {step} "
            f"(running sum {loss_sum.item()}); stopping. The last good checkpoint is kept: lower --lr, "
            "check the data, or try --precision bf16/fp32, then --resume auto"
        )
