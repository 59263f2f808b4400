"""Datasets: one module per on-disk format, the registry, and the sharded loader.

The names in ``__all__`` are the supported ones; the submodules (one per format, the scans,
the image checks) and ``_pipelines`` (the ``--decode`` input pipelines) are their plumbing.
"""

from .base import DatasetCountWarning, RetrievalDataset
from .folder import load_image_folder
from .image import BadImageError, ImageDataset
from .loader import sharded_loader
from .registry import ALIASES, DATASETS, available_datasets, load_retrieval_dataset
from .standard import STANDARD

__all__ = [
    "ALIASES",
    "BadImageError",
    "DATASETS",
    "DatasetCountWarning",
    "ImageDataset",
    "RetrievalDataset",
    "STANDARD",
    "available_datasets",
    "load_image_folder",
    "load_retrieval_dataset",
    "sharded_loader",
]
