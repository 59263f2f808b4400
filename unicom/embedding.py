"""``unicom.embed``: embeddings of a list of images (or a Dataset) in one call, for notebooks.

    model, transform = unicom.load("ViT-B/32")
    features = unicom.embed(model, ["a.jpg", "b.png", pil_image])    # (3, 512), L2-normalised, CPU

It runs the same input pipeline and batched loop as the programs (:mod:`unicom.data._pipelines`,
:func:`unicom.evaluate.embed_loader`): with the published eval transform the pixels are the
published ones, decoded by DataLoader workers and normalised on the model's device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ._utils import PRECISIONS, unwrap_model
from .data import image as image_module
from .data.image import BadImageError, ImageDataset
from .data._pipelines import embedding_loader
from .evaluate import embed_loader
from .transforms import eval_transform, to_rgb

__all__ = ["embed"]


class _Items(Dataset):
    """Any Dataset as :class:`ImageDataset` items ``(image, 0, index, True)``: an item that is a
    tuple gives its first element (``(image, label)`` of torchvision datasets); a PIL image is
    converted to RGB and transformed, anything else (a tensor) is taken as it is."""

    transform = None  # not the published transform's pipeline: embedding_loader reads the items as they are

    def __init__(self, dataset: Dataset, transform: Callable | None) -> None:
        self.dataset, self.image_transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int, int, bool]:
        item = self.dataset[index]
        image = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(image, Image.Image):
            if self.image_transform is None:
                raise TypeError("the dataset yields PIL images: pass transform= (e.g. the one unicom.load returns)")
            image = self.image_transform(to_rgb(image))
        return image, 0, index, True


def _as_dataset(images, transform: Callable | None, skip_bad: bool) -> tuple[Dataset, str]:
    """(the dataset to embed, the ``decode`` to ask for): lists become an ImageDataset (the fast
    exact pipeline applies to it), other Datasets are read as they are."""
    if isinstance(images, ImageDataset):
        dataset = images
        if transform is not None or skip_bad != images.skip_bad_images:
            dataset = ImageDataset(images.samples, images.labels, transform or images.transform, skip_bad,
                                   images.classes, placeholder_size=images.placeholder_size)
            dataset.paths = images.paths
        return dataset, "auto"
    if isinstance(images, Dataset):
        return _Items(images, transform), "exact"
    if isinstance(images, (str, os.PathLike, Image.Image)) or not isinstance(images, Sequence):
        raise TypeError(f"expected a list of image paths or PIL images, or a Dataset; got {type(images).__name__} "
                        "(wrap a single image in a list)")
    for i, sample in enumerate(images):
        if not isinstance(sample, (str, os.PathLike, Image.Image, np.ndarray)):
            raise TypeError(f"images[{i}] is a {type(sample).__name__}: expected a path or a PIL image")
    return ImageDataset(list(images), torch.zeros(len(images), dtype=torch.long), transform, skip_bad), "auto"


def _clean(error: BadImageError) -> str:
    """The error's own line (a DataLoader worker's error comes back holding its whole traceback)."""
    message = str(error)
    if "Original Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return message.replace("--skip-bad-images (skip_bad_images=True) to leave it out of the evaluation",
                           "skip_bad=True to get a zero row and a validity mask instead")


def embed(
    model: torch.nn.Module,
    images: Sequence[str | os.PathLike | Image.Image] | Dataset,
    *,
    transform: Callable | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    normalize: bool = True,
    progress: bool = True,
    skip_bad: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Embed ``images`` with ``model``: an (N, D) float32 CPU tensor, row ``i`` for ``images[i]``.

    Args:
        images: a list of image paths and/or PIL images, or a Dataset (an
            :class:`unicom.data.ImageDataset`, or one whose items are images or ``(image, ...)``
            tuples: PIL images go through ``transform``, tensors are taken as they are).
        transform: PIL image -> model input; default the published eval transform for the model's
            input size (what :func:`unicom.load` returns). With it, the exact fast pipeline runs:
            the published pixels, resized on the GPU there.
        batch_size: images per forward pass.
        num_workers: DataLoader processes decoding images; default 8 (at most the CPU count) on
            CUDA, 0 on the CPU, whose cores the model needs.
        device: where the model runs; default the model's own device (``unicom.load`` puts it on
            the GPU when there is one). A model elsewhere is moved there.
        precision: autocast of the forward pass: ``auto`` (fp16 on CUDA, fp32 on the CPU), ``fp32``,
            ``fp16`` or ``bf16``.
        normalize: L2-normalise each row (for cosine similarity as a dot product).
        progress: a progress bar.
        skip_bad: an image that cannot be decoded gives a zero row instead of an error, and the
            result is ``(features, valid)`` with ``valid`` an (N,) bool mask.

    Raises:
        unicom.data.BadImageError: an undecodable image (without ``skip_bad``), naming the file.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    if precision != "auto" and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: expected auto or one of {list(PRECISIONS)}")
    # An ImageDataset built without a transform yields uint8 tensors: it gets the model's, as lists do.
    bare = isinstance(images, ImageDataset) and images.transform is image_module._default_transform
    if transform is None and config is not None and (bare or not isinstance(images, ImageDataset)):
        transform = eval_transform(config.input_size)
    if transform is None and not isinstance(images, Dataset):
        raise ValueError("this model has no unicom config to take the input size from: pass transform=")
    dataset, decode = _as_dataset(images, transform, skip_bad)
    parameter = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (parameter.device if parameter is not None
                                                               else torch.device("cpu"))
    model.to(device)
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    if len(dataset) == 0:
        dim = config.embedding_size if config is not None else 0
        features, ok = torch.empty(0, dim), torch.empty(0, dtype=torch.bool)
    else:
        # rank 0 of 1: the whole list here, whether or not a process group exists
        loader, preprocess = embedding_loader(dataset, decode, batch_size, num_workers, device, rank=0, world_size=1)
        try:
            result = embed_loader(model, loader, device, precision, desc="embed", preprocess=preprocess,
                                  batch_size=batch_size, progress=progress)
        except BadImageError as error:
            raise BadImageError(_clean(error)) from None
        order = torch.argsort(result.indices)
        features, ok = result.features[order].float().cpu(), result.ok[order].cpu()
    if normalize:
        features = torch.nn.functional.normalize(features, dim=-1)
    features[~ok] = 0.0  # a placeholder's embedding is never an image's
    return (features, ok) if skip_bad else features
