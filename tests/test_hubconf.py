"""hubconf.py through torch.hub itself (``source="local"``: this checkout, no network)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import unicom
from unicom._hub import DownloadError
from unicom._pretrained import REGISTRY

ROOT = str(Path(__file__).resolve().parents[1])
ENTRIES = {"ViT_B_32": "ViT-B/32", "ViT_B_16": "ViT-B/16", "ViT_L_14": "ViT-L/14", "ViT_L_14_336px": "ViT-L/14@336px"}


def test_entries_are_listed() -> None:
    """What torch.hub.list would show (it reads GitHub repositories only): the public callables."""
    spec = importlib.util.spec_from_file_location("unicom_hubconf", Path(ROOT) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    listed = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert listed == {*ENTRIES, "transform"}
    assert hubconf.dependencies[:2] == ["torch", "torchvision"]
    assert "336 px" in hubconf.ViT_L_14_336px.__doc__ and hubconf.transform.__doc__


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_each_entry_builds_its_architecture(entry: str) -> None:
    with torch.device("meta"):  # shapes only: nothing allocated, nothing downloaded
        model = torch.hub.load(ROOT, entry, source="local", pretrained=False)
    assert isinstance(model, unicom.VisionTransformer) and not model.training
    assert model.config == REGISTRY[ENTRIES[entry]].config


def test_the_transform_feeds_its_model() -> None:
    from PIL import Image

    with torch.device("meta"):  # shapes only (a real ViT-B/32 costs seconds to initialise on 2 cores)
        model = torch.hub.load(ROOT, "ViT_B_32", source="local", pretrained=False)
    transform = torch.hub.load(ROOT, "transform", "ViT_B_32", source="local")
    x = transform(Image.new("RGB", (300, 200), (10, 120, 200))).unsqueeze(0)
    assert x.shape == (1, 3, 224, 224) and model(x.to("meta")).shape == (1, 512)
    assert torch.hub.load(ROOT, "transform", "ViT-L/14@336px", source="local").transforms[2].size == (336, 336)
    with pytest.raises(ValueError, match="Unknown model 'ViT_X'"):
        torch.hub.load(ROOT, "transform", "ViT_X", source="local")


def test_pretrained_goes_through_the_verified_download(monkeypatch) -> None:
    monkeypatch.setenv("UNICOM_OFFLINE", "1")  # the published file is not in the test cache
    with pytest.raises(DownloadError, match="FP16-ViT-B-32.pt"):
        torch.hub.load(ROOT, "ViT_B_32", source="local")
    with pytest.raises(TypeError, match="pretrained=False takes no other arguments"):
        torch.hub.load(ROOT, "ViT_B_32", source="local", pretrained=False, device="cpu")
