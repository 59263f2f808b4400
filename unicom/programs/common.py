"""Pieces shared by the programs: logging, device and precision choice, result files."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from .. import _distributed as dist
from .._utils import PRECISIONS
from ..data._pipelines import DECODE_CHOICES, jpeg, resolve_decode
from ..losses import MARGIN_GRADIENTS, CombinedMarginLoss
from ..transforms import test_transform, train_transform

PRECISION_CHOICES = ("auto", *PRECISIONS)


def setup_logging() -> None:
    """INFO on rank 0, warnings only elsewhere."""
    level = logging.INFO if dist.is_main_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout, force=True)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp16 autocast on CUDA (as published), exact fp32 on the CPU."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def runtime_record(args, device: torch.device) -> dict:
    """How the embeddings were computed, for results files: device type, autocast precision,
    input pipeline (``auto`` resolved) and compilation."""
    return {"device": device.type, "precision": resolve_precision(args.precision, device),
            "decode": resolve_decode(args.decode, device), "compile": bool(getattr(args, "compile", False))}


def embedding_options(args, device: torch.device) -> dict:
    """The keywords of :func:`unicom.evaluate.embed_dataset` that the runtime flags set."""
    return dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                precision=resolve_precision(args.precision, device), decode=args.decode)


def print_retrieval(record: dict) -> None:
    """A retrieval results record (see :meth:`unicom.evaluate.RetrievalResult.record`) as a table."""
    lines = [f"{record['dataset']}  {record['model']}  queries={record['num_query']} gallery={record['num_gallery']}"]
    lines += [f"  Recall@{k:<5} {v:6.2f}" for k, v in record["recall"].items()]
    lines += [f"  MAP@R        {record['map_at_r']:6.2f}", f"  R-precision  {record['r_precision']:6.2f}"]
    print("\n".join(lines), flush=True)


def _decode_option(value: str) -> str:
    """--decode: a name whose pipeline can run here (turbo needs simplejpeg: said at once, not
    after the model has loaded)."""
    if value == "turbo" and not jpeg.available():
        raise argparse.ArgumentTypeError("turbo needs the simplejpeg package: pip install simplejpeg "
                                         "(or unicom[fast]), or choose another --decode")
    return value


def _at_least(convert: Callable[[str], float], low: float, strict: bool, expected: str) -> Callable[[str], float]:
    def parse(value: str):
        try:
            number = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
        if not (math.isfinite(number) and (number > low if strict else number >= low)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {number}")
        return number

    parse.__name__ = convert.__name__
    return parse


# argparse types: a bad value ends with the usage and exit status 2, before anything loads
positive_int = _at_least(int, 1, False, "a whole number >= 1")
non_negative_int = _at_least(int, 0, False, "a whole number >= 0")
positive_float = _at_least(float, 0.0, True, "a finite number > 0")
non_negative_float = _at_least(float, 0.0, False, "a finite number >= 0")

SEED_MAX = 2**31 - 1  # torch, random and NumPy (which takes < 2**32, seeded with seed + rank) all accept it


def seed(value: str) -> int:
    """--seed: a whole number from 0 to :data:`SEED_MAX`."""
    number = non_negative_int(value)
    if number > SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {SEED_MAX}, got {value}")
    return number


def fraction(value: str) -> float:
    """A share in (0, 1] (e.g. --sample_rate)."""
    number = positive_float(value)
    if number > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {number}")
    return number


def positive_float32(value: str) -> float:
    """A finite number > 0 that stays so in float32, where the computation happens (1e-300 would
    become 0 there)."""
    import numpy as np

    number = positive_float(value)
    with np.errstate(over="ignore", under="ignore"):
        single = float(np.float32(number))
    if not (math.isfinite(single) and single >= float(np.finfo(np.float32).tiny)):
        raise argparse.ArgumentTypeError(f"expected a number > 0 that float32 holds (from about 1.2e-38 to 3.4e38), "
                                         f"got {value}")
    return number


def count_or_all(value: str) -> int:
    """A whole number >= 1, or -1 for all (e.g. --n-per-class-list)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, or -1 for all, got {value!r}") from None
    if number != -1 and number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, or -1 for all, got {number}")
    return number


