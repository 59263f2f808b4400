"""UNICOM: universal and compact image embeddings.

>>> import unicom
>>> model, transform = unicom.load("ViT-B/32")
"""

from .factory import create_model, load
# from .hub import download  (added back when hub.py lands)
from .model import VisionTransformer
from .pretrained import available_models

__all__ = ["available_models", "load", "create_model", "download", "VisionTransformer"]
__version__ = "0.1.0"
