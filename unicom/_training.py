"""The training loop that fine-tuning and pretraining share: margin softmax over Partial FC.

One process or many (torchrun): DDP for the backbone with summed gradients, class centres
split across processes, SyncBatchNorm on GPUs, mixed precision (a gradient scaler for fp16),
gradient accumulation, a one-cycle or cosine schedule per optimiser step, a progress line
every N steps, a stop at the first NaN or infinite loss, and checkpoints from which a killed
run resumes to exactly where an uninterrupted run ends.

Checkpoints: ``<output>/checkpoints/epoch_NNNN/rank_R.pt`` (rank 0 also holds the model and
the backbone's optimiser state; every rank its class centres, their optimiser state and its
RNG states), made visible by atomically rewriting ``<output>/checkpoints/latest`` once every
rank has written its file. A caller builds a :class:`Trainer` with :func:`build_trainer`,
feeds each epoch's batches to :func:`train_epoch`, and ends each epoch with
:meth:`Trainer.finish_epoch`; what happens between (evaluation, saving models) is its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from . import _distributed as dist
from ._utils import atomic_write, autocast_for, unwrap_model
from .checkpoint import atomic_save
from .losses import CombinedMarginLoss, PartialFC

__all__ = ["SCHEDULES", "Trainer", "build_trainer", "find_resume", "seed_everything", "train_epoch"]

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


def seed_everything(seed: int) -> None:
    """Seed torch, ``random`` and NumPy with ``seed + rank`` (each process its own augmentation)."""
    seed = seed + dist.get_rank()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


# ----------------------------------------------------------------------------- schedules


def _one_cycle(optimizer, total_steps: int):
    # torch's OneCycleLR divides by pct_start * total_steps - 1, which is zero when the warm-up
    # is exactly one step (10 steps in all); a hair more keeps that one-step warm-up.
    pct_start = 0.1 if 0.1 * total_steps != 1 else 0.1 + 1e-6
    max_lr = [group["lr"] for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(total_steps, 1),
                                               pct_start=pct_start)


def _cosine(optimizer, total_steps: int):
    warmup = max(int(0.1 * total_steps), 1)

    def factor(step: int) -> float:  # linear warm-up, then half a cosine down to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total_steps - warmup) / max(total_steps - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# Learning-rate schedules per optimiser step; both warm up over the first 10% of the steps.
SCHEDULES = {"onecycle": _one_cycle, "cosine": _cosine}


# ----------------------------------------------------------------------------- the trainer


class StepLogger:
    """A progress line every N optimiser steps: loss, learning rates, images/s, time left."""

    def __init__(self, every: int, total_steps: int, images_per_step: int) -> None:
        self.every, self.total, self.images_per_step = every, total_steps, images_per_step
        self.start = time.perf_counter()
        self.first_step: int | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def __call__(self, step: int, loss_sum: torch.Tensor, count: int, scheduler) -> None:
        now = time.perf_counter()
        done = step - self.first_step
        rate = done * self.images_per_step / max(now - self.start, 1e-9)
        left = (self.total - step) * (now - self.start) / max(done, 1)
        lrs = " ".join(f"{lr:.3g}" for lr in scheduler.get_last_lr())
        logger.info("step %d/%d  loss %.4f  lr %s  %.1f img/s  %s left", step, self.total,
                    loss_sum.item() / max(count, 1), lrs, rate, time.strftime("%H:%M:%S", time.gmtime(left)))


@dataclass
class Trainer:
    """What one run trains and where it stands: the model (``ddp``: as trained, DDP-wrapped with
    several processes), its Partial FC head, optimiser, schedule, fp16 scaler, and the counts a
    checkpoint keeps (epochs done, optimiser steps done, best score)."""

    model: torch.nn.Module
    ddp: torch.nn.Module
    pfc: PartialFC
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    device: torch.device
    precision: str
    gradient_acc: int
    output: Path
    log: StepLogger
    settings: dict = field(default_factory=dict)  # the run's flags, recorded in checkpoints
    epoch: int = 0
    step: int = 0
    best: float = -1.0

    def resume(self, resume: str | None) -> dict:
        """Restore ``resume`` (a checkpoint folder, or ``auto``: the latest under ``output``, if
        any); the ``extra`` values saved with it (empty when nothing was resumed)."""
        folder = find_resume(resume, self.output) if resume else None
        return {} if folder is None else load_checkpoint(folder, self)

    def finish_epoch(self) -> None:
        """Count the epoch done and checkpoint it (every process)."""
        self.epoch += 1
        save_checkpoint(self.output / CHECKPOINTS / f"epoch_{self.epoch:04d}", self)


def _allreduce_sum_hook(state, bucket):
    """DDP communication hook that sums gradients instead of averaging them.

    Partial FC's loss is the mean over the samples of *all* processes, and each process's
    backward already yields its exact share of that loss's gradient; the backbone's true
    gradient is therefore the sum over processes (DDP's default mean would divide it by the
    world size, unlike the class centres' gradients).
    """
    work = torch.distributed.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def build_trainer(
    model: torch.nn.Module,
    *,
    num_classes: int,
    margin: CombinedMarginLoss,
    device: torch.device,
    output: str | Path,
    total_steps: int,
    batch_size: int,
    lr: float,
    lr_pfc_weight: float = 10.0,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    schedule: str = "onecycle",
    sample_rate: float = 1.0,
    num_feat: int | None = None,
    precision: str = "fp32",
    gradient_acc: int = 1,
    log_every: int = 10,
    settings: dict | None = None,
) -> Trainer:
    """Set up the training of ``model`` (random or loaded weights, on the CPU) on ``num_classes``.

    ``total_steps`` optimiser steps of ``gradient_acc`` micro-batches of ``batch_size`` images
    per process; the class centres get ``lr * lr_pfc_weight``; ``sample_rate`` of them and
    ``num_feat`` embedding dimensions are used per step (Partial FC). ``precision``: autocast
    of the forward pass (fp16 needs a GPU and uses a gradient scaler).
    """
    size = unwrap_model(model).config.embedding_size
    if num_feat is not None and not 0 < num_feat <= size:
        raise ValueError(f"num_feat must be in 1..{size}, got {num_feat}")
    if gradient_acc < 1:
        raise ValueError(f"gradient_acc must be >= 1, got {gradient_acc}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 training needs a GPU; use bf16 or fp32 precision on the CPU")
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}: expected one of {list(SCHEDULES)}")
    world = dist.get_world_size()
    model = model.to(device).train()
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = model
    if world > 1:
        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        ddp.register_comm_hook(None, _allreduce_sum_hook)
    pfc = PartialFC(margin, size, num_classes, sample_rate, num_feat).to(device).train()
    groups = [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": lr},
        {"params": list(pfc.parameters()), "lr": lr * lr_pfc_weight},
    ]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type, growth_interval=200) if precision == "fp16" else None
    log = StepLogger(log_every, total_steps, batch_size * gradient_acc * world)
    return Trainer(model, ddp, pfc, opt, SCHEDULES[schedule](opt, total_steps), scaler, device, precision,
                   gradient_acc, Path(output), log, dict(settings or {}))


# ----------------------------------------------------------------------------- the loop


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


def train_epoch(
    trainer: Trainer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    micro_batches: int,
    *,
    first_micro: int = 0,
    save_every: int = 0,
    epoch_loss: list[float] | None = None,
) -> torch.Tensor:
    """Train on this process's ``(images, labels)`` micro-batches of epoch ``trainer.epoch``.

    ``micro_batches``: the epoch's micro-batches per process (its last accumulation group may
    be short); ``first_micro`` of them were done before a resumed mid-epoch checkpoint, whose
    ``epoch_loss`` (sum, count) carries on. ``save_every``: also checkpoint every N optimiser
    steps within the epoch. Returns the epoch's (sum, count) of micro-batch losses (float64);
    rank 0's BatchNorm statistics are then everyone's.
    """
    t, device = trainer, trainer.device
    t.ddp.train()
    t.pfc.train()
    if t.log.first_step is None:
        t.log.first_step = t.step
    loss_sum = torch.zeros((), device=device)
    count = 0
    total = torch.tensor(epoch_loss or [0.0, 0.0], dtype=torch.float64, device=device)
    one = torch.ones((), dtype=torch.float64, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    steps_per_epoch = math.ceil(micro_batches / t.gradient_acc)
    micro = first_micro
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        micro += 1
        last_micro = micro % t.gradient_acc == 0 or micro == micro_batches
        sync = contextlib.nullcontext() if last_micro or t.ddp is t.model else t.ddp.no_sync()
        with sync:
            with autocast_for(device, t.precision):
                embeddings = t.ddp(images)  # (B, embedding_size)
            loss = t.pfc(embeddings.float(), labels)
            backward(loss, group_size(micro, t.gradient_acc, micro_batches), t.scaler)
        finite &= torch.isfinite(loss.detach())
        loss_sum += loss.detach()
        total += torch.stack([loss.detach().double(), one])
        count += 1
        if not last_micro:
            continue
        optimizer_step(t.optimizer, t.scheduler, t.scaler)
        t.step += 1
        if t.log.due(t.step):
            check_finite(finite, loss_sum, t.epoch, t.step)
            t.log(t.step, loss_sum, count, t.scheduler)
            loss_sum.zero_()
            count = 0
        if save_every and t.step % save_every == 0 and t.step < (t.epoch + 1) * steps_per_epoch:
            check_finite(finite, loss_sum, t.epoch, t.step)
            save_checkpoint(t.output / CHECKPOINTS / f"epoch_{t.epoch:04d}_step_{t.step:09d}", t,
                            extra={"epoch_loss": total.tolist()})
    check_finite(finite, loss_sum, t.epoch, t.step)
    dist.broadcast_buffers(t.model)  # one model: rank 0's BatchNorm statistics everywhere
    return total


def check_finite(finite: torch.Tensor, loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    if not bool(finite):
        raise FloatingPointError(
            f"the loss became NaN or infinite in epoch {epoch + 1}, at or before optimiser step {step} "
            f"(running sum {loss_sum.item()}); stopping. The last good checkpoint is kept: lower --lr, "
            "check the data, or try --precision bf16/fp32, then --resume auto"
        )


# ----------------------------------------------------------------------------- checkpoints


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


def save_checkpoint(folder: Path, trainer: Trainer, extra: dict | None = None) -> None:
    """Every rank writes its file; rank 0 then points ``latest`` at the folder (atomic). ``extra``:
    plain values a program needs to resume exactly (:meth:`Trainer.resume` gives them back)."""
    t, rank = trainer, dist.get_rank()
    optimizer_state = t.optimizer.state_dict()
    if rank != 0:  # rank 0 keeps the whole optimiser state; the others only their class centres' part
        num_backbone = len(t.optimizer.param_groups[0]["params"])
        optimizer_state = {"state": {i: s for i, s in optimizer_state["state"].items() if i >= num_backbone},
                           "param_groups": optimizer_state["param_groups"]}
    payload = {
        "epoch": t.epoch,  # epochs completed
        "step": t.step,
        "best": t.best,
        "world_size": dist.get_world_size(),
        "partial_fc": t.pfc.state_dict(),
        "optimizer": optimizer_state,
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "rng": rng_state(),
        "args": t.settings,
        "extra": extra or {},
    }
    if rank == 0:
        model = unwrap_model(t.model)
        payload["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        payload["config"] = model.config.to_dict()
    atomic_save(payload, folder / f"rank_{rank}.pt")
    dist.barrier()
    if rank == 0:
        root = folder.parent
        atomic_write(root / "latest", lambda f: f.write(folder.name + "\n"), "w")
        for old in root.glob("epoch_*"):  # keep only the latest complete checkpoint
            if old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def find_resume(resume: str, output: str | Path) -> Path | None:
    """The checkpoint folder ``resume`` names; ``auto``: the latest under ``output`` (None if none)."""
    output = Path(output)
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


def load_checkpoint(folder: Path, trainer: Trainer) -> dict:
    """Restore a checkpoint into ``trainer`` (weights, head, optimiser, schedule, scaler, RNG
    states, counts); the ``extra`` values this process saved with it."""
    t, rank = trainer, dist.get_rank()
    main_state = torch.load(folder / "rank_0.pt", map_location="cpu", weights_only=True)
    if main_state["world_size"] != dist.get_world_size():
        raise RuntimeError(
            f"{folder} was written by {main_state['world_size']} processes; resume it with the same number "
            f"(this run has {dist.get_world_size()}): the class centres are split per process"
        )
    mine = main_state if rank == 0 else torch.load(folder / f"rank_{rank}.pt", map_location="cpu", weights_only=True)
    unwrap_model(t.model).load_state_dict(main_state["model"])
    t.pfc.load_state_dict(mine["partial_fc"])
    opt_state = main_state["optimizer"]
    if rank != 0:
        opt_state = {"state": {**opt_state["state"], **mine["optimizer"]["state"]},
                     "param_groups": mine["optimizer"]["param_groups"]}
    t.optimizer.load_state_dict(opt_state)
    t.scheduler.load_state_dict(mine["scheduler"])
    if t.scaler is not None and mine["scaler"] is not None:
        t.scaler.load_state_dict(mine["scaler"])
    set_rng_state(mine["rng"])
    t.epoch, t.step, t.best = mine["epoch"], mine["step"], mine["best"]
    logger.info("resumed from %s (epoch %d, step %d)", folder, t.epoch, t.step)
    return mine.get("extra", {})
