"""Embeddings through the pipelines (``embedding_loader`` + ``unicom.evaluate.embed_loader``) equal
those of the published float path, and the published reference model (``tests/published_vit.py``)
is the published graph."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from pipeline_files import CPU, IGNORE_DECODER_DEPRECATION, files_fixture, photos_fixture  # noqa: E402, F401
from published_vit import PublishedViT  # noqa: E402

import unicom  # noqa: E402
from unicom.data import ImageDataset, sharded_loader  # noqa: E402
from unicom.data._pipelines import LOADER_BATCH, embedding_loader  # noqa: E402
from unicom.evaluate import embed_loader  # noqa: E402
from unicom.transforms import eval_transform  # noqa: E402
from unicom.transforms import test_transform as finetune_test_transform  # noqa: E402  (not a test)

pytestmark = [pytest.mark.usefixtures("one_thread"), IGNORE_DECODER_DEPRECATION]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = unicom.VisionTransformer(input_size=32, patch_size=8, dim=64, embedding_size=32, depth=2, num_heads=2)
    return model.eval()


@pytest.mark.parametrize("decode", ["exact", "device-resize"])
def test_embed_loader_exact_paths_equal_the_float_path(files, tiny_model, decode):
    for transform in (eval_transform(32), finetune_test_transform(32)):
        dataset = ImageDataset(files, list(range(len(files))), transform)
        reference = embed_loader(tiny_model, sharded_loader(dataset, 3, 0), CPU)
        loader, preprocess = embedding_loader(dataset, decode, 3, 0, CPU)
        assert preprocess is not None
        ours = embed_loader(tiny_model, loader, CPU, preprocess=preprocess)
        assert torch.equal(ours.features, reference.features)
        assert torch.equal(ours.indices, reference.indices) and torch.equal(ours.labels, reference.labels)


def test_embed_loader_casts_inputs_to_half_weights(files, tiny_model):
    dataset = ImageDataset(files[:3], [0, 1, 2], eval_transform(32))
    loader, preprocess = embedding_loader(dataset, "exact", 3, 0, CPU)
    reference = embed_loader(tiny_model, loader, CPU, preprocess=preprocess).features.double()
    half = embed_loader(tiny_model.to(torch.bfloat16), loader, CPU, preprocess=preprocess).features
    tiny_model.float()
    assert half.dtype == torch.float32
    assert (half.double() - reference).norm() / reference.norm() < 3e-2


class _RecordingModel(torch.nn.Module):
    """A model that records the batch sizes it is called with."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.model(x)


@pytest.mark.parametrize("loader_batch, batch_size, expected", [(3, 4, [4, 4]), (2, 8, [8]), (5, 3, [3, 3, 2])])
def test_embed_loader_gathers_small_loader_batches_into_model_batches(files, tiny_model, loader_batch, batch_size,
                                                                      expected):
    dataset = ImageDataset(files, list(range(len(files))), eval_transform(32))  # 8 images
    reference = embed_loader(tiny_model, sharded_loader(dataset, len(files), 0), CPU)
    loader, preprocess = embedding_loader(dataset, "exact", batch_size, 0, CPU, loader_batch_size=loader_batch)
    assert loader.batch_size == loader_batch
    recording = _RecordingModel(tiny_model)
    ours = embed_loader(recording, loader, CPU, preprocess=preprocess, batch_size=batch_size)
    assert recording.calls == expected
    assert torch.allclose(ours.features, reference.features, atol=1e-6)  # only the batch composition differs
    assert torch.equal(ours.indices, reference.indices) and torch.equal(ours.labels, reference.labels)


def test_embedding_loader_batches_are_small_by_default(files):
    dataset = ImageDataset(files, list(range(len(files))), eval_transform(32))
    assert embedding_loader(dataset, "exact", 512, 0, CPU)[0].batch_size == LOADER_BATCH
    assert embedding_loader(dataset, "exact", 4, 0, CPU)[0].batch_size == 4


def test_published_peer_is_the_published_graph(fixtures_dir, tiny_model):
    """tests/published_vit.py: the fixture's float64 outputs, and our model's, in float32."""
    io_ = torch.load(fixtures_dir / "tiny_reference_io.pt", weights_only=True)
    state = torch.load(fixtures_dir / "tiny_reference_fp16.pt", weights_only=True)
    peer = PublishedViT(**io_["config"]).eval()
    peer.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        out = peer(io_["input"].float()).double()
    assert (out - io_["embedding"]).norm() / io_["embedding"].norm() < 1e-5
    copy = PublishedViT.from_model(tiny_model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(copy(x), tiny_model(x), rtol=0, atol=1e-5)
