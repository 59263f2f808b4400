"""Small helpers with one home: atomic files, model unwrapping, the precision table."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

# Precision name -> dtype: the weights' dtype for ``load(precision=...)``, the autocast dtype for
# the programs' ``--precision`` (fp32: no autocast).
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Inference-only precisions that quantise the weights (``load(precision="int8")``, CPUs only; see
# unicom/quantize.py): the model takes and returns float32, so they need no autocast.
QUANTIZED_PRECISIONS = ("int8",)


def atomic_write(path: str | os.PathLike, write: Callable[[IO], Any], mode: str = "wb") -> None:
    """Write ``path`` whole or not at all: ``write(file)`` fills a temporary file beside it, which
    is flushed to disk, renamed over ``path``, and the rename itself made durable (the folder is
    synced), so a crash leaves either the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    try:
        with open(fd, mode, **text) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): the rename is what it offers
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), "w")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, without its DistributedDataParallel and ``torch.compile`` wrappers."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (a key of :data:`PRECISIONS`, or a quantised precision:
    none) on ``device``."""
    if precision in QUANTIZED_PRECISIONS:
        return contextlib.nullcontext()
    try:
        dtype = PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"Unknown precision {precision!r}: expected one of {list(PRECISIONS)}") from None
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
