"""Pieces shared by the programs: logging, device and precision choice, result files."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator

import torch

from .. import _distributed as dist
from .._utils import QUANTIZED_PRECISIONS
from ..data._pipelines import resolve_decode
from ..losses import CombinedMarginLoss
from ..transforms import test_transform, train_transform
# The flags moved to .flags (torch-free); names kept here for code that imports them from common.
from .flags import (EMBEDDING_PRECISION_CHOICES, PRECISION_CHOICES,  # noqa: F401
                    add_runtime_args, add_train_args, count_or_all, device_option,  # noqa: F401
                    fraction, non_empty, non_negative_float, non_negative_int, output_dir, positive_float,
                    positive_float32, positive_int, run_cli, seed)


def setup_logging() -> None:
    """Log lines to stderr (results go to stdout): INFO on rank 0, warnings only elsewhere.
    Python warnings (e.g. :class:`~unicom.data.DatasetCountWarning`) become log lines of their
    message alone, without the library source line that raised them."""
    level = logging.INFO if dist.is_main_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr, force=True)
    warnings.showwarning = _log_warning
    # faiss' loader logs at INFO which of its builds it tried ("Could not load library with AVX2 support"):
    # a fallback that works, not news for the user
    logging.getLogger("faiss").setLevel(logging.WARNING)


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger("unicom").warning("%s", message)


@contextlib.contextmanager
def process_group(requested: str | None) -> Iterator[torch.device]:
    """One run of a program: its device (``--device``), the process group when torchrun started
    it (left again at the end, whatever happens), and logging."""
    device = dist.setup(requested)
    setup_logging()
    try:
        yield device
    finally:
        dist.cleanup()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp16 autocast on CUDA (as published), exact fp32 on the CPU. ``int8`` is refused
    off the CPU (a ValueError saying so)."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision in QUANTIZED_PRECISIONS and device.type != "cpu":
        raise ValueError(f"--precision {precision} runs on CPUs only, and this run's device is {device}: add "
                         "--device cpu (on GPUs, auto gives fp16)")
    return precision


def load_for_embedding(name_or_path, device: torch.device, precision: str = "auto", compile: bool = False):
    """``(model, transform)`` for embedding with ``--precision``: int8 loads the quantised model
    (``load(precision="int8")``, CPUs only, refused elsewhere before anything loads); every other
    precision loads the fp32 weights, and :func:`embedding_options` gives the autocast."""
    from .._factory import load

    resolved = resolve_precision(precision, torch.device(device))
    if resolved in QUANTIZED_PRECISIONS and compile:
        raise ValueError(f"--compile does not apply to --precision {resolved} (its quantised kernels run as they "
                         "are): leave one out")
    return load(name_or_path, device=device, precision=resolved if resolved in QUANTIZED_PRECISIONS else "fp32",
                compile=compile)


def runtime_record(args, device: torch.device) -> dict:
    """How the embeddings were computed, for results files: device type, autocast precision,
    input pipeline (``auto`` resolved) and compilation."""
    return {"device": device.type, "precision": resolve_precision(args.precision, device),
            "decode": resolve_decode(args.decode, device), "compile": bool(getattr(args, "compile", False))}


def embedding_options(args, device: torch.device) -> dict:
    """The keywords of :func:`unicom.evaluate.embed_dataset` that the runtime flags set."""
    return dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                precision=resolve_precision(args.precision, device), decode=args.decode)


def print_retrieval(record: dict, heading: str = "") -> None:
    """A retrieval results record (see :meth:`unicom.evaluate.RetrievalResult.record`) as a table on
    stdout, its first line starting with ``heading`` (e.g. the epoch) when given."""
    title = f"{record['dataset']}  {record['model']}  queries={record['num_query']} gallery={record['num_gallery']}"
    lines = [f"{heading}  {title}" if heading else title]
    lines += [f"  Recall@{k:<5} {v:6.2f}" for k, v in record["recall"].items()]
    lines += [f"  MAP@R        {record['map_at_r']:6.2f}", f"  R-precision  {record['r_precision']:6.2f}"]
    print("\n".join(lines), flush=True)


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
