"""The registry of published UNICOM models: name -> architecture, input size, URL, SHA256.

Variants are data. Adding a model is adding one entry here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ._hub import RELEASE_PREFIX as RELEASE_URL  # the one definition; hub imports no torch
from .model import ViTConfig

__all__ = ["PretrainedModel", "REGISTRY", "available_models", "get_pretrained"]


@dataclass(frozen=True)
class PretrainedModel:
    name: str
    config: ViTConfig
    url: str
    sha256: str

    @property
    def input_size(self) -> int:
        return self.config.input_size

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _entry(name: str, tag: str, filename: str, sha256: str, **config) -> PretrainedModel:
    return PretrainedModel(name, ViTConfig(**config), f"{RELEASE_URL}/{tag}/{filename}", sha256)


_ENTRIES = [
    _entry("ViT-B/32", "b32", "FP16-ViT-B-32.pt",
           "f9d5696a9b58dbbbefee2d31615ca59084f2895a0fdd2ca4c235e0f9b2793f7a",
           input_size=224, patch_size=32, dim=768, embedding_size=512, depth=12, num_heads=12),
    _entry("ViT-B/16", "b16", "FP16-ViT-B-16.pt",
           "c04f324f7c3b4435667236ec6c0eca1cd62f9d64fbfc2d06f8e8e60e6497edef",
           input_size=224, patch_size=16, dim=768, embedding_size=768, depth=12, num_heads=12),
    _entry("ViT-L/14", "l14", "FP16-ViT-L-14.pt",
           "ff3ab62ff782876460099e6e0ee17b73a7c01109de2fffd595f16f4129404bbd",
           input_size=224, patch_size=14, dim=1024, embedding_size=768, depth=24, num_heads=16),
    _entry("ViT-L/14@336px", "l14_336px", "FP16-ViT-L-14-336px.pt",
           "3916ab5aed3b522fc90345be8b4457fe5dad60801ad2af5a6871c0c096e8d7ea",
           input_size=336, patch_size=14, dim=1024, embedding_size=768, depth=24, num_heads=16),
]

REGISTRY: dict[str, PretrainedModel] = {e.name: e for e in _ENTRIES}


def available_models() -> list[str]:
    """The names of the published UNICOM models, in release order."""
    return list(REGISTRY)


def unknown_model_message(name: str) -> str:
    lowered = {n.lower(): n for n in REGISTRY}
    close = difflib.get_close_matches(name.lower(), lowered, n=1, cutoff=0.3)
    hint = f" Did you mean {lowered[close[0]]!r}?" if close else ""
    return (
        f"Unknown model {name!r}: expected one of {available_models()} or the path of a checkpoint file.{hint}"
    )


def get_pretrained(name: str) -> PretrainedModel:
    """The registry entry for ``name``; an unknown name raises with the available ones and the closest."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(unknown_model_message(name)) from None
