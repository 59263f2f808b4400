"""UNICOM: universal and compact image embeddings.

>>> import unicom
>>> model, transform = unicom.load("ViT-B/32")

The supported names (``__all__``); everything else, and every module whose name starts with an
underscore, is plumbing that may change:

The model
    ``available_models()``, ``load(name_or_path)``, ``create_model(name)``, ``VisionTransformer``,
    ``download(url, sha256)``, ``save_model(model, path)``; their errors ``DownloadError`` and
    ``CheckpointError``.
Embedding and sharing
    ``embed(model, images)`` (paths, PIL images or a Dataset to an (N, D) tensor),
    ``save_pretrained(model, folder)`` and ``push_to_hub(model, "org/name")`` (Hugging Face Hub
    folders, loaded back with ``load("hf-hub:org/name")``).
Evaluation
    ``load_retrieval_dataset(name, root, split, transform)``, ``embed_dataset(model, dataset)``,
    ``evaluate_retrieval(model, query, gallery)``; the metrics ``retrieval_metrics`` and
    ``knn_accuracy`` (pure tensor functions).
Training
    ``CombinedMarginLoss`` (ArcFace / CosFace margins) and ``PartialFC`` (class centres split
    across processes).

The public modules ``unicom.model``, ``unicom.checkpoint``, ``unicom.transforms``,
``unicom.metrics``, ``unicom.losses``, ``unicom.evaluate``, ``unicom.embedding``, ``unicom.hf``
and ``unicom.data`` hold these and
their close relatives. The names are imported on first use, so ``import unicom`` itself is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "available_models", "load", "create_model", "download", "VisionTransformer",
    "save_model", "CheckpointError", "DownloadError",
    "load_retrieval_dataset", "embed_dataset", "evaluate_retrieval", "retrieval_metrics", "knn_accuracy",
    "CombinedMarginLoss", "PartialFC",
    "embed", "save_pretrained", "push_to_hub",
]
__version__ = "0.1.0"

_HOMES = {
    "available_models": "._pretrained",
    "load": "._factory",
    "create_model": "._factory",
    "download": "._hub",
    "VisionTransformer": ".model",
    "save_model": ".checkpoint",
    "CheckpointError": ".checkpoint",
    "DownloadError": "._hub",
    "load_retrieval_dataset": ".data",
    "embed_dataset": ".evaluate",
    "evaluate_retrieval": ".evaluate",
    "retrieval_metrics": ".metrics",
    "knn_accuracy": ".metrics",
    "CombinedMarginLoss": ".losses",
    "PartialFC": ".losses",
    "embed": ".embedding",
    "save_pretrained": ".hf",
    "push_to_hub": ".hf",
}

if TYPE_CHECKING:
    from ._factory import create_model, load
    from ._hub import DownloadError, download
    from ._pretrained import available_models
    from .checkpoint import CheckpointError, save_model
    from .data import load_retrieval_dataset
    from .embedding import embed
    from .evaluate import embed_dataset, evaluate_retrieval
    from .hf import push_to_hub, save_pretrained
    from .losses import CombinedMarginLoss, PartialFC
    from .metrics import knn_accuracy, retrieval_metrics
    from .model import VisionTransformer


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unicom' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
