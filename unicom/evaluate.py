"""Embedding datasets across processes, and the retrieval evaluation built on it.

Each process embeds its contiguous shard (see :func:`unicom.data.loader.sharded_loader`);
:func:`gather_embeddings` then concatenates the shards with tensor collectives, so every
image is embedded exactly once whatever the number of processes. Without a process group
everything runs in this process, so the functions work as they are in a notebook::

    from unicom.evaluate import evaluate_retrieval
    data = load_retrieval_dataset("digits", "data", "test", transform)
    result = evaluate_retrieval(model, data.query, data.gallery, ks=data.ks, device="cpu")
    result.record()["recall"]  # {"1": 97.5, "2": ...} in percent
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from . import _distributed as dist
from ._utils import autocast_for, unwrap_model
from .data._pipelines import embedding_loader
from .metrics import retrieval_metrics

__all__ = ["Embeddings", "RetrievalResult", "embed_dataset", "embed_loader", "evaluate_retrieval",
           "gather_embeddings"]

logger = logging.getLogger(__name__)


@dataclass
class Embeddings:
    features: torch.Tensor  # (N, D) float32, not normalised
    labels: torch.Tensor  # (N,) int64
    indices: torch.Tensor  # (N,) int64: dataset index of each row
    ok: torch.Tensor  # (N,) bool: False for images that could not be decoded (skipped)

    def valid(self) -> Embeddings:
        """Only the rows whose images were decoded."""
        return self.select(self.ok)

    def select(self, keep: torch.Tensor) -> Embeddings:
        """The rows where the boolean mask ``keep`` is true."""
        return Embeddings(self.features[keep], self.labels[keep], self.indices[keep], self.ok[keep])

    @property
    def num_skipped(self) -> int:
        return int((~self.ok).sum())


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
    progress: bool = True,
) -> Embeddings:
    """Run ``model`` over a loader of ``(images, labels, indices, ok)`` batches on ``device``.

    ``preprocess(images, ok, device) -> (images, ok)`` turns a loader batch into model input on
    ``device`` (e.g. :meth:`unicom.data._pipelines.InputPipeline.to_device`: uint8 pixels normalised
    there); by default the images are moved as they are. Inputs are cast to the dtype of the
    model's weights (``load(..., precision="fp16")``). With ``batch_size``, loader batches
    (which may be smaller: many small batches keep every worker busy) are gathered on the
    device and the model runs on ``batch_size`` images at a time (the last batch smaller).
    Results stay on ``device``: no per-batch host round trip. ``progress``: a progress bar on
    the main process.
    """
    model.eval()
    weight_dtype = _weight_dtype(model)
    features, labels, indices, oks = [], [], [], []
    pending: list[torch.Tensor] = []
    pending_rows = 0

    def run(images: torch.Tensor) -> None:
        with autocast_for(device, precision):
            features.append(model(images).float())

    batches = tqdm(loader, desc=desc, disable=not (progress and dist.is_main_process()), leave=False)
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
        dim = unwrap_model(model).config.embedding_size
        return Embeddings(
            torch.empty(0, dim, device=device),
            torch.empty(0, dtype=torch.long, device=device),
            torch.empty(0, dtype=torch.long, device=device),
            torch.empty(0, dtype=torch.bool, device=device),
        )
    return Embeddings(torch.cat(features), torch.cat(labels).long(), torch.cat(indices).long(), torch.cat(oks).bool())


def _weight_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def gather_embeddings(local: Embeddings) -> Embeddings:
    """Concatenate every process's shard in rank order (tensor collectives, no pickling)."""
    if dist.get_world_size() == 1:
        return local
    return Embeddings(
        dist.all_gather_varlen(local.features),
        dist.all_gather_varlen(local.labels),
        dist.all_gather_varlen(local.indices),
        dist.all_gather_varlen(local.ok.to(torch.uint8)).bool(),
    )