def non_empty(value: str) -> str:
    """A string that is not empty or blank (names and paths)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("expected a name or a path, got an empty string")
    return value


def output_dir(value: str) -> str:
    """A folder results can be written to: it exists as a writable folder, or can be created
    (the nearest existing parent is a writable folder). Checked when the flags are read, so a
    bad path fails before the work, not after it; nothing is created here."""
    if not value.strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty string (use . for the current folder)")
    path = Path(value).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a broken link where a folder should be
            raise argparse.ArgumentTypeError(f"cannot create {path}: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        where = "is" if existing == path else f"would be under {existing}, which is"
        raise argparse.ArgumentTypeError(f"cannot write results to {path}: it {where} not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write results to {path}: {existing} is not writable")
    return value


# Device types the programs run on; their indices are checked against what is present.
DEVICE_TYPES = ("cpu", "cuda")


def device_option(value: str) -> str:
    """--device: cpu, cuda or cuda:N naming a GPU that is present here."""
    expected = "cpu, cuda or cuda:N"
    try:
        device = torch.device(value.strip())
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
    if device.type not in DEVICE_TYPES:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r} (the programs run on CPUs and CUDA "
                                         "GPUs)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{value!r}: no CUDA GPU is available here (use --device cpu)")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{value!r}: this machine has {count} GPU(s), cuda:0 to "
                                             f"cuda:{count - 1}")
    return value.strip()


def add_runtime_args(parser, compile: bool = True) -> None:
    """Flags every program shares: device, precision, data loading (and ``--compile`` for
    the programs that embed with a frozen model)."""
    parser.add_argument("--device", default=None, type=device_option,
                        help="cuda, cuda:1 or cpu (default: the local GPU when there is one, else the CPU)")
    parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                        help="autocast precision for the forward pass; auto = fp16 on GPUs, fp32 on CPUs")
    parser.add_argument("--decode", default="auto", choices=("auto", *DECODE_CHOICES), type=_decode_option,
                        help="input pipeline: auto (default: device-resize on GPUs, exact on CPUs), exact and "
                             "device-resize give the published pixels; turbo (pip install simplejpeg) gives them "
                             "wherever its libjpeg-turbo and Pillow's agree, which it checks at start (see the README)")
    if compile:
        parser.add_argument("--compile", action="store_true",
                            help="torch.compile the model for embedding (GPUs: faster after a warm-up of a "
                                 "minute or so; no gain on CPUs)")
    parser.add_argument("--skip-bad-images", "--skip_bad_images", dest="skip_bad_images", action="store_true",
                        help="leave undecodable images out (counted in the results) instead of stopping")
    parser.add_argument("--strict-images", "--strict_images", dest="strict_images", action="store_true",
                        help="treat JPEGs whose data libjpeg reports as corrupt as bad images (by default they are "
                             "decoded, as published, and counted and named in the results; needs simplejpeg)")


def check_images(datasets, strict: bool = False) -> dict:
    """Look for damaged JPEG data in ``datasets`` (ImageDatasets; None entries are ignored) before
    any embedding; name what is found on stderr (rank 0) and return the results-file fields:
    ``damaged_images`` (the paths) and ``damaged_images_checked`` (False without simplejpeg).
    With ``strict`` the damaged files are bad images (see :func:`unicom.data.image.check_jpegs`)."""
    from ..data.image import check_jpegs, jpeg_check_available

    available = jpeg_check_available()
    if strict and not available:
        raise ValueError("--strict-images needs the simplejpeg package to find damaged JPEG data: "
                         "pip install simplejpeg (or unicom[fast])")
    damaged: list[str] = []
    for dataset in datasets:
        if dataset is not None:
            damaged += [dataset.paths[i] for i in sorted(check_jpegs(dataset, strict=strict))]
    if dist.is_main_process():
        if not available:
            print("warning: damaged JPEG data cannot be detected without the simplejpeg package "
                  "(pip install simplejpeg): such files are decoded unchecked", file=sys.stderr, flush=True)
        elif damaged:
            shown = "\n  ".join(damaged[:20]) + (f"\n  ... and {len(damaged) - 20} more" if len(damaged) > 20 else "")
            what = "left out as bad images" if strict else "decoded anyway (--strict-images leaves them out)"
            print(f"warning: {len(damaged)} JPEG(s) with damaged data, {what}:\n  {shown}", file=sys.stderr,
                  flush=True)
    return {"damaged_images": damaged, "damaged_images_checked": available}


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


def settings(args) -> dict:
    """The run's flags (plain values), as checkpoints and results.json record them."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def trainer_options(args, device: torch.device) -> dict:
    """The keywords of :func:`unicom._training.build_trainer` that the training flags set."""
    margin = CombinedMarginLoss(args.margin_loss_s, args.margin_loss_m1, args.margin_loss_m2, args.margin_loss_m3,
                                args.margin_gradient)
    return dict(margin=margin, device=device, output=args.output, batch_size=args.batch_size, lr=args.lr,
                lr_pfc_weight=args.lr_pfc_weight, optimizer=args.optimizer, weight_decay=args.weight_decay,
                schedule=getattr(args, "lr_schedule", "onecycle"), sample_rate=args.sample_rate,
                num_feat=args.num_feat, precision=resolve_precision(args.precision, device),
                gradient_acc=args.gradient_acc, log_every=args.log_every, settings=settings(args))


def train_transforms(args, input_size: int):
    """(training transform, its matching evaluation transform) of ``--transform`` and the
    augmentation flags: timm's augmentation, or origin_clip's eval transform for both."""
    if args.transform == "timm":
        return (train_transform(input_size, "timm", color_jitter=args.color_jitter, auto_augment=args.aa,
                                re_prob=args.reprob, re_mode=args.remode, re_count=args.recount),
                test_transform(input_size))
    tf = train_transform(input_size, "origin_clip")
    return tf, tf


def run_cli(main) -> int:
    """Run a program's ``main()`` for the command line: errors that describe bad input (a
    missing file or dataset, a download or checkpoint problem, an undecodable image, a NaN
    loss) end with their message and exit status 2 instead of a traceback. ``main`` itself
    still raises, for callers and tests. Set ``UNICOM_TRACEBACK=1`` to see the traceback."""
    from ..checkpoint import CheckpointError
    from ..data import BadImageError
    from .._hub import DownloadError

    # ValueError: unknown model or dataset names and invalid option values.
    user_errors = (DownloadError, CheckpointError, BadImageError, FileNotFoundError, IsADirectoryError,
                   FloatingPointError, ValueError)
    try:
        return main()
    except user_errors as error:
        if os.environ.get("UNICOM_TRACEBACK"):
            raise
        print(f"error: {_own_message(error)}", file=sys.stderr, flush=True)
        return 2


def _own_message(error: BaseException) -> str:
    """The error's message; for one raised in a DataLoader worker (which PyTorch re-raises with
    the worker's whole traceback as its message), the original message alone."""
    message = str(error)
    if "Original Traceback (most recent call last)" in message:
        last = message.rstrip().splitlines()[-1]  # "package.module.ErrorType: the original message"
        message = last.split(": ", 1)[1] if ": " in last else last
    return message
