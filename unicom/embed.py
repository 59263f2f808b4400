"""Embedding a dataset with a model, sharded across processes.

Each process embeds its contiguous shard (see :func:`unicom.data.loader.sharded_loader`);
:func:`gather_embeddings` then concatenates the shards with tensor collectives, so every
image is embedded exactly once whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from . import distributed as dist

__all__ = ["Embeddings", "autocast_for", "embed_loader", "gather_embeddings"]

logger = logging.getLogger(__name__)

AMP_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Embeddings:
    features: torch.Tensor  # (N, D) float32, not normalised
    labels: torch.Tensor  # (N,) int64
    indices: torch.Tensor  # (N,) int64: dataset index of each row
    ok: torch.Tensor  # (N,) bool: False for images that could not be decoded (skipped)

    def valid(self) -> Embeddings:
        """Only the rows whose images were decoded."""
        keep = self.ok
        return Embeddings(self.features[keep], self.labels[keep], self.indices[keep], self.ok[keep])

    @property
    def num_skipped(self) -> int:
        return int((~self.ok).sum())


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` ("fp32", "fp16", "bf16") on ``device``."""
    try:
        dtype = AMP_DTYPES[precision]
    except KeyError:
        raise ValueError(f"Unknown precision {precision!r}: expected one of {list(AMP_DTYPES)}") from None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


Preprocess = Callable[[Any, torch.Tensor, torch.device], "tuple[torch.Tensor, torch.Tensor]"]


@torch.no_grad()
def embed_loader(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    precision: str = "fp32",
    desc: str = "embedding",
    preprocess: Preprocess | None = None,
    batch_size: int | None = None,
) -> Embeddings:
    """Run ``model`` over a loader of ``(images, labels, indices, ok)`` batches on ``device``.

    ``preprocess(images, ok, device) -> (images, ok)`` turns a loader batch into model input on
    ``device`` (e.g. :meth:`unicom.data.pipelines.InputPipeline.to_device`: uint8 pixels normalised
    there); by default the images are moved as they are. Inputs are cast to the dtype of the
    model's weights (``load(..., precision="fp16")``). With ``batch_size``, loader batches
    (which may be smaller: many small batches keep every worker busy) are gathered on the
    device and the model runs on ``batch_size`` images at a time (the last batch smaller).
    Results stay on ``device``: no per-batch host round trip.
    """
    model.eval()
    weight_dtype = _weight_dtype(model)
    features, labels, indices, oks = [], [], [], []
    pending: list[torch.Tensor] = []
    pending_rows = 0

    def run(images: torch.Tensor) -> None:
        with autocast_for(device, precision):
            features.append(model(images).float())

    batches = tqdm(loader, desc=desc, disable=not dist.is_main_process(), leave=False)
    for images, batch_labels, batch_indices, batch_ok in batches:
        if preprocess is None:
            images = images.to(device, non_blocking=True)
        else:
            images, batch_ok = preprocess(images, batch_ok, device)
        if images.is_floating_point() and images.dtype != weight_dtype:
            images = images.to(weight_dtype)
        labels.append(batch_labels.to(device, non_blocking=True))
        indices.append(batch_indices.to(device, non_blocking=True))
        oks.append(batch_ok.to(device, non_blocking=True))
        if batch_size is None:
            run(images)
            continue
        pending.append(images)
        pending_rows += images.shape[0]
        if pending_rows >= batch_size:
            stacked = torch.cat(pending) if len(pending) > 1 else pending[0]
            for start in range(0, pending_rows - batch_size + 1, batch_size):
                run(stacked[start:start + batch_size])
            rest = pending_rows % batch_size
            pending = [stacked[pending_rows - rest:]] if rest else []
            pending_rows = rest
    if pending:
        run(torch.cat(pending))
    if not features:  # a process with an empty shard still takes part in the gathers
        dim = _embedding_size(model)
        return Embeddings(
            torch.empty(0, dim, device=device),
            torch.empty(0, dtype=torch.long, device=device),
            torch.empty(0, dtype=torch.long, device=device),
            torch.empty(0, dtype=torch.bool, device=device),
        )
    return Embeddings(torch.cat(features), torch.cat(labels).long(), torch.cat(indices).long(), torch.cat(oks).bool())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _embedding_size(model: torch.nn.Module) -> int:
    return _unwrap(model).config.embedding_size


def _weight_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def gather_embeddings(local: Embeddings) -> Embeddings:
    """Concatenate every process's shard in rank order (tensor collectives, no pickling)."""
    if dist.get_world_size() == 1:
        return local
    gathered = Embeddings(
        dist.all_gather_varlen(local.features),
        dist.all_gather_varlen(local.labels),
        dist.all_gather_varlen(local.indices),
        dist.all_gather_varlen(local.ok.to(torch.uint8)).bool(),
    )
    return gathered
