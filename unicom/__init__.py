"""UNICOM: universal and compact image embeddings.

>>> import unicom
>>> model, transform = unicom.load("ViT-B/32")

The public names are imported on first use, so ``import unicom`` itself is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["available_models", "load", "create_model", "download", "VisionTransformer"]
__version__ = "0.1.0"

_HOMES = {
    "available_models": "._pretrained",
    "load": "._factory",
    "create_model": "._factory",
    "download": "._hub",
    "VisionTransformer": ".model",
}

if TYPE_CHECKING:
    from ._factory import create_model, load
    from ._hub import download
    from .model import VisionTransformer
    from ._pretrained import available_models


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unicom' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
