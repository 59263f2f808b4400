"""Feature sources of step 1: decoded images (and captions) to L2-normalised features.

Sources are data: :data:`SOURCES` maps a name to a builder (``clip``: open_clip image and
caption features and their fusion; ``unicom``: a UNICOM model; ``pixels``: raw pixels, for
tests and demos).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from .._utils import autocast_for

logger = logging.getLogger(__name__)

FUSIONS = ("mean", "image", "text")


def fuse(image: torch.Tensor, text: torch.Tensor, has_text: torch.Tensor, fusion: str) -> torch.Tensor:
    """Combine L2-normalised image features (B, d) with text features (T, d) of the rows with text.

    ``has_text`` (B,) bool selects the T rows that have a caption (in order). ``mean``: the
    renormalised mean of the two; ``text``: the text feature; ``image``: the image feature.
    Rows without a caption keep their image feature whatever the fusion.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}: expected one of {FUSIONS}")
    if int(has_text.sum()) != text.shape[0]:
        raise ValueError(f"{text.shape[0]} text features for {int(has_text.sum())} rows with a caption")
    out = image.clone()
    if fusion == "mean":
        out[has_text] = F.normalize(image[has_text] + text, dim=-1)
    elif fusion == "text":
        out[has_text] = text
    return out


class FeatureSource:
    """Turns decoded images (and tokenised captions) into L2-normalised features.

    Subclasses set ``name``, ``dim``, ``device``, ``image_transform`` (PIL RGB image ->
    (3, H, W) tensor; runs in data loading workers) and, when they read captions,
    ``tokenizer`` (list of captions -> (T, L) token tensor; also in workers).
    """

    name: str = ""
    dim: int = 0
    device: torch.device = torch.device("cpu")
    image_transform: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None

    @property
    def uses_text(self) -> bool:
        return self.tokenizer is not None

    def describe(self) -> dict[str, Any]:
        """What makes these features what they are (recorded, and checked when resuming)."""
        return {"source": self.name}

    def encode(
        self, images: torch.Tensor, tokens: torch.Tensor | None, has_text: torch.Tensor, fusion: str,
        precision: str = "fp32",
    ) -> torch.Tensor:
        """(B, 3, H, W) images on ``device`` -> (B, dim) float32 L2-normalised features."""
        raise NotImplementedError


class PixelSource(FeatureSource):
    """Raw pixels: resized to ``size`` x ``size``, flattened, scaled to [-1, 1], L2-normalised."""

    name = "pixels"

    def __init__(self, size: int = 16, device: str | torch.device | None = None) -> None:
        if size < 1:
            raise ValueError(f"pixel size must be >= 1, got {size}")
        self.size = size
        self.dim = 3 * size * size
        self.device = torch.device(device or "cpu")
        self.image_transform = T.Compose([T.Resize((size, size), antialias=True), T.ToTensor()])

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "size": self.size}

    @torch.no_grad()
    def encode(self, images, tokens, has_text, fusion, precision="fp32"):
        return F.normalize(images.flatten(1).float() * 2 - 1, dim=-1)  # (B, 3*size*size)


class UnicomSource(FeatureSource):
    """A UNICOM model's embedding of the image, L2-normalised."""

    name = "unicom"

    def __init__(self, model_name: str = "ViT-B/32", device: str | torch.device | None = None) -> None:
        from .._factory import load

        self.model_name = str(model_name)
        self.model, self.image_transform = load(model_name, device=device)
        self.device = next(self.model.parameters()).device
        self.dim = self.model.config.embedding_size

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "model": self.model_name}

    @torch.no_grad()
    def encode(self, images, tokens, has_text, fusion, precision="fp32"):
        with autocast_for(self.device, precision):
            out = self.model(images)
        return F.normalize(out.float(), dim=-1)


class ClipSource(FeatureSource):
    """An open_clip model: image and caption features and their fusion.

    Build it from a name with ``ClipSource.create("ViT-B-32", "laion400m_e32")``, or wrap an
    open_clip ``model``, its eval ``preprocess`` and ``tokenizer`` already built.
    """

    name = "clip"

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                 description: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.image_transform = preprocess
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.description = {"source": self.name, **(description or {})}
        # The embedding width is not in every open_clip config: read it off one forward pass.
        probe = preprocess(Image.new("RGB", (32, 32))).unsqueeze(0).to(self.device)
        with torch.no_grad():
            self.dim = int(model.encode_image(probe).shape[-1])

    @classmethod
    def create(cls, model_name: str = "ViT-B-32", pretrained: str | None = "laion400m_e32",
               device: str | torch.device | None = None, **open_clip_kwargs: Any) -> ClipSource:
        """Build with open_clip; ``pretrained=None`` gives random weights (for tests), and any
        other value is an open_clip tag (downloaded by open_clip) or a local weights file."""
        import open_clip

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, **open_clip_kwargs)
        if pretrained is None:
            logger.warning("open_clip model %s has random weights (pretrained=None)", model_name)
        # a shortened text context (force_context_length) must shorten the tokenizer's output too
        tokenizer = open_clip.get_tokenizer(model_name, context_length=open_clip_kwargs.get("force_context_length"))
        description = {"model": model_name, "pretrained": pretrained, **open_clip_kwargs}
        return cls(model, preprocess, tokenizer, description)

    def describe(self) -> dict[str, Any]:
        return dict(self.description)

    @torch.no_grad()
    def encode(self, images, tokens, has_text, fusion, precision="fp32"):
        with autocast_for(self.device, precision):
            image = self.model.encode_image(images)
            text = self.model.encode_text(tokens) if tokens is not None and tokens.shape[0] else None
        image = F.normalize(image.float(), dim=-1)  # (B, d)
        if text is None:
            return image
        return fuse(image, F.normalize(text.float(), dim=-1), has_text, fusion)


@dataclass(frozen=True)
class SourceEntry:
    builder: Callable[..., FeatureSource]
    help: str


SOURCES: dict[str, SourceEntry] = {
    "clip": SourceEntry(ClipSource.create, "open_clip image + caption features (model_name, pretrained)"),
    "unicom": SourceEntry(UnicomSource, "a UNICOM model's image embedding (model_name)"),
    "pixels": SourceEntry(PixelSource, "raw pixels resized small (size); for tests and demos"),
}


def available_sources() -> list[str]:
    return list(SOURCES)


def build_source(name: str, device: str | torch.device | None = None, **options: Any) -> FeatureSource:
    """The feature source registered as ``name``, built with ``options`` on ``device``."""
    try:
        entry = SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown feature source {name!r}: expected one of {available_sources()}") from None
    return entry.builder(device=device, **options)