def embed_dataset(
    model: torch.nn.Module,
    dataset,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    decode: str = "auto",
    gather: bool = True,
    desc: str = "embedding",
) -> Embeddings:
    """Embed ``dataset`` (an :class:`unicom.data.ImageDataset`), each process its shard.

    ``gather=True``: every process gets all rows, in dataset order; ``False``: this process's
    shard only. ``decode`` picks the input pipeline (``auto``: the published pixels, resized
    on GPUs); ``precision`` the autocast of the forward pass. Undecodable images (datasets
    built with ``skip_bad_images``) are rows with ``ok`` False: see :meth:`Embeddings.valid`.
    """
    device = torch.device(device)
    loader, preprocess = embedding_loader(dataset, decode, batch_size, num_workers, device)
    local = embed_loader(model, loader, device, precision, desc=desc, preprocess=preprocess, batch_size=batch_size)
    if not gather:
        return local
    gathered = gather_embeddings(local)
    order = torch.arange(len(dataset), device=gathered.indices.device)
    if not torch.equal(gathered.indices, order):
        raise RuntimeError("internal error: gathered embeddings are not in dataset order")
    return gathered


@dataclass
class RetrievalResult:
    """One retrieval evaluation: its metrics (fractions, as :func:`unicom.metrics.retrieval_metrics`
    gives them, with ``skipped_images``, ``images_per_second`` and ``seconds``), the embeddings
    they came from (decoded rows only; ``gallery`` None: the queries searched their own set),
    and the embedding dimensions used."""

    metrics: dict
    query: Embeddings
    gallery: Embeddings | None
    num_feat: int | None = None

    def record(self) -> dict:
        """The metrics as the programs' results.json holds them: percentages, string keys."""
        m = self.metrics
        return {
            "num_query": m["num_query"],
            "num_gallery": m["num_gallery"],
            "world_size": dist.get_world_size(),
            "num_feat": self.num_feat,  # None: every embedding dimension
            "recall": {str(k): 100.0 * v for k, v in m["recall"].items()},
            "map_at_r": 100.0 * m["map_at_r"],
            "r_precision": 100.0 * m["r_precision"],
            "num_lone_queries": m["num_lone_queries"],
            "skipped_images": m["skipped_images"],
            "images_per_second": m["images_per_second"],
            "seconds": m["seconds"],
        }


def evaluate_retrieval(
    model: torch.nn.Module,
    query_set,
    gallery_set=None,
    *,
    ks: Sequence[int] = (1,),
    num_feat: int | None = None,
    chunk_size: int = 1024,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    decode: str = "auto",
) -> RetrievalResult:
    """Recall@K, MAP@R and R-precision of ``model`` on a benchmark's query (and gallery) set.

    Without ``gallery_set`` each query searches the other queries. ``num_feat``: use only the
    first ``num_feat`` embedding dimensions; ``chunk_size`` queries are searched at once (memory
    is chunk x gallery similarities). The embedding keywords are those of :func:`embed_dataset`.
    Every process takes part and gets the same result.
    """
    options = dict(batch_size=batch_size, num_workers=num_workers, device=device, precision=precision, decode=decode)
    start = time.perf_counter()
    query = embed_dataset(model, query_set, desc="query", **options)
    gallery = embed_dataset(model, gallery_set, desc="gallery", **options) if gallery_set else None
    seconds_embed = time.perf_counter() - start
    num_images = len(query_set) + (len(gallery_set) if gallery_set else 0)
    skipped = query.num_skipped + (gallery.num_skipped if gallery else 0)
    if skipped:
        logger.warning("left out %d images that could not be decoded", skipped)
    query = query.valid()
    gallery = gallery.valid() if gallery else None
    dims = slice(None) if num_feat is None else slice(0, num_feat)
    metrics = retrieval_metrics(
        query.features[:, dims], query.labels,
        gallery.features[:, dims] if gallery else None, gallery.labels if gallery else None,
        ks=ks, chunk_size=chunk_size,
    )
    metrics.update(
        skipped_images=skipped,
        images_per_second=num_images / max(seconds_embed, 1e-9),
        seconds=time.perf_counter() - start,
    )
    return RetrievalResult(metrics, query, gallery, num_feat)
