"""unicom.load(name): the registry path end to end against a real HTTP server on 127.0.0.1."""

import hashlib
import sys
from pathlib import Path

import pytest
import torch

import unicom
from unicom._hub import ChecksumError, DownloadError
from unicom.model import ViTConfig
from unicom._pretrained import REGISTRY, RELEASE_URL, PretrainedModel

sys.path.insert(0, str(Path(__file__).parent))
from http_server import FileServer  # noqa: E402

TINY = ViTConfig(input_size=32, patch_size=16, dim=64, embedding_size=16, depth=1, num_heads=1)


@pytest.fixture
def published_file(tmp_path):
    """A published-format file: a bare float16 state dict, as the release ships."""
    torch.manual_seed(0)
    model = unicom.VisionTransformer(**TINY.to_dict()).eval()
    path = tmp_path / "FP16-Tiny.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path.read_bytes()


def register(monkeypatch, data: bytes) -> PretrainedModel:
    entry = PretrainedModel("Tiny/16", TINY, f"{RELEASE_URL}/tiny/FP16-Tiny.pt", hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    return entry


def test_load_name_downloads_once_verifies_and_loads(monkeypatch, tmp_path, published_file):
    register(monkeypatch, published_file)
    with FileServer() as server:
        server.add("/mirror/tiny/FP16-Tiny.pt", published_file)
        monkeypatch.setenv("UNICOM_MIRROR", server.url("/mirror"))
        model, transform = unicom.load("Tiny/16", device="cpu", download_root=tmp_path / "weights")
        assert (tmp_path / "weights" / "FP16-Tiny.pt").read_bytes() == published_file
        assert not model.training and model.config == TINY
        assert transform.transforms[1].size == 32
        unicom.load("Tiny/16", device="cpu", download_root=tmp_path / "weights")
        assert len(server.requests_for("/mirror/tiny/FP16-Tiny.pt")) == 1  # cached the second time
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 16) and out.dtype == torch.float32


def test_load_name_with_wrong_bytes_is_refused(monkeypatch, tmp_path, published_file):
    register(monkeypatch, published_file)
    with FileServer() as server:
        server.add("/mirror/tiny/FP16-Tiny.pt", published_file, behaviour="wrong", wrong=b"x" * len(published_file))
        monkeypatch.setenv("UNICOM_MIRROR", server.url("/mirror"))
        with pytest.raises(ChecksumError):
            unicom.load("Tiny/16", device="cpu", download_root=tmp_path / "weights")
    assert not (tmp_path / "weights" / "FP16-Tiny.pt").exists()


def test_offline_missing_file_says_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.setenv("UNICOM_OFFLINE", "1")
    with pytest.raises(DownloadError) as error:
        unicom.load("ViT-B/32", device="cpu", download_root=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "FP16-ViT-B-32.pt") in message
    assert REGISTRY["ViT-B/32"].url in message
