"""Pieces shared by the programs: logging, device and precision choice, result files."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from .. import distributed as dist
from ..data.pipelines import DECODE_CHOICES, jpeg, resolve_decode

PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")


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


def write_json(obj: dict, path: str | os.PathLike) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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


def add_runtime_args(parser, compile: bool = True) -> None:
    """Flags every program shares: device, precision, data loading (and ``--compile`` for
    the programs that embed with a frozen model)."""
    parser.add_argument("--device", default=None,
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


def run_cli(main) -> int:
    """Run a program's ``main()`` for the command line: errors that describe bad input (a
    missing file or dataset, a download or checkpoint problem, an undecodable image, a NaN
    loss) end with their message and exit status 2 instead of a traceback. ``main`` itself
    still raises, for callers and tests. Set ``UNICOM_TRACEBACK=1`` to see the traceback."""
    from ..checkpoint import CheckpointError
    from ..data import BadImageError
    from ..hub import DownloadError

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
