"""The programs' flags: argparse types, the flag groups they share, and the entry point.

Nothing here imports torch or the data stack, so that ``--help`` and usage errors answer at
once: the programs parse their flags first and import the heavy modules after. The choices
offered below are copies of the registries' names (torch-free); tests/test_program_output.py
checks them against the registries.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable

# Copies of registry names (see the module docstring): unicom._utils.PRECISIONS and QUANTIZED_PRECISIONS,
# unicom.data._pipelines.DECODE_CHOICES, unicom.losses.MARGIN_GRADIENTS, unicom._training.SCHEDULES,
# unicom.data.registry.available_datasets(), unicom._pretrain.kmeans.BACKENDS,
# unicom._pretrain.features.FUSIONS and available_sources().
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")  # autocast: training, and embedding with a frozen model
# Embedding with a frozen model may also quantise it (int8, CPUs only: see common.load_for_embedding).
EMBEDDING_PRECISION_CHOICES = (*PRECISION_CHOICES, "int8")
DECODE_CHOICES = ("exact", "device-resize", "turbo")
MARGIN_GRADIENTS = ("straight-through", "exact")
SCHEDULES = ("onecycle", "cosine")
DATASET_NAMES = ("cub", "car", "sop", "inshop", "inat", "digits", "folder", "cars")
KMEANS_BACKENDS = ("auto", "faiss", "torch")
FUSIONS = ("mean", "image", "text")
FEATURE_SOURCES = ("clip", "unicom", "pixels")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (its examples keep their lines) and each flag's default, unless
    its help already names it or there is none to show (switches, defaults decided at run time)."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        default = action.default
        return bool(action.option_strings) and not (default is None or default is False
                                                    or default is argparse.SUPPRESS or "default" in (action.help or ""))

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._shows_default(action):  # argparse prints nothing for a flag without help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        return f"{action.help} (default: %(default)s)" if self._shows_default(action) else action.help


class ProgramParser(argparse.ArgumentParser):
    """A usage error is one line (the full usage of a program with forty flags buries it) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def program_parser(prog: str, description: str, add_help: bool = True) -> argparse.ArgumentParser:
    """A program's parser: its description as written, defaults in --help, one-line usage errors."""
    return ProgramParser(prog, add_help=add_help, description=description, formatter_class=HelpFormatter)


def default_num_workers(most: int = 8) -> int:
    """Data loading processes per process: ``most`` (the published default), or the CPUs
    available to this process where they are fewer (PyTorch warns about more workers than CPUs)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(most, cpus))


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
    import numpy as np  # only when the flag is given

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


# Device types the programs run on; whether a GPU named is present is checked after parsing.
DEVICE_TYPES = ("cpu", "cuda")
_DEVICE = re.compile(r"(cpu|cuda)(:\d+)?")


def device_option(value: str) -> str:
    """--device: cpu, cuda or cuda:N (see :func:`check_device` for whether that GPU is here)."""
    if not _DEVICE.fullmatch(value.strip()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r} (the programs run on CPUs "
                                         "and CUDA GPUs)")
    return value.strip()


def check_device(value: str) -> str:
    """A --device value whose GPU is present here (imports torch to count them)."""
    value = device_option(value)
    if value.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{value!r}: no CUDA GPU is available here (use --device cpu)")
        index = int(value.partition(":")[2] or 0)
        if index >= count:
            raise argparse.ArgumentTypeError(f"{value!r}: this machine has {count} GPU(s), cuda:0 to "
                                             f"cuda:{count - 1}")
    return value


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, then the checks that need torch: a --device GPU must be present
    (a usage error otherwise). Parsing itself imports nothing heavy."""
    args = parser.parse_args(argv)
    if getattr(args, "device", None) is not None:
        try:
            check_device(args.device)
        except argparse.ArgumentTypeError as error:
            parser.error(f"argument --device: {error}")
    return args


def _decode_option(value: str) -> str:
    """--decode: a name whose pipeline can run here (turbo needs simplejpeg: said at once, not
    after the model has loaded)."""
    if value == "turbo":
        try:
            import simplejpeg  # noqa: F401
        except ImportError:
            raise argparse.ArgumentTypeError("turbo needs the simplejpeg package: pip install simplejpeg "
                                             "(or unicom[fast]), or choose another --decode") from None
    return value


def add_loader_args(p: argparse.ArgumentParser, batch_size: int, batch_help: str, workers_help: str,
                    most: int = 8) -> None:
    """``--batch_size`` and ``--num_workers`` (``most``, or the CPUs here if fewer), in either spelling."""
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=positive_int, default=batch_size,
                   help=batch_help)
    p.add_argument("--num_workers", "--num-workers", dest="num_workers", type=non_negative_int,
                   default=default_num_workers(most), help=f"{workers_help} ({most}, or the CPUs here if fewer)")


def add_runtime_args(parser, compile: bool = True) -> None:
    """Flags every program shares: device, precision, data loading (and ``--compile`` and
    ``--precision int8`` for the programs that embed with a frozen model)."""
    parser.add_argument("--device", default=None, type=device_option,
                        help="cuda, cuda:1 or cpu (default: the local GPU when there is one, else the CPU)")
    int8 = ("; int8 (CPUs only): quantised weights, several times faster than fp32, close to it but not the "
            "published numbers (see the README)") if compile else ""
    parser.add_argument("--precision", default="auto",
                        choices=EMBEDDING_PRECISION_CHOICES if compile else PRECISION_CHOICES,
                        help="autocast precision for the forward pass; auto = fp16 on GPUs, fp32 on CPUs" + int8)
    parser.add_argument("--decode", default="auto", choices=("auto", *DECODE_CHOICES), type=_decode_option,
                        help="input pipeline: auto (device-resize on GPUs, exact on CPUs), exact and "
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


def run_cli(main) -> int:
    """Run a program's ``main()`` for the command line: errors that describe bad input (a
    missing file or dataset, a download or checkpoint problem, an undecodable image, a NaN
    loss) end with their message and exit status 2 instead of a traceback. ``main`` itself
    still raises, for callers and tests. Set ``UNICOM_TRACEBACK=1`` to see the traceback."""
    try:
        return main()
    except Exception as error:
        # imported only now: --help and usage errors end inside main() before torch loads
        from ..checkpoint import CheckpointError
        from ..data import BadImageError
        from .._hub import DownloadError

        # ValueError: unknown model or dataset names and invalid option values.
        user_errors = (DownloadError, CheckpointError, BadImageError, FileNotFoundError, IsADirectoryError,
                       FloatingPointError, ValueError)
        if not isinstance(error, user_errors) or os.environ.get("UNICOM_TRACEBACK"):
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
